"""The contributors' optimizer: the fused AdamW gives Keras's AdamW update, dense and sparse."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from cold_fusion_tf.training import optimizer as optimizer_lib
from cold_fusion_tf.training.recipe import Recipe


def _train(optimizer, steps: int = 6) -> list[np.ndarray]:
  """``steps`` updates of an embedding (sparse gradients), a kernel and a LayerNorm weight
  (dense) from fixed values and gradients: the variables after them."""
  rng = np.random.default_rng(0)
  variables = [tf.Variable(rng.normal(size=(50, 8)).astype(np.float32), name="embeddings"),
               tf.Variable(rng.normal(size=(8, 4)).astype(np.float32), name="dense/kernel"),
               tf.Variable(rng.normal(size=(4,)).astype(np.float32), name="LayerNorm/gamma")]

  @tf.function(autograph=False)
  def step(ids, kernel_grad, gamma_grad):
    rows = tf.IndexedSlices(tf.ones([3, 8]) * 0.1, ids, tf.constant([50, 8]))
    optimizer.apply_gradients(zip([rows, kernel_grad, gamma_grad], variables))

  for i in range(steps):
    step(tf.constant([i, 7, 20 + i]), tf.constant(rng.normal(size=(8, 4)), tf.float32),
         tf.constant(rng.normal(size=(4,)), tf.float32))
  return [v.numpy() for v in variables]


def _keras_adamw(recipe: Recipe, total: int):
  optimizer = keras.optimizers.AdamW(
      learning_rate=optimizer_lib.LinearWarmupDecay(
          recipe.learning_rate, optimizer_lib.warmup_steps(recipe.warmup_fraction, total), total),
      weight_decay=recipe.weight_decay, beta_1=0.9, beta_2=0.999, epsilon=recipe.adam_epsilon,
      global_clipnorm=recipe.clip_norm)
  optimizer.exclude_from_weight_decay(var_names=list(optimizer_lib.NO_DECAY))
  return optimizer


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_the_fused_adamw_gives_keras_adamw_update(weight_decay):
  # Prepare: a recipe with a large learning rate and decay, so differences would show.
  recipe = Recipe(learning_rate=0.05, weight_decay=weight_decay, clip_norm=1.0)
  fused = optimizer_lib.make_optimizer(recipe, 6)
  # Execute
  got, want = _train(fused), _train(_keras_adamw(recipe, 6))
  start = _train(_keras_adamw(recipe, 6), steps=0)
  # Assert: the same variables (to float32 rounding), and they did move; rows never looked
  # up move only by the decay (and their decaying moments: zero here).
  assert isinstance(fused, optimizer_lib.FusedAdamW)
  for a, b, s in zip(got, want, start):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
    assert np.abs(a - s).max() > 0.01
  untouched = got[0][40] / start[0][40]
  np.testing.assert_allclose(untouched, untouched[0], rtol=1e-6)
  assert (untouched[0] < 1) == (weight_decay > 0)


def test_the_fused_adamw_keeps_adamw_state_for_checkpoints():
  # Prepare
  fused = optimizer_lib.make_optimizer(Recipe(), 6)
  # Execute
  _train(fused, steps=2)
  # Assert: the moments and step count of AdamW, zeroed by reset.
  names = [v.name.split(":")[0] for v in fused.variables]
  assert names == ["iteration"] + [f"AdamW/{k}/{n}" for n in ("embeddings", "dense/kernel",
                                                          "LayerNorm/gamma") for k in "mv"]
  assert int(fused.iterations) == 2
  optimizer_lib.reset(fused)
  assert all(not np.any(v.numpy()) for v in fused.variables)
