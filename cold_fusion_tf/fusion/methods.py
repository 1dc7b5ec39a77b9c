"""How a fusion job combines the contributed encoder bodies: one tensor name at a time.

The fuser streams the checkpoint tensor by tensor. For each tensor name it reads the current
base tensor and the N contributions' tensors of that name and calls one *method*, a small pure
function with the signature::

  method(base, bodies, weights, *, name, **params) -> np.ndarray

``base``
  The current base model's tensor.
``bodies``
  The N contributions' versions of it (N >= 1), each the same shape as ``base``. Their order
  must be stable (for example sorted by contribution id): ``dare`` seeds one random stream
  per position.
``weights``
  float64 array of shape ``(N,)``, the number of training examples of each contribution.
  Only ``weighted`` reads it; the other methods ignore it (``None`` is accepted there).
``name``
  The tensor name. ``dare`` mixes it into its random seed so every tensor gets its own,
  reproducible drop mask.
``params``
  The method's keyword parameters (see :mod:`cold_fusion_tf.fusion.params`).

The result is a new array of ``base.dtype`` and ``base.shape``; inputs are never modified.
Arithmetic is done in float64 (sums, means, deltas), while stacks of all N tensors of one name
(``trimmed_mean``, ``median``, ``ties``) are held in float32 for inputs of 32 bits or fewer
(exact for float16, bfloat16 and float32) and float64 otherwise. ``mean``, ``weighted``,
``task_arithmetic`` and ``dare`` accumulate and never hold the N tensors at once.

Methods (all in :data:`METHODS`):

``mean``
  Uniform mean of the bodies: the paper's fusion.
``weighted``
  Mean weighted by number of training examples (FedAvg).
``trimmed_mean``
  Coordinate-wise mean after dropping the ``floor(trim_fraction * N)`` smallest and largest
  values (robust to a few corrupt or malicious contributions).
``median``
  Coordinate-wise median (robust to fewer than half corrupt contributions).
``task_arithmetic``
  ``base + scale * sum(body - base)``; ``scale=None`` means ``1 / N`` (equals ``mean``).
``ties``
  TIES-merging (Yadav et al., 2023): trim each delta to its largest-magnitude coordinates,
  elect a sign per coordinate, average the deltas that agree with it.
``dare``
  DARE (Yu et al., 2023): randomly drop delta coordinates, rescale the survivors, average.

Non-finite values are not checked here (that would cost a pass per tensor); robust methods
drop a NaN or inf only when it falls among the trimmed values.
"""

from __future__ import annotations

import math
import zlib
from typing import Callable, Optional, Sequence

import numpy as np

from cold_fusion_tf.errors import UserError
from cold_fusion_tf.fusion.params import param as _param


Method = Callable[..., np.ndarray]


# ----------------------------------------------------------------------------------------------
# Shared helpers.


def _is_floating(dtype: np.dtype) -> bool:
  """Whether ``dtype`` is a floating type: numpy's, or ml_dtypes' (bfloat16, float8_*)."""
  return dtype.kind == "f" or (dtype.kind == "V" and dtype.name.startswith(("bfloat", "float")))


def _stack_dtype(dtype: np.dtype) -> type:
  """The dtype used to hold a stack of N tensors: float32 if it is exact for ``dtype``."""
  return np.float64 if dtype.itemsize > 4 else np.float32


def _check_inputs(base: np.ndarray, bodies: Sequence[np.ndarray], name: str) -> np.ndarray:
  """Checks that there is at least one body, all floating and of the base's shape.

  Returns ``base`` as an ndarray. Raises UserError naming the tensor otherwise.
  """
  base = np.asarray(base)
  if not _is_floating(base.dtype):
    raise UserError(
        f"Tensor {name!r} has dtype {base.dtype}: only floating-point tensors can be fused "
        "(copy integer and boolean tensors from the base unchanged).")
  if len(bodies) == 0:
    raise UserError(f"Tensor {name!r}: no contributions to fuse.")
  for index, body in enumerate(bodies):
    shape = np.shape(body)
    if shape != base.shape:
      raise UserError(
          f"Tensor {name!r}: contribution #{index} has shape {shape}, the base has "
          f"{base.shape}; every contribution must have the base model's architecture.")
  return base


def f64(array: np.ndarray) -> np.ndarray:
  """``array`` as float64 (no copy if it already is)."""
  return np.asarray(array, dtype=np.float64)


def _stack(bodies: Sequence[np.ndarray], dtype: type) -> np.ndarray:
  """The bodies stacked along a new axis 0, in ``dtype``."""
  first = np.asarray(bodies[0])
  stack = np.empty((len(bodies),) + first.shape, dtype=dtype)
  for index, body in enumerate(bodies):
    stack[index] = np.asarray(body, dtype=dtype)
  return stack


