#!/usr/bin/env bash
# One ColD Fusion contributor on a Cloud TPU slice: queued resource -> install -> train -> delete,
# re-created and resumed (bounded) when the slice is preempted or the connection drops.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $PROG --project=ID --zone=ZONE --accelerator-type=TYPE --store=gs://BUCKET/RUN
          --dataset=NAME [settings] [--dry-run] [-- EXTRA_TRAIN_FLAGS...]

Runs one contributor on a Cloud TPU VM (or a multi-host slice):
  0. (--preflight) launch/preflight.sh: project, APIs, zone, quota, bucket access, runtime version
  1. picks the runtime version: gcloud compute tpus tpu-vm versions list --zone=ZONE, first of
     tpu-vm-tf-<TF>[-pod]-pjrt-<generation suffix>, tpu-vm-tf-<TF>[-pod]-pjrt, and the
     generation's base image (v2-alpha-tpuv5-lite for v5e, v2-alpha-tpuv5 for v4/v5p,
     v2-alpha-tpuv6e for v6e), <TF> being the pinned TensorFlow; fails with the list if none is
     offered (--runtime-version=V picks one, checked against the same list)
  2. gcloud compute tpus queued-resources create NAME --node-id=NAME ... [--service-account ...]
     and polls 'gcloud compute tpus queued-resources describe' until the state is ACTIVE
  3. copies this checkout to every worker and runs launch/install.sh --accelerator=tpu there:
     Python $VENV_PYTHON_VERSION (uv), the requirements, tensorflow-tpu and a pinned libtpu, a check
     that tf.io.gfile can write and delete under the gs:// workdir, and on a multi-host slice
     a check (or repoint) of the TPU server every worker runs
  4. trains over ssh (gcloud compute tpus queued-resources ssh), streaming the output here, with
     launch/tpu_run.sh setting TensorFlow's TPU environment:
       single host: on the one worker, PJRT (libtpu) with --config.tpu=local;
       multi-host slice: worker 0 drives every worker's TPU server through
         --config.tpu=grpc://IP0:8470,grpc://IP1:8470,... (TPU_NAME the same, TPU_LOAD_LIBRARY=0),
         the workers' addresses read with gcloud compute tpus tpu-vm describe
  5. if the slice is preempted (the queued resource leaves ACTIVE) or the ssh connection drops,
     re-creates it (or reconnects) and trains again, at most --retries times; the contributor
     resumes from its last checkpoint in the gs:// workdir
  6. on exit - success, failure or Ctrl-C - deletes the queued resource and its TPU VMs
     (gcloud compute tpus queued-resources delete NAME --force --quiet) unless --keep

Required:
  --project=ID              Google Cloud project
  --zone=ZONE               zone with TPU capacity, e.g. us-central2-b (v4), us-west4-a (v5e)
  --accelerator-type=TYPE   e.g. v4-8, v5litepod-8, v5p-8 (more than 8 in the type = multi-host)
  --store=gs://BUCKET/RUN   the ColD Fusion store
  --dataset=NAME            dataset to fine-tune on (--config.task); letters, digits, . _ -

