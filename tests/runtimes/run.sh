#!/usr/bin/env bash
# Runtimes CI: Optimum and onnxruntime-genai on chai-compile exports, each in the environment users have.
#
#   CHAI_PYTHON=.venv/bin/python tests/runtimes/run.sh [VENV_DIR]   (default .venv-runtimes, rebuilt each run)
#
# 1. chai-compile's own Python (CHAI_PYTHON, default `python`, with `pip install -e .` done) exports
#    stories260K and SmolLM2-135M, original and CHAI, and writes transformers' greedy tokens (make_artifacts.py).
# 2. A separate virtual environment gets torch (CPU wheel pinned), optimum-onnx and onnxruntime-genai
#    (requirements.txt) and chai-compile without its dependencies, and runs tests/runtimes against the exports.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
CHAI_PYTHON=${CHAI_PYTHON:-python}
VENV=${1:-.venv-runtimes}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/chai-runtimes.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

python3 -m venv --clear "$VENV"   # fresh every run, like .ci/run
"$VENV/bin/pip" install -q -r tests/runtimes/requirements.txt
"$VENV/bin/pip" install -q --no-deps -e .

"$CHAI_PYTHON" -m tests.runtimes.make_artifacts "$WORK"
CHAI_RUNTIME_ARTIFACTS="$WORK" "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/runtimes
