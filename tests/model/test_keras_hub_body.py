"""The keras-hub body on Keras 3 (its TensorFlow backend, in this process): Hugging Face
tensors in and out bitwise, hidden states against the transformers-TF body, the tokenizer,
the recipe, and training with fit (evaluation, early stopping, accumulation, backups).

Hidden-state tolerances: keras-hub's RoBERTa computes what Hugging Face's does, so the bodies
agree to float32 rounding (< 1e-5). keras-hub's BERT uses the tanh approximation of GELU where
Hugging Face BERT uses the exact erf form: on the real MiniLM the hidden states (values up to
about 6) differ by about 5e-3, so the bound is 1e-2; a transformers-TF body switched to the
tanh GELU (``gelu_new``) agrees with the keras-hub body to < 1e-4, which shows that the GELU is
the only difference. The JAX backend and the distributed runs are in test_mixed_bodies.py.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import os

import numpy as np
import pytest
import tensorflow as tf

import tiny
from cold_fusion_tf import data
from cold_fusion_tf.configs import demo
from cold_fusion_tf.errors import UserError
from cold_fusion_tf.model import bodies as models
from cold_fusion_tf.model import body as body_lib
from cold_fusion_tf.model import hf_names
from cold_fusion_tf.model import keras_hub_body
from cold_fusion_tf.model import keras_hub_names
from cold_fusion_tf.model import tokenizer as tokenizer_lib
from cold_fusion_tf.store import refs
from cold_fusion_tf.tensors import safetensors_io
from cold_fusion_tf.training import inputs
from cold_fusion_tf.training import keras_task
from cold_fusion_tf.training import keras_trainer
from cold_fusion_tf.training import trainer
from cold_fusion_tf.training.common import linear_schedule_value
from cold_fusion_tf.training.recipe import Recipe
import published as im

TREC = data.load_task("trec_coarse", dirs=[tiny.DATA],
                      max_examples={"train": 64, "dev": 32, "test": 16})


@pytest.fixture(scope="module")
def bert_base(tmp_path_factory):
  """A tiny 2-layer BERT with dropout off (so runs compare exactly) and MiniLM's vocabulary."""
  path = str(tmp_path_factory.mktemp("keras_hub_body") / "bert")
  models.write_base_dir(tiny.tiny_body(layers=2, seed=0), tiny.bert_tokenizer(), path)
  return path


def _file_tensors(base: str) -> dict:
  path = os.path.join(base, "model.safetensors")
  return safetensors_io.load_checked(path, safetensors_io.specs_of_file(path), path)


def _recipe(**overrides) -> Recipe:
  settings = dict(batch_size=16, eval_batch_size=16, learning_rate=1e-3, epochs=1,
                  max_length=32, log_every_seconds=1e9, checkpoint_every_steps=0)
  settings.update(overrides)
  return Recipe(**settings)


def _train(base: str, recipe: Recipe, task=TREC, **kwargs):
  """(result, body tensors, log lines) of a run from the base with the head of seed 0."""
  body = keras_hub_body.load(base)
  logs = kwargs.pop("logs", [])
  result = keras_trainer.finetune(body, keras_hub_body.load_tokenizer(base), task, recipe,
                                  log=logs.append, **kwargs)
  return result, body.hf_tensors(), logs


def _max_diff(a: dict, b: dict) -> float:
  return max(float(np.abs(a[n] - b[n]).max()) for n in a)


@pytest.mark.parametrize("store", [im.tiny_bert_store, im.tiny_roberta_store],
                         ids=["bert", "roberta"])
def test_hugging_face_tensors_round_trip_bitwise(store):
  # Prepare
  base = refs.resolve(store()).directory
  saved = _file_tensors(base)
  rng = np.random.default_rng(0)
  changed = {n: (v + rng.normal(0, 0.1, v.shape)).astype(np.float32) for n, v in saved.items()}
  # Execute
  body = keras_hub_body.load(base)
  out = body.hf_tensors()
  body.assign_hf_tensors(changed, "changed")
  back = body.hf_tensors()
  # Assert
  assert keras_hub_names.hf_specs(body.config) == safetensors_io.specs_of_file(
      os.path.join(base, "model.safetensors"))
  assert sorted(out) == sorted(saved) and sorted(back) == sorted(saved)
  for name in saved:
    assert out[name].dtype == np.float32 and np.array_equal(out[name], saved[name]), name
    assert np.array_equal(back[name], changed[name]), name