Optional:
  --contributor-id=ID       contributor id in the store (default: the dataset name)
  --config=configs/X.py     config file, relative to the repository (default: configs/roberta_base.py)
  --name=NAME               queued resource and TPU node id (default: cf-<contributor id>)
  --runtime-version=V       TPU software version (default: auto, as in step 1)
  --service-account=EMAIL   service account of the TPU VMs (default: the Compute Engine default
                            account, which the grants in BUILD.md do not cover)
  --scopes=LIST             its OAuth scopes (default with --service-account:
                            https://www.googleapis.com/auth/cloud-platform; IAM roles decide)
  --scratch=gs://...        prefix for workdirs (default: <store>/scratch; the service account
                            needs roles/storage.objectUser on it, see BUILD.md)
  --workdir=DIR             train --workdir: checkpoints and TensorBoard logs (default:
                            <scratch>/<contributor id>). A multi-host slice needs gs://; a local
                            folder on a single host dies with the VM, so a preempted run restarts
  --strategy=S              --config.strategy (default: tpu)
  --body=B                  --config.model.body: transformers_tf (default; TensorFlow on the TPU)
                            or keras_hub (Keras 3, with --backend=jax)
  --backend=B               tensorflow (default) or jax: the keras-hub body on Keras 3's JAX
                            backend, for the JAX runtime images (v6e and later are JAX only).
                            The slice is created on the generation's base image
                            (v2-alpha-tpuv5-lite, v2-alpha-tpuv5, v2-alpha-tpuv6e),
                            install.sh --backend=jax installs jax[tpu] (no tensorflow-tpu),
                            and tpu_run.sh --mode=jax trains on every chip of the host
                            (keras.distribution.DataParallel). Single-host slices only
  --spot | --reserved       capacity to request (default: on-demand)
  --valid-until-duration=D  give up waiting for capacity after D (e.g. 6h); gcloud duration syntax
  --retries=N               re-creations / reconnections after a preemption or a dropped
                            connection (default: 2); a failing program is not retried
  --internal-ip             ssh/scp to the workers' internal addresses (from a VM in the network)
  --tunnel-through-iap      ssh/scp through Identity-Aware Proxy (VMs without external IPs; needs
                            the firewall rule of BUILD.md)
  --pod-server=MODE         multi-host only: check or repoint the workers' TPU server (see
                            install.sh --help); default auto: check on a TensorFlow pod image of
                            the pinned TensorFlow, repoint on any other runtime version
  --wait-timeout=SECONDS    how long to poll for ACTIVE (default: 7200)
  --poll-interval=SECONDS   seconds between polls (default: 30)
  --remote-python=PYTHON    interpreter on the TPU VM that creates the virtualenv (default: uv,
                            a CPython $VENV_PYTHON_VERSION installed with uv; TPU VM images ship 3.10)
  --libtpu-version=V        libtpu to install (default: $DEFAULT_LIBTPU_VERSION)
  --preflight               run launch/preflight.sh first and stop if it finds a problem
  --keep                    do not delete the queued resource at the end
  --check-only              check the settings and exit (0 if they are all right)
  --dry-run                 print every command ("+ ..." lines) and run none; values only known
                            at run time are shown as the messages say: the runtime version as
                            the generation's base image, the workers' addresses as placeholders
  --help                    this text
Anything after a lone -- is appended to the train command (e.g. -- --config.num_epochs=3).

Example:
  $PROG --project=my-proj --zone=us-west4-a --accelerator-type=v5litepod-8 \\
      --store=gs://my-bucket/cf-run --dataset=sst2 \\
      --service-account=cf-contributor@my-proj.iam.gserviceaccount.com --dry-run
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
RUNTIME_VERSION=auto
SERVICE_ACCOUNT=
SCOPES=
SCRATCH=
WORKDIR=
STRATEGY=tpu
BODY=transformers_tf
BACKEND=tensorflow
VALID_UNTIL_DURATION=
RETRIES=2
POD_SERVER=auto
WAIT_TIMEOUT=7200
POLL_INTERVAL=30
REMOTE_PYTHON=uv
LIBTPU_VERSION=
SPOT=0
RESERVED=0
INTERNAL_IP=0
TUNNEL_THROUGH_IAP=0
PREFLIGHT=0
KEEP=0
CHECK_ONLY=0
VALUE_FLAGS=(project zone accelerator-type store dataset contributor-id config name runtime-version
  service-account scopes scratch workdir strategy body backend valid-until-duration retries pod-server
  wait-timeout poll-interval remote-python libtpu-version)
