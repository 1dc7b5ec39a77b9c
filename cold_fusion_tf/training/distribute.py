"""Where a contributor trains: a TPU, several GPUs, a multi-worker cluster, or one device.

``make(name, tpu)`` turns ``--config.strategy`` (and ``--config.tpu``) into a
``tf.distribute.Strategy``:

* ``tpu``: a Cloud TPU (``TPUStrategy``): ``tpu="local"`` on a TPU VM; for a multi-host slice
  the workers' endpoints, ``grpc://IP0:8470,grpc://IP1:8470,...`` (what
  ``launch/tpu_contributor.sh`` passes, also through ``TPU_NAME``); or a TPU name, resolved
  through the Cloud TPU API (needs the ``cloud-tpu-client`` package). Empty: ``TPU_NAME``,
  else ``local``;
* ``mirrored``: every GPU of this machine, else every logical CPU device when there are
  several (``MirroredStrategy``);
* ``multi_worker``: the cluster described by ``TF_CONFIG`` (``MultiWorkerMirroredStrategy``);
* ``one_device``: the first GPU, else the CPU (``OneDeviceStrategy``);
* ``default``: no distribution (TensorFlow's default placement);
* ``auto``: a TPU if one is attached (or named by ``tpu``), else the ``TF_CONFIG`` cluster if
  one is described (a multi-worker GPU cluster also has several GPUs per worker, and must not
  fall back to a per-machine strategy), else ``mirrored`` over several GPUs, else ``default``.

A strategy that is asked for but not available fails with a message that lists the devices
TensorFlow sees. Strategies are made once per process (creating a multi-worker strategy or
initialising a TPU twice is not possible), so asking again returns the same object.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re

import tensorflow as tf

from cold_fusion_tf.errors import UserError

NAMES = ("auto", "tpu", "mirrored", "multi_worker", "one_device", "default")
_GRPC = re.compile(r"^grpc://[A-Za-z0-9.\-]+:\d{1,5}$")
_MADE: dict[tuple[str, str], tf.distribute.Strategy] = {}


def visible_devices() -> str:
  """The logical devices TensorFlow sees, e.g. ``CPU:0, GPU:0, GPU:1``."""
  names = []
  for device in tf.config.list_logical_devices():
    names.append(device.name.split("device:")[-1])
  return ", ".join(names) or "none"


def _unavailable(what: str, hint: str = "") -> UserError:
  return UserError(f"{what}. Visible devices: {visible_devices()}.{(' ' + hint) if hint else ''}")


def tpu_attached() -> bool:
  """Whether this machine is a TPU VM (a TPU chip is attached to it)."""
  return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*")
              or os.environ.get("TPU_NAME") or os.environ.get("TPU_ACCELERATOR_TYPE"))


def tf_config_cluster() -> dict | None:
  """The cluster of ``TF_CONFIG`` (None if unset); malformed JSON is a user error."""
  raw = os.environ.get("TF_CONFIG", "")
  if not raw.strip():
    return None
  try:
    parsed = json.loads(raw)
  except json.JSONDecodeError as e:
    raise UserError(f"TF_CONFIG is not valid JSON ({e}).") from e
  cluster = parsed.get("cluster") if isinstance(parsed, dict) else None
  task = parsed.get("task") if isinstance(parsed, dict) else None
  if not isinstance(cluster, dict) or not cluster or not isinstance(task, dict):
    raise UserError('TF_CONFIG needs "cluster" (e.g. {"worker": ["host:port", ...]}) and '
                    '"task" (e.g. {"type": "worker", "index": 0}).')
  return cluster


def make(name: str = "auto", tpu: str = "") -> tf.distribute.Strategy:
  """The strategy named ``name`` (one of :data:`NAMES`); see the module docstring."""
  if name not in NAMES:
    raise UserError(f"--config.strategy={name!r} is not one of {', '.join(NAMES)}.")
  key = (name, tpu or "")
  if key not in _MADE:
    _MADE[key] = _make(name, tpu or "")
  return _MADE[key]


def _make(name: str, tpu: str) -> tf.distribute.Strategy:
  if name == "auto":
    if tpu or tpu_attached():
      return _tpu(tpu)
    if tf_config_cluster() is not None:
      return _multi_worker()
    if len(tf.config.list_logical_devices("GPU")) > 1:
      return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()
  if name == "tpu":
    return _tpu(tpu)
  if name == "mirrored":
    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
      return tf.distribute.MirroredStrategy([d.name for d in gpus])
    cpus = tf.config.list_logical_devices("CPU")
    if len(cpus) > 1:
      return tf.distribute.MirroredStrategy([d.name for d in cpus])
    raise _unavailable("--config.strategy=mirrored needs several GPUs (or several logical CPU "
                       "devices) and none are available",
                       "Use --config.strategy=auto or default on this machine.")
  if name == "multi_worker":
    if tf_config_cluster() is None:
      raise _unavailable("--config.strategy=multi_worker needs TF_CONFIG to describe the "
                         "cluster and this worker; it is not set",
                         'Example: TF_CONFIG=\'{"cluster": {"worker": ["10.0.0.2:12345", '
                         '"10.0.0.3:12345"]}, "task": {"type": "worker", "index": 0}}\' '
                         "(see launch/multi_worker.sh).")
    return _multi_worker()
  if name == "one_device":
    gpus = tf.config.list_logical_devices("GPU")
    return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
  return tf.distribute.get_strategy()


def tpu_target(tpu: str) -> str:
  """The TPU to use: ``--config.tpu``, else ``TPU_NAME``, else the attached one (``local``)."""
  return (tpu or "").strip() or os.environ.get("TPU_NAME", "").strip() or "local"


def check_tpu_target(target: str) -> None:
  """Fails early, with what to do, for a TPU target that cannot work here."""
  if target == "local":
    return
  items = target.split(",")
  if all(_GRPC.match(item) for item in items):
    return
  if any(item.startswith("grpc://") for item in items):
    raise UserError(f"--config.tpu={target!r}: endpoints must be grpc://IP:PORT items, "
                    "separated by commas.")
  if importlib.util.find_spec("googleapiclient") is None:
    raise UserError(f"--config.tpu={target!r} is a TPU name, which is resolved through the "
                    "Cloud TPU API and needs the cloud-tpu-client package (googleapiclient, "
                    "oauth2client). Pass the workers' endpoints instead: "
                    "--config.tpu=grpc://IP0:8470,grpc://IP1:8470,... (launch/tpu_contributor.sh "
                    "does), or pip install cloud-tpu-client.")


def tpu_hosts(strategy) -> int:
  """How many hosts a TPU strategy spans (1 for any other strategy)."""
  if isinstance(strategy, tf.distribute.TPUStrategy):
    return int(strategy.extended.num_hosts)
  return 1


def _tpu(tpu: str) -> tf.distribute.Strategy:
  """TPUStrategy on the attached TPU (``local``), on a slice's workers (``grpc://`` list) or
  on a named TPU."""
  target = tpu_target(tpu)
  check_tpu_target(target)
  try:
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=target)
    if target != "local":
      tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)
  except (ValueError, RuntimeError, tf.errors.OpError, KeyError) as e:
    raise _unavailable(f"no TPU available for --config.tpu={target!r} ({e})",
                       "On a TPU VM use --config.tpu=local and the TPU build of TensorFlow "
                       "(see BUILD.md); elsewhere use --config.strategy=auto.") from e


def _multi_worker() -> tf.distribute.Strategy:
  try:
    return tf.distribute.MultiWorkerMirroredStrategy()
  except (ValueError, RuntimeError, tf.errors.OpError) as e:
    raise _unavailable(f"cannot start MultiWorkerMirroredStrategy from TF_CONFIG ({e})") from e


def is_multi_worker(strategy) -> bool:
  return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and (
      strategy.extended._in_multi_worker_mode())  # pylint: disable=protected-access


def task(strategy) -> tuple[str, int]:
  """(task type, index) of this process in its cluster; ("chief", 0) when there is none."""
  if not is_multi_worker(strategy):
    return "chief", 0
  resolver = strategy.cluster_resolver
  return resolver.task_type or "chief", int(resolver.task_id or 0)


def is_chief(strategy) -> bool:
  """Whether this process writes contributions, checkpoints and logs.

  In a multi-worker cluster that is the ``chief`` task, or worker 0 when there is no chief.
  """
  if not is_multi_worker(strategy):
    return True
  task_type, task_id = task(strategy)
  if task_type == "chief":
    return True
  cluster = strategy.cluster_resolver.cluster_spec().as_dict()
  return task_type == "worker" and task_id == 0 and "chief" not in cluster


def describe(strategy) -> str:
  """One line for logs: the strategy, its replicas and this process's role."""
  kinds = [(tf.distribute.TPUStrategy, "TPUStrategy"),
           (tf.distribute.MultiWorkerMirroredStrategy, "MultiWorkerMirroredStrategy"),
           (tf.distribute.MirroredStrategy, "MirroredStrategy"),
           (tf.distribute.OneDeviceStrategy, "OneDeviceStrategy")]
  kind = next((n for cls, n in kinds if isinstance(strategy, cls)), "the default strategy")
  text = f"{kind} with {strategy.num_replicas_in_sync} replica(s)"
  if is_multi_worker(strategy):
    task_type, task_id = task(strategy)
    text += f", this process is {task_type} {task_id}" + (" (chief)" if is_chief(strategy) else "")
  return text


