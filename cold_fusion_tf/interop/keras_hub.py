"""Published bases for Keras 3 / keras-hub (keras-nlp): a keras-hub preset directory.

keras-hub 0.32 reads a Hugging Face directory itself when its ``config.json`` has a
``model_type``, so a published BERT base loads directly with
``keras_hub.models.Backbone.from_preset(base_dir)``. A RoBERTa base does not: keras-hub's
RoBERTa converter looks up tensor names with a ``roberta.`` prefix (bases store the body's
names without it), and it drops ``token_type_embeddings``, which fine-tuning (and so
fusion) changes. :func:`export_preset` writes keras-hub's own preset layout for both
families (``config.json`` in Keras format, ``model.weights.h5``, ``preprocessor.json``,
``tokenizer.json``, vocabulary assets, ``metadata.json``): weights are read and checked
here, mapped with keras-hub's own converters, the RoBERTa token-type row is folded into the
position embeddings (every token adds it, so the sum is unchanged), and any tensor left
unused is an error.

Numerics: keras-hub's BERT uses the tanh approximation of GELU where Hugging Face BERT uses
the exact erf form, so BERT hidden states differ by about 1e-3 (the architectures are
otherwise identical); RoBERTa uses the exact form in both and matches to float32 rounding.
"""

from __future__ import annotations

import math
import os

import numpy as np

from cold_fusion_tf.tensors import safetensors_io as weights
from cold_fusion_tf.errors import UserError

# Tensors keras-hub's backbones have no place for (the heads read the first token instead).
_UNUSED = {"bert": (), "roberta": ("pooler.dense.weight", "pooler.dense.bias")}
_LAYER_NORM_EPS = {"bert": 1e-12, "roberta": 1e-5}


def read_hf_config(base_dir: str) -> dict:
  """The raw ``config.json``, checked for what keras-hub's converters assume."""
  from cold_fusion_tf.model import bodies as models  # pylint: disable=g-import-not-at-top
  config, path = models.read_raw_config(base_dir)
  models.config_from_dict(config, path)  # model type and sizes
  family = config.get("model_type")
  if family not in _LAYER_NORM_EPS:
    raise UserError(f"{path}: keras-hub export supports BERT and RoBERTa bases, not "
                    f"{family!r}.")
  problems = []
  if config.get("hidden_act", "gelu") != "gelu":
    problems.append(f"hidden_act={config.get('hidden_act')!r} (keras-hub uses gelu)")
  eps = config.get("layer_norm_eps", 1e-12)
  if not math.isclose(eps, _LAYER_NORM_EPS[family], rel_tol=1e-6):
    problems.append(f"layer_norm_eps={eps} (keras-hub's {family} uses "
                    f"{_LAYER_NORM_EPS[family]})")
  if config.get("position_embedding_type", "absolute") != "absolute":
    problems.append(f"position_embedding_type={config.get('position_embedding_type')!r}")
  if family == "roberta" and config.get("pad_token_id", 1) != 1:
    problems.append(f"pad_token_id={config.get('pad_token_id')} (keras-hub assumes 1)")
  if problems:
    raise UserError(f"{path}: this model differs from keras-hub's {family} architecture: "
                    + "; ".join(problems) + ".")
  return config


class _CheckedTensors:
  """keras-hub's ``SafetensorLoader`` interface over tensors this package has checked.

  Accepts the prefixed names keras-hub's converters ask for (``roberta.embeddings...``),
  checks every shape, and remembers which tensors were used.
  """

  def __init__(self, tensors, prefix: str, source: str):
    self.tensors, self.prefix, self.source, self.used = tensors, prefix, source, set()

  def get_tensor(self, key: str) -> np.ndarray:
    for name in (key, key.removeprefix(self.prefix)):
      if name in self.tensors:
        self.used.add(name)
        return self.tensors[name]
    raise KeyError(f"{self.source}: no tensor {key}")

  def port_weight(self, keras_variable, hf_weight_key, hook_fn=None) -> None:
    value = self.get_tensor(hf_weight_key)
    if hook_fn:
      value = hook_fn(value, list(keras_variable.shape))
    if tuple(value.shape) != tuple(keras_variable.shape):
      raise UserError(f"{self.source}: tensor {hf_weight_key} has shape {tuple(value.shape)}, "
                      f"keras-hub expects {tuple(keras_variable.shape)}.")
    keras_variable.assign(value)


