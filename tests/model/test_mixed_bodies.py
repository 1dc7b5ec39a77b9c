"""One iteration, three bodies: a transformers-TF contributor (this process), a keras-hub
contributor on Keras 3's TensorFlow backend (a process with 2 logical CPUs, under
MirroredStrategy) and one on the JAX backend (a process with 2 host devices, under
keras.distribution.DataParallel), fused into one base that all three bodies load.

The base is a tiny RoBERTa (keras-hub's layer-norm epsilon, a token-type row far from zero,
dropout off), whose GELU is the exact one in both frameworks, so the three bodies agree to
float32 rounding. The two Keras 3 contributors train the same data with the same seed, and
this process trains it once more with the keras-hub body on one device: their files show that
two replicas, two devices and two backends train alike.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import safetensors.numpy

import body_workers
import tiny
from cold_fusion_tf import fusion
from cold_fusion_tf import store as store_lib
from cold_fusion_tf.configs import demo
from cold_fusion_tf.model import bodies as models
from cold_fusion_tf.model import keras_hub_body
from cold_fusion_tf.training import contributor
from cold_fusion_tf.training import keras_trainer
import published as im

IDS = ("transformers-tf", "keras-tensorflow", "keras-jax")


def _write_base(root: str) -> str:
  source = im.write_tiny_roberta(os.path.join(root, "roberta_source"))
  path = os.path.join(source, "config.json")
  with open(path, encoding="utf-8") as f:
    config = json.load(f)
  config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(config, f)
  return source


def _start_worker(backend: str, root: str, store: str) -> subprocess.Popen:
  env = tiny.env(KERAS_BACKEND=backend)
  if backend == "jax":
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  with open(os.path.join(root, f"{backend}.err"), "w", encoding="utf-8") as err:
    return subprocess.Popen([sys.executable, body_workers.__file__, backend, root, store],
                            env=env, stdout=subprocess.PIPE, stderr=err, text=True)


def _finish(proc: subprocess.Popen, root: str, backend: str) -> dict:
  out, _ = proc.communicate(timeout=900)
  with open(os.path.join(root, f"{backend}.err"), encoding="utf-8") as f:
    assert proc.returncode == 0, f.read()[-4000:]
  return json.loads(out.strip().splitlines()[-1])


def _transformers_config():
  config = demo.get_config()
  config.strategy = "default"
  config.data.max_examples = {"train": 48, "dev": 16, "test": 16}
  config.recipe.update(dict(batch_size=8, eval_batch_size=16, max_steps=3, max_length=64,
                            learning_rate=1e-3, log_every_seconds=1e9))
  # The paper's plain mean (no server step), and no outlier test: two tasks and two near-twins.
  config.fusion.method = "mean"
  config.fusion.server_optimizer.enabled = False
  config.fusion.max_update_z = 0.0
  return config


def _one_device_run(base: str) -> tuple[dict, object]:
  """The Keras 3 contributors' training, here on one device (TensorFlow's default)."""
  config = body_workers.config("tensorflow", "default")
  body = keras_hub_body.load(base)
  result = keras_trainer.finetune(body, keras_hub_body.load_tokenizer(base),
                                  contributor.load_task(config, body_workers.TASK), config.recipe,
                                  log=lambda _: None)
  return body.hf_tensors(), result


@pytest.fixture(scope="module")
def iteration(tmp_path_factory):
  """Runs the iteration; returns what the tests read."""
  root = str(tmp_path_factory.mktemp("mixed"))
  uri = os.path.join(root, "store")
  store = store_lib.Store(uri)
  store.create(_write_base(root), {"source_model": "tiny-roberta"})
  encoded = models.load_tokenizer(store.base_dir(0))(
      im.texts("sst2", "dev", 8), padding=True, truncation=True, max_length=64,
      return_tensors="np")
  inputs = {k: encoded[k] for k in ("input_ids", "attention_mask")}
  np.savez(os.path.join(root, "inputs.npz"), **inputs)
  workers = {b: _start_worker(b, root, uri) for b in ("tensorflow", "jax")}
  try:
    contributor.contribute(store, _transformers_config(), "sst2", IDS[0], log=lambda _: None,
                           workdir=os.path.join(root, "work-transformers"))
    one_device, one_device_result = _one_device_run(store.base_dir(0))
    deadline = time.time() + 900
    while len(store.contributions(0)[0]) < 3:
      for backend, proc in workers.items():
        if proc.poll() not in (None, 0):
          _finish(proc, root, backend)  # fails with the worker's error
      assert time.time() < deadline, "the workers did not contribute in time"
      time.sleep(0.5)
    outcome = fusion.fuse_config(store, _transformers_config().fusion, log=lambda _: None)
    summaries = {b: _finish(p, root, b) for b, p in workers.items()}
  finally:
    for proc in workers.values():
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  base = store.base_dir(1)
  keras_body = keras_hub_body.load(base)
  tf_body = models.load_body(base)
  return {
      "store": store, "outcome": outcome, "summaries": summaries,
      "metas": {c.contributor_id: c.meta for c in store.contributions(0)[0]},
      "bodies": {cid: safetensors.numpy.load_file(
          os.path.join(uri, "contributions", "000000", cid, "body.safetensors")) for cid in IDS},
      "one_device": one_device, "one_device_dev": one_device_result.dev,
      "base0": safetensors.numpy.load_file(os.path.join(store.base_dir(0), "model.safetensors")),
      "hidden": {
          "transformers_tf": tf_body(**inputs, training=False).last_hidden_state.numpy(),
          "keras_hub/tensorflow": np.asarray(keras_body(inputs)),
          "keras_hub/jax": np.load(os.path.join(root, "jax_hidden.npy"))},
      "mask": inputs["attention_mask"].astype(bool),
      "keras_tensors": keras_body.hf_tensors()}


def _max_diff(a: dict, b: dict) -> float:
  return max(float(np.abs(a[n] - b[n]).max()) for n in a)


def test_three_bodies_contribute_to_one_iteration_and_say_which_they_are(iteration):
  # Prepare
  metas, summaries = iteration["metas"], iteration["summaries"]
  # Execute
  made_by = {cid: (meta["body"], meta["backend"]) for cid, meta in metas.items()}
  fused = [c["id"] for c in iteration["store"].manifest(1)["fusion"]["contributions"]]
  # Assert
  assert made_by == {"transformers-tf": ("transformers_tf", "tensorflow"),
                     "keras-tensorflow": ("keras_hub", "tensorflow"),
                     "keras-jax": ("keras_hub", "jax")}
  assert iteration["outcome"].published == 1
  assert sorted(fused) == sorted(IDS)
  assert ("4 per replica x 2 replica(s) x 1 accumulation), lr 0.001, Keras 3 (tensorflow), "
          "MirroredStrategy with 2 replica(s)") in summaries["tensorflow"]["started"]
  assert ("4 per replica x 2 replica(s) x 1 accumulation), lr 0.001, Keras 3 (jax), "
          "DataParallel over 2 devices (cpu:0, cpu:1)") in summaries["jax"]["started"]


def test_the_fused_base_is_the_mean_of_the_three_files(iteration):
  # Prepare
  bodies = list(iteration["bodies"].values())
  # Execute
  fused = safetensors.numpy.load_file(
      os.path.join(iteration["store"].base_dir(1), "model.safetensors"))
  mean = {n: np.mean([b[n].astype(np.float64) for b in bodies], axis=0) for n in bodies[0]}
  # Assert
  assert sorted(fused) == sorted(mean)
  assert _max_diff(mean, fused) < 1e-6
  assert min(_max_diff(b, iteration["base0"]) for b in bodies) > 1e-3  # every one trained


def test_every_body_loads_the_fused_base_to_the_same_hidden_states(iteration):
  # Prepare
  hidden, real = iteration["hidden"], iteration["mask"]
  fused = safetensors.numpy.load_file(
      os.path.join(iteration["store"].base_dir(1), "model.safetensors"))
  # Execute
  reference = hidden["transformers_tf"]
  diffs = {k: float(np.abs(v - reference)[real].max()) for k, v in hidden.items()}
  # Assert: RoBERTa's GELU is exact in both frameworks, so float32 rounding is all that differs.
  assert diffs["keras_hub/tensorflow"] < 1e-5 and diffs["keras_hub/jax"] < 1e-5, diffs
  assert all(np.array_equal(fused[n], iteration["keras_tensors"][n]) for n in fused)
  assert iteration["summaries"]["jax"]["fused"]["bitwise"]


def test_the_keras_hub_body_on_jax_imports_nothing_from_transformers(iteration):
  # Prepare
  summary = iteration["summaries"]["jax"]
  # Execute
  imported = summary["transformers_modules"]
  # Assert
  assert summary["keras_backend"] == "jax"
  assert imported == []


def test_mirrored_over_two_cpus_trains_like_one_device(iteration):
  # Prepare
  mirrored = iteration["bodies"]["keras-tensorflow"]
  # Execute
  diff = _max_diff(iteration["one_device"], mirrored)
  # Assert
  assert diff < 1e-5
  assert iteration["metas"]["keras-tensorflow"]["dev_metrics"] == iteration["one_device_dev"]


def test_jax_data_parallel_trains_like_tensorflow(iteration):
  # Prepare
  data_parallel = iteration["bodies"]["keras-jax"]
  # Execute: the same head (drawn with numpy), data and recipe on another backend.
  to_one_device = _max_diff(iteration["one_device"], data_parallel)
  to_mirrored = _max_diff(iteration["bodies"]["keras-tensorflow"], data_parallel)
  # Assert
  assert to_one_device < 1e-4 and to_mirrored < 1e-4
  assert iteration["metas"]["keras-jax"]["dev_metrics"] == iteration["one_device_dev"]
