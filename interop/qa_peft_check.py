#!/usr/bin/env python3
"""PEFT loads safetune's question-answering adapters (GPU machine: torch, transformers, peft):

    python3 interop/qa_peft_check.py BASE ADAPTER MERGED [BASE ADAPTER MERGED ...]

Each triple: a Hugging Face encoder folder (tests/fixtures/hf/{bert,roberta,distilbert}-qa), a
safetune QA adapter trained on it (`safetune train --task qa`), and `safetune merge`'s output.
`safetune merge` is checked in the Rust tests to give the adapted model's span logits, so here:
  - PeftModel.from_pretrained(AutoModelForQuestionAnswering(BASE), ADAPTER) targets modules and
    gives the start/end logits of AutoModelForQuestionAnswering(MERGED) (float32, CPU);
  - MERGED loads with no missing or unexpected tensors;
  - the adapter moves the base model's logits (a check that compares something).
Prints one JSON line per triple; exits 1 if one fails (max |diff| over 1e-4).
"""
import json
import sys

import torch
from peft import PeftModel
from tokenizers import Tokenizer
from transformers import AutoModelForQuestionAnswering

QUESTION = "Where is the cat?"
CONTEXT = "The cat sat on the mat in the kitchen, and the dog slept by the door."
ok = True
args = sys.argv[1:]
for base, adapter, merged in zip(args[0::3], args[1::3], args[2::3]):
    enc = Tokenizer.from_file(f"{base}/tokenizer.json").encode(QUESTION, CONTEXT)
    ids = torch.tensor([enc.ids])

    def logits(model):
        with torch.no_grad():
            out = model(input_ids=ids)
        return torch.stack([out.start_logits, out.end_logits])

    plain = AutoModelForQuestionAnswering.from_pretrained(base).eval()
    before = logits(plain)
    peft_model = PeftModel.from_pretrained(plain, adapter).eval()
    targeted = sorted({n.rsplit(".lora_A", 1)[0] for n, _ in peft_model.named_modules() if n.endswith("lora_A")})
    adapted = logits(peft_model)
    m, info = AutoModelForQuestionAnswering.from_pretrained(merged, output_loading_info=True)
    merged_logits = logits(m.eval())
    diff = (adapted - merged_logits).abs().max().item()
    moved = (adapted - before).abs().max().item()
    missing, unexpected = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
    good = bool(targeted) and diff < 1e-4 and moved > 1e-3 and not missing and not unexpected
    ok &= good
    print(json.dumps({"base": base, "ok": good, "targeted_modules": len(targeted),
                      "max_abs_diff_peft_vs_merged": diff, "adapter_moves_logits_by": moved,
                      "missing": missing, "unexpected": unexpected}), flush=True)
sys.exit(0 if ok else 1)