def _sorted_middle_mean(stack: np.ndarray, trim: int) -> np.ndarray:
  """Coordinate-wise mean of the values left after dropping ``trim`` from each end (float64).

  Sorts ``stack`` in place along axis 0.
  """
  count = stack.shape[0]
  if trim == 0:
    return stack.sum(axis=0, dtype=np.float64) / count
  stack.sort(axis=0)
  return stack[trim:count - trim].sum(axis=0, dtype=np.float64) / (count - 2 * trim)


# ----------------------------------------------------------------------------------------------
# The methods.


def mean(base: np.ndarray, bodies: Sequence[np.ndarray], weights: Optional[np.ndarray] = None,
         *, name: str) -> np.ndarray:
  """Uniform mean of the bodies: ColD Fusion's default fusion.

  Parameters
  ----------
  base : np.ndarray
    The current base tensor (only its dtype and shape are used).
  bodies : sequence of np.ndarray
    The contributions' tensors, each of ``base.shape``.
  weights : np.ndarray, optional
    Ignored.
  name : str
    The tensor name (for error messages).

  Returns
  -------
  np.ndarray
    ``sum(bodies) / N`` accumulated in float64, cast to ``base.dtype``.
  """
  del weights
  base = _check_inputs(base, bodies, name)
  total = np.zeros(base.shape, dtype=np.float64)
  for body in bodies:
    total += f64(body)
  total /= len(bodies)
  return total.astype(base.dtype)


def weighted(base: np.ndarray, bodies: Sequence[np.ndarray], weights: np.ndarray, *,
             name: str) -> np.ndarray:
  """Mean weighted by each contribution's number of training examples (FedAvg).

  Parameters
  ----------
  base : np.ndarray
    The current base tensor (only its dtype and shape are used).
  bodies : sequence of np.ndarray
    The contributions' tensors, each of ``base.shape``.
  weights : np.ndarray
    Shape ``(N,)``: number of training examples per contribution; finite, >= 0, with a
    positive sum. Only the proportions matter.
  name : str
    The tensor name (for error messages).

  Returns
  -------
  np.ndarray
    ``sum(w_i * body_i) / sum(w)``, accumulated in float64, cast to ``base.dtype``.
  """
  base = _check_inputs(base, bodies, name)
  if weights is None:
    raise UserError(f"Tensor {name!r}: fusion method 'weighted' needs per-contribution weights.")
  weights = np.asarray(weights, dtype=np.float64)
  if weights.shape != (len(bodies),):
    raise UserError(
        f"Tensor {name!r}: fusion method 'weighted' got weights of shape {weights.shape} for "
        f"{len(bodies)} contributions.")
  if not np.all(np.isfinite(weights)) or np.any(weights < 0) or not np.any(weights > 0):
    raise UserError(
        f"Fusion method 'weighted': weights {weights.tolist()} are invalid: expected finite "
        "numbers of training examples >= 0 with a positive sum.")
  scaled = weights / weights.max()  # in [0, 1] first: the sum cannot overflow
  fractions = scaled / scaled.sum()
  total = np.zeros(base.shape, dtype=np.float64)
  for fraction, body in zip(fractions, bodies):
    if fraction != 0.0:
      total += fraction * f64(body)
  return total.astype(base.dtype)


