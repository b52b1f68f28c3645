#!/usr/bin/env bash
# safetune <-> Hugging Face PEFT round trip (see README.md). Run from the repo root:
#   interop/run.sh WORK_DIR
# Needs ./target/release/safetune and python3 with torch, transformers, peft (no network).
# Prints one JSON summary line last; exits non-zero if any check fails.
set -euo pipefail

WORK=${1:?usage: interop/run.sh WORK_DIR}
BIN=${SAFETUNE:-./target/release/safetune}
PY=${PYTHON:-python3}
TOL=${TOL:-1e-4}
SCRIPT=interop/peft_roundtrip.py
[[ -x $BIN ]] || { echo "no safetune binary at $BIN (build it or set SAFETUNE)" >&2; exit 2; }
mkdir -p "$WORK"

step=setup
trap 'echo "{\"ok\": false, \"failed_step\": \"$step\", \"work\": \"$WORK\"}"' ERR

BASE=$WORK/base OUT=$WORK/safetune_out PEFT_OUT=$WORK/peft_out MERGED=$WORK/merged
EVAL=$WORK/eval.csv

step=make-base
$PY $SCRIPT make-base "$WORK"

step=safetune-train
$BIN train --model "$BASE" --data "$WORK/train.csv" --output "$OUT" --epochs 1 \
  --max-steps-per-epoch 5 --lr 5e-2 --lora-r 4 --lora-alpha 8 --lora-dropout 0 \
  --target-modules query,value --max-length 128 --quiet

step=safetune-eval
$BIN eval --model "$BASE" --adapter "$OUT" --data "$EVAL" --split all --max-length 128 \
  --logits-out "$WORK/safetune_logits.json"

step=peft-logits
$PY $SCRIPT peft-logits --base "$BASE" --adapter "$OUT" --data "$EVAL" --out "$WORK/peft_logits.json"

step=train-peft
$PY $SCRIPT train-peft --base "$BASE" --data "$WORK/train.csv" --out "$PEFT_OUT"
$PY $SCRIPT peft-logits --base "$BASE" --adapter "$PEFT_OUT" --data "$EVAL" \
  --out "$WORK/peft_trained_logits.json"

step=safetune-eval-peft-adapter
$BIN eval --model "$BASE" --adapter "$PEFT_OUT" --data "$EVAL" --split all --max-length 128 \
  --logits-out "$WORK/safetune_on_peft_logits.json"

step=safetune-merge
$BIN merge --model "$BASE" --adapter "$OUT" --output "$MERGED"

step=hf-logits
$PY $SCRIPT hf-logits --model "$MERGED" --data "$EVAL" --out "$WORK/merged_logits.json"

# The checks: run them all, then summarize.
step=compare
trap - ERR
failed=0
results=()
check() {
  local line
  if line=$($PY $SCRIPT compare --tol "$TOL" "$@"); then :; else failed=1; fi
  [[ -n $line ]] || line="{\"check\": \"$1\", \"pass\": false, \"error\": \"compare failed\"}"
  echo "$line" >&2
  results+=("$line")
}
check safetune_adapter_in_peft "$WORK/safetune_logits.json" "$WORK/peft_logits.json"
check peft_adapter_in_safetune "$WORK/safetune_on_peft_logits.json" "$WORK/peft_trained_logits.json"
check merged_in_transformers "$WORK/merged_logits.json" "$WORK/peft_logits.json"

ok=$([[ $failed == 0 ]] && echo true || echo false)
joined=$(IFS=,; echo "${results[*]}")
echo "{\"ok\": $ok, \"work\": \"$WORK\", \"checks\": [$joined]}"
exit $failed
