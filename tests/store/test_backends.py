"""Storage backends: the same contract for a local directory and GCS (fake-gcs-server).

The parametrized tests run once per backend through the ``storage_backend`` fixture; the
GCS-only tests at the end cover what only a remote store has: process races on the
precondition, a server restart in the middle of an upload, memory use on a large file,
and the error messages for a missing bucket, an unreachable service, missing credentials
and missing permissions.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import pytest

from cold_fusion_tf.errors import LimitError, UserError
from cold_fusion_tf.store.backends import LocalStorage

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MiB = 1024 * 1024


def _write_random_file(path, size, block=MiB):
  """A file of ``size`` bytes that is not compressible, written block by block."""
  seed = os.urandom(block)
  with open(path, "wb") as f:
    for i in range(0, size, block):
      n = min(block, size - i)
      f.write((i.to_bytes(8, "big") + seed)[:n])


def _sha256(path):
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(MiB), b""):
      h.update(chunk)
  return h.hexdigest()


def _child_env():
  env = dict(os.environ)
  env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _reopen(store):
  """A second, independent handle on the same store (own client for GCS)."""
  if isinstance(store, LocalStorage):
    return LocalStorage(store.root)
  from cold_fusion_tf.store.backends.gcs import GCSStorage  # pylint: disable=g-import-not-at-top
  return GCSStorage.from_uri(store.uri, retry_deadline=store.retry_deadline)


# --- the shared contract ------------------------------------------------------------


def test_write_read_round_trip(storage_backend):
  # Prepare
  s = storage_backend
  # Execute
  s.write_bytes("run.json", b'{"a": 1}')
  # Assert
  assert s.read_bytes("run.json") == b'{"a": 1}'
  # Execute: a binary object in a folder
  s.write_bytes("bases/000000/config.json", bytes(range(256)))
  # Assert
  assert s.read_bytes("bases/000000/config.json") == bytes(range(256))
  # Execute
  s.write_bytes("run.json", b"")  # Overwrite, and an empty object.
  # Assert
  assert s.read_bytes("run.json") == b""
  assert s.exists("run.json")
  assert s.exists("bases/000000")  # A folder counts, as a directory does locally.


def test_missing_object(storage_backend, tmp_path):
  # Prepare
  s = storage_backend
  # Execute / Assert: reading or downloading a missing object raises
  with pytest.raises(FileNotFoundError):
    s.read_bytes("nope/manifest.json")
  with pytest.raises(FileNotFoundError):
    s.download("nope/model.safetensors", str(tmp_path / "out" / "model.safetensors"))
  # Assert
  assert not os.path.exists(tmp_path / "out" / "model.safetensors")
  assert not s.exists("nope/manifest.json")
  assert not s.exists("nope")
  # Execute
  data, token = s.read_versioned("LATEST")
  # Assert
  assert data is None
  assert s.list_children("nope") == []


def test_list_children(storage_backend):
  # Prepare: objects at several depths
  s = storage_backend
  for name in ["b/1", "a", "c/x/y", "c/z", "b/2", "bases/000001/manifest.json", "bases/000000/m"]:
    s.write_bytes(name, b"x")
  # Execute / Assert
  assert s.list_children("") == ["a", "b", "bases", "c"]
  assert s.list_children("c") == ["x", "z"]  # A folder and an object, immediate only.
  assert s.list_children("bases") == ["000000", "000001"]
  assert s.list_children("c/x") == ["y"]
  assert s.list_children("a") == []  # An object has no children.


def test_upload_download_round_trip(storage_backend, tmp_path):
  # Prepare
  s = storage_backend
  src = tmp_path / "body.safetensors"
  _write_random_file(src, 20 * MiB + 12345)  # Over 8 MiB: a resumable upload on GCS.
  # Execute
  s.upload(str(src), "contributions/000003/alice/body.safetensors")
  out = tmp_path / "dl" / "deeper" / "body.safetensors"
  s.download("contributions/000003/alice/body.safetensors", str(out))
  # Assert
  assert out.stat().st_size == src.stat().st_size
  assert _sha256(out) == _sha256(src)
  assert not os.path.exists(str(out) + ".partial")
  # Execute: a small object, uploaded then downloaded over the file above
  small = tmp_path / "small.json"
  small.write_bytes(b"{}")
  s.upload(str(small), "contributions/000003/alice/contribution.json")
  # Assert
  assert s.read_bytes("contributions/000003/alice/contribution.json") == b"{}"
  assert s.list_children("contributions/000003/alice") == ["body.safetensors", "contribution.json"]
  # Execute
  s.download("contributions/000003/alice/contribution.json", str(out))  # Replaces a file.
  # Assert
  assert out.read_bytes() == b"{}"


def test_upload_with_move_links_or_copies(storage_backend, tmp_path, monkeypatch):
  # Prepare
  src = tmp_path / "staged.bin"
  src.write_bytes(b"fused bytes")
  # Execute: move=True on the same filesystem, then with links failing across devices.
  storage_backend.upload(str(src), "bases/000001/model.safetensors", move=True)
  assert storage_backend.read_bytes("bases/000001/model.safetensors") == b"fused bytes"
  if isinstance(storage_backend, LocalStorage):
    stored = storage_backend.local_path("bases/000001/model.safetensors")
    assert os.stat(stored).st_ino == os.stat(src).st_ino  # moved, not copied
    assert not [n for n in os.listdir(os.path.dirname(stored)) if n.startswith(".tmp-")]

    def cross_device(a, b):
      raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    storage_backend.upload(str(src), "bases/000002/model.safetensors", move=True)
    copied = storage_backend.local_path("bases/000002/model.safetensors")
    assert os.stat(copied).st_ino != os.stat(src).st_ino
    assert storage_backend.read_bytes("bases/000002/model.safetensors") == b"fused bytes"


def test_download_this_machine_cannot_save_is_a_limit_error(storage_backend, tmp_path):
  # Prepare: an object, and a download target under a file (this machine's side fails)
  s = storage_backend
  s.write_bytes("contributions/000001/alice/body.safetensors", b"x" * 1000)
  blocker = tmp_path / "not_a_folder"
  blocker.write_bytes(b"")
  # Execute
  with pytest.raises(LimitError) as error:
    s.download("contributions/000001/alice/body.safetensors", str(blocker / "body.safetensors"))
  # Assert: the object is not blamed (a LimitError), the message names the target
  assert "cannot" in str(error.value) and "not_a_folder" in str(error.value)
  assert sorted(os.listdir(tmp_path)) == sorted(["not_a_folder"] + (["store"] if
                                                 isinstance(s, LocalStorage) else []))


def test_a_local_folder_that_cannot_be_listed_is_a_limit_error(tmp_path, monkeypatch):
  # Prepare: a folder the system refuses to list (simulated: the tests run as root, whom
  # permissions do not stop)
  s = LocalStorage(str(tmp_path / "store"))
  s.write_bytes("contributions/000001/alice/contribution.json", b"{}")
  real_listdir = os.listdir

  def listdir(path):
    if path.endswith("000001"):
      raise PermissionError(13, "Permission denied", path)
    return real_listdir(path)

  monkeypatch.setattr(os, "listdir", listdir)
  # Execute
  with pytest.raises(LimitError) as error:
    s.list_children("contributions/000001")
  # Assert: the store's fault, said in one line that names the folder
  assert "contributions/000001: cannot list it (Permission denied" in str(error.value)


def test_create_exclusive(storage_backend):
  # Prepare
  s = storage_backend
  # Execute / Assert: the first create wins and a second one changes nothing
  assert s.create_exclusive("runs/lock", b"first") is True
  assert s.create_exclusive("runs/lock", b"second") is False
  assert s.read_bytes("runs/lock") == b"first"
  assert s.list_children("runs") == ["lock"]  # No temporary files left behind.


def test_compare_and_swap(storage_backend):
  # Prepare
  s = storage_backend
  # Execute / Assert: a swap succeeds only with the current token
  data, token0 = s.read_versioned("LATEST")
  assert data is None
  assert s.compare_and_swap("LATEST", b"000000", token0) is True
  assert s.read_bytes("LATEST") == b"000000"
  assert s.compare_and_swap("LATEST", b"999999", token0) is False  # Stale: it exists now.
  data, token1 = s.read_versioned("LATEST")
  assert data == b"000000"
  assert s.compare_and_swap("LATEST", b"000001", token1) is True
  assert s.compare_and_swap("LATEST", b"000002", token1) is False  # Stale token.
  data, token2 = s.read_versioned("LATEST")
  assert data == b"000001"
  assert s.list_children("") == ["LATEST"]


def test_concurrent_compare_and_swap_threads(storage_backend):
  # Prepare: two handles on one store
  stores = [storage_backend, _reopen(storage_backend)]
  storage_backend.write_bytes("LATEST", b"000000")
  # Execute / Assert: in each round two threads swap at once and exactly one wins
  for round_ in range(4):
    barrier = threading.Barrier(2)
    results = [None, None]
    errors = []

    def contend(i):
      try:
        _, token = stores[i].read_versioned("LATEST")
        barrier.wait(timeout=30)
        results[i] = stores[i].compare_and_swap("LATEST", f"r{round_}-w{i}".encode(), token)
      except Exception as e:  # pylint: disable=broad-except
        errors.append(e)
        barrier.abort()

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(2)]
    for t in threads:
      t.start()
    for t in threads:
      t.join(60)
    assert not errors
    assert sorted(results) == [False, True], results
    winner = results.index(True)
    assert storage_backend.read_bytes("LATEST") == f"r{round_}-w{winner}".encode()


def test_delete_prefix(storage_backend):
  # Prepare
  s = storage_backend
  for name in ["contributions/000003/a/body", "contributions/000003/a/x/y",
               "contributions/000003/ab/body", "contributions/000003/b", "keep"]:
    s.write_bytes(name, b"x")
  # Execute
  s.delete_prefix("contributions/000003/a")
  # Assert
  assert s.list_children("contributions/000003") == ["ab", "b"]  # Not "a*" siblings.
  assert not s.exists("contributions/000003/a/body")
  assert not s.exists("contributions/000003/a")
  # Execute
  s.delete_prefix("contributions/000003/b")  # A single object.
  # Assert
  assert s.list_children("contributions/000003") == ["ab"]
  # Execute
  s.delete_prefix("does/not/exist")  # No error.
  s.delete_prefix("contributions")
  # Assert
  assert s.list_children("") == ["keep"]


@pytest.mark.parametrize("bad", ["../x", "a/../b", "..", "a//b", "/a", "a/", "./a", "a/.",
                                 "a b", "a\nb", "a/\x00"])
def test_bad_names_rejected(storage_backend, bad, tmp_path):
  # Prepare
  s = storage_backend
  local = tmp_path / "f"
  local.write_bytes(b"x")
  calls = [
      lambda: s.read_bytes(bad),
      lambda: s.write_bytes(bad, b"x"),
      lambda: s.exists(bad),
      lambda: s.list_children(bad),
      lambda: s.download(bad, str(tmp_path / "out")),
      lambda: s.upload(str(local), bad),
      lambda: s.create_exclusive(bad, b"x"),
      lambda: s.read_versioned(bad),
      lambda: s.compare_and_swap(bad, b"x", s.read_versioned("ok")[1]),
      lambda: s.delete_prefix(bad),
  ]
  # Execute / Assert: every operation rejects the name
  for call in calls:
    with pytest.raises(UserError):
      call()
  # Assert: nothing was written
  assert s.list_children("") == []


# --- GCS only -----------------------------------------------------------------------

_RACE_CHILD = textwrap.dedent("""
    import sys
    from cold_fusion_tf.store.backends.gcs import GCSStorage
    uri, me, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
    s = GCSStorage.from_uri(uri, retry_deadline=20)
    def ready_then_wait(what):
      print("ready", what, flush=True)
      assert sys.stdin.readline().strip() == "go"
    for r in range(rounds):
      ready_then_wait("create")
      won = s.create_exclusive(f"r{r}/LATEST", f"{me}-create".encode())
      _, token = s.read_versioned(f"r{r}/LATEST")
      ready_then_wait("cas")
      print("won create", r, int(won), flush=True)
      won = s.compare_and_swap(f"r{r}/LATEST", f"{me}-cas".encode(), token)
      print("won cas", r, int(won), flush=True)
    print("done", flush=True)
