#!/usr/bin/env bash
# Installs everything, then runs the whole ColD Fusion loop on the embedded default:
#   python -m cold_fusion_tf.run --config=configs/demo.py --store=stores/demo
# Extra arguments are passed to the program (e.g. --config.iterations=2).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
source .venv/bin/activate
export HF_HUB_OFFLINE=1 TF_CPP_MIN_LOG_LEVEL=2
exec python -m cold_fusion_tf.run --config=configs/demo.py --store="${STORE:-stores/demo}" "$@"
