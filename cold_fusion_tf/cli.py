"""What every program shares: the --config/--store/--workdir flags and clean error exits."""

from __future__ import annotations

import os
import sys
from typing import Callable

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from cold_fusion_tf.errors import UserError

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
DEFAULT_CONFIG = os.path.join(CONFIGS_DIR, "demo.py")


def config_names() -> list[str]:
  """The configs that ship with the package, by name (``--config=demo``)."""
  return sorted(f[:-3] for f in os.listdir(CONFIGS_DIR)
                if f.endswith(".py") and not f.startswith("_") and f != "defaults.py")


def resolve_config(value: str) -> str:
  """A ``--config`` value as a file path: a path as given, or a shipped config's name."""
  if os.path.exists(value) or os.sep in value or value.endswith(".py"):
    return value
  if value in config_names():
    return os.path.join(CONFIGS_DIR, value + ".py")
  raise UserError(f"--config={value}: no such file, and not a shipped config name "
                  f"({', '.join(config_names())}).")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with config names resolved and every problem one ``error:`` line
  (exit status 2) instead of a traceback."""
  argv = list(argv)
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      try:
        argv[i] = "--config=" + resolve_config(arg[len("--config="):])
      except UserError as e:
        _fail(str(e))
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(str(e))
  except (AttributeError, KeyError, ValueError, TypeError, IOError) as e:
    _fail(f"bad --config or override: {e}")


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


def run(main: Callable[[list[str]], None]) -> None:
  """``app.run(main)`` with :func:`parse_flags`: every program's ``__main__``."""
  app.run(main, flags_parser=parse_flags)


def define_flags(default_config: str | None = DEFAULT_CONFIG, workdir: bool = False) -> None:
  config_flags.DEFINE_config_file(
      "config", default_config if default_config and os.path.exists(default_config) else None,
      "Config file (configs/*.py) or a shipped config's name (demo, roberta_base, "
      "bert_base_uncased); override fields with --config.<field>=<value>.",
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
    _fail(str(e))
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