""")


def test_gcs_processes_race_on_latest(gcs_emulator):
  """Two processes released together: one create and one compare-and-swap win per round."""
  # Prepare: two child processes that race on the same objects
  from cold_fusion_tf.store.backends.gcs import GCSStorage  # pylint: disable=g-import-not-at-top
  bucket = gcs_emulator.make_bucket()
  uri = f"gs://{bucket}/race"
  rounds = 5
  names = ("p0", "p1")
  procs = [
      subprocess.Popen([sys.executable, "-c", _RACE_CHILD, uri, me, str(rounds)],
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_child_env())
      for me in names
  ]
  wins = {}

  def read_until_ready(proc, who):
    while True:
      line = proc.stdout.readline()
      assert line, f"child {who} exited early with {proc.wait()}"
      words = line.split()
      if words[0] == "ready" or words[0] == "done":
        return
      if words[0] == "won":
        wins.setdefault((words[1], int(words[2])), {})[who] = words[3] == "1"

  # Execute: release both children together, round after round
  try:
    for _ in range(2 * rounds):
      for p, who in zip(procs, names):
        read_until_ready(p, who)  # Both are ready (both tokens read) ...
      for p in procs:  # ... then both are released at once.
        p.stdin.write("go\n")
        p.stdin.flush()
    for p, who in zip(procs, names):
      read_until_ready(p, who)
      assert p.wait(timeout=60) == 0
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  # Assert: one winner per round, and LATEST holds the swap's winner
  s = GCSStorage.from_uri(uri, retry_deadline=20)
  for r in range(rounds):
    create, cas = wins[("create", r)], wins[("cas", r)]
    assert sorted(create.values()) == [False, True], create
    assert sorted(cas.values()) == [False, True], cas  # Both held the same generation.
    winner = [who for who, won in cas.items() if won][0]
    assert s.read_bytes(f"r{r}/LATEST") == f"{winner}-cas".encode()


@pytest.fixture
def private_emulator(monkeypatch):
  """An emulator of this test's own (it gets stopped), with STORAGE_EMULATOR_HOST set."""
  from gcs_emulator import GCSEmulator, loopback_no_proxy  # pylint: disable=g-import-not-at-top
  with GCSEmulator() as emulator:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.host)
    monkeypatch.setenv("NO_PROXY", loopback_no_proxy())
    yield emulator


