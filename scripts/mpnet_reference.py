"""Independent reference for the all-mpnet-base-v2 asset (tests/fixtures/mpnet/reference.json).

    pip install numpy safetensors tokenizers   (no torch needed)
    python3 scripts/mpnet_reference.py PATH/all-mpnet-base-v2 tests/fixtures/mpnet/reference.json

A float64 numpy forward of transformers' `MPNetModel` (embeddings with positions counted from
the padding index, post-LN layers, the relative position bias of `MPNetEncoder`), written here
from the architecture's definition, on a right-padded batch of two sentences. Stores the ids,
and the last hidden state of every real token at every 7th feature.
"""
import json
import math
import sys

import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

model_dir, out = sys.argv[1], sys.argv[2]
cfg = json.load(open(f"{model_dir}/config.json"))
W = {k: v.astype(np.float64) for k, v in load_file(f"{model_dir}/model.safetensors").items() if v.dtype != np.int64}
tok = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
tok.no_truncation()
tok.no_padding()
TEXTS = ["The quick brown fox jumps over the lazy dog.", "MPNet sees relative positions, not only absolute ones!"]
enc = [tok.encode(t).ids for t in TEXTS]
T = max(len(e) for e in enc)
pad = cfg["pad_token_id"]
ids = np.array([e + [pad] * (T - len(e)) for e in enc])
mask = (ids != pad).astype(np.float64)
H, L, eps = cfg["num_attention_heads"], cfg["num_hidden_layers"], cfg["layer_norm_eps"]
d = cfg["hidden_size"]
hd = d // H
B = len(TEXTS)


def ln(x, p):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * W[p + ".weight"] + W[p + ".bias"]


def lin(x, p):
    return x @ W[p + ".weight"].T + W[p + ".bias"]


def gelu(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def bucket(rel, num_buckets=32, max_distance=128):
    ret = 0
    n = -rel
    num_buckets //= 2
    ret += (n < 0) * num_buckets
    n = abs(n)
    max_exact = num_buckets // 2
    if n < max_exact:
        return ret + n
    large = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact))
    return ret + min(large, num_buckets - 1)


pos = np.cumsum(mask, 1) * mask + pad
x = W["embeddings.word_embeddings.weight"][ids] + W["embeddings.position_embeddings.weight"][pos.astype(int)]
x = ln(x, "embeddings.LayerNorm")
rb = np.array([[bucket(j - i, cfg["relative_attention_num_buckets"]) for j in range(T)] for i in range(T)])
bias = W["encoder.relative_attention_bias.weight"][rb].transpose(2, 0, 1)[None]  # [1, H, T, T]
add = bias + (1 - mask)[:, None, None, :] * -1e9
for i in range(L):
    p = f"encoder.layer.{i}."
    q, k, v = (lin(x, p + f"attention.attn.{n}").reshape(B, T, H, hd).transpose(0, 2, 1, 3) for n in "qkv")
    s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd) + add
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    ctx = (s @ v).transpose(0, 2, 1, 3).reshape(B, T, d)
    a = ln(lin(ctx, p + "attention.attn.o") + x, p + "attention.LayerNorm")
    x = ln(lin(gelu(lin(a, p + "intermediate.dense")), p + "output.dense") + a, p + "output.LayerNorm")

json.dump(
    {
        "source": "scripts/mpnet_reference.py (numpy float64 MPNetModel forward)",
        "texts": TEXTS,
        "input_ids": ids.tolist(),
        "lengths": [len(e) for e in enc],
        "feature_step": 7,
        "hidden": [[x[b, t, ::7].tolist() for t in range(len(enc[b]))] for b in range(B)],
    },
    open(out, "w"),
    separators=(",", ":"),
)
print("ids", ids.tolist())
