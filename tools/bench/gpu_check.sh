#!/usr/bin/env bash
# The GPU throughput check, in one go: run from the repository root on a machine with an NVIDIA GPU (an H200 for
# the targets) where JAX with CUDA, flax and optax are already installed.
#
#   bash tools/bench/gpu_check.sh                 # figures go to $OUT (default: ./gpu_check_out)
#   GPU_CHECK_BUDGET_S=300 bash tools/bench/gpu_check.sh
#
# It installs jaxlm (editable, no dependencies) and whichever of its pure-Python dependencies the train step
# imports are missing, then runs tools/bench/gpu_check.py: tools.bench train for gpt2-124m at seq 1024 and
# llama3.2-1b at seq 2048, bfloat16 compute, cuDNN fused attention, a few batch sizes and remat policies,
# under a hard time limit (default 400 s; with set-up, under 8 minutes). Every figure is printed and written to $OUT.
set -uo pipefail

cd "$(dirname "$0")/../.."
OUT="${OUT:-$PWD/gpu_check_out}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-300}"   # no new run starts after this; each run takes up to about a minute
LIMIT_S="${GPU_CHECK_LIMIT_S:-400}"     # hard stop for the Python part (the whole script stays under 8 minutes)
PY="${PYTHON:-python}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
exec > >(tee -a "$LOG") 2>&1

echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ) gpu_check on $(hostname)"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$OUT/nvidia-smi.txt"
"$PY" - <<'EOF' 2>&1 | tee "$OUT/versions.txt"
import importlib, sys
print("python", sys.version.split()[0])
for name in ("jax", "jaxlib", "flax", "optax", "numpy"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as e:
        print(name, "MISSING", e)
import jax
print("devices", jax.devices())
EOF

# jaxlm itself: importable from the checkout even if pip cannot build it (no index, no build isolation).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ -z "${GPU_CHECK_SKIP_INSTALL:-}" ]]; then
  "$PY" -m pip install --quiet --no-deps --no-build-isolation -e . >"$OUT/pip_jaxlm.txt" 2>&1 \
    || echo "note: pip install -e . failed (see $OUT/pip_jaxlm.txt); using PYTHONPATH=$PWD instead"
fi

# Pure-Python packages the train step imports; install only the missing ones (pip may have no index here).
missing=()
for pair in tyro:tyro tqdm:tqdm orbax.checkpoint:orbax-checkpoint; do
  module="${pair%%:*}"; package="${pair##*:}"
  "$PY" -c "import $module" >/dev/null 2>&1 || missing+=("$package")
done
if ((${#missing[@]})); then
  echo "installing missing: ${missing[*]}"
  timeout 45 "$PY" -m pip install --quiet "${missing[@]}" || echo "warning: could not install ${missing[*]}"
fi

# XLA's GPU defaults are used unless XLA_FLAGS is given; whatever it is goes into every record.
echo "XLA_FLAGS=${XLA_FLAGS:-}"
timeout --signal=INT --kill-after=20 "$LIMIT_S" "$PY" -m tools.bench.gpu_check --out "$OUT" --budget-s "$BUDGET_S" "$@"
status=$?
echo "== gpu_check finished with status $status; results: $OUT/gpu_results.jsonl, $OUT/gpu_summary.json"
exit $status
