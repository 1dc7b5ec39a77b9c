"""A base's ``config.json``, read and checked without any model framework.

Both bodies start here: the transformers-TF body turns the checked dictionary into a
``transformers`` config, the keras-hub body into a keras-hub backbone. ``config.json`` comes
from a store or a download, so its model type and sizes are checked before anything is built.
"""

from __future__ import annotations

import json
import os

from cold_fusion_tf.errors import UserError

SUPPORTED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "electra", "distilbert")
_LIMITS = {"hidden_size": 16384, "num_hidden_layers": 128, "num_attention_heads": 256,
           "intermediate_size": 65536, "vocab_size": 1_000_000, "max_position_embeddings": 65536,
           "type_vocab_size": 1024}


def read_raw(model_dir: str) -> tuple[object, str]:
  """The parsed (not yet checked) ``config.json`` of a model directory, and its path."""
  path = os.path.join(model_dir, "config.json")
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f), path
  except FileNotFoundError:
    raise UserError(f"{path}: missing; a base model directory needs config.json.") from None
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise UserError(f"{path}: not valid JSON ({e}).") from e


def check(raw, source: str) -> dict:
  """``raw`` if it is a config of a supported model type with sizes in range."""
  if not isinstance(raw, dict):
    raise UserError(f"{source}: expected a JSON object.")
  model_type = raw.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise UserError(f"{source}: model_type {model_type!r} is not supported; supported: "
                    f"{', '.join(SUPPORTED_MODEL_TYPES)}.")
  for key, limit in _LIMITS.items():
    value = raw.get(key)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                              or not 0 < value <= limit):
      raise UserError(f"{source}: {key}={value!r} is not an integer in 1..{limit}.")
  return raw


def read(model_dir: str) -> dict:
  """The checked ``config.json`` of a model directory."""
  return check(*read_raw(model_dir))


def max_positions(config) -> int:
  """The longest input a body of ``config`` (a checked dict or a transformers config) takes:
  RoBERTa-like models keep ``pad_token_id + 1`` position rows before the first token."""
  get = config.get if isinstance(config, dict) else (lambda key, default=None:
                                                      getattr(config, key, default))
  limit = int(get("max_position_embeddings"))
  if get("model_type") in ("roberta", "xlm-roberta"):
    limit -= int(get("pad_token_id", 1) or 0) + 1
  return limit
