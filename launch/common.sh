# shellcheck shell=bash
# Shared helpers for the launch/ scripts. Source it; do not run it.
#
# Conventions every script follows:
# - Settings are flags, given as --name=value or --name value; --help prints usage and exits 0.
# - A missing or malformed setting exits 2 with a message naming the flag.
# - Every external command (gcloud, kubectl, python, pip, tar) goes through `run`, which prints
#   it first as one line "+ cmd arg ..." (each word shell-quoted like printf %q does, so the line
#   can be pasted back into bash) and executes it unless --dry-run (DRY_RUN=1) was given.
# - Messages for people go to stderr; stdout carries only the "+ " command lines (and what the
#   commands themselves print), so tests and humans can read the plan from it.

set -euo pipefail

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$LAUNCH_DIR")
PROG=$(basename "$0")
CALLER_DIR=$PWD
DRY_RUN=${DRY_RUN:-0}

# Where pip finds the libtpu wheels that tensorflow-tpu depends on (the index Google's
# TensorFlow-on-TPU CI installs tensorflow-tpu from).
# shellcheck disable=SC2034  # used by the scripts that source this file
LIBTPU_TF_INDEX=https://storage.googleapis.com/libtpu-tf-releases/index.html

# libtpu for tensorflow-tpu 2.20.0. The wheel only asks for libtpu~=0.0.14, so pip would take
# the newest 0.0.x, released long after TensorFlow 2.20 and never tested with it. 0.0.20 is the
# newest libtpu published before the tensorflow-tpu 2.20.0 wheel was built (libtpu 0.0.20 built
# 2025-08-01, tensorflow-tpu 2.20.0 built 2025-08-07). --libtpu-version overrides it.
# shellcheck disable=SC2034
DEFAULT_LIBTPU_VERSION=0.0.20

# TPU VM images ship Python 3.10; the pinned requirements need 3.11 (numpy, keras, keras-hub,
# matplotlib). install.sh --python=uv installs this CPython with uv, itself pinned here.
# shellcheck disable=SC2034
VENV_PYTHON_VERSION=3.11
# shellcheck disable=SC2034
UV_VERSION=0.13.8

# The TensorFlow TPU server that tpu-runtime.service runs on every worker of a multi-host TPU VM
# slice; install.sh --pod-server=repoint points it at the tag of the pinned TensorFlow, as Google's
# TensorFlow-on-TPU CI does (ml-auto-solutions, solutions_team/configs/tensorflow/common.py).
# shellcheck disable=SC2034
TPU_SERVER_IMAGE=gcr.io/cloud-tpu-v2-images/grpc_tpu_worker

# ---------------------------------------------------------------------------------------------
# Messages and exits.

log() {
  echo "[$PROG] $*" >&2
}

die() {
  echo "$PROG: error: $*" >&2
  exit 1
}

usage_error() {
  echo "$PROG: $*" >&2
  echo "Run '$PROG --help' for the list of settings." >&2
  exit 2
}

# ---------------------------------------------------------------------------------------------
# Flag parsing.
#
# A script declares, before calling parse_flags "$@":
#   VALUE_FLAGS=(zone project ...)   flags that take a value; --zone sets the variable ZONE
#   BOOL_FLAGS=(dry-run keep ...)    flags without a value; --keep sets KEEP=1
# and gives every such variable its default first (so that `set -u` and shellcheck know it).
# Arguments after a lone "--" are kept in EXTRA_ARGS (passed on to the program being launched).
# --help/-h calls the script's usage function and exits 0.

# shellcheck disable=SC2034  # read by the scripts that source this file
EXTRA_ARGS=()

