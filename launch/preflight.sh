#!/usr/bin/env bash
# Checks a Google Cloud project before a contributor creates anything on Cloud TPU, and prints
# what to fix.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $PROG --project=ID --zone=ZONE --accelerator-type=TYPE --store=gs://BUCKET/RUN
          [--service-account=EMAIL] [--scratch=gs://...] [--runtime-version=V] [--spot|--reserved]
          [--gke] [--dry-run]

Asks gcloud, without creating or changing anything:
  1. the project exists and is ACTIVE            gcloud projects describe
  2. the APIs are enabled                        gcloud services list --enabled
     (tpu.googleapis.com, compute.googleapis.com; with --gke container.googleapis.com)
  3. the zone offers Cloud TPUs, and this type    gcloud compute tpus locations list,
                                                 gcloud compute tpus accelerator-types list
  4. a runtime version fits (as tpu_contributor.sh picks it, or --runtime-version exists)
                                                 gcloud compute tpus tpu-vm versions list
  5. quota for the type in the zone (spot quota with --spot; none needed with --reserved)
                                                 gcloud beta quotas info list --service=tpu.googleapis.com
  6. the service account exists and can read the store, create contributions and write,
     overwrite and delete under the scratch prefix (bucket and project IAM policies)
                                                 gcloud iam service-accounts describe,
                                                 gcloud storage buckets get-iam-policy,
                                                 gcloud projects get-iam-policy
Every problem is printed with the command that fixes it; the exit status is 1 if there is one,
0 otherwise (warnings, such as a quota that cannot be read, do not count).

Required:
  --project=ID --zone=ZONE --accelerator-type=TYPE --store=gs://BUCKET/RUN  (as tpu_contributor.sh)

Optional:
  --service-account=EMAIL   the TPU VMs' service account (see tpu_contributor.sh)
  --scratch=gs://...        the workdirs' prefix (default: <store>/scratch)
  --runtime-version=V       a runtime version to check instead of the automatic choice (auto)
  --spot | --reserved       the capacity the contributor will ask for
  --gke                     also check the Kubernetes Engine API
  --dry-run                 print the commands ("+ ..." lines) and run none
  --help                    this text

Example:
  $PROG --project=my-proj --zone=us-west4-a --accelerator-type=v5litepod-8 \\
      --store=gs://my-bucket/cf-run --service-account=cf-contributor@my-proj.iam.gserviceaccount.com
EOF
}