def _gcs_upload_with_kill(emulator, monkeypatch, tmp_path, restart_after):
  """Uploads 40 MiB as a resumable upload; the emulator is killed after the 2nd chunk.

  ``restart_after``: seconds until the emulator comes back, or None for never.
  Returns (storage, exception or None, source path, seconds taken).
  """
  from google.cloud.storage._media.requests import upload as media_upload  # pylint: disable=g-import-not-at-top
  from cold_fusion_tf.store.backends.gcs import GCSStorage  # pylint: disable=g-import-not-at-top

  bucket = emulator.make_bucket("restart-bucket")
  s = GCSStorage.from_uri(f"gs://{bucket}/run", retry_deadline=6.0)
  src = tmp_path / "body.safetensors"
  _write_random_file(src, 40 * MiB)

  original = media_upload.ResumableUpload.transmit_next_chunk
  chunks = []

  def transmit_next_chunk(self, *args, **kwargs):
    chunks.append(1)
    if len(chunks) == 3:  # Two chunks are in; the server dies before the third.
      emulator.stop()
      if restart_after is not None:
        threading.Timer(restart_after, emulator.restart).start()
    return original(self, *args, **kwargs)

  monkeypatch.setattr(media_upload.ResumableUpload, "transmit_next_chunk", transmit_next_chunk)
  t0 = time.monotonic()
  error = None
  try:
    s.upload(str(src), "contributions/000001/c/body.safetensors")
  except Exception as e:  # pylint: disable=broad-except
    error = e
  took = time.monotonic() - t0
  monkeypatch.setattr(media_upload.ResumableUpload, "transmit_next_chunk", original)
  assert len(chunks) >= 3, "the emulator was never stopped mid-upload"
  return s, error, src, took


