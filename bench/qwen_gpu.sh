#!/bin/bash
# Qwen2.5-Coder-0.5B (GGUF) on one GPU (issue #19): a factual chat prompt, then train-lm LoRA vs
# SAFE under a memory budget (60% of LoRA's step peak) on Moby Dick, 3 seeds each at once.
#   K=/root/keep OUT=/tmp/out bash bench/qwen_gpu.sh
# K holds the CUDA binary (safetune), K/qwen.gguf (or GGUF=another file, e.g. the 1.5B) and
# K/cache/moby-dick.
set -u
K=${K:-/root/keep}; BIN=$K/safetune; Q=${GGUF:-$K/qwen.gguf}; R=$OUT/qwen; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/local/nvidia/lib64
export SAFETUNE_CACHE=$K/cache
SEEDS=${SEEDS:-42 43 44}
ARGS="--device cuda --model $Q --epochs 2 --max-steps-per-epoch 60 --quiet"
$BIN generate --device cuda --model $Q --chat --max-new-tokens 24 \
  --prompt "What is the capital of France? Answer in one sentence."
for s in $SEEDS; do $BIN train-lm $ARGS --method lora --seed $s --output $R/lora-$s > $R/lora-$s.log 2>&1 & done; wait
B=$(python3 -c "import json,glob;print(int(0.6*max(json.loads(l)['step_mem_bytes'] for f in glob.glob('$R/lora-*/metrics.jsonl') for l in open(f))))")
echo "budget_bytes $B"
for s in $SEEDS; do $BIN train-lm $ARGS --method safe --memory-budget $B --seed $s --output $R/safe-$s > $R/safe-$s.log 2>&1 & done; wait
python3 - $R <<'PY'
import glob, json, os, sys
for f in sorted(glob.glob(sys.argv[1] + "/*/summary.json")):
    s = json.load(open(f)); m = [json.loads(l) for l in open(os.path.dirname(f) + "/metrics.jsonl")]
    print(json.dumps({"run": os.path.basename(os.path.dirname(f)), "test_ppl": s.get("test_perplexity"), "base_ppl": s.get("base_test_perplexity"),
        "train_s": s.get("train_wall_s"), "step_max_mb": max(e["step_mem_bytes"] for e in m) / 1e6,
        "frozen": len(s.get("frozen") or []), "flops": s.get("train_flops"), "monitor_flops": s.get("monitor_flops")}))
PY
for f in $R/*.log; do grep -l "error" $f && tail -3 $f; done
