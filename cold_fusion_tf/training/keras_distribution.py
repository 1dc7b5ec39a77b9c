"""Where Keras 3 training runs: a ``tf.distribute`` strategy on the TensorFlow backend, a
``keras.distribution`` on JAX (:class:`KerasDistribution`), and the batch split over either.

``--config.strategy`` names both: on JAX, ``auto``, ``mirrored`` and ``tpu`` mean every local
device under ``keras.distribution.DataParallel`` (Keras shards each global batch over them),
``one_device`` and ``default`` one device; ``multi_worker`` is TensorFlow's only.
"""

from __future__ import annotations

import contextlib

import keras

from cold_fusion_tf.errors import UserError
from cold_fusion_tf.training import distribute as strategies
from cold_fusion_tf.training.recipe import Recipe


class KerasDistribution:
  """A Keras 3 distribution (JAX backend) in the role a ``tf.distribute`` strategy plays on
  TensorFlow: the replicas a global batch is split over, and the scope variables are made in."""

  def __init__(self, distribution, devices: list[str]):
    self.distribution, self.devices = distribution, devices
    self.num_replicas_in_sync = len(devices) if distribution is not None else 1

  def scope(self):
    return self.distribution.scope() if self.distribution is not None else contextlib.nullcontext()

  def describe(self) -> str:
    if self.distribution is None:
      return f"one device ({self.devices[0]})"
    return f"DataParallel over {len(self.devices)} devices ({', '.join(self.devices)})"


def make_distribution(name: str = "auto") -> KerasDistribution:
  """``--config.strategy`` on the JAX backend: ``auto``, ``mirrored`` and ``tpu`` use every
  local device (``keras.distribution.DataParallel``; ``tpu`` wants them to be TPU chips);
  ``one_device`` and ``default`` one."""
  if name not in strategies.NAMES:
    raise UserError(f"--config.strategy={name!r} is not one of {', '.join(strategies.NAMES)}.")
  devices = keras.distribution.list_devices()
  if name == "multi_worker":
    raise UserError("--config.strategy=multi_worker is TensorFlow's; on the JAX backend use "
                    "auto (every local device) on each host of a TPU slice.")
  if name == "tpu" and not devices[0].startswith("tpu"):
    raise UserError(f"--config.strategy=tpu: JAX sees no TPU (devices: {', '.join(devices)}); "
                    'install jax[tpu] on a TPU VM (launch/install.sh --backend=jax).')
  if name in ("one_device", "default") or len(devices) == 1:
    if name == "mirrored":
      raise UserError(f"--config.strategy=mirrored needs several devices; JAX sees only "
                      f"{devices[0]}. Use --config.strategy=auto.")
    return KerasDistribution(None, devices[:1])
  return KerasDistribution(keras.distribution.DataParallel(devices=devices), devices)


def describe(strategy) -> str:
  if isinstance(strategy, KerasDistribution):
    return strategy.describe()
  return strategies.describe(strategy)


def batch_split(recipe: Recipe, strategy) -> tuple[int, int]:
  """(accumulation steps, per-replica micro-batch); fails unless the batch divides evenly."""
  if not isinstance(strategy, KerasDistribution):
    return strategies.check_recipe_batch(recipe, strategy)
  replicas = strategy.num_replicas_in_sync
  accumulation = strategies.accumulation_steps(recipe.batch_size, replicas,
                                               recipe.grad_accum_steps, recipe.max_replica_batch)
  if recipe.batch_size % (replicas * accumulation):
    raise UserError(f"the batch size {recipe.batch_size} does not divide across {replicas} "
                    f"device(s) x {accumulation} accumulation step(s). Devices: "
                    f"{', '.join(strategy.devices)}. Choose --config.recipe.batch_size as a "
                    f"multiple of {replicas * accumulation}.")
  return accumulation, recipe.batch_size // (replicas * accumulation)
