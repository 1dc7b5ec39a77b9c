"""Real and tiny published bases for the interop tests (Keras API, keras-hub, torch, export).

Builders are cached per process: the test modules that use the same base share one copy
(module fixtures call them; the temporary root is removed at exit).
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import tempfile

import numpy as np

from cold_fusion_tf import fusion
from cold_fusion_tf.model import bodies as models
from cold_fusion_tf.model import sources
from cold_fusion_tf import store as store_lib
from cold_fusion_tf.tensors import safetensors_io as weights
import tiny


@functools.cache
def _root() -> str:
  root = tempfile.mkdtemp(prefix="cf_interop_")
  atexit.register(shutil.rmtree, root, True)
  return root


def rows(task: str, split: str, n: int) -> list[dict]:
  with open(os.path.join(tiny.DATA, task, f"{split}.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for _, line in zip(range(n), f)]


def texts(task: str = "sst2", split: str = "dev", n: int = 32) -> list[str]:
  return [r["text"] for r in rows(task, split, n)]


def _new_store(name: str, source_dir: str, source_model: str) -> str:
  uri = os.path.join(_root(), name)
  store_lib.Store(uri).create(source_dir, {"source_model": source_model})
  return uri


@functools.cache
def minilm_store() -> str:
  """A store whose base 0 is the real MiniLM-L6-H384 (BERT) encoder."""
  body, tokenizer = models.load_source_model(sources.resolve_source(tiny.MINILM))
  source = os.path.join(_root(), "minilm_source")
  models.write_base_dir(body, tokenizer, source)
  return _new_store("minilm_store", source, tiny.MINILM)


@functools.cache
def tiny_bert_store() -> str:
  """A tiny random BERT encoder with MiniLM's real WordPiece vocabulary."""
  source = tiny.write_tiny_base(os.path.join(_root(), "tiny_bert_source"), "bert", seed=1)
  return _new_store("tiny_bert_store", source, "tiny-bert")


def write_tiny_roberta(out_dir: str, seed: int = 0) -> str:
  """A tiny RoBERTa (keras-hub's layer-norm epsilon 1e-5) with a real byte-level BPE vocabulary.

  Its token-type row is set far from zero, as fine-tuning leaves it, so the conversions that
  fold it into the position embeddings are exercised.
  """
  models.set_seed(seed)
  tokenizer = tiny.roberta_tokenizer(out_dir + "_tok")
  config = tiny.roberta_config(len(tokenizer), positions=66, layer_norm_eps=1e-5)
  body = models.build_body(config)
  rng = np.random.default_rng(seed)
  for variable in body.weights:
    if "token_type_embeddings" in variable.name:
      variable.assign(rng.normal(0.0, 0.5, variable.shape).astype(np.float32))
  models.write_base_dir(body, tokenizer, out_dir)
  return out_dir


@functools.cache
def tiny_roberta_store() -> str:
  source = write_tiny_roberta(os.path.join(_root(), "tiny_roberta_source"))
  return _new_store("tiny_roberta_store", source, "tiny-roberta")


@functools.cache
def fused_tiny_bert_store() -> str:
  """A tiny BERT store taken through one real fusion (two contributions) and evaluated.

  Base 1 is the mean of two perturbed bodies; ``evaluations/000000.json`` and
  ``000001.json`` hold scores in the format the loop writes.
  """
  source = tiny.write_tiny_base(os.path.join(_root(), "fused_source"), "bert", seed=2)
  uri = _new_store("fused_store", source, "prajjwal1/bert-tiny")
  store = store_lib.Store(uri)
  base = os.path.join(store.base_dir(0), store_lib.MODEL)
  tensors = weights.load_checked(base, weights.specs_of_file(base), base)
  work = os.path.join(_root(), "fused_bodies")
  os.makedirs(work, exist_ok=True)
  for k, (dataset, examples) in enumerate((("sst2", 48), ("trec_coarse", 40))):
    rng = np.random.default_rng(k)
    body = {n: (v + rng.normal(0, 0.002, v.shape)).astype(v.dtype) for n, v in tensors.items()}
    path = os.path.join(work, f"{dataset}.safetensors")
    weights.save_safetensors(body, path)
    store.put_contribution(0, dataset, path, {
        "base_sha256": store.base_sha256(0), "dataset": dataset, "num_examples": examples,
        "steps": 3, "dev_metrics": {"score": 0.5}})
  outcome = fusion.fuse(store, "mean", {}, 1, log=lambda _: None)
  assert outcome.published == 1, outcome.message
  for iteration, scores in ((0, {"sst2": 0.80, "rte": 0.55}), (1, {"sst2": 0.84, "rte": 0.58})):
    store.write_json(f"evaluations/{iteration:06d}.json", {
        "iteration": iteration, "contributors": [] if iteration == 0 else ["sst2", "trec_coarse"],
        "scores": {t: {"score": s, "std": 0.01, "scores": [s - 0.01, s + 0.01]}
                   for t, s in scores.items()}})
  return uri
