"""``python -m cold_fusion_tf.fuse`` as a program: killed at each step of a publish and run
again, two fusers at once, exit statuses. Tiny synthetic bodies, no TensorFlow model."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np

import pytest

import faults
import synthetic as h
from cold_fusion_tf import store as store_lib
from cold_fusion_tf.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SERVER = ("--config.fusion.server_optimizer.enabled=True",)


def _env(tmp) -> dict:
  return dict(os.environ, HF_HUB_OFFLINE="1", TF_CPP_MIN_LOG_LEVEL="2", TMPDIR=str(tmp),
              COLD_FUSION_CACHE=os.path.join(str(tmp), "cache"))


def _command(store, *flags, fault=None) -> list[str]:
  program = ["-m", "cold_fusion_tf.fuse"] if fault is None else [faults.__file__, fault]
  return [sys.executable, *program, "--config=configs/demo.py", f"--store={store.uri}", *flags]


def _fuse(tmp, store, *flags, fault=None) -> subprocess.CompletedProcess:
  return subprocess.run(_command(store, *flags, fault=fault), cwd=REPO, env=_env(tmp),
                        capture_output=True, text=True, timeout=120, check=False)


def _store_with_contributions(root, name="store") -> store_lib.Store:
  """The same inputs every time: three honest contributions and one with a NaN."""
  store = h.new_store(root, name=name)
  base = h.base_tensors(store)
  for i in range(3):
    h.contribute(store, f"c{i}", h.nudged(base, i), num_examples=100 + i)
  broken = h.nudged(base, 9)
  broken["pooler.dense.weight"][0, 0] = float("nan")
  h.contribute(store, "broken", broken)
  return store


def _digests(store, iteration: int = 1) -> dict[str, str]:
  """sha256 of every file of base ``iteration`` and of its fusion state, by relative name."""
  out = {}
  for prefix in (f"bases/{iteration:06d}", f"fusion/{iteration:06d}"):
    folder = store.storage.local_path(prefix)
    for name in sorted(os.listdir(folder)):
      with open(os.path.join(folder, name), "rb") as f:
        out[f"{prefix}/{name}"] = hashlib.sha256(f.read()).hexdigest()
  return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run of the program: the digests every other run must reproduce."""
  tmp = tmp_path_factory.mktemp("reference")
  store = _store_with_contributions(tmp)
  result = _fuse(tmp, store, *SERVER)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "published base 1: mean of 3 contribution(s) (c0, c1, c2), 1 rejected" in result.stdout
  digests = _digests(store)
  assert set(digests) == {"bases/000001/config.json", "bases/000001/manifest.json",
                          "bases/000001/model.safetensors", "bases/000001/vocab.txt",
                          "fusion/000001/momentum.safetensors", "fusion/000001/plan.json"}
  return digests


def _assert_readers_see_base_0(store) -> None:
  reader = store_lib.Store(store.uri, cache_dir=store.cache_dir)
  assert reader.latest() == 0
  assert os.path.exists(os.path.join(reader.base_dir(0), store_lib.MODEL))


@pytest.mark.parametrize("step", ["after_plan", "after_state", "after_files:1",
                                  "after_files:2", "after_manifest"])
def test_a_fusion_killed_at_any_step_reruns_to_the_same_bytes(tmp_path, reference, step):
  # Prepare
  store = _store_with_contributions(tmp_path)
  # Execute: killed at the step ...
  crashed = _fuse(tmp_path, store, *SERVER, fault=step)
  # Assert: ... it died there, and readers still see base 0 only.
  assert crashed.returncode == faults.EXIT_CODE, crashed.stdout + crashed.stderr
  assert f"ending the process at {step}" in crashed.stdout
  _assert_readers_see_base_0(store)
  if step == "after_manifest":
    assert store.manifest(1)["iteration"] == 1  # complete, but LATEST has not moved
  else:
    with pytest.raises(UserError, match="missing; base 1 is not complete"):
      store.manifest(1)
  if step == "after_plan":  # a contribution arriving now is not part of iteration 1
    h.contribute(store, "late", h.nudged(h.base_tensors(store), 5))
  # Execute: run again.
  rerun = _fuse(tmp_path, store, *SERVER)
  # Assert
  assert rerun.returncode == 0, rerun.stdout + rerun.stderr
  assert "published base 1: mean of 3 contribution(s)" in rerun.stdout
  if step == "after_plan":
    assert "following the plan in" in rerun.stdout
  assert store.latest() == 1
  assert _digests(store) == reference