BOOL_FLAGS=(spot reserved internal-ip tunnel-through-iap preflight keep check-only dry-run)
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
check_tpu_generation "$ACCELERATOR_TYPE"
check_gcs_store "$STORE"
check_contributor
check_config_exists "$CONFIG"
NAME=${NAME:-$(slug "cf-$CONTRIBUTOR_ID")}
check_resource_name name "$NAME"
[[ $RUNTIME_VERSION == auto ]] || check_word runtime-version "$RUNTIME_VERSION"
if [[ -n $SERVICE_ACCOUNT ]]; then
  check_service_account_email service-account "$SERVICE_ACCOUNT"
  SCOPES=${SCOPES:-https://www.googleapis.com/auth/cloud-platform}
fi
[[ -z $SCOPES ]] || check_word scopes "$SCOPES"
[[ -z $SCOPES || -n $SERVICE_ACCOUNT ]] || usage_error "--scopes goes with --service-account"
SCRATCH=${SCRATCH:-$STORE/scratch}
check_gcs_uri scratch "${SCRATCH%/}"
SCRATCH=${SCRATCH%/}
WORKDIR=${WORKDIR:-$SCRATCH/$CONTRIBUTOR_ID}
check_path workdir "$WORKDIR"
if is_multi_host "$ACCELERATOR_TYPE"; then
  [[ $WORKDIR == gs://* ]] ||
    usage_error "--workdir '$WORKDIR' must be gs://... on a multi-host slice: checkpoints are written by the workers that hold the variables"
else
  [[ $WORKDIR == gs://* ]] ||
    log "warning: --workdir '$WORKDIR' is on the TPU VM's disk and dies with it: after a preemption the contributor starts over"
fi
case $STRATEGY in
  auto | tpu | mirrored | multi_worker | one_device | default) ;;
  *) usage_error "--strategy '$STRATEGY' must be one of auto, tpu, mirrored, multi_worker, one_device, default" ;;
esac
case $BODY/$BACKEND in
  transformers_tf/tensorflow | keras_hub/jax) ;;
  keras_hub/tensorflow) usage_error "--body=keras_hub runs on TPUs with --backend=jax (TensorFlow TPUs take --body=transformers_tf)" ;;
  transformers_tf/jax) usage_error "--backend=jax goes with --body=keras_hub (the transformers_tf body is TensorFlow only)" ;;
  *) usage_error "--body '$BODY' must be transformers_tf or keras_hub, --backend '$BACKEND' tensorflow or jax" ;;
esac
if [[ $BACKEND == jax ]]; then
  is_multi_host "$ACCELERATOR_TYPE" &&
    usage_error "--backend=jax trains on one host; $ACCELERATOR_TYPE is a multi-host slice (take a single-host type such as v4-8, v5litepod-8, v5p-8 or v6e-8)"
  [[ -z $LIBTPU_VERSION ]] || usage_error "--libtpu-version is TensorFlow's; jax[tpu] brings its own libtpu"
fi
((SPOT && RESERVED)) && usage_error "--spot and --reserved exclude each other"
((INTERNAL_IP && TUNNEL_THROUGH_IAP)) && usage_error "--internal-ip and --tunnel-through-iap exclude each other"
[[ -z $VALID_UNTIL_DURATION ]] || check_word valid-until-duration "$VALID_UNTIL_DURATION"
check_uint retries "$RETRIES"
RETRIES=$((10#$RETRIES))
case $POD_SERVER in
  auto | check | repoint) ;;
  *) usage_error "--pod-server '$POD_SERVER' must be auto, check or repoint" ;;
esac
[[ $POD_SERVER == auto ]] || is_multi_host "$ACCELERATOR_TYPE" ||
  usage_error "--pod-server goes with a multi-host --accelerator-type (a single host runs no TPU server)"
check_uint wait-timeout "$WAIT_TIMEOUT"
check_seconds poll-interval "$POLL_INTERVAL"
check_path remote-python "$REMOTE_PYTHON"
[[ -z $LIBTPU_VERSION || $LIBTPU_VERSION =~ ^[0-9][0-9a-z.]*$ ]] || usage_error "--libtpu-version '$LIBTPU_VERSION' is not a version"
((CHECK_ONLY)) && exit 0

