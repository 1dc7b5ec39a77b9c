"""Stores of random numpy bodies with real BERT tensor names and no model behind them, for the
store, fusion and evaluation tests (tiny real models are in :mod:`tiny`)."""

from __future__ import annotations

import json
import os

import numpy as np

from cold_fusion_tf import store as store_lib
from cold_fusion_tf.model.keras_hub_names import hf_specs
from cold_fusion_tf.tensors import safetensors_io as weights

HIDDEN, VOCAB, POSITIONS, INTERMEDIATE, LAYERS = 8, 40, 16, 16, 1
CONFIG = {"model_type": "bert", "architectures": ["BertModel"], "hidden_size": HIDDEN,
          "num_hidden_layers": LAYERS, "num_attention_heads": 2,
          "intermediate_size": INTERMEDIATE, "vocab_size": VOCAB,
          "max_position_embeddings": POSITIONS, "type_vocab_size": 2}


def random_body(seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {n: rng.normal(size=s).astype(np.float32) for n, (s, _) in hf_specs(CONFIG).items()}


def nudged(base: dict, seed: int, scale: float = 0.01) -> dict[str, np.ndarray]:
  """An honest fine-tune: the base plus small noise."""
  rng = np.random.default_rng(1000 + seed)
  return {n: (v + scale * rng.normal(size=v.shape)).astype(np.float32) for n, v in base.items()}


def awkward_bodies(n: int = 4):
  """A base and ``n`` bodies that test edge cases of the fusion pass: a tensor of -0.0 and a
  float16 tensor; with example counts of different sizes. Returns (base, bodies, counts)."""
  base = random_body()
  base["embeddings.LayerNorm.bias"] = np.full(HIDDEN, -0.0, dtype=np.float32)
  base["half"] = np.linspace(-1, 1, 30).astype(np.float16).reshape(5, 6)
  bodies = [nudged(base, i, scale=0.1) for i in range(n)]
  for body in bodies:
    body["embeddings.LayerNorm.bias"] = np.full(HIDDEN, -0.0, dtype=np.float32)
    body["half"] = body["half"].astype(np.float16)
  counts = np.array([1.0, 5.0, 2.0, 7.0, 3.0, 4.0, 6.0, 8.0][:n])
  return base, bodies, counts


def new_store(root, base: dict | None = None, name: str = "store") -> store_lib.Store:
  """A store under ``root/name`` with base 0 = ``base`` (default :func:`random_body`)."""
  source = os.path.join(str(root), name + "-base0")
  os.makedirs(source, exist_ok=True)
  with open(os.path.join(source, "config.json"), "w") as f:
    json.dump(CONFIG, f, indent=2, sort_keys=True)
  with open(os.path.join(source, "vocab.txt"), "w") as f:
    f.write("\n".join(f"tok{i}" for i in range(VOCAB)) + "\n")
  weights.save_safetensors(random_body() if base is None else base,
                           os.path.join(source, store_lib.MODEL))
  store = store_lib.Store(os.path.join(str(root), name),
                          cache_dir=os.path.join(str(root), name + "-cache"))
  store.create(source, {"source_model": "synthetic"})
  return store


def base_tensors(store: store_lib.Store, iteration: int | None = None) -> dict[str, np.ndarray]:
  iteration = store.require_latest() if iteration is None else iteration
  path = os.path.join(store.base_dir(iteration), store_lib.MODEL)
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  return safetensors.numpy.load_file(path)


def contribute(store: store_lib.Store, cid: str, tensors: dict, *, num_examples: int = 100,
               dataset: str | None = None, iteration: int | None = None,
               base_sha256: str | None = None, score: float = 0.5) -> dict:
  """Uploads ``tensors`` as contributor ``cid``'s body to the latest iteration."""
  iteration = store.require_latest() if iteration is None else iteration
  path = os.path.join(store.cache_dir, f"upload-{cid}.safetensors")
  os.makedirs(store.cache_dir, exist_ok=True)
  weights.save_safetensors(tensors, path)
  meta = store.put_contribution(iteration, cid, path, {
      "base_sha256": base_sha256 or store.base_sha256(iteration),
      "dataset": dataset or cid, "num_examples": num_examples, "steps": 10,
      "dev_metrics": {"score": score, "accuracy": score}})
  os.remove(path)
  return meta


def body_path(store: store_lib.Store, cid: str, iteration: int | None = None) -> str:
  iteration = store.require_latest() if iteration is None else iteration
  return store.storage.local_path(f"{store.contribution_prefix(iteration, cid)}/{store_lib.BODY}")