def _converter(family: str):
  """keras-hub's own Hugging Face converter module for ``family`` (its config and weight maps)."""
  import importlib  # pylint: disable=g-import-not-at-top
  return importlib.import_module(f"keras_hub.src.utils.transformers.convert_{family}")


def load_backbone(base_dir: str):
  """A keras-hub ``BertBackbone`` / ``RobertaBackbone`` holding a base's checked weights."""
  config = read_hf_config(base_dir)
  family = config["model_type"]
  path = os.path.join(base_dir, "model.safetensors")
  if not os.path.exists(path):
    raise UserError(f"{base_dir}: missing model.safetensors.")
  tensors = dict(weights.load_checked(path, weights.specs_of_file(path), path))
  converter = _converter(family)
  kwargs = converter.convert_backbone_config(config)
  if family == "bert":
    kwargs["num_segments"] = config.get("type_vocab_size", 2)
    kwargs["dropout"] = config.get("hidden_dropout_prob", 0.1)
  else:
    token_types = tensors.pop("embeddings.token_type_embeddings.weight", None)
    if token_types is not None:  # HF RoBERTa adds row 0 to every token: fold it in.
      position = "embeddings.position_embeddings.weight"
      tensors[position] = tensors[position] + token_types[0][None, :]
  backbone = converter.backbone_cls(**kwargs)
  loader = _CheckedTensors(tensors, f"{family}.", path)
  converter.convert_weights(backbone, loader, config)
  left = sorted(n for n in tensors if n not in loader.used and not n.endswith("position_ids")
                and n not in _UNUSED[family])
  if left:
    raise UserError(f"{path}: tensors keras-hub's {family} backbone has no place for: "
                    f"{left[:5]}.")
  return backbone


def load_tokenizer(base_dir: str):
  """The keras-hub tokenizer built from a base's vocabulary files."""
  import keras_hub  # pylint: disable=g-import-not-at-top
  family = read_hf_config(base_dir)["model_type"]
  needed = ("vocab.txt", "tokenizer_config.json") if family == "bert" else ("vocab.json",
                                                                             "merges.txt")
  for name in needed:
    if not os.path.exists(os.path.join(base_dir, name)):
      raise UserError(f"{base_dir}: missing {name}, which the keras-hub {family} tokenizer "
                      "needs.")
  cls = keras_hub.models.BertTokenizer if family == "bert" else keras_hub.models.RobertaTokenizer
  return _converter(family).convert_tokenizer(cls, base_dir)


def export_preset(base_dir: str, out_dir: str, sequence_length: int | None = None) -> str:
  """Writes a keras-hub preset directory for a base; returns ``out_dir``.

  It loads with ``keras_hub.models.Backbone.from_preset(out_dir)``,
  ``keras_hub.models.TextClassifier.from_preset(out_dir, num_classes=...)`` and the
  matching tokenizer and preprocessor classes. ``sequence_length`` (default: the longest
  the model takes, at most 512) is the preprocessor's padded length.
  """
  import keras_hub  # pylint: disable=g-import-not-at-top
  family = read_hf_config(base_dir)["model_type"]
  backbone = load_backbone(base_dir)
  tokenizer = load_tokenizer(base_dir)
  longest = int(backbone.max_sequence_length)
  length = min(sequence_length or 512, longest)
  cls = (keras_hub.models.BertTextClassifierPreprocessor if family == "bert"
         else keras_hub.models.RobertaTextClassifierPreprocessor)
  preprocessor = cls(tokenizer=tokenizer, sequence_length=length)
  os.makedirs(out_dir, exist_ok=True)
  backbone.save_to_preset(out_dir)
  preprocessor.save_to_preset(out_dir)
  return out_dir
