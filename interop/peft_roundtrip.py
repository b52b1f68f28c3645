#!/usr/bin/env python3
"""Hugging Face side of the safetune <-> PEFT interop check (see README.md and run.sh).

Subcommands:
  make-base WORK                       tiny random BERT in WORK/base, WORK/train.csv, WORK/eval.csv
  peft-logits --base B --adapter A --data CSV --out JSON
                                       base + PeftModel.from_pretrained(A): logits per row of CSV
  train-peft --base B --data CSV --out DIR
                                       5 AdamW steps (lr 3e-2) of PEFT LoRA (r=4, alpha=8, query,value), saved to DIR
  hf-logits --model M --data CSV --out JSON
                                       plain BertForSequenceClassification.from_pretrained(M) logits
  compare NAME A.json B.json [--tol T] one JSON line {check, max_abs_diff, pass}; exit 1 if it fails

Logits files are {"logits": [[...], ...]}, one row per data row in file order. Everything runs in
float32 on the CPU, one example at a time (no padding), tokenized by tokenizer.json exactly as
safetune does (the `tokenizers` library, [CLS] ... [SEP], truncation to 128, no padding).
"""
import argparse
import csv
import json
import os
import random
import shutil
import sys

import torch

MAX_LENGTH = 128
HERE = os.path.dirname(os.path.abspath(__file__))


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [r["text"] for r in rows], [r["label"].strip() for r in rows]


def write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)


def tokenizer(path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(path)
    tok.no_padding()  # MiniLM's tokenizer.json pads to 128 by default; safetune never pads
    tok.enable_truncation(max_length=MAX_LENGTH)
    return tok


def load_model(path):
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(path, attn_implementation="eager")
    return model.float().eval()


def logits_for(model, tok, texts):
    model.eval()
    out = []
    with torch.no_grad():
        for text in texts:
            enc = tok.encode(text)
            ids = torch.tensor([enc.ids])
            logits = model(
                input_ids=ids,
                token_type_ids=torch.tensor([enc.type_ids]),
                attention_mask=torch.ones_like(ids),
            ).logits
            out.append(logits[0].tolist())
    return out


def write_logits(path, logits):
    with open(path, "w") as f:
        json.dump({"logits": logits}, f)
    print(f"wrote {len(logits)} rows of logits to {path}", file=sys.stderr)


# ---- subcommands -------------------------------------------------------------------------------


def make_base(a):
    from transformers import BertConfig, BertForSequenceClassification

    base = os.path.join(a.work, "base")
    os.makedirs(base, exist_ok=True)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
        num_labels=3,
    )
    # bert.-prefixed keys (safetune accepts both layouts); transformers 5 always writes safetensors
    # (its save_pretrained no longer takes safe_serialization).
    BertForSequenceClassification(cfg).save_pretrained(base)
    shutil.copy(os.path.join(HERE, "tokenizer.json"), os.path.join(base, "tokenizer.json"))

    topics = {
        "a": ["the striker", "our goalkeeper", "the home team", "the coach", "a young sprinter"],
        "b": ["the soup", "my grandmother's bread", "this curry", "the chef", "a ripe mango"],
        "c": ["the storm", "a cold front", "the morning fog", "heavy rain", "the summer heat"],
    }
    verbs = {
        "a": ["scored twice in the final", "trained hard before the match", "won the league title",
              "missed a penalty late in the game"],
        "b": ["tasted of garlic and lemon", "was baked fresh this morning", "needed more salt",
              "was served with rice and beans"],
        "c": ["rolled in from the coast", "closed every road in the valley", "lasted all weekend",
              "brought snow to the hills"],
    }
    rows = [(f"{s} {v}.".capitalize(), lab) for lab in "abc" for s in topics[lab] for v in verbs[lab]]
    random.Random(0).shuffle(rows)
    write_csv(os.path.join(a.work, "train.csv"), rows)  # 60 rows, 20 per class

    long = " ".join(["The referee, the players and the fans all agreed that the match was long."] * 14)
    write_csv(
        os.path.join(a.work, "eval.csv"),
        [
            ("Goal!", "a"),
            ("The midfielder passed the ball to the winger, who crossed it into the box.", "a"),
            ("Pasta", "b"),
            ("We ate pancakes with maple syrup, blueberries and a little cream for breakfast.", "b"),
            ("It will be sunny tomorrow.", "c"),
            ("Thunder and lightning kept the whole village awake until dawn", "c"),
            ("Did the team win?", "a"),
            ("The café on the corner sells the best croissants in town.", "b"),
            ("Wind gusts of 90 km/h are expected along the northern coast tonight.", "c"),
            (long, "a"),  # > 128 tokens: checks truncation matches
        ],
    )
    print(f"base model in {base}; train.csv and eval.csv in {a.work}", file=sys.stderr)


