#!/usr/bin/env bash
# Installs the package with its test tools, then runs the test suite.
# Extra arguments are passed to pytest (e.g. -k fusion).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
# shellcheck disable=SC1091
source .venv/bin/activate
export HF_HUB_OFFLINE=1 TF_CPP_MIN_LOG_LEVEL=2
# Two processes, each taking whole test files (module fixtures are built once).
exec python -m pytest -q -n 2 --dist loadfile tests "$@"
