#!/usr/bin/env bash
# One ColD Fusion contributor as a Kubernetes Job on GKE, on NVIDIA GPUs or a single-host TPU slice.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $PROG --image=IMAGE --store=gs://BUCKET/RUN --dataset=NAME --accelerator=gpu|tpu
          [settings] [--print-manifest | --dry-run] [-- EXTRA_TRAIN_FLAGS...]

Runs one contributor as a Kubernetes Job (one pod) on the current kubectl cluster:
  1. kubectl apply -f -   with a batch/v1 Job whose container runs
     python -m cold_fusion_tf.train --config=... --store=... --config.task=DATASET ...
     gpu: requests nvidia.com/gpu (strategy mirrored);
     tpu: requests google.com/tpu on nodes selected by cloud.google.com/gke-tpu-accelerator and
          cloud.google.com/gke-tpu-topology (strategy tpu, --config.tpu=local)
  2. streams the pod's log (kubectl logs -f job/NAME) and polls the Job until it succeeds or fails
  3. on exit - success, failure or Ctrl-C - deletes the Job (and its pod) unless --keep
A multi-host TPU slice needs one pod per host (a JobSet); this script covers single-host slices.

The image must hold this repository with its requirements installed (launch/install.sh;
--accelerator=tpu for TPU nodes) and have python on its PATH; the pod must be able to write to
the store (Workload Identity: --service-account names the Kubernetes service account).

Required:
  --image=IMAGE             container image, e.g. us-docker.pkg.dev/PROJECT/REPO/cold-fusion:TAG
  --store=gs://BUCKET/RUN   the ColD Fusion store
  --dataset=NAME            dataset to fine-tune on (--config.task); letters, digits, . _ -
  --accelerator=gpu|tpu     what the pod runs on
  with gpu:  --gpus=N            GPUs for the pod (default: 1)
             --gpu-type=TYPE     optional node selector cloud.google.com/gke-accelerator, e.g. nvidia-l4
  with tpu:  --tpu-type=TYPE     cloud.google.com/gke-tpu-accelerator, e.g. tpu-v5-lite-podslice
             --tpu-topology=T    cloud.google.com/gke-tpu-topology, e.g. 2x4
             --tpu-chips=N       google.com/tpu chips for the pod (default: 8)

Optional:
  --contributor-id=ID       contributor id in the store (default: the dataset name)
  --config=configs/X.py     config file inside the image's checkout (default: configs/roberta_base.py)
  --name=NAME               Job name (default: cf-<contributor id>)
  --namespace=NS            Kubernetes namespace (default: default)
  --context=CTX             kubectl context (default: the current one)
  --service-account=KSA     Kubernetes service account of the pod
  --workdir=DIR             train --workdir in the pod, or gs://... (default: /tmp/cold_fusion/<id>)
  --strategy=S              --config.strategy (default: mirrored for gpu, tpu for tpu)
  --start-timeout=DURATION  how long kubectl logs waits for the pod to run (default: 2h)
  --timeout=SECONDS         give up on the Job after this long (default: 172800)
  --poll-interval=SECONDS   seconds between status polls (default: 30)
  --keep                    keep the Job after it ends
  --print-manifest          print the Job manifest (YAML) and exit; nothing is applied
  --check-only              check the settings and exit (0 if they are all right)
  --dry-run                 print every command ("+ ..." lines, the manifest after "| ") and run none
  --help                    this text
Anything after a lone -- is appended to the train command.

Example:
  $PROG --image=us-docker.pkg.dev/my-proj/cf/cold-fusion:v1 --store=gs://my-bucket/cf-run \\
      --dataset=sst2 --accelerator=gpu --gpus=2 --gpu-type=nvidia-l4 --dry-run
EOF
}

IMAGE=
STORE=
DATASET=
ACCELERATOR=
GPUS=1
GPU_TYPE=
TPU_TYPE=
TPU_TOPOLOGY=
TPU_CHIPS=8
CONTRIBUTOR_ID=
CONFIG=configs/roberta_base.py
NAME=
NAMESPACE=default
CONTEXT=
SERVICE_ACCOUNT=
WORKDIR=
STRATEGY=
START_TIMEOUT=2h
TIMEOUT=172800
POLL_INTERVAL=30
KEEP=0
PRINT_MANIFEST=0
CHECK_ONLY=0
VALUE_FLAGS=(image store dataset accelerator gpus gpu-type tpu-type tpu-topology tpu-chips contributor-id
  config name namespace context service-account workdir strategy start-timeout timeout poll-interval)