def peft_logits(a):
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file

    model = PeftModel.from_pretrained(load_model(a.base), a.adapter).float().eval()
    # Everything in the adapter file was loaded, and nothing else is part of the adapter.
    saved = load_file(os.path.join(a.adapter, "adapter_model.safetensors"))
    loaded = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(model).items()}
    if set(saved) != set(loaded):
        sys.exit(f"adapter keys differ: only in file {sorted(set(saved) - set(loaded))}, "
                 f"only in PEFT model {sorted(set(loaded) - set(saved))}")
    for k in saved:
        if not torch.equal(saved[k].float(), loaded[k].float()):
            sys.exit(f"{k}: PEFT holds different values than the file")
    b_max = max(v.abs().max().item() for k, v in saved.items() if "lora_B" in k)
    if b_max == 0:
        sys.exit(f"{a.adapter}: every lora_B is zero, the LoRA path would go untested")
    print(f"adapter: {len(saved)} tensors loaded exactly, max |lora_B| = {b_max:.3g}", file=sys.stderr)
    texts, _ = read_csv(a.data)
    tok = tokenizer(os.path.join(a.base, "tokenizer.json"))
    logits = logits_for(model, tok, texts)
    write_logits(a.out, logits)
    # The LoRA path must move the logits well beyond the tolerance, or the checks could not see it:
    # the same model with every lora_B zeroed (classifier kept) must differ by more than 1e-3.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.zero_()
    plain = logits_for(model, tok, texts)
    effect = max(abs(x - y) for r, s in zip(logits, plain) for x, y in zip(r, s))
    print(f"LoRA effect on the logits: max |diff| = {effect:.3g}", file=sys.stderr)
    if effect < 1e-3:
        sys.exit(f"{a.adapter}: LoRA changes the logits by only {effect:.3g}; the checks would not see it")


def train_peft(a):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = LoraConfig(
        task_type="SEQ_CLS",
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
    )
    model = get_peft_model(load_model(a.base), cfg)
    tok = tokenizer(os.path.join(a.base, "tokenizer.json"))
    texts, labels = read_csv(a.data)
    names = sorted(set(labels))
    y = [names.index(l) for l in labels]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    model.train()
    for step in range(5):
        idx = [(step * 8 + i) % len(texts) for i in range(8)]
        encs = [tok.encode(texts[i]) for i in idx]
        n = max(len(e.ids) for e in encs)
        pad = lambda xs: list(xs) + [0] * (n - len(xs))  # noqa: E731
        loss = model(
            input_ids=torch.tensor([pad(e.ids) for e in encs]),
            token_type_ids=torch.tensor([pad(e.type_ids) for e in encs]),
            attention_mask=torch.tensor([pad([1] * len(e.ids)) for e in encs]),
            labels=torch.tensor([y[i] for i in idx]),
        ).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        print(f"step {step + 1}: loss {loss.item():.4f}", file=sys.stderr)
    model.save_pretrained(a.out)
    print(f"PEFT adapter in {a.out}: {sorted(os.listdir(a.out))}", file=sys.stderr)


def hf_logits(a):
    texts, _ = read_csv(a.data)
    tok = tokenizer(a.tokenizer or os.path.join(a.model, "tokenizer.json"))
    write_logits(a.out, logits_for(load_model(a.model), tok, texts))


def compare(a):
    x = json.load(open(a.a))["logits"]
    y = json.load(open(a.b))["logits"]
    if len(x) != len(y) or any(len(r) != len(s) for r, s in zip(x, y)):
        diff, rows = None, []
        print(f"{a.name}: shapes differ ({len(x)} vs {len(y)} rows)", file=sys.stderr)
    else:
        rows = [max(abs(p - q) for p, q in zip(r, s)) for r, s in zip(x, y)]
        diff = max(rows)
    ok = diff is not None and diff < a.tol
    print(json.dumps({"check": a.name, "max_abs_diff": diff, "tol": a.tol, "pass": ok,
                      "rows": len(x), "per_row": rows}))
    sys.exit(0 if ok else 1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("make-base")
    s.add_argument("work")
    s.set_defaults(func=make_base)
    s = sub.add_parser("peft-logits")
    for f in ("--base", "--adapter", "--data", "--out"):
        s.add_argument(f, required=True)
    s.set_defaults(func=peft_logits)
    s = sub.add_parser("train-peft")
    for f in ("--base", "--data", "--out"):
        s.add_argument(f, required=True)
    s.set_defaults(func=train_peft)
    s = sub.add_parser("hf-logits")
    for f in ("--model", "--data", "--out"):
        s.add_argument(f, required=True)
    s.add_argument("--tokenizer", help="default: MODEL/tokenizer.json")
    s.set_defaults(func=hf_logits)
    s = sub.add_parser("compare")
    s.add_argument("name")
    s.add_argument("a")
    s.add_argument("b")
    s.add_argument("--tol", type=float, default=1e-4)
    s.set_defaults(func=compare)
    a = p.parse_args()
    a.func(a)


if __name__ == "__main__":
    main()
