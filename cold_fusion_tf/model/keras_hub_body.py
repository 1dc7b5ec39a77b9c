"""The keras-hub body: a BERT or RoBERTa encoder on Keras 3, on the TensorFlow or JAX backend.

Built with keras-hub's public backbone classes (``keras_hub.models.BertBackbone``,
``RobertaBackbone``) from a base's checked ``config.json``; its weights come from the base's
``model.safetensors`` through this project's mapping (:mod:`.keras_hub_names`) and go back
out under the same Hugging Face names, so the store and the fuser never see which body
trained a contribution. Nothing here imports transformers.

Two places where keras-hub's backbones differ from Hugging Face's models, and what is done:

* RoBERTa adds its token-type row 0 to every token; keras-hub's ``RobertaBackbone`` has no
  such table. The encoder here calls the backbone's own layers with one more layer between
  the embeddings and their layer norm that adds that row (trained like the rest), so the
  function and every tensor are Hugging Face's.
* keras-hub's BERT uses the tanh approximation of GELU, Hugging Face BERT the exact erf
  form: BERT hidden states differ from the transformers-TF body's by about 1e-3 relative (5e-3
  on MiniLM), and training is otherwise the same. RoBERTa uses the exact form in both.
"""

from __future__ import annotations

import os

import keras
import numpy as np

from cold_fusion_tf.errors import UserError
from cold_fusion_tf.model import hf_config
from cold_fusion_tf.model import keras_hub_names as names
from cold_fusion_tf.model import tokenizer as tokenizer_lib
from cold_fusion_tf.tensors import safetensors_io

BODY_TYPE = "keras_hub"


class TokenTypeRow(keras.layers.Layer):
  """Adds row 0 of a token-type table to every position (RoBERTa's segment embedding)."""

  def __init__(self, rows: int, hidden: int, initializer_range: float = 0.02, **kwargs):
    super().__init__(**kwargs)
    self.rows, self.hidden, self.initializer_range = rows, hidden, initializer_range

  def build(self, input_shape):
    self.embeddings = self.add_weight(
        shape=(self.rows, self.hidden), name="embeddings",
        initializer=keras.initializers.TruncatedNormal(stddev=self.initializer_range))

  def call(self, x):
    return x + keras.ops.cast(self.embeddings[0], x.dtype)


