#!/bin/bash
# Qwen2.5-Coder-0.5B (GGUF) train-lm on the GPU machine's CPU (16 cores): LoRA, then SAFE under
# 60% of LoRA's step peak, on Moby Dick (the CPU protocol of the SmolLM2 runs: 30 steps, 16
# validation/test sequences). K holds the CPU binary (safetune), K/qwen.gguf and K/cache/moby-dick:
#   K=/root/keep OUT=/tmp/out SEED=42 bash bench/qwen_cpu.sh
set -u
K=${K:-/root/keep}; BIN=$K/safetune; Q=$K/qwen.gguf; R=$OUT/qwen-cpu; mkdir -p $R
export SAFETUNE_CACHE=$K/cache
S=${SEED:-42}
ARGS="--device cpu --model $Q --epochs 1 --max-steps-per-epoch 30 --max-eval-sequences 16 --quiet"
nproc; lscpu | grep -E "Model name|Flags" | cut -c1-200
( time $BIN train-lm $ARGS --method lora --seed $S --output $R/lora-$S ) > $R/lora-$S.log 2>&1
tail -14 $R/lora-$S.log
B=$(python3 -c "import json;print(int(0.6*max(json.loads(l)['step_mem_bytes'] for l in open('$R/lora-$S/metrics.jsonl'))))")
echo "budget_bytes $B"
( time $BIN train-lm $ARGS --method safe --safe-rounds-per-epoch 4 --memory-budget $B --seed $S --output $R/safe-$S ) > $R/safe-$S.log 2>&1
tail -14 $R/safe-$S.log