def test_gcs_server_restart_mid_upload_recovers(private_emulator, monkeypatch, tmp_path):
  """The server dies mid-upload and comes back (losing the upload session): the upload
  retries, starts over in a new session and succeeds."""
  # Execute
  s, error, src, _ = _gcs_upload_with_kill(private_emulator, monkeypatch, tmp_path, restart_after=1.0)
  # Assert
  assert error is None, repr(error)
  out = tmp_path / "out"
  s.download("contributions/000001/c/body.safetensors", str(out))
  assert _sha256(out) == _sha256(src)


def test_gcs_server_down_for_good_fails_cleanly(private_emulator, monkeypatch, tmp_path):
  """The server dies mid-upload and stays down: a clear error within the retry deadline,
  and once it is back no half-written object is visible."""
  # Execute
  s, error, _, took = _gcs_upload_with_kill(private_emulator, monkeypatch, tmp_path, restart_after=None)
  # Assert
  assert isinstance(error, UserError), repr(error)
  assert "did not answer" in str(error) and "COLD_FUSION_GCS_RETRY_DEADLINE" in str(error)
  assert took < s.retry_deadline + 20
  # Execute: the server comes back
  private_emulator.restart()
  # Assert
  assert not s.exists("contributions/000001/c/body.safetensors")
  assert s.list_children("") == []


