#!/usr/bin/env bash
# One ColD Fusion contributor on a Cloud TPU slice: queued resource -> install -> train -> delete.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $PROG --project=ID --zone=ZONE --accelerator-type=TYPE --store=gs://BUCKET/RUN
          --dataset=NAME [settings] [--dry-run] [-- EXTRA_TRAIN_FLAGS...]

Runs one contributor on a Cloud TPU VM (or a multi-host slice):
  1. gcloud compute tpus queued-resources create NAME --node-id=NAME ... (TF runtime version)
  2. polls 'gcloud compute tpus queued-resources describe' until the state is ACTIVE
  3. copies this checkout to every worker (--worker=all) and runs launch/install.sh --accelerator=tpu
  4. runs python -m cold_fusion_tf.train over ssh, streaming its output here
     (single host: --worker=all with --config.tpu=local; multi-host slice: worker 0 drives the
      whole slice through TPU_NAME=NAME and --config.tpu=NAME, TPU_LOAD_LIBRARY=0)
  5. on exit - success, failure or Ctrl-C - deletes the queued resource and its TPU VMs
     (gcloud compute tpus queued-resources delete NAME --force --quiet) unless --keep

Required:
  --project=ID              Google Cloud project
  --zone=ZONE               zone with TPU capacity, e.g. us-central2-b, us-west4-a
  --accelerator-type=TYPE   e.g. v4-8, v5litepod-8, v5p-8, v6e-8 (more than 8 in the type = multi-host)
  --store=gs://BUCKET/RUN   the ColD Fusion store
  --dataset=NAME            dataset to fine-tune on (--config.task); letters, digits, . _ -

Optional:
  --contributor-id=ID       contributor id in the store (default: the dataset name)
  --config=configs/X.py     config file, relative to the repository (default: configs/roberta_base.py)
  --name=NAME               queued resource and TPU node id (default: cf-<contributor id>)
  --runtime-version=V       TPU software version (default: tpu-vm-tf-<pinned TF>-pjrt, or
                            tpu-vm-tf-<pinned TF>-pod-pjrt for multi-host types)
  --workdir=DIR             train --workdir on the TPU VM, relative to the copied checkout or
                            gs://... to keep checkpoints and TensorBoard logs (default: workdir/<id>)
  --strategy=S              --config.strategy (default: tpu)
  --spot | --reserved       capacity to request (default: on-demand)
  --valid-until-duration=D  give up waiting for capacity after D (e.g. 6h); gcloud duration syntax
  --wait-timeout=SECONDS    how long to poll for ACTIVE (default: 7200)
  --poll-interval=SECONDS   seconds between polls (default: 30)
  --remote-python=PYTHON    interpreter on the TPU VM that creates the virtualenv (default: python3)
  --libtpu-version=V        pin libtpu==V when installing tensorflow-tpu (default: pip's choice)
  --keep                    do not delete the queued resource at the end
  --check-only              check the settings and exit (0 if they are all right)
  --dry-run                 print every command ("+ ..." lines) and run none
  --help                    this text
Anything after a lone -- is appended to the train command (e.g. -- --config.num_epochs=3).

Example:
  $PROG --project=my-proj --zone=us-central2-b --accelerator-type=v4-8 \\
      --store=gs://my-bucket/cf-run --dataset=sst2 --dry-run
EOF
}

PROJECT=
ZONE=
ACCELERATOR_TYPE=
STORE=
DATASET=
CONTRIBUTOR_ID=
CONFIG=configs/roberta_base.py
NAME=
RUNTIME_VERSION=
WORKDIR=
STRATEGY=tpu
VALID_UNTIL_DURATION=
WAIT_TIMEOUT=7200
POLL_INTERVAL=30
REMOTE_PYTHON=python3
LIBTPU_VERSION=
SPOT=0
RESERVED=0
KEEP=0
CHECK_ONLY=0
VALUE_FLAGS=(project zone accelerator-type store dataset contributor-id config name runtime-version
  workdir strategy valid-until-duration wait-timeout poll-interval remote-python libtpu-version)
BOOL_FLAGS=(spot reserved keep check-only dry-run)
parse_flags "$@"

