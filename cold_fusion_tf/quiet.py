"""Library output that is known and harmless kept off the screen, at its source; real warnings
and errors still show.

* :func:`before_tensorflow` (called by every program before TensorFlow is imported):
  TensorFlow's C++ INFO lines (oneDNN and CPU-instruction notes, the CUDA stub's "GPU will not
  be used") are off unless ``TF_CPP_MIN_LOG_LEVEL`` is set; its warnings and errors stay. The
  checkpoint saver's "Sharding callback duration" INFO record is dropped, and so are
  ml_collections' note that a config's get_config() returned None (the error line says it) and
  the "triggered tf.function retracing" warning about functions made per fine-tune (each
  contributor and evaluation run builds its own model and training step, on purpose).
  (Python logging shows warnings and errors; ``--verbosity=0`` adds INFO records.)
* :func:`init_devices`: TensorFlow's devices, found once. On a machine without an NVIDIA
  driver there is no GPU to find, and the CUDA plugin's "failed call to cuInit" error line
  says only that; it is dropped there (and only there).
* :func:`transformers_tf`: around the calls that build or load transformers' TF models: drops
  transformers' notice that its TF classes are deprecated (this package pins the last line
  that has them, on purpose) and, when every weight of the body was loaded, the "Some weights
  of the PyTorch model were not used" block (the checkpoint's pretraining head or buffers,
  which a body does not have). Any other message, such as weights left uninitialised, stays.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import sys
import tempfile
from typing import Iterator, Sequence

_DEPRECATED_TF = "TensorFlow and JAX classes are deprecated"
_LOADED_ALL = ("Some weights of the PyTorch model were not used",
               "All PyTorch model weights were used",
               "All the weights of ")
_SHARDING = "Sharding callback duration"
_CONFIG_NONE = "%s:get_config() returned None"  # ml_collections' note; the error says it
_CUINIT = "failed call to cuInit"
_RETRACING = "triggered tf.function retracing"
_devices = None


class _Drop(logging.Filter):
  """Drops records whose message starts with one of ``prefixes``, and TensorFlow's note that a
  function made inside another one (``make_train_chunk.<locals>.train_chunk``: one per
  fine-tune, by design) was traced again."""

  def __init__(self, *prefixes: str):
    super().__init__()
    self.prefixes = prefixes

  def filter(self, record: logging.LogRecord) -> bool:
    message = str(record.msg)
    if _RETRACING in message and ".<locals>." in message:
      return False
    return not message.startswith(self.prefixes)


def before_tensorflow() -> None:
  """Quiet defaults for a program; call before TensorFlow is imported."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  for name in ("absl", "tensorflow"):
    logging.getLogger(name).addFilter(_Drop(_SHARDING, _CONFIG_NONE))


def nvidia_driver() -> bool:
  """Whether this machine has an NVIDIA driver (so a GPU could be found)."""
  return os.path.exists("/proc/driver/nvidia") or bool(glob.glob("/dev/nvidia[0-9]*"))


@contextlib.contextmanager
def stderr_lines_dropped(fragments: Sequence[str]) -> Iterator[None]:
  """Inside the block, lines written to file descriptor 2 (C++ logs too) that contain one of
  ``fragments`` are dropped; the others are written out when the block ends."""
  if not fragments:
    yield
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      lines = captured.read().decode("utf-8", "replace").splitlines(keepends=True)
      kept = [line for line in lines if not any(f in line for f in fragments)]
      if kept:
        sys.stderr.write("".join(kept))
        sys.stderr.flush()


def init_devices() -> list:
  """Imports TensorFlow and finds its physical devices, once; call it before any other
  TensorFlow work. (Inside an absl program, importing TensorFlow already looks for GPUs.)"""
  global _devices
  if _devices is None:
    with stderr_lines_dropped(() if nvidia_driver() else (_CUINIT,)):
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      _devices = tf.config.list_physical_devices()
  return _devices


class _Collect(logging.Filter):
  """Holds back every record of a logger (to decide on them afterwards)."""

  def __init__(self):
    super().__init__()
    self.records: list[logging.LogRecord] = []

  def filter(self, record: logging.LogRecord) -> bool:
    self.records.append(record)
    return False


@contextlib.contextmanager
def transformers_tf() -> Iterator[None]:
  """Around building or loading transformers' TF models (see the module docstring)."""
  from transformers.utils import logging as hf_logging  # pylint: disable=g-import-not-at-top
  deprecated = _Drop(_DEPRECATED_TF)
  noisy = [hf_logging.get_logger(n) for n in ("transformers.modeling_tf_utils",
                                              "transformers.tokenization_utils_base")]
  loader = hf_logging.get_logger("transformers.modeling_tf_pytorch_utils")
  held = _Collect()
  for logger in noisy:
    logger.addFilter(deprecated)
  loader.addFilter(held)
  try:
    yield
  finally:
    for logger in noisy:
      logger.removeFilter(deprecated)
    loader.removeFilter(held)
    complete = all(str(r.msg).startswith(_LOADED_ALL) for r in held.records)
    for record in held.records:
      if not complete:
        loader.handle(record)
