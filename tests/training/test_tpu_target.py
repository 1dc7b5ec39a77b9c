"""The TPU target (``--config.tpu``, ``TPU_NAME``), the remote workdir probe and the multi-host
TPU workdir rule, on CPU: no TPU is attached here, so TensorFlow's resolver is replaced where
a test needs to see what it would be asked for."""

from __future__ import annotations

import os

import pytest
import tensorflow as tf

import tiny
from cold_fusion_tf import store as store_lib
from cold_fusion_tf.errors import UserError
from cold_fusion_tf.training import checkpoints
from cold_fusion_tf.training import contributor
from cold_fusion_tf.training import distribute as strategies

PODS = "grpc://10.0.0.2:8470,grpc://10.0.0.3:8470"


def test_tpu_target_comes_from_the_config_then_tpu_name(monkeypatch):
  # Prepare
  monkeypatch.setenv("TPU_NAME", PODS)
  # Execute
  from_env, from_config = strategies.tpu_target(""), strategies.tpu_target("grpc://10.1.1.1:8470")
  monkeypatch.delenv("TPU_NAME")
  attached = strategies.tpu_target("  ")
  # Assert
  assert from_env == PODS
  assert from_config == "grpc://10.1.1.1:8470"
  assert attached == "local"


@pytest.mark.parametrize("target, words", [
    ("grpc://10.0.0.2:8470,10.0.0.3:8470", "endpoints must be grpc://IP:PORT items"),
    ("grpc://10.0.0.2", "endpoints must be grpc://IP:PORT items"),
    ("my-v4-32", "cloud-tpu-client"),
])
def test_unusable_tpu_targets_fail_before_tensorflow_is_asked(target, words):
  # Execute
  with pytest.raises(UserError) as err:
    strategies.check_tpu_target(target)
  # Assert
  assert words in str(err.value)
  assert "grpc://IP0:8470" in str(err.value) or "IP:PORT" in str(err.value)


def test_the_tpu_strategy_connects_to_the_endpoints_in_tpu_name(monkeypatch):
  # Prepare: record what the resolver is asked for (there is no TPU to connect to).
  asked = []

  def resolver(tpu=None, **_):
    asked.append(tpu)
    raise ValueError("no TPU here")

  monkeypatch.setattr(tf.distribute.cluster_resolver, "TPUClusterResolver", resolver)
  monkeypatch.setattr(strategies, "_MADE", {})  # strategies made by earlier tests are cached
  monkeypatch.setenv("TPU_NAME", PODS)
  # Execute
  with pytest.raises(UserError) as err:
    strategies.make("auto", "")
  # Assert
  assert asked == [PODS]
  assert f"no TPU available for --config.tpu={PODS!r}" in str(err.value)


def test_a_remote_workdir_is_probed_and_a_missing_filesystem_named(tmp_path):
  # Execute / Assert: a scheme TensorFlow has no filesystem for.
  with pytest.raises(UserError, match=r"gcs-filesystem"):
    checkpoints.check_workdir("nosuch://bucket/work")
  # A scheme it has: the probe is written, read and removed.
  checkpoints.check_workdir("file://" + str(tmp_path / "work"))
  assert os.listdir(tmp_path / "work") == []
  # A local path is left alone (created when training starts).
  checkpoints.check_workdir(str(tmp_path / "local"))
  assert not os.path.exists(tmp_path / "local")


def test_a_multi_host_tpu_slice_needs_a_gcs_workdir(tmp_path, monkeypatch):
  # Prepare: a store and a strategy that reports 4 hosts.
  store = store_lib.Store(tiny.make_store(str(tmp_path / "store")))
  config = tiny.demo_config(store.base_dir(0))
  monkeypatch.setattr(strategies, "tpu_hosts", lambda strategy: 4)
  # Execute
  with pytest.raises(UserError) as err:
    contributor.contribute(store, config, "trec_coarse", workdir=str(tmp_path / "work"),
                           log=lambda message: None)
  # Assert: refused before anything was trained or written.
  assert "a multi-host TPU slice needs a gs:// workdir" in str(err.value)
  assert not os.path.exists(tmp_path / "work")
  assert store.contributions(0)[0] == []