def test_bert_weights_are_those_of_keras_hubs_own_converter():
  # Prepare
  import keras_hub  # pylint: disable=g-import-not-at-top
  base = refs.resolve(im.tiny_bert_store()).directory
  # Execute
  ours = {v.path: keras_hub_names.to_numpy(v) for v in keras_hub_body.load(base).backbone.weights}
  theirs = {v.path: keras_hub_names.to_numpy(v)
            for v in keras_hub.models.Backbone.from_preset(base).weights}
  # Assert
  assert sorted(ours) == sorted(theirs)
  assert all(np.array_equal(ours[p], theirs[p]) for p in ours)


def _hidden_states(base: str, bodies, n: int = 16) -> list[np.ndarray]:
  encoded = models.load_tokenizer(base)(im.texts("sst2", "dev", n), padding=True,
                                        truncation=True, max_length=64, return_tensors="np")
  return [np.asarray(b(dict(encoded))) for b in bodies], encoded["attention_mask"].astype(bool)


def test_hidden_states_match_the_transformers_tf_body():
  # Prepare
  roberta = refs.resolve(im.tiny_roberta_store()).directory
  minilm = refs.resolve(im.minilm_store()).directory
  tanh_config = models.read_config(minilm)
  tanh_config.hidden_act = "gelu_new"
  tanh_body = models.build_body(tanh_config)
  hf_names.assign_body_tensors(tanh_body, _file_tensors(minilm), minilm)

  def tf_hidden(model):
    return lambda features: model(**features, training=False).last_hidden_state

  # Execute
  (ours, theirs), real = _hidden_states(roberta, [
      keras_hub_body.load(roberta), tf_hidden(models.load_body(roberta))])
  roberta_diff = float(np.abs(ours - theirs)[real].max())
  (ours, exact, tanh), real = _hidden_states(minilm, [
      keras_hub_body.load(minilm), tf_hidden(models.load_body(minilm)), tf_hidden(tanh_body)])
  # Assert
  assert roberta_diff < 1e-5
  assert float(np.abs(ours - exact)[real].max()) < 1e-2
  assert float(np.abs(ours - tanh)[real].max()) < 1e-4


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_the_tokenizer_gives_the_transformers_tokenizers_ids(family):
  # Prepare
  base = refs.resolve(im.minilm_store() if family == "bert" else im.tiny_roberta_store()).directory
  rte = data.load_task("rte", dirs=[tiny.DATA], max_examples={"train": 200}).splits["train"]
  sst2 = data.load_task("sst2", dirs=[tiny.DATA], max_examples={"train": 200}).splits["train"]
  theirs = models.load_tokenizer(base)
  # Execute
  ours = tokenizer_lib.load(base, family)
  # Assert
  assert ours.pad_token_id == theirs.pad_token_id
  for split in (rte, sst2):
    for length in (16, 64):
      want = theirs(split.texts, split.pairs, truncation=True, max_length=length,
                    return_attention_mask=False)
      got = ours(split.texts, split.pairs, truncation=True, max_length=length)
      assert got["input_ids"] == want["input_ids"]
      if family == "bert":
        assert got["token_type_ids"] == want["token_type_ids"]
      else:
        assert "token_type_ids" not in got


def test_the_token_cache_is_kept_per_body_type(tmp_path, monkeypatch):
  # Prepare: nothing kept in memory by earlier tests of this process.
  monkeypatch.setattr(inputs, "_KEPT", collections.OrderedDict())
  base = refs.resolve(im.tiny_bert_store()).directory
  split = TREC.splits["train"]
  # Execute
  hf = inputs.encode(models.load_tokenizer(base), split, 32, str(tmp_path))
  ours = inputs.encode(keras_hub_body.load_tokenizer(base), split, 32, str(tmp_path),
                       body_type="keras_hub")
  again = inputs.encode(keras_hub_body.load_tokenizer(base), split, 32, str(tmp_path),
                        body_type="keras_hub")
  # Assert
  assert len(os.listdir(tmp_path)) == 2
  for a, b in ((hf, ours), (ours, again)):
    assert np.array_equal(a.ids, b.ids) and np.array_equal(a.types, b.types)
    assert np.array_equal(a.lengths, b.lengths) and a.pad_id == b.pad_id


