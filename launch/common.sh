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

# Where pip finds the libtpu wheels that tensorflow-tpu depends on.
# shellcheck disable=SC2034  # used by the scripts that source this file
LIBTPU_TF_INDEX=https://storage.googleapis.com/libtpu-tf-releases/index.html

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
        # --dry-run) must not be ignored silently.
        for value in "$@"; do
          [[ $value =~ ^--config\.[A-Za-z0-9_.]+=[^[:cntrl:]]*$ ]] ||
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

# A config is a file under configs/, given relative to the repository root (it is resolved on
# the machine that runs the program, which may be a TPU VM or a container).
check_config() {
  local value=$1
  [[ $value =~ ^configs/[A-Za-z0-9_][A-Za-z0-9_.-]*\.py$ ]] ||
    usage_error "--config '$value' must look like configs/<name>.py (relative to the repository root)"
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
  if [[ $value == gs://* ]]; then
    check_gcs_store "$value"
  fi
}

check_zone() {
  local value=$1
  [[ $value =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] || usage_error "--zone '$value' does not look like a zone (e.g. us-central2-b)"
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

# The TPU VM software version that matches the pinned TensorFlow, by the documented naming
# convention tpu-vm-tf-x.y.z[-pod]-pjrt ("-pod" for multi-host slices).
tf_runtime_version() {
  local type=$1 tf
  tf=$(pinned_version tensorflow)
  if is_multi_host "$type"; then
    echo "tpu-vm-tf-$tf-pod-pjrt"
  else
    echo "tpu-vm-tf-$tf-pjrt"
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
