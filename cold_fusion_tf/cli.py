"""What every program shares: the --config/--store/--workdir flags, checked once, quiet
libraries, and clean error exits (one ``error:`` line, exit status 2, nothing written)."""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import sys
from typing import Callable

from cold_fusion_tf import quiet

quiet.before_tensorflow()  # pylint: disable=wrong-import-position

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import logging  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from cold_fusion_tf import progress  # pylint: disable=g-import-not-at-top,wrong-import-position
from cold_fusion_tf.errors import UserError  # pylint: disable=g-import-not-at-top,wrong-import-position

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
DEFAULT_CONFIG = os.path.join(CONFIGS_DIR, "demo.py")
_NOT_CONFIGS = ("defaults.py", "checks.py")
PATH_FLAGS = ("store", "workdir", "out", "results", "logdir")
"""Flags naming a folder: a local one must not be (or be inside) a file."""
UTF8_FLAGS = PATH_FLAGS + ("base", "reference")
"""Flags naming stores, folders or models: their names go into the files written (run.json,
results, model cards), so they must be valid UTF-8."""
_READ_FLAGS = ("results",)
"""Path flags a program only reads (no folder is created for them)."""
_default_config: str | None = None
_HELP_FLAGS = {"--help", "-help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml"}
_KEY_FLAGS = ("config", "store", "workdir")
"""Flags defined here for every program: listed by its --help like its own."""
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:/")


def config_names() -> list[str]:
  """The configs that ship with the package, by name (``--config=demo``)."""
  return sorted(f[:-3] for f in os.listdir(CONFIGS_DIR)
                if f.endswith(".py") and not f.startswith("_") and f not in _NOT_CONFIGS)


def resolve_config(value: str) -> str:
  """A ``--config`` value as a file path: a path as given, or a shipped config's name."""
  path, colon, arg = value.partition(":")  # ml_collections' ``file.py:argument``
  if colon and not arg:
    raise UserError(f"--config={value}: nothing follows ':'; give --config=FILE.py, or "
                    "--config=FILE.py:ARGUMENT for a get_config(argument).")
  if os.sep in path or path.endswith(".py") or os.path.exists(path):
    if not os.path.isfile(path):
      what = ("is a folder" if os.path.isdir(path) else "is not a regular file"
              if os.path.exists(path) else "does not exist")
      raise UserError(f"--config={value}: {path} {what}; give a config file (configs/*.py) or "
                      f"a shipped config's name ({', '.join(config_names())}).")
    if not path.endswith(".py"):
      raise UserError(f"--config={value}: {path} is not a Python file (.py); a config file "
                      "defines get_config() (see configs/demo.py).")
    return value
  if path in config_names():
    return os.path.join(CONFIGS_DIR, path + ".py") + colon + arg
  raise UserError(f"--config={value}: no such file, and not a shipped config's name "
                  f"({', '.join(config_names())}).")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with config names resolved, the config checked
  (:mod:`cold_fusion_tf.configs.checks`) and every problem one ``error:`` line (exit status
  2) instead of a traceback."""
  argv = _config_argv(_expand_flagfiles(list(argv)))
  config_arg = next((a for a in argv if a.startswith("--config=")), "")
  if set(argv) & _HELP_FLAGS:
    argv = ["--help" if a == "-h" and "h" not in flags.FLAGS else a for a in argv]
    for name in _KEY_FLAGS:  # absl's --help lists the key flags of the module run
      if name in flags.FLAGS:
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])
  try:
    rest = flags.FLAGS(argv)
    config = flags.FLAGS["config"].value if "config" in flags.FLAGS else None
  except SystemExit as e:  # absl printed the help asked for, and exits 1 after it
    if set(argv) & _HELP_FLAGS or not config_arg:
      sys.exit(0 if set(argv) & _HELP_FLAGS else 2)
    _fail(f"{config_arg}: the config file ended the program (sys.exit({e.code!r})) while "
          "loading; its get_config() should return the config.")
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr, flush=True)
    sys.exit(130)
  except flags.Error as e:
    if str(e).startswith("flag --config=") and "Traceback" in str(e):
      _fail(_explain_config_error(argv, e))  # its get_config() failed
    _fail(str(e))
  except Exception as e:  # pylint: disable=broad-except
    if str(e).startswith("--") and not str(e).startswith("--config"):
      _fail(f"{e}: a yes/no flag is --NAME or --noNAME, without a value (see --helpshort)."
            if str(e).endswith("does not take an argument") else str(e))
    _fail(_explain_config_error(argv, e))  # a config file that fails, an unknown field
  if flags.FLAGS["verbosity"].using_default_value:
    flags.FLAGS.verbosity = -1  # warnings and errors (absl would show INFO); --verbosity=0: INFO
  if len(rest) > 1:
    shown = " ".join(a if len(a) <= 60 else a[:57] + "..." for a in rest[1:4])
    more = f" and {len(rest) - 4} more" if len(rest) > 4 else ""
    _fail(f"unexpected argument(s) {shown}{more}: settings are --flags (see --helpshort).")
  if config is None and config_arg:
    _fail(f"{config_arg}: get_config() returned None; it returns an ml_collections.ConfigDict "
          "(see configs/demo.py).")
  try:
    if config is not None:
      from cold_fusion_tf.configs import checks  # pylint: disable=g-import-not-at-top
      checks.check(config)
    from cold_fusion_tf.store import untrusted  # pylint: disable=g-import-not-at-top
    for name in UTF8_FLAGS:
      if name in flags.FLAGS and isinstance(flags.FLAGS[name].value, str):
        untrusted.check_utf8(flags.FLAGS[name].value, prefix=f"--{name}=")
        for value in flags.FLAGS[name].value.split(",") if name == "base" else \
            [flags.FLAGS[name].value]:  # --base: comma-separated
          check_location(value, f"--{name}")
    for name in PATH_FLAGS:
      if name in flags.FLAGS and flags.FLAGS[name].value:
        check_folder(flags.FLAGS[name].value, f"--{name}")
  except UserError as e:
    _fail(str(e))
  return rest


def _expand_flagfiles(argv: list[str]) -> list[str]:
  """``argv`` with absl's ``--flagfile=FILE`` replaced by the flags in FILE (so that a
  ``--config`` there is resolved like one on the command line); ``sys.argv`` too, which
  ml_collections reads the ``--config.*`` overrides from."""
  if not any(a.lstrip("-").startswith("flagfile") for a in argv[1:]):
    return argv
  try:
    argv = argv[:1] + flags.FLAGS.read_flags_from_files(argv[1:], force_gnu=False)
  except flags.Error as e:
    _fail(_flagfile_error(e))
  sys.argv[:] = argv
  return argv


def _flagfile_error(error: Exception) -> str:
  """absl's "ERROR:: Unable to open flagfile: [Errno 2] No such file or directory: 'x'"."""
  found = re.search(r"\[Errno \d+\] (.*): '(.*)'", str(error))
  what = f"cannot read {found.group(2)} ({found.group(1)})" if found else \
      str(error).replace("ERROR:: ", "")
  return f"--flagfile: {what}; give a readable file of --flags, one a line."


