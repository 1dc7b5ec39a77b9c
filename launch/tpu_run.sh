#!/usr/bin/env bash
# Runs the train program on a Cloud TPU host (a TPU VM worker or a GKE TPU pod) with the
# environment TensorFlow needs, set before TensorFlow is imported.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $PROG [--mode=pjrt|pod-client|jax] [--endpoints=grpc://IP:PORT,...] [--pid-file=FILE]
          [--python=PYTHON] [--dry-run] -- TRAIN_FLAGS...

Runs PYTHON -m cold_fusion_tf.train TRAIN_FLAGS with the environment TensorFlow needs on a TPU,
set before TensorFlow is imported (the last step replaces this script, so signals reach the
program directly):

  --mode=pjrt (default): a single-host TPU VM or a GKE TPU pod, which opens its TPU chips through
      libtpu's PJRT plugin (what Google's TensorFlow-on-TPU CI sets for single-host PJRT runs):
        NEXT_PLUGGABLE_DEVICE_USE_C_API=true
        TF_PLUGGABLE_DEVICE_LIBRARY_PATH=<libtpu.get_library_path() of PYTHON> (kept if set)
        PJRT_DEVICE=TPU
      Pass --config.tpu=local in TRAIN_FLAGS.
  --mode=pod-client: worker 0 of a multi-host TPU VM slice. TensorFlow drives the TPU servers
      of all workers from this one client over gRPC and must not open the local chips:
        TPU_NAME=<--endpoints>   TPU_LOAD_LIBRARY=0
      Pass the same endpoints as --config.tpu=grpc://IP:8470,... in TRAIN_FLAGS: a list of
      grpc:// endpoints needs no Cloud TPU API lookup (and so no cloud-tpu-client).
  --mode=jax: the keras-hub body on Keras 3's JAX backend (a single-host TPU VM installed with
      install.sh --backend=jax); JAX opens the TPU through the libtpu of jax[tpu] itself:
        KERAS_BACKEND=jax
      Pass --config.model.body=keras_hub --config.model.backend=jax in TRAIN_FLAGS.

Settings:
  --endpoints=LIST   with pod-client: grpc://IP:PORT of every worker, comma-separated, worker 0 first
  --pid-file=FILE    write the training's pid here. A training still running from an earlier
                     attempt (its pid in FILE, say after the ssh connection dropped) is stopped
                     first (TERM, then KILL after 60 s), so two never hold the TPU at once.
  --python=PYTHON    interpreter (default: python, i.e. the active virtualenv's)
  --dry-run          print the command ("+ ..." lines) and run nothing
  --help             this text

Example (on a TPU VM, in the copied checkout, with its virtualenv active):
  bash launch/tpu_run.sh --pid-file=../cf-train.pid -- --config=configs/roberta_base.py \\
      --store=gs://my-bucket/cf-run --workdir=gs://my-bucket/cf-run/scratch/sst2 \\
      --config.task=sst2 --config.strategy=tpu --config.tpu=local
EOF
}

MODE=pjrt
ENDPOINTS=
PID_FILE=
PYTHON=python
VALUE_FLAGS=(mode endpoints pid-file python)
BOOL_FLAGS=(dry-run)
# Everything after -- is the train program's command line.
ANY_ARGS_AFTER_DASHDASH=1
parse_flags "$@"

case $MODE in
  pjrt | jax) [[ -z $ENDPOINTS ]] || usage_error "--endpoints goes with --mode=pod-client" ;;
  pod-client)
    require endpoints "$ENDPOINTS" "grpc://IP:PORT of every worker"
    [[ $ENDPOINTS =~ ^grpc://[0-9A-Za-z.:-]+(,grpc://[0-9A-Za-z.:-]+)*$ ]] ||
      usage_error "--endpoints '$ENDPOINTS' must be grpc://IP:PORT items, comma-separated"
    ;;
  *) usage_error "--mode '$MODE' must be pjrt, pod-client or jax" ;;
esac
[[ -z $PID_FILE ]] || check_path pid-file "$PID_FILE"
check_path python "$PYTHON"
((${#EXTRA_ARGS[@]})) || usage_error "give the train flags after -- (e.g. -- --config=configs/roberta_base.py ...)"

# ---------------------------------------------------------------------------------------------
# A training left over from an earlier attempt on this host holds the TPU: stop it first.

# running PID: whether PID is a live process (an exited one that nobody has reaped yet, a
# zombie, holds no TPU any more).
running() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [[ ${stat:0:1} != Z ]]
}

if [[ -n $PID_FILE && -f $PID_FILE ]] && ((!DRY_RUN)); then
  old=$(<"$PID_FILE")
  cmdline=
  if [[ $old =~ ^[0-9]+$ ]] && [[ -r /proc/$old/cmdline ]]; then
    cmdline=$(tr '\0' ' ' <"/proc/$old/cmdline")
  fi
  if [[ $cmdline == *cold_fusion_tf.train* ]]; then
    log "stopping the training left from an earlier attempt (pid $old)"
    run kill -TERM "$old" || true
    for ((i = 0; i < 600; i++)); do
      running "$old" || break
      sleep 0.1
    done
    if running "$old"; then
      run kill -KILL "$old" || true
    fi
  fi
fi

# ---------------------------------------------------------------------------------------------
# The environment, then the program in place of this script.

TPU_ENV=()
if [[ $MODE == pjrt ]]; then
  LIBTPU_PATH=${TF_PLUGGABLE_DEVICE_LIBRARY_PATH:-}
  if [[ -z $LIBTPU_PATH ]]; then
    run_capture LIBTPU_PATH "$PYTHON" -c 'import libtpu; print(libtpu.get_library_path())' ||
      die "libtpu is not installed for $PYTHON: install the TPU build with launch/install.sh --accelerator=tpu"
    ((DRY_RUN)) && LIBTPU_PATH='<libtpu.get_library_path()>'
  fi
  [[ -f $LIBTPU_PATH ]] || ((DRY_RUN)) || die "libtpu library '$LIBTPU_PATH' does not exist"
  TPU_ENV+=(NEXT_PLUGGABLE_DEVICE_USE_C_API=true "TF_PLUGGABLE_DEVICE_LIBRARY_PATH=$LIBTPU_PATH" PJRT_DEVICE=TPU)
elif [[ $MODE == jax ]]; then
  TPU_ENV+=(KERAS_BACKEND=jax)
else
  TPU_ENV+=("TPU_NAME=$ENDPOINTS" TPU_LOAD_LIBRARY=0)
fi
TRAIN=(env "${TPU_ENV[@]}" "$PYTHON" -m cold_fusion_tf.train "${EXTRA_ARGS[@]}")
print_cmd "${TRAIN[@]}"
((DRY_RUN)) && exit 0
if [[ -n $PID_FILE ]]; then
  echo "$$" >"$PID_FILE"
fi
exec "${TRAIN[@]}"
