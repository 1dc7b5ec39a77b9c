"""The launchers and scripts/ on bad or contradictory settings: exit status 2 and a message
naming the setting, before any command is printed or run; and scripts/demo.sh run from
another directory takes the paths it is given from there."""

from __future__ import annotations

import subprocess

import pytest

from test_launch import ROOT, Stubs, run_script

LOCAL = ["--store=stores/demo", "--dataset=sst2", "--dry-run"]


@pytest.fixture
def stubs(tmp_path):
  return Stubs(tmp_path)


@pytest.mark.parametrize("script,args,message", [
    ("multi_worker.sh", ["--workers=abc", "--hosts=a,b"], "--workers 'abc' must be a positive"),
    ("multi_worker.sh", ["--workers=1x", "--hosts=a,b"], "--workers '1x' must be a positive"),
    ("multi_worker.sh", ["--workers=99999999999999999999999"], "--workers '9999999999999999999"
     "9999' is too large"),
    ("multi_worker.sh", ["--port=65535", "--workers=3"], "--port=65535 with --workers=3: the "
     "last worker would get port 65537, above 65535"),
    ("multi_worker.sh", ["--hosts=a,b", "--port=65535", "--index=0"], "worker 1 would get port "
     "65536"),
    ("multi_worker.sh", ["--hosts=a:99999,b", "--index=0"], "--hosts item 'a:99999': a port is "
     "1..65535"),
    ("multi_worker.sh", ["--store=gs:/bucket/run"], "--store 'gs:/bucket/run' is neither a local "
     "folder nor a gs://bucket/prefix URI"),
    ("multi_gpu.sh", ["--store=GS://bucket/run"], "--store 'GS://bucket/run' is neither"),
    ("multi_gpu.sh", ["--gpus=0,1,0"], "--gpus '0,1,0' names '0' twice"),
    ("multi_gpu.sh", ["--config=configs/nope.py"], "--config 'configs/nope.py' is not a file of "
     "this checkout"),
    ("tpu_contributor.sh", ["--project=my-proj", "--zone=us-central2-b",
                            "--store=gs://cf-bucket/run1", "--accelerator-type=v4-8",
                            "--config=configs/nope.py"], "configs/demo.py"),
])
def test_bad_settings_exit_2_before_any_command(stubs, script, args, message):
  # Prepare: the later of two equal flags wins, so the case's own settings come last
  # Execute
  result = run_script(stubs, script, *LOCAL, *args)
  # Assert
  assert result.returncode == 2, result.stdout + result.stderr
  assert message in result.stderr and "line " not in result.stderr, result.stderr
  assert result.stdout == "" and stubs.calls() == []


def _script(path: str, *args: str, cwd, **env: str) -> subprocess.CompletedProcess:
  return subprocess.run(["bash", str(ROOT / "scripts" / path), *args], cwd=cwd, env={
      "PATH": "/usr/bin:/bin", "HOME": str(cwd), **env}, capture_output=True, text=True,
                        timeout=60, check=False)


def test_demo_takes_the_callers_paths(tmp_path):
  # Prepare: a user in another directory, naming a store and a dataset folder relative to it
  # Execute
  result = _script("demo.sh", "--config.task=./my data", cwd=tmp_path, DRY_RUN="1",
                   STORE="stores/mine")
  # Assert: relative paths are left for the program, which runs in the caller's directory
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines() == [
      f"+ bash {ROOT}/scripts/setup.sh",
      f"+ python -m cold_fusion_tf.run --config={ROOT}/configs/demo.py --store=stores/mine "
      "--config.task=./my\\ data"]
  assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("script,args,env,message", [
    ("demo.sh", [], {"DRY_RUN": "yes"}, "demo.sh: DRY_RUN must be 0 or 1, not 'yes'"),
    ("setup.sh", ["--deb"], {}, "setup.sh: unexpected argument(s): --deb; usage: bash "
     "scripts/setup.sh [--dev]"),
    ("setup.sh", ["--dev", "extra"], {}, "unexpected argument(s): --dev extra"),
])
def test_scripts_refuse_what_they_do_not_know(script, args, env, message, tmp_path):
  # Execute
  result = _script(script, *args, cwd=tmp_path, **env)
  # Assert: nothing installed, nothing created
  assert result.returncode == 2 and message in result.stderr, result.stderr
  assert result.stdout == "" and list(tmp_path.iterdir()) == []
