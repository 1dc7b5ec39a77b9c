#!/usr/bin/env bash
# One ColD Fusion contributor over several workers (MultiWorkerMirroredStrategy), with TF_CONFIG.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $PROG --store=STORE --dataset=NAME [--workers=N | --hosts=H1,H2,...] [--index=I]
          [settings] [--print-tf-config] [--dry-run] [-- EXTRA_TRAIN_FLAGS...]

Runs one contributor under tf.distribute.MultiWorkerMirroredStrategy. Every worker runs
  env TF_CONFIG='{"cluster":{"worker":[...]},"task":{"type":"worker","index":I}}' \\
      python -m cold_fusion_tf.train ... --config.strategy=multi_worker
with the same cluster and its own index; worker 0 is the chief.

Two ways to use it:
  - On one machine (testing, or one process per GPU group): leave out --index and all workers
    start here on 127.0.0.1, ports --port, --port+1, ...; if one fails, the others are stopped.
  - On several machines: give the same --hosts on each and that machine's --index.

Required:
  --store=STORE             the ColD Fusion store: a folder or gs://bucket/prefix
  --dataset=NAME            dataset to fine-tune on (--config.task); letters, digits, . _ -

Optional:
  --workers=N               number of workers (default: 2, or the number of --hosts)
  --hosts=LIST              worker addresses, host or host:port, comma-separated
                            (default: 127.0.0.1 for every worker)
  --port=PORT               port of worker 0 where a host has none; worker i gets PORT+i (default: 12345)
  --index=I                 run only worker I (on its own machine)
  --contributor-id=ID       contributor id in the store (default: the dataset name)
  --config=configs/X.py     config file (default: configs/roberta_base.py)
  --workdir=DIR             checkpoints and TensorBoard logs, a folder or gs://... shared by all
                            workers (the chief writes it) (default: workdir/<contributor id>)
  --python=PYTHON           interpreter (default: python)
  --print-tf-config         print the TF_CONFIG JSON of worker --index (default 0) and exit
  --dry-run                 print the commands ("+ ..." lines) and run nothing
  --help                    this text
Anything after a lone -- is appended to the train command.

Examples:
  $PROG --store=stores/demo --dataset=sst2 --config=configs/demo.py --workers=2 --dry-run
  $PROG --store=gs://my-bucket/cf-run --dataset=sst2 --hosts=10.0.0.2,10.0.0.3 --index=1
EOF
}

STORE=
DATASET=
WORKERS=
HOSTS=
PORT=12345
INDEX=
CONTRIBUTOR_ID=
CONFIG=configs/roberta_base.py
WORKDIR=
PYTHON=python
PRINT_TF_CONFIG=0
VALUE_FLAGS=(store dataset workers hosts port index contributor-id config workdir python)
BOOL_FLAGS=(print-tf-config dry-run)
parse_flags "$@"

# ---------------------------------------------------------------------------------------------
# Settings and the cluster.

