"""The package as a user installs it: `pip install .` into a fresh virtual environment outside
the repository, then the `cold-fusion` command by config name from another folder; the
declared dependency ranges hold the pinned set."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib

import pytest
from packaging.requirements import Requirement

import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pins(path: str) -> dict[str, str]:
  pins = {}
  with open(path, encoding="utf-8") as f:
    for line in f:
      line = line.split("#")[0].strip()
      if "==" in line:
        name, version = line.split("==")
        pins[name.strip().lower().replace("_", "-")] = version.strip()
  return pins


def test_declared_ranges_hold_the_pinned_versions():
  # Prepare
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  pins = _pins(os.path.join(REPO, "requirements.txt"))
  # Assert: every dependency is pinned in requirements.txt, at a version its range allows.
  for line in project["dependencies"]:
    requirement = Requirement(line)
    name = requirement.name.lower().replace("_", "-")
    if name in pins:
      assert requirement.specifier.contains(pins[name]), (line, pins[name])
    else:  # installed with the pinned set (a dependency of a pinned package)
      from importlib import metadata  # pylint: disable=g-import-not-at-top
      assert requirement.specifier.contains(metadata.version(name)), line
  assert project["requires-python"] == ">=3.11,<3.14"
  assert project["scripts"] == {"cold-fusion": "cold_fusion_tf.console:main"}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """A fresh venv with `pip install .` of a copy of the project (no downloads: it sees this
  environment's packages through a .pth line, and builds with its setuptools)."""
  root = tmp_path_factory.mktemp("packaging")
  project = root / "project"
  os.makedirs(project)
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(os.path.join(REPO, name), project / name)
  shutil.copytree(os.path.join(REPO, "cold_fusion_tf"), project / "cold_fusion_tf",
                  ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
  venv = root / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
  python = str(venv / "bin" / "python")
  site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        check=True, capture_output=True, text=True).stdout.strip()
  with open(os.path.join(site, "_cold_fusion_test_packages.pth"), "w", encoding="utf-8") as f:
    f.write(sysconfig.get_paths()["purelib"] + "\n")
  env = dict(tiny.env(), PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INDEX="1")
  env.pop("PYTHONPATH")
  result = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps",
                           "--no-build-isolation", str(project)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return root, venv, site, env


def test_pip_install_then_the_command_by_config_name(installed):
  root, venv, site, env = installed
  elsewhere = root / "elsewhere"
  elsewhere.mkdir()
  # Assert: a real install, not the repository: the package, its configs and data, py.typed.
  located = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import cold_fusion_tf, os; print(os.path.dirname(cold_fusion_tf.__file__))"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True)
  package = located.stdout.strip()
  assert package == os.path.join(site, "cold_fusion_tf")
  for part in ("py.typed", "configs/demo.py", "data/demo/README.md", "data/demo/sst2/train.jsonl",
               "data/demo/rte/info.json"):
    assert os.path.isfile(os.path.join(package, part)), part
  command = str(venv / "bin" / "cold-fusion")
  # Execute: a store from the demo config (MiniLM from its package), then its lineage.
  made = subprocess.run([command, "init", "--config=demo", "--store=store"], cwd=elsewhere,
                        env=env, capture_output=True, text=True, timeout=600)
  shown = subprocess.run([command, "inspect", "--store=store"], cwd=elsewhere, env=env,
                         capture_output=True, text=True, timeout=300)
  # Assert
  assert made.returncode == 0, made.stderr[-3000:]
  assert made.stdout.splitlines()[-1] == "store store: LATEST = 0"
  assert shown.returncode == 0 and "base 0" in shown.stdout, shown.stderr[-3000:]
