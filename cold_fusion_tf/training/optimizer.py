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


class FusedAdamW(keras.optimizers.AdamW):
  """Keras's AdamW, each variable's update in two fused operations instead of about fifteen:
  the decoupled weight decay (``var *= 1 - lr * weight_decay``, before the Adam step, as
  AdamW applies it) and TensorFlow's Adam kernel (one pass over the variable and its moments,
  on every core; on TPUs XLA's version of it). The update rule, the optimizer's variables and
  its checkpoints are AdamW's; an embedding's sparse gradient is made dense first (AdamW's
  sparse path gives the same moments: they decay where no row was looked up). On CPU this
  takes the optimizer's share of a MiniLM step from about a third to about a tenth
  (``benchmarks/train_throughput.py``)."""

  def __init__(self, *args, **kwargs):
    if kwargs.get("amsgrad"):
      raise ValueError("FusedAdamW has no amsgrad variant")
    kwargs["jit_compile"] = False  # the kernel is the fused form; XLA would redo it per variable
    super().__init__(*args, **kwargs)

  def _apply_weight_decay(self, variables):
    """Done in :meth:`update_step`, fused."""

  def update_step(self, gradient, variable):
    dtype = variable.dtype
    lr = tf.cast(self.learning_rate, dtype)
    if self.weight_decay and self._use_weight_decay(variable):
      variable.assign(variable * (1 - lr * tf.cast(self.weight_decay, dtype)))
    beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
    step = tf.cast(self.iterations + 1, dtype)
    index = self._index_dict[self._var_key(variable)]
    tf.raw_ops.ResourceApplyAdam(
        var=variable.handle, m=self._momentums[index].handle,
        v=self._velocities[index].handle, beta1_power=tf.pow(beta_1, step),
        beta2_power=tf.pow(beta_2, step), lr=lr, beta1=beta_1, beta2=beta_2,
        epsilon=tf.cast(self.epsilon, dtype), grad=tf.convert_to_tensor(gradient))


def make_optimizer(recipe, total_steps: int, schedule: LinearWarmupDecay | None = None):
  """AdamW with the linear schedule (``schedule``, or one for ``recipe`` over ``total_steps``);
  no weight decay on LayerNorm weights and biases.

  Gradients are clipped by their global norm after they are summed over replicas.
  """
  if schedule is None:
    schedule = LinearWarmupDecay(recipe.learning_rate,
                                 warmup_steps(recipe.warmup_fraction, total_steps), total_steps)
  optimizer = FusedAdamW(
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
