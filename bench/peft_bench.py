# Reference point: HF transformers + PEFT LoRA on a BERT-shaped encoder (random init).
# Copied from shared/bench/peft_bench.py; extended with --device cpu, --threads, --lora-r and --dropout
# so the same script measures PyTorch + PEFT beside `safetune bench` on the CPU too, and with
# --frozen-prefix K1,K2 (one process, several freezing patterns: torch's start-up once), and
# --grad-ckpt (transformers' gradient checkpointing), --targets all-linear, --liger (Liger-Kernel's
# apply_liger_kernel_to_llama: fused RMSNorm, RoPE, SwiGLU and linear + cross-entropy).
# Prints one JSON line per run.
import json, sys, time, argparse, statistics
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM
from peft import LoraConfig, get_peft_model

p = argparse.ArgumentParser()
p.add_argument("--layers", type=int, default=12); p.add_argument("--hidden", type=int, default=768)
p.add_argument("--heads", type=int, default=12); p.add_argument("--ffn", type=int, default=3072)
p.add_argument("--batch", type=int, default=32); p.add_argument("--seq", type=int, default=128)
p.add_argument("--frozen-prefix", default="0", help="K, or K1,K2,... (one run per value in this process)")
p.add_argument("--steps", type=int, default=20)
p.add_argument("--dtype", default="bf16"); p.add_argument("--attn", default="sdpa")
p.add_argument("--full", action="store_true")
p.add_argument("--arch", default="bert", choices=["bert", "llama"])
p.add_argument("--kv-heads", type=int, default=0)
p.add_argument("--device", default="cuda"); p.add_argument("--threads", type=int, default=0)
p.add_argument("--lora-r", type=int, default=4); p.add_argument("--dropout", type=float, default=0.0)
p.add_argument("--grad-ckpt", action="store_true", help="transformers' gradient checkpointing (use_reentrant=False)")
p.add_argument("--targets", default="qv", choices=["qv", "all-linear"], help="LoRA on query/value or every linear of the layers")
p.add_argument("--liger", action="store_true", help="LLaMA only: Liger-Kernel's apply_liger_kernel_to_llama before the model is built")
a = p.parse_args()
if a.liger:
    from liger_kernel.transformers import apply_liger_kernel_to_llama
    apply_liger_kernel_to_llama()
if a.threads: torch.set_num_threads(a.threads)
dev = a.device
dt = {"bf16": torch.bfloat16, "f32": torch.float32}[a.dtype]
import gc

def run(frozen):
    torch.manual_seed(0)
    if a.arch == "bert":
        cfg = BertConfig(vocab_size=30522, hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=a.heads,
                         intermediate_size=a.ffn, max_position_embeddings=512, num_labels=2,
                         hidden_dropout_prob=a.dropout, attention_probs_dropout_prob=a.dropout, attn_implementation=a.attn)
        vocab, targets, extra = 30522, ["query", "value"], dict(modules_to_save=["classifier"])
        if a.targets == "all-linear":
            targets = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
        with torch.device(dev):
            m = BertForSequenceClassification(cfg)
    else:
        cfg = LlamaConfig(vocab_size=32000, hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=a.heads,
                          num_key_value_heads=a.kv_heads or a.heads, intermediate_size=a.ffn,
                          max_position_embeddings=max(4096, a.seq), attn_implementation=a.attn)
        vocab, targets, extra = 32000, ["q_proj", "v_proj"], {}
        if a.targets == "all-linear":
            targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        with torch.device(dev):
            m = LlamaForCausalLM(cfg).to(dt)
    if not a.full:
        m = get_peft_model(m, LoraConfig(r=a.lora_r, lora_alpha=16, target_modules=targets, lora_dropout=0.0, **extra))
        for n, prm in m.named_parameters():
            if "lora_" in n:
                li = int(n.split("layers." if a.arch == "llama" else "layer.")[1].split(".")[0])
                if li < frozen:
                    prm.requires_grad_(False)
    m = m.to(dev, dtype=dt)
    if a.grad_ckpt:
        base_model = m if a.full else m.base_model.model
        base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.train()
    opt = torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-3)
    ids = torch.randint(0, vocab, (a.batch, a.seq), device=dev)
    labels = (ids[:, 0] % 2).long() if a.arch == "bert" else ids
    cuda = dev.startswith("cuda")
    import resource
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync(); base = torch.cuda.memory_allocated() if cuda else 0
    if cuda: torch.cuda.reset_peak_memory_stats()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, losses = [], []
    for s in range(a.steps + 3):
        sync(); t = time.perf_counter()
        out = m(input_ids=ids, labels=labels)
        out.loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        sync()
        if s >= 3: times.append((time.perf_counter() - t) * 1e3)
        losses.append(out.loss.item())
    print(json.dumps({"framework": ("pytorch+peft+liger" if a.liger else "pytorch+peft") if not a.full else "pytorch-full", "targets": a.targets, "arch": a.arch, "attn": a.attn, "device": dev, "threads": torch.get_num_threads(), "lora_r": a.lora_r,
                      "layers": a.layers, "hidden": a.hidden, "batch": a.batch, "seq": a.seq,
                      "frozen_prefix": frozen, "dtype": a.dtype, "gradient_checkpointing": a.grad_ckpt,
                      "step_ms_median": round(statistics.median(times), 3),
                      "peak_mem_mb": round((torch.cuda.max_memory_allocated() - base) / 2**20, 1) if cuda else None,
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), "rss_before_steps_mb": round(rss0 / 1024, 1),
                      "weights_mb": round(base / 2**20, 1),
                      "loss_first": losses[0], "loss_last": losses[-1]}), flush=True)
    del m, opt, out
    gc.collect()
    if cuda: torch.cuda.empty_cache()

for k in [int(x) for x in a.frozen_prefix.split(",")]:
    run(k)
