#!/usr/bin/env python3
"""Independent numpy reference for safetune's GGUF LLaMA loader and model.

Nothing here is shared with the Rust code or with llama.cpp / gguf-py: its own GGUF parser, its own
dequantization (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K), its own undoing of
llama.cpp's Q/K row permutation, and a plain LLaMA forward in Hugging Face semantics (RMSNorm,
rotate_half RoPE, grouped-query causal attention, SwiGLU, tied or untied head), in float64 by default.

    python3 interop/llama_reference.py GGUF --ids 1,2,3 [--top 10] [--out logits.json]
    python3 interop/llama_reference.py GGUF --ids 1,2,3 --check-permutation
    python3 interop/llama_reference.py GGUF --dump-dequant NAME[,NAME...]|all [--npy-dir DIR]
    python3 interop/llama_reference.py GGUF --info

NAME is a GGUF name (raw tensor as stored, llama.cpp row order) or a Hugging Face name (Q/K rows
un-permuted); `all` means every tensor under its Hugging Face name. Each dump is one JSON line
with the first values and three checksums (sum, sum of squares, position-weighted sum).
"""

import argparse
import json
import struct
import sys

import numpy as np

# ---------------------------------------------------------------- GGUF container

GGUF_MAGIC = 0x46554747  # "GGUF" little-endian
SCALAR = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8"}
STRING, ARRAY = 8, 9

# ggml type id -> (name, elements per block, bytes per block)
GGML_TYPES = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    30: ("BF16", 1, 2),
}


class Reader:
    def __init__(self, data, path):
        self.data, self.pos, self.path = data, 0, path

    def take(self, n):
        if self.pos + n > len(self.data):
            raise ValueError(f"{self.path}: truncated at byte {self.pos} (wanted {n} more)")
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def scalar(self, fmt):
        dt = np.dtype(fmt)
        return np.frombuffer(self.take(dt.itemsize), dtype=dt)[0].item()

    def string(self):
        n = self.scalar("<u8")
        return bytes(self.take(n)).decode("utf-8", errors="replace")

    def value(self, vtype):
        if vtype in SCALAR:
            v = self.scalar(SCALAR[vtype])
            return bool(v) if vtype == 7 else v
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            etype, n = self.scalar("<u4"), self.scalar("<u8")
            if etype in SCALAR and etype != 7:  # fast path for numeric arrays
                dt = np.dtype(SCALAR[etype])
                return np.frombuffer(self.take(n * dt.itemsize), dtype=dt).tolist()
            return [self.value(etype) for _ in range(n)]
        raise ValueError(f"{self.path}: unknown metadata value type {vtype}")


class Gguf:
    """Metadata dict plus tensor directory; tensor bytes are read lazily from a memory map."""

    def __init__(self, path):
        self.path = path
        self.data = np.memmap(path, dtype=np.uint8, mode="r")
        r = Reader(self.data, path)
        if r.scalar("<u4") != GGUF_MAGIC:
            raise ValueError(f"{path}: not a GGUF file (bad magic)")
        self.version = r.scalar("<u4")
        if self.version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {self.version} not supported")
        n_tensors, n_kv = r.scalar("<u8"), r.scalar("<u8")
        self.meta = {}
        for _ in range(n_kv):
            key = r.string()
            self.meta[key] = r.value(r.scalar("<u4"))
        self.tensors = {}
        for _ in range(n_tensors):
            name = r.string()
            n_dims = r.scalar("<u4")
            ne = [r.scalar("<u8") for _ in range(n_dims)]  # ggml order: fastest-varying first
            ttype, offset = r.scalar("<u4"), r.scalar("<u8")
            self.tensors[name] = (list(reversed(ne)), ttype, offset)  # row-major (numpy) shape
        align = int(self.meta.get("general.alignment", 32))
        self.data_start = (r.pos + align - 1) // align * align

    def raw(self, name):
        shape, ttype, offset = self.tensors[name]
        if ttype not in GGML_TYPES:
            raise ValueError(f"{self.path}: tensor {name} has ggml type {ttype}, not supported here")
        _, block, size = GGML_TYPES[ttype]
        n = int(np.prod(shape))
        nbytes = n // block * size
        start = self.data_start + offset
        if start + nbytes > len(self.data):
            raise ValueError(f"{self.path}: tensor {name} runs past the end of the file")
        return shape, ttype, np.asarray(self.data[start:start + nbytes])

    def dequant(self, name):
        shape, ttype, buf = self.raw(name)
        return dequantize(buf, ttype).reshape(shape)


# ---------------------------------------------------------------- dequantization (ggml layouts)