# ---------------------------------------------------------------------------------------------
# Settings, all checked before anything runs.

require project "$PROJECT" "Google Cloud project id"
require zone "$ZONE" "zone of the TPU, e.g. us-central2-b"
require accelerator-type "$ACCELERATOR_TYPE" "TPU type, e.g. v5litepod-8"
require store "$STORE" "gs://bucket/prefix of the ColD Fusion store"
require dataset "$DATASET" "dataset to fine-tune on"
check_project "$PROJECT"
check_zone "$ZONE"
check_accelerator_type "$ACCELERATOR_TYPE"
check_gcs_store "$STORE"
check_safe_name dataset "$DATASET"
CONTRIBUTOR_ID=${CONTRIBUTOR_ID:-$DATASET}
check_safe_name contributor-id "$CONTRIBUTOR_ID"
check_config "$CONFIG"
NAME=${NAME:-$(slug "cf-$CONTRIBUTOR_ID")}
check_resource_name name "$NAME"
RUNTIME_VERSION=${RUNTIME_VERSION:-$(tf_runtime_version "$ACCELERATOR_TYPE")}
check_word runtime-version "$RUNTIME_VERSION"
WORKDIR=${WORKDIR:-workdir/$CONTRIBUTOR_ID}
check_path workdir "$WORKDIR"
case $STRATEGY in
  auto | tpu | mirrored | multi_worker | one_device | default) ;;
  *) usage_error "--strategy '$STRATEGY' must be one of auto, tpu, mirrored, multi_worker, one_device, default" ;;
esac
((SPOT && RESERVED)) && usage_error "--spot and --reserved exclude each other"
[[ -z $VALID_UNTIL_DURATION ]] || check_word valid-until-duration "$VALID_UNTIL_DURATION"
check_uint wait-timeout "$WAIT_TIMEOUT"
check_seconds poll-interval "$POLL_INTERVAL"
check_path remote-python "$REMOTE_PYTHON"
[[ -z $LIBTPU_VERSION || $LIBTPU_VERSION =~ ^[0-9][0-9a-z.]*$ ]] || usage_error "--libtpu-version '$LIBTPU_VERSION' is not a version"
((CHECK_ONLY)) && exit 0

GCLOUD_WHERE=("--project=$PROJECT" "--zone=$ZONE")
REMOTE_DIR=cold_fusion_tf         # on every worker, relative to the login user's home
REMOTE_VENV=cf-venv
UPLOAD=${TMPDIR:-/tmp}/cold-fusion-launch-$NAME/cold_fusion_tf.tar.gz

# ---------------------------------------------------------------------------------------------
# Delete the queued resource (with its TPU VMs) whenever the script ends from here on.

DELETE=(gcloud compute tpus queued-resources delete "$NAME" "${GCLOUD_WHERE[@]}" --force --quiet)
CREATED=0
cleanup() {
  local rc=$?
  # The delete must not be cut short: Ctrl-C is ignored from here on.
  trap '' INT TERM
  trap - EXIT
  if ((CREATED)); then
    if ((KEEP)); then
      log "--keep: leaving $NAME running. Delete it with: $(quote_cmd "${DELETE[@]}")"
    else
      log "deleting queued resource $NAME"
      run "${DELETE[@]}" || log "delete failed; run it by hand: $(quote_cmd "${DELETE[@]}")"
    fi
  fi
  exit "$rc"
}
trap cleanup EXIT
on_signal_stop_child

# ---------------------------------------------------------------------------------------------
# 1. Ask for the TPU.

CREATE=(gcloud compute tpus queued-resources create "$NAME" "--node-id=$NAME" "${GCLOUD_WHERE[@]}"
  "--accelerator-type=$ACCELERATOR_TYPE" "--runtime-version=$RUNTIME_VERSION")
((SPOT)) && CREATE+=(--spot)
((RESERVED)) && CREATE+=(--reserved)
[[ -z $VALID_UNTIL_DURATION ]] || CREATE+=("--valid-until-duration=$VALID_UNTIL_DURATION")
log "requesting $ACCELERATOR_TYPE in $ZONE as $NAME (runtime $RUNTIME_VERSION)"
CREATED=1
run "${CREATE[@]}"