def test_the_recipe_decays_and_schedules_like_the_transformers_tf_trainer(bert_base):
  # Prepare: zero gradients leave only AdamW's weight decay to move the weights.
  recipe = _recipe(learning_rate=0.1, weight_decay=0.5, warmup_fraction=0.0, clip_norm=0.0)
  keras_body = keras_hub_body.load(bert_base)
  model = keras_task.task_model(keras_body, 3, seed=0)
  keras_opt = keras_task.make_optimizer(recipe, 10, 1, model.trainable_variables)
  tf_body = models.load_body(bert_base)
  tf_vars = [v for v in tf_body.trainable_variables if "pooler" not in v.name]
  tf_opt = trainer.make_optimizer(recipe, 10)
  before = _file_tensors(bert_base)
  # Execute
  keras_opt.apply_gradients([(np.zeros(v.shape, np.float32), v)
                             for v in model.trainable_variables])
  tf_opt.apply_gradients([(tf.zeros_like(v), v) for v in tf_vars])
  keras_after, tf_after = keras_body.hf_tensors(), hf_names.body_tensors(tf_body)
  # Assert
  decayed = {n for n in before if not np.array_equal(keras_after[n], before[n])}
  assert decayed == {n for n in before if not np.array_equal(tf_after[n], before[n])}
  assert "embeddings.word_embeddings.weight" in decayed
  assert not any("LayerNorm" in n or n.endswith(".bias") or "pooler" in n for n in decayed)
  for warmup, total in ((0, 10), (3, 10)):
    schedule = keras_task.LinearWarmupDecay(2e-5, warmup, total)
    # With accumulation Keras counts micro-batches: 2 per optimizer step here.
    accumulated = keras_task.LinearWarmupDecay(2e-5, warmup, total, accumulation=2)
    for step in range(total + 2):
      want = linear_schedule_value(step, 2e-5, warmup, total)
      assert float(schedule(step)) == pytest.approx(want, rel=1e-6, abs=1e-12)
      assert float(accumulated(2 * step + 1)) == pytest.approx(want, rel=1e-6, abs=1e-12)


def test_fit_evaluates_and_stops_early(bert_base):
  # Prepare
  task = data.load_task("trec_coarse", dirs=[tiny.DATA],
                        max_examples={"train": 160, "dev": 32, "test": 16})
  # Execute: lr 1e-30 (0 is refused; no float32 weight moves), so dev never improves after
  # the first evaluation (step 2).
  result, tensors, logs = _train(bert_base, _recipe(learning_rate=1e-30, eval_every_examples=32,
                                                    patience_examples=64), task)
  # Assert
  assert [h["step"] for h in result.history] == [2, 4, 6]
  assert result.best_step == 2 and result.steps == 6 and result.examples_seen == 96
  assert any("early stop at step 6 (best step 2)" in line for line in logs)
  assert _max_diff(tensors, _file_tensors(bert_base)) < 1e-20  # moved by lr 1e-30 at most


def test_fit_trains_and_leaves_the_best_dev_weights(bert_base):
  # Prepare: test = dev, so the test score is the dev score of the weights left behind.
  task = dataclasses.replace(TREC, splits={**TREC.splits, "test": TREC.splits["dev"]})
  # Execute
  result, tensors, logs = _train(bert_base, _recipe(learning_rate=3e-2, warmup_fraction=0.0,
                                                    eval_every_steps=1, log_every_steps=2),
                                 task, evaluate_test=True)
  # Assert
  scores = [h["dev_score"] for h in result.history]
  assert result.steps == 4 and set(result.dev) == {"score", "accuracy"}
  assert _max_diff(tensors, _file_tensors(bert_base)) > 1e-3
  assert "Keras 3 (tensorflow)" in logs[0]
  assert [line.split(" step ")[1].split()[0] for line in logs if "examples/s" in line] == [
      "2/4", "4/4"]
  assert len(scores) == 4 and scores[-1] < max(scores)  # the last weights are not the best
  assert result.best_step == 1 + scores.index(max(scores))
  assert result.test == result.dev and result.dev["score"] == max(scores)


@pytest.fixture(scope="module")
def one_batch_run(bert_base):
  """Body tensors after 4 steps of 16, one step per call, no accumulation."""
  return _train(bert_base, _recipe(steps_per_execution=1))[1]