check_positive port "$PORT"
if ((${#PORT} > 5 || 10#$PORT > 65535)); then usage_error "--port '$PORT' must be below 65536"; fi
[[ -z $WORKERS || ${#WORKERS} -le 5 ]] || usage_error "--workers '$WORKERS' is too large: a port each is needed"
ADDRESSES=()
if [[ -n $HOSTS ]]; then
  split_list hosts HOST_LIST "$HOSTS"
  [[ -z $WORKERS ]] || check_positive workers "$WORKERS"
  [[ -z $WORKERS || $((10#$WORKERS)) -eq ${#HOST_LIST[@]} ]] ||
    usage_error "--workers=$WORKERS but --hosts names ${#HOST_LIST[@]} hosts"
  WORKERS=${#HOST_LIST[@]}
  for i in "${!HOST_LIST[@]}"; do
    host=${HOST_LIST[$i]}
    if [[ $host =~ ^[A-Za-z0-9][A-Za-z0-9.-]*:[0-9]{1,5}$ ]]; then
      ((10#${host##*:} > 0 && 10#${host##*:} < 65536)) ||
        usage_error "--hosts item '$host': a port is 1..65535"
      ADDRESSES+=("$host")
    elif [[ $host =~ ^[A-Za-z0-9][A-Za-z0-9.-]*$ ]]; then
      ((10#$PORT + i < 65536)) || usage_error "--port=$PORT: worker $i would get port $((10#$PORT + i)), above 65535"
      ADDRESSES+=("$host:$((10#$PORT + i))")
    else
      usage_error "--hosts item '$host' must be a host name or address, optionally with :port"
    fi
  done
else
  WORKERS=${WORKERS:-2}
  check_positive workers "$WORKERS"
  WORKERS=$((10#$WORKERS))
  ((10#$PORT + WORKERS - 1 < 65536)) ||
    usage_error "--port=$PORT with --workers=$WORKERS: the last worker would get port $((10#$PORT + WORKERS - 1)), above 65535"
  for ((i = 0; i < WORKERS; i++)); do
    ADDRESSES+=("127.0.0.1:$((10#$PORT + i))")
  done
fi
if [[ -n $INDEX ]]; then
  check_uint index "$INDEX"
  INDEX=$((10#$INDEX))
  ((INDEX < WORKERS)) || usage_error "--index=$INDEX is out of range for $WORKERS workers (0..$((WORKERS - 1)))"
fi

# tf_config I: the TF_CONFIG of worker I.
tf_config() {
  local index=$1 list="" address
  for address in "${ADDRESSES[@]}"; do
    list+="${list:+,}\"$address\""
  done
  echo "{\"cluster\":{\"worker\":[$list]},\"task\":{\"type\":\"worker\",\"index\":$index}}"
}

if ((PRINT_TF_CONFIG)); then
  tf_config "${INDEX:-0}"
  exit 0
fi

require store "$STORE" "a folder or gs://bucket/prefix"
require dataset "$DATASET" "dataset to fine-tune on"
check_any_store "$STORE"
check_contributor
check_local_contributor
if [[ -z $INDEX ]]; then
  for address in "${ADDRESSES[@]}"; do
    case ${address%:*} in
      127.0.0.1 | localhost) ;;
      *) usage_error "--hosts names other machines: run $PROG on each of them with its --index" ;;
    esac
  done
fi

TRAIN=("$PYTHON" -m cold_fusion_tf.train "--config=$CONFIG" "--store=$STORE" "--workdir=$WORKDIR"
  "--config.task=$DATASET" "--config.contributor_id=$CONTRIBUTOR_ID" --config.strategy=multi_worker
  "${EXTRA_ARGS[@]}")
cd "$REPO_ROOT"

# ---------------------------------------------------------------------------------------------
# One worker of a multi-machine cluster.

if [[ -n $INDEX ]]; then
  on_signal_stop_child
  run_waitable env "TF_CONFIG=$(tf_config "$INDEX")" "${TRAIN[@]}"
  exit 0
fi

# ---------------------------------------------------------------------------------------------
# All workers here; the first failure stops the others (they would wait for it forever).

PIDS=()
stop_workers() {
  local pid
  for pid in "${PIDS[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
}
trap 'stop_workers; exit 130' INT
trap 'stop_workers; exit 143' TERM

for ((i = 0; i < WORKERS; i++)); do
  cmd=(env "TF_CONFIG=$(tf_config "$i")" "${TRAIN[@]}")
  print_cmd "${cmd[@]}"
  if ((!DRY_RUN)); then
    "${cmd[@]}" &
    PIDS+=("$!")
  fi
done
((DRY_RUN)) && exit 0

log "started $WORKERS workers: pids ${PIDS[*]}"
declare -A RUNNING=()
for pid in "${PIDS[@]}"; do
  RUNNING[$pid]=1
done
while ((${#RUNNING[@]})); do
  rc=0
  finished=
  wait -n -p finished "${!RUNNING[@]}" || rc=$?
  [[ -n $finished ]] || die "lost track of the workers (wait returned $rc)"
  unset "RUNNING[$finished]"
  if ((rc != 0)); then
    log "worker with pid $finished failed with status $rc; stopping the others"
    stop_workers
    exit "$rc"
  fi
done
log "all $WORKERS workers finished"