TF_VERSION=$(pinned_version tensorflow)
GENERATION=$(tpu_generation "$ACCELERATOR_TYPE")
GCLOUD_WHERE=("--project=$PROJECT" "--zone=$ZONE")
ROUTE=()
((INTERNAL_IP)) && ROUTE+=(--internal-ip)
((TUNNEL_THROUGH_IAP)) && ROUTE+=(--tunnel-through-iap)
REMOTE_DIR=cold_fusion_tf         # on every worker, relative to the login user's home
REMOTE_VENV=cf-venv
PID_FILE=cf-train.pid             # in the home directory, next to REMOTE_DIR
UPLOAD=${TMPDIR:-/tmp}/cold-fusion-launch-$NAME/cold_fusion_tf.tar.gz

# ---------------------------------------------------------------------------------------------
# 0. Preflight.

if ((PREFLIGHT)); then
  PREFLIGHT_CMD=(bash "$LAUNCH_DIR/preflight.sh" "--project=$PROJECT" "--zone=$ZONE"
    "--accelerator-type=$ACCELERATOR_TYPE" "--store=$STORE" "--scratch=$SCRATCH"
    "--runtime-version=$RUNTIME_VERSION")
  [[ -z $SERVICE_ACCOUNT ]] || PREFLIGHT_CMD+=("--service-account=$SERVICE_ACCOUNT")
  ((SPOT)) && PREFLIGHT_CMD+=(--spot)
  ((DRY_RUN)) && PREFLIGHT_CMD+=(--dry-run)
  log "preflight: $(quote_cmd "${PREFLIGHT_CMD[@]}")"
  "${PREFLIGHT_CMD[@]}" || die "preflight found problems (above); nothing was created"
fi

# ---------------------------------------------------------------------------------------------
# 1. The runtime version, from what the zone offers.

mapfile -t CANDIDATES < <(runtime_candidates "$ACCELERATOR_TYPE" "$TF_VERSION")
# JAX brings its own libtpu: the generation's base image (Google's JAX runtime image) only.
[[ $BACKEND == tensorflow ]] || CANDIDATES=("$(tf_base_runtime "$GENERATION")")
LIST_VERSIONS=(gcloud compute tpus tpu-vm versions list "${GCLOUD_WHERE[@]}" "--format=value(version)")
AVAILABLE=
run_capture AVAILABLE "${LIST_VERSIONS[@]}" ||
  die "cannot list the TPU runtime versions of $ZONE (is tpu.googleapis.com enabled in $PROJECT? launch/preflight.sh checks)"
mapfile -t AVAILABLE_LIST < <(printf '%s\n' "$AVAILABLE" | sed '/^$/d')
if ((DRY_RUN)); then
  if [[ $RUNTIME_VERSION == auto ]]; then
    # Shown: the base image, which the Cloud TPU documentation lists; a TensorFlow image of the
    # pinned version is taken instead where the zone offers one.
    RUNTIME_VERSION=${CANDIDATES[-1]}
    log "dry run: the runtime version is the first of ${CANDIDATES[*]} that the list above offers; shown: $RUNTIME_VERSION"
  fi
elif [[ $RUNTIME_VERSION == auto && $BACKEND == jax ]]; then
  in_list "${CANDIDATES[0]}" "${AVAILABLE_LIST[@]}" ||
    die "$ZONE does not offer ${CANDIDATES[0]}, the JAX runtime image of $GENERATION. Offered there: ${AVAILABLE_LIST[*]:-none}. Pass --runtime-version=V."
  RUNTIME_VERSION=${CANDIDATES[0]}
  log "runtime version: $RUNTIME_VERSION"
