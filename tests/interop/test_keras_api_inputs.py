"""cold_fusion_tf.keras_classifier / compile_classifier / load_classifier with unusual tasks
and bad inputs: every bad input is one UserError naming it; legitimate uses give the right
numbers (the optimizer's recipe, inputs of other shapes, training resumed from a SavedModel).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

import cold_fusion_tf
from cold_fusion_tf.errors import UserError
from cold_fusion_tf.interop import keras_api
from cold_fusion_tf.store import refs
import published as im
import tiny


@pytest.fixture(scope="module")
def tiny_bert_store():
  return im.tiny_bert_store()


def test_a_constant_learning_rate_clips_the_global_norm_as_the_schedule_does(tiny_bert_store):
  # Execute
  constant = cold_fusion_tf.keras_classifier(tiny_bert_store, 2, max_length=16)
  scheduled = cold_fusion_tf.keras_classifier(tiny_bert_store, 2, max_length=16, train_steps=8)
  # Assert: the recipe's clipping (global norm 1.0) with and without train_steps
  for model in (constant, scheduled):
    config = model.optimizer.get_config()
    assert config["global_clipnorm"] == 1.0 and config["clipnorm"] is None


def test_compile_classifier_checks_the_model_and_its_outputs(tiny_bert_store):
  # Prepare
  model = cold_fusion_tf.keras_classifier(tiny_bert_store, 2, max_length=16)
  # Execute / Assert: a num_labels that is not the model's outputs would train a wrong loss
  for num_labels, message in ((1, r"num_labels=1, but the model gives 2 output\(s\) per "
                                  r"example; pass num_labels=2"),
                              (3, r"num_labels=3, but the model gives 2"),
                              (0, r"num_labels=0: expected a positive integer"),
                              (True, r"num_labels=True: expected a positive integer")):
    with pytest.raises(UserError, match=message):
      keras_api.compile_classifier(model, num_labels)
  with pytest.raises(UserError, match=r"model=str: expected a tf-keras model"):
    keras_api.compile_classifier("classifier.keras", 2)
  with pytest.raises(UserError, match=r"recipe: epochs would have no effect in "
                     r"compile_classifier"):
    keras_api.compile_classifier(model, 2, recipe={"epochs": 3})
  # Execute: num_labels left out is the model's
  keras_api.compile_classifier(model, train_steps=4)
  # Assert
  assert isinstance(model.loss, keras.losses.SparseCategoricalCrossentropy)


def test_recipe_fields_without_effect_are_refused(tiny_bert_store):
  # Execute / Assert
  for kwargs, message in (
      ({"recipe": {"batch_size": 8}}, r"recipe: batch_size would have no effect in "
                                      r"keras_classifier, which uses only learning_rate"),
      ({"recipe": {"epochs": 3, "seed": 1}}, r"recipe: epochs, seed would have no effect"),
      ({"recipe": {"max_length": 32}, "inputs": "ids"}, r"recipe: max_length would have no "),
      ({"recipe": {"lr": 1e-5}}, r"recipe has no field\(s\) lr")):
    with pytest.raises(UserError, match=message):
      cold_fusion_tf.keras_classifier(tiny_bert_store, 2, **kwargs)
  # Execute: the fields it uses are taken
  model = cold_fusion_tf.keras_classifier(
      tiny_bert_store, 2, recipe={"learning_rate": 2e-5, "clip_norm": 0, "max_length": 20})
  # Assert
  config = model.optimizer.get_config()
  assert config["learning_rate"] == pytest.approx(2e-5) and config["global_clipnorm"] is None
  assert model.get_layer("tokenize").max_length == 20


@pytest.mark.parametrize("kwargs, message", [
    ({"num_labels": 10**12}, r"num_labels=1000000000000: a head of 1000000000000 x 32 weights "
                             r"is more than TensorFlow holds"),
    ({"max_length": 1000}, r"max_length=1000: above the 128 positions this model takes; give "
                           r"at most 128"),
    ({"recipe": {"max_length": 512}}, r"max_length=512: above the 128 positions"),
    ({"text_pair": "yes"}, r"text_pair='yes': expected True or False"),
    ({"inputs": "ids", "text_pair": True}, r"text_pair=True applies to inputs='text'"),
    ({"inputs": "ids", "max_length": 32}, r"max_length=32 applies to inputs='text'"),
    ({"seed": -1}, r"seed=-1: expected an integer from 0 to 2\*\*32 - 1"),
    ({"train_steps": 2**63}, r"train_steps=9223372036854775808: expected a positive integer"),
    ({"train_steps": 1}, r"train_steps=1: the warm-up \(at least one step\) would give the "
                         r"only step a learning rate of 0"),
    ({"iteration": True}, r"iteration=True: expected a base number"),
    ({"iteration": -1}, r"iteration=-1: expected a base number"),
])
def test_bad_arguments_are_one_user_error(tiny_bert_store, kwargs, message):
  # Prepare
  kwargs = {"num_labels": 2, **kwargs}
  # Execute / Assert
  with pytest.raises(UserError, match=message):
    cold_fusion_tf.keras_classifier(tiny_bert_store, **kwargs)


def test_locations_that_hold_no_base_are_named(tmp_path):
  # Execute / Assert
  with pytest.raises(UserError, match=r"store_or_dir=None: expected a store"):
    cold_fusion_tf.load_base(None)
  # A keras-hub preset (export --format=keras_hub) is not a Hugging Face directory.
  (tmp_path / "preset").mkdir()
  (tmp_path / "preset" / "metadata.json").write_text("{}")
  (tmp_path / "preset" / "config.json").write_text("{}")
  with pytest.raises(UserError, match=r"a keras-hub preset \(export --format=keras_hub\); load "
                     r"it with keras_hub"):
    cold_fusion_tf.keras_classifier(str(tmp_path / "preset"), 2)


def test_load_classifier_refuses_what_model_save_did_not_write(tmp_path):
  # Prepare
  (tmp_path / "folder").mkdir()
  (tmp_path / "notes.keras").write_text("not a model")
  # Execute / Assert
  for path in (tmp_path / "folder", tmp_path / "notes.keras"):
    with pytest.raises(UserError, match=rf"^{path}: not a model saved from keras_classifier "
                       r"\(.+\); give the .keras file or SavedModel directory"):
      cold_fusion_tf.load_classifier(str(path))
  with pytest.raises(UserError, match=r"path=None: expected the .keras file"):
    cold_fusion_tf.load_classifier(None)


def test_training_resumes_from_a_saved_model_where_it_stopped(tmp_path):
  # Prepare: a base without dropout, so that training is deterministic
  store = tiny.make_store(str(tmp_path / "store"))
  texts = tf.constant(["good film", "bad", "ok fine", "meh", "great", "awful"])
  labels = tf.constant([1, 0, 1, 0, 1, 0])

  def new_model():
    return cold_fusion_tf.keras_classifier(store, 2, max_length=16, train_steps=9, seed=0,
                                           recipe={"learning_rate": 1e-3})

  def train(model):
    model.fit(texts, labels, batch_size=2, epochs=1, shuffle=False, verbose=0)

  uninterrupted, interrupted = new_model(), new_model()
  train(uninterrupted)
  train(uninterrupted)
  train(interrupted)
  # Execute: save as a SavedModel, reload, train the second epoch
  interrupted.save(str(tmp_path / "saved"), save_format="tf")
  reloaded = cold_fusion_tf.load_classifier(str(tmp_path / "saved"))
  # Assert: the optimizer's step came back (the schedule does not restart its warm-up)
  assert reloaded.optimizer.iterations.numpy() == 3
  # Execute
  train(reloaded)
  # Assert: the same weights as two epochs without a break
  np.testing.assert_allclose(reloaded.predict(texts, verbose=0),
                             uninterrupted.predict(texts, verbose=0), atol=1e-6)
  assert reloaded.optimizer.iterations.numpy() == 6


def test_texts_of_other_shapes(tiny_bert_store):
  # Prepare
  model = cold_fusion_tf.keras_classifier(tiny_bert_store, 2, max_length=16, seed=0)
  pairs = cold_fusion_tf.keras_classifier(tiny_bert_store, 3, text_pair=True, max_length=16)
  texts = ["a gripping film", "", "😀 שלום", "word " * 300]
  # Execute
  flat = model.predict(tf.constant(texts), verbose=0)
  column = model.predict(tf.constant(texts)[:, None], verbose=0)
  # Assert: a column of texts (batch, 1) is the same batch
  assert flat.shape == (4, 2)
  np.testing.assert_array_equal(column, flat)
  # Execute / Assert: two texts per example are not one example
  with pytest.raises(ValueError, match=r"Expected one text per example, a string tensor of "
                     r"shape \(batch,\) or \(batch, 1\); got shape \(1, 2\)"):
    model(tf.constant([["a gripping film", "a dull mess"]]))
  with pytest.raises(tf.errors.InvalidArgumentError, match="text and text_pair need the same "
                     "number of examples"):
    pairs({"text": tf.constant(["a", "b"]), "text_pair": tf.constant(["c"])})
  # Execute / Assert: empty second texts are pairs with an empty second segment
  _, tokenizer = cold_fusion_tf.load_base(tiny_bert_store)
  encoder = pairs.get_layer("tokenize")
  got = encoder([tf.constant(texts), tf.constant(["", "x", "", "y " * 300])])
  want = tokenizer(texts, ["", "x", "", "y " * 300], truncation=True, max_length=16,
                   padding=True, return_tensors="np")
  for name in ("input_ids", "token_type_ids", "attention_mask"):
    np.testing.assert_array_equal(got[name].numpy(), want[name], err_msg=name)


def test_model_card_of_a_roberta_export_shows_a_classifier_that_works(tmp_path):
  # Prepare
  from cold_fusion_tf.interop import export  # pylint: disable=g-import-not-at-top
  store = im.tiny_roberta_store()
  # Execute
  out = export.export_model(store, str(tmp_path / "exported"), log=lambda _: None)
  # Assert: the card's snippet takes token ids (a byte-level BPE is not tokenized in the graph)
  card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
  assert 'keras_classifier(model_dir, num_labels=2, inputs="ids")' in card
  pytest.importorskip("torch")  # the snippet loads the PyTorch body too
  code = card.split("```python\n", 1)[1].split("```", 1)[0]
  namespace = {}
  exec(code.replace("path/to/this/directory", out), namespace)  # pylint: disable=exec-used
  assert namespace["logits"].shape == (1, 2)
  # Execute / Assert: an --out inside the store is refused, nothing written there
  with pytest.raises(UserError, match=r"inside the store .*; choose a folder outside it"):
    export.export_model(store, os.path.join(store, "bases", "000001"), log=lambda _: None)
  assert not os.path.exists(os.path.join(store, "bases", "000001"))
  assert refs.resolve(store).iteration == 0
