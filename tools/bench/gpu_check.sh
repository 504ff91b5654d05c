#!/usr/bin/env bash
# The GPU throughput check, in one go: run from the repository root on a machine with an NVIDIA GPU.
#
#   bash tools/bench/gpu_check.sh                 # figures go to $OUT (default: ./gpu_check_out)
#   GPU_CHECK_BUDGET_S=300 bash tools/bench/gpu_check.sh
#   WHEELS=/path/to/wheels bash tools/bench/gpu_check.sh   # a machine without a package index
#
# It makes the environment a user's would be: JAX's CUDA wheels for the driver it finds (CUDA 13 from driver
# 580, CUDA 12 from driver 525; nvidia-smi says which), jaxlm (editable) and everything its train path imports
# (grain, orbax, sentencepiece, ...: pyproject's dependencies), from the package index or from $WHEELS. Then it runs
# tools/bench/gpu_check.py: tools.bench train for gpt2-124m at seq 1024 and llama3.2-1b at seq 2048, bfloat16,
# each setting with attention `auto` (what users get) and with cuDNN forced, and reports per-GPU MFU, under a hard
# time limit (default 400 s; with set-up, under 8 minutes). Every figure is printed and written to $OUT.
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

# JAX's CUDA wheels: the CUDA major version the driver supports.
driver="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' ')"
driver_major="${driver%%.*}"
if [[ -z "$driver_major" || ! "$driver_major" =~ ^[0-9]+$ ]]; then
  echo "error: nvidia-smi reports no driver version: is this a machine with an NVIDIA GPU and its driver?"; exit 2
elif ((driver_major >= 580)); then cuda=cuda13
elif ((driver_major >= 525)); then cuda=cuda12
else echo "error: NVIDIA driver $driver is older than 525, which JAX's CUDA 12 wheels need: update the driver"; exit 2
fi
jax_version="$("$PY" -c 'import jax; print(jax.__version__)' 2>/dev/null || echo 0.10.2)"
echo "driver $driver: jax[$cuda]==$jax_version"
PIP=("$PY" -m pip install --quiet)
[[ -n "${WHEELS:-}" ]] && PIP+=(--no-index --find-links "$WHEELS")
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ -z "${GPU_CHECK_SKIP_INSTALL:-}" ]]; then
  if ! "$PY" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' >/dev/null 2>&1; then
    timeout 300 "${PIP[@]}" "jax[$cuda]==$jax_version" >"$OUT/pip_jax.txt" 2>&1 \
      || echo "warning: could not install jax[$cuda]==$jax_version (see $OUT/pip_jax.txt)"
  fi
  # jaxlm with its dependencies: everything the train path imports.
  timeout 300 "${PIP[@]}" -e . >"$OUT/pip_jaxlm.txt" 2>&1 \
    || echo "warning: pip install -e . failed (see $OUT/pip_jaxlm.txt); using PYTHONPATH=$PWD"
fi
# Whatever is still missing stops the check here, in one line, rather than in the first run.
if ! "$PY" -c 'import jaxlm.train, jaxlm.data, tools.bench.bench' 2>"$OUT/import_check.txt"; then
  echo "error: the train path does not import: $(tail -n1 "$OUT/import_check.txt"); install it (pip install -e .)"
  exit 2
fi
"$PY" -c 'import jax; print("after set-up: jax", jax.__version__, jax.devices())' 2>&1 | tee -a "$OUT/versions.txt"

# XLA's GPU defaults are used unless XLA_FLAGS is given; whatever it is goes into every record.
echo "XLA_FLAGS=${XLA_FLAGS:-}"
timeout --signal=INT --kill-after=20 "$LIMIT_S" "$PY" -m tools.bench.gpu_check --out "$OUT" --budget-s "$BUDGET_S" "$@"
status=$?
echo "== gpu_check finished with status $status; results: $OUT/gpu_results.jsonl, $OUT/gpu_summary.json"
exit $status
