"""Where base 0 comes from: a hub name without a network is read from the Hugging Face cache,
or refused at once with one error line; the hub client's own code path, its cache layout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

import tiny
from cold_fusion_tf.model import sources

UNREACHABLE = "https://hub.invalid"  # .invalid never resolves (RFC 2606)


def _cache_with(model_dir: str, cache: str, repo: str) -> None:
  """The Hugging Face cache layout of a downloaded ``repo`` holding ``model_dir``'s files."""
  folder = os.path.join(cache, "models--" + repo.replace("/", "--"))
  os.makedirs(os.path.join(folder, "refs"))
  with open(os.path.join(folder, "refs", "main"), "w") as f:
    f.write("0" * 40)
  shutil.copytree(model_dir, os.path.join(folder, "snapshots", "0" * 40))


def _init(tmp_path, source: str, cache: str) -> subprocess.CompletedProcess:
  env = tiny.env(HF_ENDPOINT=UNREACHABLE, HF_HUB_CACHE=cache)
  env.pop("HF_HUB_OFFLINE")
  return subprocess.run([sys.executable, "-m", "cold_fusion_tf.init", "--config=demo",
                         f"--store={tmp_path / 'store'}", f"--config.model.source={source}"],
                        cwd=tiny.REPO, env=env, capture_output=True, text=True, timeout=300)


def test_a_hub_name_without_network_is_read_from_the_cache(tmp_path):
  # Prepare: a tiny model in the cache as the hub client leaves a download, no network.
  cache = str(tmp_path / "cache")
  _cache_with(tiny.write_tiny_base(str(tmp_path / "tiny")), cache, "someone/tiny-bert")
  # Execute
  result = _init(tmp_path, "someone/tiny-bert", cache)
  # Assert: base 0 published from the cached files, no retries printed.
  assert result.returncode == 0, result.stderr[-3000:]
  assert os.path.exists(tmp_path / "store" / "bases" / "000000" / "model.safetensors")
  assert "Retrying" not in result.stderr


def test_a_hub_name_neither_cached_nor_reachable_fails_at_once(tmp_path):
  # Prepare
  cache = str(tmp_path / "cache")
  os.makedirs(cache)
  # Execute
  start = time.monotonic()
  result = _init(tmp_path, "someone/not-cached", cache)
  elapsed = time.monotonic() - start
  # Assert: one error line that says what to do, nothing written, no half-minute of retries.
  assert result.returncode == 2, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and "Traceback" not in result.stderr
  assert "not in the Hugging Face cache" in errors[0] and "hub.invalid cannot be reached" in errors[0]
  assert "Retrying" not in result.stderr and not os.path.exists(tmp_path / "store")
  assert elapsed < 25  # the hub client's retries alone took 31 s


def test_a_local_folder_or_offline_mode_never_probes_the_network(tmp_path, monkeypatch):
  # Prepare: a resolver that fails the test if it is asked anything.
  def no_lookup(*args, **kwargs):
    raise AssertionError(f"the network was probed: {args}")
  monkeypatch.setattr(sources.socket, "getaddrinfo", no_lookup)
  # Execute / Assert
  assert sources.local_files_only(str(tmp_path)) is False
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  assert sources.local_files_only("someone/anything") is False
  monkeypatch.delenv("HF_HUB_OFFLINE")
  with pytest.raises(AssertionError, match="the network was probed"):
    sources.local_files_only("someone/anything")
