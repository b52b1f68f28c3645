#!/usr/bin/env python3
"""safetune against PyTorch + PEFT on one GPU, in one session: the shapes of the reference numbers
in ../shared/cuda/README.md, bf16, LoRA r=4, each with nothing frozen and with the bottom half of
the layers' adapters frozen. Prints every run as a JSON line, then a markdown table of the ratios
ours / PyTorch+PEFT (step time, peak memory above the weights) and of each run's memory against
its own unfrozen run.

    python3 bench/side_by_side_gpu.py --safetune .device/safetune [--out results.jsonl]
        [--shapes bert-base,bert-large,llama-7b] [--steps 20]

`--rows long`: instead, the LLaMA-7B-shaped rows of the GPU issue (batch 2 x 512 with and
without the bottom 16 layers' adapters frozen; batch 1 x 2,048 with LoRA r16 on every linear;
batch 1 x 4,096 and 8,192 with r4 on q/v; 8,192 and 2 x 512 with gradient checkpointing in both),
each against PyTorch + PEFT and, with `--liger` (Liger-Kernel importable), PEFT + Liger.
`--liger-wheel WHEEL` installs Liger-Kernel for the run from its wheel (checked against the pinned
sha256 of liger_kernel 0.8.5, the version the BENCHMARKS rows used) into a temporary folder, for a
GPU machine without network: fetch the wheel beforehand with `pip download liger-kernel==0.8.5
--no-deps -d DIR` and carry it. `--budget-fraction 0.6` adds safetune under `--memory-budget`, set
from the references just measured so that its peak above the weights stays under 0.6x the smaller
one's: once with the plan free to offload (`--budget-offload`), once recomputing only.

Run on the GPU machine (torch, transformers, peft installed; the CUDA libraries on
LD_LIBRARY_PATH for safetune). One PyTorch process per shape (its start-up is long), one safetune
process per run. Memory on both sides is the allocator's peak above what is live before the first
step (PyTorch: max_memory_allocated - memory_allocated; safetune: the CUDA pool's USED_MEM_HIGH
minus USED_MEM_CURRENT).
"""
import argparse, hashlib, json, os, subprocess, sys, tempfile, time

LIGER_WHEEL = ("liger_kernel-0.8.5-py3-none-any.whl",
               "60789cd576af073ab9b192b570d2597fd0cdad489cd62fb44fb16256d43754c9")

# preset, arch, shape flags for peft_bench.py, frozen prefixes (0 and half the layers).
SHAPES = {
    "bert-base": ("bert", ["--layers", "12", "--hidden", "768", "--heads", "12", "--ffn", "3072",
                           "--batch", "32", "--seq", "128"], [0, 6]),
    "bert-large": ("bert", ["--layers", "24", "--hidden", "1024", "--heads", "16", "--ffn", "4096",
                            "--batch", "32", "--seq", "128"], [0, 12]),
    "llama-7b": ("llama", ["--layers", "32", "--hidden", "4096", "--heads", "32", "--ffn", "11008",
                           "--batch", "2", "--seq", "512"], [0, 16]),
}

p = argparse.ArgumentParser()
p.add_argument("--safetune", default=".device/safetune")
p.add_argument("--python", default=sys.executable)
p.add_argument("--peft-bench", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "peft_bench.py"))
p.add_argument("--shapes", default="bert-base,bert-large,llama-7b")
p.add_argument("--dtype", default="bf16")
p.add_argument("--steps", type=int, default=20)
p.add_argument("--warmup", type=int, default=3)
p.add_argument("--out", default=None, help="also append every JSON line to this file")
p.add_argument("--skip-peft", action="store_true", help="only safetune (e.g. to re-measure it)")
p.add_argument("--skip-safetune", action="store_true", help="with --rows long: only the references")
p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing in both frameworks")
p.add_argument("--rows", default="shapes", choices=["shapes", "long"], help="long: the LLaMA-7B rows of the GPU issue")
p.add_argument("--liger", action="store_true", help="with --rows long: also PyTorch + PEFT + Liger-Kernel")
p.add_argument("--liger-wheel", default=None, help="install Liger-Kernel from this wheel (pinned sha256) for the run; implies --liger")
p.add_argument("--only", default=None, help="with --rows long: these rows only, 0-based indices (e.g. 2,3,4)")
p.add_argument("--budget-fraction", type=float, default=None,
               help="with --rows long: also safetune under --memory-budget, set so that its peak above the weights "
                    "stays under this fraction of the smaller reference's (e.g. 0.6), once with the plan's offload "
                    "(--budget-offload) and once recomputing only")
a = p.parse_args()


