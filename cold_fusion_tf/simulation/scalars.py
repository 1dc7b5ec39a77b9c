"""TensorBoard scalars of a whole run, one step per base iteration:

  tensorboard --logdir stores/demo/tensorboard

* ``fusion/contributions_fused``, ``fusion/contributions_rejected``, ``fusion/update_norm_mean``,
  ``fusion/update_norm_max`` (the fused updates' norms ``||body - base||``), from the base's
  manifest, and ``fusion/seconds``: how long the fusion took (validation, fusion and
  publishing; not the wait for contributions);
* ``eval/<task>``, ``eval/<group>`` (the mean over a group's tasks: held-in, held-out, all
  tasks): the base's evaluation scores (x 100), where the run evaluated it.

The fuse program writes a step for each base it publishes, the run program for each base it
fuses and evaluates, into ``<store>/tensorboard`` for a local store or ``--logdir`` (a local
folder; a ``gs://`` store writes none without it). The points are kept in ``points.json``
beside one event file that is rewritten whole on each update, so a rerun that scores a base
again replaces its points instead of adding a second curve. No TensorFlow is needed.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from typing import Callable, Mapping, Optional

from cold_fusion_tf.errors import UserError
from cold_fusion_tf.store import lineage

DIRECTORY = "tensorboard"
EVENTS = "events.out.tfevents.cold_fusion"
POINTS = "points.json"


def open_for(store_uri: str, logdir: Optional[str] = None) -> Optional["RunScalars"]:
  """The scalars of the run in ``store_uri``: in ``logdir``, else ``<store>/tensorboard`` for a
  local store; None for a ``gs://`` store without ``logdir``."""
  if logdir:
    if "://" in logdir:
      raise UserError(f"--logdir={logdir}: give a local folder (TensorBoard reads it there).")
    return RunScalars(logdir)
  if "://" in store_uri:
    return None
  return RunScalars(os.path.join(store_uri, DIRECTORY))


def fuser_recorder(store, logdir: Optional[str]) -> Optional[Callable[[object], None]]:
  """For the fuse program: records the scalars of each base it publishes (its fusion outcome:
  how long validation, fusion and publishing took, not the wait for contributions), in the
  folder of :func:`open_for`; None where there is no such folder."""
  run_scalars = open_for(store.uri, logdir)
  if run_scalars is None:
    return None
  return lambda outcome: run_scalars.fusion(store, outcome.published,
                                            outcome.timings.get("total"))


class RunScalars:
  """The scalars in one folder (see the module docstring)."""

  def __init__(self, logdir: str):
    self.logdir = logdir
    self._events: Optional[list] = None  # [wall time, step, tag, value], as written

  def fusion(self, store, iteration: int, seconds: Optional[float] = None) -> None:
    """The fusion that published base ``iteration`` of ``store``."""
    section = store.manifest(iteration).get("fusion") or {}
    fused = [c for c in section.get("contributions", []) if isinstance(c, dict)]
    norms = [float(c["update_norm"]) for c in fused
             if isinstance(c.get("update_norm"), (int, float)) and not isinstance(
                 c.get("update_norm"), bool)]
    values = {"fusion/contributions_fused": len(fused),
              "fusion/contributions_rejected": len(section.get("rejected", []))
                                               + lineage.not_listed(section)}
    if norms:
      values.update({"fusion/update_norm_mean": sum(norms) / len(norms),
                     "fusion/update_norm_max": max(norms)})
    if seconds is not None:
      values["fusion/seconds"] = seconds
    self.add(iteration, values)

  def fusions(self, store, latest: int) -> None:
    """The fusion points of bases 1..``latest`` that have none (published by a run that was
    stopped before it recorded them, or before this folder was used; their seconds are not
    known any more)."""
    have = self.read().get("fusion/contributions_fused", {})
    for iteration in range(1, latest + 1):
      if iteration not in have:
        try:
          self.fusion(store, iteration)
        except UserError:  # no base under this number (withdrawn numbers are skipped)
          continue

  def evaluation(self, summary: Mapping, iterations: Mapping[str, int]) -> None:
    """Scores of an evaluation summary (:func:`cold_fusion_tf.evaluation.summary.summarize`);
    ``iterations``: the base iteration of each model name. The ``eval/`` points of those
    bases become the summary's: a point the summary no longer has (a base or task it does not
    score, a group it does not form) is removed, so the scalars show what the report shows."""
    for name, iteration in iterations.items():
      scores = summary.get("scores", {}).get(name) or {"tasks": {}, "groups": {}}
      values = {f"eval/{task}": stats.get("mean") for task, stats in scores["tasks"].items()}
      values.update({f"eval/{group}": mean for group, mean in scores["groups"].items()})
      self.add(iteration, values, replace="eval/")

  def add(self, step: int, values: Mapping[str, float], replace: str = "") -> None:
    """Points at ``step`` (undefined values, such as NaN means, are left out): new points are
    appended to the event file; a point whose value changed rewrites it. With ``replace`` (a
    tag prefix), the step's other points under that prefix are removed."""
    events = self._load()
    defined = {tag: float(value) for tag, value in values.items()
               if value is not None and math.isfinite(float(value))}
    kept = [e for e in events if not (replace and e[1] == step and e[2].startswith(replace)
                                      and e[2] not in defined)]
    changed = len(kept) != len(events)
    events = kept
    index = {(e[1], e[2]): i for i, e in enumerate(events)}
    new = []
    for tag, value in defined.items():
      at = index.get((step, tag))
      if at is None:
        new.append([time.time(), step, tag, value])
      elif events[at][3] != value:
        events[at][3], changed = value, True
    if new or changed:
      events = events + new
      self._write(events, new if not changed else events, append=not changed)
    self._events = events

  def read(self) -> dict[str, dict[int, float]]:
    """Every point: tag -> step -> value."""
    out: dict[str, dict[int, float]] = {}
    for _, step, tag, value in self._load():
      out.setdefault(tag, {})[step] = value
    return out

  def _load(self) -> list:
    if self._events is None:
      self._events = []
      try:
        with open(os.path.join(self.logdir, POINTS), encoding="utf-8") as f:
          events = json.load(f)["events"]
        if os.path.exists(os.path.join(self.logdir, EVENTS)):
          self._events = [[float(w), int(s), str(t), float(v)] for w, s, t, v in events]
      except (OSError, ValueError, KeyError, TypeError):
        pass  # none yet, or damaged: start over (it only mirrors what was measured)
    return self._events

  def _write(self, events: list, records: list, append: bool) -> None:
    """``records`` into the event file (appended, or the whole file in place: a running
    TensorBoard reads on), then every point (``events``) into points.json."""
    # pylint: disable=g-import-not-at-top
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter
    # pylint: enable=g-import-not-at-top
    os.makedirs(self.logdir, exist_ok=True)
    path = os.path.join(self.logdir, EVENTS)
    if append and not os.path.exists(path):
      append, records = False, events
    with open(path, "ab" if append else "wb") as f:
      writer = RecordWriter(f)
      if not append:
        writer.write(event_pb2.Event(wall_time=events[0][0] if events else time.time(),
                                     file_version="brain.Event:2")
                     .SerializeToString())
      for wall, step, tag, value in records:
        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag,
                                                                       simple_value=value)])
        writer.write(event_pb2.Event(wall_time=wall, step=step, summary=summary)
                     .SerializeToString())
    fd, tmp = tempfile.mkstemp(dir=self.logdir, prefix=".points-")
    os.chmod(tmp, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      json.dump({"events": events}, f)
    os.replace(tmp, os.path.join(self.logdir, POINTS))
