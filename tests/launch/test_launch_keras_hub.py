"""The keras-hub body on a Cloud TPU VM with the JAX backend: tpu_contributor.sh --body=keras_hub
--backend=jax, install.sh --backend=jax and tpu_run.sh --mode=jax, run against the stub gcloud
and python of test_launch.py or as dry runs."""

from __future__ import annotations

import re

import pytest

from test_launch import (ROOT, STORE, Stubs, dry_run, flag, remote_words, run_script, tpu_run,
                         train_flags)

JAX = re.search(r"^jax\[cpu\]==(\S+)", (ROOT / "requirements-dev.txt").read_text(),
                re.M).group(1)
KERAS_JAX = ["--body=keras_hub", "--backend=jax"]


def tpu_args(accelerator_type: str, zone: str = "us-west4-a") -> list[str]:
  return ["--project=my-proj", f"--zone={zone}", f"--store={STORE}",
          f"--accelerator-type={accelerator_type}", "--dataset=sst2"]


@pytest.fixture
def stubs(tmp_path):
  return Stubs(tmp_path)


@pytest.mark.parametrize("accelerator_type,zone,runtime", [
    ("v5litepod-8", "us-west4-a", "v2-alpha-tpuv5-lite"),
    ("v6e-8", "us-east5-b", "v2-alpha-tpuv6e"),
    ("v4-8", "us-central2-b", "v2-alpha-tpuv5"),
])
def test_keras_hub_on_jax_takes_the_jax_image_installs_jax_and_trains_with_it(
    stubs, accelerator_type, zone, runtime):
  # Execute: the stub gcloud offers TensorFlow images too; the JAX path must not take them.
  result = run_script(stubs, "tpu_contributor.sh", *tpu_args(accelerator_type, zone), *KERAS_JAX,
                      "--poll-interval=0.1")
  # Assert
  assert result.returncode == 0, result.stderr
  calls = stubs.calls()
  create, = [c for c in calls if c[3:5] == ["queued-resources", "create"]]
  assert flag(create, "--runtime-version") == runtime
  install, = [c for c in calls if "ssh" in c and "install.sh" in " ".join(c)]
  assert remote_words(install)[-1][2:] == [
      "--accelerator=tpu", "--venv=cf-venv", "--python=uv", "--backend=jax",
      f"--check-workdir={STORE}/scratch/sst2"]
  train, = [c for c in calls if "ssh" in c and "tpu_run.sh" in " ".join(c)]
  assert flag(train, "--worker") == "all"
  assert remote_words(train)[-1] == tpu_run("jax") + train_flags(
      "sst2", strategy="tpu", **{"model.body": "keras_hub", "model.backend": "jax"})


@pytest.mark.parametrize("args,message", [
    (tpu_args("v5litepod-8") + ["--body=keras_hub"],
     "--body=keras_hub runs on TPUs with --backend=jax"),
    (tpu_args("v5litepod-8") + ["--backend=jax"],
     "--backend=jax goes with --body=keras_hub"),
    (tpu_args("v4-32", "us-central2-b") + KERAS_JAX,
     "--backend=jax trains on one host; v4-32 is a multi-host slice"),
    (tpu_args("v5litepod-8") + KERAS_JAX + ["--libtpu-version=0.0.20"],
     "--libtpu-version is TensorFlow's; jax[tpu] brings its own libtpu"),
])
def test_keras_hub_settings_that_cannot_run_stop_before_anything_runs(stubs, args, message):
  # Execute
  result = run_script(stubs, "tpu_contributor.sh", *args, "--dry-run")
  # Assert
  assert result.returncode == 2
  assert message in result.stderr
  assert stubs.calls() == []


def test_no_jax_image_in_the_zone_fails_before_creating_anything(stubs):
  # Prepare
  rules = stubs.rules({"match": ["versions", "list"],
                       "stdout": ["tpu-vm-tf-2.18.0-pjrt-v5e-and-v6\nv2-alpha-tpuv5"]})
  # Execute
  result = run_script(stubs, "tpu_contributor.sh", *tpu_args("v5litepod-8"), *KERAS_JAX,
                      STUB_RULES=rules)
  # Assert
  assert result.returncode == 1
  assert "does not offer v2-alpha-tpuv5-lite, the JAX runtime image of v5e" in result.stderr
  assert not [c for c in stubs.calls() if "create" in c]


@pytest.mark.parametrize("accelerator,extra", [("cpu", "cpu"), ("gpu", "cuda12"), ("tpu", "tpu")])
def test_install_with_jax_adds_jax_for_the_accelerator_and_keeps_tensorflow(
    stubs, tmp_path, accelerator, extra):
  # Execute
  cmds = dry_run(stubs, "install.sh", f"--accelerator={accelerator}", "--backend=jax",
                 f"--venv={tmp_path}/v")
  # Assert
  words = [" ".join(c) for c in cmds]
  assert f"{tmp_path}/v/bin/python -m pip install jax[{extra}]=={JAX}" in words
  assert f"{tmp_path}/v/bin/python -m pip install -r requirements.txt" in words
  assert not [w for w in words if "tensorflow-tpu" in w or "and-cuda" in w or "uninstall" in w]
  assert cmds[-1][:2] == [f"{tmp_path}/v/bin/python", "-c"] and "jax.devices()" in cmds[-1][2]


def test_install_with_jax_refuses_tensorflows_tpu_settings(stubs, tmp_path):
  # Execute
  libtpu = run_script(stubs, "install.sh", "--accelerator=tpu", "--backend=jax",
                      f"--venv={tmp_path}/v", "--libtpu-version=0.0.20", "--dry-run")
  server = run_script(stubs, "install.sh", "--accelerator=tpu", "--backend=jax",
                      f"--venv={tmp_path}/v", "--pod-server=check", "--dry-run")
  unknown = run_script(stubs, "install.sh", "--backend=torch", "--dry-run")
  # Assert
  assert libtpu.returncode == 2 and "jax[tpu] brings its own libtpu" in libtpu.stderr
  assert server.returncode == 2 and "--backend=jax runs on single hosts" in server.stderr
  assert unknown.returncode == 2 and "--backend 'torch' must be tensorflow or jax" in unknown.stderr


def test_tpu_run_jax_mode_sets_only_the_keras_backend(stubs):
  # Execute
  cmds = dry_run(stubs, "tpu_run.sh", "--mode=jax", "--", "--config.task=sst2",
                 "--config.model.body=keras_hub", "--config.model.backend=jax")
  # Assert: no libtpu lookup and no TensorFlow PJRT variables; JAX opens the TPU itself.
  assert cmds == [["env", "KERAS_BACKEND=jax", "python", "-m", "cold_fusion_tf.train",
                   "--config.task=sst2", "--config.model.body=keras_hub",
                   "--config.model.backend=jax"]]
