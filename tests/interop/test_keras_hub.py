"""Keras 3 / keras-hub: published bases load with ``from_preset`` and match the TF body.

Tolerances: keras-hub's RoBERTa computes what Hugging Face's does, so hidden states agree to
float32 rounding (< 1e-5). keras-hub's BERT uses the tanh approximation of GELU where
Hugging Face BERT uses the exact erf form: on MiniLM the hidden states differ by about 5e-3
(values up to about 6); a TF body switched to the tanh GELU (``gelu_new``) agrees with
keras-hub to < 1e-4, which shows the GELU is the only difference.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from cold_fusion_tf.store import refs
from cold_fusion_tf.interop import keras_hub as keras_hub_export
from cold_fusion_tf.model import bodies as models
from cold_fusion_tf.tensors import safetensors_io as weights
from cold_fusion_tf.model import hf_names
from cold_fusion_tf.errors import UserError
import published as im
import tiny

keras_hub = pytest.importorskip("keras_hub")
keras = pytest.importorskip("keras")


@pytest.fixture(scope="module")
def minilm_base():
  return refs.resolve(im.minilm_store()).directory


@pytest.fixture(scope="module")
def roberta_base():
  return refs.resolve(im.tiny_roberta_store()).directory


def _encode(base_dir, n=32):
  tokenizer = models.load_tokenizer(base_dir)
  return tokenizer(im.texts("sst2", "dev", n), padding=True, truncation=True, max_length=64,
                   return_tensors="np")


def _keras_hub_hidden(backbone, enc):
  x = {"token_ids": enc["input_ids"], "padding_mask": enc["attention_mask"]}
  if "token_type_ids" in enc:
    x["segment_ids"] = enc["token_type_ids"]
  out = backbone(x)
  return np.asarray(out["sequence_output"] if isinstance(out, dict) else out)


def _tf_hidden(body, enc):
  return body(**dict(enc), training=False).last_hidden_state.numpy()


def test_published_bert_base_loads_directly(minilm_base):
  # Execute
  backbone = keras_hub.models.Backbone.from_preset(minilm_base)
  # Assert
  assert type(backbone).__name__ == "BertBackbone"
  enc = _encode(minilm_base)
  real = enc["attention_mask"].astype(bool)
  ours = _keras_hub_hidden(backbone, enc)
  diff_exact = np.abs(ours - _tf_hidden(models.load_body(minilm_base), enc))[real].max()
  # The same weights in a TF body with the tanh GELU keras-hub uses.
  config = models.read_config(minilm_base)
  config.hidden_act = "gelu_new"
  tanh_body = models.build_body(config)
  path = os.path.join(minilm_base, "model.safetensors")
  hf_names.assign_body_tensors(
      tanh_body, weights.load_checked(path, hf_names.expected_specs(tanh_body), path), path)
  diff_tanh = np.abs(ours - _tf_hidden(tanh_body, enc))[real].max()
  assert diff_tanh < 1e-4, diff_tanh
  assert diff_exact < 1e-2, diff_exact
  # keras-hub's tokenizer reads the base's vocabulary and splits like Hugging Face's.
  hub_tokenizer = keras_hub.tokenizers.Tokenizer.from_preset(minilm_base)
  hf_tokenizer = models.load_tokenizer(minilm_base)
  for text in im.texts("sst2", "dev", 16):
    assert np.asarray(hub_tokenizer(text)).tolist() == hf_tokenizer(
        text, add_special_tokens=False)["input_ids"]


def test_exported_roberta_preset_matches_and_fits(roberta_base, tmp_path):
  # Execute
  out = keras_hub_export.export_preset(roberta_base, str(tmp_path / "preset"), 48)
  # Assert
  assert {"config.json", "model.weights.h5", "preprocessor.json", "tokenizer.json",
          "metadata.json", "assets"} <= set(os.listdir(out))
  backbone = keras_hub.models.Backbone.from_preset(out)
  assert type(backbone).__name__ == "RobertaBackbone"
  enc = _encode(roberta_base)
  real = enc["attention_mask"].astype(bool)
  # The token-type row (far from zero here) is folded into the position embeddings.
  diff = np.abs(_keras_hub_hidden(backbone, enc)
                - _tf_hidden(models.load_body(roberta_base), enc))[real].max()
  assert diff < 1e-5, diff
  # The preset's preprocessor gives the Hugging Face token ids.
  preprocessor = keras_hub.models.TextClassifierPreprocessor.from_preset(out)
  assert preprocessor.sequence_length == 48
  texts = im.texts("sst2", "dev", 4)
  hub_ids = np.asarray(preprocessor(texts)["token_ids"])
  hf = models.load_tokenizer(roberta_base)(texts, padding="max_length", truncation=True,
                                          max_length=48)
  np.testing.assert_array_equal(hub_ids, np.asarray(hf["input_ids"]))
  _short_fit(out)


def test_exported_bert_preset_matches_the_direct_load(tmp_path):
  # Prepare
  base = refs.resolve(im.tiny_bert_store()).directory
  # Execute
  out = keras_hub_export.export_preset(base, str(tmp_path / "preset"), 32)
  # Assert
  enc = _encode(base, 8)
  exported = _keras_hub_hidden(keras_hub.models.Backbone.from_preset(out), enc)
  direct = _keras_hub_hidden(keras_hub.models.Backbone.from_preset(base), enc)
  np.testing.assert_array_equal(exported, direct)
  classifier = keras_hub.models.TextClassifier.from_preset(out, num_classes=3)
  assert type(classifier).__name__ == "BertTextClassifier"
  assert classifier.preprocessor.sequence_length == 32
  # (tests/test_readme_snippets.py fine-tunes a BERT preset with fit.)
  # Execute / Assert: a length beyond the model's positions is refused, nothing written.
  with pytest.raises(UserError, match=r"--sequence_length=100000: above the \d+ positions"):
    keras_hub_export.export_preset(base, str(tmp_path / "long"), 100000)
  assert not os.path.exists(tmp_path / "long")


def _short_fit(preset):
  classifier = keras_hub.models.TextClassifier.from_preset(preset, num_classes=2)
  classifier.compile(optimizer=keras.optimizers.AdamW(5e-5, weight_decay=0.01),
                     loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                     metrics=["accuracy"])
  rows = im.rows("sst2", "train", 8)
  history = classifier.fit(x=[r["text"] for r in rows], y=np.array([r["label"] for r in rows]),
                           batch_size=4, epochs=1, verbose=0)
  assert np.isfinite(history.history["loss"][0])


def test_incompatible_architectures_are_refused(tmp_path):
  # Prepare
  # tests.tiny's RoBERTa keeps transformers' default layer-norm epsilon (1e-12).
  source = tiny.write_tiny_base(str(tmp_path / "roberta"), "roberta")
  # Execute / Assert
  with pytest.raises(UserError, match=r"layer_norm_eps=1e-12 \(keras-hub's roberta uses 1e-05\)"):
    keras_hub_export.export_preset(source, str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")
