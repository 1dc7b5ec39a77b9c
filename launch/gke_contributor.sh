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
     tpu: requests google.com/tpu (all the chips of the one node that the topology makes) on
          nodes selected by cloud.google.com/gke-tpu-accelerator and
          cloud.google.com/gke-tpu-topology (strategy tpu, --config.tpu=local), through
          launch/tpu_run.sh, which sets NEXT_PLUGGABLE_DEVICE_USE_C_API=true, PJRT_DEVICE=TPU
          and TF_PLUGGABLE_DEVICE_LIBRARY_PATH (libtpu) before TensorFlow is imported
     A preempted pod (Spot node, maintenance: the DisruptionTarget condition) is replaced
     without counting as a failure; a failing pod is retried --retries times, except for a
     usage error (exit status 2); the contributor resumes from its checkpoint in the gs:// workdir.
  2. streams the pod's log (kubectl logs -f job/NAME) and polls the Job until it completes or fails
  3. on exit - success, failure or Ctrl-C - deletes the Job (and its pod) unless --keep
A multi-host TPU topology (v4/v5p beyond 2x2x1, v5e/v6e beyond 2x4) needs one pod per host (a
JobSet); this script rejects it.

The image must hold this repository with its requirements installed (launch/install.sh;
--accelerator=tpu for TPU nodes), have python on its PATH and the checkout as its working
directory; the pod must be able to write to the store and the scratch prefix (Workload Identity:
--service-account names the Kubernetes service account, BUILD.md shows the grant).

Required:
  --image=IMAGE             container image, e.g. us-docker.pkg.dev/PROJECT/REPO/cold-fusion:TAG
  --store=gs://BUCKET/RUN   the ColD Fusion store
  --dataset=NAME            dataset to fine-tune on (--config.task); letters, digits, . _ -
  --accelerator=gpu|tpu     what the pod runs on
  with gpu:  --gpus=N            GPUs for the pod (default: 1)
             --gpu-type=TYPE     optional node selector cloud.google.com/gke-accelerator, e.g. nvidia-l4
  with tpu:  --tpu-type=TYPE     cloud.google.com/gke-tpu-accelerator: tpu-v4-podslice,
                                 tpu-v5p-slice, tpu-v5-lite-podslice, tpu-v6e-slice
             --tpu-topology=T    cloud.google.com/gke-tpu-topology of a single-host slice:
                                 2x2x1 (v4, v5p: 4 chips); 1x1, 2x2, 2x4 (v5e, v6e: 1, 4, 8 chips)
             --tpu-chips=N       google.com/tpu chips for the pod (default: all the topology's
                                 chips, which is what a single-host TPU node must be asked for)

Optional:
  --contributor-id=ID       contributor id in the store (default: the dataset name)
  --config=configs/X.py     config file inside the image's checkout (default: configs/roberta_base.py)
  --name=NAME               Job name (default: cf-<contributor id>)
  --namespace=NS            Kubernetes namespace (default: default)
  --context=CTX             kubectl context (default: the current one)
  --service-account=KSA     Kubernetes service account of the pod (Workload Identity)
  --scratch=gs://...        prefix for workdirs (default: <store>/scratch)
  --workdir=DIR             train --workdir: gs://... or a folder in the pod, which a replaced
                            pod does not see (default: <scratch>/<contributor id>)
  --spot                    run on Spot nodes (nodeSelector cloud.google.com/gke-spot=true, and
                            its taint tolerated)
  --retries=N               failed pods to replace before the Job fails (default: 3; preempted
                            pods do not count)
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
TPU_CHIPS=
CONTRIBUTOR_ID=
CONFIG=configs/roberta_base.py
NAME=
NAMESPACE=default
CONTEXT=
SERVICE_ACCOUNT=
SCRATCH=
WORKDIR=
STRATEGY=
RETRIES=3
SPOT=0
START_TIMEOUT=2h
TIMEOUT=172800
POLL_INTERVAL=30
KEEP=0
PRINT_MANIFEST=0
CHECK_ONLY=0
VALUE_FLAGS=(image store dataset accelerator gpus gpu-type tpu-type tpu-topology tpu-chips contributor-id
  config name namespace context service-account scratch workdir strategy retries start-timeout timeout
  poll-interval)