def f16(b):
    return b.copy().view("<f2").astype(np.float32)


def dequantize(buf, ttype):
    name, block, size = GGML_TYPES[ttype]
    if name == "F32":
        return buf.view("<f4").astype(np.float32)
    if name == "F16":
        return buf.view("<f2").astype(np.float32)
    if name == "BF16":
        return (buf.view("<u2").astype(np.uint32) << 16).view(np.float32)
    b = buf.reshape(-1, size)
    return DEQUANT[name](b).reshape(-1)


def nibbles(qs):
    """16 bytes -> 32 values: low nibbles are elements 0..15, high nibbles 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)


def q4_0(b):
    d = f16(b[:, 0:2])
    return d * (nibbles(b[:, 2:18]) - 8)


def q4_1(b):
    d, m = f16(b[:, 0:2]), f16(b[:, 2:4])
    return d * nibbles(b[:, 4:20]) + m


def fifth_bit(qh):
    """4 bytes of high bits (u32, bit j belongs to element j) -> (n, 32) values of 0 or 16."""
    bits = qh.copy().view("<u4")  # (n, 1)
    return (((bits >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.float32)


def q5_0(b):
    d = f16(b[:, 0:2])
    return d * (nibbles(b[:, 6:22]) + fifth_bit(b[:, 2:6]) - 16)


def q5_1(b):
    d, m = f16(b[:, 0:2]), f16(b[:, 2:4])
    return d * (nibbles(b[:, 8:24]) + fifth_bit(b[:, 4:8])) + m


def q8_0(b):
    d = f16(b[:, 0:2])
    return d * b[:, 2:34].copy().view(np.int8).astype(np.float32)


def k_scales(s):
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins per 256-element super-block."""
    s = s.astype(np.uint8)
    sc = np.empty((s.shape[0], 8), np.uint8)
    mn = np.empty((s.shape[0], 8), np.uint8)
    sc[:, :4] = s[:, 0:4] & 63
    mn[:, :4] = s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc.astype(np.float32), mn.astype(np.float32)


def q4_k(b):
    d, dmin = f16(b[:, 0:2]), f16(b[:, 2:4])
    sc, mn = k_scales(b[:, 4:16])
    qs = b[:, 16:144].reshape(-1, 4, 32)  # 4 chunks of 32 bytes, each 64 elements
    q = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(-1, 8, 32).astype(np.float32)  # sub-block j
    return ((d * sc)[:, :, None] * q - (dmin * mn)[:, :, None]).reshape(-1, 256)