def test_two_fusers_at_once_publish_exactly_one_base(tmp_path, reference):
  # Prepare: both pause before publishing, so both have planned and fused by then.
  store = _store_with_contributions(tmp_path)
  fault = "sleep_before_publish:2"
  # Execute
  processes = [subprocess.Popen(_command(store, *SERVER, fault=fault), cwd=REPO,
                                env=_env(tmp_path), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
               for _ in range(2)]
  outputs = [p.communicate(timeout=120) for p in processes]
  # Assert
  assert [p.returncode for p in processes] == [0, 0], outputs
  stdouts = [out for out, _ in outputs]
  assert sum("published base 1:" in out for out in stdouts) == 1, stdouts
  assert sum("was published by another fuser" in out for out in stdouts) == 1, stdouts
  assert store.latest() == 1
  assert store.storage.list_children("bases") == ["000000", "000001"]
  assert _digests(store) == reference
  store.base_dir(1)  # every file matches the manifest


@pytest.mark.parametrize("flags,status,words", [
    (("--config.fusion.min_contributions=5",), 1,
     "3 valid contribution(s), fewer than the 5 required; nothing published."),
    (("--watch", "--config.fusion.min_contributions=5", "--config.fusion.max_wait=0.3",
      "--config.fusion.poll_seconds=0.1"), 1,
     "waited 0.3s for contributions to iteration 0: 4 there, 5 required; nothing published."),
    (("--config.fusion.method=avg",), 2, "error: Unknown fusion method 'avg'"),
])
def test_exit_status_and_message(tmp_path, flags, status, words):
  # Prepare
  store = _store_with_contributions(tmp_path)
  # Execute
  result = _fuse(tmp_path, store, *flags)
  # Assert
  assert result.returncode == status, result.stdout + result.stderr
  assert words in result.stdout + result.stderr
  assert store.latest() == 0


@pytest.mark.parametrize("soft,hard,status", [(100, 4096, 0), (200, 200, 2)])
def test_more_contributions_than_open_files_allowed(tmp_path, soft, hard, status):
  # Prepare: 150 contributions (each body stays open while the fusion runs), and a fuser
  # whose limit on open files is below what they need: raisable (soft) or not (hard).
  import resource  # pylint: disable=g-import-not-at-top
  store = h.new_store(tmp_path)
  base = h.base_tensors(store)
  for i in range(150):
    h.contribute(store, f"c{i:03d}", h.nudged(base, i))
  # Execute
  result = subprocess.run(
      _command(store), cwd=REPO, env=_env(tmp_path), capture_output=True, text=True,
      timeout=300, check=False,
      preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)))
  # Assert: the soft limit is raised and all are fused; below the hard limit, one error line
  # that says what to raise, no contribution blamed, nothing published.
  output = result.stdout + result.stderr
  assert result.returncode == status, output
  assert "Traceback" not in output and "rejected c" not in output
  if status == 0:
    assert len(store.manifest(1)["fusion"]["contributions"]) == 150
  else:
    assert store.latest() == 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "150 contributions to validate" in errors[0]
    assert "ulimit -n" in errors[0]


def test_bodies_refused_at_their_headers_take_no_room_among_open_files(tmp_path):
  # Prepare: 150 contributions, 140 of them with a tensor of the wrong shape (refused by the
  # header check, their files closed at once), under a hard limit of 200 open files.
  import resource  # pylint: disable=g-import-not-at-top
  store = h.new_store(tmp_path)
  base = h.base_tensors(store)
  name = sorted(base)[0]
  for i in range(150):
    body = h.nudged(base, i)
    if i >= 10:
      body = {**body, name: np.zeros((1,) + body[name].shape, body[name].dtype)}
    h.contribute(store, f"c{i:03d}", body)
  # Execute
  result = subprocess.run(
      _command(store), cwd=REPO, env=_env(tmp_path), capture_output=True, text=True,
      timeout=300, check=False,
      preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (200, 200)))
  # Assert: the 10 honest ones are fused, the 140 rejected for their shape
  output = result.stdout + result.stderr
  assert result.returncode == 0, output[-3000:]
  fusion = store.manifest(1)["fusion"]
  assert len(fusion["contributions"]) == 10 and len(fusion["rejected"]) == 140


def test_method_and_parameters_from_the_command_line(tmp_path):
  # Prepare
  store = _store_with_contributions(tmp_path)
  # Execute
  result = _fuse(tmp_path, store, "--config.fusion.method=trimmed_mean",
                 "--config.fusion.params={'trim_fraction': 0.34}")
  # Assert
  assert result.returncode == 0, result.stdout + result.stderr
  section = store.manifest(1)["fusion"]
  assert section["method"] == "trimmed_mean" and section["params"] == {"trim_fraction": 0.34}
  assert [e["id"] for e in section["contributions"]] == ["c0", "c1", "c2"]
  assert [r["id"] for r in section["rejected"]] == ["broken"]
