"""Shared pytest fixtures: a GCS emulator on loopback and a parametrized Storage backend."""

from __future__ import annotations

import itertools
import os
import sys
import uuid

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gcs_emulator import GCSEmulator, loopback_no_proxy  # pylint: disable=g-import-not-at-top,wrong-import-position

# Short enough to keep failing tests quick, long enough for a busy 2-core machine.
TEST_RETRY_DEADLINE = 10.0
_bucket_counter = itertools.count()


class EmulatorHandle:
  """What the ``gcs_emulator`` fixture yields."""

  def __init__(self, emulator: GCSEmulator):
    self.emulator = emulator
    self.host = emulator.host

  def make_bucket(self, name: str | None = None) -> str:
    """Creates a bucket (a fresh unique one when ``name`` is None); returns its name."""
    if name is None:
      name = f"test-{os.getpid()}-{next(_bucket_counter)}-{uuid.uuid4().hex[:8]}"
    return self.emulator.make_bucket(name)


@pytest.fixture(scope="session")
def gcs_emulator():
  """A fake-gcs-server for the whole session, with STORAGE_EMULATOR_HOST pointing at it."""
  with pytest.MonkeyPatch.context() as mp, GCSEmulator() as emulator:
    mp.setenv("STORAGE_EMULATOR_HOST", emulator.host)
    mp.setenv("GOOGLE_CLOUD_PROJECT", "test")
    mp.setenv("NO_PROXY", loopback_no_proxy())
    yield EmulatorHandle(emulator)


@pytest.fixture(scope="session")
def gcs_test_bucket(gcs_emulator):
  """One bucket for the session; each storage_backend gets its own prefix in it."""
  return gcs_emulator.make_bucket()


@pytest.fixture(params=["local", "gcs"])
def storage_backend(request, tmp_path):
  """A fresh, empty Storage: LocalStorage in tmp_path, or GCSStorage on a fresh prefix."""
  if request.param == "local":
    from cold_fusion_tf.store.backends import LocalStorage  # pylint: disable=g-import-not-at-top
    yield LocalStorage(str(tmp_path / "store"))
    return
  from cold_fusion_tf.store.backends.gcs import GCSStorage  # pylint: disable=g-import-not-at-top
  bucket = request.getfixturevalue("gcs_test_bucket")
  yield GCSStorage.from_uri(f"gs://{bucket}/t-{uuid.uuid4().hex[:12]}", retry_deadline=TEST_RETRY_DEADLINE)