elif [[ $RUNTIME_VERSION == auto ]]; then
  RUNTIME_VERSION=$(pick_runtime_version "$ACCELERATOR_TYPE" "$TF_VERSION" "${AVAILABLE_LIST[@]}") ||
    die "no runtime version in $ZONE fits TensorFlow $TF_VERSION on $GENERATION (wanted one of: ${CANDIDATES[*]}). Offered there: ${AVAILABLE_LIST[*]:-none}. Pass --runtime-version=V (see BUILD.md)."
  log "runtime version: $RUNTIME_VERSION"
elif ! in_list "$RUNTIME_VERSION" "${AVAILABLE_LIST[@]}"; then
  die "--runtime-version '$RUNTIME_VERSION' is not offered in $ZONE. Offered there: ${AVAILABLE_LIST[*]:-none}"
fi
if is_multi_host "$ACCELERATOR_TYPE" && [[ $POD_SERVER == auto ]]; then
  if [[ $(runtime_tf_version "$RUNTIME_VERSION") == "$TF_VERSION" ]]; then
    POD_SERVER=check
  else
    POD_SERVER=repoint
  fi
fi

# ---------------------------------------------------------------------------------------------
# Delete the queued resource (with its TPU VMs) whenever the script ends from here on.

DELETE=(gcloud compute tpus queued-resources delete "$NAME" "${GCLOUD_WHERE[@]}" --force --quiet)
DESCRIBE=(gcloud compute tpus queued-resources describe "$NAME" "${GCLOUD_WHERE[@]}" "--format=value(state.state)")
CREATED=0
cleanup() {
  local rc=$?
  # The delete must not be cut short: Ctrl-C is ignored from here on.
  trap '' INT TERM
  trap - EXIT
  [[ -z ${UPLOAD_DIR_MADE:-} ]] || rm -rf "$(dirname "$UPLOAD")"
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
# The steps.

# Waits in the background so that a TERM/INT trap fires at once.
pause() {
  sleep "$1" &
  CHILD_PID=$!
  wait "$CHILD_PID"
  CHILD_PID=
}

# qr_state: the queued resource's state now ("" when it cannot be read, e.g. deleted).
qr_state() {
  print_cmd "${DESCRIBE[@]}" >&2
  "${DESCRIBE[@]}" 2>/dev/null || true
}

# fail_with RC MESSAGE: ends the script with status RC (the EXIT trap cleans up).
fail_with() {
  echo "$PROG: error: $2" >&2
  exit "$1"
}

# 2. Ask for the TPU and wait until it is ACTIVE. Returns 0 when ACTIVE, 1 when the resource was
# lost on the way (suspended, i.e. preempted); a request that cannot be met ends the script.
create_and_wait() {
  local create=(gcloud compute tpus queued-resources create "$NAME" "--node-id=$NAME" "${GCLOUD_WHERE[@]}"
    "--accelerator-type=$ACCELERATOR_TYPE" "--runtime-version=$RUNTIME_VERSION")
  local deadline last='' state
  [[ -z $SERVICE_ACCOUNT ]] || create+=("--service-account=$SERVICE_ACCOUNT" "--scopes=$SCOPES")
  ((SPOT)) && create+=(--spot)
  ((RESERVED)) && create+=(--reserved)
  [[ -z $VALID_UNTIL_DURATION ]] || create+=("--valid-until-duration=$VALID_UNTIL_DURATION")
  log "requesting $ACCELERATOR_TYPE in $ZONE as $NAME (runtime $RUNTIME_VERSION)"
  CREATED=1
  # (This runs as a condition, where set -e does not apply: every failure is handled here.)
  run "${create[@]}" || die "could not create queued resource $NAME (the error is above)"
  print_cmd "${DESCRIBE[@]}"
  ((DRY_RUN)) && return 0
  deadline=$((SECONDS + WAIT_TIMEOUT))
  while true; do
    # A failed read (say a passing API error) counts as no state; the deadline bounds the wait.
    state=$("${DESCRIBE[@]}") || state=
    if [[ $state != "$last" ]]; then
      log "queued resource $NAME: ${state:-<no state>}"
      last=$state
    fi
    case $state in
      ACTIVE) return 0 ;;
      SUSPENDING | SUSPENDED) return 1 ;;
      FAILED | DELETING) die "queued resource $NAME is $state (gcloud compute tpus queued-resources describe $NAME --zone=$ZONE tells why: often no quota or capacity for $ACCELERATOR_TYPE in $ZONE)" ;;
    esac
    ((SECONDS < deadline)) || die "queued resource $NAME is not ACTIVE after $WAIT_TIMEOUT s (state: $state)"
    pause "$POLL_INTERVAL"
  done
}

