"""Checks that TensorFlow's own filesystem (tf.io.gfile) can write, read and delete under a URI.

    python launch/gcs_check.py gs://BUCKET/RUN/scratch/sst2

Training checkpoints and TensorBoard logs go through tf.io.gfile, not through the store code,
so a gs:// workdir needs two things the store does not: a TensorFlow that can open gs:// paths
(the tensorflow-io-gcs-filesystem plugin became optional in TensorFlow 2.20) and delete rights
under the prefix (checkpoints are replaced and removed). This writes a small probe object under
the URI, reads it back and deletes it, and exits non-zero with a message naming the fix:

  3  the filesystem scheme is not available (names the package to install)
  4  permission denied (names the IAM role the machine's service account needs)
  5  any other failure (network, missing bucket, ...)

launch/install.sh --check-workdir runs it on every TPU VM worker before training starts.
"""

from __future__ import annotations

import os
import socket
import sys

PROG = "gcs_check.py"


def fail(code: int, message: str) -> None:
  print(f"{PROG}: error: {message}", file=sys.stderr)
  sys.exit(code)


def installed_tensorflow_package() -> str:
  """tensorflow-tpu on a TPU VM (same import name as tensorflow), else tensorflow."""
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  try:
    metadata.version("tensorflow-tpu")
    return "tensorflow-tpu"
  except metadata.PackageNotFoundError:
    return "tensorflow"


def main(argv: list[str]) -> None:
  if len(argv) != 2 or not argv[1] or argv[1].startswith("-"):
    fail(2, "usage: python launch/gcs_check.py URI   (a gs://bucket/prefix or a folder)")
  uri = argv[1].rstrip("/")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  probe = f"{uri}/.cold_fusion_probe_{socket.gethostname()}_{os.getpid()}"
  scheme = uri.split("://", 1)[0] if "://" in uri else ""
  try:
    tf.io.gfile.makedirs(uri)
    with tf.io.gfile.GFile(probe, "w") as f:
      f.write("ok")
    with tf.io.gfile.GFile(probe, "r") as f:
      if f.read() != "ok":
        fail(5, f"{probe}: read back something else than was written")
    tf.io.gfile.remove(probe)
  except tf.errors.UnimplementedError as e:
    package = installed_tensorflow_package()
    fail(3, f"TensorFlow {tf.__version__} cannot open {scheme}:// paths here ({e}). TensorFlow "
            "2.20 made its GCS filesystem plugin optional: install it with "
            f"pip install '{package}[gcs-filesystem]=={tf.__version__}' "
            "(the package tensorflow-io-gcs-filesystem), or use a local --workdir.")
  except tf.errors.PermissionDeniedError as e:
    fail(4, f"permission denied writing or deleting {probe} ({e}). The machine's service "
            "account needs roles/storage.objectUser on this prefix (create, overwrite and delete; "
            "see BUILD.md, 'The bucket's access layout').")
  except tf.errors.OpError as e:
    fail(5, f"cannot write, read and delete {probe}: {type(e).__name__}: {e}")
  print(f"{PROG}: tf.io.gfile can write, read and delete under {uri}")


if __name__ == "__main__":
  main(sys.argv)
