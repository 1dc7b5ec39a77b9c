"""The paper's optimizer: AdamW with a linear warm-up and decay, no weight decay on LayerNorm
weights and biases, global gradient clipping.

The schedule's peak, warm-up and length may be numbers (a Keras model's compiled optimizer) or
variables (the trainer's): with variables one built optimizer, and the step functions traced
with it, serve fine-tunes of any length and learning rate (:meth:`LinearWarmupDecay.set`,
:func:`reset`).
"""

from __future__ import annotations

import math

import tensorflow as tf
import tf_keras as keras

NO_DECAY = ("LayerNorm", "layer_norm", "bias")


def warmup_steps(warmup_fraction: float, total_steps: int) -> int:
  return int(math.ceil(warmup_fraction * total_steps))


class LinearWarmupDecay(keras.optimizers.schedules.LearningRateSchedule):
  """The graph version of :func:`~cold_fusion_tf.training.common.linear_schedule_value`."""

  def __init__(self, peak, warmup_steps, total_steps):  # pylint: disable=redefined-outer-name
    self.peak, self.warmup_steps, self.total_steps = peak, warmup_steps, total_steps

  @classmethod
  def variable(cls) -> "LinearWarmupDecay":
    """A schedule whose settings are variables (made in the current strategy's scope)."""
    make = lambda name: tf.Variable(0.0, trainable=False, dtype=tf.float32, name=name)
    return cls(make("peak_learning_rate"), make("warmup_steps"), make("total_steps"))

  def set(self, peak: float, warmup: int, total: int) -> None:
    """New settings for a schedule made by :meth:`variable`."""
    for variable, value in zip((self.peak, self.warmup_steps, self.total_steps),
                               (peak, warmup, total)):
      variable.assign(value)

  def __call__(self, step):
    step = tf.cast(step, tf.float32)
    peak, warmup, total = (tf.cast(x, tf.float32)
                           for x in (self.peak, self.warmup_steps, self.total_steps))
    warm = peak * step / tf.maximum(1.0, warmup)
    decay = peak * tf.maximum(0.0, total - step) / tf.maximum(1.0, total - warmup)
    return tf.where(step < warmup, warm, decay)

  def get_config(self):
    value = lambda x: x.numpy().item() if isinstance(x, tf.Variable) else x
    return {"peak": float(value(self.peak)), "warmup_steps": int(value(self.warmup_steps)),
            "total_steps": int(value(self.total_steps))}


def make_optimizer(recipe, total_steps: int, schedule: LinearWarmupDecay | None = None):
  """AdamW with the linear schedule (``schedule``, or one for ``recipe`` over ``total_steps``);
  no weight decay on LayerNorm weights and biases.

  Gradients are clipped by their global norm after they are summed over replicas.
  """
  if schedule is None:
    schedule = LinearWarmupDecay(recipe.learning_rate,
                                 warmup_steps(recipe.warmup_fraction, total_steps), total_steps)
  optimizer = keras.optimizers.AdamW(
      learning_rate=schedule, weight_decay=recipe.weight_decay, beta_1=0.9, beta_2=0.999,
      epsilon=recipe.adam_epsilon, global_clipnorm=recipe.clip_norm or None)
  optimizer.exclude_from_weight_decay(var_names=list(NO_DECAY))
  return optimizer


def settings_key(recipe) -> tuple:
  """What of the recipe a built optimizer holds as constants (the rest are variables)."""
  return (recipe.weight_decay, recipe.adam_epsilon, recipe.clip_norm)


def reset(optimizer) -> None:
  """The state of a new optimizer: step 0, every moment zero."""
  for variable in optimizer.variables:
    variable.assign(tf.zeros_like(variable))
