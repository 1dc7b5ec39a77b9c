"""Strategies for real on CPU: choice and errors, MirroredStrategy over two logical CPU devices
against one device, and MultiWorkerMirroredStrategy with two worker processes on loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

import tiny
from cold_fusion_tf.training import distribute as strategies
from cold_fusion_tf.errors import UserError


def test_auto_and_default_on_a_cpu_machine(monkeypatch):
  # Prepare
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  monkeypatch.delenv("TF_CONFIG", raising=False)
  assert not strategies.tpu_attached()
  # Execute
  strategy = strategies.make("auto")
  # Assert
  assert strategy is tf.distribute.get_strategy()
  assert strategies.make("auto") is strategy  # made once per process
  assert strategies.is_chief(strategy) and strategies.task(strategy) == ("chief", 0)
  # Execute: one device
  one = strategies.make("one_device")
  # Assert
  assert isinstance(one, tf.distribute.OneDeviceStrategy) and one.num_replicas_in_sync == 1


@pytest.mark.parametrize("name, expected", [
    ("mirrored", "needs several GPUs"),
    ("multi_worker", "needs TF_CONFIG"),
    ("tpu", "no TPU available"),
])
def test_unavailable_strategy_lists_the_visible_devices(monkeypatch, name, expected):
  # Prepare
  monkeypatch.delenv("TF_CONFIG", raising=False)
  # Execute
  with pytest.raises(UserError) as err:
    strategies.make(name, "local" if name == "tpu" else "")
  # Assert
  assert expected in str(err.value)
  assert "Visible devices: CPU:0" in str(err.value)


def test_unknown_strategy_and_bad_tf_config(monkeypatch):
  # Execute / Assert: an unknown name
  with pytest.raises(UserError, match="not one of auto, tpu, mirrored"):
    strategies.make("gpu")
  # Prepare: a TF_CONFIG that is not JSON
  monkeypatch.setenv("TF_CONFIG", "{not json")
  # Execute / Assert
  with pytest.raises(UserError, match="TF_CONFIG is not valid JSON"):
    strategies.make("multi_worker")
  # Prepare: a TF_CONFIG with an empty cluster
  monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {}}))
  # Execute / Assert
  with pytest.raises(UserError, match='needs "cluster"'):
    strategies.tf_config_cluster()


def test_batch_must_divide_across_replicas_and_accumulation():
  # Prepare
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  default = tf.distribute.get_strategy()
  # Execute / Assert: a batch that divides
  assert strategies.check_batch(32, default, 4) == 8
  # Execute: one that does not
  with pytest.raises(UserError) as err:
    strategies.check_batch(30, default, 4)
  # Assert
  assert "does not divide across 1 replica(s) x 4" in str(err.value)
  assert "Visible devices: CPU:0" in str(err.value)
  assert "multiple of 4" in str(err.value)


def test_accumulation_steps():
  # Execute / Assert
  assert strategies.accumulation_steps(256, 8) == 1
  assert strategies.accumulation_steps(256, 1, grad_accum_steps=4) == 4
  assert strategies.accumulation_steps(256, 8, max_replica_batch=32) == 1
  assert strategies.accumulation_steps(256, 1, max_replica_batch=32) == 8
  assert strategies.accumulation_steps(256, 2, max_replica_batch=48) == 4  # 128 -> 4 x 32
  assert strategies.accumulation_steps(96, 1, max_replica_batch=40) == 3   # 96 -> 3 x 32


MIRRORED_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    sys.path.insert(0, sys.argv[1])
    import tiny
    from cold_fusion_tf import data
    from cold_fusion_tf.model import bodies as models
    from cold_fusion_tf.training import distribute as strategies
    from cold_fusion_tf.training import trainer as training
    from cold_fusion_tf.training.recipe import Recipe

    task = data.load_task("trec_coarse", dirs=[tiny.DATA],
                          max_examples={"train": 96, "dev": 40, "test": 8})
    tokenizer = tiny.bert_tokenizer()
    recipe = Recipe(batch_size=16, eval_batch_size=10, learning_rate=1e-3, epochs=1,
                    max_length=48, eval_every_steps=1000, steps_per_execution=2,
                    log_every_seconds=1e9)

    def train(strategy, seed):
      with strategy.scope():
        body = tiny.tiny_body(layers=2, seed=0)
      models.set_seed(seed)
      initial = [w.numpy() for w in body.weights]
      result = training.finetune(body, tokenizer, task, recipe, strategy=strategy,
                                 log=lambda m: None)
      return [w.numpy() for w in body.weights], initial, result

    mirrored = strategies.make("mirrored")
    one, initial, r1 = train(tf.distribute.get_strategy(), 0)
    two, _, r2 = train(mirrored, 0)
    print(json.dumps({
        "replicas": mirrored.num_replicas_in_sync,
        "devices": list(mirrored.extended.worker_devices),
        "steps": [r1.steps, r2.steps],
        "dev": [r1.dev["score"], r2.dev["score"]],
        "max_diff": max(float(np.abs(a - b).max()) for a, b in zip(one, two)),
        "moved": max(float(np.abs(a - b).max()) for a, b in zip(one, initial)),
    }))
""")


