#!/bin/bash
# Does Hugging Face PEFT load a LoRA adapter that safetune trained on the Qwen2 GGUF (issue #19)?
# Part 1, here (any machine with safetune): train a short all-linear LoRA on Moby Dick and write
# safetune's next-token logits with and without it:
#   bash bench/qwen_peft_check.sh GGUF DIR            (BIN=path/to/safetune, default: cargo's release build;
#                                                      DEVICE=cuda trains on the GPU, the logits stay on the CPU)
# Part 2, where torch, transformers, peft and gguf are installed: load the GGUF with transformers,
# the adapter with PeftModel.from_pretrained, and compare the logits:
#   python3 bench/qwen_peft_check.py GGUF DIR/adapter HF_OUT DIR/both.json
set -eu
Q=$1; W=$2; BIN=${BIN:-target/release/safetune}; mkdir -p $W
$BIN train-lm --model $Q ${DEVICE:+--device $DEVICE} --epochs 1 --max-steps-per-epoch ${STEPS:-8} --quiet --method lora \
  --target-modules all-linear --lr 1e-3 --output $W/adapter --overwrite > $W/train.log 2>&1
P="Call me Ishmael. Some years ago, never mind how long precisely, having little money in my purse"
$BIN generate --model $Q --prompt "$P" --max-new-tokens 1 --logits-out $W/base.json > /dev/null
$BIN generate --model $Q --adapter $W/adapter --prompt "$P" --max-new-tokens 1 --logits-out $W/adapted.json > /dev/null
python3 -c "
import json; d={k: json.load(open('$W/'+k+'.json')) for k in ['base','adapted']}; json.dump(d, open('$W/both.json','w'))"
echo "now: python3 bench/qwen_peft_check.py $Q $W/adapter HF_OUT $W/both.json"
