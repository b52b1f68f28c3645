#!/bin/bash
# SAFE under a memory budget on a LLaMA-7B-shaped Hugging Face checkpoint (issue #16): transformers
# writes a random LlamaForCausalLM (32 x 4096, FFN 11008, vocab 32000, bf16, 5 GB shards), then
# train-lm LoRA, and SAFE with --memory-budget at 60% of LoRA's step peak, on Moby Dick (MiniLM's
# tokenizer.json serves a random model), one after the other on one GPU.
#   BIN=path/to/safetune OUT=/tmp/out SAFETUNE_CACHE=dir-with-moby-dick bash bench/llama7b_budget_gpu.sh
set -u
BIN=${BIN:?the CUDA safetune binary}; M=${M:-/tmp/hf7b}; R=$OUT/llama7b; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/local/nvidia/lib64
if [ ! -f $M/model.safetensors.index.json ]; then
  python3 - $M <<'PY'
import sys, torch, transformers
cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                               num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
torch.manual_seed(0)
with torch.device("cuda"):
    m = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
m.save_pretrained(sys.argv[1], max_shard_size="5GB")
PY
  cp interop/tokenizer.json $M/
fi
ARGS="train-lm --model $M --device cuda --dtype bf16 --epochs ${EPOCHS:-2} --max-steps-per-epoch ${STEPS:-30} --max-eval-sequences 8 --safe-rounds-per-epoch ${ROUNDS:-2} --seed 42 --quiet"
$BIN $ARGS --method lora --output $R/lora > $R/lora.log 2>&1
B=$(python3 -c "import json;print(int(0.6*max(json.loads(l)['step_mem_bytes'] for l in open('$R/lora/metrics.jsonl'))))")
echo "budget_bytes $B"
# SAFE_ARGS: more flags for the SAFE run (e.g. --safe-measure passes).
$BIN $ARGS --method safe --memory-budget $B ${SAFE_ARGS:-} --output $R/safe > $R/safe.log 2>&1
python3 - $R $B <<'PY'
import glob, json, os, sys
for f in sorted(glob.glob(sys.argv[1] + "/*/summary.json")):
    s = json.load(open(f)); m = [json.loads(l) for l in open(os.path.dirname(f) + "/metrics.jsonl")]
    print(json.dumps({"run": os.path.basename(os.path.dirname(f)), "budget_bytes": int(sys.argv[2]),
        "test_ppl": s.get("test_perplexity"), "base_ppl": s.get("base_test_perplexity"), "train_s": s.get("train_wall_s"),
        "step_max_bytes": max(e["step_mem_bytes"] for e in m), "estimated": [e.get("plan", {}).get("estimated_step_bytes") for e in m],
        "frozen": len(s.get("frozen") or []), "flops": s.get("train_flops"), "monitor_flops": s.get("monitor_flops")}))
PY
for f in $R/*.log; do grep -l "error" $f && tail -3 $f; done
