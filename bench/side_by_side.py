#!/usr/bin/env python3
"""Runs `safetune bench` and PyTorch + PEFT (bench/peft_bench.py) on the same shapes and freezing
patterns, one process per configuration, and prints a markdown table of ours / theirs ratios.

    python3 bench/side_by_side.py --device cpu --cores 0,1 --shape minilm --frozen 0,3,5
    python3 bench/side_by_side.py --device cuda --shape bert-base --frozen 0,6
    python3 bench/side_by_side.py --device cpu --shape smollm2 --batch 4 --frozen 0,15,25

On CPU both are pinned to the same cores (taskset) with as many threads; memory is peak RSS of the
whole process. On CUDA, memory is peak allocated device memory above the weights.
"""
import argparse, json, os, subprocess, sys

SHAPES = {  # layers, hidden, heads, ffn, and for decoders the architecture flags
    "minilm": (6, 384, 12, 1536, []),
    "bert-base": (12, 768, 12, 3072, []),
    "bert-large": (24, 1024, 16, 4096, []),
    # SmolLM2-135M's body (9 heads sharing 3 kv heads) with peft_bench.py's LLaMA vocabulary of
    # 32000 (SmolLM2's is 49152); LoRA on q_proj / v_proj, next-token loss on every position.
    "smollm2": (30, 576, 9, 1536, ["--arch", "llama", "--kv-heads", "3"]),
}

p = argparse.ArgumentParser()
p.add_argument("--device", default="cpu")
p.add_argument("--cores", default="0,1")
p.add_argument("--shape", default="minilm")
p.add_argument("--frozen", default="0")
p.add_argument("--batch", type=int, default=16)
p.add_argument("--seq", type=int, default=128)
p.add_argument("--lora-r", type=int, default=8)
p.add_argument("--steps", type=int, default=6)
p.add_argument("--safetune", default="./target/release/safetune")
p.add_argument("--python", default=sys.executable)
a = p.parse_args()
layers, hidden, heads, ffn, arch = SHAPES[a.shape]
threads = len(a.cores.split(","))
shape = ["--layers", str(layers), "--hidden", str(hidden), "--heads", str(heads), "--ffn", str(ffn),
         "--batch", str(a.batch), "--seq", str(a.seq), "--lora-r", str(a.lora_r), "--steps", str(a.steps),
         *arch]
pin = ["taskset", "-c", a.cores] if a.device == "cpu" else []
env = dict(os.environ, RAYON_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))

def run(cmd):
    out = subprocess.run(pin + cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])

rows = []
for k in [int(x) for x in a.frozen.split(",")]:
    ours = run([a.safetune, "bench", *shape, "--frozen-prefix", str(k), "--warmup", "2"])
    theirs = run([a.python, "bench/peft_bench.py", *shape, "--frozen-prefix", str(k), "--device", a.device,
                  "--dtype", "f32", "--threads", str(threads) if a.device == "cpu" else "0"])
    mem_o = ours["peak_rss_mb"] if a.device == "cpu" else ours["peak_mem_mb"]
    mem_t = theirs["peak_rss_mb"] if a.device == "cpu" else theirs["peak_mem_mb"]
    rows.append((k, ours["step_ms_median"], theirs["step_ms_median"], mem_o, mem_t))
    print(json.dumps({"frozen_prefix": k, "safetune": ours, "pytorch_peft": theirs}), flush=True)

mem = "peak RSS MB" if a.device == "cpu" else "peak MB above weights"
print(f"\n{a.shape} {a.device} batch {a.batch} seq {a.seq} LoRA r={a.lora_r} q/v, f32, {threads if a.device == 'cpu' else ''} threads")
print(f"| frozen prefix | safetune ms | PyTorch+PEFT ms | time ratio | safetune {mem} | PyTorch+PEFT {mem} | memory ratio |")
print("|---|---|---|---|---|---|---|")
for k, to, tt, mo, mt in rows:
    print(f"| {k} | {to:.0f} | {tt:.0f} | {to / tt:.2f} | {mo:.0f} | {mt:.0f} | {mo / mt:.2f} |")
