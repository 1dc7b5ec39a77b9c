"""Dropout whose randomness is a function of the run's seed and the step, not of history.

Keras' dropout draws from stateful random ops whose streams live in the traced step function
and continue from one call to the next: a step function reused for a second fine-tune would
give it the first one's leftover streams. Here every dropout layer of a task model draws
instead from a stateless op, seeded by (run seed, optimizer step, replica, micro-batch, the
call's place in the model), so a fine-tune's dropout masks depend only on its seed: the same
in a freshly built model and in a reused one, and after a resume from a checkpoint.
"""

from __future__ import annotations

import tensorflow as tf
import tf_keras as keras


class StepSeeds:
  """The seed of the step being traced; each dropout call folds in its own place."""

  def __init__(self):
    self.seed = None   # an int32 [2] tensor while a training step is traced
    self.calls = 0

  def trace(self, seed) -> "StepSeeds":
    """Use as ``with seeds.trace(seed):`` around the model call of a training step."""
    self.seed, self.calls = seed, 0
    return self

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.seed = None

  def next(self):
    seed = tf.random.experimental.stateless_fold_in(self.seed, self.calls)
    self.calls += 1
    return seed


class _SeededGenerator:
  """Stands in for a Dropout layer's random generator."""

  def __init__(self, seeds: StepSeeds, fallback):
    self.seeds, self.fallback = seeds, fallback

  def dropout(self, inputs, rate, noise_shape=None):
    if self.seeds.seed is None:  # outside a training step of the trainer
      return self.fallback.dropout(inputs, rate, noise_shape=noise_shape)
    return tf.nn.experimental.stateless_dropout(inputs, rate=rate, seed=self.seeds.next(),
                                                noise_shape=noise_shape)


def install(model, seeds: StepSeeds) -> int:
  """Makes every Dropout layer of ``model`` draw from ``seeds``; returns how many there are."""
  # pylint: disable=protected-access
  count = 0
  for layer in model._flatten_layers(include_self=True, recursive=True):
    if isinstance(layer, keras.layers.Dropout):
      if not isinstance(layer._random_generator, _SeededGenerator):
        layer._random_generator = _SeededGenerator(seeds, layer._random_generator)
      count += 1
  return count


def run_seed(seed: int) -> list[int]:
  """A run's seed as the int32 pair stateless ops take (int32: XLA takes no other)."""
  return [seed % 2**31, seed // 2**31 % 2**31]


def step_seed(run_seed_pair, step, replica):
  """The seed of one replica's optimizer step (int32 [2])."""
  seed = tf.random.experimental.stateless_fold_in(run_seed_pair, tf.cast(step, tf.int32))
  return tf.random.experimental.stateless_fold_in(seed, tf.cast(replica, tf.int32))
