"""Training checkpoints for preemptible contributors.

``<workdir>/checkpoints/`` (a local folder or ``gs://``) holds the latest training state:
model and optimizer variables, the best-on-dev weights so far, and a JSON record with the
step, the early-stopping state and a fingerprint of the run (task, batch, schedule, base).
The step fixes the data position, because every epoch's batch order is planned from a seed
(:func:`cold_fusion_tf.inputs.plan_epoch`). Running the same command again restores the
state and continues; a checkpoint of a different run is refused rather than mixed in.

In a multi-worker cluster every worker takes part in saving (as TensorFlow requires), but
only the chief's copy is kept: the others write to a scratch folder they delete at once, and
all workers restore from the chief's folder (so ``--workdir`` must be shared, e.g. ``gs://``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from typing import Any, Iterator

import tensorflow as tf

from cold_fusion_tf.training import distribute as strategies
from cold_fusion_tf.errors import UserError
from cold_fusion_tf.store.backends import local


def check_workdir(workdir: str) -> None:
  """Writes and deletes a probe file in the workdir (reads it back too for ``gs://``), so a
  folder that cannot be created, a missing filesystem or permission fails before training
  rather than at the first checkpoint or log. A local workdir made for the test is removed
  again."""
  if "://" not in workdir:
    local.check_writable_folder(workdir, f"--workdir={workdir}")
    return
  probe = join(workdir, ".cold_fusion_probe")
  try:
    tf.io.gfile.makedirs(workdir)
    with tf.io.gfile.GFile(probe, "w") as f:
      f.write("probe")
    with tf.io.gfile.GFile(probe, "r") as f:
      f.read()
    tf.io.gfile.remove(probe)
  except tf.errors.UnimplementedError as e:
    raise UserError(f"--workdir={workdir}: TensorFlow cannot open this filesystem ({e}). For "
                    "gs://, install the GCS filesystem plugin: pip install "
                    f"'tensorflow[gcs-filesystem]=={tf.__version__}' (tensorflow-tpu on TPU VMs)."
                    ) from e
  except tf.errors.PermissionDeniedError as e:
    raise UserError(f"--workdir={workdir}: permission denied ({e}); grant the service account "
                    "roles/storage.objectUser on the workdir's prefix.") from e
  except tf.errors.OpError as e:
    raise UserError(f"--workdir={workdir}: cannot write and read a probe file there ({e}).") from e


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[None]:
  """Holds an OS lock (``flock`` on ``<workdir>/.lock``) while one process trains in a local
  workdir, so a second process of the same contributor (the same id: the same default
  workdir) fails at once instead of mixing its checkpoints in or losing them when the first
  one finishes and deletes them. The lock ends with the process. A ``gs://`` workdir has
  none: one process per contributor id there."""
  if "://" in workdir:
    yield
    return
  os.makedirs(workdir, exist_ok=True)
  fd = os.open(os.path.join(workdir, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      raise UserError(f"--workdir={workdir}: another process is training in it (the same "
                      "contributor id?); wait for it to end, or give another --workdir.") from e
    yield
  finally:
    os.close(fd)


def join(*parts: str) -> str:
  """Joins path parts for local folders and ``gs://`` alike."""
  return "/".join([parts[0].rstrip("/")] + [p.strip("/") for p in parts[1:]])


class Checkpoints:
  """Saves and restores the training state of one fine-tuning run."""

  def __init__(self, workdir: str, strategy, fingerprint: dict, **objects: Any):
    self.directory = join(workdir, "checkpoints")
    self.fingerprint = fingerprint
    self.chief = strategies.is_chief(strategy)
    task_type, task_id = strategies.task(strategy)
    self.own_directory = (self.directory if self.chief
                          else join(workdir, f"scratch-{task_type}-{task_id}"))
    # A string variable holds the JSON record, so it is saved atomically with the weights.
    self.state = tf.Variable("", dtype=tf.string, trainable=False, name="train_state")
    self.checkpoint = tf.train.Checkpoint(state=self.state, **objects)
    self.manager = tf.train.CheckpointManager(self.checkpoint, self.own_directory, max_to_keep=1)

  def latest(self) -> str | None:
    return tf.train.latest_checkpoint(self.directory)

  def restore(self) -> dict | None:
    """The saved state (after restoring every variable), or None when there is none."""
    path = self.latest()
    if not path:
      return None
    try:
      self.checkpoint.restore(path).assert_existing_objects_matched()
      state = json.loads(self.state.numpy().decode("utf-8"))
      if not isinstance(state, dict):
        raise ValueError("its training record is not a JSON object")
    # A truncated or damaged file: TensorFlow's reader raises IndexError ("Read less bytes
    # than requested") or DataLossError; a damaged record fails to decode or parse.
    except (AssertionError, ValueError, IndexError, KeyError, tf.errors.OpError) as e:
      raise UserError(f"{path}: cannot restore this checkpoint ({e}); delete "
                      f"{self.directory} or use another --workdir.") from e
    saved = state.get("fingerprint")
    if saved != self.fingerprint:
      diff = sorted(k for k in set(saved or {}) | set(self.fingerprint)
                    if (saved or {}).get(k) != self.fingerprint.get(k))
      raise UserError(f"{self.directory} holds a checkpoint of a different run (differs in "
                      f"{', '.join(diff)}); use another --workdir or delete it to start over.")
    return state

  def save(self, step: int, state: dict) -> str:
    """Writes a checkpoint at ``step`` (every worker must call this at the same step)."""
    self.state.assign(json.dumps({**state, "fingerprint": self.fingerprint}))
    try:
      path = self.manager.save(checkpoint_number=step)
    except tf.errors.OpError as e:  # e.g. the disk is full, or the bucket refuses the write
      reason = e.message.split(";")[-1].split("[Op:")[0].strip() or str(e)
      raise UserError(f"{self.own_directory}: cannot write the checkpoint of step {step} "
                      f"({reason}); free space there or use another --workdir (the last "
                      "complete checkpoint is kept).") from e
    if not self.chief:
      tf.io.gfile.rmtree(self.own_directory)
    return path

  def delete(self) -> None:
    """Removes the checkpoints (the chief's, once the run's result is safe elsewhere)."""
    if self.chief and tf.io.gfile.exists(self.directory):
      tf.io.gfile.rmtree(self.directory)