def q5_k(b):
    d, dmin = f16(b[:, 0:2]), f16(b[:, 2:4])
    sc, mn = k_scales(b[:, 4:16])
    qh = b[:, 16:48]  # (n, 32): bit j of qh[l] is the fifth bit of element l of sub-block j
    qs = b[:, 48:176].reshape(-1, 4, 32)
    q = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(-1, 8, 32).astype(np.float32)
    high = ((qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1).astype(np.float32) * 16
    return ((d * sc)[:, :, None] * (q + high) - (dmin * mn)[:, :, None]).reshape(-1, 256)


def q6_k(b):
    ql = b[:, 0:128].reshape(-1, 2, 64)
    qh = b[:, 128:192].reshape(-1, 2, 32)
    sc = b[:, 192:208].copy().view(np.int8).astype(np.float32).reshape(-1, 2, 8)
    d = f16(b[:, 208:210]).reshape(-1, 1, 1, 1, 1)
    lo = [ql[:, :, :32] & 0x0F, ql[:, :, 32:] & 0x0F, ql[:, :, :32] >> 4, ql[:, :, 32:] >> 4]
    q = [(lo[i].astype(np.int16) | (((qh >> (2 * i)) & 3).astype(np.int16) << 4)) - 32 for i in range(4)]
    q = np.stack(q, axis=2).astype(np.float32)  # (n, 2 halves, 4 quarters, 32)
    # scale index within a half: quarter*2 + l // 16
    s = sc.reshape(-1, 2, 4, 2)[:, :, :, :, None]
    y = d * s * q.reshape(-1, 2, 4, 2, 16)
    return y.reshape(-1, 256)


DEQUANT = {"Q4_0": q4_0, "Q4_1": q4_1, "Q5_0": q5_0, "Q5_1": q5_1, "Q8_0": q8_0,
           "Q4_K": q4_k, "Q5_K": q5_k, "Q6_K": q6_k}

# ---------------------------------------------------------------- names, config, Q/K order

HF_OF = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def hf_name(g):
    top = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    if g in top:
        return top[g]
    _, layer, mod, w = g.split(".")
    return f"model.layers.{layer}.{HF_OF[mod]}.{w}"


def gguf_name(hf):
    inverse = {hf_name(g): g for g in ("token_embd.weight", "output_norm.weight", "output.weight")}
    if hf in inverse:
        return inverse[hf]
    parts = hf.split(".")  # model.layers.N.<a>.<b>.weight
    mod = {v: k for k, v in HF_OF.items()}[".".join(parts[3:-1])]
    return f"blk.{parts[2]}.{mod}.weight"


def config(g):
    m = g.meta
    heads = int(m["llama.attention.head_count"])
    return {
        "hidden": int(m["llama.embedding_length"]),
        "layers": int(m["llama.block_count"]),
        "heads": heads,
        "kv_heads": int(m.get("llama.attention.head_count_kv", heads)),
        "eps": float(m["llama.attention.layer_norm_rms_epsilon"]),
        "theta": float(m.get("llama.rope.freq_base", 10000.0)),
        "vocab": len(m["tokenizer.ggml.tokens"]),
        "tied": "output.weight" not in g.tensors,
    }


def unpermute(w, n_head):
    """llama.cpp stored rows as reshape(n_head, 2, hd/2, in).swapaxes(1, 2); swap back."""
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def hf_tensor(g, cfg, hf):
    """A tensor in Hugging Face layout (Q/K rows un-permuted)."""
    gn = gguf_name(hf)
    w = g.dequant(gn)
    if gn.endswith("attn_q.weight"):
        w = unpermute(w, cfg["heads"])
    elif gn.endswith("attn_k.weight"):
        w = unpermute(w, cfg["kv_heads"])
    return w


# ---------------------------------------------------------------- forward

def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope_tables(T, hd, theta, dtype):
    inv = 1.0 / (theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    ang = np.arange(T, dtype=np.float64)[:, None] * inv[None, :]  # (T, hd/2)
    return np.cos(ang).astype(dtype), np.sin(ang).astype(dtype)


def rope_half(x, cos, sin):
    """HF rotate_half: pairs (i, i + hd/2) rotate by angle i. x: (heads, T, hd)."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def rope_interleaved(x, cos, sin):
    """llama.cpp's normal mode: pairs (2i, 2i + 1) rotate by angle i (for un-permuted-free rows)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x2 * cos + x1 * sin
    return out


def forward(g, ids, dtype=np.float64, mode="hf"):
    """Last-position logits. mode: 'hf' (un-permute + rotate_half, what safetune does),
    'gguf' (stored rows + interleaved RoPE, what llama.cpp does), 'broken' (stored rows +
    rotate_half: what forgetting the un-permutation gives)."""
    cfg = config(g)
    H, nh, nkv = cfg["hidden"], cfg["heads"], cfg["kv_heads"]
    hd = H // nh
    T = len(ids)
    cos, sin = rope_tables(T, hd, cfg["theta"], dtype)
    rope = rope_interleaved if mode == "gguf" else rope_half

    def W(gn):
        w = g.dequant(gn)
        if mode == "hf" and gn.endswith("attn_q.weight"):
            w = unpermute(w, nh)
        if mode == "hf" and gn.endswith("attn_k.weight"):
            w = unpermute(w, nkv)
        return w.astype(dtype)

    emb = g.dequant("token_embd.weight")
    x = emb[np.asarray(ids)].astype(dtype)
    mask = np.triu(np.full((T, T), -np.inf, dtype=dtype), k=1)
    for l in range(cfg["layers"]):
        p = f"blk.{l}."
        h = rms_norm(x, W(p + "attn_norm.weight"), cfg["eps"])
        q = (h @ W(p + "attn_q.weight").T).reshape(T, nh, hd).transpose(1, 0, 2)
        k = (h @ W(p + "attn_k.weight").T).reshape(T, nkv, hd).transpose(1, 0, 2)
        v = (h @ W(p + "attn_v.weight").T).reshape(T, nkv, hd).transpose(1, 0, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        rep = nh // nkv  # query head i reads kv head i // rep
        k, v = np.repeat(k, rep, axis=0), np.repeat(v, rep, axis=0)
        s = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + mask
        s = np.exp(s - s.max(axis=-1, keepdims=True))
        a = (s / s.sum(axis=-1, keepdims=True)) @ v  # (nh, T, hd)
        x = x + a.transpose(1, 0, 2).reshape(T, H) @ W(p + "attn_output.weight").T
        h = rms_norm(x, W(p + "ffn_norm.weight"), cfg["eps"])
        gate = h @ W(p + "ffn_gate.weight").T
        up = h @ W(p + "ffn_up.weight").T
        x = x + ((gate / (1 + np.exp(-gate))) * up) @ W(p + "ffn_down.weight").T
    x = rms_norm(x[-1], W("output_norm.weight"), cfg["eps"])
    head = emb if cfg["tied"] else g.dequant("output.weight")
    return x @ head.astype(dtype).T


# ---------------------------------------------------------------- CLI

def checksums(w):
    flat = w.reshape(-1).astype(np.float64)
    weight = (np.arange(flat.size) % 97 + 1).astype(np.float64)  # order-sensitive
    return {"sum": float(flat.sum()), "sumsq": float((flat * flat).sum()), "wsum": float((flat * weight).sum())}


def dump(g, names, count, npy_dir):
    if names == ["all"]:
        names = [hf_name(n) for n in g.tensors]
    for name in names:
        if name in g.tensors:  # GGUF name: raw, stored order
            w, gn = g.dequant(name), name
        else:
            gn = gguf_name(name)
            if gn not in g.tensors:
                raise SystemExit(f"no tensor {name} in {g.path}")
            w = hf_tensor(g, config(g), name)
        if npy_dir:
            np.save(f"{npy_dir}/{name}.npy", np.ascontiguousarray(w, dtype=np.float32))
        line = {"name": name, "gguf_name": gn, "type": GGML_TYPES[g.tensors[gn][1]][0], "shape": list(w.shape),
                "first": [float(v) for v in w.reshape(-1)[:count]]}
        line.update(checksums(w))
        print(json.dumps(line))


def top_k(logits, k):
    order = np.argsort(-logits, kind="stable")[:k]
    return [{"id": int(i), "logit": float(logits[i])} for i in order]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf")
    ap.add_argument("--ids", help="comma-separated token ids")
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--out", help="write JSON with the full last-position logits here")
    ap.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    ap.add_argument("--check-permutation", action="store_true",
                    help="also run llama.cpp's layout (stored rows + interleaved RoPE) and the "
                         "no-un-permutation mistake, and report how far each is from the HF path")
    ap.add_argument("--dump-dequant", metavar="NAMES")
    ap.add_argument("--count", type=int, default=8, help="values printed per dumped tensor")
    ap.add_argument("--npy-dir", help="with --dump-dequant: also save each tensor as NAME.npy (float32)")
    ap.add_argument("--info", action="store_true", help="print config and tensor types")
    a = ap.parse_args()

    try:
        g = Gguf(a.gguf)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}")
    if a.info:
        types = {}
        for _, (_, t, _) in g.tensors.items():
            n = GGML_TYPES.get(t, (str(t),))[0]
            types[n] = types.get(n, 0) + 1
        print(json.dumps({"config": config(g), "tensor_types": types, "n_tensors": len(g.tensors),
                          "pre": g.meta.get("tokenizer.ggml.pre"), "model": g.meta.get("tokenizer.ggml.model")}))
        return
    if a.dump_dequant:
        dump(g, a.dump_dequant.split(","), a.count, a.npy_dir)
        return
    if not a.ids:
        ap.error("give --ids, --dump-dequant or --info")
    ids = [int(s) for s in a.ids.split(",") if s.strip()]
    cfg = config(g)
    if not ids or min(ids) < 0 or max(ids) >= cfg["vocab"]:
        raise SystemExit(f"error: ids must be in [0, {cfg['vocab']})")
    dtype = np.dtype(a.dtype).type
    logits = forward(g, ids, dtype, "hf")
    tokens = g.meta["tokenizer.ggml.tokens"]
    top = top_k(logits, a.top)
    for t in top:
        t["token"] = tokens[t["id"]]
    summary = {"ids": ids, "dtype": a.dtype, "config": cfg, "top": top,
               "logits_stats": {"mean": float(logits.mean()), "std": float(logits.std()),
                                "min": float(logits.min()), "max": float(logits.max())}}
    if a.check_permutation:
        gg = forward(g, ids, dtype, "gguf")
        broken = forward(g, ids, dtype, "broken")
        summary["permutation_check"] = {
            "max_abs_diff_hf_vs_llamacpp_layout": float(np.abs(logits - gg).max()),
            "max_abs_diff_hf_vs_not_unpermuted": float(np.abs(logits - broken).max()),
            "top_not_unpermuted": top_k(broken, 5),
        }
    print(json.dumps(summary))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(summary, logits=[float(v) for v in logits]), f)


if __name__ == "__main__":
    sys.exit(main())
