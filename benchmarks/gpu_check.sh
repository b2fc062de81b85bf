#!/usr/bin/env bash
# `make gpu-check` on any CUDA machine, including one lent without a network whose own python3
# already holds torch (no venv can be built there):
#   1. the Python: $PY if set, else the repo's .venv if it exists, else python3;
#   2. wheels carried in .whl/ (or $WHEELS; made here by `make device-wheels`: the packages such a
#      machine lacks) are installed into .whl/site, offline, and put on PYTHONPATH;
#   3. a preflight imports the three scripts, so a missing package is one line naming it
#      before any GPU time is spent;
#   4. benchmarks/gpu_check.py with the arguments given (results in benchmarks/results/).
set -uo pipefail
cd "$(dirname "$0")/.."

py="${PY:-}"
if [ -z "$py" ]; then
    if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi

wheels="${WHEELS:-.whl}"
if compgen -G "$wheels/*.whl" >/dev/null; then
    echo "gpu_check.sh: installing the carried wheels ($wheels/*.whl) into $wheels/site"
    for whl in "$wheels"/*.whl; do  # one by one: a wheel for another Python is skipped, not fatal
        "$py" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
            --upgrade --target "$wheels/site" "$whl" 2>/dev/null || echo "gpu_check.sh: skipped $whl (not for this Python)"
    done
    export PYTHONPATH="$(cd "$wheels" && pwd)/site${PYTHONPATH:+:$PYTHONPATH}"
fi

if ! err=$("$py" -c "import train, evaluate, prepare_data" 2>&1); then
    echo "gpu_check.sh: $py cannot import the scripts: $(echo "$err" | tail -n 1)" \
         "(on a machine without a network: make device-wheels here, carry .whl; see BENCHMARKS.md)" >&2
    exit 3
fi

export PYTHONUNBUFFERED=1
exec "$py" benchmarks/gpu_check.py "$@"
