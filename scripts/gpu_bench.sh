#!/usr/bin/env bash
# GPU benchmark for one H200 in a 10-minute slot: MFU, tokens/s and peak memory of the training step.
#
#   bash scripts/gpu_bench.sh            # from the repository root; log to $OUT/gpu_bench.log (or ./gpu_bench.log)
#
# Runs, in priority order, each in its own process under `timeout` so that one hang cannot eat the slot:
#   1. LLaDA-8B shape, random init, LoRA r32 on all block linears, frozen bf16 base, seq 4096, batch 1,
#      activation checkpointing. Targets: peak memory <= 40 GB, MFU >= 45%.
#   2. llada-1b shape full fine-tune: bf16 autocast, fp32 master weights, seq 4096, batch 4, no checkpointing.
#   3. ours vs naive (full [B, L, V] logits) at a moderate size: llada-1b shape cut to 4 layers, seq 4096, batch 2.
#   4. if time remains: run 1 with torch.compile of the blocks; then run 1 without checkpointing (MFU without
#      the recomputation, which model FLOPs do not count).
# Weights are initialised on the GPU directly in their dtype (bench.random_model): the 8B init takes seconds.
# MFU uses the datasheet dense bf16 peak (H100/H200: 989 TFLOP/s) unless PEAK_TFLOPS is set.
set -u
cd "$(dirname "$0")/.."
LOG="${OUT:+$OUT/}gpu_bench.log"
PY="${PYTHON:-python3}"
BUDGET=${BUDGET:-480}  # seconds for the whole script; optional runs start only if they fit
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  # less fragmentation at 4096 tokens
export PYTHONUNBUFFERED=1  # progress lines reach the log as they happen
PEAK=${PEAK_TFLOPS:+--peak-tflops $PEAK_TFLOPS}

run() {  # run LIMIT_SECONDS bench-args...: one measurement, killed after LIMIT_SECONDS
  local limit=$1
  shift
  echo "=== [${SECONDS}s] python bench.py $* --device cuda  (timeout ${limit}s)"
  timeout -k 10 "$limit" "$PY" bench.py "$@" --device cuda $PEAK 2>&1 | grep --line-buffered -v '^BENCH_JSON'
  echo "=== exit ${PIPESTATUS[0]} after ${SECONDS}s"
}

optional() {  # optional LIMIT_SECONDS bench-args...: only if LIMIT_SECONDS still fit in BUDGET
  if (( SECONDS + $1 <= BUDGET )); then run "$@"; else echo "=== skipped (time): $*"; fi
}

main() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
  # The trainer itself on CUDA: bf16 autocast + fused AdamW (DDP path), bf16 base + LoRA, and FSDP2 on one rank.
  TINY="configs/tiny.toml train.max_steps=60 train.eval_every=60 checkpoint.every=30 log.every=20 log.progress=false"
  for extra in "train.run_dir=/tmp/smoke_full" "train.run_dir=/tmp/smoke_lora lora.enabled=true lora.r=8 lora.alpha=16"; do
    echo "=== [${SECONDS}s] train.py smoke: $extra"
    timeout -k 10 90 "$PY" train.py $TINY train.precision=bf16 $extra 2>&1 | grep -E '^(step|saved|export|model|memory|error)|Error' | tail -8
  done
  echo "=== [${SECONDS}s] train.py smoke: FSDP2 on 1 rank (torchrun, NCCL)"
  timeout -k 10 90 "$PY" -m torch.distributed.run --nproc_per_node=1 train.py $TINY train.precision=bf16 \
    parallel.mode=fsdp train.run_dir=/tmp/smoke_fsdp 2>&1 | grep -E '^(step|saved|export|model|memory|error)|Error' | tail -8
  COMMON="--steps 5 --warmup 2 --precision bf16"
  run 150 --size llada-8b --seq-len 4096 --batch 1 --lora --lora-r 32 --grad-ckpt $COMMON
  run 110 --size llada-1b --seq-len 4096 --batch 4 $COMMON
  run 110 --size llada-1b --layers 4 --seq-len 4096 --batch 2 --compare $COMMON
  optional 120 --size llada-8b --seq-len 4096 --batch 1 --lora --lora-r 32 --grad-ckpt --compile $COMMON
  optional 90 --size llada-8b --seq-len 4096 --batch 1 --lora --lora-r 32 $COMMON
  echo "=== done in ${SECONDS}s"
}

main 2>&1 | tee "$LOG"
