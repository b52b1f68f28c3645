#!/usr/bin/env python3
"""Correctness of safetune on a GPU against its CPU path: the same training steps on both devices,
losses compared step by step.

    python3 bench/gpu_check.py --safetune .device/safetune [--work DIR] [--tokenizer interop/tokenizer.json]

1. `safetune bench` on small random models (BERT and a grouped-query LLaMA, weights from the
   seeded host RNG so both devices start equal), f32: CPU and CUDA losses agree to 1e-3 relative
   over 6 optimizer steps; bf16 on CUDA follows f32 to 3e-2.
2. If torch and transformers import: a tiny random BERT folder written by transformers (with the
   BERT tokenizer given), `safetune train --method safe` on a generated CSV on both devices (no
   dropout): per-epoch train losses and validation metrics agree; then `eval` on CUDA.
Exit status 1 if anything disagrees. Prints one JSON line per check.
"""
import argparse, json, os, shutil, subprocess, sys, tempfile

p = argparse.ArgumentParser()
p.add_argument("--safetune", default=".device/safetune")
p.add_argument("--tokenizer", default="interop/tokenizer.json")
p.add_argument("--work", default=None)
a = p.parse_args()
work = a.work or tempfile.mkdtemp(prefix="gpu_check_")
os.makedirs(work, exist_ok=True)
failures = []


def run(args, **kw):
    r = subprocess.run([a.safetune, *args], capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"safetune {' '.join(args)} failed:\n{r.stderr[-3000:]}")
    return r.stdout


def report(name, ok, **info):
    print(json.dumps({"check": name, "ok": bool(ok), **info}), flush=True)
    if not ok:
        failures.append(name)


def bench(flags):
    return json.loads(run(["bench", "--warmup", "2", "--steps", "4", "--host-init", *flags]).strip().splitlines()[-1])


def close(x, y, rel):
    return all(abs(u - v) <= rel * max(abs(v), 1.0) for u, v in zip(x, y))


SMALL = {
    "bert": ["--arch", "bert", "--layers", "2", "--hidden", "256", "--heads", "4", "--ffn", "1024",
             "--vocab", "2000", "--batch", "4", "--seq", "64"],
    "bert-frozen": ["--arch", "bert", "--layers", "3", "--hidden", "256", "--heads", "4", "--ffn", "1024",
                    "--vocab", "2000", "--batch", "4", "--seq", "64", "--frozen-prefix", "1",
                    "--targets", "query,value,output.dense"],
    "llama-gqa": ["--arch", "llama", "--layers", "2", "--hidden", "256", "--heads", "8", "--kv-heads", "2",
                  "--ffn", "512", "--vocab", "3000", "--batch", "2", "--seq", "64"],
}
for name, flags in SMALL.items():
    try:
        cpu = bench([*flags, "--device", "cpu"])
        gpu = bench([*flags, "--device", "cuda"])
        bf = bench([*flags, "--device", "cuda", "--dtype", "bf16"])
        report(f"bench {name} f32 cpu vs cuda", close(gpu["losses"], cpu["losses"], 1e-3),
               cpu=cpu["losses"], cuda=gpu["losses"], cuda_ms=gpu["step_ms_median"])
        report(f"bench {name} bf16 vs f32 on cuda", close(bf["losses"], gpu["losses"], 3e-2),
               bf16=bf["losses"], f32=gpu["losses"], bf16_peak_mb=bf["peak_mem_mb"], f32_peak_mb=gpu["peak_mem_mb"])
    except Exception as e:  # noqa: BLE001 - report and go on
        report(f"bench {name}", False, error=str(e)[-2000:])

try:
    import torch
    from transformers import BertConfig, BertForSequenceClassification
except Exception:  # noqa: BLE001
    torch = None
if torch is not None and os.path.exists(a.tokenizer):
    try:
        model = os.path.join(work, "tiny-bert")
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                         intermediate_size=128, max_position_embeddings=64, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)
        BertForSequenceClassification(cfg).save_pretrained(model, safe_serialization=True)
        shutil.copy(a.tokenizer, os.path.join(model, "tokenizer.json"))
        csv = os.path.join(work, "data.csv")
        good, bad = ["great", "wonderful", "lovely", "superb", "charming"], ["awful", "boring", "dull", "terrible", "clumsy"]
        with open(csv, "w") as fh:
            fh.write("text,label\n")
            for i in range(60):
                fh.write(f"a {good[i % 5]} film and a {good[(i + 2) % 5]} ending,pos\n")
                fh.write(f"the {bad[i % 5]} plot with {bad[(i + 3) % 5]} acting,neg\n")
        logs = {}
        for dev in ["cpu", "cuda"]:
            out = os.path.join(work, f"run-{dev}")
            run(["train", "--model", model, "--data", csv, "--output", out, "--device", dev, "--method", "safe",
                 "--epochs", "3", "--batch-size", "8", "--lora-dropout", "0", "--max-length", "32",
                 "--safe-rounds-per-epoch", "2", "--safe-monitor-examples", "16", "--quiet", "--seed", "7"])
            logs[dev] = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
        c, g = logs["cpu"], logs["cuda"]
        report("train --method safe cpu vs cuda",
               close([e["train_loss"] for e in g], [e["train_loss"] for e in c], 1e-3)
               and [e["validation_metric"] for e in g] == [e["validation_metric"] for e in c]
               and [e["frozen"] for e in g] == [e["frozen"] for e in c],
               cpu=[(e["train_loss"], e["validation_metric"], len(e["frozen"])) for e in c],
               cuda=[(e["train_loss"], e["validation_metric"], len(e["frozen"]), e.get("peak_mem_bytes"),
                      e.get("driver_used_bytes")) for e in g])
        ev = json.loads(run(["eval", "--model", model, "--adapter", os.path.join(work, "run-cuda"), "--data", csv,
                             "--device", "cuda", "--max-length", "32", "--seed", "7"]))
        summ = json.load(open(os.path.join(work, "run-cuda", "summary.json")))
        report("eval on cuda matches the run's test score", abs(ev["metric"] - summ["value"]) < 1e-9,
               eval=ev["metric"], summary=summ["value"], memory_counter=summ.get("memory_counter"))
        bf = os.path.join(work, "run-bf16")
        run(["train", "--model", model, "--data", csv, "--output", bf, "--device", "cuda", "--dtype", "bf16",
             "--epochs", "2", "--batch-size", "8", "--max-length", "32", "--quiet", "--seed", "7"])
        report("train bf16 on cuda runs", True, summary=json.load(open(os.path.join(bf, "summary.json")))["value"])
    except Exception as e:  # noqa: BLE001
        report("train on cuda", False, error=str(e)[-2000:])

print(json.dumps({"failures": failures}))
sys.exit(1 if failures else 0)