BOOL_FLAGS=(keep print-manifest check-only dry-run)
parse_flags "$@"

# ---------------------------------------------------------------------------------------------
# Settings, all checked before anything runs.

require image "$IMAGE" "container image with this project installed"
require store "$STORE" "gs://bucket/prefix of the ColD Fusion store"
require dataset "$DATASET" "dataset to fine-tune on"
require accelerator "$ACCELERATOR" "gpu or tpu"
check_word image "$IMAGE"
check_gcs_store "$STORE"
check_safe_name dataset "$DATASET"
CONTRIBUTOR_ID=${CONTRIBUTOR_ID:-$DATASET}
check_safe_name contributor-id "$CONTRIBUTOR_ID"
check_config "$CONFIG"
case $ACCELERATOR in
  gpu)
    check_positive gpus "$GPUS"
    [[ -z $GPU_TYPE ]] || check_word gpu-type "$GPU_TYPE"
    STRATEGY=${STRATEGY:-mirrored}
    ;;
  tpu)
    require tpu-type "$TPU_TYPE" "GKE TPU accelerator, e.g. tpu-v5-lite-podslice"
    require tpu-topology "$TPU_TOPOLOGY" "TPU topology, e.g. 2x4"
    check_word tpu-type "$TPU_TYPE"
    [[ $TPU_TOPOLOGY =~ ^[0-9]+(x[0-9]+){1,2}$ ]] || usage_error "--tpu-topology '$TPU_TOPOLOGY' must look like 2x4 or 2x2x1"
    check_positive tpu-chips "$TPU_CHIPS"
    STRATEGY=${STRATEGY:-tpu}
    ;;
  *) usage_error "--accelerator '$ACCELERATOR' must be gpu or tpu" ;;
esac
case $STRATEGY in
  auto | tpu | mirrored | multi_worker | one_device | default) ;;
  *) usage_error "--strategy '$STRATEGY' must be one of auto, tpu, mirrored, multi_worker, one_device, default" ;;
esac
NAME=${NAME:-$(slug "cf-$CONTRIBUTOR_ID")}
check_resource_name name "$NAME"
check_resource_name namespace "$NAMESPACE"
[[ -z $CONTEXT ]] || check_word context "$CONTEXT"
[[ -z $SERVICE_ACCOUNT ]] || check_resource_name service-account "$SERVICE_ACCOUNT"
WORKDIR=${WORKDIR:-/tmp/cold_fusion/$CONTRIBUTOR_ID}
check_path workdir "$WORKDIR"
[[ $START_TIMEOUT =~ ^[0-9]+[smh]$ ]] || usage_error "--start-timeout '$START_TIMEOUT' must look like 90s, 30m or 2h"
check_positive timeout "$TIMEOUT"
check_seconds poll-interval "$POLL_INTERVAL"
for arg in "${EXTRA_ARGS[@]}"; do
  [[ $arg != *[[:cntrl:]]* ]] || usage_error "extra train flags must not hold control characters"
done
((CHECK_ONLY)) && exit 0

TRAIN_ARGS=("--config=$CONFIG" "--store=$STORE" "--workdir=$WORKDIR" "--config.task=$DATASET"
  "--config.contributor_id=$CONTRIBUTOR_ID" "--config.strategy=$STRATEGY")
[[ $ACCELERATOR == tpu ]] && TRAIN_ARGS+=(--config.tpu=local)
TRAIN_ARGS+=("${EXTRA_ARGS[@]}")

# ---------------------------------------------------------------------------------------------
# The manifest. Strings are written as JSON strings, which YAML reads as they are.

