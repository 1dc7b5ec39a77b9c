"""A base's ``config.json``, read and checked without any model framework.

Both bodies start here: the transformers-TF body turns the checked dictionary into a
``transformers`` config, the keras-hub body into a keras-hub backbone. ``config.json`` comes
from a store or a download, so it is read with limits, and its model type, sizes and
settings are checked, and its sizes against the weights beside it, before anything is built.
"""

from __future__ import annotations

import math
import os

from cold_fusion_tf.errors import UserError
from cold_fusion_tf.store import untrusted

SUPPORTED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "electra", "distilbert")
_LIMITS = {"hidden_size": 16384, "num_hidden_layers": 128, "num_attention_heads": 256,
           "intermediate_size": 65536, "vocab_size": 1_000_000, "max_position_embeddings": 65536,
           "type_vocab_size": 1024, "embedding_size": 16384}
# DistilBERT's names for the same sizes, and each family's sizes when config.json leaves
# them out (those of transformers' configs, which the built model then has).
_ALIASES = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
            "hidden_dim": "intermediate_size"}
_BERT = {"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12,
         "num_attention_heads": 12, "intermediate_size": 3072, "max_position_embeddings": 512,
         "type_vocab_size": 2}
_DEFAULTS = {"bert": _BERT, "xlm-roberta": _BERT, "roberta": {**_BERT, "vocab_size": 50265},
             "electra": {**_BERT, "hidden_size": 256, "embedding_size": 128,
                         "num_attention_heads": 4, "intermediate_size": 1024},
             "distilbert": {**_BERT, "num_hidden_layers": 6, "type_vocab_size": 0}}
ACTIVATIONS = ("gelu", "gelu_10", "gelu_fast", "gelu_new", "glu", "mish", "quick_gelu", "relu",
               "sigmoid", "silu", "swish", "tanh")
_RATES = ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout", "dropout",
          "attention_dropout", "seq_classif_dropout", "qa_dropout")
MAX_CONFIG_BYTES = 4 << 20


def read_raw(model_dir: str) -> tuple[object, str]:
  """The parsed (not yet checked) ``config.json`` of a model directory, and its path: a
  regular file of at most ``MAX_CONFIG_BYTES``, parsed with limits (``untrusted.loads``)."""
  path = os.path.join(model_dir, "config.json")
  try:
    data = untrusted.read_regular(path, MAX_CONFIG_BYTES, follow_links=True)
  except FileNotFoundError:
    raise UserError(f"{path}: missing; a base model directory needs config.json.") from None
  return untrusted.loads(data, path), path


def sizes(raw: dict) -> dict:
  """The sizes of the model a checked config describes (DistilBERT's names mapped to BERT's,
  the family's defaults for those left out)."""
  aliases = _ALIASES if raw["model_type"] == "distilbert" else {}
  out = dict(_DEFAULTS[raw["model_type"]])
  out.update({aliases.get(k, k): v for k, v in raw.items()
              if aliases.get(k, k) in _LIMITS and v is not None})
  return out


def parameters(raw: dict) -> int:
  """About how many parameters a body built from checked config ``raw`` has (biases and
  layer norms left out): what building it allocates, before any weight is read."""
  n = sizes(raw)
  hidden, embedding = n["hidden_size"], n.get("embedding_size", n["hidden_size"])
  rows = n["vocab_size"] + n["max_position_embeddings"] + n["type_vocab_size"]
  return (rows * embedding + embedding * hidden * (embedding != hidden)
          + n["num_hidden_layers"] * (4 * hidden * hidden + 2 * hidden * n["intermediate_size"]))


def _number(value) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


def check(raw, source: str) -> dict:
  """``raw`` if it is a config of a supported model type with sizes in range and settings a
  body can be built with (activation, rates, heads dividing the hidden size)."""
  if not isinstance(raw, dict):
    raise UserError(f"{source}: expected a JSON object.")
  model_type = raw.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise UserError(f"{source}: model_type {untrusted.printable(repr(model_type), 80)} is not "
                    f"supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}.")
  if "auto_map" in raw:
    raise UserError(f"{source}: names code to run (auto_map); a base never runs code of its "
                    "own, so this one is refused: use a base without custom code.")
  for key in (*_LIMITS, *_ALIASES):
    value, limit = raw.get(key), _LIMITS[_ALIASES.get(key, key)]
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                              or not 0 < value <= limit):
      raise UserError(f"{source}: {key}={untrusted.printable(repr(value), 40)} is not an "
                      f"integer in 1..{limit}.")
  n = sizes(raw)
  if n["hidden_size"] % n["num_attention_heads"]:
    raise UserError(f"{source}: hidden size {n['hidden_size']} is not a multiple of the "
                    f"{n['num_attention_heads']} attention heads.")
  for key in ("hidden_act", "activation"):
    if key in raw and raw[key] not in ACTIVATIONS:
      raise UserError(f"{source}: {key}={untrusted.printable(repr(raw[key]), 40)} is not one "
                      f"of {', '.join(ACTIVATIONS)}.")
  # Rates may be null (transformers then uses another); the two small numbers may not.
  fractions = [(key, "rate", raw.get(key) is not None) for key in _RATES] + [
      (key, "number", key in raw) for key in ("layer_norm_eps", "initializer_range")]
  for key, what, given in fractions:
    if given and not (_number(raw[key]) and 0 <= raw[key] < 1):
      raise UserError(f"{source}: {key}={untrusted.printable(repr(raw[key]), 40)} is not a "
                      f"{what} in [0, 1).")
  pad = raw.get("pad_token_id")
  if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool)
                          or not 0 <= pad < n["vocab_size"]):
    raise UserError(f"{source}: pad_token_id={untrusted.printable(repr(pad), 40)} is not a "
                    f"token id (0..{n['vocab_size'] - 1}).")
  return raw


def read(model_dir: str) -> dict:
  """The checked ``config.json`` of a model directory whose ``model.safetensors`` holds
  enough numbers for the body it describes: building a body allocates what its config says,
  so a config that claims more than the weights could fill is refused before that."""
  raw = check(*read_raw(model_dir))
  from cold_fusion_tf.tensors import safetensors_io  # pylint: disable=g-import-not-at-top
  path = os.path.join(model_dir, "model.safetensors")
  if not os.path.exists(path):
    raise UserError(f"{model_dir}: missing model.safetensors.")
  held = sum(math.prod(shape) for _, shape, _ in safetensors_io.read_header(path).values())
  needed = parameters(raw)
  if needed > 2 * held + (1 << 20):
    raise UserError(f"{model_dir}/config.json: describes a body of about {needed:,} "
                    f"parameters, but model.safetensors holds {held:,} numbers; the two do not "
                    "belong together (a damaged or tampered base): restore it or use another.")
  return raw


def max_positions(config) -> int:
  """The longest input a body of ``config`` (a checked dict or a transformers config) takes:
  RoBERTa-like models keep ``pad_token_id + 1`` position rows before the first token."""
  get = config.get if isinstance(config, dict) else (lambda key, default=None:
                                                      getattr(config, key, default))
  limit = int(get("max_position_embeddings"))
  if get("model_type") in ("roberta", "xlm-roberta"):
    limit -= int(get("pad_token_id", 1) or 0) + 1
  return limit
