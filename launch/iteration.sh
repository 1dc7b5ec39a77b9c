#!/usr/bin/env bash
# One ColD Fusion iteration at scale: one contributor per dataset in parallel, then the fuser.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $PROG --store=gs://BUCKET/RUN --iteration=I --datasets=A,B,C --backend=tpu|gke
          [backend settings] [settings] [--dry-run] [-- EXTRA_TRAIN_FLAGS...]

Runs one iteration of ColD Fusion:
  1. starts one contributor per dataset, all at once:
       --backend=tpu: launch/tpu_contributor.sh, one Cloud TPU queued resource each
       --backend=gke: launch/gke_contributor.sh, one Kubernetes Job each
     Each one's output goes to LOG_DIR/<contributor id>.log (and is followed here); each deletes
     its own TPU or Job when it ends.
  2. waits for all of them and reports which failed
  3. runs the fuser until the next base is published:
       python -m cold_fusion_tf.fuse --config=... --store=... --watch \\
           --config.fusion.min_contributions=N --config.fusion.max_wait=SECONDS
     If a contributor failed, the fuser is not started unless --fuse-on-failure is given.
Contributor ids are <--id-prefix><dataset>; resources are named cf-i<iteration>-<id>.

Required:
  --store=gs://BUCKET/RUN   the ColD Fusion store
  --iteration=I             the base iteration the contributors start from (the store's LATEST);
                            it names the resources and logs of this run
  --datasets=A,B,C          one contributor per dataset; letters, digits, . _ - each
  --backend=tpu|gke         where the contributors run
  with tpu:  --project=ID --zone=ZONE --accelerator-type=TYPE
             [--service-account=EMAIL [--scopes=LIST]] [--runtime-version=V]
             [--spot | --reserved] [--valid-until-duration=D] [--retries=N] [--scratch=gs://...]
             [--pod-server=MODE] [--internal-ip | --tunnel-through-iap]
             [--remote-python=PYTHON] [--libtpu-version=V]   (see tpu_contributor.sh --help)
             [--preflight]   run launch/preflight.sh once before any contributor starts
  with gke:  --image=IMAGE --accelerator=gpu|tpu [--gpus=N] [--gpu-type=T]
             [--tpu-type=T --tpu-topology=T] [--tpu-chips=N] [--namespace=NS]
             [--context=CTX] [--service-account=KSA] [--spot] [--retries=N]
             [--scratch=gs://...]   (see gke_contributor.sh --help)

Optional:
  --config=configs/X.py     config of contributors and fuser (default: configs/roberta_base.py)
  --id-prefix=P             prefix of the contributor ids (default: none)
  --min-contributions=N     the fuser's quorum (default: the number of datasets)
  --max-wait=SECONDS        how long the fuser waits for the quorum (default: 3600)
  --fuse-on-failure         run the fuser even if some contributors failed
  --log-dir=DIR             where the contributor logs go (default: launch_logs/iteration-<I>)
  --python=PYTHON           interpreter of the fuser on this machine (default: python)
  --keep                    keep the TPUs / Jobs after the contributors end
  --dry-run                 print every command ("+ ..." lines) and run none; the contributors'
                            commands are printed one contributor after the other
  --help                    this text
Anything after a lone -- is appended to every contributor's train command.

Example:
  $PROG --store=gs://my-bucket/cf-run --iteration=0 --datasets=sst2,rte,mrpc --backend=tpu \\
      --project=my-proj --zone=us-central2-b --accelerator-type=v4-8 --dry-run
EOF
}

STORE=
ITERATION=
DATASETS=
BACKEND=
CONFIG=configs/roberta_base.py
ID_PREFIX=
MIN_CONTRIBUTIONS=
MAX_WAIT=3600
LOG_DIR=
PYTHON=python
FUSE_ON_FAILURE=0
KEEP=0
# tpu backend
PROJECT=
ZONE=
ACCELERATOR_TYPE=
RUNTIME_VERSION=
VALID_UNTIL_DURATION=
REMOTE_PYTHON=
LIBTPU_VERSION=
SCOPES=
POD_SERVER=
SPOT=0
RESERVED=0
INTERNAL_IP=0
TUNNEL_THROUGH_IAP=0
PREFLIGHT=0
# both backends
SERVICE_ACCOUNT=
SCRATCH=
RETRIES=
# gke backend
IMAGE=
ACCELERATOR=
GPUS=
GPU_TYPE=
TPU_TYPE=
TPU_TOPOLOGY=
TPU_CHIPS=
NAMESPACE=
CONTEXT=
VALUE_FLAGS=(store iteration datasets backend config id-prefix min-contributions max-wait log-dir python
  project zone accelerator-type runtime-version valid-until-duration remote-python libtpu-version
  scopes pod-server service-account scratch retries
  image accelerator gpus gpu-type tpu-type tpu-topology tpu-chips namespace context)
BOOL_FLAGS=(fuse-on-failure keep spot reserved internal-ip tunnel-through-iap preflight dry-run)
parse_flags "$@"

# ---------------------------------------------------------------------------------------------
# Settings, all checked before anything starts.

require store "$STORE" "gs://bucket/prefix of the ColD Fusion store"
require iteration "$ITERATION" "the base iteration the contributors start from"
require datasets "$DATASETS" "comma-separated dataset names"
require backend "$BACKEND" "tpu or gke"
check_gcs_store "$STORE"
check_iteration "$ITERATION"
ITERATION=$((10#$ITERATION))
check_config "$CONFIG"
split_list datasets DATASET_LIST "$DATASETS"
[[ -z $ID_PREFIX ]] || check_safe_name id-prefix "$ID_PREFIX"
declare -A SEEN_NAMES=()
IDS=()
NAMES=()
for dataset in "${DATASET_LIST[@]}"; do
  check_safe_name datasets "$dataset"
  id=$ID_PREFIX$dataset
  check_safe_name id-prefix "$id"
  name=$(slug "cf-i$ITERATION-$id")
  [[ -z ${SEEN_NAMES[$name]:-} ]] ||
    usage_error "--datasets: '$dataset' and '${SEEN_NAMES[$name]}' give the same resource name $name"
  SEEN_NAMES[$name]=$dataset
  IDS+=("$id")
  NAMES+=("$name")
done
MIN_CONTRIBUTIONS=${MIN_CONTRIBUTIONS:-${#DATASET_LIST[@]}}
check_positive min-contributions "$MIN_CONTRIBUTIONS"
check_uint max-wait "$MAX_WAIT"
check_path python "$PYTHON"
LOG_DIR=$(from_caller "${LOG_DIR:-launch_logs/iteration-$ITERATION}")
check_path log-dir "$LOG_DIR"

# pass FLAG VALUE: adds --FLAG=VALUE to BACKEND_ARGS when VALUE is set.
BACKEND_ARGS=()
pass() {
  [[ -z $2 ]] || BACKEND_ARGS+=("--$1=$2")
}
case $BACKEND in
  tpu)
    CHILD=$LAUNCH_DIR/tpu_contributor.sh
    require project "$PROJECT" "Google Cloud project id"
    require zone "$ZONE" "zone of the TPUs, e.g. us-central2-b"
    require accelerator-type "$ACCELERATOR_TYPE" "TPU type, e.g. v5litepod-8"
    check_project "$PROJECT"
    check_zone "$ZONE"
    check_accelerator_type "$ACCELERATOR_TYPE"
    ((SPOT && RESERVED)) && usage_error "--spot and --reserved exclude each other"
    pass project "$PROJECT"
    pass zone "$ZONE"
    pass accelerator-type "$ACCELERATOR_TYPE"
    pass runtime-version "$RUNTIME_VERSION"
    pass valid-until-duration "$VALID_UNTIL_DURATION"
    pass remote-python "$REMOTE_PYTHON"
    pass libtpu-version "$LIBTPU_VERSION"
    pass service-account "$SERVICE_ACCOUNT"
    pass scopes "$SCOPES"
    pass pod-server "$POD_SERVER"
    ((SPOT)) && BACKEND_ARGS+=(--spot)
    ((RESERVED)) && BACKEND_ARGS+=(--reserved)
    ((INTERNAL_IP)) && BACKEND_ARGS+=(--internal-ip)
    ((TUNNEL_THROUGH_IAP)) && BACKEND_ARGS+=(--tunnel-through-iap)
    ;;
  gke)
    CHILD=$LAUNCH_DIR/gke_contributor.sh
    require image "$IMAGE" "container image with this project installed"
    require accelerator "$ACCELERATOR" "gpu or tpu"
    pass image "$IMAGE"
    pass accelerator "$ACCELERATOR"
    pass gpus "$GPUS"
    pass gpu-type "$GPU_TYPE"
    pass tpu-type "$TPU_TYPE"
    pass tpu-topology "$TPU_TOPOLOGY"
    pass tpu-chips "$TPU_CHIPS"
    pass namespace "$NAMESPACE"
    pass context "$CONTEXT"
    pass service-account "$SERVICE_ACCOUNT"
    ((SPOT)) && BACKEND_ARGS+=(--spot)
    ((PREFLIGHT)) && usage_error "--preflight goes with --backend=tpu"
    ;;
  *) usage_error "--backend '$BACKEND' must be tpu or gke" ;;
esac
pass scratch "$SCRATCH"
pass retries "$RETRIES"
((KEEP)) && BACKEND_ARGS+=(--keep)
((DRY_RUN)) && BACKEND_ARGS+=(--dry-run)

# child_command I [FLAG...]: the contributor command of dataset I, in CHILD_CMD.
child_command() {
  local i=$1
  shift
  CHILD_CMD=(bash "$CHILD" "--store=$STORE" "--dataset=${DATASET_LIST[$i]}" "--contributor-id=${IDS[$i]}"
    "--config=$CONFIG" "--name=${NAMES[$i]}" "${BACKEND_ARGS[@]}" "$@")
  ((${#EXTRA_ARGS[@]} == 0)) || CHILD_CMD+=(-- "${EXTRA_ARGS[@]}")
}

# The children check the settings passed on to them: ask them now, so that a bad setting stops
# everything before any resource is requested.
for i in "${!DATASET_LIST[@]}"; do
  child_command "$i" --check-only
  "${CHILD_CMD[@]}" || exit
done

# Once for all contributors: the project, quota, runtime version and bucket access.
if ((PREFLIGHT)); then
  PREFLIGHT_CMD=(bash "$LAUNCH_DIR/preflight.sh" "--project=$PROJECT" "--zone=$ZONE"
    "--accelerator-type=$ACCELERATOR_TYPE" "--store=$STORE")
  [[ -z $SERVICE_ACCOUNT ]] || PREFLIGHT_CMD+=("--service-account=$SERVICE_ACCOUNT")
  [[ -z $SCRATCH ]] || PREFLIGHT_CMD+=("--scratch=$SCRATCH")
  [[ -z $RUNTIME_VERSION ]] || PREFLIGHT_CMD+=("--runtime-version=$RUNTIME_VERSION")
  ((SPOT)) && PREFLIGHT_CMD+=(--spot)
  ((RESERVED)) && PREFLIGHT_CMD+=(--reserved)
  ((DRY_RUN)) && PREFLIGHT_CMD+=(--dry-run)
  log "preflight: $(quote_cmd "${PREFLIGHT_CMD[@]}")"
  "${PREFLIGHT_CMD[@]}" || die "preflight found problems (above); no contributor was started"
fi

# ---------------------------------------------------------------------------------------------
# 1-2. The contributors.

FAILED=()
log "iteration $ITERATION: ${#DATASET_LIST[@]} contributors on $BACKEND (store $STORE)"
if ((DRY_RUN)); then
  for i in "${!DATASET_LIST[@]}"; do
    child_command "$i"
    log "contributor ${IDS[$i]}: $(quote_cmd "${CHILD_CMD[@]}")"
    "${CHILD_CMD[@]}"
  done
else
  mkdir -p "$LOG_DIR"
  declare -A PID_OF=()
  TAIL_PID=
  SENTINEL_PID=
  stop_all() {
    local id
    for id in "${!PID_OF[@]}"; do
      kill -TERM "${PID_OF[$id]}" 2>/dev/null || true
    done
    log "stopping the contributors; they delete their resources before they exit"
    for id in "${!PID_OF[@]}"; do
      wait "${PID_OF[$id]}" 2>/dev/null || true
    done
    [[ -z $SENTINEL_PID ]] || kill "$SENTINEL_PID" 2>/dev/null || true
    [[ -z $TAIL_PID ]] || kill "$TAIL_PID" 2>/dev/null || true
  }
  trap 'stop_all; exit 130' INT
  trap 'stop_all; exit 143' TERM
  LOGS=()
  for i in "${!DATASET_LIST[@]}"; do
    child_command "$i"
    logfile=$LOG_DIR/${IDS[$i]}.log
    LOGS+=("$logfile")
    log "contributor ${IDS[$i]}: log $logfile"
    "${CHILD_CMD[@]}" >"$logfile" 2>&1 &
    PID_OF[${IDS[$i]}]=$!
  done
  # Follow the logs here until the sentinel is stopped; tail reads to the end before it exits.
  sleep 2147483647 &
  SENTINEL_PID=$!
  tail -n +1 -F -s 0.2 "--pid=$SENTINEL_PID" "${LOGS[@]}" &
  TAIL_PID=$!
  for id in "${IDS[@]}"; do
    rc=0
    wait "${PID_OF[$id]}" || rc=$?
    unset "PID_OF[$id]"
    if ((rc == 0)); then
      log "contributor $id: done"
    else
      log "contributor $id: FAILED with status $rc (log: $LOG_DIR/$id.log)"
      FAILED+=("$id")
    fi
  done
  kill "$SENTINEL_PID" 2>/dev/null || true
  wait "$SENTINEL_PID" 2>/dev/null || true
  wait "$TAIL_PID" 2>/dev/null || true
  SENTINEL_PID=
  TAIL_PID=
  trap - INT TERM
fi

if ((${#FAILED[@]})); then
  log "${#FAILED[@]} of ${#DATASET_LIST[@]} contributors failed: ${FAILED[*]}"
  if ((!FUSE_ON_FAILURE)); then
    die "not fusing. Rerun the failed ones, or fuse what is there with: $(quote_cmd "$PYTHON" -m cold_fusion_tf.fuse "--config=$CONFIG" "--store=$STORE" --watch)"
  fi
fi

# ---------------------------------------------------------------------------------------------
# 3. The fuser, on this machine, until the next base is published.

cd "$REPO_ROOT"
FUSE=("$PYTHON" -m cold_fusion_tf.fuse "--config=$CONFIG" "--store=$STORE" --watch
  "--config.fusion.min_contributions=$MIN_CONTRIBUTIONS" "--config.fusion.max_wait=$MAX_WAIT"
  --config.fusion.watch_iterations=1)
log "fusing iteration $ITERATION"
on_signal_stop_child
run_waitable "${FUSE[@]}"
((${#FAILED[@]} == 0)) || exit 1
log "iteration $ITERATION done"