PROJECT=
ZONE=
ACCELERATOR_TYPE=
STORE=
SERVICE_ACCOUNT=
SCRATCH=
RUNTIME_VERSION=auto
SPOT=0
RESERVED=0
GKE=0
VALUE_FLAGS=(project zone accelerator-type store service-account scratch runtime-version)
BOOL_FLAGS=(spot reserved gke dry-run)
parse_flags "$@"
((${#EXTRA_ARGS[@]} == 0)) || usage_error "takes no arguments after --"

require project "$PROJECT" "Google Cloud project id"
require zone "$ZONE" "zone of the TPU, e.g. us-central2-b"
require accelerator-type "$ACCELERATOR_TYPE" "TPU type, e.g. v5litepod-8"
require store "$STORE" "gs://bucket/prefix of the ColD Fusion store"
check_project "$PROJECT"
check_zone "$ZONE"
check_accelerator_type "$ACCELERATOR_TYPE"
check_tpu_generation "$ACCELERATOR_TYPE"
check_gcs_store "$STORE"
[[ -z $SERVICE_ACCOUNT ]] || check_service_account_email service-account "$SERVICE_ACCOUNT"
SCRATCH=${SCRATCH:-$STORE/scratch}
check_gcs_uri scratch "${SCRATCH%/}"
SCRATCH=${SCRATCH%/}
[[ $RUNTIME_VERSION == auto ]] || check_word runtime-version "$RUNTIME_VERSION"
((SPOT && RESERVED)) && usage_error "--spot and --reserved exclude each other"

TF_VERSION=$(pinned_version tensorflow)
GENERATION=$(tpu_generation "$ACCELERATOR_TYPE")
BUCKET=${STORE#gs://}
BUCKET=${BUCKET%%/*}
RUN=${STORE#gs://"$BUCKET"}
RUN=${RUN#/}
SCRATCH_PREFIX=${SCRATCH#gs://"$BUCKET"/}
[[ $SCRATCH == gs://"$BUCKET"/* ]] || SCRATCH_PREFIX=

PROBLEMS=0
problem() {
  PROBLEMS=$((PROBLEMS + 1))
  echo "PROBLEM: $1" >&2
  shift
  local fix
  for fix in "$@"; do
    echo "  fix: $fix" >&2
  done
}
ok() {
  echo "ok: $*" >&2
}
warn() {
  echo "warning: $*" >&2
}

# ---------------------------------------------------------------------------------------------
# 1. The project.

out=
if run_capture out gcloud projects describe "$PROJECT" "--format=value(lifecycleState)"; then
  if ((!DRY_RUN)); then
    if [[ $out == ACTIVE ]]; then
      ok "project $PROJECT is ACTIVE"
    else
      problem "project $PROJECT is '${out:-unknown}', not ACTIVE" "gcloud projects undelete $PROJECT   (or use another --project)"
    fi
  fi
else
  problem "cannot read project $PROJECT (does it exist, and may you see it?)" "gcloud auth login; gcloud projects list"
fi

# ---------------------------------------------------------------------------------------------
# 2. The APIs.

APIS=(tpu.googleapis.com compute.googleapis.com)
((GKE)) && APIS+=(container.googleapis.com)
if run_capture out gcloud services list --enabled "--project=$PROJECT" "--format=value(config.name)"; then
  if ((!DRY_RUN)); then
    mapfile -t ENABLED <<<"$out"
    MISSING=()
    for api in "${APIS[@]}"; do
      in_list "$api" "${ENABLED[@]}" || MISSING+=("$api")
    done
    if ((${#MISSING[@]})); then
      problem "APIs not enabled in $PROJECT: ${MISSING[*]}" "$(quote_cmd gcloud services enable "${MISSING[@]}" "--project=$PROJECT")"
    else
      ok "APIs enabled: ${APIS[*]}"
    fi
  fi
else
  problem "cannot list the enabled APIs of $PROJECT" "$(quote_cmd gcloud services enable "${APIS[@]}" "--project=$PROJECT")"
fi

# ---------------------------------------------------------------------------------------------
# 3. The zone and the accelerator type.

if run_capture out gcloud compute tpus locations list "--project=$PROJECT" "--format=value(locationId)"; then
  if ((!DRY_RUN)); then
    mapfile -t ZONES <<<"$out"
    if in_list "$ZONE" "${ZONES[@]}"; then
      ok "Cloud TPU zone $ZONE"
    else
      problem "$ZONE is not a Cloud TPU zone of $PROJECT; TPU zones: ${ZONES[*]}" "choose --zone from that list (BUILD.md lists which generation is in which zone)"
    fi
  fi
else
  problem "cannot list the Cloud TPU zones (is tpu.googleapis.com enabled?)" "$(quote_cmd gcloud services enable tpu.googleapis.com "--project=$PROJECT")"
fi
if run_capture out gcloud compute tpus accelerator-types list "--project=$PROJECT" "--zone=$ZONE" "--format=value(type)"; then
  if ((!DRY_RUN)); then
    mapfile -t TYPES <<<"$out"
    if in_list "$ACCELERATOR_TYPE" "${TYPES[@]}"; then
      ok "$ACCELERATOR_TYPE is offered in $ZONE"
    else
      problem "$ACCELERATOR_TYPE is not offered in $ZONE; offered there: ${TYPES[*]:-none}" "choose --accelerator-type from that list or another --zone"
    fi
  fi
else
  problem "cannot list the accelerator types of $ZONE" "check --zone and the TPU API (above)"
fi

# ---------------------------------------------------------------------------------------------
# 4. The runtime version.

mapfile -t CANDIDATES < <(runtime_candidates "$ACCELERATOR_TYPE" "$TF_VERSION")
if run_capture out gcloud compute tpus tpu-vm versions list "--project=$PROJECT" "--zone=$ZONE" "--format=value(version)"; then
  if ((!DRY_RUN)); then
    mapfile -t AVAILABLE < <(printf '%s\n' "$out" | sed '/^$/d')
    if [[ $RUNTIME_VERSION == auto ]]; then
      if picked=$(pick_runtime_version "$ACCELERATOR_TYPE" "$TF_VERSION" "${AVAILABLE[@]}"); then
        ok "runtime version $picked (the first offered of: ${CANDIDATES[*]})"
      else
        problem "no runtime version in $ZONE fits TensorFlow $TF_VERSION on $GENERATION (wanted one of: ${CANDIDATES[*]}); offered: ${AVAILABLE[*]:-none}" \
          "pass --runtime-version=V to tpu_contributor.sh (see BUILD.md, Cloud TPU VM)"
      fi
    elif in_list "$RUNTIME_VERSION" "${AVAILABLE[@]}"; then
      ok "runtime version $RUNTIME_VERSION is offered in $ZONE"
    else
      problem "runtime version $RUNTIME_VERSION is not offered in $ZONE; offered: ${AVAILABLE[*]:-none}" "choose --runtime-version from that list"
    fi
  fi
else
  problem "cannot list the runtime versions of $ZONE" "check --zone and the TPU API (above)"
fi

# ---------------------------------------------------------------------------------------------
# 5. Quota. Cloud TPU quotas are per zone, per generation, and separate for spot (preemptible);
# v4 and v5p count TensorCores, v5e and v6e chips - in both cases the number in the type.

case $GENERATION in
  v4) QUOTA_RE='^TPUV4Pod(Preemptible)?PerProjectPerZoneForTPUAPI$' ;;
  v5e) QUOTA_RE='^TPUV5s(Preemptible)?LitepodPerProjectPerZoneForTPUAPI$' ;;
  v5p) QUOTA_RE='^TPUV5P(Preemptible)?PerProjectPerZoneForTPUAPI$' ;;
  v6e) QUOTA_RE='^TPUV6E(Preemptible)?PerProjectPerZoneForTPUAPI$' ;;
  *) QUOTA_RE= ;;
esac
NEEDED=$((10#${ACCELERATOR_TYPE##*-}))
if ((RESERVED)); then
  ok "--reserved: the reservation's capacity is used, not quota"
elif [[ -z $QUOTA_RE ]]; then
  warn "quota of $GENERATION is not checked; see the Cloud TPU quotas page of the console"
elif run_capture out gcloud beta quotas info list --service=tpu.googleapis.com "--project=$PROJECT" \
  "--flatten=dimensionsInfos" \
  "--format=csv[no-heading](quotaId,dimensionsInfos.dimensions.zone,dimensionsInfos.details.value)"; then
  if ((!DRY_RUN)); then
    kind=on-demand
    ((SPOT)) && kind=spot
    zone_value=
    default_value=
    quota_id=
    while IFS=, read -r id zone value; do
      [[ $id =~ $QUOTA_RE ]] || continue
      if ((SPOT)); then [[ $id == *Preemptible* ]] || continue; else [[ $id != *Preemptible* ]] || continue; fi
      quota_id=$id
      if [[ $zone == "$ZONE" ]]; then
        zone_value=$value
      elif [[ -z $zone ]]; then
        default_value=$value
      fi
    done <<<"$out"
    value=${zone_value:-$default_value}
    if [[ -z $quota_id ]]; then
      warn "no $kind quota of $GENERATION found among the TPU quotas; check the console (IAM & Admin > Quotas, service tpu.googleapis.com)"
    elif [[ ! $value =~ ^[0-9]+$ ]]; then
      warn "$quota_id has no readable value for $ZONE ('$value')"
    elif ((value >= NEEDED)); then
      ok "$kind quota $quota_id in $ZONE: $value (needs $NEEDED)"
    else
      problem "$kind quota $quota_id in $ZONE is $value; $ACCELERATOR_TYPE needs $NEEDED" \
        "request more in the console (IAM & Admin > Quotas: service tpu.googleapis.com, $quota_id, $ZONE), or use --spot / another zone"
    fi
  fi
else
  warn "cannot read the TPU quotas (needs the Cloud Quotas API and gcloud beta: gcloud services enable cloudquotas.googleapis.com --project=$PROJECT; gcloud components install beta); check them in the console"
fi

# ---------------------------------------------------------------------------------------------
# 6. The service account and its access to the bucket.

# roles_of POLICY_CSV: the "role,condition" lines of the service account in a flattened policy.
roles_of() {
  local role member condition
  while IFS=, read -r role member condition; do
    if [[ $member == "serviceAccount:$SERVICE_ACCOUNT" ]]; then
      echo "$role,$condition"
    fi
  done <<<"$1"
}
# has_role GRANTS CONDITION_PREFIX ROLE...: whether GRANTS hold one of ROLE, unconditionally or
# with a condition that names CONDITION_PREFIX (empty: unconditional only).
has_role() {
  local grants=$1 prefix=$2 line role condition
  shift 2
  while IFS= read -r line; do
    [[ -n $line ]] || continue
    role=${line%%,*}
    condition=${line#*,}
    in_list "$role" "$@" || continue
    [[ -z $condition || (-n $prefix && $condition == *"$prefix"*) ]] && return 0
  done <<<"$grants"
  return 1
}

if [[ -z $SERVICE_ACCOUNT ]]; then
  warn "no --service-account: the TPU VMs would run as the Compute Engine default service account, which the grants in BUILD.md do not cover"
else
  if run_capture out gcloud iam service-accounts describe "$SERVICE_ACCOUNT" "--format=value(disabled)"; then
    if ((!DRY_RUN)); then
      if [[ ${out,,} == true ]]; then
        problem "service account $SERVICE_ACCOUNT is disabled" "$(quote_cmd gcloud iam service-accounts enable "$SERVICE_ACCOUNT")"
      else
        ok "service account $SERVICE_ACCOUNT"
      fi
    fi
  else
    problem "service account $SERVICE_ACCOUNT does not exist or cannot be read" \
      "$(quote_cmd gcloud iam service-accounts create "${SERVICE_ACCOUNT%%@*}" "--project=$PROJECT")"
  fi
  POLICY_FORMAT="--format=csv[no-heading](bindings.role,bindings.members,bindings.condition.expression)"
  grants=
  readable=1
  if run_capture out gcloud storage buckets get-iam-policy "gs://$BUCKET" "--flatten=bindings[].members" "$POLICY_FORMAT"; then
    grants+=$(roles_of "$out")$'\n'
  else
    readable=0
    warn "cannot read the IAM policy of gs://$BUCKET (needs storage.buckets.getIamPolicy); bucket access is not checked"
  fi
  if run_capture out gcloud projects get-iam-policy "$PROJECT" "--flatten=bindings[].members" "$POLICY_FORMAT"; then
    grants+=$(roles_of "$out")$'\n'
  else
    warn "cannot read the IAM policy of $PROJECT; project-wide storage roles are not checked"
  fi
  if ((!DRY_RUN && readable)); then
    member="serviceAccount:$SERVICE_ACCOUNT"
    ADMIN_ROLES=(roles/storage.admin roles/storage.objectAdmin)
    if has_role "$grants" "" roles/storage.objectViewer roles/storage.objectUser "${ADMIN_ROLES[@]}"; then
      ok "$SERVICE_ACCOUNT can read gs://$BUCKET"
    else
      problem "$SERVICE_ACCOUNT cannot read gs://$BUCKET (run.json, LATEST, bases/)" \
        "$(quote_cmd gcloud storage buckets add-iam-policy-binding "gs://$BUCKET" "--member=$member" --role=roles/storage.objectViewer)"
    fi
    if has_role "$grants" "$RUN/contributions/" roles/storage.objectCreator roles/storage.objectUser "${ADMIN_ROLES[@]}"; then
      ok "$SERVICE_ACCOUNT can create objects under $STORE/contributions/"
    else
      problem "$SERVICE_ACCOUNT cannot create objects under $STORE/contributions/" \
        "$(quote_cmd gcloud storage buckets add-iam-policy-binding "gs://$BUCKET" "--member=$member" --role=roles/storage.objectCreator \
          "--condition=expression=resource.name.startsWith(\"projects/_/buckets/$BUCKET/objects/$RUN/contributions/\"),title=cf-contributions-only")"
    fi
    if [[ -z $SCRATCH_PREFIX ]]; then
      warn "the scratch prefix $SCRATCH is in another bucket than the store; its access is not checked"
    elif has_role "$grants" "$SCRATCH_PREFIX/" roles/storage.objectUser "${ADMIN_ROLES[@]}"; then
      ok "$SERVICE_ACCOUNT can write, overwrite and delete under $SCRATCH/"
    else
      problem "$SERVICE_ACCOUNT cannot write, overwrite and delete under $SCRATCH/ (checkpoints need roles/storage.objectUser)" \
        "$(quote_cmd gcloud storage buckets add-iam-policy-binding "gs://$BUCKET" "--member=$member" --role=roles/storage.objectUser \
          "--condition=expression=resource.name.startsWith(\"projects/_/buckets/$BUCKET/objects/$SCRATCH_PREFIX/\"),title=cf-scratch")"
    fi
    echo "  (grants through groups, folders or the organization are not seen here)" >&2
  fi
fi

((DRY_RUN)) && exit 0
if ((PROBLEMS)); then
  echo "$PROG: $PROBLEMS problem(s); fix them and run $PROG again" >&2
  exit 1
fi
echo "$PROG: no problems found" >&2
