#!/usr/bin/env bash
# Installs everything, then runs the whole ColD Fusion loop on the embedded default:
#   python -m cold_fusion_tf.run --config=configs/demo.py --store=stores/demo
# Extra arguments are passed to the program (e.g. --config.iterations=2). STORE=DIR picks
# another store; it and the arguments' paths are taken from the directory the script is run in.
# DRY_RUN=1 prints the two commands ("+ ..." lines) and runs nothing.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
store=${STORE:-$root/stores/demo}
case ${DRY_RUN:-0} in
  0) ;;
  1)
    printf '+ bash %q\n' "$root/scripts/setup.sh"
    printf '+ python -m cold_fusion_tf.run'
    printf ' %q' "--config=$root/configs/demo.py" "--store=$store" "$@"
    printf '\n'
    exit 0
    ;;
  *)
    echo "demo.sh: DRY_RUN must be 0 or 1, not '$DRY_RUN'" >&2
    exit 2
    ;;
esac
bash "$root/scripts/setup.sh"
# shellcheck disable=SC1091
source "$root/.venv/bin/activate"
export HF_HUB_OFFLINE=1 TF_CPP_MIN_LOG_LEVEL=2
exec python -m cold_fusion_tf.run --config="$root/configs/demo.py" --store="$store" "$@"
