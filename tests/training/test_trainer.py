"""The fine-tuning loop on tiny random bodies: gradient accumulation, steps per execution, XLA,
mixed precision, early stopping, checkpoints and TensorBoard logs."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

import tiny
from cold_fusion_tf import data
from cold_fusion_tf.model import bodies as models
from cold_fusion_tf.training import trainer as training
from cold_fusion_tf.training.recipe import Recipe
from cold_fusion_tf.errors import UserError

TOKENIZER = tiny.bert_tokenizer()


def task(name="trec_coarse", train=64):
  return data.load_task(name, dirs=[tiny.DATA],
                        max_examples={"train": train, "dev": 32, "test": 16})


TREC = task()


def recipe(**overrides):
  settings = dict(batch_size=16, eval_batch_size=16, learning_rate=1e-3, epochs=1,
                  max_length=32, log_every_seconds=1e9, checkpoint_every_steps=0)
  settings.update(overrides)
  return Recipe(**settings)


def train(the_recipe, the_task=TREC, body=None, **kwargs):
  """(result, body weights) of a run from the same initial body and head (seed 0)."""
  body = body or tiny.tiny_body(seed=0)
  models.set_seed(0)
  logs = []
  result = training.finetune(body, TOKENIZER, the_task, the_recipe, log=logs.append, **kwargs)
  result.logs = logs
  return result, [w.numpy() for w in body.weights]


def max_diff(a, b):
  return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


BASE_RESULT, BASE_WEIGHTS = train(recipe())
INITIAL = [w.numpy() for w in tiny.tiny_body(seed=0).weights]


def test_plain_run_trains_and_logs_progress():
  # Assert
  assert BASE_RESULT.steps == 4 and BASE_RESULT.examples_seen == 64
  assert max_diff(BASE_WEIGHTS, INITIAL) > 1e-3
  assert set(BASE_RESULT.dev) == {"score", "accuracy"}
  progress = [line for line in BASE_RESULT.logs if "examples/s" in line]
  assert progress and "step 4/4" in progress[-1] and "ETA" in progress[-1]


def test_gradient_accumulation_matches_one_big_batch():
  # Execute
  result, weights = train(recipe(max_replica_batch=8))  # 16 = 2 micro-batches of 8
  # Assert
  assert result.steps == 4
  assert "8 per replica x 1 replica(s) x 2 accumulation" in result.logs[0]
  assert max_diff(weights, BASE_WEIGHTS) < 1e-5


def test_steps_per_execution_gives_the_same_run():
  # Execute
  result, weights = train(recipe(steps_per_execution=3))
  # Assert
  assert result.steps == 4
  assert max_diff(weights, BASE_WEIGHTS) < 1e-6


def test_xla_jit_compile_matches_on_cpu():
  # Execute
  result, weights = train(recipe(jit_compile=True))
  # Assert
  assert result.steps == 4
  assert max_diff(weights, BASE_WEIGHTS) < 1e-4


def test_static_shapes_run_with_few_shapes():
  # Prepare
  the_task = task(train=128)
  # Execute
  result, weights = train(recipe(static_shapes=True, length_buckets=2, steps_per_execution=4,
                                 eval_every_steps=4), the_task)
  # Assert
  assert result.steps == 8 and [h["step"] for h in result.history] == [4, 8]
  assert max_diff(weights, INITIAL) > 1e-3


def test_mixed_bfloat16_trains_with_float32_weights():
  # Execute
  result, weights = train(recipe(mixed_precision="mixed_bfloat16"))
  # Assert
  assert result.steps == 4 and np.isfinite(result.dev["score"])
  assert all(w.dtype == np.float32 for w in weights)
  assert max_diff(weights, INITIAL) > 1e-3
  assert keras.mixed_precision.global_policy().name == "float32"  # restored afterwards
  # Execute / Assert: float16 is refused
  with pytest.raises(UserError, match="mixed_precision='float16'"):
    train(recipe(mixed_precision="float16"))


def test_early_stopping_with_patience_in_examples():
  # Prepare
  the_task = task(train=160)
  # Execute
  # lr 1e-30 (0 is refused): far below float32's resolution, so no weight moves.
  result, weights = train(recipe(learning_rate=1e-30, eval_every_examples=32,
                                 patience_examples=64), the_task)
  # Assert
  # lr ~0: dev never improves after the first evaluation (step 2); 64 examples later it stops.
  assert [h["step"] for h in result.history] == [2, 4, 6]
  assert result.best_step == 2 and result.steps == 6
  assert any("early stop at step 6" in line for line in result.logs)
  assert max_diff(weights, INITIAL) < 1e-20  # moved by lr 1e-30 at most


def test_regression_trains_the_same_whatever_the_units_of_its_scores():
  # Prepare
  import transformers  # pylint: disable=g-import-not-at-top
  config = transformers.RobertaConfig(
      vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
      intermediate_size=64, max_position_embeddings=130, hidden_dropout_prob=0.0,
      attention_probs_dropout_prob=0.0, pad_token_id=0)
  stsb = task(os.path.join(tiny.TEST_DATA, "stsb"))
  runs = []
  for the_task in (stsb, tiny.rescaled_scores(stsb, 1000.0, -40.0)):
    models.set_seed(0)
    # Execute
    runs.append(train(recipe(max_length=64), the_task, body=models.build_body(config)))
  # Assert
  (result, weights), (rescaled, rescaled_weights) = runs
  assert result.steps == 4 and set(result.dev) == {"score", "spearman", "pearson"}
  assert np.isfinite(result.dev["score"]) and result.dev["score"] != 0.0
  # The loss sees standardized scores, so the units (0-5 or -40 to 4960) change nothing.
  assert rescaled.dev["score"] == pytest.approx(result.dev["score"], abs=1e-4)
  assert max_diff(rescaled_weights, weights) < 1e-6
  assert rescaled.history[0]["loss"] == pytest.approx(result.history[0]["loss"], rel=1e-3)


def test_checkpoints_resume_tensorboard_and_refuse_another_run(tmp_path):
  # Prepare
  workdir = str(tmp_path / "work")
  # Execute
  first, weights = train(recipe(checkpoint_every_steps=2, eval_every_steps=2), workdir=workdir)
  # Assert
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [
      "checkpoint", "ckpt-4.data-00000-of-00001", "ckpt-4.index"]
  assert any("saved checkpoint at step 2" in line for line in first.logs)
  # Execute
  # Run again: the finished state is restored (best weights included), nothing is retrained.
  again, weights_again = train(recipe(checkpoint_every_steps=2, eval_every_steps=2),
                               workdir=workdir)
  # Assert
  assert again.resumed_from == 4 and again.steps == 4
  assert not any("examples/s" in line for line in again.logs)
  assert again.best_step == first.best_step and again.dev == first.dev
  assert max_diff(weights_again, weights) == 0.0

  # Assert: the TensorBoard events
  tags = set()
  for path in glob.glob(os.path.join(workdir, "tensorboard", "*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      tags.update(v.tag for v in event.summary.value)
  assert {"train/loss", "train/learning_rate", "train/examples_per_second",
          "dev/score", "dev/accuracy"} <= tags

  # Execute / Assert: another run's settings are refused
  with pytest.raises(UserError, match="different run .*learning_rate"):
    train(recipe(checkpoint_every_steps=2, eval_every_steps=2, learning_rate=5e-4),
          workdir=workdir)
  with pytest.raises(UserError, match=r"different run \(differs in weight_decay\)"):
    train(recipe(checkpoint_every_steps=2, eval_every_steps=2, weight_decay=0.1),
          workdir=workdir)


def test_a_local_workdir_that_cannot_be_made_is_found_before_training(tmp_path):
  # Prepare
  from cold_fusion_tf.training import checkpoints  # pylint: disable=g-import-not-at-top
  (tmp_path / "file").write_text("a regular file\n")
  # Execute / Assert: no such parent, a parent that is a file
  with pytest.raises(UserError, match=r"^--workdir=/proc/nope/wd: cannot create files there "
                     r"\(No such file or directory: /proc/nope\)"):
    checkpoints.check_workdir("/proc/nope/wd")
  with pytest.raises(UserError, match=r"cannot create files there \(Not a directory"):
    checkpoints.check_workdir(str(tmp_path / "file" / "wd"))
  # Execute / Assert: a workdir that can be made passes, and is not left behind
  checkpoints.check_workdir(str(tmp_path / "new" / "wd"))
  assert os.listdir(tmp_path) == ["file"]


def test_a_dataset_smaller_than_one_batch_trains_on_smaller_batches():
  # Execute
  result, _ = train(recipe(batch_size=128, epochs=2))
  # Assert
  assert result.steps == 2 and result.examples_seen == 128
  assert any("fewer than one batch of 128: batches of 64 instead" in line for line in result.logs)
  # Execute / Assert
  with pytest.raises(UserError, match="fewer than the 128 replicas x accumulation steps"):
    train(recipe(batch_size=128, grad_accum_steps=128))


def test_a_probe_phase_trains_a_head_on_the_frozen_body_and_the_fine_tune_starts_from_it():
  # Prepare
  body = tiny.tiny_body(seed=0)
  strategy = tf.distribute.get_strategy()
  drawn = training.probe_head(body, TOKENIZER, TREC, recipe(probe_epochs=1,
                                                            probe_learning_rate=1e-30),
                              strategy, log=lambda _: None)
  # Execute
  logs = []
  head = training.probe_head(body, TOKENIZER, TREC, recipe(probe_epochs=2,
                                                           probe_learning_rate=1e-2),
                             strategy, log=logs.append)
  # Assert: the head trained for two epochs at its own rate; the body did not move
  assert any(line.startswith("probe: training trec_coarse: 64 examples, 8 steps") and
             "lr 0.01" in line for line in logs)
  assert max_diff([w.numpy() for w in body.weights], INITIAL) == 0.0
  assert max_diff(head, drawn) > 1e-3

  # Execute: full fine-tunes after a probe phase that moved the head, and one that did not
  probed, probed_weights = train(recipe(probe_epochs=2, probe_learning_rate=1e-2))
  unmoved, unmoved_weights = train(recipe(probe_epochs=1, probe_learning_rate=1e-30))
  # Assert: the fine-tune starts from the probe's head: an unmoved one gives the plain run
  assert probed.steps == unmoved.steps == BASE_RESULT.steps == 4
  assert max_diff(unmoved_weights, BASE_WEIGHTS) < 1e-6
  assert max_diff(probed_weights, BASE_WEIGHTS) > 1e-4
  assert any(line.startswith("probe: ") for line in probed.logs)


def test_a_probe_phase_fills_the_fine_tunes_token_cache_and_writes_nothing_else(tmp_path):
  # Prepare
  workdir = str(tmp_path / "work")
  fresh = recipe(probe_epochs=1, max_length=29)  # a length no other test tokenizes at
  # Execute
  training.probe_head(tiny.tiny_body(seed=0), TOKENIZER, TREC, fresh,
                      tf.distribute.get_strategy(), log=lambda _: None, workdir=workdir)
  # Assert: the splits it read are cached where the fine-tune reads them; no checkpoints or
  # TensorBoard logs of its own
  assert os.listdir(workdir) == ["tokens"]
  assert len([f for f in os.listdir(os.path.join(workdir, "tokens")) if f.endswith(".npz")]) == 2


def test_a_probe_phase_needs_a_positive_learning_rate():
  # Execute / Assert
  with pytest.raises(UserError, match="probe_learning_rate=0.0 is out of range"):
    recipe(probe_epochs=1, probe_learning_rate=0.0)
  with pytest.raises(UserError, match="probe_epochs=-1 is out of range"):
    recipe(probe_epochs=-1)


def test_a_single_step_that_warm_up_would_give_no_learning_rate_is_refused():
  # Prepare: 8 examples in batches of 8 for one epoch: one step; warm-up rounds up to it.
  from cold_fusion_tf.training import common  # pylint: disable=g-import-not-at-top
  from cold_fusion_tf.training.recipe import Recipe  # pylint: disable=g-import-not-at-top
  from cold_fusion_tf.errors import UserError  # pylint: disable=g-import-not-at-top
  one = Recipe(batch_size=8, epochs=1.0)
  # Execute
  with pytest.raises(UserError) as raised:
    common.plan_steps(one, "tiny", 8, replicas=1, accumulation=1)
  steps = common.plan_steps(Recipe(batch_size=8, epochs=1.0, warmup_fraction=0.0), "tiny", 8,
                            replicas=1, accumulation=1)
  two = common.plan_steps(Recipe(batch_size=4, epochs=1.0), "tiny", 8, 1, 1)
  # Assert
  assert "makes one training step" in str(raised.value)
  assert "learning rate of 0" in str(raised.value) and "warmup_fraction=0" in str(raised.value)
  assert steps.total_steps == 1 and two.total_steps == 2
  assert common.linear_schedule_value(1, 1e-3, 1, 2) > 0  # the second step learns