def test_accumulation_and_steps_per_call_give_the_run_of_one_big_batch_a_call(
    bert_base, one_batch_run):
  # Execute: 16 = 2 micro-batches of 8, all 8 micro-batches of the run in one call
  result, tensors, logs = _train(bert_base, _recipe(max_replica_batch=8, steps_per_execution=8))
  # Assert
  assert result.steps == 4
  assert "8 per replica x 1 replica(s) x 2 accumulation" in logs[0]
  assert _max_diff(tensors, one_batch_run) < 1e-5


class _Preempted(Exception):
  pass


class _Log(list):
  """A log that stops the run (as a preemption would) when a progress line of ``step`` comes."""

  def __init__(self, step: int):
    super().__init__()
    self.step = step

  def append(self, line):
    if f" step {self.step}/" in line:
      raise _Preempted(line)
    super().append(line)


def test_a_preempted_run_resumes_from_its_backup(bert_base, tmp_path):
  # Prepare
  recipe = _recipe(checkpoint_every_steps=2, eval_every_steps=2, steps_per_execution=1,
                   log_every_steps=1, max_steps=6, epochs=2)
  reference, reference_tensors, _ = _train(bert_base, recipe, workdir=str(tmp_path / "ref"))
  with pytest.raises(_Preempted):
    _train(bert_base, recipe, workdir=str(tmp_path / "run"), logs=_Log(5))
  backup = tmp_path / "run" / "checkpoints" / "keras_hub"
  assert os.listdir(backup)
  with pytest.raises(UserError, match="holds the backup of another run"):
    _train(bert_base, recipe.replace(learning_rate=5e-4), workdir=str(tmp_path / "run"))
  # Execute
  resumed, resumed_tensors, logs = _train(bert_base, recipe, workdir=str(tmp_path / "run"))
  # Assert
  assert resumed.resumed_from == 4 and resumed.steps == 6
  assert [line.split(" step ")[1].split()[0] for line in logs if "examples/s" in line] == [
      "5/6", "6/6"]
  assert resumed.history == reference.history and resumed.best_step == reference.best_step
  assert _max_diff(resumed_tensors, reference_tensors) < 1e-6
  assert os.listdir(backup)  # kept: the contributor deletes it once its upload is read back
  tags = {}
  for kind in ("train", "validation"):
    for path in glob.glob(str(tmp_path / "ref" / "tensorboard" / kind / "*")):
      for event in tf.compat.v1.train.summary_iterator(path):
        tags.setdefault(kind, set()).update(v.tag for v in event.summary.value)
  assert {"epoch_loss", "epoch_learning_rate", "epoch_examples_per_second"} <= tags["train"]
  assert {"epoch_score", "epoch_accuracy"} <= tags["validation"]


def test_a_probe_phase_trains_a_head_on_the_frozen_body_and_the_fine_tune_starts_from_it(
    bert_base, one_batch_run):
  # Prepare
  body = keras_hub_body.load(bert_base)
  tokenizer = keras_hub_body.load_tokenizer(bert_base)
  trainable = [v.path for v in body.encoder.trainable_variables]
  drawn = keras_trainer.probe_head(body, tokenizer, TREC,
                                   _recipe(probe_epochs=1, probe_learning_rate=1e-30),
                                   log=lambda _: None)
  # Execute
  logs = []
  head = keras_trainer.probe_head(body, tokenizer, TREC,
                                  _recipe(probe_epochs=2, probe_learning_rate=1e-2),
                                  log=logs.append)
  # Assert: the head trained for two epochs at its own rate; the body did not move and is
  # trainable again (its pooler still not)
  assert any(line.startswith("probe: training trec_coarse: 64 examples, 8 steps") and
             "lr 0.01" in line for line in logs)
  assert _max_diff(body.hf_tensors(), _file_tensors(bert_base)) == 0.0
  assert [v.path for v in body.encoder.trainable_variables] == trainable
  assert not any("pooled_dense" in path for path in trainable)
  assert len(head) == 4 and max(float(np.abs(a - b).max()) for a, b in zip(head, drawn)) > 1e-3

  # Execute: full fine-tunes after a probe phase that moved the head, and one that did not
  unmoved, unmoved_tensors, _ = _train(bert_base, _recipe(steps_per_execution=1, probe_epochs=1,
                                                          probe_learning_rate=1e-30))
  probed, probed_tensors, probed_logs = _train(
      bert_base, _recipe(steps_per_execution=1, probe_epochs=2, probe_learning_rate=1e-2))
  # Assert: the fine-tune starts from the probe's head: an unmoved one gives the plain run
  assert unmoved.steps == probed.steps == 4
  assert _max_diff(unmoved_tensors, one_batch_run) < 1e-6
  assert _max_diff(probed_tensors, one_batch_run) > 1e-4
  assert any(line.startswith("probe: ") for line in probed_logs)