_RSS_CHILD = textwrap.dedent("""
    import os, resource, sys
    from cold_fusion_tf.store.backends.gcs import GCSStorage
    uri, src, dst = sys.argv[1:4]
    s = GCSStorage.from_uri(uri, retry_deadline=30)
    # Warm up imports and the connection pool with a small file, so they do not count as
    # growth; the upload chunk buffer does count.
    warm = src + ".warm"
    with open(warm, "wb") as f:
      f.write(os.urandom(4096))
    s.upload(warm, "warm")
    s.download("warm", warm)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    s.upload(src, "big/model.safetensors")
    s.download("big/model.safetensors", dst)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) * 1024)  # ru_maxrss is in KiB on Linux.
""")


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss units differ off Linux")
def test_gcs_large_file_streams_without_holding_it_in_memory(gcs_emulator, tmp_path):
  # Prepare: a 100 MiB file
  bucket = gcs_emulator.make_bucket()
  src, dst = tmp_path / "big.bin", tmp_path / "dl" / "big.bin"
  size = 100 * MiB + 7
  _write_random_file(src, size)
  # Execute
  proc = subprocess.run(
      [sys.executable, "-c", _RSS_CHILD, f"gs://{bucket}/rss", str(src), str(dst)],
      capture_output=True, text=True, env=_child_env(), timeout=120, check=False)
  # Assert
  assert proc.returncode == 0, proc.stderr
  growth = int(proc.stdout.strip().splitlines()[-1])
  assert dst.stat().st_size == size
  assert _sha256(dst) == _sha256(src)
  # Uploads hold one 8 MiB chunk (plus a copy or two in the HTTP stack), downloads stream
  # in small pieces: about 16 MiB measured. One in-memory copy of the file would be 100 MiB.
  assert growth < 40 * MiB, f"peak RSS grew by {growth / MiB:.1f} MiB for a {size / MiB:.0f} MiB file"


def test_gcs_missing_bucket_is_a_user_error(gcs_emulator):
  # Prepare
  from cold_fusion_tf.store.backends.gcs import GCSStorage  # pylint: disable=g-import-not-at-top
  # Execute
  with pytest.raises(UserError) as e:
    GCSStorage.from_uri("gs://no-such-bucket-xyz/run", retry_deadline=5)
  # Assert
  assert "no-such-bucket-xyz" in str(e.value)
  assert "does not exist" in str(e.value)


def test_gcs_open_storage_dispatches(gcs_emulator):
  # Prepare
  from cold_fusion_tf.store.backends.gcs import GCSStorage  # pylint: disable=g-import-not-at-top
  from cold_fusion_tf.store.backends import open_storage  # pylint: disable=g-import-not-at-top
  bucket = gcs_emulator.make_bucket()
  # Execute
  s = open_storage(f"gs://{bucket}/a/b/")
  # Assert
  assert isinstance(s, GCSStorage)
  assert (s.bucket_name, s.prefix, s.uri) == (bucket, "a/b", f"gs://{bucket}/a/b")
  # Execute: an object under the prefix, listed from the bucket's root
  s.write_bytes("x", b"1")
  # Assert
  assert open_storage(f"gs://{bucket}").list_children("a") == ["b"]