def install_liger(wheel):
    """Liger-Kernel from its pinned wheel into a temporary folder on PYTHONPATH (the PyTorch
    processes inherit it): no network, no change to the machine's packages."""
    name, sha = LIGER_WHEEL
    with open(wheel, "rb") as f:
        got = hashlib.sha256(f.read()).hexdigest()
    if os.path.basename(wheel) != name or got != sha:
        sys.exit(f"{wheel}: expected {name} with sha256 {sha}, got {os.path.basename(wheel)} with {got}")
    target = tempfile.mkdtemp(prefix="liger-")
    subprocess.run([a.python, "-m", "pip", "install", "--quiet", "--no-deps", "--target", target, wheel], check=True)
    os.environ["PYTHONPATH"] = os.pathsep.join(x for x in [target, os.environ.get("PYTHONPATH")] if x)


if a.liger_wheel:
    install_liger(a.liger_wheel)
    a.liger = True

out = open(a.out, "a") if a.out else None


def emit(rec):
    line = json.dumps(rec)
    print(line, flush=True)
    if out:
        out.write(line + "\n"); out.flush()


def run_lines(cmd):
    t = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"FAILED ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}", file=sys.stderr, flush=True)
        return []
    recs = [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]
    for rec in recs:
        rec["wall_s"] = round(time.time() - t, 1)
    return recs


# --rows long: (label, batch, seq, lora r, targets, frozen prefix, gradient checkpointing, with Liger)
LONG = [
    ("b2 s512 r4 q/v", 2, 512, 4, "qv", 0, False, False),
    ("b2 s512 r4 q/v, bottom 16 frozen", 2, 512, 4, "qv", 16, False, False),
    ("b1 s2048 r16 all-linear", 1, 2048, 16, "all-linear", 0, False, True),
    ("b1 s4096 r4 q/v", 1, 4096, 4, "qv", 0, False, True),
    ("b1 s8192 r4 q/v", 1, 8192, 4, "qv", 0, False, True),
    ("b1 s8192 r4 q/v, checkpointing", 1, 8192, 4, "qv", 0, True, False),
    ("b2 s512 r4 q/v, checkpointing", 2, 512, 4, "qv", 0, True, False),
]
LLAMA_7B = ["--layers", "32", "--hidden", "4096", "--heads", "32", "--ffn", "11008"]


