"""The Keras 3 task model of a keras-hub body, and its optimizer.

:func:`task_model` puts a head over the body's first token (the shape of the transformers-TF
body's head); :func:`make_optimizer` is the paper's AdamW with linear warm-up and decay, no
weight decay on LayerNorm weights and biases and global-norm gradient clipping, in Keras 3.
:func:`non_trainable` and a ``frozen`` task model serve a fine-tune's probe phase (LP-FT).
"""

from __future__ import annotations

import contextlib
import math

import keras
import numpy as np

from cold_fusion_tf.model.keras_hub_names import to_numpy
from cold_fusion_tf.training.recipe import Recipe

NO_DECAY_SUFFIXES = ("/bias", "/gamma", "/beta")  # biases and LayerNorm weights


class LinearWarmupDecay(keras.optimizers.schedules.LearningRateSchedule):
  """:func:`~cold_fusion_tf.training.common.linear_schedule_value` in Keras 3 ops.

  Keras 3 calls a schedule with its count of micro-batches when it accumulates gradients:
  ``accumulation`` turns that count back into optimizer steps.
  """

  def __init__(self, peak: float, warmup_steps: int, total_steps: int, accumulation: int = 1):
    self.peak, self.warmup_steps, self.total_steps = peak, warmup_steps, total_steps
    self.accumulation = accumulation

  def __call__(self, step):
    step = keras.ops.cast(keras.ops.floor_divide(step, self.accumulation), "float32")
    decay = self.peak * keras.ops.maximum(0.0, self.total_steps - step) / max(
        1, self.total_steps - self.warmup_steps)
    if not self.warmup_steps:
      return decay
    return keras.ops.minimum(self.peak * step / self.warmup_steps, decay)

  def get_config(self):
    return {"peak": self.peak, "warmup_steps": self.warmup_steps, "total_steps": self.total_steps,
            "accumulation": self.accumulation}


def make_optimizer(recipe: Recipe, total_steps: int, accumulation: int, variables):
  """AdamW with the linear schedule (in optimizer steps); no weight decay on LayerNorm
  weights and biases; gradients clipped by their global norm."""
  warmup = int(math.ceil(recipe.warmup_fraction * total_steps))
  optimizer = keras.optimizers.AdamW(
      learning_rate=LinearWarmupDecay(recipe.learning_rate, warmup, total_steps, accumulation),
      weight_decay=recipe.weight_decay, beta_1=0.9, beta_2=0.999, epsilon=recipe.adam_epsilon,
      global_clipnorm=recipe.clip_norm or None,
      gradient_accumulation_steps=accumulation if accumulation > 1 else None)
  optimizer.exclude_from_weight_decay(
      var_list=[v for v in variables if v.path.endswith(NO_DECAY_SUFFIXES)])
  return optimizer


class _Inference(keras.layers.Layer):
  """A model called in inference mode whatever the caller's mode (no dropout): the frozen
  body of a probe phase."""

  def __init__(self, inner, **kwargs):
    super().__init__(**kwargs)
    self.inner = inner

  def call(self, inputs):
    return self.inner(inputs, training=False)

  def compute_output_spec(self, inputs):
    return self.inner.compute_output_spec(inputs)  # (JAX cannot trace it with unknown lengths)


def task_model(body, num_outputs: int, seed: int, dtype=None, head=None,
               frozen: bool = False) -> keras.Model:
  """The body with a head over the first token (dense-tanh-dropout-linear, the shape of the
  transformers-TF body's head). The head's weights are ``head`` (the list
  :func:`cold_fusion_tf.training.keras_trainer.probe_head` returns) or fresh ones drawn with
  numpy from ``seed``, the same on every backend and device count.
  ``frozen``: the body runs without dropout and so does the head (a probe phase's model; the
  caller makes the body's variables non-trainable)."""
  features = {n: keras.Input(shape=(None,), dtype="int32", name=n) for n in body.input_names}
  encoder = _Inference(body.encoder, name="frozen_body") if frozen else body.encoder
  x = encoder(features)[:, 0, :]
  rate = 0.0 if frozen else body.dropout
  dense = keras.layers.Dense(body.hidden_size, activation="tanh", name="head_dense", dtype=dtype)
  out = keras.layers.Dense(num_outputs, name="head_out", dtype="float32")
  x = keras.layers.Dropout(rate, dtype=dtype)(x)
  x = dense(x)
  x = keras.layers.Dropout(rate, dtype=dtype)(x)
  model = keras.Model(features, out(x), name="task_model")
  if head is not None:
    for variable, value in zip(dense.weights + out.weights, head):
      variable.assign(value)
    return model
  rng = np.random.default_rng([seed, 7])
  for layer, width in ((dense, body.hidden_size), (out, num_outputs)):
    kernel = np.clip(rng.normal(0.0, 1.0, (body.hidden_size, width)), -2, 2)
    layer.kernel.assign((kernel * body.initializer_range).astype(np.float32))
    layer.bias.assign(np.zeros(width, np.float32))
  return model


def head_weights(model: keras.Model) -> list[np.ndarray]:
  """The head of a :func:`task_model` (what its ``head`` argument takes)."""
  layers = (model.get_layer("head_dense"), model.get_layer("head_out"))
  return [np.array(to_numpy(v)) for layer in layers for v in layer.weights]


@contextlib.contextmanager
def non_trainable(model: keras.Model):
  """``model``'s variables non-trainable inside the block; every layer's own setting after."""
  layers = list(model._flatten_layers(include_self=True, recursive=True))  # pylint: disable=protected-access
  trainable = [layer.trainable for layer in layers]
  model.trainable = False
  try:
    yield
  finally:
    for layer, flag in zip(layers, trainable):  # parents first: children keep their own
      layer.trainable = flag