class KerasHubBody:
  """An encoder body: Hugging Face-named token inputs in, hidden states out.

  ``encoder`` is a functional ``keras.Model`` taking ``input_ids``, ``attention_mask`` (and
  ``token_type_ids`` for BERT), returning the last hidden states.
  """

  body_type = BODY_TYPE

  def __init__(self, config: dict, source: str, dtype=None):
    self.config = config
    self.model_type = names.check_config(config, source)
    self.input_names = (("input_ids", "attention_mask", "token_type_ids")
                        if self.model_type == "bert" else ("input_ids", "attention_mask"))
    self.hidden_size = config["hidden_size"]
    self.dropout = float(config.get("hidden_dropout_prob", 0.1))
    self.initializer_range = float(config.get("initializer_range", 0.02))
    self.offset = names.POSITION_OFFSET[self.model_type]
    self.max_positions = hf_config.max_positions(config)
    self.encoder = self._build_encoder(dtype)
    self.specs = names.hf_specs(config)
    self.entries = {}
    for variable in self.encoder.weights:
      entry = names.hf_name(self.model_type, variable.path)
      if entry.hf_name in {e.hf_name for e in self.entries.values()}:
        raise UserError(f"two keras-hub variables map onto {entry.hf_name}.")
      self.entries[variable.path] = entry
    self.carried: dict[str, np.ndarray] = {}

  @property
  def backend(self) -> str:
    return keras.backend.backend()

  def _build_encoder(self, dtype) -> keras.Model:
    import keras_hub  # pylint: disable=g-import-not-at-top
    c = self.config
    shape = dict(vocabulary_size=c["vocab_size"], num_layers=c["num_hidden_layers"],
                 num_heads=c["num_attention_heads"], hidden_dim=c["hidden_size"],
                 intermediate_dim=c["intermediate_size"], dropout=self.dropout,
                 max_sequence_length=self.max_positions, dtype=dtype)
    inputs = {n: keras.Input(shape=(None,), dtype="int32", name=n) for n in self.input_names}
    if self.model_type == "bert":
      backbone = keras_hub.models.BertBackbone(num_segments=c.get("type_vocab_size", 2), **shape)
      backbone.get_layer("pooled_dense").trainable = False  # the head reads the first token
      hidden = backbone({"token_ids": inputs["input_ids"], "segment_ids": inputs["token_type_ids"],
                         "padding_mask": inputs["attention_mask"]})["sequence_output"]
    else:
      backbone = keras_hub.models.RobertaBackbone(**shape)
      x = backbone.embeddings(inputs["input_ids"])
      x = TokenTypeRow(c.get("type_vocab_size", 1), c["hidden_size"], self.initializer_range,
                       dtype=dtype, name="token_type_embedding")(x)
      x = backbone.embeddings_dropout(backbone.embeddings_layer_norm(x))
      for layer in backbone.transformer_layers:
        x = layer(x, padding_mask=inputs["attention_mask"])
      hidden = x
    self.backbone = backbone  # keras-hub's own backbone (its layers are the encoder's)
    return keras.Model(inputs, hidden, name=f"{self.model_type}_encoder")

  def __call__(self, features, training=False):
    """Hidden states [batch, length, hidden] of a dict of Hugging Face-named int arrays."""
    return self.encoder({n: features[n] for n in self.input_names}, training=training)

  def assign_hf_tensors(self, tensors, source: str) -> None:
    """Sets the weights from Hugging Face-named tensors, after checking them all (names,
    shapes, dtypes, finiteness); ``*.position_ids`` buffers are ignored."""
    safetensors_io.check_tensors(tensors, self.specs, source)
    by_path = {v.path: v for v in self.encoder.weights}
    for path, entry in self.entries.items():
      variable = by_path[path]
      variable.assign(names.to_keras(entry, tensors[entry.hf_name], tuple(variable.shape),
                                     self.offset))
    kept = list(names.CARRIED[self.model_type])
    kept += [e.hf_name for e in self.entries.values() if e.kind == "offset_rows"]
    self.carried = {n: np.array(tensors[n], copy=True) for n in kept}

  def hf_tensors(self) -> dict[str, np.ndarray]:
    """The weights under Hugging Face names, in Hugging Face (PyTorch) layouts."""
    if not self.carried and names.CARRIED[self.model_type]:
      raise ValueError("hf_tensors() needs a body loaded from a base (assign_hf_tensors).")
    out = dict(self.carried)
    for variable in self.encoder.weights:
      entry = self.entries[variable.path]
      value = names.to_numpy(variable).astype(np.float32, copy=False)
      out[entry.hf_name] = names.to_hf(entry, value, self.specs[entry.hf_name][0], self.carried,
                                       self.offset)
    return {n: out[n] for n in self.specs}

  def finetune(self, tokenizer, task, recipe, **kwargs):
    """Fine-tunes this body (in place) with a fresh head; see
    :func:`cold_fusion_tf.training.keras_trainer.finetune`."""
    from cold_fusion_tf.training import keras_trainer  # pylint: disable=g-import-not-at-top
    return keras_trainer.finetune(self, tokenizer, task, recipe, **kwargs)


def load(base_dir: str, *, dtype=None, scope=None, source: str | None = None) -> KerasHubBody:
  """The body of a base directory, its weights checked and assigned.

  ``scope`` (a ``tf.distribute`` strategy's or a ``keras.distribution``'s scope) is entered
  while the variables are created; ``dtype`` is a Keras dtype policy (``mixed_bfloat16``).
  """
  config, config_path = hf_config.read(base_dir), os.path.join(base_dir, "config.json")
  names.check_config(config, config_path)
  path = os.path.join(base_dir, "model.safetensors")
  where = source or path
  tensors = safetensors_io.load_checked(path, names.hf_specs(config), where)
  if scope is None:
    body = KerasHubBody(config, config_path, dtype)
  else:
    with scope:
      body = KerasHubBody(config, config_path, dtype)
  body.assign_hf_tensors(tensors, where)
  return body


def load_tokenizer(base_dir: str) -> tokenizer_lib.Tokenizer:
  config, config_path = hf_config.read_raw(base_dir)
  return tokenizer_lib.load(base_dir, hf_config.check(config, config_path)["model_type"])
