"""Tests for cold_fusion_tf.fusion.methods: each method against a plain numpy reference."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cold_fusion_tf.fusion import methods as fm
from cold_fusion_tf.fusion import params as fusion_params
from cold_fusion_tf.fusion import robust
from cold_fusion_tf.fusion import server_optimizer
from cold_fusion_tf.errors import UserError

COUNTS = (1, 2, 5)
DTYPES = (np.float32, np.float16)
SHAPE = (3, 7)


def _inputs(count, dtype, seed=0, shape=SHAPE):
  """A base and ``count`` bodies near it (deltas ~0.1), in ``dtype``."""
  rng = np.random.default_rng(seed)
  base = rng.normal(size=shape).astype(dtype)
  bodies = [(base.astype(np.float64) + 0.1 * rng.normal(size=shape)).astype(dtype)
            for _ in range(count)]
  return base, bodies


def _stack64(bodies):
  return np.stack([b.astype(np.float64) for b in bodies])


def _assert_matches(result, reference, dtype):
  """Same dtype as the base and close to the float64 reference (1 ulp-ish for float16)."""
  assert result.dtype == dtype
  assert result.shape == reference.shape
  tol = 1e-6 if dtype == np.float32 else 1e-3
  np.testing.assert_allclose(result.astype(np.float64), reference, rtol=tol, atol=tol)


@pytest.mark.parametrize("count", COUNTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_mean_matches_numpy(count, dtype):
  # Prepare
  base, bodies = _inputs(count, dtype)
  # Execute
  result = fm.mean(base, bodies, None, name="layer/kernel")
  # Assert
  _assert_matches(result, np.mean(_stack64(bodies), axis=0), dtype)


@pytest.mark.parametrize("count", COUNTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_weighted_matches_numpy_average(count, dtype):
  # Prepare
  base, bodies = _inputs(count, dtype)
  weights = np.arange(1, count + 1, dtype=np.float64) * 100.0
  # Execute
  result = fm.weighted(base, bodies, weights, name="w")
  # Assert
  _assert_matches(result, np.average(_stack64(bodies), axis=0, weights=weights), dtype)


@pytest.mark.parametrize("count", COUNTS)
def test_weighted_with_equal_weights_is_mean(count):
  # Prepare
  base, bodies = _inputs(count, np.float32)
  # Execute
  result = fm.weighted(base, bodies, np.full(count, 7.0), name="w")
  # Assert
  np.testing.assert_allclose(result, fm.mean(base, bodies, name="w"), rtol=1e-6)


def test_weighted_zero_weight_ignores_contribution():
  # Prepare
  base, bodies = _inputs(3, np.float32)
  # Execute
  result = fm.weighted(base, bodies, np.array([0.0, 1.0, 1.0]), name="w")
  # Assert
  np.testing.assert_allclose(result, fm.mean(base, bodies[1:], name="w"), rtol=1e-6)


@pytest.mark.parametrize("weights", [np.array([1.0]), np.array([0.0, 0.0]),
                                     np.array([-1.0, 2.0]), np.array([np.nan, 1.0]), None])
def test_weighted_rejects_bad_weights(weights):
  # Prepare
  base, bodies = _inputs(2, np.float32)
  # Execute / Assert
  with pytest.raises(UserError, match="weights"):
    fm.weighted(base, bodies, weights, name="w")


def _reference_trimmed_mean(bodies, trim):
  """Per coordinate: sort the N values in Python, drop ``trim`` from each end, average."""
  stack = _stack64(bodies)
  out = np.empty(stack.shape[1:])
  for index in np.ndindex(out.shape):
    values = sorted(stack[(slice(None),) + index])
    kept = values[trim:len(values) - trim]
    out[index] = sum(kept) / len(kept)
  return out


@pytest.mark.parametrize("count", COUNTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trim_fraction", [0.1, 0.2, 0.45])
def test_trimmed_mean_matches_reference(count, dtype, trim_fraction):
  # Prepare
  base, bodies = _inputs(count, dtype)
  trim = min(math.floor(trim_fraction * count), (count - 1) // 2)
  # Execute
  result = fm.trimmed_mean(base, bodies, None, name="t", trim_fraction=trim_fraction)
  # Assert
  _assert_matches(result, _reference_trimmed_mean(bodies, trim), dtype)


@pytest.mark.parametrize("count", COUNTS)
def test_trimmed_mean_with_zero_trim_is_mean(count):
  # Prepare
  base, bodies = _inputs(count, np.float32)
  # Execute
  result = fm.trimmed_mean(base, bodies, None, name="t", trim_fraction=0.0)
  # Assert
  np.testing.assert_allclose(result, np.mean(_stack64(bodies), axis=0), rtol=1e-6)


def test_trimmed_mean_drops_one_value_each_end_of_five():
  # Prepare
  base = np.zeros(1, np.float32)
  bodies = [np.array([v], np.float32) for v in (10.0, -50.0, 1.0, 2.0, 3.0)]
  # Execute
  result = fm.trimmed_mean(base, bodies, None, name="t", trim_fraction=0.2)
  # Assert
  np.testing.assert_allclose(result, [2.0])


@pytest.mark.parametrize("count", COUNTS + (4,))
@pytest.mark.parametrize("dtype", DTYPES)
def test_median_matches_numpy(count, dtype):
  # Prepare
  base, bodies = _inputs(count, dtype)
  # Execute
  result = fm.median(base, bodies, None, name="m")
  # Assert
  _assert_matches(result, np.median(_stack64(bodies), axis=0), dtype)


@pytest.mark.parametrize("count", COUNTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_task_arithmetic_matches_reference(count, dtype):
  # Prepare
  base, bodies = _inputs(count, dtype)
  base64 = base.astype(np.float64)
  reference = base64 + 0.3 * sum(b.astype(np.float64) - base64 for b in bodies)
  # Execute
  result = fm.task_arithmetic(base, bodies, None, name="ta", scale=0.3)
  # Assert
  _assert_matches(result, reference, dtype)


@pytest.mark.parametrize("count", COUNTS)
@pytest.mark.parametrize("scale", ["default", "explicit"])
def test_task_arithmetic_with_scale_one_over_n_is_mean(count, scale):
  # Prepare
  base, bodies = _inputs(count, np.float32)
  params = {} if scale == "default" else {"scale": 1.0 / count}
  # Execute
  result = fm.task_arithmetic(base, bodies, None, name="ta", **params)
  # Assert
  np.testing.assert_allclose(result, np.mean(_stack64(bodies), axis=0), rtol=1e-6, atol=1e-6)


def _reference_ties(base, bodies, density, scale):
  """TIES written out coordinate by coordinate."""
  base64 = base.astype(np.float64).ravel()
  size = base64.size
  keep = min(size, max(1, math.ceil(density * size - 1e-9)))
  trimmed = []
  for body in bodies:
    delta = body.astype(np.float64).ravel() - base64
    threshold = sorted(abs(v) for v in delta)[size - keep]
    trimmed.append([v if abs(v) >= threshold else 0.0 for v in delta])
  merged = np.zeros(size)
  for j in range(size):
    column = [t[j] for t in trimmed]
    sign = np.sign(sum(column))
    agreeing = [v for v in column if v != 0 and np.sign(v) == sign]
    merged[j] = sum(agreeing) / len(agreeing) if agreeing and sign != 0 else 0.0
  return (base64 + scale * merged).reshape(base.shape)


@pytest.mark.parametrize("count", COUNTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_matches_reference(count, dtype, density):
  # Prepare
  base, bodies = _inputs(count, dtype)
  # Execute
  result = fm.ties(base, bodies, None, name="ties", density=density, scale=0.8)
  # Assert
  _assert_matches(result, _reference_ties(base, bodies, density, 0.8), dtype)


def test_ties_hand_built_example():
  # Prepare: 3 contributions on a 5-vector, density 0.6 keeps the 3 largest magnitudes.
  base = np.array([1.0, 1.0, 1.0, 1.0, 1.0], np.float32)
  deltas = [
      [0.5, -0.1, 0.3, 0.2, -0.05],  # keeps 0.5, 0.3, 0.2
      [0.4, -0.6, -0.2, 0.01, 0.0],  # keeps 0.4, -0.6, -0.2
      [-0.1, 0.3, 0.0, -0.7, 0.02],  # keeps -0.1, 0.3, -0.7
  ]
  bodies = [base + np.array(d, np.float32) for d in deltas]
  # Trimmed: [0.5, 0, 0.3, 0.2, 0], [0.4, -0.6, -0.2, 0, 0], [-0.1, 0.3, 0, -0.7, 0]
  # Sums:    [0.8, -0.3, 0.1, -0.5, 0] -> signs [+, -, +, -, none]
  # Agreeing means: (0.5+0.4)/2, -0.6, 0.3, -0.7, 0
  expected = base + 2.0 * np.array([0.45, -0.6, 0.3, -0.7, 0.0], np.float32)
  # Execute
  result = fm.ties(base, bodies, None, name="v", density=0.6, scale=2.0)
  # Assert
  np.testing.assert_allclose(result, expected, rtol=1e-6)
  assert result.dtype == np.float32


def test_ties_with_full_density_and_agreeing_signs_is_mean():
  # Prepare: all deltas positive, so every delta agrees and TIES is the mean of deltas.
  base = np.zeros((4, 4), np.float32)
  rng = np.random.default_rng(3)
  bodies = [rng.uniform(0.1, 1.0, size=(4, 4)).astype(np.float32) for _ in range(3)]
  # Execute
  result = fm.ties(base, bodies, None, name="x", density=1.0, scale=1.0)
  # Assert
  np.testing.assert_allclose(result, fm.mean(base, bodies, name="x"), rtol=1e-6)


@pytest.mark.parametrize("count", COUNTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dare_with_zero_drop_rate_is_mean(count, dtype):
  # Prepare
  base, bodies = _inputs(count, dtype)
  # Execute
  result = fm.dare(base, bodies, None, name="d", drop_rate=0.0, seed=5)
  # Assert
  _assert_matches(result, np.mean(_stack64(bodies), axis=0), dtype)


def test_dare_is_deterministic_given_seed_and_name():
  # Prepare
  base, bodies = _inputs(5, np.float32, shape=(64, 32))
  # Execute
  first = fm.dare(base, bodies, None, name="enc/layer_0/kernel", drop_rate=0.5, seed=11)
  again = fm.dare(base, bodies, None, name="enc/layer_0/kernel", drop_rate=0.5, seed=11)
  other_seed = fm.dare(base, bodies, None, name="enc/layer_0/kernel", drop_rate=0.5, seed=12)
  other_name = fm.dare(base, bodies, None, name="enc/layer_1/kernel", drop_rate=0.5, seed=11)
  # Assert
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other_seed)
  assert not np.array_equal(first, other_name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dare_single_contribution_keeps_or_drops_each_rescaled_coordinate(dtype):
  # Prepare
  drop_rate = 0.75
  base, bodies = _inputs(1, dtype, shape=(100, 40))
  delta = bodies[0].astype(np.float64) - base.astype(np.float64)
  # Execute
  result = fm.dare(base, bodies, None, name="k", drop_rate=drop_rate, seed=0)
  # Assert: each coordinate is either the base or the base plus 4x its delta.
  assert result.dtype == dtype
  got = result.astype(np.float64)
  dropped = np.isclose(got, base.astype(np.float64), rtol=0, atol=1e-6)
  kept_value = (base.astype(np.float64) + delta / (1 - drop_rate)).astype(dtype)
  kept = np.isclose(got, kept_value.astype(np.float64), rtol=1e-6, atol=1e-6)
  assert np.all(dropped | kept)
  kept_fraction = np.mean(kept & ~dropped)
  assert abs(kept_fraction - (1 - drop_rate)) < 0.03


def test_dare_uses_different_masks_for_different_contributions():
  # Prepare: two identical contributions; with shared masks the result would be 0 or 2x.
  base = np.zeros(2000, np.float32)
  bodies = [np.ones(2000, np.float32), np.ones(2000, np.float32)]
  # Execute
  result = fm.dare(base, bodies, None, name="b", drop_rate=0.5, seed=0)
  # Assert: one kept and one dropped gives (2 + 0) / 2 = 1.
  assert set(np.unique(result)) == {0.0, 1.0, 2.0}


def test_dare_seed_is_stable_across_processes():
  # Prepare / Execute
  first = fm.dare_seed(3, "name", 1).generate_state(2)
  # Assert: crc32 (not Python's salted hash) makes the seed a fixed function of its inputs.
  np.testing.assert_array_equal(first, np.random.SeedSequence([3, 0x5E237E06, 1]).generate_state(2))


@pytest.mark.parametrize("dtype", DTYPES)
def test_server_step_with_lr_one_and_no_momentum_is_mean(dtype):
  # Prepare
  base, bodies = _inputs(5, dtype)
  mean_delta = np.mean(_stack64(bodies), axis=0) - base.astype(np.float64)
  # Execute
  new_base, buffer = server_optimizer.server_momentum_step(base, mean_delta, None, lr=1.0, momentum=0.0)
  # Assert
  _assert_matches(new_base, np.mean(_stack64(bodies), axis=0), dtype)
  assert buffer.dtype == np.float32
  np.testing.assert_allclose(buffer, -mean_delta, rtol=1e-6)


@pytest.mark.parametrize("nesterov, expected_bases", [
    # g1 = -0.5: buf1 = -0.5; update = -0.5 + 0.9 * -0.5 = -0.95; base = 1 + 0.7 * 0.95 = 1.665
    # g2 = 0.2: buf2 = 0.9 * -0.5 + 0.2 = -0.25; update = 0.2 - 0.225 = -0.025; 1.6825
    (True, (1.665, 1.6825)),
    # update = buffer: 1 + 0.7 * 0.5 = 1.35, then 1.35 + 0.7 * 0.25 = 1.525
    (False, (1.35, 1.525)),
])
def test_server_step_two_steps_with_momentum_match_hand_computation(nesterov, expected_bases):
  # Prepare
  base = np.full((2, 3), 1.0, np.float64)
  # Execute
  base1, buffer1 = server_optimizer.server_momentum_step(base, np.full((2, 3), 0.5), None, lr=0.7,
                                           momentum=0.9, nesterov=nesterov)
  base2, buffer2 = server_optimizer.server_momentum_step(base1, np.full((2, 3), -0.2), buffer1, lr=0.7,
                                           momentum=0.9, nesterov=nesterov)
  # Assert
  np.testing.assert_allclose(base1, expected_bases[0], rtol=1e-12)
  np.testing.assert_allclose(buffer1, -0.5, rtol=1e-12)
  np.testing.assert_allclose(base2, expected_bases[1], rtol=1e-12)
  np.testing.assert_allclose(buffer2, -0.25, rtol=1e-12)
  assert base2.dtype == np.float64 and buffer2.dtype == np.float64


def test_server_step_rejects_mismatched_buffer():
  # Prepare
  base = np.zeros(3, np.float32)
  # Execute / Assert
  with pytest.raises(UserError, match="momentum buffer shape"):
    server_optimizer.server_momentum_step(base, np.zeros(3), np.zeros(4))


@pytest.mark.parametrize("attack", ["scaled", "sign_flipped"])
def test_robust_methods_resist_one_malicious_contribution(attack):
  # Prepare: 5 honest contributors share a true delta plus small noise; one attacker.
  rng = np.random.default_rng(42)
  base = rng.normal(size=(40, 25)).astype(np.float32)
  true_delta = 0.01 * rng.normal(size=base.shape)
  honest_deltas = [true_delta + 0.0002 * rng.normal(size=base.shape) for _ in range(5)]
  honest = [(base + d).astype(np.float32) for d in honest_deltas]
  if attack == "scaled":
    malicious = (base + 100.0 * honest_deltas[0]).astype(np.float32)
  else:
    malicious = (base - honest_deltas[0]).astype(np.float32)
  bodies = honest + [malicious]
  honest_mean = np.mean(_stack64(honest), axis=0)
  delta_size = np.abs(true_delta).max()
  # Execute
  robust = {
      "median": fm.median(base, bodies, None, name="x"),
      "trimmed_mean": fm.trimmed_mean(base, bodies, None, name="x", trim_fraction=0.2),
  }
  plain = fm.mean(base, bodies, None, name="x")
  # Assert
  for method_name, result in robust.items():
    error = np.abs(result.astype(np.float64) - honest_mean).max()
    assert error < 0.1 * delta_size, (method_name, error, delta_size)
  assert np.abs(plain.astype(np.float64) - honest_mean).max() > 0.25 * delta_size


def test_robust_z_scores_flag_the_large_update():
  # Prepare: update norms of 5 honest contributors and one scaled one.
  rng = np.random.default_rng(1)
  base = np.zeros(500)
  true_delta = rng.normal(size=500)
  bodies = [base + true_delta + 0.1 * rng.normal(size=500) for _ in range(5)]
  bodies.append(base + 100.0 * true_delta)
  norms = np.array([np.linalg.norm(b - base) for b in bodies])
  # Execute
  scores = robust.robust_z_scores(norms)
  # Assert
  assert scores[-1] > robust.ROBUST_Z_THRESHOLD
  assert np.all(np.abs(scores[:-1]) <= robust.ROBUST_Z_THRESHOLD)


def test_robust_z_scores_matches_formula():
  # Prepare
  values = np.array([1.0, 2.0, 3.0, 4.0, 100.0])
  # median 3, |dev| = [2, 1, 0, 1, 97] -> MAD 1
  # Execute
  scores = robust.robust_z_scores(values)
  # Assert
  np.testing.assert_allclose(scores, 0.6745 * np.array([-2.0, -1.0, 0.0, 1.0, 97.0]))


def test_robust_z_scores_zero_mad_and_non_finite():
  # Prepare
  values = np.array([2.0, 2.0, 2.0, 5.0, 1.0, np.nan])
  # Execute
  scores = robust.robust_z_scores(values)
  # Assert
  np.testing.assert_array_equal(scores, [0.0, 0.0, 0.0, np.inf, -np.inf, np.inf])
  assert robust.robust_z_scores(np.array([])).shape == (0,)


def test_get_method_returns_registered_functions():
  # Prepare / Execute / Assert
  for name, method in fm.METHODS.items():
    assert fm.get_method(name) is method
  assert set(fm.METHODS) == {"mean", "weighted", "trimmed_mean", "median", "task_arithmetic",
                             "ties", "dare"}


def test_get_method_unknown_name_lists_known_names():
  # Prepare / Execute
  with pytest.raises(UserError) as raised:
    fm.get_method("fedprox")
  # Assert
  message = str(raised.value)
  assert "'fedprox'" in message
  for name in fm.METHODS:
    assert name in message


def test_check_params_fills_defaults_and_normalizes():
  # Prepare / Execute
  ties_params = fusion_params.check_params("ties", {"density": np.float32(0.5)})
  dare_params = fusion_params.check_params("dare", {"seed": np.int64(7)})
  # Assert
  assert ties_params == {"density": 0.5, "scale": 1.0}
  assert type(ties_params["density"]) is float
  assert dare_params == {"drop_rate": 0.9, "seed": 7}
  assert fusion_params.check_params("mean", None) == {}
  assert fusion_params.check_params("task_arithmetic", {}) == {"scale": None}
  assert fusion_params.check_params(fusion_params.SERVER_MOMENTUM, {"lr": 1}) == {
      "lr": 1.0, "momentum": 0.9, "nesterov": True}


@pytest.mark.parametrize("method_name, params, expected", [
    ("trimmed_mean", {"trim_fraction": 0.5}, r"trim_fraction=0\.5 .*\[0, 0\.5\)"),
    ("trimmed_mean", {"trim_fraction": -0.1}, r"trim_fraction=-0\.1 .*\[0, 0\.5\)"),
    ("ties", {"density": 0.0}, r"density=0\.0 .*\(0, 1\]"),
    ("ties", {"density": 1.5}, r"density=1\.5 .*\(0, 1\]"),
    ("ties", {"scale": float("inf")}, r"scale=inf .*finite number"),
    ("task_arithmetic", {"scale": float("nan")}, r"scale=nan .*finite number or None"),
    ("dare", {"drop_rate": 1.0}, r"drop_rate=1\.0 .*\[0, 1\)"),
    ("dare", {"seed": -1}, r"seed=-1 .*integer in \[0, 4294967295\]"),
    ("dare", {"seed": 1.5}, r"seed=1\.5 .*integer"),
    ("dare", {"drop_rate": "0.5"}, r"drop_rate='0\.5' .*finite number"),
    ("dare", {"drop_rate": True}, r"drop_rate=True"),
    (fusion_params.SERVER_MOMENTUM, {"lr": 0.0}, r"lr=0\.0 .*> 0"),
    (fusion_params.SERVER_MOMENTUM, {"momentum": 1.0}, r"momentum=1\.0 .*\[0, 1\)"),
    (fusion_params.SERVER_MOMENTUM, {"nesterov": 1}, r"nesterov=1 .*true or false"),
    ("median", {"trim_fraction": 0.1}, r"no parameter\(s\) trim_fraction.*none"),
    ("ties", {"densty": 0.1}, r"no parameter\(s\) densty.*density, scale"),
    ("fedprox", {}, r"Unknown fusion method 'fedprox'.*mean"),
])
def test_check_params_errors_name_the_value_and_range(method_name, params, expected):
  # Prepare / Execute / Assert
  with pytest.raises(UserError, match=expected):
    fusion_params.check_params(method_name, params)


def test_methods_validate_their_own_params():
  # Prepare
  base, bodies = _inputs(2, np.float32)
  # Execute / Assert
  with pytest.raises(UserError, match="drop_rate"):
    fm.dare(base, bodies, None, name="x", drop_rate=1.0)
  with pytest.raises(UserError, match="trim_fraction"):
    fm.trimmed_mean(base, bodies, None, name="x", trim_fraction=0.5)


def test_input_errors_name_the_tensor():
  # Prepare
  base, bodies = _inputs(2, np.float32)
  # Execute / Assert
  with pytest.raises(UserError, match=r"'enc/k'.*contribution #1 has shape \(2,\)"):
    fm.mean(base, [bodies[0], np.zeros(2, np.float32)], None, name="enc/k")
  with pytest.raises(UserError, match="no contributions"):
    fm.median(base, [], None, name="enc/k")
  with pytest.raises(UserError, match="floating-point"):
    fm.mean(np.zeros(3, np.int64), [np.ones(3, np.int64)], None, name="ids")


@pytest.mark.parametrize("method_name", sorted(fm.METHODS))
def test_methods_do_not_modify_inputs_and_handle_bfloat16(method_name):
  # Prepare
  ml_dtypes = pytest.importorskip("ml_dtypes")
  base, bodies = _inputs(3, np.float32)
  base, bodies = base.astype(ml_dtypes.bfloat16), [b.astype(ml_dtypes.bfloat16) for b in bodies]
  copies = [base.copy()] + [b.copy() for b in bodies]
  method = fm.get_method(method_name)
  # Execute
  result = method(base, bodies, np.ones(3), name="bf16")
  # Assert
  assert result.dtype == base.dtype and result.shape == base.shape
  for original, copy in zip([base] + bodies, copies):
    np.testing.assert_array_equal(original.astype(np.float32), copy.astype(np.float32))
  assert np.all(np.isfinite(result.astype(np.float32)))


def test_robust_z_scores_spread_floor_spares_close_honest_updates():
  # Prepare: four honest update norms that agree closely (MAD 0.015), one 10% above the median
  # (as a contributor with a little more data sends), and a scaled one at twice the median.
  honest = np.array([1.95, 1.97, 1.98, 2.18])
  with_attacker = np.append(honest, 4.0)
  # Execute
  plain = robust.robust_z_scores(honest)
  floored = robust.robust_z_scores(honest, robust.MIN_RELATIVE_SPREAD)
  attacked = robust.robust_z_scores(with_attacker, robust.MIN_RELATIVE_SPREAD)
  # Assert: without the floor the honest 2.18 is flagged; with it, only the attacker is.
  assert plain[-1] > robust.ROBUST_Z_THRESHOLD
  np.testing.assert_allclose(floored, 0.6745 * (honest - 1.975) / 0.1975)
  assert np.all(floored <= robust.ROBUST_Z_THRESHOLD)
  assert attacked[-1] > robust.ROBUST_Z_THRESHOLD and np.all(attacked[:-1] <= robust.ROBUST_Z_THRESHOLD)
