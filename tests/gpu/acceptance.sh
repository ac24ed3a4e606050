#!/usr/bin/env bash
# The GPU acceptance run: on one GPU in a few minutes (tiny model, arith suite, nothing downloaded).
#   bash tests/gpu/acceptance.sh          one CUDA GPU (NCCL)
#   bash tests/gpu/acceptance.sh --cpu    the same checks on the CPU (gloo); CI runs this
# Checks (python -m tests.gpu.check, one RESULT line each):
#   environment  versions, the GPU, optional packages missing (vllm, math-verify, datasets are not needed)
#   cells        harness run: a cell of every mission algorithm (ppo, grpo, dvpo, flowrl, dfpo), 2 steps,
#                model.dtype=bfloat16 + train.mixed_precision=bf16, evaluation included
#   precision    every mission algorithm, 3 steps at lr 1e-6, float32 masters + bf16 compute, one process:
#                > 99 % of the policy's (and critic's) elements change; parameters and AdamW states float32
#   resume       a cell SIGKILLed at step 3 and resumed from its step-2 checkpoint repeats the uninterrupted run
#   fsdp         FSDP2 with one rank (torchrun; NCCL on the GPU, gloo on the CPU), bf16 compute, with a reference
# Works from the source tree (PYTHONPATH) with torch, transformers, accelerate, pandas, scipy, matplotlib,
# pyyaml and tqdm installed. Env: PYTHON (default python), OUT (default a temporary folder).
set -uo pipefail
cd "$(dirname "$0")/../.."
DEVICE=cuda
[ "${1:-}" = "--cpu" ] && DEVICE=cpu
# The CPU repeats a resumed run to the last bit; a GPU's atomics (embedding backward) may move the last bits.
RESUME_TOL=0
[ "$DEVICE" = cuda ] && RESUME_TOL=1e-3
PY=${PYTHON:-python}
OUT=${OUT:-$(mktemp -d -t harness-acceptance.XXXXXX)}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HARNESS_CACHE=${HARNESS_CACHE:-$OUT/cache} CHECK_OUT=$OUT/work
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
LOG=$OUT/acceptance.log
: > "$LOG"
FAILED=()
START=$(date +%s)

check() {  # check NAME TIMEOUT_S COMMAND...: its output to the log, its RESULT lines and rc to the screen
    local name=$1 limit=$2 rc t0=$(date +%s)
    shift 2
    echo "=== $name" >> "$LOG"
    timeout "$limit" "$@" >> "$LOG" 2>&1
    rc=$?
    awk -v n="=== $name" '$0 == n {on = 1; next} /^=== / {on = 0} on && /^RESULT/' "$LOG" | cut -c1-400
    echo "--- $name: rc=$rc ($(( $(date +%s) - t0 )) s)"
    [ "$rc" -eq 0 ] || FAILED+=("$name")
}

SMALL=(--set model.warmstart_steps=30 --set suite.n_eval=16 --set suite.n_train=200 --set train.prompts_per_step=4
       --set train.group_size=2 --set train.lr=1e-6 --set train.critic_lr=5e-6)
echo "harness GPU acceptance on $DEVICE, output in $OUT"
check environment 120 "$PY" -m tests.gpu.check environment --device "$DEVICE"
check cells 300 "$PY" -m harness.cli run --suite arith --algos ppo,grpo,dvpo,flowrl,dfpo --noise flip0.3 --seeds 1 \
    --steps 2 --eval-limit 16 --quiet --out "$OUT/runs" --cache-dir "$HARNESS_CACHE" "${SMALL[@]}" \
    --set train.device="$DEVICE" --set model.dtype=bfloat16 --set train.mixed_precision=bf16
check precision 300 "$PY" -m tests.gpu.check precision --device "$DEVICE" --algos ppo,grpo,dvpo,flowrl,dfpo \
    --dtype bfloat16 --mp bf16 --steps 3
check resume 300 "$PY" -m tests.gpu.check resume --device "$DEVICE" --algo ppo --dtype bfloat16 --mp bf16 --tolerance "$RESUME_TOL"
check fsdp 300 "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 -m tests.gpu.check precision \
    --device "$DEVICE" --algos ppo,grpo --dtype bfloat16 --mp bf16 --steps 3

echo "harness GPU acceptance on $DEVICE: $(( $(date +%s) - START )) s, log $LOG"
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "FAILED: ${FAILED[*]}"
    exit 1
fi
echo "PASSED"
