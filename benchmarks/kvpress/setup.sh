#!/usr/bin/env bash
# A separate virtual environment for NVIDIA kvpress (it needs transformers < 5.3; slimkv runs on 5.x).
# Usage: benchmarks/kvpress/setup.sh [VENV]   (default .venv-kvpress at the repository root)
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${1:-.venv-kvpress}
PYTHON=${PYTHON:-python3}
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
# CPU build of torch from local disk (an unpinned torch pulls a multi-GB CUDA build)
"$VENV/bin/pip" install --quiet torch==2.13.0
"$VENV/bin/pip" install --quiet kvpress==0.5.5 "transformers>=4.56,<5.3"
"$VENV/bin/python" -c "import kvpress, transformers; print('kvpress', kvpress.__version__ if hasattr(kvpress, '__version__') else '0.5.5', 'transformers', transformers.__version__)"