def _config_argv(argv: list[str]) -> list[str]:
  """``--config`` resolved to a file, and the program's default config when none is given."""
  found = False
  for i, arg in enumerate(argv):
    if arg == "--config" and i + 1 < len(argv):
      argv[i:i + 2] = [f"--config={argv[i + 1]}"]
      arg = argv[i]
    if arg.startswith("--config="):
      found = True
      try:
        argv[i] = "--config=" + resolve_config(arg[len("--config="):])
      except UserError as e:
        _fail(str(e))
  if not found and _default_config and "config" in flags.FLAGS:
    argv.insert(1, f"--config={_default_config}")
  return argv


def _explain_config_error(argv: list[str], error: Exception) -> str:
  """One line for a failure to load the config or apply an override."""
  config_arg = next((a for a in argv if a.startswith("--config=")), "")
  path = config_arg[len("--config="):].partition(":")[0]
  try:
    config = _load_config(config_arg[len("--config="):]) if path else None
  except Exception as e:  # pylint: disable=broad-except
    return f"--config={path}: the config file fails to load: {type(e).__name__}: {e}"
  for arg in argv[1:]:
    if not arg.startswith("--config."):
      continue
    name = arg[len("--config."):].partition("=")[0]
    section, where = config, "the config"
    for part in name.split("."):
      if section is None or not hasattr(section, "keys"):
        break
      if part not in section:
        fields = ", ".join(sorted(str(k) for k in section.keys())) or "none"
        return (f"--config.{name}: {where} has no field {part!r}; its fields are: "
                f"{fields}.")
      section, where = section[part], f"config.{part}" if where == "the config" \
          else f"{where}.{part}"
  message = str(error).strip().splitlines()
  return f"bad --config or override: {type(error).__name__}: {message[0] if message else ''}"


