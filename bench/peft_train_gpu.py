#!/usr/bin/env python3
"""PyTorch + PEFT on a whole training run, the counterpart of `safetune demo`/`train` on the same
data: MiniLM-style BERT + LoRA (r 8, alpha 16, dropout 0.1 on query/value) + a new classifier,
batch 16, 128 tokens, AdamW lr 1e-3 with 6% linear warm-up (safetune train's default), 3 epochs, f32, split 80/10/10 by a
seeded stratified shuffle like safetune's (not the same permutation: compare means, not seeds).
With --grad-ckpt, transformers' gradient checkpointing (its usual tool for a memory budget).

Prints one JSON line: test accuracy, training wall time, and the step peak above what is live
before the step (max_memory_allocated - memory_allocated, the same allocator level safetune logs).

    python3 bench/peft_train_gpu.py --model MINILM_DIR --data BBC_DIR --kind folder|spam \
        [--seed 42] [--epochs 3] [--grad-ckpt]
"""
import argparse, json, os, random, time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--data", required=True)
p.add_argument("--kind", choices=["folder", "spam"], default="folder")
p.add_argument("--seed", type=int, default=42)
p.add_argument("--epochs", type=int, default=3)
p.add_argument("--batch", type=int, default=16)
p.add_argument("--max-length", type=int, default=128)
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--grad-ckpt", action="store_true")
p.add_argument("--targets", default="query,value", help="LoRA target modules (MPNet: q,v)")
a = p.parse_args()


def email_text(raw):
    head, _, body = raw.replace("\r\n", "\n").partition("\n\n")
    subject = None
    for line in head.split("\n"):
        if line[:8].lower() == "subject:" and subject is None:
            subject = line[8:].strip()
    return (f"Subject: {subject}\n{body.strip()}" if subject is not None else body).strip()


def load():
    rows = []
    if a.kind == "folder":
        for label, cls in enumerate(sorted(os.listdir(a.data))):
            d = os.path.join(a.data, cls)
            for f in sorted(os.listdir(d)):
                rows.append((open(os.path.join(d, f), encoding="utf-8", errors="replace").read(), label))
    else:
        data = os.path.join(a.data, "data") if os.path.isdir(os.path.join(a.data, "data")) else a.data
        for g in sorted(os.listdir(data)):
            gd = os.path.join(data, g)
            if not os.path.isdir(gd):
                continue
            for f in sorted(os.listdir(gd)):
                if f.endswith(".json"):
                    continue
                raw = open(os.path.join(gd, f), encoding="latin-1").read()
                rows.append((email_text(raw), int(g.startswith("spam"))))
    return rows


rows = load()
rng = random.Random(a.seed)
by_label = {}
for r in rows:
    by_label.setdefault(r[1], []).append(r)
train, val, test = [], [], []
for label, rs in sorted(by_label.items()):
    rng.shuffle(rs)
    n_val = n_test = round(0.1 * len(rs))
    test += rs[:n_test]
    val += rs[n_test:n_test + n_val]
    train += rs[n_test + n_val:]
num_labels = len(by_label)

torch.manual_seed(a.seed)
dev = torch.device("cuda")
tok = AutoTokenizer.from_pretrained(a.model)
model = AutoModelForSequenceClassification.from_pretrained(a.model, num_labels=num_labels,
                                                           dtype=torch.float32).to(dev)
cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=a.targets.split(","),
                 modules_to_save=["classifier"])
model = get_peft_model(model, cfg)
if a.grad_ckpt:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
params = [q for q in model.parameters() if q.requires_grad]
opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
steps_per_epoch = (len(train) + a.batch - 1) // a.batch
total = steps_per_epoch * a.epochs
warm = round(0.06 * total)
sched = torch.optim.lr_scheduler.LambdaLR(
    opt, lambda s: (s + 1) / max(1, warm) if s < warm else max(0.0, (total - s) / max(1, total - warm)))


def batches(data, shuffle, epoch):
    idx = list(range(len(data)))
    if shuffle:
        random.Random(a.seed + epoch).shuffle(idx)
    for i in range(0, len(idx), a.batch):
        b = [data[j] for j in idx[i:i + a.batch]]
        enc = tok([t for t, _ in b], truncation=True, max_length=a.max_length, padding=True,
                  return_tensors="pt").to(dev)
        yield enc, torch.tensor([l for _, l in b], device=dev)


def accuracy(data):
    model.eval()
    right = 0
    with torch.no_grad():
        for enc, y in batches(data, False, 0):
            right += (model(**enc).logits.argmax(-1) == y).sum().item()
    model.train()
    return right / max(1, len(data))


model.train()
step_peak = 0
val_s = 0.0
torch.cuda.synchronize()
t0 = time.time()
for epoch in range(a.epochs):
    for enc, y in batches(train, True, epoch):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = torch.nn.functional.cross_entropy(model(**enc).logits, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        step_peak = max(step_peak, torch.cuda.max_memory_allocated() - before)
    tv = time.time()
    accuracy(val)  # validation each epoch, as safetune does; its time is not training time
    val_s += time.time() - tv
torch.cuda.synchronize()
train_s = time.time() - t0 - val_s
print(json.dumps({"framework": "pytorch+peft", "kind": a.kind, "seed": a.seed, "grad_ckpt": a.grad_ckpt,
                  "epochs": a.epochs, "train_s": round(train_s, 2), "step_peak_mb": round(step_peak / 1e6, 1),
                  "test_accuracy": round(accuracy(test), 4), "train": len(train), "test": len(test)}))