def test_regression_on_the_roberta_body():
  # Prepare
  base = refs.resolve(im.tiny_roberta_store()).directory
  stsb = data.load_task("stsb", dirs=[tiny.TEST_DATA],
                        max_examples={"train": 64, "dev": 32, "test": 16})
  # Execute
  result, _, _ = _train(base, _recipe(max_length=64), stsb)
  # Assert
  assert result.steps == 4 and set(result.dev) == {"score", "spearman", "pearson"}
  assert np.isfinite(result.dev["score"])


def test_regression_trains_the_same_whatever_the_units_of_its_scores(bert_base):
  # Prepare
  stsb = data.load_task("stsb", dirs=[tiny.TEST_DATA],
                        max_examples={"train": 64, "dev": 32, "test": 16})
  # Execute
  result, tensors, _ = _train(bert_base, _recipe(max_length=64), stsb)
  rescaled, rescaled_tensors, _ = _train(bert_base, _recipe(max_length=64),
                                         tiny.rescaled_scores(stsb, 1000.0, -40.0))
  # Assert
  assert np.isfinite(result.dev["score"]) and result.dev["score"] != 0.0
  # The loss sees standardized scores, so their units (0-5 or -40 to 4960) change nothing.
  assert rescaled.dev["score"] == pytest.approx(result.dev["score"], abs=1e-4)
  assert _max_diff(rescaled_tensors, tensors) < 1e-6
  assert rescaled.history[0]["loss"] == pytest.approx(result.history[0]["loss"], rel=1e-3)


def test_batches_are_grouped_by_length_as_for_the_transformers_tf_body(bert_base):
  # Prepare
  task = data.load_task("sst2", dirs=[tiny.DATA], max_examples={"train": 400})
  recipe = _recipe(max_length=64, epochs=2)
  body = keras_hub_body.load(bert_base)
  # Execute
  run = keras_trainer._Run(body, keras_hub_body.load_tokenizer(bert_base), task, recipe,  # pylint: disable=protected-access
                           None, lambda _: None, "", None, "")
  # Assert
  lengths = run.encoded["train"].lengths
  planned = [inputs.plan_epoch(lengths, 16, run.buckets, seed=1000 * e, static_shapes=False)
             for e in (0, 1)]
  assert np.array_equal(run.rows, np.concatenate([p.batches for p in planned]))
  grouped = inputs.padding_fraction(lengths, list(run.rows), run.buckets)
  shuffled = np.random.default_rng(0).permutation(len(lengths))[:len(run.rows) // 2 * 16]
  random = inputs.padding_fraction(lengths, list(shuffled.reshape(-1, 16)), run.buckets)
  assert grouped < random / 2


def test_bad_settings_fail_with_one_clear_message(tmp_path):
  # Prepare
  config = demo.get_config()
  roberta_eps = tiny.write_tiny_base(str(tmp_path / "roberta"), "roberta")  # eps 1e-12
  # Execute / Assert
  config.model.body = "pytorch"
  with pytest.raises(UserError, match="model.body='pytorch' is not one of transformers_tf, "
                     "keras_hub"):
    body_lib.settings(config)
  config.model.body, config.model.backend = "transformers_tf", "jax"
  with pytest.raises(UserError, match="runs on TensorFlow only"):
    body_lib.settings(config)
  config.model.body, config.model.backend = "keras_hub", "torch"
  with pytest.raises(UserError, match="backend='torch' is not one of tensorflow, jax"):
    body_lib.settings(config)
  with pytest.raises(UserError, match=r"layer_norm_eps=1e-12 \(keras-hub's roberta uses"):
    keras_hub_body.load(roberta_eps)
  with pytest.raises(UserError, match="already running on tensorflow in this process; start "
                     "the program with KERAS_BACKEND=jax"):
    body_lib.select_backend("jax")