BOOL_FLAGS=(spot keep print-manifest check-only dry-run)
parse_flags "$@"

# ---------------------------------------------------------------------------------------------
# Settings, all checked before anything runs.

require image "$IMAGE" "container image with this project installed"
require store "$STORE" "gs://bucket/prefix of the ColD Fusion store"
require dataset "$DATASET" "dataset to fine-tune on"
require accelerator "$ACCELERATOR" "gpu or tpu"
check_word image "$IMAGE"
check_gcs_store "$STORE"
check_contributor
case $ACCELERATOR in
  gpu)
    check_positive gpus "$GPUS"
    [[ -z $GPU_TYPE ]] || check_word gpu-type "$GPU_TYPE"
    STRATEGY=${STRATEGY:-mirrored}
    ;;
  tpu)
    require tpu-type "$TPU_TYPE" "GKE TPU accelerator, e.g. tpu-v5-lite-podslice"
    require tpu-topology "$TPU_TOPOLOGY" "TPU topology, e.g. 2x4"
    # Chips per node of a single-host slice, and the topology's dimensions, per TPU type.
    case $TPU_TYPE in
      tpu-v4-podslice | tpu-v5p-slice) HOST_CHIPS=4 DIMS=3 ;;
      tpu-v5-lite-podslice | tpu-v5-lite-device | tpu-v6e-slice) HOST_CHIPS=8 DIMS=2 ;;
      *) usage_error "--tpu-type '$TPU_TYPE' must be one of tpu-v4-podslice, tpu-v5p-slice, tpu-v5-lite-podslice, tpu-v5-lite-device, tpu-v6e-slice" ;;
    esac
    [[ $TPU_TOPOLOGY =~ ^[1-9][0-9]*(x[1-9][0-9]*)+$ ]] || usage_error "--tpu-topology '$TPU_TOPOLOGY' must look like 2x4 or 2x2x1"
    IFS=x read -r -a TOPOLOGY_DIMS <<<"$TPU_TOPOLOGY"
    ((${#TOPOLOGY_DIMS[@]} == DIMS)) ||
      usage_error "--tpu-topology '$TPU_TOPOLOGY' of $TPU_TYPE must have $DIMS dimensions (e.g. $( ((DIMS == 3)) && echo 2x2x1 || echo 2x4))"
    TOPOLOGY_CHIPS=1
    for dim in "${TOPOLOGY_DIMS[@]}"; do
      TOPOLOGY_CHIPS=$((TOPOLOGY_CHIPS * 10#$dim))
    done
    ((TOPOLOGY_CHIPS <= HOST_CHIPS)) ||
      usage_error "--tpu-topology '$TPU_TOPOLOGY' of $TPU_TYPE has $TOPOLOGY_CHIPS chips on several hosts (at most $HOST_CHIPS on one): a multi-host slice needs one pod per host (a JobSet), which this script does not make. Use a single-host topology, or a TPU VM slice with tpu_contributor.sh."
    if [[ -n $TPU_CHIPS ]]; then
      check_positive tpu-chips "$TPU_CHIPS"
      ((10#$TPU_CHIPS == TOPOLOGY_CHIPS)) ||
        usage_error "--tpu-chips=$TPU_CHIPS but topology $TPU_TOPOLOGY has $TOPOLOGY_CHIPS chips: a single-host TPU pod must ask for all of them, or it stays Pending"
    fi
    TPU_CHIPS=$TOPOLOGY_CHIPS
    STRATEGY=${STRATEGY:-tpu}
    ;;
  *) usage_error "--accelerator '$ACCELERATOR' must be gpu or tpu" ;;
esac
[[ $ACCELERATOR == tpu || -z $TPU_CHIPS ]] || usage_error "--tpu-chips goes with --accelerator=tpu"
case $STRATEGY in
  auto | tpu | mirrored | multi_worker | one_device | default) ;;
  *) usage_error "--strategy '$STRATEGY' must be one of auto, tpu, mirrored, multi_worker, one_device, default" ;;
esac
NAME=${NAME:-$(slug "cf-$CONTRIBUTOR_ID")}
check_resource_name name "$NAME"
check_resource_name namespace "$NAMESPACE"
[[ -z $CONTEXT ]] || check_word context "$CONTEXT"
[[ -z $SERVICE_ACCOUNT ]] || check_resource_name service-account "$SERVICE_ACCOUNT"
SCRATCH=${SCRATCH:-$STORE/scratch}
check_gcs_uri scratch "${SCRATCH%/}"
SCRATCH=${SCRATCH%/}
WORKDIR=${WORKDIR:-$SCRATCH/$CONTRIBUTOR_ID}
check_path workdir "$WORKDIR"
[[ $WORKDIR == gs://* ]] ||
  log "warning: --workdir '$WORKDIR' is inside the pod: a replaced pod (preemption, retry) starts over"
check_uint retries "$RETRIES"
RETRIES=$((10#$RETRIES))
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
  backoffLimit: $RETRIES
  podFailurePolicy:
    rules:
    # A usage error (exit status 2: bad settings, already contributed) fails the Job at once.
    - action: FailJob
      onExitCodes:
        containerName: contributor
        operator: In
        values: [2]
    # A pod evicted or preempted (Spot node, maintenance) is replaced without counting.
    - action: Ignore
      onPodConditions:
      - type: DisruptionTarget
  template:
    metadata:
      labels:
$(print_labels "        ")
    spec:
      restartPolicy: Never
EOF
  [[ -z $SERVICE_ACCOUNT ]] || echo "      serviceAccountName: $SERVICE_ACCOUNT"
  if [[ $ACCELERATOR == tpu || -n $GPU_TYPE ]] || ((SPOT)); then
    echo "      nodeSelector:"
  fi
  if [[ $ACCELERATOR == tpu ]]; then
    echo "        cloud.google.com/gke-tpu-accelerator: $(json_str "$TPU_TYPE")"
    echo "        cloud.google.com/gke-tpu-topology: $(json_str "$TPU_TOPOLOGY")"
  elif [[ -n $GPU_TYPE ]]; then
    echo "        cloud.google.com/gke-accelerator: $(json_str "$GPU_TYPE")"
  fi
  if ((SPOT)); then
    cat <<EOF
        cloud.google.com/gke-spot: "true"
      tolerations:
      - key: cloud.google.com/gke-spot
        operator: Equal
        value: "true"
        effect: NoSchedule
EOF
  fi
  cat <<EOF
      containers:
      - name: contributor
        image: $(json_str "$IMAGE")
EOF
  if [[ $ACCELERATOR == tpu ]]; then
    # tpu_run.sh sets the PJRT variables (and libtpu's path) before TensorFlow is imported.
    cat <<EOF
        command: ["bash", "launch/tpu_run.sh", "--mode=pjrt", "--"]
        env:
        - name: NEXT_PLUGGABLE_DEVICE_USE_C_API
          value: "true"
        - name: PJRT_DEVICE
          value: "TPU"
EOF
  else
    echo '        command: ["python", "-m", "cold_fusion_tf.train"]'
  fi
  echo "        args:"
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
# The Job's Complete and Failed conditions ("True," or ",True"): with retries, a failed pod does
# not mean a failed Job.
STATUS=("${KUBECTL[@]}" get job "$NAME" '-o=jsonpath={.status.conditions[?(@.type=="Complete")].status},{.status.conditions[?(@.type=="Failed")].status}')
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
    complete=${status%%,*}
    failed=${status#*,}
    if [[ $complete == True ]]; then
      log "job/$NAME succeeded"
      break
    fi
    [[ $failed != True ]] || die "job/$NAME failed (kubectl describe job/$NAME -n $NAMESPACE tells why)"
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