# 3. Copy this checkout to every worker and install it there. Returns the ssh status.
install_on_workers() {
  local install args=(--accelerator=tpu "--venv=$REMOTE_VENV" "--python=$REMOTE_PYTHON")
  [[ $BACKEND == tensorflow ]] || args+=("--backend=$BACKEND")
  # (This runs as a condition, where set -e does not apply: every failure returns.)
  run mkdir -p "$(dirname "$UPLOAD")" || return
  ((DRY_RUN)) || UPLOAD_DIR_MADE=1
  run tar --exclude=./.git --exclude=./.venv --exclude=./stores --exclude=./workdir \
    --exclude=./launch_logs --exclude=__pycache__ --exclude=.pytest_cache \
    -czf "$UPLOAD" -C "$REPO_ROOT" . || return
  run_waitable gcloud compute tpus queued-resources scp "$UPLOAD" "$NAME:$REMOTE_DIR.tar.gz" --worker=all \
    "${GCLOUD_WHERE[@]}" --quiet "${ROUTE[@]}" || return
  run rm -rf "$(dirname "$UPLOAD")" || return
  UPLOAD_DIR_MADE=
  [[ -z $LIBTPU_VERSION ]] || args+=("--libtpu-version=$LIBTPU_VERSION")
  is_multi_host "$ACCELERATOR_TYPE" && args+=("--pod-server=$POD_SERVER")
  [[ $WORKDIR != gs://* ]] || args+=("--check-workdir=$WORKDIR")
  install="rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -xzf $REMOTE_DIR.tar.gz -C $REMOTE_DIR"
  install+=" && $(quote_cmd bash "$REMOTE_DIR/launch/install.sh" "${args[@]}")"
  run_waitable gcloud compute tpus queued-resources ssh "$NAME" --worker=all "${GCLOUD_WHERE[@]}" --quiet \
    "${ROUTE[@]}" "--command=$install"
}

# The grpc:// endpoints of every worker of a multi-host slice, worker 0 first, in ENDPOINTS.
ENDPOINTS=
read_endpoints() {
  local lines line ip port list=()
  run_capture lines gcloud compute tpus tpu-vm describe "$NAME" "${GCLOUD_WHERE[@]}" \
    "--flatten=networkEndpoints[]" "--format=csv[no-heading](networkEndpoints.ipAddress,networkEndpoints.port)" ||
    return
  if ((DRY_RUN)); then
    ENDPOINTS=grpc://WORKER0_IP:8470,grpc://WORKER1_IP:8470
    log "dry run: the workers' endpoints come from that command at run time; shown: $ENDPOINTS"
    return 0
  fi
  while IFS=, read -r ip port; do
    [[ -n $ip ]] || continue
    [[ $ip =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}$ ]] || die "worker address '$ip' of $NAME is not an IPv4 address"
    port=${port:-8470}
    [[ $port =~ ^[0-9]{1,5}$ ]] || die "worker port '$port' of $NAME is not a port"
    list+=("grpc://$ip:$port")
  done <<<"$lines"
  ((${#list[@]} > 1)) ||
    die "$NAME lists ${#list[@]} worker endpoint(s); a multi-host $ACCELERATOR_TYPE has several"
  ENDPOINTS=$(IFS=,; echo "${list[*]}")
  log "workers of $NAME: $ENDPOINTS"
}

# 4. Train, streaming the output here. Returns the ssh status.
train() {
  local runner workers flags=("--config=$CONFIG" "--store=$STORE" "--workdir=$WORKDIR"
    "--config.task=$DATASET" "--config.contributor_id=$CONTRIBUTOR_ID" "--config.strategy=$STRATEGY")
  if [[ $BACKEND == jax ]]; then
    # Keras 3 on JAX, which opens the host's chips itself (one host: checked above).
    workers=all
    runner=(bash launch/tpu_run.sh --mode=jax "--pid-file=../$PID_FILE" --)
    flags+=(--config.model.body=keras_hub --config.model.backend=jax)
  elif is_multi_host "$ACCELERATOR_TYPE"; then
    # TensorFlow drives a multi-host slice from one client: worker 0 connects to the TPU servers
    # of all workers; it must not open its local TPU itself.
    workers=0
    runner=(bash launch/tpu_run.sh --mode=pod-client "--endpoints=$ENDPOINTS" "--pid-file=../$PID_FILE" --)
    flags+=("--config.tpu=$ENDPOINTS")
  else
    workers=all
    runner=(bash launch/tpu_run.sh --mode=pjrt "--pid-file=../$PID_FILE" --)
    flags+=(--config.tpu=local)
  fi
  flags+=("${EXTRA_ARGS[@]}")
  log "training contributor $CONTRIBUTOR_ID on dataset $DATASET (store $STORE, workdir $WORKDIR)"
  run_waitable gcloud compute tpus queued-resources ssh "$NAME" "--worker=$workers" "${GCLOUD_WHERE[@]}" --quiet \
    "${ROUTE[@]}" "--command=cd $REMOTE_DIR && . ../$REMOTE_VENV/bin/activate && $(quote_cmd "${runner[@]}" "${flags[@]}")"
}

# After a failure: another attempt if the slice was lost or the connection dropped (and retries
# are left), else the end. WHAT names the failed step, RC its status.
RETRIES_USED=0
NEXT=
after_failure() {
  local what=$1 rc=$2 state
  state=$(qr_state)
  if [[ $state == ACTIVE && $rc != 255 ]]; then
    fail_with "$rc" "$what failed with status $rc on $NAME (the slice is up: not a preemption, so no retry)"
  fi
  ((RETRIES_USED < RETRIES)) ||
    fail_with "$rc" "$what failed (status $rc, queued resource ${state:-gone}) and all $RETRIES retries are used"
  RETRIES_USED=$((RETRIES_USED + 1))
  if [[ $state == ACTIVE ]]; then
    log "$what: the ssh connection dropped (status 255); trying again ($RETRIES_USED of $RETRIES)"
    NEXT=$3
  else
    log "$what: queued resource $NAME is ${state:-gone} (preempted?); re-creating it ($RETRIES_USED of $RETRIES); the contributor resumes from its checkpoint in $WORKDIR"
    run "${DELETE[@]}" || log "delete of $NAME failed; trying to create it again anyway"
    CREATED=0
    NEXT=create
  fi
}

NEXT=create
while true; do
  rc=0
  case $NEXT in
    create)
      if create_and_wait; then NEXT=install; else after_failure "waiting for $NAME" 1 create; fi
      ;;
    install)
      install_on_workers || rc=$?
      if ((rc == 0)); then NEXT=endpoints; else after_failure "installing on $NAME" "$rc" install; fi
      ;;
    endpoints)
      NEXT=train
      if is_multi_host "$ACCELERATOR_TYPE"; then
        read_endpoints || after_failure "reading the workers of $NAME" 1 endpoints
      fi
      ;;
    train)
      train || rc=$?
      ((rc == 0)) && break
      after_failure "training" "$rc" train
      ;;
  esac
done
log "contributor $CONTRIBUTOR_ID finished"
# 6. The EXIT trap deletes the queued resource.
