"""A store in Google Cloud Storage: ``gs://bucket/prefix`` on google-cloud-storage.

Same semantics as :class:`~cold_fusion_tf.store.backends.local.LocalStorage`, mapped onto GCS:

- Object ``name`` lives at ``<prefix>/<name>`` in the bucket. A "folder" is any name that
  has objects under ``<name>/``.
- A single-object upload is atomic in GCS (simple, multipart or resumable): readers see
  the old object or the new one, never a part.
- ``create_exclusive`` and ``compare_and_swap`` are uploads with an ``if_generation_match``
  precondition (0 = "must not exist"); the version token is the object's generation.
- Every request is retried with exponential back-off on transient errors (429, 408, 5xx,
  connection resets, timeouts) up to a deadline: ``retry_deadline`` seconds, default
  ``$COLD_FUSION_GCS_RETRY_DEADLINE`` or 120. Conditional writes are safe to retry (the
  precondition makes them idempotent); a retried write that already landed shows up as a
  412, which is told apart from a lost race by a random write id kept in the object's
  metadata.
- Credentials: Application Default Credentials. With ``STORAGE_EMULATOR_HOST`` set (tests,
  fake-gcs-server) the client talks to the emulator with anonymous credentials.
- Missing credentials, a missing bucket, missing permissions and an unreachable service
  become :class:`GCSError` (a :class:`UserError`) with one message saying what to do. The
  bucket is checked once at construction, so these come before any work.

A ``GCSStorage`` holds one ``storage.Client``; use one instance per process (do not carry
one across ``fork``). Separate instances may be used from separate threads.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import tempfile
import time
import uuid
from typing import Iterator, Optional, Union

import google.auth
from google.api_core import exceptions as api_exceptions
from google.auth import credentials as auth_credentials
from google.auth import exceptions as auth_exceptions
from google.cloud import storage
from google.cloud.storage import retry as storage_retry

from cold_fusion_tf.errors import LimitError, UserError
from cold_fusion_tf.store.paths import check_object_name
from cold_fusion_tf.store.backends.base import ObjectInfo, Storage
from cold_fusion_tf.store.backends.local import os_reason, remove_quietly

RETRY_DEADLINE_ENV = "COLD_FUSION_GCS_RETRY_DEADLINE"
"""Environment variable: seconds to keep retrying one GCS operation on transient errors."""

DEFAULT_RETRY_DEADLINE = 120.0
DEFAULT_CHUNK_SIZE = 8 * 1024 * 1024  # Resumable upload chunk (a multiple of 256 KiB).
DEFAULT_TIMEOUT = (15.0, 120.0)  # Per request: (connect, read) seconds.
EMULATOR_ENV = "STORAGE_EMULATOR_HOST"

_WRITE_ID_KEY = "cold-fusion-write-id"
_SCOPES = ("https://www.googleapis.com/auth/devstorage.read_write",)
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*[a-z0-9]$")

Timeout = Union[float, tuple[float, float]]


class GCSError(LimitError):
  """A GCS failure the person running the program has to act on (credentials, bucket,
  permissions, network); the message says what to do. Not the fault of the object asked for:
  the fuser rejects no contribution for it, it stops."""


def parse_gcs_uri(uri: str) -> tuple[str, str]:
  """``gs://bucket/a/b`` -> ``("bucket", "a/b")``, validated; the prefix may be empty."""
  if not uri.startswith("gs://"):
    raise UserError(f"{uri!r} is not a GCS URI: expected gs://bucket/prefix.")
  bucket, _, prefix = uri[len("gs://"):].partition("/")
  check_bucket_name(bucket)
  prefix = prefix.rstrip("/")
  try:
    check_object_name(prefix)
  except UserError as e:
    raise UserError(f"Bad store URI {uri!r}: {e}") from None
  return bucket, prefix


def check_bucket_name(name: str) -> str:
  """Returns ``name`` if it follows the GCS bucket naming rules, else raises UserError."""
  problem = None
  if not 3 <= len(name) <= 222:
    problem = "it must be 3 to 63 characters long (up to 222 with dots)"
  elif not _BUCKET_RE.match(name):
    problem = ("use only lowercase letters, digits, '-', '_' and '.', starting and ending "
               "with a letter or digit")
  elif "." not in name and len(name) > 63:
    problem = "it must be at most 63 characters long without dots"
  elif any(not 1 <= len(part) <= 63 for part in name.split(".")):
    problem = "each dot-separated part must be 1 to 63 characters long"
  elif _is_ipv4(name):
    problem = "it must not be an IP address"
  elif name.startswith("goog") or "google" in name or "g00gle" in name:
    problem = "it must not start with 'goog' or contain 'google'"
  if problem:
    raise UserError(f"Bucket name {name!r} is not valid: {problem}.")
  return name