flag_var() {
  local name=$1
  name=${name//-/_}
  echo "${name^^}"
}

in_list() {
  local needle=$1 item
  shift
  for item in "$@"; do
    [[ $item == "$needle" ]] && return 0
  done
  return 1
}

parse_flags() {
  local arg name value
  while (($#)); do
    arg=$1
    shift
    case $arg in
      -h | --help)
        usage
        exit 0
        ;;
      --)
        # Only config overrides are passed on: a launcher flag put after -- by mistake (say
        # --dry-run) must not be ignored silently. (A wrapper that passes a whole command line
        # on sets ANY_ARGS_AFTER_DASHDASH=1.)
        for value in "$@"; do
          [[ $value != *[[:cntrl:]]* ]] || usage_error "arguments after -- must not hold control characters"
          ((${ANY_ARGS_AFTER_DASHDASH:-0})) || [[ $value =~ ^--config\.[A-Za-z0-9_.]+=[^[:cntrl:]]*$ ]] ||
            usage_error "after --, only --config.NAME=VALUE overrides are allowed (got '$value')"
        done
        # shellcheck disable=SC2034
        EXTRA_ARGS=("$@")
        break
        ;;
      --*=*)
        name=${arg%%=*}
        name=${name#--}
        value=${arg#*=}
        if in_list "$name" "${VALUE_FLAGS[@]}"; then
          printf -v "$(flag_var "$name")" '%s' "$value"
        elif in_list "$name" "${BOOL_FLAGS[@]}"; then
          usage_error "--$name takes no value (got '$arg')"
        else
          usage_error "unknown flag --$name"
        fi
        ;;
      --*)
        name=${arg#--}
        if in_list "$name" "${BOOL_FLAGS[@]}"; then
          printf -v "$(flag_var "$name")" '%s' 1
        elif in_list "$name" "${VALUE_FLAGS[@]}"; then
          (($#)) && [[ $1 != --* ]] || usage_error "--$name needs a value"
          printf -v "$(flag_var "$name")" '%s' "$1"
          shift
        else
          usage_error "unknown flag --$name"
        fi
        ;;
      *)
        usage_error "unexpected argument '$arg' (settings are flags such as --name=value)"
        ;;
    esac
  done
  [[ $DRY_RUN == 0 || $DRY_RUN == 1 ]] || usage_error "DRY_RUN must be 0 or 1, not '$DRY_RUN'"
}

# require FLAG VALUE WHAT: exits 2 naming the flag when VALUE is empty.
require() {
  local flag=$1 value=$2 what=$3
  [[ -n $value ]] || usage_error "missing required setting --$flag ($what)"
}

# ---------------------------------------------------------------------------------------------
# Validation. Everything that ends up in a resource name, a store path or a remote command line
# is checked here first.

# Same rule as cold_fusion_tf.paths.check_path_part: 1-128 characters from letters, digits,
# '.', '_' and '-', starting with a letter or digit; never '.' or '..'.
check_safe_name() {
  local flag=$1 value=$2
  if [[ ! $value =~ ^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$ || $value == . || $value == .. ]]; then
    usage_error "--$flag '$value' is not a safe name: use 1-128 characters from letters," \
      "digits, '.', '_' and '-', starting with a letter or digit (it becomes part of a store path)"
  fi
}

check_iteration() {
  local value=$1
  [[ $value =~ ^[0-9]{1,6}$ ]] || usage_error "--iteration '$value' must be an integer 0..999999"
}

check_uint() {
  local flag=$1 value=$2
  [[ $value =~ ^[0-9]+$ ]] || usage_error "--$flag '$value' must be a non-negative integer"
}

check_positive() {
  local flag=$1 value=$2
  [[ $value =~ ^[0-9]+$ && $((10#$value)) -gt 0 ]] || usage_error "--$flag '$value' must be a positive integer"
}

check_seconds() {
  local flag=$1 value=$2
  [[ $value =~ ^[0-9]+(\.[0-9]+)?$ && ! $value =~ ^0+(\.0+)?$ ]] || usage_error "--$flag '$value' must be a positive number of seconds"
}

# The contributor: --dataset and --contributor-id (the dataset unless given) as safe names, and
# --config; sets CONTRIBUTOR_ID.
check_contributor() {
  check_safe_name dataset "$DATASET"
  CONTRIBUTOR_ID=${CONTRIBUTOR_ID:-$DATASET}
  check_safe_name contributor-id "$CONTRIBUTOR_ID"
  check_config "$CONFIG"
}

# A contributor on this machine: --workdir (workdir/<contributor id> unless given) and --store
# as seen from the caller's directory, and --python.
check_local_contributor() {
  WORKDIR=${WORKDIR:-workdir/$CONTRIBUTOR_ID}
  check_path workdir "$WORKDIR"
  STORE=$(from_caller "$STORE")
  WORKDIR=$(from_caller "$WORKDIR")
  check_path python "$PYTHON"
  check_config_exists "$CONFIG"
}

# A config is a file under configs/, given relative to the repository root (it is resolved on
# the machine that runs the program, which may be a TPU VM or a container).
check_config() {
  local value=$1
  [[ $value =~ ^configs/[A-Za-z0-9_][A-Za-z0-9_.-]*\.py$ ]] ||
    usage_error "--config '$value' must look like configs/<name>.py (relative to the repository root)"
}

# A config that runs from this checkout (here, or on TPU VMs it is copied to) must be in it.
check_config_exists() {
  local value=$1 names
  [[ -f $REPO_ROOT/$value ]] || {
    names=$(cd "$REPO_ROOT" && echo configs/*.py)
    usage_error "--config '$value' is not a file of this checkout ($REPO_ROOT); the configs are: $names"
  }
}

# Remote machines (TPU VMs, pods) can only reach a store on Cloud Storage.
check_gcs_store() {
  local value=$1
  [[ $value =~ ^gs://[a-z0-9][a-z0-9._-]*[a-z0-9](/[A-Za-z0-9._/-]*)?$ && $value != *..* ]] ||
    usage_error "--store '$value' must be a gs://bucket/prefix URI (machines in the cloud cannot see local folders)"
}

# A local or gs:// store for programs that run on this machine.
check_any_store() {
  local value=$1
  [[ -n $value && $value != *[[:space:]]* && $value != -* ]] ||
    usage_error "--store '$value' must be a directory or a gs://bucket/prefix URI without spaces"
  # gs:/bucket (one slash), GS://, s3:// ... would otherwise be taken as a local folder.
  [[ ! ${value,,} =~ ^(gs:|[a-z][a-z0-9+.-]*:/) || $value == gs://* ]] ||
    usage_error "--store '$value' is neither a local folder nor a gs://bucket/prefix URI (only gs:// is supported)"
  if [[ $value == gs://* ]]; then
    check_gcs_store "$value"
  fi
}

# Any well-formed zone name: us-central2-b, europe-west4-a, and AI zones such as
# us-central1-ai1a. Whether the zone offers TPUs is asked of gcloud (preflight.sh).
check_zone() {
  local value=$1
  [[ $value =~ ^[a-z]+-[a-z]+[0-9]+-[a-z0-9]+$ ]] ||
    usage_error "--zone '$value' does not look like a zone (e.g. us-central2-b, us-central1-ai1a)"
}

# A service account email, e.g. cf-contributor@my-proj.iam.gserviceaccount.com.
check_service_account_email() {
  local flag=$1 value=$2
  [[ $value =~ ^[a-z0-9][a-z0-9.-]*@[a-z0-9][a-z0-9.-]*\.[a-z]+$ ]] ||
    usage_error "--$flag '$value' is not a service account email (NAME@PROJECT.iam.gserviceaccount.com)"
}

# A gs://bucket/prefix URI (for workdirs and scratch prefixes).
check_gcs_uri() {
  local flag=$1 value=$2
  [[ $value =~ ^gs://[a-z0-9][a-z0-9._-]*[a-z0-9](/[A-Za-z0-9._/-]*)?$ && $value != *..* ]] ||
    usage_error "--$flag '$value' must be a gs://bucket/prefix URI"
}

check_project() {
  local value=$1
  [[ $value =~ ^([a-z0-9.-]+:)?[a-z][a-z0-9-]{4,28}[a-z0-9]$ ]] ||
    usage_error "--project '$value' does not look like a project id (6-30 of a-z, 0-9, '-')"
}

check_word() {
  local flag=$1 value=$2
  [[ $value =~ ^[A-Za-z0-9][A-Za-z0-9._:/@=+-]*$ ]] || usage_error "--$flag '$value' has characters that are not allowed"
}

# A file or folder path, or a gs:// URI, given to a program (so: no spaces, no leading '-').
check_path() {
  local flag=$1 value=$2
  [[ $value =~ ^[A-Za-z0-9_./~][A-Za-z0-9_./:@+=~-]*$ ]] ||
    usage_error "--$flag '$value' must be a path or gs:// URI of letters, digits and . _ / : @ + = ~ -"
}

# from_caller PATH: PATH as seen from the directory the script was started in (scripts that cd
# to the repository root use it for local paths the user gave). URIs and absolute paths stay.
from_caller() {
  local path=$1
  if [[ $path == /* || $path == *://* || $CALLER_DIR == "$REPO_ROOT" ]]; then
    echo "$path"
  else
    echo "$CALLER_DIR/$path"
  fi
}

# A Cloud TPU accelerator type: v2-8, v3-32, v4-8, v5p-8, v5litepod-16, v6e-8 ...
check_accelerator_type() {
  local value=$1
  [[ $value =~ ^v[0-9][a-z0-9]*-[0-9]+$ ]] ||
    usage_error "--accelerator-type '$value' does not look like a TPU type (e.g. v5litepod-8, v4-8, v6e-8)"
}

# Splits "a,b,c" into the array named by $2, rejecting empty items and duplicates.
split_list() {
  local flag=$1 value=$3 item
  local -n split_out=$2
  local -A seen=()
  split_out=()
  [[ $value != *, ]] || usage_error "--$flag '$value' has an empty item"
  IFS=, read -r -a split_out <<<"$value"
  ((${#split_out[@]})) || usage_error "--$flag is empty"
  for item in "${split_out[@]}"; do
    [[ -n $item ]] || usage_error "--$flag '$value' has an empty item"
    [[ -z ${seen[$item]:-} ]] || usage_error "--$flag '$value' names '$item' twice"
    seen[$item]=1
  done
}

# ---------------------------------------------------------------------------------------------
# Names and versions.

# A Cloud / Kubernetes resource name from free text: lower case, [a-z0-9-], no leading or
# trailing '-', at most 63 characters (RFC 1035 label).
slug() {
  local s=${1,,}
  s=${s//[^a-z0-9-]/-}
  while [[ $s == *--* ]]; do s=${s//--/-}; done
  s=${s#-}
  s=${s%-}
  s=${s:0:63}
  s=${s%-}
  echo "$s"
}

check_resource_name() {
  local flag=$1 value=$2
  [[ $value =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] ||
    usage_error "--$flag '$value' must be 1-63 characters of a-z, 0-9 and '-', starting with a letter"
}

# pinned_version PACKAGE: the version pinned with == in requirements.txt.
pinned_version() {
  local package=$1 line
  while IFS= read -r line; do
    if [[ $line =~ ^${package}==([^[:space:];#]+) ]]; then
      echo "${BASH_REMATCH[1]}"
      return 0
    fi
  done <"$REPO_ROOT/requirements.txt"
  die "requirements.txt pins no version of $package"
}

# A slice with more than 8 TensorCores/chips in its type spans several TPU VMs (hosts):
# v2-8, v3-8, v4-8, v5p-8, v5litepod-8 and v6e-8 are single hosts; v4-16, v5litepod-16 ... are not.
is_multi_host() {
  local type=$1
  ((10#${type##*-} > 8))
}

# tpu_generation TYPE: the TPU generation of an accelerator type, as the runtime version names
# and Google's TensorFlow-on-TPU CI use them: v2, v3, v4, v5p, v5e (v5litepod-N) or v6e.
tpu_generation() {
  local type=$1
  case ${type%-*} in
    v2 | v3 | v4 | v5p | v6e) echo "${type%-*}" ;;
    v5litepod) echo v5e ;;
    *) return 1 ;;
  esac
}

# check_tpu_generation TYPE: exits 2 for a generation the TensorFlow path cannot use, and warns
# for the ones it does not target (see BUILD.md: v4, v5e and v5p are the targets, v6e is not
# verified with TensorFlow, v2 and v3 are older than the targets).
check_tpu_generation() {
  local type=$1 generation
  generation=$(tpu_generation "$type") ||
    usage_error "--accelerator-type '$type': the TensorFlow path supports v4, v5litepod (v5e), v5p (and, unverified, v6e, v2, v3) slices, not '${type%-*}'"
  case $generation in
    v6e) log "warning: TensorFlow on v6e (Trillium) is not verified: Google's v6e guides cover JAX and PyTorch only (see BUILD.md)" ;;
    v2 | v3) log "warning: $generation is not a generation this project targets (v4, v5e, v5p; see BUILD.md)" ;;
  esac
}

# The generation suffix of TensorFlow runtime versions from 2.18 on
# (tpu-vm-tf-2.18.0-pjrt-v5e-and-v6, tpu-vm-tf-2.18.0-pod-pjrt-v5p-and-below).
tf_runtime_suffix() {
  case $1 in
    v5e | v6e) echo v5e-and-v6 ;;
    *) echo v5p-and-below ;;
  esac
}

# The base runtime version of a generation that Google's TensorFlow-on-TPU CI creates its TPU VMs
# with before it pip-installs tensorflow-tpu itself (ml-auto-solutions, dags/solutions_team).
tf_base_runtime() {
  case $1 in
    v5e) echo v2-alpha-tpuv5-lite ;;
    v6e) echo v2-alpha-tpuv6e ;;
    *) echo v2-alpha-tpuv5 ;;
  esac
}

# runtime_candidates TYPE TF_VERSION: the runtime versions that fit, best first: the TensorFlow
# image of exactly TF_VERSION for the generation (with and without its generation suffix), then
# the generation's base image. The project installs its own tensorflow-tpu and libtpu into a
# virtualenv, so on a single host the image's TensorFlow is not used; on a multi-host slice the
# TPU server of the image must match, which install.sh --pod-server checks (or repoints).
runtime_candidates() {
  local type=$1 tf=$2 generation pod=
  generation=$(tpu_generation "$type") || return 1
  is_multi_host "$type" && pod=-pod
  echo "tpu-vm-tf-$tf$pod-pjrt-$(tf_runtime_suffix "$generation")"
  echo "tpu-vm-tf-$tf$pod-pjrt"
  tf_base_runtime "$generation"
}

# pick_runtime_version TYPE TF_VERSION AVAILABLE...: the first candidate that is AVAILABLE.
pick_runtime_version() {
  local type=$1 tf=$2 candidate
  shift 2
  while IFS= read -r candidate; do
    if in_list "$candidate" "$@"; then
      echo "$candidate"
      return 0
    fi
  done < <(runtime_candidates "$type" "$tf")
  return 1
}

# The TensorFlow version a runtime version's name carries (tpu-vm-tf-2.18.0-pod-pjrt -> 2.18.0),
# empty for a base image.
runtime_tf_version() {
  local version=$1
  if [[ $version =~ ^tpu-vm-tf-([0-9]+\.[0-9]+\.[0-9]+)(-|$) ]]; then
    echo "${BASH_REMATCH[1]}"
  fi
}

# ---------------------------------------------------------------------------------------------
# Running commands.

# shell_quote WORD: WORD as bash reads it back: unchanged when it is made only of safe
# characters, else in single quotes (a ' inside becomes '\''). Like printf %q, but readable.
shell_quote() {
  local word=$1
  if [[ -n $word && $word =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$word"
  else
    printf "'%s'" "${word//\'/\'\\\'\'}"
  fi
}

# quote_cmd ARGS...: the words as one shell-safe line.
quote_cmd() {
  local out="" word
  for word in "$@"; do
    out+="$(shell_quote "$word") "
  done
  echo "${out% }"
}

print_cmd() {
  echo "+ $(quote_cmd "$@")"
}

run() {
  print_cmd "$@"
  if ((DRY_RUN)); then
    return 0
  fi
  "$@"
}

# run_capture VAR ARGS...: like run, but the command's output goes into the variable VAR (its
# stderr still reaches the terminal). With --dry-run VAR is left empty. Returns the command's
# status.
run_capture() {
  local -n capture_out=$1
  shift
  print_cmd "$@"
  # shellcheck disable=SC2034  # a nameref: assigns the caller's variable
  capture_out=
  if ((DRY_RUN)); then
    return 0
  fi
  # shellcheck disable=SC2034
  capture_out=$("$@")
}

# run_waitable ARGS...: like run, but the command runs in the background and the script waits
# for it, so a TERM/INT trap fires at once instead of after the command ends. The trap set up by
# on_signal_stop_child stops the command (CHILD_PID) before the script exits.
CHILD_PID=
run_waitable() {
  print_cmd "$@"
  if ((DRY_RUN)); then
    return 0
  fi
  local rc=0
  "$@" &
  CHILD_PID=$!
  wait "$CHILD_PID" || rc=$?
  CHILD_PID=
  return "$rc"
}

stop_child_and_exit() {
  local code=$1
  if [[ -n $CHILD_PID ]]; then
    kill -TERM "$CHILD_PID" 2>/dev/null || true
    wait "$CHILD_PID" 2>/dev/null || true
  fi
  exit "$code"
}

on_signal_stop_child() {
  trap 'stop_child_and_exit 130' INT
  trap 'stop_child_and_exit 143' TERM
}
