"""keras-hub backbone variables <-> Hugging Face (PyTorch) tensor names and layouts.

The Keras 3 counterpart of :mod:`cold_fusion_tf.model.hf_names`, owned by this project
(keras-hub's own converters are private modules and only go one way). A variable is known by
its Keras path (``transformer_layer_0/self_attention_layer/query/kernel``), which is what
keras-hub writes into its weight files, so it stays put across releases.

Layouts: Dense kernels are the transpose of the PyTorch weight; the attention projections
also split the hidden axis into (heads, head size); everything else is copied. RoBERTa's
position table in keras-hub starts at Hugging Face's row 2 (rows 0 and 1 belong to the
padding index and are never used): the body keeps those two rows aside and writes them back.
Every conversion is a transpose, a reshape or a slice, so HF -> Keras 3 -> HF is bitwise.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Mapping

import numpy as np

from cold_fusion_tf.errors import UserError

FAMILIES = ("bert", "roberta")
# Position rows keras-hub leaves out (Hugging Face RoBERTa counts positions from pad id + 1).
POSITION_OFFSET = {"bert": 0, "roberta": 2}
LAYER_NORM_EPS = {"bert": 1e-12, "roberta": 1e-5}
# Tensors of the Hugging Face body the keras-hub encoder has no variable for; carried through.
CARRIED = {"bert": (), "roberta": ("pooler.dense.weight", "pooler.dense.bias")}

_LAYER = [  # (keras path under transformer_layer_<i>/, HF name under encoder.layer.<i>., kind)
    ("self_attention_layer/query/kernel", "attention.self.query.weight", "split_transposed"),
    ("self_attention_layer/query/bias", "attention.self.query.bias", "split"),
    ("self_attention_layer/key/kernel", "attention.self.key.weight", "split_transposed"),
    ("self_attention_layer/key/bias", "attention.self.key.bias", "split"),
    ("self_attention_layer/value/kernel", "attention.self.value.weight", "split_transposed"),
    ("self_attention_layer/value/bias", "attention.self.value.bias", "split"),
    ("self_attention_layer/attention_output/kernel", "attention.output.dense.weight",
     "split_transposed"),
    ("self_attention_layer/attention_output/bias", "attention.output.dense.bias", "copy"),
    ("self_attention_layer_norm/gamma", "attention.output.LayerNorm.weight", "copy"),
    ("self_attention_layer_norm/beta", "attention.output.LayerNorm.bias", "copy"),
    ("feedforward_intermediate_dense/kernel", "intermediate.dense.weight", "transposed"),
    ("feedforward_intermediate_dense/bias", "intermediate.dense.bias", "copy"),
    ("feedforward_output_dense/kernel", "output.dense.weight", "transposed"),
    ("feedforward_output_dense/bias", "output.dense.bias", "copy"),
    ("feedforward_layer_norm/gamma", "output.LayerNorm.weight", "copy"),
    ("feedforward_layer_norm/beta", "output.LayerNorm.bias", "copy"),
]
_EMBEDDINGS = {  # keras path -> (HF name, kind)
    "bert": {
        "token_embedding/embeddings": ("embeddings.word_embeddings.weight", "copy"),
        "position_embedding/embeddings": ("embeddings.position_embeddings.weight", "copy"),
        "segment_embedding/embeddings": ("embeddings.token_type_embeddings.weight", "copy"),
        "embeddings_layer_norm/gamma": ("embeddings.LayerNorm.weight", "copy"),
        "embeddings_layer_norm/beta": ("embeddings.LayerNorm.bias", "copy"),
        "pooled_dense/kernel": ("pooler.dense.weight", "transposed"),
        "pooled_dense/bias": ("pooler.dense.bias", "copy"),
    },
    "roberta": {
        "embeddings/token_embedding/embeddings": ("embeddings.word_embeddings.weight", "copy"),
        "embeddings/position_embedding/embeddings": ("embeddings.position_embeddings.weight",
                                                     "offset_rows"),
        "token_type_embedding/embeddings": ("embeddings.token_type_embeddings.weight", "copy"),
        "embeddings_layer_norm/gamma": ("embeddings.LayerNorm.weight", "copy"),
        "embeddings_layer_norm/beta": ("embeddings.LayerNorm.bias", "copy"),
    },
}
_LAYER_PATH = re.compile(r"^transformer_layer_(\d+)/(.+)$")


@dataclasses.dataclass(frozen=True)
class Entry:
  """One keras-hub variable and the Hugging Face tensor it holds."""
  keras_path: str
  hf_name: str
  kind: str  # copy | transposed | split | split_transposed | offset_rows


def hf_name(family: str, keras_path: str) -> Entry:
  """The entry of a keras-hub variable path; an unknown path is an error (a keras-hub
  release that renamed its layers)."""
  found = _EMBEDDINGS[family].get(keras_path)
  if found:
    return Entry(keras_path, *found)
  match = _LAYER_PATH.match(keras_path)
  if match:
    for suffix, name, kind in _LAYER:
      if match.group(2) == suffix:
        return Entry(keras_path, f"encoder.layer.{match.group(1)}.{name}", kind)
  raise UserError(f"keras-hub variable {keras_path!r} has no Hugging Face name in this "
                  f"project's {family} mapping; use the keras-hub version in requirements.txt.")


def hf_specs(config: Mapping) -> dict[str, tuple[tuple[int, ...], str]]:
  """HF name -> (shape, dtype) of the body of ``config`` (what a base file must hold)."""
  h, inner = config["hidden_size"], config["intermediate_size"]
  specs = {
      "embeddings.word_embeddings.weight": (config["vocab_size"], h),
      "embeddings.position_embeddings.weight": (config["max_position_embeddings"], h),
      "embeddings.token_type_embeddings.weight": (config.get("type_vocab_size", 2), h),
      "embeddings.LayerNorm.weight": (h,), "embeddings.LayerNorm.bias": (h,),
      "pooler.dense.weight": (h, h), "pooler.dense.bias": (h,),
  }
  layer_shapes = {"attention.self.query.weight": (h, h), "attention.self.key.weight": (h, h),
                  "attention.self.value.weight": (h, h), "attention.output.dense.weight": (h, h),
                  "intermediate.dense.weight": (inner, h), "intermediate.dense.bias": (inner,),
                  "output.dense.weight": (h, inner)}
  for i in range(config["num_hidden_layers"]):
    for _, name, _ in _LAYER:
      specs[f"encoder.layer.{i}.{name}"] = layer_shapes.get(name, (h,))
  return {name: (tuple(shape), "F32") for name, shape in specs.items()}


def to_keras(entry: Entry, value: np.ndarray, shape: tuple[int, ...], offset: int) -> np.ndarray:
  """A Hugging Face tensor in the layout of the keras-hub variable of ``shape``."""
  if entry.kind in ("transposed", "split_transposed"):
    value = value.T
  elif entry.kind == "offset_rows":
    value = value[offset:]
  return np.ascontiguousarray(np.reshape(value, shape))


def to_hf(entry: Entry, value: np.ndarray, shape: tuple[int, ...],
          carried: Mapping[str, np.ndarray], offset: int) -> np.ndarray:
  """A keras-hub variable's value as the Hugging Face tensor of ``shape``."""
  if entry.kind in ("transposed", "split_transposed"):
    value = np.reshape(value, shape[::-1]).T
  elif entry.kind == "offset_rows":
    value = np.concatenate([carried[entry.hf_name][:offset], value], axis=0)
  return np.ascontiguousarray(np.reshape(value, shape))


