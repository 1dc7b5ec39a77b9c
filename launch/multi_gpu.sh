#!/usr/bin/env bash
# One ColD Fusion contributor on all (or some) GPUs of this machine, under MirroredStrategy.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $PROG --store=STORE --dataset=NAME [settings] [--dry-run] [-- EXTRA_TRAIN_FLAGS...]

Runs one contributor on this host with tf.distribute.MirroredStrategy over its GPUs:
  python -m cold_fusion_tf.train --config=... --store=STORE --workdir=... \\
      --config.task=DATASET --config.contributor_id=ID --config.strategy=mirrored
Install the GPU build first: bash launch/install.sh --accelerator=gpu (see BUILD.md).

Required:
  --store=STORE             the ColD Fusion store: a folder or gs://bucket/prefix
  --dataset=NAME            dataset to fine-tune on (--config.task); letters, digits, . _ -

Optional:
  --contributor-id=ID       contributor id in the store (default: the dataset name)
  --config=configs/X.py     config file (default: configs/roberta_base.py)
  --workdir=DIR             checkpoints and TensorBoard logs, a folder or gs://...
                            (default: workdir/<contributor id>)
  --gpus=LIST               GPUs to use, e.g. 0,1 (sets CUDA_VISIBLE_DEVICES; default: all)
  --python=PYTHON           interpreter (default: python, i.e. the active virtualenv's)
  --dry-run                 print the command ("+ ..." line) and run nothing
  --help                    this text
Anything after a lone -- is appended to the train command.

Example:
  $PROG --store=gs://my-bucket/cf-run --dataset=sst2 --gpus=0,1 --dry-run
EOF
}

STORE=
DATASET=
CONTRIBUTOR_ID=
CONFIG=configs/roberta_base.py
WORKDIR=
GPUS=
PYTHON=python
VALUE_FLAGS=(store dataset contributor-id config workdir gpus python)
BOOL_FLAGS=(dry-run)
parse_flags "$@"

require store "$STORE" "a folder or gs://bucket/prefix"
require dataset "$DATASET" "dataset to fine-tune on"
check_any_store "$STORE"
check_contributor
check_local_contributor
[[ -z $GPUS || $GPUS =~ ^[0-9]+(,[0-9]+)*$ ]] || usage_error "--gpus '$GPUS' must be a list of GPU indices such as 0,1"
[[ -z $GPUS ]] || split_list gpus GPU_LIST "$GPUS"  # no index twice

cd "$REPO_ROOT"
TRAIN=("$PYTHON" -m cold_fusion_tf.train "--config=$CONFIG" "--store=$STORE" "--workdir=$WORKDIR"
  "--config.task=$DATASET" "--config.contributor_id=$CONTRIBUTOR_ID" --config.strategy=mirrored
  "${EXTRA_ARGS[@]}")
[[ -z $GPUS ]] || TRAIN=(env "CUDA_VISIBLE_DEVICES=$GPUS" "${TRAIN[@]}")
on_signal_stop_child
run_waitable "${TRAIN[@]}"
