#!/usr/bin/env python3
"""PyTorch + PEFT LoRA training steps on the CPU, the counterpart of a `safetune train --device cpu`
step at the same shapes: any Hugging Face sequence classifier (BERT, MPNet, ...) + LoRA (r 8,
alpha 16, dropout 0.1) on --targets + the new classifier, AdamW lr 1e-3, f32, batch 16 x 128
random tokens (a step's cost does not depend on the token values).

Prints one JSON line: the median step time over --steps steps after 2 warm-up steps, the RSS before
the first step and the peak RSS during the steps (Linux: the peak is reset after loading, so it is
the steps' own; their difference is the step's working set, comparable to safetune's step peak,
though RSS also counts the allocator's cached pages).

    python3 bench/peft_cpu_step.py MODEL_DIR --targets q,v [--num-labels 5] [--threads 2]
"""
import argparse, json, statistics, time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("--targets", default="query,value")
p.add_argument("--num-labels", type=int, default=5)
p.add_argument("--batch", type=int, default=16)
p.add_argument("--seq", type=int, default=128)
p.add_argument("--steps", type=int, default=10)
p.add_argument("--threads", type=int, default=2)
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)

m = AutoModelForSequenceClassification.from_pretrained(a.model, num_labels=a.num_labels)
cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=a.targets.split(","),
                 modules_to_save=["classifier"])
m = get_peft_model(m, cfg)
m.train()
opt = torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-3)
vocab = m.config.vocab_size
ids = torch.randint(1000, vocab - 1, (a.batch, a.seq))
labels = torch.randint(0, a.num_labels, (a.batch,))



def rss_kb(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":"))


rss_before = rss_kb("VmRSS")
with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM, the peak RSS, to the current RSS
    f.write("5")
times = []
for step in range(a.steps + 2):
    t = time.perf_counter()
    m(input_ids=ids, labels=labels).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if step >= 2:
        times.append(time.perf_counter() - t)
peak = rss_kb("VmHWM")
print(json.dumps({"framework": "pytorch+peft-cpu", "torch": torch.__version__, "model": a.model,
                  "threads": a.threads, "batch": a.batch, "seq": a.seq,
                  "step_s_median": round(statistics.median(times), 3),
                  "peak_rss_mb": round(peak / 1024, 1), "rss_before_mb": round(rss_before / 1024, 1)}))