def test_gcs_unreachable_host_fails_within_deadline(monkeypatch):
  # Prepare: an emulator address where nobody listens
  from cold_fusion_tf.store.backends import gcs as gcs_storage  # pylint: disable=g-import-not-at-top
  from gcs_emulator import free_port  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{free_port()}")  # Nobody listens.
  monkeypatch.setenv(gcs_storage.RETRY_DEADLINE_ENV, "2")
  # Execute
  t0 = time.monotonic()
  with pytest.raises(UserError) as e:
    gcs_storage.GCSStorage.from_uri("gs://some-bucket/run")
  # Assert
  assert time.monotonic() - t0 < 15
  assert "did not answer" in str(e.value) and "STORAGE_EMULATOR_HOST" in str(e.value)


@pytest.mark.parametrize("uri", [
    "gs://ab/run", "gs://Upper/run", "gs://-bad/run", "gs://bad-/run", "gs://a..b/run",
    "gs://192.168.1.1/run", "gs://googlebucket/run", "gs://my-google-bucket/run", "gs:///run",
    "gs://" + "a" * 64 + "/run", "gs://ok-bucket/../run", "gs://ok-bucket/a//b",
    "gs://ok-bucket/a b", "gs://ok_bucket/x/../../y",
])
def test_gcs_bad_uri_rejected_before_any_request(uri, monkeypatch):
  # Prepare
  from cold_fusion_tf.store.backends.gcs import GCSStorage  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")  # Would fail slowly if used.
  # Execute / Assert
  with pytest.raises(UserError):
    GCSStorage.from_uri(uri, retry_deadline=30)


def test_gcs_bucket_name_rules_accept_valid_names():
  # Prepare
  from cold_fusion_tf.store.backends.gcs import check_bucket_name, parse_gcs_uri  # pylint: disable=g-import-not-at-top
  # Execute / Assert
  for name in ["abc", "my-bucket_1", "a.b.c", "x" * 63, ".".join(["y" * 63] * 3)]:
    assert check_bucket_name(name) == name
  assert parse_gcs_uri("gs://my-bucket") == ("my-bucket", "")
  assert parse_gcs_uri("gs://my-bucket/a/b/") == ("my-bucket", "a/b")


def test_gcs_missing_credentials_is_a_user_error(monkeypatch, tmp_path):
  # Prepare
  from cold_fusion_tf.store.backends.gcs import GCSStorage  # pylint: disable=g-import-not-at-top
  monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
  monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing-key.json"))
  # Execute
  with pytest.raises(UserError) as e:
    GCSStorage.from_uri("gs://some-bucket/run", retry_deadline=2)
  # Assert
  assert "gcloud auth application-default login" in str(e.value)


def test_gcs_permission_denied_is_a_user_error():
  # Prepare
  from google.api_core import exceptions as api_exceptions  # pylint: disable=g-import-not-at-top
  from cold_fusion_tf.store.backends.gcs import GCSStorage  # pylint: disable=g-import-not-at-top

  class ForbiddenClient:  # The emulator has no IAM: stand in for a 403 from GCS.
    def bucket(self, name):
      return name

    def list_blobs(self, *args, **kwargs):
      raise api_exceptions.Forbidden("caller does not have storage.objects.list access")

  # Execute
  with pytest.raises(UserError) as e:
    GCSStorage("team-bucket", "run", client=ForbiddenClient(), retry_deadline=2)
  # Assert
  assert "Permission denied" in str(e.value)
  assert "roles/storage.objectAdmin" not in str(e.value) and "gs://team-bucket" in str(e.value)
  assert "roles/storage.objectCreator" in str(e.value)


def test_gcs_retried_conditional_write_that_landed_counts_as_won(gcs_emulator, monkeypatch):
  """A 412 caused by our own earlier attempt (response lost, request retried) is a win."""
  # Prepare: every write uses the same write id
  from cold_fusion_tf.store.backends import gcs as gcs_storage  # pylint: disable=g-import-not-at-top
  bucket = gcs_emulator.make_bucket()
  s = gcs_storage.GCSStorage.from_uri(f"gs://{bucket}/w", retry_deadline=5)
  fixed = uuid.uuid4()
  monkeypatch.setattr(gcs_storage.uuid, "uuid4", lambda: fixed)
  # Execute / Assert: a retry of a write that landed counts as won
  assert s.create_exclusive("LATEST", b"000000") is True
  # Same write id again = what a retry of the same call sees after its first try landed.
  assert s.create_exclusive("LATEST", b"000000") is True
  # Execute / Assert: with a new write id, the object is someone else's
  monkeypatch.undo()
  assert s.create_exclusive("LATEST", b"000000") is False  # Someone else's object.