json_str() {
  local s=$1
  s=${s//\\/\\\\}
  s=${s//\"/\\\"}
  printf '"%s"' "$s"
}

# print_labels INDENT: the labels of the Job and of its pod.
print_labels() {
  local indent=$1
  echo "${indent}app.kubernetes.io/name: cold-fusion-contributor"
  echo "${indent}cold-fusion/dataset: $(json_str "$(slug "$DATASET")")"
  echo "${indent}cold-fusion/contributor: $(json_str "$(slug "$CONTRIBUTOR_ID")")"
}

render_manifest() {
  local arg
  cat <<EOF
apiVersion: batch/v1
kind: Job
metadata:
  name: $NAME
  namespace: $NAMESPACE
  labels:
$(print_labels "    ")
spec:
  backoffLimit: 0
  template:
    metadata:
      labels:
$(print_labels "        ")
    spec:
      restartPolicy: Never
EOF
  [[ -z $SERVICE_ACCOUNT ]] || echo "      serviceAccountName: $SERVICE_ACCOUNT"
  if [[ $ACCELERATOR == tpu ]]; then
    cat <<EOF
      nodeSelector:
        cloud.google.com/gke-tpu-accelerator: $(json_str "$TPU_TYPE")
        cloud.google.com/gke-tpu-topology: $(json_str "$TPU_TOPOLOGY")
EOF
  elif [[ -n $GPU_TYPE ]]; then
    cat <<EOF
      nodeSelector:
        cloud.google.com/gke-accelerator: $(json_str "$GPU_TYPE")
EOF
  fi
  cat <<EOF
      containers:
      - name: contributor
        image: $(json_str "$IMAGE")
        command: ["python", "-m", "cold_fusion_tf.train"]
        args:
EOF
  for arg in "${TRAIN_ARGS[@]}"; do
    echo "        - $(json_str "$arg")"
  done
  echo "        resources:"
  echo "          limits:"
  if [[ $ACCELERATOR == tpu ]]; then
    echo "            google.com/tpu: $TPU_CHIPS"
  else
    echo "            nvidia.com/gpu: $GPUS"
  fi
}

if ((PRINT_MANIFEST)); then
  render_manifest
  exit 0
fi

# ---------------------------------------------------------------------------------------------
# Delete the Job whenever the script ends from here on.

KUBECTL=(kubectl "--namespace=$NAMESPACE")
[[ -z $CONTEXT ]] || KUBECTL+=("--context=$CONTEXT")
DELETE=("${KUBECTL[@]}" delete job "$NAME" --ignore-not-found --wait=false)
APPLIED=0
LOG_PID=
cleanup() {
  local rc=$?
  trap '' INT TERM
  trap - EXIT
  if [[ -n $LOG_PID ]]; then
    kill -TERM "$LOG_PID" 2>/dev/null || true
    wait "$LOG_PID" 2>/dev/null || true
  fi
  if ((APPLIED)); then
    if ((KEEP)); then
      log "--keep: leaving job/$NAME. Delete it with: $(quote_cmd "${DELETE[@]}")"
    else
      run "${DELETE[@]}" || log "delete failed; run it by hand: $(quote_cmd "${DELETE[@]}")"
    fi
  fi
  exit "$rc"
}
trap cleanup EXIT
on_signal_stop_child

# ---------------------------------------------------------------------------------------------
# 1. Submit the Job.

APPLY=("${KUBECTL[@]}" apply -f -)
log "submitting job/$NAME: contributor $CONTRIBUTOR_ID on dataset $DATASET ($ACCELERATOR)"
APPLIED=1
print_cmd "${APPLY[@]}"
if ((DRY_RUN)); then
  render_manifest | sed 's/^/| /'
else
  render_manifest | "${APPLY[@]}"
fi

# ---------------------------------------------------------------------------------------------
# 2. Stream the log and wait for the Job to end.

LOGS=("${KUBECTL[@]}" logs -f "job/$NAME" "--pod-running-timeout=$START_TIMEOUT")
STATUS=("${KUBECTL[@]}" get job "$NAME" "-o=jsonpath={.status.succeeded},{.status.failed}")
print_cmd "${LOGS[@]}"
print_cmd "${STATUS[@]}"
if ((!DRY_RUN)); then
  "${LOGS[@]}" &
  LOG_PID=$!
  deadline=$((SECONDS + TIMEOUT))
  while true; do
    status=$("${STATUS[@]}") || {
      log "could not read the status of job/$NAME; trying again"
      status=,
    }
    succeeded=${status%%,*}
    failed=${status#*,}
    if ((${succeeded:-0} > 0)); then
      log "job/$NAME succeeded"
      break
    fi
    ((${failed:-0} == 0)) || die "job/$NAME failed (kubectl describe job/$NAME -n $NAMESPACE tells why)"
    ((SECONDS < deadline)) || die "job/$NAME has not finished after $TIMEOUT s"
    sleep "$POLL_INTERVAL" &
    CHILD_PID=$!
    wait "$CHILD_PID"
    CHILD_PID=
  done
  wait "$LOG_PID" 2>/dev/null || true
  LOG_PID=
fi
# 3. The EXIT trap deletes the Job.
