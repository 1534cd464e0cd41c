#!/usr/bin/env bash
# One short GPU run of this project against diffusers (benchmarks/device_check.py says what runs).
#
# Here, with the package registry reachable, once (writes wheels into ./.whl, ignored by git):
#     benchmarks/device_check.sh --fetch-wheels
# On a fresh machine with one NVIDIA GPU and python3 holding jax[cuda], flax, optax, orbax,
# chex and torch (no ml-collections, grain or diffusers), from the repository root, with .whl
# copied along (the device tool: carry [".whl"]):
#     benchmarks/device_check.sh                # <= 8 minutes; writes benchmarks/results/gpu_*
# On the CPU, tiny shapes, the same cases (what tests/test_device_check.py runs, sd cases only):
#     benchmarks/device_check.sh --dry-run
# Other arguments go to benchmarks/device_check.py (--budget_s, --kinds, --out_dir).
set -euo pipefail
cd "$(dirname "$0")/.."

# What the GPU image lacks, pinned to the versions this project is tested with, and their own
# missing requirements. Python 3.12, manylinux x86_64 (the GPU machine's interpreter).
WHEELS=(ml-collections==1.1.0 grain==0.2.18 array-record==0.8.6 portpicker==1.6.0
        diffusers==0.42.1 importlib-metadata==8.7.0)

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    mkdir -p .whl
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
    du -sh .whl
    exit 0
fi

PY="${PYTHON:-python3}"
if [[ "${1:-}" == "--dry-run" && -x .venv/bin/python ]]; then
    PY=.venv/bin/python
fi
start=$(date +%s)
missing=()
for module in ml_collections grain diffusers; do
    "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$module') is None)" \
        || missing+=("$module")
done
if (( ${#missing[@]} )); then
    if ! compgen -G ".whl/*.whl" >/dev/null; then
        echo "missing: ${missing[*]}; no wheels in .whl (run '$0 --fetch-wheels' where pip works)" >&2
        exit 1
    fi
    echo "[device_check.sh] installing ${missing[*]} from .whl" >&2
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/device_check_site .whl/*.whl
    export PYTHONPATH="/tmp/device_check_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
echo "[device_check.sh] set-up $(( $(date +%s) - start )) s; load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
exec "$PY" benchmarks/device_check.py "$@"