def long_rows():
    table = []
    only = None if a.only is None else {int(i) for i in a.only.split(",")}
    for i, (label, batch, seq, r, targets, frozen, ckpt, liger) in enumerate(LONG):
        if only is not None and i not in only:
            continue
        cmd = [a.safetune, "bench", "--preset", "llama-7b", "--device", "cuda", "--dtype", a.dtype,
               "--batch-size", str(batch), "--max-length", str(seq), "--lora-r", str(r),
               "--frozen-prefix", str(frozen), "--warmup", str(a.warmup), "--steps", str(a.steps)]
        if targets == "all-linear":
            cmd += ["--target-modules", "all-linear"]
        if ckpt:
            cmd += ["--gradient-checkpointing"]
        row = {"label": label}
        for rec in ([] if a.skip_safetune else run_lines(cmd)):
            rec.pop("losses", None)
            rec["row"] = label
            emit(rec)
            row["safetune"] = rec
        refs = [("peft", [])] + ([("liger", ["--liger"])] if liger and a.liger else [])
        for name, extra in refs:
            if a.skip_peft:
                continue
            for rec in run_lines([a.python, a.peft_bench, "--arch", "llama", *LLAMA_7B, "--batch", str(batch),
                                  "--seq", str(seq), "--dtype", a.dtype, "--lora-r", str(r), "--targets", targets,
                                  "--frozen-prefix", str(frozen), "--steps", str(a.steps), *extra]
                                 + (["--grad-ckpt"] if ckpt else [])):
                rec["row"] = label
                emit(rec)
                row[name] = rec
        peaks = [r["peak_mem_mb"] for k, r in row.items() if k in ("peft", "liger")]
        if a.budget_fraction and peaks and "safetune" in row and not ckpt:
            # The budget bounds a step's peak; the peak above the weights adds what lives between
            # steps (the adapters' optimizer state), as the plain run measured it.
            s = row["safetune"]
            target = a.budget_fraction * min(peaks)
            budget = int(target - (s["peak_mem_mb"] - s["step_peak_mem_mb"]))
            for tag, extra in (("offload", ["--budget-offload"]), ("recompute", [])):
                for rec in run_lines(cmd + ["--memory-budget", f"{budget}MiB", *extra]):
                    rec.pop("losses", None)
                    rec.update(row=label, budget_mib=budget, target_mb=target)
                    emit(rec)
                    row[f"budget-{tag}"] = rec
        table.append(row)
    print("\n| row | safetune ms | PEFT ms | PEFT + Liger ms | safetune peak MB | PEFT peak MB | PEFT + Liger peak MB "
          "| time vs faster reference | peak vs smaller reference | safetune TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in table:
        g = lambda k, key: (row.get(k) or {}).get(key)
        times = [x for x in (g("peft", "step_ms_median"), g("liger", "step_ms_median")) if x]
        peaks = [x for x in (g("peft", "peak_mem_mb"), g("liger", "peak_mem_mb")) if x]
        om, op = g("safetune", "step_ms_median"), g("safetune", "peak_mem_mb")
        print(f"| {row['label']} | {f(om)} | {f(g('peft', 'step_ms_median'))} | {f(g('liger', 'step_ms_median'))} "
              f"| {f(op, '{:.0f}')} | {f(g('peft', 'peak_mem_mb'), '{:.0f}')} | {f(g('liger', 'peak_mem_mb'), '{:.0f}')} "
              f"| {f(ratio(om, min(times) if times else None), '{:.2f}')} | {f(ratio(op, min(peaks) if peaks else None), '{:.2f}')} "
              f"| {f(g('safetune', 'tflops_per_s'), '{:.0f}')} |")


    if not a.budget_fraction:
        return
    print(f"\nsafetune under --memory-budget (peak target {a.budget_fraction} x the smaller reference's)")
    print("| row | plan | budget MiB | step ms | peak MB | time vs faster reference | peak vs smaller reference |")
    print("|---|---|---|---|---|---|---|")
    for row in table:
        times = [row[k]["step_ms_median"] for k in ("peft", "liger") if k in row]
        peaks = [row[k]["peak_mem_mb"] for k in ("peft", "liger") if k in row]
        for tag in ("offload", "recompute"):
            r = row.get(f"budget-{tag}")
            if not r:
                continue
            print(f"| {row['label']} | {tag}: {r.get('plan')} | {r['budget_mib']} | {f(r['step_ms_median'])} "
                  f"| {f(r['peak_mem_mb'], '{:.0f}')} | {f(ratio(r['step_ms_median'], min(times)), '{:.2f}')} "
                  f"| {f(ratio(r['peak_mem_mb'], min(peaks)), '{:.2f}')} |")


def f(x, fmt="{:.1f}"):
    return "-" if x is None else fmt.format(x)


def ratio(x, y):
    return None if x is None or y is None or y == 0 else x / y


if a.rows == "long":
    long_rows()
    sys.exit(0)

rows = []
for name in a.shapes.split(","):
    arch, flags, frozen = SHAPES[name]
    ours = {}
    for k in frozen:
        for rec in run_lines([a.safetune, "bench", "--preset", name, "--device", "cuda", "--dtype", a.dtype,
                              "--lora-r", "4", "--frozen-prefix", str(k), "--warmup", str(a.warmup),
                              "--steps", str(a.steps)] + (["--gradient-checkpointing"] if a.grad_ckpt else [])):
            rec.pop("losses", None)
            rec["shape"] = name
            emit(rec)
            ours[k] = rec
    theirs = {}
    if not a.skip_peft:
        for rec in run_lines([a.python, a.peft_bench, "--arch", arch, *flags, "--dtype", a.dtype, "--lora-r", "4",
                              "--frozen-prefix", ",".join(map(str, frozen)), "--steps", str(a.steps)]
                             + (["--grad-ckpt"] if a.grad_ckpt else [])):
            rec["shape"] = name
            emit(rec)
            theirs[rec["frozen_prefix"]] = rec
    for k in frozen:
        rows.append((name, k, ours.get(k), theirs.get(k), ours.get(frozen[0])))


print(f"\n{a.dtype}{', gradient checkpointing' if a.grad_ckpt else ''}, LoRA r=4 (BERT: query/value, batch 32, seq 128; LLaMA: q_proj/v_proj, batch 2, seq 512)")
print("| shape | frozen prefix | safetune ms | PyTorch+PEFT ms | time ratio | safetune peak MB | PyTorch+PEFT peak MB "
      "| memory ratio | safetune memory vs its unfrozen run | safetune TFLOP/s | safetune driver MB |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for name, k, o, t, o0 in rows:
    g = lambda r, key: None if r is None else r.get(key)
    om, tm = g(o, "step_ms_median"), g(t, "step_ms_median")
    op, tp = g(o, "peak_mem_mb"), g(t, "peak_mem_mb")
    print(f"| {name} | {k} | {f(om)} | {f(tm)} | {f(ratio(om, tm), '{:.2f}')} | {f(op, '{:.0f}')} | {f(tp, '{:.0f}')} "
          f"| {f(ratio(op, tp), '{:.2f}')} | {f(ratio(op, g(o0, 'peak_mem_mb')), '{:.2f}')} "
          f"| {f(g(o, 'tflops_per_s'), '{:.0f}')} | {f(g(o, 'driver_used_mb'), '{:.0f}')} |")
