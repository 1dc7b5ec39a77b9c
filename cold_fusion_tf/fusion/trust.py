"""What keeps one contributor, or a few ids, from deciding the base.

Applied to the contributions that passed :mod:`.validation` (well-formed, finite, fresh):

1. **Repeated bodies**: identical bodies (same sha256) under several ids count once, for
   the earliest upload (GCS: the object's creation time, set by the service, so a copy can
   only be uploaded after the original; a local store: the inode's change time, which only
   whoever may write or hard-link the file can move); when the earliest are tied, none of
   them counts. A body equal to the base (no update at all) does not count either.
2. **Norm bounds**, relative to the base's own norms: each tensor's update
   ``||body_t - base_t||`` against ``max_tensor_update_ratio`` times ``||base_t||`` (for
   tensors of small norm, at least their share of the whole base's norm), and the whole
   update against ``max_update_ratio`` times ``||base||``. Over a bound, an update is
   rejected, or with ``clip_updates`` scaled down onto the bound (as TensorFlow Federated's
   robust aggregators clip updates before averaging).
3. **Outliers** among 3 or more: robust z-scores of the update norms (:mod:`.robust`).
4. **Direction**, among 3 or more: the update whose cosine with the mean of the others' is
   lowest, and below ``min_cosine`` (with up to 64 updates: even once up to half of the others,
   those most opposed to it, are left out), is rejected; then the same among those left, and
   so on, for at most a minority of the updates.
5. **Weights** (``weighted``): each claim of training examples counts at most
   ``max_weight_ratio`` times the median claim.

:func:`check_fused` checks the fused base before it is published: every value finite and its
distance from the parent within ``max_fused_ratio`` times the parent's norm.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import numpy as np

from cold_fusion_tf.errors import UserError
from cold_fusion_tf.fusion import robust
from cold_fusion_tf.fusion.validation import Checked, rejection

COSINE_TIE = 1e-6
"""Cosines closer than this are tied in the direction check (float rounding)."""
MIN_SPREAD_OF_BOUND = 0.02
"""The MAD of update norms used for z-scores is at least this share of the whole-update bound,
so that many near-empty updates cannot make honest ones look like outliers."""


@dataclasses.dataclass(frozen=True)
class Limits:
  """The largest update norm allowed for the whole body and for each tensor (inf: none)."""

  body: float
  tensors: dict
  base_norm: float


def limits(base_squares: dict, numel: dict, settings) -> Limits:
  """The bounds of ``settings`` for a base whose floating tensors have squared norms
  ``base_squares`` and ``numel`` elements each."""
  total = sum(base_squares.values())
  count = max(1, sum(numel[n] for n in base_squares))
  norm = math.sqrt(total)
  body = settings.max_update_ratio * norm if settings.max_update_ratio > 0 else math.inf
  ratio = settings.max_tensor_update_ratio
  tensors = {n: ratio * max(math.sqrt(sq), math.sqrt(total * numel[n] / count)) if ratio > 0
             else math.inf for n, sq in base_squares.items()}
  return Limits(body, tensors, norm)


def clip_factors(squares: dict, bounds: Limits) -> dict:
  """{tensor: factor < 1} that scale an update with per-tensor squared norms ``squares``
  onto the bounds (each tensor first, then the whole update)."""
  factors = {}
  for name, sq in squares.items():
    norm = math.sqrt(sq)
    if norm > bounds.tensors.get(name, math.inf):
      factors[name] = bounds.tensors[name] / norm
  clipped = math.sqrt(sum(sq * factors.get(n, 1.0) ** 2 for n, sq in squares.items()))
  if clipped > bounds.body:
    whole = bounds.body / clipped
    factors = {n: factors.get(n, 1.0) * whole for n in squares}
  return factors


def over_bound(squares: dict, bounds: Limits, settings) -> Optional[str]:
  """Why an update is beyond the bounds, or None."""
  for name in sorted(squares):
    norm, bound = math.sqrt(squares[name]), bounds.tensors.get(name, math.inf)
    if norm > bound:
      return (f"tensor {name}: update norm {norm:.4g} is above its bound {bound:.4g} "
              f"(config.fusion.max_tensor_update_ratio={settings.max_tensor_update_ratio:g} "
              "of the base tensor's norm)")
  norm = math.sqrt(sum(squares.values()))
  if norm > bounds.body:
    return (f"update norm {norm:.4g} is above the bound {bounds.body:.4g} "
            f"(config.fusion.max_update_ratio={settings.max_update_ratio:g} of the base's norm "
            f"{bounds.base_norm:.4g})")
  return None


def _earliest(checked: dict, log, rejected: list) -> list[str]:
  """Ids left once identical bodies count once (for the earliest upload)."""
  by_sha: dict[str, list[str]] = {}
  for cid in sorted(checked):
    by_sha.setdefault(checked[cid].scan.sha256, []).append(cid)
  kept = []
  for sha, ids in by_sha.items():
    if len(ids) == 1:
      kept.append(ids[0])
      continue
    first = min(checked[c].contribution.created_ns for c in ids)
    earliest = [c for c in ids if checked[c].contribution.created_ns == first]
    winner = earliest[0] if len(earliest) == 1 else None
    for cid in ids:
      if cid == winner:
        kept.append(cid)
        continue
      reason = (f"the same body (sha256 {sha[:12]}) as contributor {winner}, uploaded earlier; "
                "the earliest upload is counted" if winner else
                f"the same body (sha256 {sha[:12]}) as {', '.join(i for i in earliest if i != cid)}"
                ", uploaded at the same time; none of them is counted")
      _reject(rejected, checked[cid], reason, log)
  return sorted(kept)


def _reject(rejected: list, checked: Checked, reason: str, log) -> None:
  cid = checked.contribution.contributor_id
  rejected.append(rejection(cid, checked.contribution.meta["dataset"], reason))
  log(f"rejected {cid}: {reason}")


def cosines(dots: np.ndarray, own: np.ndarray, total: float, ids: list[str]) -> dict:
  """{id: cosine of its update with the mean of the others' updates} from
  :func:`streaming.direction_terms` over ``ids`` (in that order): with ``S`` the sum of all
  updates, the others' sum is ``S - d_i``."""
  out = {}
  for cid, dot, sq in zip(ids, dots, own):
    others_sq = total - 2 * dot + sq
    out[cid] = (1.0 if sq <= 0 or others_sq <= 0
                else float((dot - sq) / math.sqrt(sq * others_sq)))
  return out


def select(checked: dict, settings, bounds: Limits,
           directions: Callable[[list[str], dict], tuple], log,
           gram: Optional[Callable[[list[str], dict], np.ndarray]] = None
           ) -> tuple[list, list, dict, dict]:
  """The contributions that count: (ids, rejections, {id: z-score}, {id: clip factors}).

  ``directions(ids, factors)`` reads those ids' updates for
  :func:`streaming.direction_terms` (only when the direction check runs); ``gram(ids,
  factors)`` for :func:`streaming.gram` (only when an update's cosine is below
  ``min_cosine``).
  """
  rejected: list[dict] = []
  kept, factors = [], {}
  for cid in _earliest(checked, log, rejected):
    squares = checked[cid].scan.tensors
    if not math.isfinite(sum(squares.values())):
      _reject(rejected, checked[cid], "the update's norm overflows (values far too large)", log)
      continue
    if not any(squares.values()):
      _reject(rejected, checked[cid], "the body is the base itself (every value unchanged): "
              "no update to fuse; fine-tune it before contributing", log)
      continue
    if settings.clip_updates:
      found = clip_factors(squares, bounds)
      if found:
        factors[cid] = found
        log(f"clipped {cid}: its update is beyond the norm bounds; scaled onto them")
      kept.append(cid)
      continue
    reason = over_bound(squares, bounds, settings)
    if reason:
      _reject(rejected, checked[cid], reason, log)
    else:
      kept.append(cid)
  scores = {}
  if len(kept) >= 3 and settings.max_update_z > 0:
    norms = np.array([_clipped_norm(checked[c].scan.tensors, factors.get(c, {})) for c in kept])
    median = float(np.median(norms))
    spread = max(robust.MIN_RELATIVE_SPREAD, MIN_SPREAD_OF_BOUND * bounds.body / median
                 if median > 0 and math.isfinite(bounds.body) else 0.0)
    z = robust.robust_z_scores(norms, spread)
    scores = dict(zip(kept, (float(v) for v in z)))
    for cid, norm, score in zip(list(kept), norms, z):
      if score > settings.max_update_z:
        _reject(rejected, checked[cid],
                f"update norm {norm:.4g} is far above the others' (median {median:.4g}; "
                f"robust z-score {score:.3g} > {settings.max_update_z:g})", log)
        kept.remove(cid)
  if len(kept) >= 3 and settings.min_cosine > -1:
    _direction_check(checked, kept, factors, settings, directions, gram, rejected, log)
  return kept, rejected, scores, {c: f for c, f in factors.items() if c in kept}


MAX_PAIRWISE = 64
"""With at most this many updates, the direction check also measures every pair of them
(:func:`robust_cosines`); with more, each update only against the mean of the others."""


def robust_cosines(gram: np.ndarray, alive: list[int]) -> tuple[dict, dict]:
  """For each update ``i`` of ``alive`` (indices into ``gram``, the matrix of their dot
  products): (its cosine with the mean of the others, the highest cosine it has with the
  mean of the others once up to ``len(alive) // 2`` of them are left out, those most opposed
  to it first). An update against the others only because a few of them point against it
  has a high second cosine: a minority cannot get it rejected."""
  plain, robust = {}, {}
  drop = min(len(alive) // 2, len(alive) - 2)
  for i in alive:
    others = [j for j in alive if j != i]
    sub = gram[np.ix_(others, others)]
    dot, squared, own = float(gram[i, others].sum()), float(sub.sum()), float(gram[i, i])
    edge = sub.sum(axis=1)  # d_j . (sum of the others)
    best = None
    left = list(range(len(others)))
    for step in range(drop + 1):
      value = 1.0 if own <= 0 or squared <= 0 else dot / math.sqrt(own * squared)
      best = value if best is None else max(best, value)
      if step == 0:
        plain[i] = value
      if step == drop:
        break
      worst = min(left, key=lambda k: (gram[i, others[k]], k))  # the most opposed to i
      left.remove(worst)
      dot -= float(gram[i, others[worst]])
      squared += float(sub[worst, worst]) - 2 * float(edge[worst])
      edge -= sub[:, worst]
    robust[i] = best
  return plain, robust


def _direction_check(checked: dict, kept: list, factors: dict, settings, directions,
                     gram, rejected: list, log) -> None:
  """Rejects from ``kept``, one at a time, the update that points furthest from the mean of
  the others while that is below ``min_cosine``, measuring again among those left after each.

  Judged all at once, an update against the others would drag their mean with it, and the
  honest updates would look as if they pointed away too. With at most
  :data:`MAX_PAIRWISE` updates, an update counts as pointing away only if it still does
  with up to half of the others left out (:func:`robust_cosines`): one id, or a minority,
  sending the opposite of an honest update (nearly orthogonal to the rest, as fine-tunes on
  different tasks are) cannot get it rejected. Cosines within :data:`COSINE_TIE` of each
  other are tied, and the larger update goes first. At most a minority, ``(n - 1) // 2`` of
  the ``n`` updates, is rejected this way.
  """
  plain = cosines(*directions(kept, factors), kept)
  if min(plain.values()) >= settings.min_cosine:
    return  # (the first measure is the cheaper one, and no robust cosine is lower)
  pairwise = gram is not None and len(kept) <= MAX_PAIRWISE
  matrix = gram(kept, factors) if pairwise else None
  ids = list(kept)
  norms = {c: _clipped_norm(checked[c].scan.tensors, factors.get(c, {})) for c in kept}
  for round_ in range((len(ids) - 1) // 2):
    if pairwise:
      by_index, robust = robust_cosines(matrix, [ids.index(c) for c in kept])
      found = {ids[i]: v for i, v in robust.items()}
      plain = {ids[i]: v for i, v in by_index.items()}
    else:
      plain = found = plain if round_ == 0 else cosines(*directions(kept, factors), kept)
    lowest = min(found.values())
    worst = min((c for c in kept if found[c] <= lowest + COSINE_TIE),
                key=lambda c: (-norms[c], c))
    if found[worst] >= settings.min_cosine:
      return
    also = (f", {found[worst]:.3g} at most with up to {len(kept) // 2} of them left out"
            if pairwise else "")
    _reject(rejected, checked[worst],
            f"update points away from the others' (cosine {plain[worst]:.3g} with their mean"
            f"{also}, below config.fusion.min_cosine={settings.min_cosine:g})", log)
    kept.remove(worst)


def _clipped_norm(squares: dict, factors: dict) -> float:
  return math.sqrt(sum(sq * factors.get(n, 1.0) ** 2 for n, sq in squares.items()))


def capped_weights(claims: list[int], ratio: float) -> list[float]:
  """Each claim of training examples, at most ``ratio`` times the median claim (the lower
  median: with two, the smaller); claims are at most 2**53, so no sum overflows."""
  if not claims:
    return []
  cap = ratio * sorted(claims)[(len(claims) - 1) // 2] if ratio > 0 else math.inf
  return [float(min(c, cap)) for c in claims]


def check_fused(squared_distance: float, nonfinite: Optional[str], base_norm: float,
                settings) -> None:
  """Refuses a fused base that is not finite or moved too far from its parent."""
  if nonfinite:
    raise UserError(f"the fused base holds NaN or infinite values (tensor {nonfinite}); "
                    "nothing was published")
  distance = math.sqrt(squared_distance)
  bound = settings.max_fused_ratio * base_norm
  if settings.max_fused_ratio > 0 and not distance <= bound:
    raise UserError(f"the fused base is {distance:.4g} away from its parent, above the bound "
                    f"{bound:.4g} (config.fusion.max_fused_ratio={settings.max_fused_ratio:g} "
                    "of the parent's norm); nothing was published")