def _load_config(value: str):
  """``get_config()`` of a config file (``path`` or ``path:argument``)."""
  path, _, arg = value.partition(":")
  spec = importlib.util.spec_from_file_location("cold_fusion_config_check", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not callable(getattr(module, "get_config", None)):
    raise AttributeError(f"{path} defines no get_config() function; a config file's "
                         "get_config() returns the config (see configs/demo.py)")
  return module.get_config(arg) if arg else module.get_config()


def check_location(value: str, flag: str) -> None:
  """A path or gs:// URI flag: no control characters (they would end up in file names and
  records), and no URI but gs:// (``gs:/bucket`` would silently be a local folder)."""
  bad = sorted({c for c in value if ord(c) < 32 or ord(c) == 127})
  if bad:
    raise UserError(f"{flag}={value!r} holds the control character(s) "
                    f"{', '.join(repr(c) for c in bad)}; give a path without them.")
  if (_URI.match(value) or value.lower().startswith("gs:")) and not value.startswith("gs://"):
    hint = ("did you mean gs://BUCKET/PREFIX (two slashes, lower case)?"
            if value.lower().startswith("gs:") else "only Cloud Storage's gs://bucket/prefix "
            "URIs are supported; else give a local path")
    raise UserError(f"{flag}={value}: not a local path or a gs:// URI; {hint}.")


def check_folder(value: str, flag: str) -> None:
  """A local folder flag must not be a file or lie inside one (``--store=/etc/passwd``)."""
  if "://" in value:
    return
  path = os.path.abspath(os.path.expanduser(value))
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  if not os.path.isdir(path):
    where = "is a file" if path == os.path.abspath(os.path.expanduser(value)) else \
        f"is inside the file {path}"
    hint = "the folder to read" if flag.lstrip("-") in _READ_FLAGS else \
        "a folder (a new one is created)"
    raise UserError(f"{flag}={value} {where}, not a folder; give {hint}.")


def _fail(message: str) -> None:
  """Ends the program: ``message`` as one ``error:`` line, exit status 2."""
  print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)
  sys.exit(2)


def run(main: Callable[[list[str]], None]) -> None:
  """``app.run(main)`` with :func:`parse_flags`: every program's ``__main__``."""
  app.run(main, flags_parser=parse_flags)


def define_flags(default_config: str | None = DEFAULT_CONFIG, workdir: bool = False) -> None:
  """--config (``default_config`` when not given), --store and, with ``workdir``, --workdir.

  The config is loaded when the flags are parsed (:func:`parse_flags`), not here, so that a
  bad config or override is one error line.
  """
  global _default_config
  _default_config = default_config
  default = os.path.basename(default_config)[:-3] if default_config else None
  try:  # ml_collections reads sys.argv (and its --flagfile) here already
    config_flags.DEFINE_config_file(
        "config", None,
        "Config file (configs/*.py) or a shipped config's name (demo, roberta_base, "
        f"bert_base_uncased{f'; default {default}' if default else '; optional'}); override "
        "fields with --config.<field>=<value>.", lock_config=True)
  except flags.Error as e:
    _fail(_flagfile_error(e))
  flags.FLAGS["config"].default_as_str = None  # not "None": the help text says the default
  flags.DEFINE_string("store", None, "The store: a local directory or gs://bucket/prefix.")
  if workdir:
    flags.DEFINE_string("workdir", None, "Local or gs:// directory for checkpoints and logs.")


def run_main(body: Callable[[], int | None], tensorflow: bool = False) -> None:
  """Runs a program body; a UserError ends it with one message and exit status 2.

  ``tensorflow``: the body uses TensorFlow, which is then imported first, quietly
  (:func:`cold_fusion_tf.quiet.init_devices`).
  """
  logging.use_python_logging(quiet=True)
  signal.signal(signal.SIGTERM, _terminate)
  try:
    if tensorflow:
      quiet.init_devices()
    status = body()
  except UserError as e:
    _fail(str(e))
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr, flush=True)
    sys.exit(130)
  except _Terminated:
    print("terminated (SIGTERM); what was saved is kept: run the same command again to go on",
          file=sys.stderr, flush=True)
    sys.exit(128 + signal.SIGTERM)
  sys.exit(status or 0)


class _Terminated(BaseException):
  """SIGTERM (a preempted VM, a stopped job), raised where the program is, so that it ends as
  on Ctrl-C: its clean-ups run, and one line says so."""


def _terminate(signum, frame) -> None:
  del signum, frame
  raise _Terminated()


say = progress.Display()
"""Progress and results for the person at the terminal (stdout); status lines
(:class:`cold_fusion_tf.progress.Status`) are redrawn in place on a terminal."""


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
