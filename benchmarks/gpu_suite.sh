#!/usr/bin/env bash
# The GPU suite (benchmarks/gpu_suite.py): every measurement a lent GPU machine can give, one
# JSON and one Markdown table, under 9 minutes.
#
#   bash benchmarks/gpu_suite.sh --rehearse     # here: every part on the CPU, tiny sizes
#   bash benchmarks/gpu_suite.sh                # on the GPU machine
#
# On a lent nvidia-h200 (device tool `run`, carry [".whl"], timeout_s 600; build .whl/ first
# with `bash benchmarks/gpu_wheels.sh`):
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; bash benchmarks/gpu_suite.sh
#
# Reports go to $OUT (the device tool brings it back) or ./gpu_suite_out. Other arguments pass
# through to gpu_suite.py (--parts, --budget, --out).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec "$PYTHON" benchmarks/gpu_suite.py "$@"