# ---------------------------------------------------------------------------------------------
# 2. Wait until it is ACTIVE.

DESCRIBE=(gcloud compute tpus queued-resources describe "$NAME" "${GCLOUD_WHERE[@]}" "--format=value(state.state)")
print_cmd "${DESCRIBE[@]}"
if ((!DRY_RUN)); then
  deadline=$((SECONDS + WAIT_TIMEOUT))
  last=
  while true; do
    state=$("${DESCRIBE[@]}")
    if [[ $state != "$last" ]]; then
      log "queued resource $NAME: ${state:-<no state>}"
      last=$state
    fi
    case $state in
      ACTIVE) break ;;
      FAILED | SUSPENDING | SUSPENDED | DELETING) die "queued resource $NAME is $state" ;;
    esac
    ((SECONDS < deadline)) || die "queued resource $NAME is not ACTIVE after $WAIT_TIMEOUT s (state: $state)"
    sleep "$POLL_INTERVAL" &
    CHILD_PID=$!
    wait "$CHILD_PID"
    CHILD_PID=
  done
fi

# ---------------------------------------------------------------------------------------------
# 3. Copy this checkout to every worker and install it there.

run mkdir -p "$(dirname "$UPLOAD")"
run tar --exclude=./.git --exclude=./.venv --exclude=./stores --exclude=./workdir \
  --exclude=./launch_logs --exclude=__pycache__ --exclude=.pytest_cache \
  -czf "$UPLOAD" -C "$REPO_ROOT" .
run_waitable gcloud compute tpus tpu-vm scp "$UPLOAD" "$NAME:$REMOTE_DIR.tar.gz" --worker=all \
  "${GCLOUD_WHERE[@]}" --quiet
run rm -rf "$(dirname "$UPLOAD")"
INSTALL="rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -xzf $REMOTE_DIR.tar.gz -C $REMOTE_DIR"
INSTALL_ARGS=(--accelerator=tpu "--venv=$REMOTE_VENV" "--python=$REMOTE_PYTHON")
[[ -z $LIBTPU_VERSION ]] || INSTALL_ARGS+=("--libtpu-version=$LIBTPU_VERSION")
INSTALL+=" && $(quote_cmd bash "$REMOTE_DIR/launch/install.sh" "${INSTALL_ARGS[@]}")"
run_waitable gcloud compute tpus tpu-vm ssh "$NAME" --worker=all "${GCLOUD_WHERE[@]}" --quiet "--command=$INSTALL"

# ---------------------------------------------------------------------------------------------
# 4. Train, streaming the output here.

TRAIN=(python -m cold_fusion_tf.train "--config=$CONFIG" "--store=$STORE" "--workdir=$WORKDIR"
  "--config.task=$DATASET" "--config.contributor_id=$CONTRIBUTOR_ID" "--config.strategy=$STRATEGY")
if is_multi_host "$ACCELERATOR_TYPE"; then
  # TensorFlow drives a multi-host slice from one client: worker 0 connects to the TPU servers
  # of all workers by the node's name; it must not open the local TPU itself.
  WORKERS=0
  TRAIN=(env "TPU_NAME=$NAME" TPU_LOAD_LIBRARY=0 "${TRAIN[@]}" "--config.tpu=$NAME")
else
  WORKERS=all
  TRAIN+=(--config.tpu=local)
fi
TRAIN+=("${EXTRA_ARGS[@]}")
REMOTE_TRAIN="cd $REMOTE_DIR && . ../$REMOTE_VENV/bin/activate && $(quote_cmd "${TRAIN[@]}")"
log "training contributor $CONTRIBUTOR_ID on dataset $DATASET (store $STORE)"
run_waitable gcloud compute tpus tpu-vm ssh "$NAME" "--worker=$WORKERS" "${GCLOUD_WHERE[@]}" --quiet \
  "--command=$REMOTE_TRAIN"
log "contributor $CONTRIBUTOR_ID finished"
# 5. The EXIT trap deletes the queued resource.