def to_numpy(value) -> np.ndarray:
  """A Keras 3 variable's (or tensor's) value on the host, on either backend."""
  value = getattr(value, "value", value)
  return value.numpy() if hasattr(value, "numpy") else np.asarray(value)


def check_config(config: Mapping, source: str) -> str:
  """The family of a checked ``config.json`` if keras-hub's backbone computes what the
  Hugging Face model does; otherwise an error listing every difference."""
  family = config.get("model_type")
  if family not in FAMILIES:
    raise UserError(f"{source}: the keras_hub body supports BERT and RoBERTa bases, not "
                    f"{family!r}; use --config.model.body=transformers_tf.")
  problems = []
  if config.get("hidden_act", "gelu") != "gelu":
    problems.append(f"hidden_act={config.get('hidden_act')!r} (keras-hub uses gelu)")
  eps = config.get("layer_norm_eps", 1e-12)
  if not math.isclose(eps, LAYER_NORM_EPS[family], rel_tol=1e-6):
    problems.append(f"layer_norm_eps={eps} (keras-hub's {family} uses {LAYER_NORM_EPS[family]})")
  if config.get("position_embedding_type", "absolute") != "absolute":
    problems.append(f"position_embedding_type={config.get('position_embedding_type')!r}")
  if family == "roberta" and config.get("pad_token_id", 1) != 1:
    problems.append(f"pad_token_id={config.get('pad_token_id')} (keras-hub assumes 1)")
  if config["hidden_size"] % config["num_attention_heads"]:
    problems.append(f"hidden_size={config['hidden_size']} is not a multiple of "
                    f"num_attention_heads={config['num_attention_heads']}")
  if config["max_position_embeddings"] <= POSITION_OFFSET[family]:
    problems.append(f"max_position_embeddings={config['max_position_embeddings']}")
  if problems:
    raise UserError(f"{source}: this model differs from keras-hub's {family} architecture: "
                    + "; ".join(problems) + ".")
  return family
