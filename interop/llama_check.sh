#!/bin/bash
# SmolLM2 next-token logits: safetune (Rust, f32) against interop/llama_reference.py (numpy, f64,
# its own GGUF parser and dequantization). Prints the largest absolute difference over the whole
# vocabulary and both top-5 lists. Usage: interop/llama_check.sh [SAFETUNE_BIN] [PROMPT]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/safetune}
PROMPT=${2:-The capital of France is}
OUT=$(mktemp -d)
"$BIN" fetch smollm2 >/dev/null
GGUF=$(find "${SAFETUNE_CACHE:-$HOME/.cache/safetune}/smollm2" -name '*.gguf' | head -1)
"$BIN" generate --prompt "$PROMPT" --max-new-tokens 1 --logits-out "$OUT/ours.json" >/dev/null
IDS=$(python3 -c "import json,sys; print(','.join(map(str, json.load(open(sys.argv[1]))['ids'])))" "$OUT/ours.json")
python3 interop/llama_reference.py "$GGUF" --ids "$IDS" --top 5 --out "$OUT/ref.json" >/dev/null
python3 - "$OUT/ours.json" "$OUT/ref.json" <<'PY'
import json, sys
import numpy as np
ours = np.array(json.load(open(sys.argv[1]))["logits"], dtype=np.float64)
ref = np.array(json.load(open(sys.argv[2]))["logits"], dtype=np.float64)
top = lambda v: [int(i) for i in np.argsort(-v)[:5]]
print(json.dumps({"vocab": len(ref), "max_abs_diff": float(np.abs(ours - ref).max()),
                  "top5_ours": top(ours), "top5_reference": top(ref),
                  "same_argmax": top(ours)[0] == top(ref)[0]}))
PY
