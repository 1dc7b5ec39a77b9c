"""A Keras 3 contributor in its own process, for tests/test_mixed_bodies.py.

  python tests/body_workers.py tensorflow OUT STORE     # 2 logical CPUs, MirroredStrategy
  KERAS_BACKEND=jax XLA_FLAGS=--xla_force_host_platform_device_count=2 \
      python tests/body_workers.py jax OUT STORE        # 2 host devices, DataParallel

The worker contributes to STORE's base 0 with the contributor's own code (body and backend
from the config) over its two devices; the JAX worker then waits for base 1 and writes the
fused base's hidden states for OUT/inputs.npz. The last stdout line is a JSON summary, with
the transformers modules the process imported.
"""

from __future__ import annotations

import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(ROOT, "cold_fusion_tf", "data", "demo")
TASK = "trec_coarse"


def config(backend: str, strategy: str):
  """The demo config with the keras-hub body on ``backend``, a slice of the demo data and a
  3-step recipe (the same for every Keras 3 run of the test)."""
  from cold_fusion_tf.configs import demo  # pylint: disable=g-import-not-at-top
  result = demo.get_config()
  result.model.body, result.model.backend, result.strategy = "keras_hub", backend, strategy
  result.data.dirs = (DATA,)
  result.data.max_examples = {"train": 48, "dev": 16, "test": 16}
  result.recipe.update(dict(batch_size=8, eval_batch_size=16, max_steps=3, max_length=64,
                            learning_rate=1e-3, length_buckets=1, log_every_seconds=1e9))
  return result


def fused_hidden_states(store, out: str) -> dict:
  """Waits for base 1, loads it in the keras-hub body, writes its hidden states."""
  # pylint: disable=g-import-not-at-top
  import numpy as np
  from cold_fusion_tf.model import keras_hub_body
  from cold_fusion_tf.tensors import safetensors_io
  # pylint: enable=g-import-not-at-top
  deadline = time.time() + 600
  while store.latest() != 1:
    if time.time() > deadline:
      raise TimeoutError("base 1 was not published")
    time.sleep(0.5)
  base = store.base_dir(1)
  body = keras_hub_body.load(base)
  path = os.path.join(base, "model.safetensors")
  saved = safetensors_io.load_checked(path, safetensors_io.specs_of_file(path), path)
  tensors = body.hf_tensors()
  with np.load(os.path.join(out, "inputs.npz")) as inputs:
    np.save(os.path.join(out, "jax_hidden.npy"), np.asarray(body(dict(inputs))))
  return {"bitwise": sorted(saved) == sorted(tensors)
                     and all(np.array_equal(saved[n], tensors[n]) for n in saved)}


def main(argv) -> None:
  backend, out, store_uri = argv[1:4]
  sys.path.insert(0, ROOT)
  if backend == "tensorflow":
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
  # pylint: disable=g-import-not-at-top
  from cold_fusion_tf import store as store_lib
  from cold_fusion_tf.training import contributor
  # pylint: enable=g-import-not-at-top
  store = store_lib.Store(store_uri)
  logs = []
  contributor.contribute(store, config(backend, "mirrored" if backend == "tensorflow" else "auto"),
                         TASK, f"keras-{backend}", log=logs.append,
                         workdir=os.path.join(out, f"work-{backend}"))
  summary = {"started": logs[0]}
  if backend == "jax":
    import keras  # pylint: disable=g-import-not-at-top
    summary["keras_backend"] = keras.backend.backend()
    summary["fused"] = fused_hidden_states(store, out)
  summary["transformers_modules"] = sorted(m for m in sys.modules if m.startswith("transformers"))
  print(json.dumps(summary))


if __name__ == "__main__":
  main(sys.argv)
