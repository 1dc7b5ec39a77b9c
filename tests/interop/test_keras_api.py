"""cold_fusion_tf.load_base / keras_classifier / load_classifier, and PyTorch interop.

Real MiniLM (BERT) base for what depends on real weights and vocabulary (hidden states,
in-graph tokenization); tiny random BERT (MiniLM's vocabulary) and RoBERTa (a real
byte-level BPE vocabulary) bases for training, saving and reloading.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy
import tensorflow as tf
import tf_keras as keras

import cold_fusion_tf
from cold_fusion_tf.store import refs
from cold_fusion_tf.interop import keras_api
from cold_fusion_tf import store as store_lib
from cold_fusion_tf.training import trainer as training
from cold_fusion_tf.model import hf_names
from cold_fusion_tf.errors import UserError
import published as im

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def minilm_store():
  return im.minilm_store()


@pytest.fixture(scope="module")
def tiny_bert_store():
  return im.tiny_bert_store()


@pytest.fixture(scope="module")
def tiny_roberta_store():
  return im.tiny_roberta_store()


def test_import_is_light_and_names_resolve_lazily():
  # Execute / Assert: a fresh interpreter imports the package without TensorFlow
  code = ("import sys, cold_fusion_tf as c; assert 'tensorflow' not in sys.modules; "
          "assert {'load_base', 'keras_classifier', 'load_classifier', 'compile_classifier'}"
          " <= set(dir(c))")
  subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
  # Assert
  assert cold_fusion_tf.load_base is keras_api.load_base
  assert cold_fusion_tf.keras_classifier is keras_api.keras_classifier
  assert cold_fusion_tf.compile_classifier is keras_api.compile_classifier
  with pytest.raises(AttributeError):
    getattr(cold_fusion_tf, "no_such_name")


def test_load_base_gives_the_published_weights(minilm_store):
  # Execute
  body, tokenizer = cold_fusion_tf.load_base(minilm_store)
  # Assert
  assert type(body).__name__ == "TFBertModel" and tokenizer.is_fast
  assert tokenizer("a b")["input_ids"] == [101, 1037, 1038, 102]
  base_dir = refs.resolve(minilm_store).directory
  published = safetensors.numpy.load_file(os.path.join(base_dir, "model.safetensors"))
  ours = hf_names.body_tensors(body)
  assert sorted(ours) == sorted(published)
  for name, value in ours.items():
    np.testing.assert_array_equal(value, published[name], err_msg=name)
  # iteration=0 and the base directory itself name the same model.
  assert refs.resolve(minilm_store, 0).directory == base_dir
  assert base_dir == store_lib.Store(minilm_store).base_dir(0)
  assert refs.resolve(base_dir).directory == base_dir


def test_load_base_errors_name_the_problem(minilm_store, tmp_path):
  # Execute / Assert
  with pytest.raises(UserError, match=r"base 3 is not published; .* holds bases 0\.\.0"):
    cold_fusion_tf.load_base(minilm_store, iteration=3)
  base_dir = refs.resolve(minilm_store).directory
  with pytest.raises(UserError, match="is a model directory, not a store"):
    cold_fusion_tf.load_base(base_dir, iteration=0)
  with pytest.raises(UserError, match="neither a ColD Fusion store .* nor a Hugging Face model directory"):
    cold_fusion_tf.load_base(str(tmp_path))
  with pytest.raises(UserError, match="does not exist"):
    cold_fusion_tf.load_base(str(tmp_path / "missing"))


def _pairs(n):
  rows = im.rows("rte", "train", n)
  return [r["text"] for r in rows], [r["text_pair"] for r in rows]


def test_in_graph_wordpiece_matches_the_hf_tokenizer(minilm_store):
  # Prepare
  _, tokenizer = cold_fusion_tf.load_base(minilm_store)
  settings = keras_api.wordpiece_settings(tokenizer)
  names = ("input_ids", "attention_mask", "token_type_ids")
  singles = im.texts("sst2", "train", 300) + [
      "Héllo WORLD, naïve café!", "中文字符 mixed with English", "emoji 😀 test",
      "tabs\tand\nnewlines", "x" * 150, "", "don't stop-believing...", "Ελληνικά κείμενο"]
  # Execute / Assert: single texts, with and without truncation
  for max_length in (128, 12):  # 12 truncates most sentences
    encoder = keras_api.WordPieceEncoder(max_length=max_length, output_names=names, **settings)
    got = encoder(tf.constant(singles))
    want = tokenizer(singles, truncation=True, max_length=max_length, padding=True,
                     return_tensors="np")
    for name in names:
      np.testing.assert_array_equal(got[name].numpy(), want[name], err_msg=name)
  # Prepare: text pairs
  first, second = _pairs(120)
  # Shuffle the pairs so that both the first and the second text are often the longer one,
  # with even and odd budgets (Hugging Face gives the longer text the odd token).
  second = second[::-1]
  # Execute / Assert: pairs, with even and odd budgets
  for max_length in (40, 41):
    encoder = keras_api.WordPieceEncoder(max_length=max_length, output_names=names, **settings)
    got = encoder([tf.constant(first), tf.constant(second)])
    want = tokenizer(first, second, truncation=True, max_length=max_length, padding=True,
                     return_tensors="np")
    for name in names:
      np.testing.assert_array_equal(got[name].numpy(), want[name], err_msg=f"{name} {max_length}")


def test_torch_hidden_states_match_the_tf_body_bert(minilm_store):
  # Execute / Assert
  _check_torch(minilm_store)


def test_torch_hidden_states_match_the_tf_body_roberta(tiny_roberta_store):
  # Execute / Assert
  _check_torch(tiny_roberta_store)


def _check_torch(store):
  torch = pytest.importorskip("torch")
  import transformers  # pylint: disable=g-import-not-at-top
  body, tokenizer = cold_fusion_tf.load_base(store)
  enc = tokenizer(im.texts("sst2", "dev", 32), padding=True, truncation=True, max_length=64,
                  return_tensors="np")
  ours = body(**dict(enc), training=False).last_hidden_state.numpy()
  pt = transformers.AutoModel.from_pretrained(refs.resolve(store).directory).eval()
  with torch.no_grad():
    theirs = pt(**{k: torch.from_numpy(v) for k, v in enc.items()}).last_hidden_state.numpy()
  real = enc["attention_mask"].astype(bool)
  assert np.abs(ours - theirs)[real].max() < 1e-4


def _sst2_dataset(n=32, batch=8):
  rows = im.rows("sst2", "train", n)
  data = tf.data.Dataset.from_tensor_slices(([r["text"] for r in rows], [r["label"] for r in rows]))
  return data.batch(batch)


def test_text_classifier_trains_saves_and_reloads(tiny_bert_store, tmp_path):
  # Execute
  model = cold_fusion_tf.keras_classifier(tiny_bert_store, num_labels=2, train_steps=8,
                                          max_length=32, seed=0)
  # Assert
  # The paper's recipe: AdamW, weight decay 0.01 (not on LayerNorm/bias), warm-up then decay.
  optimizer = model.optimizer
  assert isinstance(optimizer, keras.optimizers.AdamW) and optimizer.weight_decay == 0.01
  schedule = optimizer._learning_rate  # pylint: disable=protected-access
  assert float(schedule(0)) == 0.0 and float(schedule(1)) == pytest.approx(5e-5)
  assert float(schedule(8)) == 0.0
  main = model.get_layer("bert")
  assert main.pooler is None  # the head reads the first token; no dead weights
  # Execute: train for an epoch
  body_before = main.embeddings.weights[0].numpy().copy()
  history = model.fit(_sst2_dataset(), epochs=1, verbose=0)
  # Assert
  assert np.isfinite(history.history["loss"][0])
  assert not np.allclose(main.embeddings.weights[0].numpy(), body_before)  # body fine-tuned
  # Execute
  texts = tf.constant(im.texts("sst2", "dev", 8))
  expected = model(texts).numpy()
  # Assert
  assert expected.shape == (8, 2)

  # Execute: save and reload
  model.save(str(tmp_path / "clf.keras"))
  reloaded = cold_fusion_tf.load_classifier(str(tmp_path / "clf.keras"))
  # Assert
  np.testing.assert_array_equal(reloaded(texts).numpy(), expected)
  assert reloaded.optimizer.iterations.numpy() == 4  # the optimizer state came back too
  no_decay = reloaded.optimizer._exclude_from_weight_decay_names  # pylint: disable=protected-access
  assert no_decay == list(training.NO_DECAY)

  # Execute
  # A SavedModel serves raw strings with TensorFlow alone (plus TensorFlow Text's ops).
  model.save(str(tmp_path / "clf_savedmodel"), save_format="tf")
  import tensorflow_text  # pylint: disable=g-import-not-at-top,unused-import
  serving = tf.saved_model.load(str(tmp_path / "clf_savedmodel")).signatures["serving_default"]
  # Assert
  np.testing.assert_allclose(serving(text=texts)["head"].numpy(), expected, atol=1e-6)
  revived = cold_fusion_tf.load_classifier(str(tmp_path / "clf_savedmodel"))
  np.testing.assert_allclose(revived(texts).numpy(), expected, atol=1e-6)


def test_pair_classifier_takes_two_texts(tiny_bert_store):
  # Prepare
  model = cold_fusion_tf.keras_classifier(tiny_bert_store, 3, text_pair=True, max_length=40)
  first, second = _pairs(6)
  # Execute
  logits = model({"text": tf.constant(first), "text_pair": tf.constant(second)}).numpy()
  # Assert
  assert logits.shape == (6, 3) and np.all(np.isfinite(logits))
  # The classifier's encoder is the published body (rebuilt without its pooler).
  body, tokenizer = cold_fusion_tf.load_base(tiny_bert_store)
  enc = dict(tokenizer(first, second, truncation=True, max_length=40, padding=True,
                       return_tensors="tf"))
  np.testing.assert_allclose(model.get_layer("bert")(enc)[0].numpy(),
                             body(**enc, training=False).last_hidden_state.numpy(), atol=1e-6)


def test_ids_classifier_for_roberta(tiny_roberta_store, tmp_path):
  # Execute / Assert: a vocabulary that is not WordPiece needs inputs="ids"
  with pytest.raises(UserError, match="WordPiece vocabulary"):
    cold_fusion_tf.keras_classifier(tiny_roberta_store, 2)
  # Execute: a classifier on token ids
  _, tokenizer = cold_fusion_tf.load_base(tiny_roberta_store)
  model = cold_fusion_tf.keras_classifier(tiny_roberta_store, 2, inputs="ids", train_steps=4,
                                          recipe={"learning_rate": 1e-3}, seed=0)
  # Assert
  assert sorted(model.input) == ["attention_mask", "input_ids"]
  # Prepare: token ids for eight sentences
  rows = im.rows("sst2", "train", 8)
  features = dict(tokenizer([r["text"] for r in rows], padding=True, truncation=True,
                            max_length=64, return_tensors="np"))
  data = tf.data.Dataset.from_tensor_slices((features, [r["label"] for r in rows])).batch(4)
  # Execute: train
  history = model.fit(data, epochs=1, verbose=0)
  # Assert
  assert np.isfinite(history.history["loss"][0])
  # Execute: save and reload
  expected = model(features).numpy()
  model.save(str(tmp_path / "roberta.keras"))
  reloaded = cold_fusion_tf.load_classifier(str(tmp_path / "roberta.keras"))
  # Assert
  np.testing.assert_array_equal(reloaded(features).numpy(), expected)


def test_regression_and_argument_errors(tiny_bert_store):
  # Execute: a regression model (one output)
  model = cold_fusion_tf.keras_classifier(tiny_bert_store, 1, max_length=16)
  # Assert
  assert isinstance(model.loss, keras.losses.MeanSquaredError)
  assert model(tf.constant(["a b c"])).shape == (1, 1)
  constant = model.optimizer._learning_rate  # pylint: disable=protected-access
  assert float(constant) == pytest.approx(5e-5)  # no train_steps: no schedule
  # Execute / Assert: bad arguments
  for kwargs, message in (({"num_labels": 0}, "num_labels=0"),
                          ({"num_labels": 2, "inputs": "tokens"}, "inputs='tokens'"),
                          ({"num_labels": 2, "train_steps": 0}, "train_steps=0")):
    with pytest.raises(UserError, match=message):
      cold_fusion_tf.keras_classifier(tiny_bert_store, **kwargs)


def test_load_base_from_a_gcs_store(gcs_emulator, tmp_path, monkeypatch):
  # A store on gs:// (fake-gcs-server on loopback): the base is downloaded, checked against
  # its manifest and cached.
  # Prepare
  monkeypatch.setenv("COLD_FUSION_CACHE", str(tmp_path / "cache"))
  uri = f"gs://{gcs_emulator.make_bucket()}/run"
  source = refs.resolve(im.tiny_bert_store()).directory
  store_lib.Store(uri).create(source, {"source_model": "tiny-bert"})
  # Execute
  body, tokenizer = cold_fusion_tf.load_base(uri)
  # Assert
  published = safetensors.numpy.load_file(os.path.join(source, "model.safetensors"))
  for name, value in hf_names.body_tensors(body).items():
    np.testing.assert_array_equal(value, published[name], err_msg=name)
  assert tokenizer("a b")["input_ids"] == [101, 1037, 1038, 102]
  assert refs.resolve(uri, 0).directory.startswith(str(tmp_path / "cache"))


def test_max_length_is_checked_and_defaults_to_the_recipe_s(tiny_bert_store):
  # Execute: the recipe's max_length is the default; max_length overrides it
  from_recipe = cold_fusion_tf.keras_classifier(tiny_bert_store, 2, recipe={"max_length": 24})
  given = cold_fusion_tf.keras_classifier(tiny_bert_store, 2, max_length=12,
                                          recipe={"max_length": 24})
  # Assert
  assert from_recipe.get_layer("tokenize").max_length == 24
  assert given.get_layer("tokenize").max_length == 12
  assert from_recipe(tf.constant([" ".join(["word"] * 100)])).shape == (1, 2)
  # Execute / Assert: a length that is not one is refused, not replaced by the default
  for kwargs, message in (({"max_length": 0}, r"max_length=0 is out of range"),
                          ({"max_length": "64"}, r"max_length='64' is invalid"),
                          ({"max_length": 3}, r"max_length=3: needs room for the special"),
                          ({"recipe": {"learning_rate": 0}}, r"learning_rate=0 is out of range"),
                          ({"recipe": [("learning_rate", 1e-5)]}, r"expected a mapping")):
    with pytest.raises(UserError, match=message):
      cold_fusion_tf.keras_classifier(tiny_bert_store, 2, **kwargs)
