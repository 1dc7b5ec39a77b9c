"""Encoder bodies (``TFAutoModel``) and fresh task heads (small Keras layers).

A base model directory is a Hugging Face directory (``config.json``, ``model.safetensors``
in PyTorch layout, tokenizer files). Bodies are built from the checked ``config.json`` and
their weights assigned through :mod:`cold_fusion_tf.tensors.safetensors_io`, so nothing from the store is
deserialised by anything but the safetensors reader.
"""

from __future__ import annotations

import copy
import json
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # transformers' TF models need tf-keras

import tensorflow as tf  # pylint: disable=g-import-not-at-top
import tf_keras as keras  # pylint: disable=g-import-not-at-top
import transformers  # pylint: disable=g-import-not-at-top

from cold_fusion_tf import quiet  # pylint: disable=g-import-not-at-top
from cold_fusion_tf.tensors import safetensors_io as weights  # pylint: disable=g-import-not-at-top
from cold_fusion_tf.model import hf_config
from cold_fusion_tf.model import hf_names
from cold_fusion_tf.model import sources
from cold_fusion_tf.model import tokenizer as tokenizer_lib
from cold_fusion_tf.store import untrusted

from cold_fusion_tf.errors import UserError  # pylint: disable=g-import-not-at-top

quiet.init_devices()  # before any other TensorFlow work (see cold_fusion_tf.quiet)

SUPPORTED_MODEL_TYPES = hf_config.SUPPORTED_MODEL_TYPES


def read_config(model_dir: str) -> transformers.PretrainedConfig:
  """Parses and checks ``config.json`` of a model directory (against its weights too, see
  :func:`hf_config.read`)."""
  return config_from_dict(hf_config.read(model_dir), os.path.join(model_dir, "config.json"))


def config_from_dict(raw: dict, source: str) -> transformers.PretrainedConfig:
  return transformers.AutoConfig.for_model(**hf_config.check(raw, source))


def build_body(config: transformers.PretrainedConfig, source: str = "the model's config"):
  """A freshly initialised, built TF body for ``config`` (from ``source``, named in the
  UserError raised when transformers cannot build it)."""
  try:
    with quiet.transformers_tf():
      body = transformers.TFAutoModel.from_config(config)
    body(body.dummy_inputs, training=False)
  except (ValueError, KeyError, TypeError, AttributeError, tf.errors.OpError) as e:
    raise UserError(f"{source}: transformers cannot build a {config.model_type} body from it "
                    f"({untrusted.printable(str(e), 200)}).") from None
  return body


def load_body(model_dir: str, source: str | None = None):
  """The TF body of a base directory, its weights checked and assigned."""
  config = read_config(model_dir)  # checked against model.safetensors before building
  body = build_body(config, os.path.join(model_dir, "config.json"))
  path = os.path.join(model_dir, "model.safetensors")
  tensors = weights.load_checked(path, hf_names.expected_specs(body), source or path)
  hf_names.assign_body_tensors(body, tensors, source or path)
  return body


def load_tokenizer(model_dir: str):
  """The fast tokenizer saved beside a base (no network, never code of the base's own, only
  tokenizers of the supported families: see :func:`tokenizer.read_settings`)."""
  tokenizer_lib.read_settings(model_dir)
  try:
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True,
                                                           trust_remote_code=False)
  except Exception as e:  # pylint: disable=broad-except  (the Rust parser raises Exception)
    raise UserError(f"{model_dir}: cannot load the tokenizer "
                    f"({untrusted.printable(str(e), 300)}).") from None
  tokenizer_lib.check_ids(tokenizer.get_vocab(), model_dir)
  return tokenizer


def load_source_model(source: str):
  """(body, tokenizer) from any Hugging Face encoder: a local directory or a hub name.

  A hub name (``roberta-base``) downloads on a machine with internet, like
  ``TFAutoModel.from_pretrained`` itself.
  """
  local = sources.local_files_only(source)
  try:
    config = transformers.AutoConfig.from_pretrained(source, local_files_only=local)
  except (OSError, ValueError) as e:
    raise UserError(f"Cannot load model {source!r}: {e}") from e
  config_from_dict(config.to_dict(), source)  # checks the model type and sizes
  with quiet.transformers_tf():
    body = transformers.TFAutoModel.from_pretrained(source, config=config,
                                                    local_files_only=local)
  body(body.dummy_inputs, training=False)
  tokenizer = transformers.AutoTokenizer.from_pretrained(source, local_files_only=local)
  return body, tokenizer


DROPOUT_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout",
                  "attention_dropout")


def without_dropout(config):
  """A copy of a body's config with every dropout rate 0 (a frozen body's features)."""
  config = copy.deepcopy(config)
  for field in DROPOUT_FIELDS:
    if hasattr(config, field):
      setattr(config, field, 0.0)
  return config


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


def write_base_dir(body, tokenizer, out_dir: str, source: str | None = None) -> None:
  """Writes a body as a Hugging Face model directory (config, safetensors, tokenizer).

  ``config.json`` is minimal, like a published Hugging Face model's: the fields of the
  ``source`` model's own ``config.json`` (a directory or hub name the body was loaded from),
  else what ``save_pretrained`` writes for the body's config (the fields that differ from the
  defaults), with ``architectures`` naming the body's class.
  """
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
    json.dump(minimal_config(body.config, source), f, indent=2, sort_keys=True)
    f.write("\n")
  weights.save_safetensors(hf_names.body_tensors(body), os.path.join(out_dir, "model.safetensors"))
  tokenizer.save_pretrained(out_dir)


_ARCHITECTURES = {"bert": "BertModel", "roberta": "RobertaModel", "xlm-roberta": "XLMRobertaModel",
                  "electra": "ElectraModel", "distilbert": "DistilBertModel"}


def minimal_config(config: transformers.PretrainedConfig, source: str | None = None) -> dict:
  """The ``config.json`` of a base: see :func:`write_base_dir`."""
  if source:
    fields, _ = transformers.PretrainedConfig.get_config_dict(
        source, local_files_only=sources.local_files_only(source))
  else:
    fields = config.to_diff_dict()
    fields.pop("transformers_version", None)
  fields = {k: v for k, v in fields.items() if not k.startswith("_")}  # local paths, hashes
  fields["model_type"] = config.model_type
  fields["architectures"] = [_ARCHITECTURES[config.model_type]]
  return fields
