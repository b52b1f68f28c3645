"""Independent reference for the Qwen2.5-Coder-0.5B GGUF asset (tests/fixtures/qwen2/reference.json).

    pip install gguf transformers numpy   (no torch needed)
    python3 scripts/qwen2_reference.py PATH/qwen2.5-coder-0.5b-instruct.gguf tests/fixtures/qwen2/reference.json

- Token ids: transformers' own `Qwen2Tokenizer` (its normalizer, split regex and byte-level BPE)
  over the vocab and merges stored in the GGUF file, with the file's control tokens as special
  tokens; it shares no code with safetune's GGUF tokenizer.
- Logits: a float64 numpy forward pass of Qwen2 written here from the architecture's definition,
  on weights dequantized by the `gguf` package (llama.cpp's reference Python implementation of
  the block formats).
"""
import json
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from transformers import Qwen2Tokenizer

path, out = sys.argv[1], sys.argv[2]
TEXTS = [
    "Hello, world!",
    "The year 2024 had 366 days; 12345 apples cost $6.78.",
    "def add(a, b):\n    return a + b\n",
    "  Leading spaces,\ttabs and\r\nnew lines.",
    "naïve café, Straße, 東京, emoji 🚀",
    "I'm sure they've said it's DON'T, WE'LL",
]
PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"

r = GGUFReader(path)
tokens = r.fields["tokenizer.ggml.tokens"].contents()
types = r.fields["tokenizer.ggml.token_type"].contents()
merges = r.fields["tokenizer.ggml.merges"].contents()
tok = Qwen2Tokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ")) for m in merges])
tok.add_special_tokens({"additional_special_tokens": [t for t, k in zip(tokens, types) if k == 3]})
ids = [tok.encode(t, add_special_tokens=False) for t in TEXTS]
prompt_ids = tok.encode(PROMPT, add_special_tokens=False)

meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.ggml")}
W = {}
for t in r.tensors:
    a = dequantize(t.data, t.tensor_type).astype(np.float64)
    W[t.name] = a.reshape([int(d) for d in reversed(t.shape)]) if a.ndim == 1 and len(t.shape) > 1 else a

L = meta["qwen2.block_count"]
H = meta["qwen2.attention.head_count"]
KV = meta["qwen2.attention.head_count_kv"]
eps = meta["qwen2.attention.layer_norm_rms_epsilon"]
theta = meta["qwen2.rope.freq_base"]
d = meta["qwen2.embedding_length"]
hd = d // H


def rms(x, w):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def rope(x, pos):  # x: [T, heads, hd]; HF rotate_half
    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    ang = pos[:, None] * inv[None, :]
    cos = np.concatenate([np.cos(ang)] * 2, -1)[:, None, :]
    sin = np.concatenate([np.sin(ang)] * 2, -1)[:, None, :]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * cos + np.concatenate([-x2, x1], -1) * sin


T = len(prompt_ids)
x = W["token_embd.weight"][prompt_ids]
pos = np.arange(T, dtype=np.float64)
mask = np.triu(np.full((T, T), -np.inf), 1)
for i in range(L):
    p = f"blk.{i}."
    h = rms(x, W[p + "attn_norm.weight"])
    q = (h @ W[p + "attn_q.weight"].T + W[p + "attn_q.bias"]).reshape(T, H, hd)
    k = (h @ W[p + "attn_k.weight"].T + W[p + "attn_k.bias"]).reshape(T, KV, hd)
    v = (h @ W[p + "attn_v.weight"].T + W[p + "attn_v.bias"]).reshape(T, KV, hd)
    q, k = rope(q, pos), rope(k, pos)
    k = np.repeat(k, H // KV, axis=1)
    v = np.repeat(v, H // KV, axis=1)
    s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd) + mask
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    ctx = np.einsum("hqk,khd->qhd", s, v).reshape(T, H * hd)
    x = x + ctx @ W[p + "attn_output.weight"].T
    h = rms(x, W[p + "ffn_norm.weight"])
    g = h @ W[p + "ffn_gate.weight"].T
    u = h @ W[p + "ffn_up.weight"].T
    x = x + ((g / (1 + np.exp(-g))) * u) @ W[p + "ffn_down.weight"].T
x = rms(x, W["output_norm.weight"])
head = W.get("output.weight", W["token_embd.weight"])
logits = x[-1] @ head.T
order = np.argsort(-logits)
rng = np.random.default_rng(0)
probe = [int(i) for i in order[:32]] + [int(i) for i in rng.choice(len(logits), 32, replace=False)]

json.dump(
    {
        "source": "scripts/qwen2_reference.py (transformers Qwen2Tokenizer over the GGUF vocab and merges; numpy float64 forward on gguf-dequantized weights)",
        "texts": TEXTS,
        "ids": ids,
        "prompt": PROMPT,
        "prompt_ids": prompt_ids,
        "last_logits": {"ids": probe, "values": [float(logits[i]) for i in probe]},
        "argmax_token": tok.decode([int(order[0])]),
    },
    open(out, "w"),
    separators=(",", ":"),
)
print("argmax", int(order[0]), repr(tok.decode([int(order[0])])), "top5", [int(i) for i in order[:5]])
