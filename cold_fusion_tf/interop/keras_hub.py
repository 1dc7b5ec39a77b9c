"""Published bases for Keras 3 / keras-hub (keras-nlp): a keras-hub preset directory.

keras-hub reads a Hugging Face directory itself when its ``config.json`` has a
``model_type``, so a published BERT base loads directly with
``keras_hub.models.Backbone.from_preset(base_dir)``. A RoBERTa base does not: keras-hub's
RoBERTa converter looks up tensor names with a ``roberta.`` prefix (bases store the body's
names without it), and its backbone has no token-type table, which fine-tuning (and so
fusion) changes. :func:`export_preset` writes keras-hub's own preset layout for both
families (``config.json`` in Keras format, ``model.weights.h5``, ``preprocessor.json``,
``tokenizer.json``, vocabulary assets, ``metadata.json``) through keras-hub's public API
only: the backbone is the keras-hub body's (:mod:`cold_fusion_tf.model.keras_hub_body`:
weights checked and mapped by this project), the RoBERTa token-type row is folded into the
position embeddings (every token adds it, so the sum is unchanged), and the tokenizer and
preprocessor are keras-hub's public classes built from the base's vocabulary files.

Numerics: keras-hub's BERT uses the tanh approximation of GELU where Hugging Face BERT uses
the exact erf form, so BERT hidden states differ by about 1e-3 (the architectures are
otherwise identical); RoBERTa uses the exact form in both and matches to float32 rounding.
"""

from __future__ import annotations

import os

from cold_fusion_tf.errors import UserError
from cold_fusion_tf.model import hf_config
from cold_fusion_tf.model import keras_hub_body
from cold_fusion_tf.model import keras_hub_names
from cold_fusion_tf.model import tokenizer as tokenizer_lib


def read_hf_config(base_dir: str) -> dict:
  """The base's ``config.json``, checked for what keras-hub's backbones compute."""
  config, path = hf_config.read_raw(base_dir)
  keras_hub_names.check_config(hf_config.check(config, path), path)
  return config


def load_backbone(base_dir: str):
  """A keras-hub ``BertBackbone`` / ``RobertaBackbone`` holding a base's checked weights
  (RoBERTa's token-type row folded into its position embeddings)."""
  body = keras_hub_body.load(base_dir)
  backbone = body.backbone
  if body.model_type == "roberta":
    variables = {v.path: v for v in body.encoder.weights}
    table = variables["embeddings/position_embedding/embeddings"]
    row = variables["token_type_embedding/embeddings"]
    table.assign(keras_hub_names.to_numpy(table) + keras_hub_names.to_numpy(row)[0][None, :])
  return backbone


def load_tokenizer(base_dir: str):
  """The keras-hub tokenizer built from a base's vocabulary files."""
  import keras_hub  # pylint: disable=g-import-not-at-top
  family = read_hf_config(base_dir)["model_type"]
  needed = ("vocab.txt",) if family == "bert" else ("vocab.json", "merges.txt")
  for name in needed:
    if not os.path.exists(os.path.join(base_dir, name)):
      raise UserError(f"{base_dir}: missing {name}, which the keras-hub {family} tokenizer "
                      "needs.")
  if family == "roberta":
    return keras_hub.models.RobertaTokenizer(vocabulary=os.path.join(base_dir, "vocab.json"),
                                             merges=os.path.join(base_dir, "merges.txt"))
  settings = tokenizer_lib.read_settings(base_dir)
  lowercase = bool(settings.get("do_lower_case", True))
  strip_accents = settings.get("strip_accents")
  return keras_hub.models.BertTokenizer(
      vocabulary=os.path.join(base_dir, "vocab.txt"), lowercase=lowercase,
      strip_accents=lowercase if strip_accents is None else bool(strip_accents))


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
  if sequence_length is not None and sequence_length > longest:
    raise UserError(f"--sequence_length={sequence_length}: above the {longest} positions this "
                    f"model takes; give at most {longest}, or leave it out ({min(512, longest)}).")
  length = min(sequence_length or 512, longest)
  cls = (keras_hub.models.BertTextClassifierPreprocessor if family == "bert"
         else keras_hub.models.RobertaTextClassifierPreprocessor)
  preprocessor = cls(tokenizer=tokenizer, sequence_length=length)
  os.makedirs(out_dir, exist_ok=True)
  backbone.save_to_preset(out_dir)
  preprocessor.save_to_preset(out_dir)
  return out_dir
