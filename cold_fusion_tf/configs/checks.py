"""A config's values checked once, where a program reads it: each problem is one UserError
that names the field (``config.data.max_examples.train=-1: ...``) and what it expects.

The fine-tuning recipes are checked by :class:`~cold_fusion_tf.training.recipe.Recipe` and the
fusion settings by :class:`~cold_fusion_tf.fusion.Settings`; this module checks the rest and
calls both. Sections a config does not have are skipped (a program may be given a config of
its own).
"""

from __future__ import annotations

import math

import ml_collections

from cold_fusion_tf import data
from cold_fusion_tf.data import folder
from cold_fusion_tf.errors import UserError
from cold_fusion_tf.store import paths

_MAX_SEED = 2**31 - 1  # numpy and TensorFlow take 32-bit seeds; evaluation adds the run's index


def check(config) -> None:
  """Raises a UserError for the first value of ``config`` that is not valid, or when it lacks
  a field of :func:`cold_fusion_tf.configs.defaults.get_config` (a program reads them all)."""
  if not isinstance(config, ml_collections.ConfigDict):
    raise UserError(f"--config: get_config() returned {type(config).__name__}; a config file's "
                    "get_config() returns an ml_collections.ConfigDict (see configs/demo.py).")
  from cold_fusion_tf.configs import defaults  # pylint: disable=g-import-not-at-top
  missing = _missing(config, defaults.get_config(), "config")
  if missing:
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    raise UserError(f"--config lacks {', '.join(missing[:5])}{more}: a config starts from "
                    "cold_fusion_tf.configs.defaults.get_config() and changes its fields (see "
                    "configs/demo.py).")
  if "model" in config:
    _string(config.model, "source", "config.model", empty=False)
    from cold_fusion_tf.model import body  # pylint: disable=g-import-not-at-top  (light)
    body.settings(config)
  if "data" in config:
    _check_data(config.data)
  for name in ("task", "contributor_id", "strategy", "tpu"):
    _string(config, name, "config")
  if config.get("contributor_id"):
    paths.check_path_part(config.contributor_id, "Contributor id")
  for name in ("pool", "heldout"):
    if name in config:
      _names(config[name], f"config.{name}")
  for name, low, high in (("iterations", 0, 999_999),  # six-digit iteration names
                          ("contributors_per_iteration", 1, 10_000), ("seed", 0, _MAX_SEED)):
    if name in config:
      _integer(config[name], f"config.{name}", low, high)
  if "recipe" in config:
    _recipe(config.recipe, "config.recipe")
  if "eval" in config:
    _check_eval(config.eval)
  if "fusion" in config:
    from cold_fusion_tf import fusion  # pylint: disable=g-import-not-at-top
    fusion.Settings.from_config(config.fusion)


def _missing(config, default, where: str) -> list[str]:
  """The fields of ``default`` (and of its sections) that ``config`` does not have."""
  out = []
  for name in default.keys():
    if name not in config:
      out.append(f"{where}.{name}")
    elif isinstance(default[name], ml_collections.ConfigDict) and \
        isinstance(config[name], ml_collections.ConfigDict):
      out += _missing(config[name], default[name], f"{where}.{name}")
  return out


def _check_data(section) -> None:
  if "dirs" in section:
    _names(section.dirs, "config.data.dirs", what="a folder")
  if "columns" in section:
    folder.column_names(_mapping(section.columns))
  if "max_examples" in section:
    data.check_caps(_mapping(section.max_examples))
  if "max_file_mb" in section:
    _integer(section.max_file_mb, "config.data.max_file_mb", 1, 1 << 30)


def _check_eval(section) -> None:
  if "recipe" in section:
    _recipe(section.recipe, "config.eval.recipe")
  if "seeds" in section:
    _integer(section.seeds, "config.eval.seeds", 1)
  if "max_train_examples" in section:
    _integer(section.max_train_examples, "config.eval.max_train_examples", 0)
  _string(section, "tasks", "config.eval", empty=False)
  if isinstance(section.get("tasks"), str) and not section.tasks.strip(" ,"):
    raise UserError(f"config.eval.tasks={section.tasks!r}: names no task; give dataset names, "
                    "or pool, pool:N, heldout or all.")
  if "enabled" in section and not isinstance(section.enabled, bool):
    raise UserError(f"config.eval.enabled={section.enabled!r}: expected True or False.")
  if "probe_learning_rate" in section:
    value = section.probe_learning_rate
    if not _number(value) or not value > 0:
      raise UserError(f"config.eval.probe_learning_rate={value!r}: expected a number > 0.")


def _recipe(section, where: str) -> None:
  from cold_fusion_tf.training.recipe import Recipe  # pylint: disable=g-import-not-at-top
  recipe = Recipe.from_config(section, where)
  _integer(recipe.seed, f"{where}.seed", 0, _MAX_SEED)


def _mapping(section):
  return section.to_dict() if hasattr(section, "to_dict") else section


def _number(value) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


def _integer(value, where: str, low: int, high: int = 2**31 - 1) -> None:
  if not _number(value) or not float(value).is_integer() or not low <= value <= high:
    raise UserError(f"{where}={value!r}: expected an integer in {low}..{high}.")


def _string(section, name: str, where: str, empty: bool = True) -> None:
  if name not in section:
    return
  value = section[name]
  if not isinstance(value, str) or (not empty and not value):
    raise UserError(f"{where}.{name}={value!r}: expected {'a' if empty else 'a non-empty'} "
                    "string.")


def _names(value, where: str, what: str = "a dataset") -> None:
  if isinstance(value, str) or not isinstance(value, (tuple, list)):
    raise UserError(f"{where}={value!r}: expected a tuple of names, e.g. "
                    f"{where}=\"('a', 'b')\" (each {what}).")
  for item in value:
    if not isinstance(item, str) or not item:
      raise UserError(f"{where}: {item!r} is not {what} name.")
