"""The fuse program's loop: wait for the quorum (validating contributions as they arrive), fuse,
and with ``--watch`` go on iteration after iteration."""

from __future__ import annotations

import math
import time
from typing import Callable, Optional

from absl import logging

from cold_fusion_tf import store as store_lib
from cold_fusion_tf.fusion.job import fuse
from cold_fusion_tf.fusion.settings import Outcome, Settings
from cold_fusion_tf.fusion.validation import Validations


def _pending(store, iteration: int, base_sha: str) -> tuple:
  """Cheap: the (id, body sha256) of complete contributions claiming the current base."""
  found, _ = store.contributions(iteration)
  return tuple(sorted((c.contributor_id, c.meta["body_sha256"]) for c in found
                      if c.meta["base_iteration"] == iteration
                      and c.meta["base_sha256"] == base_sha))


def run(store: store_lib.Store, settings: Settings, watch: bool = False,
        log: Callable[[str], None] = logging.info, sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        published: Optional[Callable[[Outcome], None]] = None) -> int:
  """The fuse program: returns its exit status (0: published, 1: no quorum in time).
  ``published`` is called with the outcome of each fusion that published a base.

  Without ``watch``: one fusion now; with ``settings.max_wait > 0`` it first polls the
  store every ``poll_seconds`` until ``min_contributions`` contributions are there or
  ``max_wait`` seconds have passed. With ``watch``: the same, iteration after iteration,
  until ``watch_iterations`` bases are published (0: forever); the deadline restarts with
  each iteration. Reaching a deadline with fewer than the quorum publishes nothing and
  returns 1.
  """
  advanced = 0
  while True:
    iteration = store.require_latest()
    base_sha = store.base_sha256(iteration)
    target = store.next_iteration(iteration)
    if watch and settings.max_wait == 0:
      deadline = math.inf
    elif watch or settings.max_wait > 0:
      deadline = clock() + settings.max_wait
    else:
      deadline = None  # one attempt, now
    tried, reported, validations, validated = None, None, None, None
    try:
      while True:
        if store.require_latest() != iteration:
          log(f"LATEST moved from base {iteration} to base {store.latest()} (another fuser, "
              "or a rollback)")
          break
        pending = _pending(store, iteration, base_sha)
        planned = store.has_plan(target)
        if deadline is not None and pending and not planned and pending != validated:
          # Validate contributions as they arrive: at the quorum only the fusion is left.
          if validations is None:
            validations = Validations(store, settings, log)
          valid, validated = validations.refresh(), pending
        if deadline is None or ((len(pending) >= settings.min_contributions or planned)
                                and pending != tried):
          outcome = fuse(store, log=log, settings=settings, validations=validations)
          if outcome.published is not None:
            advanced += 1
            if published is not None:
              published(outcome)
            break
          if outcome.lost_race:  # LATEST really moved: fuse from where it is now
            if not watch:
              return 0
            break
          if deadline is None:
            return 1
          tried = pending
        now = clock()
        if now >= deadline:
          log(f"waited {settings.max_wait:g}s for contributions to iteration {iteration}: "
              f"{len(pending)} there, {settings.min_contributions} required; nothing "
              "published.")
          return 1
        if reported != pending:
          left = "" if math.isinf(deadline) else f", giving up in {deadline - now:.0f}s"
          checked = f" ({valid} validated)" if validations is not None and pending else ""
          log(f"iteration {iteration}: {len(pending)}{checked} of "
              f"{settings.min_contributions} required contribution(s); checking every "
              f"{settings.poll_seconds:g}s{left}")
          reported = pending
        sleep(min(settings.poll_seconds, deadline - now))
    finally:
      if validations is not None:
        validations.close()
    if not watch or advanced == settings.watch_iterations:
      return 0
