#!/usr/bin/env bash
# `harness plan` against `harness plan --measure` on this machine's CPU, for the two cells issue 26
# names (a few minutes on 2 cores; not part of the test suite, it prints figures):
#   1. a 2-rank sharded cell (gloo, FSDP2) of a Llama 130x the tiny one's parameters
#      (hidden 512, MLP 1536, 6 layers: 19.7M parameters), GRPO and PPO, 2 steps;
#   2. one process with LoRA (r 16) on a small model (hidden 512, MLP 1536, 6 layers), GRPO, 2 steps.
# --measure trains, it does not evaluate: eval.batch_size is kept small so that the plan's KV cache is the
# training batch's (the planned evaluation batch of 256 rows would be a cache the measured steps never fill).
# Every line ends with measured / estimate; the "peak (trainer share)" lines are the check (within 15 %).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
export OMP_NUM_THREADS=1
MODEL=(--set model.hidden_size=512 --set model.intermediate_size=1536 --set model.num_layers=6 --set model.num_heads=8
       --set model.warmstart_steps=0 --set train.prompts_per_step=4 --set train.group_size=2
       --set eval.batch_size=8)
echo "== 2 ranks, full fine-tuning =="
$PY -m harness.cli plan --algos grpo,ppo --nproc 2 --measure 2 "${MODEL[@]}" "$@" | grep -A100 '^measured' || true
echo "== 1 process, LoRA r 16 =="
$PY -m harness.cli plan --algos grpo --measure 2 "${MODEL[@]}" --set model.lora_rank=16 "$@" | grep -A100 '^measured' || true
