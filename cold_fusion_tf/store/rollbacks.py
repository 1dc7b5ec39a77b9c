"""Withdrawing published bases: LATEST moved back by compare-and-swap, with a record.

A rollback from LATEST = ``m`` to an earlier base ``n`` of its lineage writes
``rollbacks/<m>.json`` (who, why, which bases are withdrawn), then moves LATEST from ``m`` to
``n`` by compare-and-swap. Published bases are never rewritten: the next fusion fuses the
contributions to base ``n`` into base ``m + 1`` (parent ``n``), and contributions made for a
withdrawn base are stale.
"""

from __future__ import annotations

import datetime
import getpass
import socket

from cold_fusion_tf.errors import UserError
from cold_fusion_tf.store import layout
from cold_fusion_tf.store.untrusted import printable

MAX_REASON = 2000


def parent_of(store, iteration: int) -> int | None:
  """The parent base of ``iteration`` named by its manifest (None for base 0)."""
  if iteration == 0:
    return None
  parent = store.manifest(iteration).get("parent")
  value = parent.get("iteration") if isinstance(parent, dict) else None
  if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < iteration:
    raise UserError(f"{store.uri}: the manifest of base {iteration} names no valid parent.")
  return value


def lineage_of(store, iteration: int) -> list[int]:
  """Base ``iteration`` and its ancestors, newest first, down to base 0."""
  chain = [iteration]
  while chain[-1] != 0:
    chain.append(parent_of(store, chain[-1]))
  return chain


def who() -> str:
  try:
    user = getpass.getuser()
  except (KeyError, OSError):
    user = "unknown"
  return f"{user}@{socket.gethostname()}"


def rollback(store, to: int, reason: str, by: str | None = None) -> dict:
  """Moves LATEST back to base ``to`` (an ancestor of LATEST): the record written."""
  if not isinstance(reason, str) or not reason.strip():
    raise UserError("--reason is required: say why the bases are withdrawn (it is recorded).")
  if len(reason) > MAX_REASON:
    raise UserError(f"--reason is longer than {MAX_REASON} characters.")
  raw, token = store.storage.read_versioned(layout.LATEST_FILE)
  latest = store.require_latest()
  if raw is None or store._parse_latest(raw) != latest:  # pylint: disable=protected-access
    raise UserError(f"{store.uri}: LATEST moved while rolling back; nothing changed, run again.")
  chain = lineage_of(store, latest)
  if to not in chain or to == latest:
    raise UserError(f"--to={to}: not an earlier base of LATEST ({latest}); its lineage is "
                    f"{', '.join(map(str, chain))}.")
  store.manifest(to)  # complete and readable
  record = {"format_version": layout.FORMAT_VERSION, "from": latest, "to": to,
            "withdrawn": sorted(i for i in chain if i > to), "reason": reason,
            "by": by or who(),
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
  name = layout.rollback_name(latest)
  if not store.storage.create_exclusive(name, layout.json_bytes(record)):
    earlier = store.read_json(name) or {}
    if (earlier.get("from"), earlier.get("to")) != (latest, to):
      raise UserError(f"{store.uri}/{name}: a rollback from base {latest} to base "
                      f"{printable(earlier.get('to'))} is already recorded.")
    record = earlier  # an interrupted run of the same rollback: finish it
  if not store.storage.compare_and_swap(layout.LATEST_FILE, f"{to}\n".encode(), token):
    store.storage.delete_prefix(name)
    raise UserError(f"{store.uri}: LATEST moved while rolling back; nothing changed, run again.")
  return record


def records(store) -> list[dict]:
  """Every rollback record of the store, oldest first (unreadable ones as problems)."""
  out = []
  for child in store.storage.list_children(layout.ROLLBACKS):
    try:
      record = store.read_json(f"{layout.ROLLBACKS}/{child}")
    except UserError as e:
      record = {"problem": str(e)}
    if isinstance(record, dict):
      out.append({"name": child, **record})
  return out
