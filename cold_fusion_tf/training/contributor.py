"""A contributor: fine-tune the latest base on one dataset, upload only the body.

The body is ``config.model.body`` (:mod:`cold_fusion_tf.model.body`): the transformers-TF
body, or the keras-hub body on Keras 3's ``config.model.backend`` (tensorflow or jax); the
contribution is the same Hugging Face-named file either way, and records which made it.
Training runs under the strategy of ``config.strategy`` (see
:mod:`cold_fusion_tf.training.distribute`; on JAX, ``keras.distribution.DataParallel``) and
checkpoints to a work folder, so a preempted contributor that runs the same command again
continues where it stopped. In a multi-worker cluster only the chief writes the
contribution.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from typing import Callable

from absl import logging
import tensorflow as tf

from cold_fusion_tf.training import checkpoints as checkpointing
from cold_fusion_tf import data as data_lib
from cold_fusion_tf.data import folder
from cold_fusion_tf.data import reading
from cold_fusion_tf.model import body as body_lib
from cold_fusion_tf.store import paths
from cold_fusion_tf.store import signing
from cold_fusion_tf import store as store_lib
from cold_fusion_tf.training import distribute as strategies
from cold_fusion_tf.training.recipe import Recipe
from cold_fusion_tf.tensors import safetensors_io as weights
from cold_fusion_tf.errors import UserError


def load_task(config, name: str) -> data_lib.TaskData:
  """A dataset from the config's data settings (validated; no training time spent yet).

  A ``gs://`` folder is copied to a local cache first (through ``tf.io.gfile``).
  """
  max_file_mb = int(config.data.get("max_file_mb", reading.DEFAULT_MAX_FILE_MB))
  if name.startswith("gs://"):
    name = _fetch_folder(name, max_file_mb << 20)
  return data_lib.load_task(name, dirs=list(config.data.dirs), columns=dict(config.data.columns),
                            max_examples=dict(config.data.max_examples), max_file_mb=max_file_mb)


def _fetch_folder(uri: str, max_bytes: int) -> str:
  """Copies a ``gs://`` dataset folder's files (``info.json`` and ``<split>.jsonl|csv|tsv``)
  to a local folder of that name, each checked against ``max_bytes`` before it is copied; the
  local folder holds only what the remote one holds now."""
  uri = uri.rstrip("/")
  key = hashlib.sha256(uri.encode()).hexdigest()[:16]
  local = os.path.join(tempfile.gettempdir(), "cold_fusion", "datasets", key,
                       data_lib.dataset_id(uri))
  wanted = {"info.json"} | {s + e for s in data_lib.SPLITS for e in folder.EXTENSIONS}
  try:
    names = [n for n in (n.rstrip("/") for n in tf.io.gfile.listdir(uri)) if n in wanted]
    sizes = {n: tf.io.gfile.stat(f"{uri}/{n}").length for n in names}
  except tf.errors.OpError as e:
    raise UserError(f"Dataset folder {uri}: cannot list it ({e.message}).") from None
  for name, size in sizes.items():
    if size > max_bytes:
      raise UserError(f"{uri}/{name}: {size} bytes, more than the {max_bytes} a dataset file "
                      "may have (config.data.max_file_mb); sample it down, or raise the "
                      "limit.")
  shutil.rmtree(local, ignore_errors=True)  # a file deleted remotely is gone here too
  os.makedirs(local)
  try:
    for name in names:
      tf.io.gfile.copy(f"{uri}/{name}", os.path.join(local, name), overwrite=True)
  except tf.errors.OpError as e:
    raise UserError(f"Dataset folder {uri}: cannot copy it ({e.message}).") from None
  return local


def default_workdir(store: store_lib.Store, iteration: int, contributor_id: str) -> str:
  """``<tmp>/cold_fusion/<store hash>/<iteration>/<contributor id>``: the same for the same
  command, so a rerun on the same machine finds its checkpoints."""
  key = hashlib.sha256(store.uri.encode()).hexdigest()[:12]
  return os.path.join(tempfile.gettempdir(), "cold_fusion", key,
                      paths.iteration_name(iteration), contributor_id)


def contribute(store: store_lib.Store, config, task_name: str, contributor_id: str = "",
               task: data_lib.TaskData | None = None, strategy=None,
               log: Callable[[str], None] = logging.info, workdir: str | None = None) -> dict:
  """Trains one contribution for the latest base and writes it to the store.

  Everything that can be checked (store, base, dataset, contributor id, an earlier
  contribution under the same id, the strategy and batch) is checked before training
  starts. ``strategy`` defaults to ``config.strategy``; ``workdir`` (local or ``gs://``,
  for checkpoints, the token cache and TensorBoard logs) defaults to
  :func:`default_workdir`. Returns the contribution's metadata (``{}`` on a worker that is
  not the chief, which writes nothing).
  """
  body_type, backend = body_lib.settings(config)
  if body_type == "keras_hub":
    body_lib.select_backend(backend)  # before Keras 3 is imported
  strategy = strategy or body_lib.make_strategy(config, body_type, backend)
  iteration = store.require_latest()
  task = task or load_task(config, task_name)
  dataset = data_lib.dataset_id(task_name)
  contributor_id = paths.check_path_part(contributor_id or dataset, "Contributor id")
  if store.has_contribution(iteration, contributor_id):
    raise UserError(f"{store.uri}: {contributor_id!r} already contributed to iteration "
                    f"{iteration}; choose another --config.contributor_id or wait for the "
                    "next base.")
  sign = signing.signer(store, contributor_id, config.get("signing_key", ""))
  recipe = Recipe.from_config(config.recipe)
  body_lib.check_batch(recipe, strategy)
  workdir = workdir or default_workdir(store, iteration, contributor_id)
  if strategies.tpu_hosts(strategy) > 1 and not workdir.startswith("gs://"):
    raise UserError(f"--workdir={workdir!r}: a multi-host TPU slice needs a gs:// workdir "
                    "(checkpoints are written by the hosts that hold the variables).")
  chief = strategies.is_chief(strategy)
  if chief:
    checkpointing.check_workdir(workdir)
  # One process per workdir: a second one of the same contributor stops here.
  with checkpointing.workdir_lock(workdir) if chief else contextlib.nullcontext():
    return _train_and_upload(store, iteration, contributor_id, task, dataset, recipe, strategy,
                             body_type, backend, sign, log, workdir)


def _train_and_upload(store, iteration, contributor_id, task, dataset, recipe, strategy,
                      body_type, backend, sign, log, workdir) -> dict:
  """The part of :func:`contribute` after its checks: fine-tune, upload, read back."""
  base_dir = store.base_dir(iteration)
  base_sha = store.base_sha256(iteration)
  body_lib.set_seed(recipe.seed, body_type)
  body, tokenizer = body_lib.load(base_dir, body_type, recipe, strategy)
  label = f"[{contributor_id} @ base {iteration}] "
  result = body.finetune(tokenizer, task, recipe, strategy=strategy, log=log, label=label,
                         workdir=workdir, run_key=f"{base_sha}:{contributor_id}")
  if not strategies.is_chief(strategy):
    task_type, task_id = strategies.task(strategy)
    log(f"{label}[{task_type} {task_id}] done; the chief writes the contribution")
    return {}
  with store_lib.staging_dir("body") as work:
    body_path = os.path.join(work, store_lib.BODY)
    weights.save_safetensors(body.hf_tensors(), body_path)
    meta = store.put_contribution(iteration, contributor_id, body_path, {
        "base_sha256": base_sha, "dataset": dataset, "num_examples": len(task.splits["train"]),
        "steps": result.steps, "best_step": result.best_step,
        "examples_seen": result.examples_seen,
        "dev_metrics": {k: float(v) for k, v in result.dev.items()},
        "seconds": round(result.seconds, 1), "body": body_type, "backend": backend}, sign=sign)
  store.check_own_contribution(iteration, contributor_id, meta)  # read back before deleting
  checkpoints = checkpointing.join(workdir, "checkpoints")
  if tf.io.gfile.exists(checkpoints):
    tf.io.gfile.rmtree(checkpoints)  # the contribution is safe in the store now
  log(f"[{contributor_id}] contributed to iteration {iteration}: dev score "
      f"{result.dev['score']:.4f} after {result.steps} steps")
  latest = store.latest()
  if latest != iteration:  # a base was published (or LATEST rolled back) while it trained
    log(f"[{contributor_id}] note: LATEST is now base {latest}, not base {iteration} this "
        "contribution was trained from and is filed under; the next fusion of base "
        f"{latest} does not use it: run again to contribute to base {latest}.")
  return meta
