#!/usr/bin/env bash
# One call that says whether prime's GPU path works; prints a pass/fail table (about 2-5 minutes).
#
#   PYTHON=.venv/bin/python bash launch/gpu_smoke.sh --fetch-wheels   # where the registry is reachable:
#                                                                     # wheels the GPU machine lacks -> .whl/
#   bash launch/gpu_smoke.sh                  # on the GPU machine: install what it can, run every check
#   bash launch/gpu_smoke.sh --device cpu     # the same checks on the CPU (arguments go to gpu_smoke.py)
#
# The checks (launch/gpu_smoke.py): the streaming weight sync into an HF engine in another process
# (gloo, CUDA IPC, NCCL with two GPUs) and into vLLM's worker, vLLM sleep/wake in the colocated
# order, ZeRO-3 policy and PRM updates with state offload, and one colocated PRIME step.
# Needs python3 with torch, transformers, tokenizers, safetensors and pyyaml. DeepSpeed and its
# missing dependencies travel as wheels in .whl/ (PyPI has only a DeepSpeed sdist, so
# --fetch-wheels builds a pure-Python wheel of it); vLLM is optional. A check whose package is
# missing prints "skipped (why)"; the run fails only when a check that ran fails. torch is never
# installed or upgraded here. The repository is put on PYTHONPATH rather than pip-installed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY=${PYTHON:-python3}
WHEELS=${PRIME_WHEELS:-.whl}
SITE=${PRIME_SITE:-/tmp/prime-site}
TARGET_PY=${TARGET_PYTHON_VERSION:-3.12}   # the GPU machine's python (3.12 on the lent machines)

version_of() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    mkdir -p "$WHEELS"
    # Same versions as the environment the tests run in.
    "$PY" -m pip wheel -q --no-deps -w "$WHEELS" "deepspeed==$(version_of deepspeed)"
    pins=()
    for pkg in hjson pydantic pydantic-core annotated-types typing-inspection; do
        pins+=("$pkg==$(version_of "$pkg")")
    done
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$TARGET_PY" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" "${pins[@]}"
    ls -l "$WHEELS"
    echo "carry $WHEELS to the GPU machine and run: bash launch/gpu_smoke.sh"
    exit 0
fi

export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "torch is not importable by $PY; install a CUDA build of torch first (this script never installs torch)" >&2
    exit 1
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

missing=()
for mod in transformers tokenizers safetensors yaml deepspeed; do
    "$PY" -c "import $mod" 2>/dev/null || missing+=("$mod")
done
if (( ${#missing[@]} )); then
    echo "missing: ${missing[*]}"
    if compgen -G "$WHEELS/*.whl" >/dev/null; then
        # Offline: the carried wheels into a folder of their own (the system environment stays as it is).
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl || true
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    else
        # Online: from the registry, leaving torch alone (a failure only skips the checks that need it).
        "$PY" -m pip install -q "transformers<5.20" deepspeed tokenizers pyyaml safetensors || true
    fi
    for mod in "${missing[@]}"; do
        "$PY" -c "import $mod" 2>/dev/null || echo "still cannot import $mod: the checks that need it are skipped" >&2
    done
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" launch/gpu_smoke.py "$@"