# --- local only: writes the system refuses -------------------------------------------


@pytest.mark.parametrize("root,reason", [
    ("/proc/nope/store", "No such file or directory: /proc/nope"),
    ("{file}/store", "Not a directory"),
])
def test_local_writes_the_system_refuses_are_user_errors(root, reason, tmp_path):
  # Prepare: a store folder that cannot be created
  (tmp_path / "file").write_text("a regular file\n")
  s = LocalStorage(root.format(file=tmp_path / "file"))
  (tmp_path / "body.bin").write_bytes(b"body")
  writes = [lambda: s.write_bytes("run.json", b"{}"),
            lambda: s.create_exclusive("LATEST", b"0\n"),
            lambda: s.compare_and_swap("LATEST", b"0\n", None),
            lambda: s.upload(str(tmp_path / "body.bin"), "bases/000000/model.safetensors"),
            lambda: s.upload(str(tmp_path / "body.bin"), "bases/000000/x.bin", move=True),
            lambda: s.upload_exclusive(str(tmp_path / "body.bin"), "contributions/a/b")]
  for write in writes:
    # Execute / Assert: one UserError naming the store, the object and the system's reason
    with pytest.raises(UserError, match="cannot write it into the store") as raised:
      write()
    assert str(raised.value).startswith(s.uri + "/") and reason in str(raised.value)
  # Execute / Assert: the up-front check says the same without writing anything
  with pytest.raises(UserError, match=f"--store=x: cannot create files there .*{reason}"):
    s.check_writable("--store=x")
  assert sorted(os.listdir(tmp_path)) == ["body.bin", "file"]


def test_a_full_disk_is_a_limit_error_and_leaves_no_staged_file(tmp_path, monkeypatch):
  # Prepare: a store whose disk fills up while an object is written
  from cold_fusion_tf.errors import LimitError  # pylint: disable=g-import-not-at-top
  s = LocalStorage(str(tmp_path / "store"))
  s.write_bytes("run.json", b"{}")

  def full(fd):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(os, "fsync", full)
  # Execute / Assert
  with pytest.raises(LimitError, match=r"store/LATEST: cannot write it into the store \(No "
                     "space left on device\\)"):
    s.write_bytes("LATEST", b"0\n")
  # Assert: nothing half-written
  assert sorted(os.listdir(tmp_path / "store")) == ["run.json"]


def test_check_writable_leaves_nothing_behind(tmp_path):
  # Prepare: a store two folders below an existing one, and one in an existing folder
  new = LocalStorage(str(tmp_path / "a" / "b" / "store"))
  (tmp_path / "old").mkdir()
  old = LocalStorage(str(tmp_path / "old"))
  # Execute
  new.check_writable("--store=new")
  old.check_writable("--store=old")
  # Assert: the folders made for the test, and the probe files, are gone
  assert sorted(os.listdir(tmp_path)) == ["old"] and os.listdir(tmp_path / "old") == []


def test_local_objects_are_ordinary_files_others_may_read(tmp_path):
  # Prepare: the usual umask (others may read what this user creates).
  previous = os.umask(0o022)
  storage = LocalStorage(str(tmp_path / "store"))
  source = tmp_path / "source"
  source.write_bytes(b"body")
  try:
    # Execute
    storage.write_bytes("LATEST", b"0\n")
    storage.create_exclusive("contributions/000000/a/contribution.json", b"{}")
    storage.upload(str(source), "bases/000000/model.safetensors")
  finally:
    os.umask(previous)
  # Assert: readable by the store's other users (contributors, fusers, readers), as a file
  # copied by hand would be, not private to whoever wrote it.
  for name in ("LATEST", "contributions/000000/a/contribution.json",
               "bases/000000/model.safetensors"):
    assert os.stat(storage.local_path(name)).st_mode & 0o777 == 0o644, name
