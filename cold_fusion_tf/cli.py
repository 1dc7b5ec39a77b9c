"""What every program shares: the --config/--store/--workdir flags and clean error exits."""

from __future__ import annotations

import os
import sys
from typing import Callable

from absl import flags
from absl import logging
from ml_collections import config_flags

from cold_fusion_tf.errors import UserError

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "configs", "demo.py")


def define_flags(default_config: str | None = DEFAULT_CONFIG, workdir: bool = False) -> None:
  config_flags.DEFINE_config_file(
      "config", default_config if default_config and os.path.exists(default_config) else None,
      "Config file (configs/*.py); override fields with --config.<field>=<value>.",
      lock_config=True)
  flags.DEFINE_string("store", None, "The store: a local directory or gs://bucket/prefix.")
  if workdir:
    flags.DEFINE_string("workdir", None, "Local or gs:// directory for checkpoints and logs.")


def run_main(body: Callable[[], int | None]) -> None:
  """Runs a program body; a UserError ends it with one message and exit status 2."""
  logging.set_verbosity(logging.INFO)
  logging.use_python_logging()
  try:
    status = body()
  except UserError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr, flush=True)
    sys.exit(130)
  sys.exit(status or 0)


def say(message: str) -> None:
  """Progress for the person at the terminal (also in the absl log)."""
  print(message, flush=True)


def require_store() -> str:
  store = flags.FLAGS.store
  if not store:
    raise UserError("--store is required: a local directory or gs://bucket/prefix.")
  return store


def require_config():
  config = flags.FLAGS.config
  if config is None:
    raise UserError("--config is required: a config file such as configs/demo.py.")
  return config
