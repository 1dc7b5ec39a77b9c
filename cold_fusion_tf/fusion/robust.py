"""Robust statistics for telling outlier contributions apart."""

from __future__ import annotations

import numpy as np

from cold_fusion_tf.errors import UserError

ROBUST_Z_THRESHOLD = 3.5
"""The usual cut-off for :func:`robust_z_scores` (Iglewicz and Hoaglin): above it is an outlier."""

# The fuser's floor on the MAD of update norms, relative to their median (see robust_z_scores).
MIN_RELATIVE_SPREAD = 0.1


def robust_z_scores(values: np.ndarray, min_relative_spread: float = 0.0) -> np.ndarray:
  """Median/MAD z-scores (Iglewicz and Hoaglin's modified z-score) of a 1-D set of values.

  ``z = 0.6745 * (x - median) / MAD`` with ``MAD = median(|x - median|)``; 0.6745 makes it
  comparable to a standard z-score for normal data, and :data:`ROBUST_Z_THRESHOLD` (3.5) is
  the usual outlier cut-off. Used on the update norms ``||body - base||`` of the
  contributions: a contribution with ``z > 3.5`` sent an update far larger than the others.
  Needs at least 3 values to flag anything (with 2, ``|z|`` is at most 0.6745).

  A handful of honest contributors can agree so closely that their MAD is tiny and an update
  only 10% larger scores far above 3.5; ``min_relative_spread`` floors the MAD at that fraction
  of ``|median|`` (the fuser uses :data:`MIN_RELATIVE_SPREAD`: with it, flagging at 3.5 needs
  a norm at least about 1.5x the median).

  Parameters
  ----------
  values : np.ndarray
    1-D array of values (any real dtype).
  min_relative_spread : float
    The smallest MAD, as a fraction of ``|median|`` (0: no floor).

  Returns
  -------
  np.ndarray
    float64 z-scores of the same shape. When MAD is 0 (more than half the values equal the
    median), values equal to the median score 0 and others ``+inf`` / ``-inf`` (above /
    below). Non-finite values (NaN, inf) are left out of the median and MAD and score
    ``+inf``, so they are always flagged.
  """
  values = np.asarray(values, dtype=np.float64)
  if values.ndim != 1:
    raise UserError(f"robust_z_scores expects a 1-D array, got shape {values.shape}.")
  scores = np.full(values.shape, np.inf)
  finite = np.isfinite(values)
  if not finite.any():
    return scores
  kept = values[finite]
  center = np.median(kept)
  deviation = kept - center
  mad = max(float(np.median(np.abs(deviation))), min_relative_spread * abs(float(center)))
  if mad > 0:
    scores[finite] = 0.6745 * deviation / mad
  else:
    scores[finite] = np.where(deviation == 0, 0.0, np.copysign(np.inf, deviation))
  return scores
