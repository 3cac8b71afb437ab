#!/usr/bin/env bash
# One prepared GPU session (~8 minutes on one H100/H200): the GPU attention tests, then the benchmark
# presets that the issue's GPU goals need, most important first. Each step has its own time limit and the
# whole run stops starting new steps after $BUDGET seconds, so a slow step costs the ones after it, not
# the session. Results: $OUT/gpu_results.md (tables to paste into docs/benchmarks.md), $OUT/gpu_json.tar.gz
# (raw JSON) and $OUT/gpu_check.log (everything printed).
#
#   OUT=/tmp/gpu bash scripts/gpu_check.sh
#
# Needs python3 with jax[cuda], flax, optax, transformers, torch (CUDA); peft is optional (without it the
# transformers LoRA rows say "skipped"). grain/datasets/TRL are not needed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:?set OUT to a directory for the results}"
mkdir -p "$OUT"
BUDGET="${BUDGET:-470}"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
WORK="$(mktemp -d)"
LOG="$OUT/gpu_check.log"
RESULTS="$OUT/gpu_results.md"
START=$(date +%s)
: > "$LOG"
{
  echo "# GPU check $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null)"
  echo
  $PY - <<'EOF'
import importlib.metadata as m
names = ["jax", "jaxlib", "flax", "optax", "torch", "transformers", "peft"]
def v(n):
    try:
        return m.version(n)
    except m.PackageNotFoundError:
        return "absent"
print(", ".join(f"{n} {v(n)}" for n in names))
EOF
  echo
} > "$RESULTS"

# step NAME SECONDS COMMAND...: run one step if the budget allows; its stdout tables go to $RESULTS.
step() {
  local name="$1" limit="$2"
  shift 2
  local left=$((BUDGET - ($(date +%s) - START)))
  if [ "$left" -lt 30 ]; then
    echo "## $name: not run (budget of ${BUDGET}s spent)" | tee -a "$RESULTS" >> "$LOG"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (limit ${limit}s, $(( $(date +%s) - START ))s elapsed)" | tee -a "$LOG"
  local t0=$(date +%s)
  timeout -k 10 "$limit" "$@" > "$WORK/step.out" 2>> "$LOG"
  local rc=$?
  cat "$WORK/step.out" >> "$LOG"
  {
    echo "## $name (exit $rc, $(( $(date +%s) - t0 ))s)"
    echo
    if [ "$rc" -eq 124 ]; then echo "timed out after ${limit}s"; fi
    tail -n 40 "$WORK/step.out"
    echo
  } >> "$RESULTS"
}

# 1. Correctness first: cuDNN and bf16 blockwise attention against the dense reference, on the GPU.
step "attention tests on GPU" 120 env JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=highest "$PY" -m pytest tests/test_attention.py -q -p no:cacheprovider \
  -k "gpu or model_blockwise" -rs
# 2. LoRA throughput on 1B shapes (goal: ≥ 1.5× transformers+PEFT).
step "train 1b lora" 150 "$PY" scripts/bench_train.py --preset 1b --mode lora --out "$WORK/json"
# 3. Full fine-tuning MFU on 1B shapes (goal: ≥ 50%).
step "train 1b full" 150 "$PY" scripts/bench_train.py --preset 1b --mode full --out "$WORK/json"
# 4. Llama-3-8B shapes, LoRA, seq 4096 batch 1: jaxtune with remat inside a 24 GiB cap (memory goal) vs
#    transformers+PEFT uncapped and without checkpointing (its fastest mode).
step "train 8b lora (jaxtune capped at 24 GiB)" 170 "$PY" scripts/bench_train.py --preset 8b --mode lora --remat full \
  --mem-cap-gb 24 --out "$WORK/json"
# 4b. The same shapes with an NF4 base (QLoRA) inside a 12 GiB cap (its memory goal). jaxtune's QLoRA needs qwix,
#     pure Python: on a machine without it, carry its wheel (pip download qwix==0.1.8 --no-deps -d wheels).
"$PY" -c "import qwix" 2>/dev/null || "$PY" -m pip install -q --no-deps --no-index wheels/qwix-*.whl >> "$LOG" 2>&1
step "train 8b qlora nf4 (jaxtune capped at 12 GiB)" 170 "$PY" scripts/bench_train.py --preset 8b --mode lora \
  --quantize nf4 --remat full --mem-cap-gb 12 --out "$WORK/json"
# 5. Generation at batch 1 and 16 (goal: ≥ transformers generate).
step "generate 1b" 100 "$PY" scripts/bench_generate.py --preset 1b --batches 1,16 --out "$WORK/json"
# 6. The attention backends themselves, for default_impl on GPU.
step "attention backends bf16" 60 "$PY" scripts/bench_attention.py --dtype bfloat16 --impls xla,blockwise,cudnn \
  --shape 8,2048,32,8,64 --shape 1,4096,32,8,128 --torch
step "attention backends fp32 (stories shape)" 40 "$PY" scripts/bench_attention.py --impls xla,blockwise --torch
# 7. Smaller shapes if time is left.
step "train small lora" 100 "$PY" scripts/bench_train.py --preset small --mode lora --out "$WORK/json"

tar -czf "$OUT/gpu_json.tar.gz" -C "$WORK" json 2>/dev/null || true
echo "total $(( $(date +%s) - START ))s" | tee -a "$RESULTS" >> "$LOG"
rm -rf "$WORK"