def uses_gpu(strategy) -> bool:
  """Whether the strategy's replicas run on GPUs (the default strategy: if one is visible)."""
  try:
    devices = strategy.extended.worker_devices
  except RuntimeError:  # the default strategy places ops itself
    return bool(tf.config.list_logical_devices("GPU"))
  return any("GPU" in d.upper() for d in devices)


def is_tpu(strategy) -> bool:
  return isinstance(strategy, tf.distribute.TPUStrategy)


def accumulation_steps(batch_size: int, replicas: int, grad_accum_steps: int = 1,
                       max_replica_batch: int = 0) -> int:
  """Micro-batches per optimizer step (gradient accumulation).

  ``grad_accum_steps`` > 1 is used as given; otherwise, with ``max_replica_batch`` set, the
  smallest count that brings each replica's micro-batch to at most that many examples and
  divides its share of the batch evenly.
  """
  if grad_accum_steps and grad_accum_steps > 1:
    return int(grad_accum_steps)
  per_replica = batch_size // max(replicas, 1)
  if not max_replica_batch or per_replica <= max_replica_batch:
    return 1
  steps = -(-per_replica // max_replica_batch)
  while per_replica % steps:
    steps += 1
  return steps


def check_batch(batch_size: int, strategy, accumulation: int = 1) -> int:
  """The per-replica micro-batch size; fails unless the batch divides evenly."""
  replicas = strategy.num_replicas_in_sync
  if batch_size <= 0 or batch_size % (replicas * accumulation):
    raise _unavailable(
        f"the batch size {batch_size} does not divide across {replicas} replica(s) x "
        f"{accumulation} accumulation step(s)",
        f"Choose --config.recipe.batch_size as a multiple of {replicas * accumulation}.")
  return batch_size // (replicas * accumulation)


def check_recipe_batch(recipe, strategy) -> tuple[int, int]:
  """(accumulation steps, per-replica micro-batch) of a Recipe under ``strategy``; fails
  unless its batch divides evenly."""
  accumulation = accumulation_steps(recipe.batch_size, strategy.num_replicas_in_sync,
                                    recipe.grad_accum_steps, recipe.max_replica_batch)
  return accumulation, check_batch(recipe.batch_size, strategy, accumulation)