def _is_ipv4(name: str) -> bool:
  try:
    ipaddress.IPv4Address(name)
    return True
  except ValueError:
    return False


def _retry_deadline_from_env() -> float:
  raw = os.environ.get(RETRY_DEADLINE_ENV, "")
  if not raw:
    return DEFAULT_RETRY_DEADLINE
  try:
    value = float(raw)
  except ValueError:
    value = -1.0
  if not value > 0:
    raise UserError(f"{RETRY_DEADLINE_ENV}={raw!r} is not valid: expected a positive number of seconds.")
  return value


def make_client() -> storage.Client:
  """A storage client: the emulator when ``STORAGE_EMULATOR_HOST`` is set, else ADC."""
  if os.environ.get(EMULATOR_ENV):
    project = os.environ.get("GOOGLE_CLOUD_PROJECT") or "test"
    return storage.Client(project=project, credentials=auth_credentials.AnonymousCredentials())
  try:
    credentials, project = google.auth.default(scopes=_SCOPES)
  except auth_exceptions.DefaultCredentialsError as e:
    raise GCSError(
        "No Google Cloud credentials found for the gs:// store. On a workstation run "
        "`gcloud auth application-default login`; on a VM or TPU VM attach a service account; "
        "or set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file. "
        f"(Details: {e})"
    ) from None
  # Object operations need no project; None avoids a failure when none is configured.
  return storage.Client(project=project or None, credentials=credentials)


