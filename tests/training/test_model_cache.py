"""Short fine-tunes in one process: a kept model gives the same run as a freshly built one,
each dataset is tokenized once, a run no longer than a checkpoint interval writes none, and
the result says where the time went."""

from __future__ import annotations

import os

import numpy as np
import transformers

import tiny
from cold_fusion_tf import data
from cold_fusion_tf.evaluation import finetune as evaluation
from cold_fusion_tf.model import bodies as models
from cold_fusion_tf.training import model_cache
from cold_fusion_tf.training import timings as timings_lib
from cold_fusion_tf.training import trainer as training
from cold_fusion_tf.training.recipe import Recipe

TOKENIZER = tiny.bert_tokenizer()
TREC = data.load_task("trec_coarse", dirs=[tiny.DATA],
                      max_examples={"train": 64, "dev": 32, "test": 16})
SST2 = data.load_task("sst2", dirs=[tiny.DATA],
                      max_examples={"train": 64, "dev": 32, "test": 16})
# Dropout on, so that the runs below also show that dropout depends on the seed only.
CONFIG = transformers.BertConfig(
    vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
    intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1)
models.set_seed(0)
INITIAL = [w.numpy() for w in models.build_body(CONFIG).weights]


def recipe(**overrides):
  settings = dict(batch_size=16, eval_batch_size=16, learning_rate=1e-3, epochs=2,
                  max_length=32, log_every_seconds=1e9, checkpoint_every_steps=0)
  settings.update(overrides)
  return Recipe(**settings)


def run(task, the_recipe, tokenizer=TOKENIZER, **kwargs):
  """(result, body weights after) of a fine-tune from the same initial body."""
  body = models.build_body(CONFIG)
  for variable, value in zip(body.weights, INITIAL):
    variable.assign(value)
  result = training.finetune(body, tokenizer, task, the_recipe, evaluate_test=True,
                             log=lambda message: None, **kwargs)
  return result, [w.numpy() for w in body.weights]


def max_diff(a, b):
  return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


def test_a_kept_model_gives_the_same_run_as_a_freshly_built_one():
  # Prepare: a fresh build, then runs of another seed and another task that leave their
  # weights, optimizer state and dropout draws behind in the kept models.
  model_cache.clear()
  fresh, fresh_weights = run(TREC, recipe(seed=1))
  other_seed, other_weights = run(TREC, recipe(seed=2))
  run(SST2, recipe(seed=1))
  # Execute
  kept, kept_weights = run(TREC, recipe(seed=1))
  # Assert: the same computation, to the last bit (tolerance 0).
  assert not fresh.timings["reused"] and other_seed.timings["reused"] and kept.timings["reused"]
  assert max_diff(kept_weights, fresh_weights) == 0.0
  assert kept.dev == fresh.dev and kept.test == fresh.test
  assert [h["loss"] for h in kept.history] == [h["loss"] for h in fresh.history]
  assert max_diff(fresh_weights, INITIAL) > 1e-3
  assert max_diff(other_weights, fresh_weights) > 1e-4  # another seed: another head, dropout


def test_evaluation_runs_repeat_exactly_and_match_a_built_body(tmp_path):
  # Prepare: a tiny base (dropout on) evaluated with seed 0, then with seed 1 in between.
  base = tiny.write_tiny_base(str(tmp_path / "base"), "bert")
  config = tiny.demo_config(base)
  tokenizer = models.load_tokenizer(base)
  task = data.load_task("sst2", dirs=[tiny.DATA],
                        max_examples={"train": 32, "dev": 16, "test": 16})
  first = evaluation.finetune_once(base, tokenizer, task, config.eval, 0,
                                   log=lambda message: None)
  evaluation.finetune_once(base, tokenizer, task, config.eval, 1, log=lambda message: None)
  # Execute
  again = evaluation.finetune_once(base, tokenizer, task, config.eval, 0,
                                   log=lambda message: None)
  body = evaluation.load_eval_body(base)
  built = training.finetune(body, tokenizer, task, evaluation.recipe_for(config.eval),
                            evaluate_test=True, log=lambda message: None)
  # Assert
  assert again.timings["reused"]
  assert again.test == first.test and again.dev == first.dev
  assert built.test == first.test and built.dev == first.dev
  assert [h["loss"] for h in built.history] == [h["loss"] for h in first.history]


class CountingTokenizer(transformers.BertTokenizerFast):
  """The real MiniLM tokenizer, counting the texts it tokenizes."""
  texts = 0

  def __call__(self, texts, *args, **kwargs):
    CountingTokenizer.texts += len(texts)
    return super().__call__(texts, *args, **kwargs)


def test_each_dataset_is_tokenized_once_per_process():
  # Prepare
  tokenizer = CountingTokenizer.from_pretrained(tiny.bert_tokenizer().name_or_path,
                                                local_files_only=True)
  splits = sum(len(TREC.splits[s]) for s in ("train", "dev", "test"))
  # Execute
  first, _ = run(TREC, recipe(seed=3), tokenizer)
  after_first = CountingTokenizer.texts
  second, _ = run(TREC, recipe(seed=4), tokenizer)
  # Assert
  assert after_first == splits == 64 + 32 + 16
  assert CountingTokenizer.texts == after_first  # the second run tokenized nothing
  assert first.steps == second.steps == 8


def test_a_run_no_longer_than_a_checkpoint_interval_writes_no_checkpoint(tmp_path):
  # Execute: 8 steps with checkpoints every 8 steps, then every 4.
  short, _ = run(TREC, recipe(checkpoint_every_steps=8), workdir=str(tmp_path / "short"))
  long, _ = run(TREC, recipe(checkpoint_every_steps=4), workdir=str(tmp_path / "long"))
  # Assert
  assert short.steps == long.steps == 8
  assert not os.path.exists(tmp_path / "short" / "checkpoints")
  assert short.timings["checkpoints"] == 0.0
  assert sorted(os.listdir(tmp_path / "long" / "checkpoints")) == [
      "checkpoint", "ckpt-8.data-00000-of-00001", "ckpt-8.index"]
  assert long.timings["checkpoints"] > 0.0


def test_the_breakdown_accounts_for_the_wall_time():
  # Execute
  result, _ = run(TREC, recipe(steps_per_execution=2))
  timings = result.timings
  # Assert
  phases = sum(timings[name] for name in timings_lib.PHASES)
  assert abs(phases - timings["total"]) < 1e-6
  assert timings["first_steps"] == 2 and timings["steady_steps"] == result.steps - 2 == 6
  assert timings["test"] > 0.0 and timings["dev"] > 0.0
  line = timings_lib.describe(timings)
  assert line.startswith("8 steps in ") and "ms/step" in line
  assert ("(reused)" if timings["reused"] else "(built)") in line
