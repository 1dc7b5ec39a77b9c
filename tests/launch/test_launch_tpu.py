"""Cloud TPU and GKE launch paths, against stub gcloud/kubectl answering as the real ones do.

One group of tests per point of the TPU launch path: the runtime version from the zone's list,
Python 3.11 on the VM, the libtpu pin, the PJRT environment, multi-host slices, GKE Jobs, zone
names, preemption, permissions, the project set-up documentation, preflight and the gs://
workdir check. The stubs and helpers are those of test_launch.py.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from test_launch import (LAUNCH, QR, ROOT, STORE, STUB, TF, TPU_ARGS, Stubs, commands, dry_run,
                         find, flag, remote_words, run_script, tpu_run, train_flags)

SA = "cf-contributor@my-proj.iam.gserviceaccount.com"
V5E = ["--project=my-proj", "--zone=us-west4-a", f"--store={STORE}",
       "--accelerator-type=v5litepod-8", "--dataset=sst2"]
V4_POD = ["--project=my-proj", "--zone=us-central2-b", f"--store={STORE}",
          "--accelerator-type=v4-32", "--dataset=rte"]
# What `gcloud compute tpus tpu-vm describe ... --flatten="networkEndpoints[]"
# --format="csv[no-heading](networkEndpoints.ipAddress,networkEndpoints.port)"` prints for a
# v4-32 (4 workers).
V4_32_ENDPOINTS = "10.130.0.2,8470\n10.130.0.3,8470\n10.130.0.4,8470\n10.130.0.5,8470"
V4_32_GRPC = ",".join(f"grpc://10.130.0.{i}:8470" for i in range(2, 6))


@pytest.fixture
def stubs(tmp_path):
  return Stubs(tmp_path)


def verbs(calls: list[list[str]]) -> list[str]:
  """'create', 'ssh', ... for the gcloud calls (the word after the command group)."""
  return [c[4] if c[3] in ("queued-resources", "tpu-vm") else c[3] for c in calls
          if c[0] == "gcloud"]


def train_calls(calls: list[list[str]]) -> list[list[str]]:
  return [c for c in calls if "ssh" in c and "tpu_run.sh" in " ".join(c)]


# ---------------------------------------------------------------------------------------------
# The runtime version: from the zone's list, matching TensorFlow and the generation.


@pytest.mark.parametrize("args,offered,runtime,pod_server", [
    # A TensorFlow 2.20 image of the generation is preferred when the zone offers one...
    (V5E, "tpu-vm-tf-2.18.0-pjrt-v5e-and-v6\ntpu-vm-tf-2.20.0-pjrt-v5e-and-v6\nv2-alpha-tpuv5-lite",
     "tpu-vm-tf-2.20.0-pjrt-v5e-and-v6", None),
    # ... else the generation's base image, never a TensorFlow image of another version.
    (V5E, "tpu-vm-tf-2.18.0-pjrt-v5e-and-v6\ntpu-vm-tf-2.18.0-pjrt-v5p-and-below\n"
          "v2-alpha-tpuv5\nv2-alpha-tpuv5-lite", "v2-alpha-tpuv5-lite", None),
    # On a pod the TPU server is checked on a 2.20 pod image, repointed on a base image.
    (V4_POD, "tpu-vm-tf-2.20.0-pod-pjrt\nv2-alpha-tpuv5", "tpu-vm-tf-2.20.0-pod-pjrt", "check"),
    (V4_POD, "tpu-vm-tf-2.18.0-pod-pjrt-v5p-and-below\nv2-alpha-tpuv5", "v2-alpha-tpuv5",
     "repoint"),
])
def test_runtime_version_is_picked_from_the_zones_list(stubs, args, offered, runtime, pod_server):
  # Prepare
  rules = stubs.rules({"match": ["versions", "list"], "stdout": [offered]},
                      {"match": ["tpu-vm", "describe"], "stdout": [V4_32_ENDPOINTS]})
  # Execute
  result = run_script(stubs, "tpu_contributor.sh", *args, "--poll-interval=0.1",
                      STUB_RULES=rules)
  # Assert
  assert result.returncode == 0, result.stderr
  calls = stubs.calls()
  assert calls[0][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "versions", "list"]
  create, = [c for c in calls if c[3:5] == ["queued-resources", "create"]]
  assert flag(create, "--runtime-version") == runtime
  assert f"runtime version: {runtime}" in result.stderr
  install, = [c for c in calls if "ssh" in c and "install.sh" in " ".join(c)]
  install_flags = remote_words(install)[-1]
  if pod_server:
    assert f"--pod-server={pod_server}" in install_flags
  else:
    assert not [w for w in install_flags if w.startswith("--pod-server")]


def test_no_fitting_runtime_version_fails_before_creating_anything(stubs):
  # Prepare: a zone with only older TensorFlow images and no base image for v5e.
  rules = stubs.rules({"match": ["versions", "list"],
                       "stdout": ["tpu-ubuntu2204-base\ntpu-vm-tf-2.16.1-pjrt\n"
                                  "tpu-vm-tf-2.18.0-pjrt-v5p-and-below"]})
  # Execute
  result = run_script(stubs, "tpu_contributor.sh", *V5E, STUB_RULES=rules)
  # Assert
  assert result.returncode == 1
  assert "no runtime version in us-west4-a fits TensorFlow 2.20.0 on v5e" in result.stderr
  assert ("wanted one of: tpu-vm-tf-2.20.0-pjrt-v5e-and-v6 tpu-vm-tf-2.20.0-pjrt "
          "v2-alpha-tpuv5-lite") in result.stderr
  assert "Offered there: tpu-ubuntu2204-base tpu-vm-tf-2.16.1-pjrt" in result.stderr
  assert verbs(stubs.calls()) == ["versions"]


def test_a_given_runtime_version_must_be_offered_in_the_zone(stubs):
  # Execute: the once-guessed name, which the zone's list does not have.
  result = run_script(stubs, "tpu_contributor.sh", *V5E, "--runtime-version=tpu-vm-tf-2.20.0-pjrt")
  # Assert
  assert result.returncode == 1
  assert "--runtime-version 'tpu-vm-tf-2.20.0-pjrt' is not offered in us-west4-a" in result.stderr
  assert "v2-alpha-tpuv5-lite" in result.stderr
  assert verbs(stubs.calls()) == ["versions"]


def test_a_refused_request_ends_the_run_at_once(stubs):
  # Prepare: the create call is refused (no quota, say).
  rules = stubs.rules({"match": ["queued-resources", "create"], "rc": [1]})
  # Execute
  result = run_script(stubs, "tpu_contributor.sh", *V5E, STUB_RULES=rules)
  # Assert: no polling; the delete is still attempted.
  assert result.returncode == 1
  assert "could not create queued resource cf-sst2" in result.stderr
  assert verbs(stubs.calls()) == ["versions", "create", "delete"]


# ---------------------------------------------------------------------------------------------
# Python >= 3.11 on the VM.


def test_install_on_a_tpu_vm_creates_the_venv_with_python_311_from_uv(stubs, tmp_path):
  # Execute
  cmds = dry_run(stubs, "install.sh", "--accelerator=tpu", f"--venv={tmp_path}/venv", "--python=uv")
  # Assert
  uv_dir = f"{stubs.tmp}/home/.cache/cold_fusion_tf/uv-0.13.8"
  assert cmds[:3] == [
      ["python3", "-m", "pip", "install", "--quiet", f"--target={uv_dir}", "uv==0.13.8"],
      [f"{uv_dir}/bin/uv", "python", "install", "3.11"],
      [f"{uv_dir}/bin/uv", "venv", "--seed", "--python=3.11", f"{tmp_path}/venv"]]
  # The virtualenv's Python is checked before anything is installed into it.
  assert cmds[3][:2] == [f"{tmp_path}/venv/bin/python", "-c"] and cmds[3][3:] == ["3.11", "install.sh"]
  assert cmds[4][1:] == ["-m", "pip", "install", "--upgrade", "pip"]


def test_the_python_version_check_stops_an_older_python(stubs, tmp_path):
  # Prepare: the exact check install.sh prints, asked for a newer Python than this one.
  cmds = dry_run(stubs, "install.sh", f"--venv={tmp_path}/venv")
  check = cmds[1]
  assert check[-2:] == ["3.11", "install.sh"]
  newer = f"{sys.version_info.major}.{sys.version_info.minor + 1}"
  # Execute
  passed = subprocess.run([sys.executable, *check[1:]], capture_output=True, text=True, check=False)
  failed = subprocess.run([sys.executable, *check[1:-2], newer, "install.sh"], capture_output=True,
                          text=True, check=False)
  # Assert
  assert passed.returncode == 0, passed.stderr
  assert failed.returncode == 1
  assert f"is Python {sys.version_info.major}.{sys.version_info.minor}; the pinned requirements " \
         f"need {newer} or newer" in failed.stderr
  assert "--python=uv" in failed.stderr


def test_tpu_contributor_installs_with_uv_unless_told(stubs):
  # Execute
  default = dry_run(stubs, "tpu_contributor.sh", *V5E)
  chosen = dry_run(stubs, "tpu_contributor.sh", *V5E, "--remote-python=python3.11")
  # Assert
  install = [remote_words(c)[-1] for c in default if "install.sh" in " ".join(c)]
  assert install[0][2:5] == ["--accelerator=tpu", "--venv=cf-venv", "--python=uv"]
  install = [remote_words(c)[-1] for c in chosen if "install.sh" in " ".join(c)]
  assert install[0][4] == "--python=python3.11"


# ---------------------------------------------------------------------------------------------
# libtpu: pinned, overridable, reported.


def test_install_pins_libtpu_and_reports_what_is_installed(stubs, tmp_path):
  # Execute
  pinned = dry_run(stubs, "install.sh", "--accelerator=tpu", f"--venv={tmp_path}/v")
  override = dry_run(stubs, "install.sh", "--accelerator=tpu", f"--venv={tmp_path}/v",
                     "--libtpu-version=0.0.19.1")
  # Assert
  tpu_install, = [c for c in pinned if f"tensorflow-tpu=={TF}" in c]
  assert tpu_install[4:] == [f"tensorflow-tpu=={TF}", "libtpu==0.0.20", "-f",
                             "https://storage.googleapis.com/libtpu-tf-releases/index.html"]
  assert [c for c in override if "libtpu==0.0.19.1" in c]
  report = pinned[-1]
  assert report[1] == "-c" and "libtpu.get_library_path()" in report[2]
  assert report[3:] == [TF, "0.0.20", "install.sh"]


def test_libtpu_version_is_checked(stubs, tmp_path):
  # Execute
  result = run_script(stubs, "install.sh", "--accelerator=tpu", f"--venv={tmp_path}/v",
                      "--libtpu-version=latest", "--dry-run")
  cpu = run_script(stubs, "install.sh", f"--venv={tmp_path}/v", "--libtpu-version=0.0.20",
                   "--dry-run")
  # Assert
  assert result.returncode == 2 and "--libtpu-version 'latest' is not a version" in result.stderr
  assert cpu.returncode == 2 and "--libtpu-version goes with --accelerator=tpu" in cpu.stderr


# ---------------------------------------------------------------------------------------------
# The PJRT environment, set before TensorFlow is imported.


def test_tpu_run_sets_the_pjrt_environment_on_a_single_host(stubs, tmp_path):
  # Prepare
  libtpu = tmp_path / "site-packages" / "libtpu" / "libtpu.so"
  libtpu.parent.mkdir(parents=True)
  libtpu.write_bytes(b"")
  # Execute
  result = run_script(stubs, "tpu_run.sh", "--", "--config.tpu=local", "--config.task=sst2",
                      STUB_LIBTPU_PATH=str(libtpu))
  # Assert
  assert result.returncode == 0, result.stderr
  lookup, train = stubs.records()
  assert lookup["argv"][:2] == ["python", "-c"] and "libtpu.get_library_path()" in lookup["argv"][2]
  assert train["argv"] == ["python", "-m", "cold_fusion_tf.train", "--config.tpu=local",
                           "--config.task=sst2"]
  assert train["env"] == {"NEXT_PLUGGABLE_DEVICE_USE_C_API": "true",
                          "TF_PLUGGABLE_DEVICE_LIBRARY_PATH": str(libtpu), "PJRT_DEVICE": "TPU"}


def test_tpu_run_pod_client_uses_the_workers_endpoints_and_not_the_local_tpu(stubs):
  # Execute
  result = run_script(stubs, "tpu_run.sh", "--mode=pod-client", f"--endpoints={V4_32_GRPC}",
                      "--", f"--config.tpu={V4_32_GRPC}")
  # Assert
  assert result.returncode == 0, result.stderr
  train, = stubs.records()
  assert train["argv"] == ["python", "-m", "cold_fusion_tf.train", f"--config.tpu={V4_32_GRPC}"]
  assert train["env"] == {"TPU_NAME": V4_32_GRPC, "TPU_LOAD_LIBRARY": "0"}


def test_tpu_run_without_libtpu_fails_before_training(stubs):
  # Execute: the lookup answers a path that does not exist.
  result = run_script(stubs, "tpu_run.sh", "--", "--config.tpu=local")
  # Assert
  assert result.returncode == 1
  assert "libtpu library '/nonexistent/libtpu.so' does not exist" in result.stderr
  assert [r["argv"][:2] for r in stubs.records()] == [["python", "-c"]]


def test_tpu_run_stops_a_training_left_from_a_dropped_connection(stubs, tmp_path):
  # Prepare: a training still running from an earlier attempt, its pid in the pid file.
  leftover = subprocess.Popen([str(stubs.bin / "python"), "-m", "cold_fusion_tf.train", "--old"],
                              env=stubs.env(STUB_PYTHON_SLEEP="600"))
  pid_file = tmp_path / "cf-train.pid"
  pid_file.write_text(str(leftover.pid))
  try:
    deadline = time.time() + 120
    while not stubs.records() and time.time() < deadline:
      time.sleep(0.05)
    # Execute
    result = run_script(stubs, "tpu_run.sh", "--mode=pod-client", "--endpoints=grpc://10.0.0.2:8470",
                        f"--pid-file={pid_file}", "--", "--config.tpu=grpc://10.0.0.2:8470")
    # Assert
    assert result.returncode == 0, result.stderr
    assert leftover.wait(timeout=60) != 0
    assert f"stopping the training left from an earlier attempt (pid {leftover.pid})" in result.stderr
    new = [r for r in stubs.records() if "--config.tpu=grpc://10.0.0.2:8470" in r["argv"]]
    assert len(new) == 1 and pid_file.read_text().strip() == str(new[0]["pid"])
  finally:
    if leftover.poll() is None:
      leftover.kill()


def test_gke_tpu_pod_gets_the_pjrt_environment(stubs):
  # Execute
  result = run_script(stubs, "gke_contributor.sh", "--image=us-docker.pkg.dev/p/r/i:v1",
                      f"--store={STORE}", "--dataset=sst2", "--accelerator=tpu",
                      "--tpu-type=tpu-v5-lite-podslice", "--tpu-topology=2x4", "--print-manifest")
  # Assert
  assert result.returncode == 0, result.stderr
  container, = yaml.safe_load(result.stdout)["spec"]["template"]["spec"]["containers"]
  assert container["command"] == ["bash", "launch/tpu_run.sh", "--mode=pjrt", "--"]
  assert container["env"] == [{"name": "NEXT_PLUGGABLE_DEVICE_USE_C_API", "value": "true"},
                              {"name": "PJRT_DEVICE", "value": "TPU"}]
  assert container["args"][-2:] == ["--config.strategy=tpu", "--config.tpu=local"]


# ---------------------------------------------------------------------------------------------
# Multi-host slices.


def test_pod_slice_trains_from_worker_0_through_the_workers_grpc_endpoints(stubs):
  # Prepare
  rules = stubs.rules({"match": ["tpu-vm", "describe"], "stdout": [V4_32_ENDPOINTS]})
  # Execute
  result = run_script(stubs, "tpu_contributor.sh", *V4_POD, "--poll-interval=0.1",
                      STUB_RULES=rules)
  # Assert
  assert result.returncode == 0, result.stderr
  calls = stubs.calls()
  assert verbs(calls) == ["versions", "create", "describe", "scp", "ssh", "describe", "ssh",
                          "delete"]
  train, = train_calls(calls)
  assert flag(train, "--worker") == "0"
  assert remote_words(train)[-1] == (
      tpu_run("pod-client", V4_32_GRPC) + train_flags("rte", strategy="tpu", tpu=V4_32_GRPC))
  assert f"workers of cf-rte: {V4_32_GRPC}" in result.stderr


@pytest.mark.parametrize("endpoints,message", [
    ("10.130.0.2,8470", "lists 1 worker endpoint(s)"),
    ("10.130.0.2;rm -rf ~,8470\n10.130.0.3,8470", "is not an IPv4 address"),
])
def test_pod_slice_endpoints_are_checked(stubs, endpoints, message):
  # Prepare
  rules = stubs.rules({"match": ["tpu-vm", "describe"], "stdout": [endpoints]})
  # Execute
  result = run_script(stubs, "tpu_contributor.sh", *V4_POD, STUB_RULES=rules)
  # Assert
  assert result.returncode == 1
  assert message in result.stderr
  assert train_calls(stubs.calls()) == []
  assert verbs(stubs.calls())[-1] == "delete"


def test_pod_slice_requires_a_gcs_workdir(stubs):
  # Execute
  result = run_script(stubs, "tpu_contributor.sh", *V4_POD, "--workdir=workdir/rte", "--dry-run")
  # Assert
  assert result.returncode == 2
  assert "--workdir 'workdir/rte' must be gs://... on a multi-host slice" in result.stderr
  assert stubs.calls() == []


def service_file(tmp_path: Path, tag: str) -> Path:
  """A tpu-runtime.service like the one of a TensorFlow pod image."""
  path = tmp_path / "tpu-runtime.service"
  path.write_text(
      "[Unit]\nDescription=TPU runtime\n[Service]\n"
      f'Environment="TF_DOCKER_URL=gcr.io/cloud-tpu-v2-images/grpc_tpu_worker:{tag}"\n'
      "ExecStart=/usr/bin/docker run --rm --privileged --net=host $TF_DOCKER_URL\n")
  return path


def fake_venv(stubs: Stubs, tmp_path: Path) -> Path:
  """A virtualenv whose python is the stub (so install.sh skips creating one)."""
  venv = tmp_path / "venv"
  (venv / "bin").mkdir(parents=True)
  python = venv / "bin" / "python"
  python.write_text(STUB.replace("__PYTHON__", sys.executable))
  python.chmod(0o755)
  return venv


def test_pod_worker_with_a_tpu_server_for_another_tensorflow_fails_first(stubs, tmp_path):
  # Prepare
  service = service_file(tmp_path, "tf-2.18.0-pjrt")
  venv = fake_venv(stubs, tmp_path)
  # Execute
  result = run_script(stubs, "install.sh", "--accelerator=tpu", f"--venv={venv}",
                      "--pod-server=check", TPU_RUNTIME_SERVICE=str(service))
  # Assert: before anything is installed.
  assert result.returncode == 1
  assert ("the TPU server on this worker is gcr.io/cloud-tpu-v2-images/grpc_tpu_worker:"
          "tf-2.18.0-pjrt, not one for TensorFlow 2.20.0") in result.stderr
  assert "--pod-server=repoint" in result.stderr
  assert stubs.calls() == []


def test_pod_worker_with_the_matching_tpu_server_installs(stubs, tmp_path):
  # Prepare
  service = service_file(tmp_path, "tf-2.20.0-pjrt")
  venv = fake_venv(stubs, tmp_path)
  # Execute
  result = run_script(stubs, "install.sh", "--accelerator=tpu", f"--venv={venv}",
                      "--pod-server=check", TPU_RUNTIME_SERVICE=str(service))
  # Assert
  assert result.returncode == 0, result.stderr
  assert "TPU server on this worker: gcr.io/cloud-tpu-v2-images/grpc_tpu_worker:tf-2.20.0-pjrt" \
         in result.stderr
  assert [c for c in stubs.calls() if f"tensorflow-tpu=={TF}" in c]


def test_pod_worker_tpu_server_is_repointed_at_the_pinned_tensorflow(stubs, tmp_path):
  # Prepare: a base image's server.
  service = service_file(tmp_path, "nightly")
  venv = fake_venv(stubs, tmp_path)
  # Execute
  result = run_script(stubs, "install.sh", "--accelerator=tpu", f"--venv={venv}",
                      "--pod-server=repoint", TPU_RUNTIME_SERVICE=str(service))
  # Assert
  assert result.returncode == 0, result.stderr
  assert ('Environment="TF_DOCKER_URL=gcr.io/cloud-tpu-v2-images/grpc_tpu_worker:tf-2.20.0-pjrt"'
          in service.read_text())
  calls = stubs.calls()
  assert calls[0][:3] == ["sudo", "sed", "-i"]
  assert [c for c in calls if c[0] == "systemctl"] == [
      ["systemctl", "daemon-reload"], ["systemctl", "restart", "tpu-runtime"],
      ["systemctl", "is-active", "tpu-runtime"]]


# ---------------------------------------------------------------------------------------------
# GKE: chips from the topology, single-host only, preemption and retries.


GKE = ["--image=us-docker.pkg.dev/my-proj/cf/cold-fusion:v1", f"--store={STORE}", "--dataset=sst2"]


@pytest.mark.parametrize("tpu_type,topology,chips", [
    ("tpu-v4-podslice", "2x2x1", 4),
    ("tpu-v5p-slice", "2x2x1", 4),
    ("tpu-v5-lite-podslice", "1x1", 1),
    ("tpu-v5-lite-podslice", "2x2", 4),
    ("tpu-v5-lite-podslice", "2x4", 8),
    ("tpu-v6e-slice", "2x4", 8),
])
def test_gke_tpu_chips_come_from_the_topology(stubs, tpu_type, topology, chips):
  # Execute
  result = run_script(stubs, "gke_contributor.sh", *GKE, "--accelerator=tpu",
                      f"--tpu-type={tpu_type}", f"--tpu-topology={topology}", "--print-manifest")
  # Assert
  assert result.returncode == 0, result.stderr
  pod = yaml.safe_load(result.stdout)["spec"]["template"]["spec"]
  assert pod["containers"][0]["resources"] == {"limits": {"google.com/tpu": chips}}
  assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": tpu_type,
                                 "cloud.google.com/gke-tpu-topology": topology}


@pytest.mark.parametrize("args,message", [
    (["--tpu-type=tpu-v4-podslice", "--tpu-topology=2x2x2"], "has 8 chips on several hosts"),
    (["--tpu-type=tpu-v5-lite-podslice", "--tpu-topology=4x4"], "a JobSet"),
    (["--tpu-type=tpu-v4-podslice", "--tpu-topology=2x4"], "must have 3 dimensions"),
    (["--tpu-type=tpu-v4-podslice", "--tpu-topology=2x2x1", "--tpu-chips=8"],
     "or it stays Pending"),
    (["--tpu-type=tpu-v9-podslice", "--tpu-topology=2x2"], "must be one of tpu-v4-podslice"),
])
def test_gke_rejects_what_would_never_schedule(stubs, args, message):
  # Execute
  result = run_script(stubs, "gke_contributor.sh", *GKE, "--accelerator=tpu", *args, "--dry-run")
  # Assert
  assert result.returncode == 2
  assert message in result.stderr
  assert stubs.calls() == []


def test_gke_job_survives_preemption_and_retries_failures(stubs):
  # Execute
  result = run_script(stubs, "gke_contributor.sh", *GKE, "--accelerator=tpu",
                      "--tpu-type=tpu-v5-lite-podslice", "--tpu-topology=2x4", "--spot",
                      "--retries=5", "--print-manifest")
  # Assert
  assert result.returncode == 0, result.stderr
  job = yaml.safe_load(result.stdout)
  assert job["spec"]["backoffLimit"] == 5
  assert job["spec"]["podFailurePolicy"] == {"rules": [
      {"action": "FailJob",
       "onExitCodes": {"containerName": "contributor", "operator": "In", "values": [2]}},
      {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}]}
  pod = job["spec"]["template"]["spec"]
  assert pod["restartPolicy"] == "Never"
  assert pod["nodeSelector"]["cloud.google.com/gke-spot"] == "true"
  assert pod["tolerations"] == [{"key": "cloud.google.com/gke-spot", "operator": "Equal",
                                 "value": "true", "effect": "NoSchedule"}]
  # The workdir outlives the pod.
  assert f"--workdir={STORE}/scratch/sst2" in pod["containers"][0]["args"]


def test_gke_waits_for_the_jobs_condition_not_for_a_failed_pod(stubs):
  # Prepare: a pod failed and was replaced (no condition yet), then the Job completed.
  rules = stubs.rules({"match": ["get", "job"], "stdout": [",", ",", "True,"]})
  # Execute
  result = run_script(stubs, "gke_contributor.sh", *GKE, "--accelerator=gpu",
                      "--poll-interval=0.05", STUB_RULES=rules)
  # Assert
  assert result.returncode == 0, result.stderr
  gets = [c for c in stubs.calls() if "get" in c]
  assert len(gets) == 3
  assert gets[0][-1] == ('-o=jsonpath={.status.conditions[?(@.type=="Complete")].status},'
                         '{.status.conditions[?(@.type=="Failed")].status}')
  assert "job/cf-sst2 succeeded" in result.stderr


# ---------------------------------------------------------------------------------------------
# Zones.


@pytest.mark.parametrize("zone", ["us-central1-ai1a", "us-south1-ai1b", "us-central2-b",
                                  "europe-west4-a", "asia-northeast1-b"])
def test_documented_zone_names_are_accepted(stubs, zone):
  # Execute
  result = run_script(stubs, "tpu_contributor.sh", *TPU_ARGS[:1], f"--zone={zone}", *TPU_ARGS[2:],
                      "--accelerator-type=v5litepod-8", "--dataset=sst2", "--check-only")
  # Assert
  assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("zone", ["us central", "uscentral1a", "US-CENTRAL1-A", "us-central1"])
def test_malformed_zone_names_are_rejected(stubs, zone):
  # Execute
  result = run_script(stubs, "tpu_contributor.sh", *TPU_ARGS[:1], f"--zone={zone}", *TPU_ARGS[2:],
                      "--accelerator-type=v5litepod-8", "--dataset=sst2", "--check-only")
  # Assert
  assert result.returncode == 2
  assert f"--zone '{zone}' does not look like a zone" in result.stderr


# ---------------------------------------------------------------------------------------------
# Preemption: re-create, reconnect, bounded.


def test_preempted_slice_is_recreated_and_the_contributor_resumes(stubs):
  # Prepare: ACTIVE; the Spot slice is preempted during training (ssh fails, SUSPENDED); the
  # new one comes up and the training ends.
  rules = stubs.rules(
      {"match": ["queued-resources", "describe"], "stdout": ["ACTIVE", "SUSPENDED", "ACTIVE"]},
      {"match": ["ssh", "tpu_run.sh"], "stdout": ["training on sst2", "resumed at step 1200"],
       "rc": [255, 0]})
  # Execute
  result = run_script(stubs, "tpu_contributor.sh", *V5E, "--spot", "--poll-interval=0.05",
                      STUB_RULES=rules)
  # Assert
  assert result.returncode == 0, result.stderr
  assert verbs(stubs.calls()) == [
      "versions", "create", "describe", "scp", "ssh", "ssh", "describe", "delete",
      "create", "describe", "scp", "ssh", "ssh", "delete"]
  assert ("queued resource cf-sst2 is SUSPENDED (preempted?); re-creating it (1 of 2); the "
          f"contributor resumes from its checkpoint in {STORE}/scratch/sst2") in result.stderr
  trains = train_calls(stubs.calls())
  assert len(trains) == 2 and trains[0] == trains[1]
  assert "resumed at step 1200" in result.stdout


def test_a_slice_preempted_while_waiting_is_recreated(stubs):
  # Prepare
  rules = stubs.rules({"match": ["queued-resources", "describe"],
                       "stdout": ["PROVISIONING", "SUSPENDED", "SUSPENDED", "ACTIVE"]})
  # Execute
  result = run_script(stubs, "tpu_contributor.sh", *V5E, "--poll-interval=0.05", STUB_RULES=rules)
  # Assert
  assert result.returncode == 0, result.stderr
  assert verbs(stubs.calls())[:8] == ["versions", "create", "describe", "describe", "describe",
                                      "delete", "create", "describe"]
  assert len(train_calls(stubs.calls())) == 1


def test_a_dropped_connection_is_retried_without_recreating(stubs):
  # Prepare: ssh exits 255 (the connection), the slice is still ACTIVE.
  rules = stubs.rules({"match": ["ssh", "tpu_run.sh"], "rc": [255, 0]})
  # Execute
  result = run_script(stubs, "tpu_contributor.sh", *V5E, "--poll-interval=0.05", STUB_RULES=rules)
  # Assert
  assert result.returncode == 0, result.stderr
  assert verbs(stubs.calls()).count("create") == 1
  assert len(train_calls(stubs.calls())) == 2
  assert "training: the ssh connection dropped (status 255); trying again (1 of 2)" in result.stderr


def test_retries_are_bounded(stubs):
  # Prepare
  rules = stubs.rules({"match": ["ssh", "tpu_run.sh"], "rc": [255]})
  # Execute
  result = run_script(stubs, "tpu_contributor.sh", *V5E, "--retries=1", "--poll-interval=0.05",
                      STUB_RULES=rules)
  # Assert
  assert result.returncode == 255
  assert "all 1 retries are used" in result.stderr
  assert len(train_calls(stubs.calls())) == 2
  assert verbs(stubs.calls())[-1] == "delete"


def test_a_local_workdir_on_a_tpu_vm_is_warned_about(stubs):
  # Execute
  result = run_script(stubs, "tpu_contributor.sh", *V5E, "--workdir=workdir/sst2", "--dry-run")
  # Assert
  assert result.returncode == 0, result.stderr
  assert "dies with it: after a preemption the contributor starts over" in result.stderr
  install = [remote_words(c)[-1] for c in commands(result.stdout) if "install.sh" in " ".join(c)]
  assert not [w for w in install[0] if w.startswith("--check-workdir")]


# ---------------------------------------------------------------------------------------------
# Permissions and the project set-up.


def test_the_service_account_and_scopes_go_to_the_queued_resource(stubs):
  # Execute
  cmds = dry_run(stubs, "tpu_contributor.sh", *V5E, f"--service-account={SA}",
                 "--scopes=https://www.googleapis.com/auth/devstorage.read_write")
  bad = run_script(stubs, "tpu_contributor.sh", *V5E, "--service-account=cf-contributor",
                   "--dry-run")
  # Assert
  create, = [c for c in cmds if c[3:5] == ["queued-resources", "create"]]
  assert flag(create, "--service-account") == SA
  assert flag(create, "--scopes") == "https://www.googleapis.com/auth/devstorage.read_write"
  assert bad.returncode == 2 and "is not a service account email" in bad.stderr


def test_build_md_covers_the_first_time_set_up():
  # Prepare
  text = (ROOT / "BUILD.md").read_text()
  # Assert: APIs, the service identity, roles, quotas (Spot apart), SSH/IAP, zones, grants.
  for needle in [
      "gcloud services enable tpu.googleapis.com compute.googleapis.com",
      "container.googleapis.com",
      "gcloud compute tpus tpu-vm\n  service-identity create",
      "roles/tpu.admin", "roles/iam.serviceAccountUser", "roles/iap.tunnelResourceAccessor",
      "TPUV5sLitepodPerProjectPerZoneForTPUAPI", "Spot (preemptible) quota separate",
      "--source-ranges=35.235.240.0/20", "--tunnel-through-iap",
      "v4 `us-central2-b`", "v5e `us-central1-a`",
      "roles/iam.workloadIdentityUser", "iam.gke.io/gcp-service-account",
      "objects/$RUN/scratch/", "--role=roles/storage.objectUser",
      "v6e | `v6e-1`", "unverified", "Keras 3 body",
  ]:
    assert needle in text, needle


def test_launchers_warn_about_generations_they_do_not_target(stubs):
  # Execute
  v6e = run_script(stubs, "tpu_contributor.sh", *TPU_ARGS, "--accelerator-type=v6e-8",
                   "--dataset=sst2", "--check-only")
  v7 = run_script(stubs, "tpu_contributor.sh", *TPU_ARGS, "--accelerator-type=v7x-8",
                  "--dataset=sst2", "--check-only")
  # Assert
  assert v6e.returncode == 0 and "TensorFlow on v6e (Trillium) is not verified" in v6e.stderr
  assert v7.returncode == 2 and "the TensorFlow path supports v4, v5litepod" in v7.stderr


# ---------------------------------------------------------------------------------------------
# Preflight.


def bucket_policy(*grants: tuple[str, str, str]) -> str:
  """Rows as `gcloud ... get-iam-policy --flatten=bindings[].members --format=csv[no-heading]`
  prints them (a condition with quotes is CSV-quoted)."""
  rows = []
  for role, member, condition in grants:
    if '"' in condition:
      condition = '"' + condition.replace('"', '""') + '"'
    rows.append(f"{role},{member},{condition}")
  return "\n".join(rows)


CONTRIBUTIONS = 'resource.name.startsWith("projects/_/buckets/cf-bucket/objects/run1/contributions/")'
SCRATCH = 'resource.name.startsWith("projects/_/buckets/cf-bucket/objects/run1/scratch/")'
QUOTAS = "\n".join([
    "TPUV5sLitepodPerProjectPerZoneForTPUAPI,,0",
    "TPUV5sLitepodPerProjectPerZoneForTPUAPI,us-west4-a,64",
    "TPUV5sPreemptibleLitepodPerProjectPerZoneForTPUAPI,,0",
    "TPUV4PodPerProjectPerZoneForTPUAPI,us-central2-b,32",
])
READY = [
    {"match": ["projects", "describe"], "stdout": ["ACTIVE"]},
    {"match": ["services", "list"],
     "stdout": ["compute.googleapis.com\nstorage.googleapis.com\ntpu.googleapis.com"]},
    {"match": ["locations", "list"], "stdout": ["us-central2-b\nus-west4-a\neurope-west4-a"]},
    {"match": ["accelerator-types", "list"], "stdout": ["v5litepod-1\nv5litepod-4\nv5litepod-8"]},
    {"match": ["quotas", "info", "list"], "stdout": [QUOTAS]},
    {"match": ["service-accounts", "describe"], "stdout": [""]},
    {"match": ["buckets", "get-iam-policy"], "stdout": [bucket_policy(
        ("roles/storage.objectViewer", f"serviceAccount:{SA}", ""),
        ("roles/storage.objectCreator", f"serviceAccount:{SA}", CONTRIBUTIONS),
        ("roles/storage.objectUser", f"serviceAccount:{SA}", SCRATCH),
        ("roles/storage.objectViewer", "group:cf-readers@example.com", ""))]},
    {"match": ["projects", "get-iam-policy"],
     "stdout": ["roles/owner,user:you@example.com,\nroles/tpu.admin,user:you@example.com,"]},
]
PREFLIGHT = ["--project=my-proj", "--zone=us-west4-a", "--accelerator-type=v5litepod-8",
             f"--store={STORE}", f"--service-account={SA}"]


def test_preflight_passes_on_a_ready_project(stubs):
  # Execute
  result = run_script(stubs, "preflight.sh", *PREFLIGHT, STUB_RULES=stubs.rules(*READY))
  # Assert
  assert result.returncode == 0, result.stderr
  for line in ["ok: project my-proj is ACTIVE", "ok: Cloud TPU zone us-west4-a",
               "ok: v5litepod-8 is offered in us-west4-a",
               "ok: runtime version v2-alpha-tpuv5-lite",
               "ok: on-demand quota TPUV5sLitepodPerProjectPerZoneForTPUAPI in us-west4-a: 64 (needs 8)",
               f"ok: {SA} can write, overwrite and delete under {STORE}/scratch/",
               "preflight.sh: no problems found"]:
    assert line in result.stderr
  assert "PROBLEM" not in result.stderr
  # It only asks.
  assert not [c for c in stubs.calls() if {"create", "delete", "add-iam-policy-binding"} & set(c)]


def test_preflight_prints_what_to_fix(stubs):
  # Prepare: the TPU API is off, the zone has no TPUs, no Spot quota, no scratch grant.
  rules = [dict(r) for r in READY]
  rules[1] = {"match": ["services", "list"], "stdout": ["compute.googleapis.com"]}
  rules[2] = {"match": ["locations", "list"], "stdout": ["us-central2-b\nus-west4-a"]}
  rules[6] = {"match": ["buckets", "get-iam-policy"], "stdout": [bucket_policy(
      ("roles/storage.objectViewer", f"serviceAccount:{SA}", ""),
      ("roles/storage.objectCreator", f"serviceAccount:{SA}", CONTRIBUTIONS))]}
  # Execute
  result = run_script(stubs, "preflight.sh", *PREFLIGHT[:1], "--zone=us-east1-c", *PREFLIGHT[2:],
                      "--spot", STUB_RULES=stubs.rules(*rules))
  # Assert
  assert result.returncode == 1
  err = result.stderr
  assert "PROBLEM: APIs not enabled in my-proj: tpu.googleapis.com" in err
  assert "fix: gcloud services enable tpu.googleapis.com --project=my-proj" in err
  assert "PROBLEM: us-east1-c is not a Cloud TPU zone of my-proj" in err
  assert ("PROBLEM: spot quota TPUV5sPreemptibleLitepodPerProjectPerZoneForTPUAPI in us-east1-c "
          "is 0; v5litepod-8 needs 8") in err
  assert f"cannot write, overwrite and delete under {STORE}/scratch/" in err
  assert (f"fix: gcloud storage buckets add-iam-policy-binding gs://cf-bucket "
          f"--member=serviceAccount:{SA} --role=roles/storage.objectUser "
          "'--condition=expression=resource.name.startsWith(\"projects/_/buckets/cf-bucket/"
          "objects/run1/scratch/\"),title=cf-scratch'") in err
  assert "preflight.sh: 4 problem(s)" in err


def test_preflight_without_a_service_account_warns_and_a_bad_runtime_version_fails(stubs):
  # Execute
  result = run_script(stubs, "preflight.sh", *PREFLIGHT[:-1], "--runtime-version=tpu-vm-tf-2.20.0-pjrt",
                      STUB_RULES=stubs.rules(*READY))
  # Assert
  assert result.returncode == 1
  assert "warning: no --service-account: the TPU VMs would run as the Compute Engine default" \
         in result.stderr
  assert "PROBLEM: runtime version tpu-vm-tf-2.20.0-pjrt is not offered in us-west4-a" in result.stderr


def test_iteration_runs_preflight_once_before_any_contributor(stubs):
  # Execute
  cmds = dry_run(stubs, "iteration.sh", f"--store={STORE}", "--iteration=0", "--datasets=sst2,rte",
                 "--backend=tpu", "--project=my-proj", "--zone=us-west4-a",
                 "--accelerator-type=v5litepod-8", f"--service-account={SA}", "--preflight")
  # Assert
  quota = find(cmds, "gcloud", "beta", "quotas", "info", "list")
  policy = find(cmds, "gcloud", "storage", "buckets", "get-iam-policy")
  creates = find(cmds, *QR, "create")
  assert len(quota) == 1 and len(policy) == 1 and len(creates) == 2
  assert max(quota + policy) < min(creates)


def test_tpu_contributor_preflight_stops_before_creating(stubs):
  # Prepare
  rules = [dict(r) for r in READY]
  rules[0] = {"match": ["projects", "describe"], "stdout": ["DELETE_REQUESTED"]}
  # Execute
  result = run_script(stubs, "tpu_contributor.sh", *V5E, f"--service-account={SA}", "--preflight",
                      STUB_RULES=stubs.rules(*rules))
  # Assert
  assert result.returncode == 1
  assert "PROBLEM: project my-proj is 'DELETE_REQUESTED', not ACTIVE" in result.stderr
  assert "preflight found problems (above); nothing was created" in result.stderr
  assert not [c for c in stubs.calls() if c[3:5] == ["queued-resources", "create"]]


# ---------------------------------------------------------------------------------------------
# The gs:// workdir check (launch/gcs_check.py), against a stand-in for tf.io.gfile.

FAKE_TF = '''
import os, types
__version__ = "2.20.0"

class OpError(Exception):
  pass

class UnimplementedError(OpError):
  pass

class PermissionDeniedError(OpError):
  pass

errors = types.SimpleNamespace(OpError=OpError, UnimplementedError=UnimplementedError,
                               PermissionDeniedError=PermissionDeniedError)

def _path(uri):
  mode = os.environ.get("FAKE_GFILE", "ok")
  if mode == "unimplemented":
    raise UnimplementedError(f"File system scheme 'gs' not implemented (file: '{uri}')")
  if mode == "denied":
    raise PermissionDeniedError("Error executing an HTTP request: HTTP response code 403")
  return os.path.join(os.environ["FAKE_GCS_ROOT"], uri.split("://", 1)[-1])

def _makedirs(uri):
  os.makedirs(_path(uri), exist_ok=True)

def _gfile(uri, mode="r"):
  return open(_path(uri), mode)

def _remove(uri):
  os.remove(_path(uri))

io = types.SimpleNamespace(gfile=types.SimpleNamespace(makedirs=_makedirs, GFile=_gfile,
                                                       remove=_remove))
'''


@pytest.mark.parametrize("mode,code,message", [
    ("ok", 0, "tf.io.gfile can write, read and delete under gs://cf-bucket/run1/scratch/sst2"),
    ("unimplemented", 3, "pip install 'tensorflow[gcs-filesystem]==2.20.0' (the package "
                         "tensorflow-io-gcs-filesystem)"),
    ("denied", 4, "needs roles/storage.objectUser on this prefix"),
])
def test_gcs_check_names_the_fix(tmp_path, mode, code, message):
  # Prepare
  (tmp_path / "fake" / "tensorflow").mkdir(parents=True)
  (tmp_path / "fake" / "tensorflow" / "__init__.py").write_text(FAKE_TF)
  env = dict(os.environ, PYTHONPATH=str(tmp_path / "fake"), FAKE_GFILE=mode,
             FAKE_GCS_ROOT=str(tmp_path / "gcs"))
  # Execute
  result = subprocess.run([sys.executable, str(LAUNCH / "gcs_check.py"), f"{STORE}/scratch/sst2"],
                          env=env, capture_output=True, text=True, check=False, timeout=60)
  # Assert
  assert result.returncode == code, result.stderr
  assert message in result.stdout + result.stderr
  if mode == "ok":
    # The probe object is gone again.
    assert list((tmp_path / "gcs" / "cf-bucket" / "run1" / "scratch" / "sst2").iterdir()) == []


# ---------------------------------------------------------------------------------------------
# launch/README.md: every command runs as written, and prints what the README shows.


def readme_blocks() -> list[tuple[str, str]]:
  text = (LAUNCH / "README.md").read_text()
  return re.findall(r"```(\w+)\n(.*?)```", text, re.S)


def launch_commands(block: str) -> list[list[str]]:
  """The launch/ commands of a bash block, continuation lines joined."""
  joined = block.replace("\\\n", " ")
  return [shlex.split(line, comments=True) for line in joined.splitlines()
          if line.strip().startswith("launch/")]


def with_dry_run(words: list[str]) -> list[str]:
  if "--dry-run" in words:
    return words
  if "--" in words:
    i = words.index("--")
    return words[:i] + ["--dry-run"] + words[i:]
  return words + ["--dry-run"]


def test_readme_commands_run_and_print_what_the_readme_shows(stubs):
  # Prepare
  blocks = readme_blocks()
  checked = 0
  # Execute / Assert: every launch/ command is accepted (dry run); the "+ gcloud" lines of a
  # text block right after it are what the command prints.
  for index, (lang, block) in enumerate(blocks):
    if lang != "bash":
      continue
    for words in launch_commands(block):
      result = subprocess.run(["bash", *with_dry_run(words)], cwd=ROOT,
                              env=stubs.env(TMPDIR="/tmp"), capture_output=True, text=True,
                              check=False, timeout=60)
      assert result.returncode == 0, (words, result.stderr)
      checked += 1
      following = blocks[index + 1] if index + 1 < len(blocks) else ("", "")
      if following[0] == "text" and len(launch_commands(block)) == 1:
        shown = [line for line in following[1].splitlines() if line.startswith("+ gcloud")]
        printed = result.stdout.splitlines()
        assert shown, following[1]
        for line in shown:
          assert line in printed, line
  assert stubs.calls() == []
  assert checked >= 7