def test_mirrored_over_two_cpu_devices_matches_one_device(tmp_path):
  # Prepare
  script = tmp_path / "mirrored.py"
  script.write_text(MIRRORED_SCRIPT)
  # Execute
  proc = subprocess.run([sys.executable, str(script), os.path.join(tiny.REPO, "tests")],
                        env=tiny.env(), capture_output=True, text=True, timeout=300,
                        check=False)
  # Assert
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["replicas"] == 2 and len(out["devices"]) == 2
  assert out["steps"] == [6, 6]
  assert out["moved"] > 1e-3          # training changed the weights...
  assert out["max_diff"] < 1e-4       # ...the same way on one device and on two replicas
  assert out["dev"][0] == out["dev"][1]


def _free_ports(n: int) -> list[int]:
  sockets = [socket.socket() for _ in range(n)]
  for s in sockets:
    s.bind(("127.0.0.1", 0))
  ports = [s.getsockname()[1] for s in sockets]
  for s in sockets:
    s.close()
  return ports


def test_multi_worker_two_processes_write_one_contribution(tmp_path):
  # Prepare
  store = tiny.make_store(str(tmp_path / "store"))
  config = tiny.write_config(str(tmp_path / "config.py"), train=160,
                             checkpoint_every_steps=5)
  cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
  # Execute: two worker processes
  procs = []
  for index in range(2):
    tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
    cmd = tiny.train_command(config, store, str(tmp_path / "workdir"),
                             "--config.strategy=multi_worker")
    procs.append(subprocess.Popen(cmd, env=tiny.env(TF_CONFIG=tf_config),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=300)[0])
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  # Assert
  for proc, out in zip(procs, outputs):
    assert proc.returncode == 0, out[-3000:]
  chief, worker = outputs
  assert "MultiWorkerMirroredStrategy with 2 replica(s), this process is worker 0 (chief)" in chief
  assert "contributed to iteration 0" in chief
  assert "contributed to iteration 0" not in worker
  assert "the chief writes the contribution" in worker
  found = os.listdir(os.path.join(store, "contributions", "000000"))
  assert found == ["trec_coarse"]
  with open(os.path.join(store, "contributions", "000000", "trec_coarse",
                         "contribution.json"), encoding="utf-8") as f:
    meta = json.load(f)
  assert meta["steps"] == 10 and meta["examples_seen"] == 160
  # The chief's checkpoints are gone once the contribution is written; the worker kept none
  # (.lock: the chief's hold on the workdir, which ended with it).
  assert sorted(os.listdir(tmp_path / "workdir")) == [".lock", "tensorboard", "tokens"]
