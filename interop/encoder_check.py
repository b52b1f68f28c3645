#!/usr/bin/env python3
"""RoBERTa / DistilBERT (any encoder family) against transformers and PEFT, after safetune ran:

    python3 interop/encoder_check.py BASE ADAPTER MERGED DATA.csv SAFETUNE_LOGITS.json [MAX_LENGTH]

BASE is the Hugging Face folder safetune trained on, ADAPTER its PEFT adapter (`safetune train`),
MERGED `safetune merge`'s output, SAFETUNE_LOGITS `safetune eval --split all --logits-out` on
DATA. Checks, in float32 on the CPU, one example at a time (tokenized by BASE's tokenizer.json as
safetune does: no padding, cut at MAX_LENGTH, default 32):
  - PeftModel.from_pretrained(AutoModelForSequenceClassification(BASE), ADAPTER) gives safetune's
    logits (PEFT wraps the head as its modules_to_save says);
  - AutoModelForSequenceClassification.from_pretrained(MERGED) loads with no missing or unexpected
    tensors and gives the same logits.
Prints one JSON line per check; exits 1 if one fails (max |diff| over 1e-4).
"""
import csv
import json
import sys

import torch
from peft import PeftModel
from tokenizers import Tokenizer
from transformers import AutoModelForSequenceClassification

base, adapter, merged, data, st_logits = sys.argv[1:6]
max_length = int(sys.argv[6]) if len(sys.argv) > 6 else 32
with open(data, newline="", encoding="utf-8") as f:
    texts = [r["text"] for r in csv.DictReader(f)]
tok = Tokenizer.from_file(f"{base}/tokenizer.json")
tok.no_padding()
tok.enable_truncation(max_length=max_length)
want = torch.tensor(json.load(open(st_logits))["logits"], dtype=torch.float32)
labels = want.shape[1]


def logits(model):
    out = []
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([tok.encode(t).ids])
            out.append(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0])
    return torch.stack(out)


failed = False


def report(check, got, extra=None):
    global failed
    d = (got - want).abs().max().item()
    ok = d < 1e-4 and not extra
    failed |= not ok
    print(json.dumps({"check": check, "base": base, "max_abs_diff": d, "pass": ok,
                      "problems": extra or None}))


kw = dict(attn_implementation="eager")
m = AutoModelForSequenceClassification.from_pretrained(
    base, num_labels=labels, ignore_mismatched_sizes=True, **kw).float().eval()
pm = PeftModel.from_pretrained(m, adapter).eval()
wrapped = sorted(n for n, mod in pm.named_modules() if type(mod).__name__ == "ModulesToSaveWrapper")
print(json.dumps({"base": base, "modules_to_save_wrapped": wrapped}))
report("peft_adapter_vs_safetune", logits(pm))

mm, info = AutoModelForSequenceClassification.from_pretrained(merged, output_loading_info=True, **kw)
problems = {k: v for k, v in info.items() if v}
report("merged_vs_safetune", logits(mm.float().eval()), problems)
sys.exit(1 if failed else 0)