class GCSStorage(Storage):
  """A store under ``gs://<bucket>/<prefix>``."""

  def __init__(
      self,
      bucket: str,
      prefix: str = "",
      *,
      client: Optional[storage.Client] = None,
      retry_deadline: Optional[float] = None,
      timeout: Timeout = DEFAULT_TIMEOUT,
      chunk_size: int = DEFAULT_CHUNK_SIZE,
      check_bucket: bool = True,
  ):
    check_bucket_name(bucket)
    prefix = prefix.strip("/")
    check_object_name(prefix)
    if chunk_size <= 0 or chunk_size % (256 * 1024):
      raise ValueError(f"chunk_size must be a positive multiple of 256 KiB, got {chunk_size}")
    self.bucket_name = bucket
    self.prefix = prefix
    self.uri = f"gs://{bucket}/{prefix}" if prefix else f"gs://{bucket}"
    self.retry_deadline = float(retry_deadline) if retry_deadline is not None else _retry_deadline_from_env()
    self._retry = storage_retry.DEFAULT_RETRY.with_timeout(self.retry_deadline).with_delay(
        initial=0.5, maximum=30.0, multiplier=2.0)
    self._timeout = timeout
    self._chunk_size = chunk_size
    self._client = client if client is not None else make_client()
    self._bucket = self._client.bucket(bucket)
    if check_bucket:
      self.check_access()

  @classmethod
  def from_uri(cls, uri: str, **kwargs) -> "GCSStorage":
    """``gs://bucket/prefix`` -> a checked GCSStorage (keyword arguments as in __init__)."""
    bucket, prefix = parse_gcs_uri(uri)
    return cls(bucket, prefix, **kwargs)

  # --- names and errors -------------------------------------------------------------

  def _key(self, name: str) -> str:
    """Full object name of a (checked) relative name; the prefix itself for ""."""
    check_object_name(name)
    if not name:
      return self.prefix
    return f"{self.prefix}/{name}" if self.prefix else name

  def _object_key(self, name: str) -> str:
    key = self._key(name)
    if not name:
      raise IsADirectoryError(f"{self.uri}: the store root is not an object")
    return key

  def _folder(self, name: str) -> str:
    """The listing prefix for the children of ``name`` ("" for the bucket root)."""
    key = self._key(name)
    return key + "/" if key else ""

  def _where(self, name: str) -> str:
    return f"{self.uri}/{name}" if name else self.uri

  @contextlib.contextmanager
  def _errors(self, action: str, name: str = "") -> Iterator[None]:
    """Turns auth, permission, bucket and network failures into GCSError."""
    where = self._where(name)
    try:
      yield
    except api_exceptions.Forbidden as e:
      raise GCSError(
          f"Permission denied to {action} {where} ({_short(e)}). Check the bucket name (bucket "
          "names are global: a typo can hit someone else's bucket), then ask the store's owner "
          "for the role of your part (see 'Bucket access layout' in the README): "
          "roles/storage.objectViewer to read; for a contributor, roles/storage.objectCreator "
          "limited to its own contributions/ prefix; roles/storage.objectUser for the fuser "
          f"(e.g. `gcloud storage buckets add-iam-policy-binding gs://{self.bucket_name} "
          "--member=serviceAccount:NAME@PROJECT.iam.gserviceaccount.com "
          "--role=roles/storage.objectViewer`)."
      ) from None
    except (api_exceptions.Unauthorized, auth_exceptions.RefreshError) as e:
      raise GCSError(
          f"Google Cloud rejected the credentials while trying to {action} {where} ({_short(e)}). "
          "Run `gcloud auth application-default login` again (or check "
          "GOOGLE_APPLICATION_CREDENTIALS / the VM's service account)."
      ) from None
    except api_exceptions.RetryError as e:
      cause = e.cause if e.cause is not None else e
      raise GCSError(
          f"Cloud Storage did not answer while trying to {action} {where}: gave up after "
          f"retrying for {self.retry_deadline:g}s ({_short(cause)}). Check the network "
          f"connection{_emulator_hint()}, or set {RETRY_DEADLINE_ENV} to wait longer."
      ) from None
    except (auth_exceptions.TransportError, ConnectionError) as e:
      raise GCSError(
          f"Could not reach Cloud Storage while trying to {action} {where} ({_short(e)}). "
          f"Check the network connection{_emulator_hint()}."
      ) from None

  def _bucket_missing(self) -> GCSError:
    return GCSError(
        f"Bucket {self.bucket_name!r} does not exist (store {self.uri}). Check the bucket name "
        f"in --store, or create it: `gcloud storage buckets create gs://{self.bucket_name}`."
    )

  def check_access(self) -> None:
    """One cheap listing: fails early on credentials, bucket, permissions, network."""
    with self._errors("list"):
      if not self._bucket_exists():
        raise self._bucket_missing()

  # --- reads ------------------------------------------------------------------------

  def read_bytes(self, name: str, max_bytes: Optional[int] = None) -> bytes:
    return self._read(name, max_bytes)[0]

  def _read(self, name: str, max_bytes: Optional[int] = None) -> tuple[bytes, int]:
    key = self._object_key(name)
    with self._errors("read", name):
      for _ in range(5):
        blob = self._bucket.blob(key)
        pinned = {}
        if max_bytes is not None:  # the size from the object's metadata, before any byte
          blob = self._sized_blob(name, key, max_bytes)
          pinned = {"if_generation_match": blob.generation}
        try:
          data = blob.download_as_bytes(
              raw_download=True, retry=self._retry, timeout=self._timeout, **pinned)
          break
        except api_exceptions.NotFound:
          raise FileNotFoundError(self._where(name)) from None
        except api_exceptions.PreconditionFailed:
          continue  # replaced between the size check and the read: look again
      else:
        raise UserError(f"{self._where(name)} kept changing while reading it.")
    if blob.generation is None:  # GCS (and fake-gcs-server) always send x-goog-generation.
      raise GCSError(f"Reading {self._where(name)}: the response carried no object generation.")
    generation = int(blob.generation)
    return data, generation

  def _sized_blob(self, name: str, key: str, max_bytes: Optional[int]) -> storage.Blob:
    """The object's metadata (FileNotFoundError if missing), refused over ``max_bytes``."""
    blob = self._bucket.get_blob(key, retry=self._retry, timeout=self._timeout)
    if blob is None:
      raise FileNotFoundError(self._where(name))
    if max_bytes is not None and (blob.size or 0) > max_bytes:
      raise UserError(f"{self._where(name)}: {blob.size} bytes, more than the {max_bytes} "
                      "allowed.")
    return blob

  def stat(self, name: str) -> Optional[ObjectInfo]:
    key = self._object_key(name)
    with self._errors("read", name):
      blob = self._bucket.get_blob(key, retry=self._retry, timeout=self._timeout)
    return None if blob is None else _info(blob)

  def exists(self, name: str) -> bool:
    key = self._key(name)
    with self._errors("check", name):
      if name and self._bucket.blob(key).exists(retry=self._retry, timeout=self._timeout):
        return True
      return self._has_children(name)

  def _has_children(self, name: str) -> bool:
    blobs = self._client.list_blobs(
        self._bucket, prefix=self._folder(name), max_results=1,
        retry=self._retry, timeout=self._timeout)
    return any(True for _ in blobs)

  def list_children(self, prefix: str) -> list[str]:
    folder = self._folder(prefix)
    names = set()
    with self._errors("list", prefix):
      blobs = self._client.list_blobs(
          self._bucket, prefix=folder, delimiter="/", retry=self._retry, timeout=self._timeout)
      for blob in blobs:  # Pages are fetched as the iterator advances.
        names.add(blob.name[len(folder):])
      for sub in blobs.prefixes:
        names.add(sub[len(folder):].rstrip("/"))
    names.discard("")  # A "folder placeholder" object named exactly like the prefix.
    return sorted(names)

  def read_versioned(self, name: str) -> tuple[Optional[bytes], object]:
    try:
      return self._read(name)
    except FileNotFoundError:
      return None, 0

  def download(self, name: str, local_path: str, max_bytes: Optional[int] = None) -> ObjectInfo:
    key = self._object_key(name)
    local_path = os.path.abspath(local_path)
    tmp = None
    deadline = time.monotonic() + self.retry_deadline
    try:
      os.makedirs(os.path.dirname(local_path), exist_ok=True)
      # A temporary name of this call's own: processes sharing a cache directory (two
      # contributors or fusers on one machine) may download the same object at once. It ends
      # in ".partial" so directory listings can skip it.
      fd, tmp = tempfile.mkstemp(dir=os.path.dirname(local_path),
                                 prefix=f".{os.path.basename(local_path)}.", suffix=".partial")
      os.close(fd)
      os.chmod(tmp, 0o644)  # mkstemp makes it private; a download is an ordinary file.
      while True:
        with self._errors("download", name):
          blob = self._sized_blob(name, key, max_bytes)
          try:
            # Streams to the file (resuming with range requests on retries) and checks
            # the crc32c the server reports; pinned to the generation just looked up.
            blob.download_to_filename(
                tmp, raw_download=True, if_generation_match=blob.generation,
                retry=self._retry, timeout=self._timeout)
          except (api_exceptions.PreconditionFailed, api_exceptions.NotFound):
            # Replaced or deleted while downloading: look it up again.
            if time.monotonic() > deadline:
              raise UserError(f"{self._where(name)} kept changing while downloading it.") from None
            continue
        got = os.path.getsize(tmp)
        if got != blob.size:
          raise GCSError(
              f"Download of {self._where(name)} is truncated: got {got} of {blob.size} bytes. "
              "Try again; if it persists, check the network connection.")
        os.replace(tmp, local_path)
        return _info(blob)
    except OSError as e:
      if e.errno is None:  # a network library's error, not this machine's files
        raise
      # This machine's side (a full disk, its own folder): not the object's fault.
      raise LimitError(f"{self._where(name)}: cannot save it to {local_path} "
                       f"({os_reason(e)}).") from None
    finally:
      if tmp is not None:
        remove_quietly(tmp)

  # --- writes -----------------------------------------------------------------------

  def _new_blob(self, key: str) -> storage.Blob:
    return self._bucket.blob(key, chunk_size=self._chunk_size)

  def write_bytes(self, name: str, data: bytes) -> None:
    key = self._object_key(name)
    with self._errors("write", name), self._bucket_must_exist():
      self._new_blob(key).upload_from_string(
          data, content_type="application/octet-stream", retry=self._retry, timeout=self._timeout)

  def upload(self, local_path: str, name: str, move: bool = False) -> None:
    del move  # an upload always copies
    key = self._object_key(name)
    os.stat(local_path)  # FileNotFoundError before any request.
    deadline = time.monotonic() + self.retry_deadline
    with self._errors("upload", name), self._bucket_must_exist():
      while True:
        # Files over 8 MiB go as a resumable upload in chunk_size pieces (only one chunk in
        # memory at a time); each chunk is retried and resumed from the committed offset.
        try:
          self._new_blob(key).upload_from_filename(
              local_path, content_type="application/octet-stream",
              retry=self._retry, timeout=self._timeout)
          break
        except api_exceptions.GoogleAPICallError as e:
          # 404/410 from a resumable session means the session is gone (expired, or the
          # server lost it): the documented remedy is to start the upload over. A missing
          # bucket (also 404) is told apart by _bucket_must_exist.
          if e.code not in (404, 410) or time.monotonic() > deadline or not self._bucket_exists():
            raise
    # The object only becomes visible when the upload completes: no partial object.

  @contextlib.contextmanager
  def _bucket_must_exist(self) -> Iterator[None]:
    try:
      yield
    except api_exceptions.NotFound:
      if not self._bucket_exists():
        raise self._bucket_missing() from None
      raise

  def _bucket_exists(self) -> bool:
    """One cheap listing (at most one object): False when the bucket does not exist."""
    try:
      blobs = self._client.list_blobs(
          self._bucket, prefix=self._folder(""), max_results=1,
          retry=self._retry, timeout=self._timeout)
      for _ in blobs:
        pass
      return True
    except api_exceptions.NotFound:
      return False

  def _conditional_write(self, name: str, data: bytes, generation: int, action: str) -> bool:
    key = self._object_key(name)
    write_id = uuid.uuid4().hex
    blob = self._new_blob(key)
    blob.metadata = {_WRITE_ID_KEY: write_id}
    with self._errors(action, name), self._bucket_must_exist():
      try:
        # Passing retry explicitly: the precondition makes the write idempotent.
        blob.upload_from_string(
            data, content_type="application/octet-stream", if_generation_match=generation,
            retry=self._retry, timeout=self._timeout)
        return True
      except api_exceptions.PreconditionFailed:
        pass
      # Either another writer got there first, or an earlier attempt of this very call
      # landed and only its response was lost (then the retry saw our own object).
      current = self._bucket.get_blob(key, retry=self._retry, timeout=self._timeout)
      return current is not None and (current.metadata or {}).get(_WRITE_ID_KEY) == write_id

  def create_exclusive(self, name: str, data: bytes) -> bool:
    return self._conditional_write(name, data, 0, "create")

  def upload_exclusive(self, local_path: str, name: str) -> bool:
    key = self._object_key(name)
    os.stat(local_path)  # FileNotFoundError before any request.
    write_id = uuid.uuid4().hex
    blob = self._new_blob(key)
    blob.metadata = {_WRITE_ID_KEY: write_id}
    with self._errors("create", name), self._bucket_must_exist():
      try:
        blob.upload_from_filename(local_path, content_type="application/octet-stream",
                                  if_generation_match=0, retry=self._retry,
                                  timeout=self._timeout)
        return True
      except api_exceptions.PreconditionFailed:
        current = self._bucket.get_blob(key, retry=self._retry, timeout=self._timeout)
        return current is not None and (current.metadata or {}).get(_WRITE_ID_KEY) == write_id

  def compare_and_swap(self, name: str, data: bytes, token: object) -> bool:
    if token is None:
      token = 0
    if isinstance(token, bool) or not isinstance(token, int) or token < 0:
      raise TypeError(f"compare_and_swap token must be a generation from read_versioned, got {token!r}")
    return self._conditional_write(name, data, token, "update")

  def delete_prefix(self, prefix: str) -> None:
    key = self._key(prefix)
    with self._errors("delete", prefix):
      blobs = list(self._client.list_blobs(
          self._bucket, prefix=self._folder(prefix), retry=self._retry, timeout=self._timeout))
      if prefix:
        blobs.append(self._bucket.blob(key))  # The object itself, if it is one.
      for blob in blobs:
        try:
          blob.delete(retry=self._retry, timeout=self._timeout)
        except api_exceptions.NotFound:
          pass


def _info(blob: storage.Blob) -> ObjectInfo:
  """What GCS says of an object (its creation time in microseconds, as the service keeps it)."""
  created = blob.time_created
  created_ns = int(round(created.timestamp() * 1e6)) * 1000 if created is not None else 0
  return ObjectInfo(int(blob.size or 0), created_ns, int(blob.generation or 0))


def _emulator_hint() -> str:
  host = os.environ.get(EMULATOR_ENV)
  return f" and {EMULATOR_ENV}={host} (is the emulator running?)" if host else ""


def _short(exc: BaseException) -> str:
  text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
  return text if len(text) <= 300 else text[:297] + "..."
