"""Fault injection for the fuse program: ``python tests/faults.py SPEC [fuse flags...]`` runs
``python -m cold_fusion_tf.fuse`` with its store's backend wrapped so that the process ends at
once (``os._exit(EXIT_CODE)``, no clean-up, like a kill) or pauses at a named step:

``after_plan``            right after the plan is created;
``after_state``           right after the server optimizer state is uploaded;
``after_files:<k>``       right after the k-th file of the new base is uploaded;
``after_manifest``        right after the new base's manifest is written (LATEST not moved);
``sleep_before_publish:<seconds>``  before the first file of the new base is uploaded.
"""

from __future__ import annotations

import os
import runpy
import sys
import time

EXIT_CODE = 75


class FaultyStorage:
  """Forwards to a storage backend and ends the process (or sleeps) at the step ``spec`` names."""

  def __init__(self, inner, spec: str):
    self._inner, self._spec, self._uploads, self._slept = inner, spec, 0, False
    self._name, _, self._arg = spec.partition(":")

  def __getattr__(self, name):
    return getattr(self._inner, name)

  def _end(self) -> None:
    print(f"faults: ending the process at {self._spec}", flush=True)
    os._exit(EXIT_CODE)  # pylint: disable=protected-access

  def create_exclusive(self, name, data):
    created = self._inner.create_exclusive(name, data)
    if created and self._name == "after_plan" and name.endswith("/plan.json"):
      self._end()
    return created

  def upload(self, local_path, name, move=False):
    if (self._name == "sleep_before_publish" and name.startswith("bases/")
        and not self._slept):
      self._slept = True
      time.sleep(float(self._arg))
    self._inner.upload(local_path, name, move=move)
    if self._name == "after_state" and name.endswith("/momentum.safetensors"):
      self._end()
    self._uploads += name.startswith("bases/")
    if self._spec == f"after_files:{self._uploads}":
      self._end()

  def write_bytes(self, name, data):
    self._inner.write_bytes(name, data)
    if self._name == "after_manifest" and name.endswith("/manifest.json"):
      self._end()


def main() -> None:
  spec = sys.argv.pop(1)
  from cold_fusion_tf.store import backends  # pylint: disable=g-import-not-at-top
  opener = backends.open_storage
  backends.open_storage = lambda uri: FaultyStorage(opener(uri), spec)
  sys.argv[0] = "cold_fusion_tf.fuse"
  runpy.run_module("cold_fusion_tf.fuse", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
  main()