def trimmed_mean(base: np.ndarray, bodies: Sequence[np.ndarray],
                 weights: Optional[np.ndarray] = None, *, name: str,
                 trim_fraction: float = 0.1) -> np.ndarray:
  """Coordinate-wise trimmed mean: robust to a few extreme contributions.

  Parameters
  ----------
  base : np.ndarray
    The current base tensor (only its dtype and shape are used).
  bodies : sequence of np.ndarray
    The contributions' tensors, each of ``base.shape``.
  weights : np.ndarray, optional
    Ignored.
  name : str
    The tensor name (for error messages).
  trim_fraction : float, default 0.1
    In [0, 0.5). At each coordinate, ``k = floor(trim_fraction * N)`` smallest and ``k``
    largest values are dropped before averaging (so with N < 10 the default trims nothing;
    use 0.2 to drop one value from each end with N = 5..9). ``k`` is capped at
    ``(N - 1) // 2`` so at least one value remains. 0 gives the plain mean.

  Returns
  -------
  np.ndarray
    The mean of the remaining ``N - 2k`` values, cast to ``base.dtype``.
  """
  del weights
  trim_fraction = _param("trimmed_mean", "trim_fraction", trim_fraction)
  base = _check_inputs(base, bodies, name)
  count = len(bodies)
  # The epsilon keeps e.g. 0.29 * 100 = 28.999999999999996 from flooring to 28.
  trim = min(int(math.floor(trim_fraction * count + 1e-9)), (count - 1) // 2)
  if trim == 0:
    return mean(base, bodies, name=name)
  stack = _stack(bodies, _stack_dtype(base.dtype))
  return _sorted_middle_mean(stack, trim).astype(base.dtype)


def median(base: np.ndarray, bodies: Sequence[np.ndarray], weights: Optional[np.ndarray] = None,
           *, name: str) -> np.ndarray:
  """Coordinate-wise median: robust while fewer than half the contributions are corrupt.

  Parameters
  ----------
  base : np.ndarray
    The current base tensor (only its dtype and shape are used).
  bodies : sequence of np.ndarray
    The contributions' tensors, each of ``base.shape``.
  weights : np.ndarray, optional
    Ignored.
  name : str
    The tensor name (for error messages).

  Returns
  -------
  np.ndarray
    The middle value (odd N) or the mean of the two middle values (even N) at each
    coordinate, cast to ``base.dtype``.
  """
  del weights
  base = _check_inputs(base, bodies, name)
  count = len(bodies)
  if count <= 2:
    return mean(base, bodies, name=name)
  stack = _stack(bodies, _stack_dtype(base.dtype))
  return _sorted_middle_mean(stack, (count - 1) // 2).astype(base.dtype)


def task_arithmetic(base: np.ndarray, bodies: Sequence[np.ndarray],
                    weights: Optional[np.ndarray] = None, *, name: str,
                    scale: Optional[float] = None) -> np.ndarray:
  """Task arithmetic (Ilharco et al., 2023): the base plus the scaled sum of task vectors.

  Parameters
  ----------
  base : np.ndarray
    The current base tensor.
  bodies : sequence of np.ndarray
    The contributions' tensors, each of ``base.shape``.
  weights : np.ndarray, optional
    Ignored.
  name : str
    The tensor name (for error messages).
  scale : float or None, default None
    Multiplies the sum of deltas ``body - base``; any finite number. None means ``1 / N``,
    which makes the result the plain mean; larger values extrapolate past it.

  Returns
  -------
  np.ndarray
    ``base + scale * sum(body_i - base)`` computed in float64, cast to ``base.dtype``.
  """
  del weights
  scale = _param("task_arithmetic", "scale", scale)
  base = _check_inputs(base, bodies, name)
  if scale is None:
    scale = 1.0 / len(bodies)
  base64 = f64(base)
  delta_sum = np.zeros(base.shape, dtype=np.float64)
  for body in bodies:
    delta_sum += f64(body) - base64
  delta_sum *= scale
  delta_sum += base64
  return delta_sum.astype(base.dtype)


def _keep_largest(delta: np.ndarray, density: float) -> np.ndarray:
  """Zeroes ``delta`` (in place) except its ``ceil(density * size)`` largest magnitudes.

  Coordinates tied with the smallest kept magnitude are all kept (as in the TIES reference
  code), so a few more may survive. Returns ``delta``.
  """
  size = delta.size
  keep = min(size, max(1, int(math.ceil(density * size - 1e-9))))
  if keep == size:
    return delta
  magnitude = np.abs(delta)
  threshold = np.partition(magnitude.ravel(), size - keep)[size - keep]
  delta[magnitude < threshold] = 0
  return delta


def ties(base: np.ndarray, bodies: Sequence[np.ndarray], weights: Optional[np.ndarray] = None,
         *, name: str, density: float = 0.2, scale: float = 1.0) -> np.ndarray:
  """TIES-merging (Yadav et al., 2023, "Resolving Interference When Merging Models").

  1. Deltas ``d_i = body_i - base``.
  2. Trim: each ``d_i`` keeps its ``ceil(density * size)`` largest-magnitude coordinates
     (of this tensor; ties at the threshold are all kept), the rest become 0.
  3. Elect: the sign per coordinate of the sum of the trimmed deltas.
  4. Disjoint mean: per coordinate, the mean of the trimmed deltas that are nonzero and have
     the elected sign (zeros are not counted). Coordinates with no such delta, or whose
     trimmed deltas sum to exactly 0 (no elected sign), get 0.
  5. Result ``base + scale * merged``.

  Parameters
  ----------
  base : np.ndarray
    The current base tensor.
  bodies : sequence of np.ndarray
    The contributions' tensors, each of ``base.shape``.
  weights : np.ndarray, optional
    Ignored.
  name : str
    The tensor name (for error messages).
  density : float, default 0.2
    In (0, 1]: the fraction of each delta's coordinates kept by the trim step. 1 keeps all.
  scale : float, default 1.0
    Any finite number: multiplies the merged delta (the paper's lambda).

  Returns
  -------
  np.ndarray
    The merged tensor, cast to ``base.dtype``.
  """
  del weights
  density = _param("ties", "density", density)
  scale = _param("ties", "scale", scale)
  base = _check_inputs(base, bodies, name)
  if base.size == 0:
    return base.copy()
  base64 = f64(base)
  deltas = np.empty((len(bodies),) + base.shape, dtype=_stack_dtype(base.dtype))
  for index, body in enumerate(bodies):
    deltas[index] = _keep_largest(f64(body) - base64, density)
  elected = np.sign(deltas.sum(axis=0, dtype=np.float64))
  agree = (np.sign(deltas) == elected) & (deltas != 0)
  agreeing_sum = np.where(agree, deltas, 0).sum(axis=0, dtype=np.float64)
  agreeing_count = agree.sum(axis=0)
  merged = agreeing_sum / np.maximum(agreeing_count, 1)
  merged *= scale
  merged += base64
  return merged.astype(base.dtype)


def dare_seed(seed: int, name: str, index: int) -> np.random.SeedSequence:
  """The seed of contribution ``index``'s drop mask for tensor ``name`` in :func:`dare`.

  Parameters
  ----------
  seed : int
    The fusion's ``seed`` parameter, 0 .. 2**32 - 1.
  name : str
    The tensor name; mixed in through ``zlib.crc32`` of its UTF-8 bytes (stable across runs
    and Python processes, unlike ``hash``).
  index : int
    The contribution's position in ``bodies``.

  Returns
  -------
  np.random.SeedSequence
    Built from ``[seed, crc32(name), index]``.
  """
  return np.random.SeedSequence([seed, zlib.crc32(name.encode("utf-8")), index])


def dare(base: np.ndarray, bodies: Sequence[np.ndarray], weights: Optional[np.ndarray] = None,
         *, name: str, drop_rate: float = 0.9, seed: int = 0) -> np.ndarray:
  """DARE (Yu et al., 2023, "Language Models are Super Mario"): drop and rescale, then average.

  For each contribution ``i``: delta ``d_i = body_i - base``; each coordinate is dropped
  (set to 0) with probability ``drop_rate``, independently, using a generator seeded by
  :func:`dare_seed` ``(seed, name, i)``; survivors are multiplied by ``1 / (1 - drop_rate)``
  so the expected delta is unchanged. The result is the base plus the mean of these deltas.
  The same inputs, ``seed`` and ``name`` always give the same result.

  Parameters
  ----------
  base : np.ndarray
    The current base tensor.
  bodies : sequence of np.ndarray
    The contributions' tensors, each of ``base.shape``, in a stable order.
  weights : np.ndarray, optional
    Ignored.
  name : str
    The tensor name: part of the random seed, so each tensor gets its own masks.
  drop_rate : float, default 0.9
    In [0, 1): the probability of dropping each delta coordinate. 0 gives the plain mean.
  seed : int, default 0
    An integer 0 .. 2**32 - 1; change it to draw different masks.

  Returns
  -------
  np.ndarray
    ``base + mean_i(mask_i * d_i) / (1 - drop_rate)`` in float64, cast to ``base.dtype``.
  """
  del weights
  drop_rate = _param("dare", "drop_rate", drop_rate)
  seed = _param("dare", "seed", seed)
  base = _check_inputs(base, bodies, name)
  base64 = f64(base)
  kept_sum = np.zeros(base.shape, dtype=np.float64)
  for index, body in enumerate(bodies):
    delta = f64(body) - base64
    if drop_rate > 0.0:
      rng = np.random.default_rng(dare_seed(seed, name, index))
      delta[rng.random(base.shape, dtype=np.float32) < drop_rate] = 0
    kept_sum += delta
  kept_sum *= 1.0 / ((1.0 - drop_rate) * len(bodies))
  kept_sum += base64
  return kept_sum.astype(base.dtype)


METHODS: dict[str, Method] = {
    "mean": mean,
    "weighted": weighted,
    "trimmed_mean": trimmed_mean,
    "median": median,
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "dare": dare,
}
"""Fusion method name -> function ``(base, bodies, weights, *, name, **params) -> tensor``."""


def get_method(name: str) -> Method:
  """The fusion method called ``name``.

  Parameters
  ----------
  name : str
    A key of :data:`METHODS`.

  Returns
  -------
  callable
    ``method(base, bodies, weights, *, name, **params) -> np.ndarray``.

  Raises
  ------
  UserError
    If ``name`` is not a known method; the message lists the known names.
  """
  if not isinstance(name, str) or name not in METHODS:
    raise UserError(
        f"Unknown fusion method {name!r}: expected one of {', '.join(sorted(METHODS))}.")
  return METHODS[name]
