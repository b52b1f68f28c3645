"""Writes tiny Hugging Face checkpoints with transformers itself, plus reference logits, for
safetensune's loader tests (tests/fixtures/hf/). Run where transformers and torch are installed:

    python3 scripts/hf_fixtures.py OUT_DIR [NAME ...]   (default: every fixture)

Each model folder gets transformers' own config.json and safetensors (sharded with an index where
noted) and `reference.safetensors`: `input_ids` (i64, [2, 16]) and the float64 `logits`
([2, 16, vocab]) of the same weights run in float64 with eager attention.
"""
import json, os, sys
import torch
import transformers
from safetensors.torch import save_file

out = sys.argv[1]
only = set(sys.argv[2:])
torch.manual_seed(0)
print("transformers", transformers.__version__, "torch", torch.__version__)


def randomize(model, std=0.2):
    # Non-trivial weights everywhere: norms around 1, biases nonzero, projections large enough that
    # the logits are far from uniform.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() or name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or "ln_f" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(std * torch.randn_like(p))


def write(name, model, shard):
    if only and name not in only:
        return
    d = os.path.join(out, name)
    os.makedirs(d, exist_ok=True)
    randomize(model)
    model.eval()
    kw = {"max_shard_size": "50KB"} if shard else {}
    model.save_pretrained(d, **kw)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    ref = model.to(torch.float64)
    with torch.no_grad():
        logits = ref(input_ids=ids).logits
    save_file({"input_ids": ids.to(torch.int64).contiguous(), "logits": logits.contiguous()},
              os.path.join(d, "reference.safetensors"))
    print("==", name, sorted(os.listdir(d)))
    print(open(os.path.join(d, "config.json")).read())


def cfg(cls, **kw):
    c = cls(**kw)
    c._attn_implementation = "eager"
    return c


common = dict(vocab_size=96, num_hidden_layers=2, max_position_embeddings=64,
              rms_norm_eps=1e-5, bos_token_id=1)

# Llama 3.1-style: llama3 rope scaling, explicit head_dim (not hidden/heads), GQA, untied head,
# a list of EOS ids, sharded with an index.
llama3 = dict(common, hidden_size=48, intermediate_size=80, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, eos_token_id=[2, 3])
rope3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 32}
try:
    c = cfg(transformers.LlamaConfig, **llama3, rope_parameters=dict(rope3, rope_theta=10000.0))
except TypeError:
    c = cfg(transformers.LlamaConfig, **llama3, rope_scaling=rope3, rope_theta=10000.0)
write("llama3-sharded", transformers.LlamaForCausalLM(c), shard=True)

# LLaMA-2-style with linear rope scaling, multi-head, tied embeddings, one file.
llama2 = dict(common, hidden_size=32, intermediate_size=64, num_attention_heads=4,
              tie_word_embeddings=True, eos_token_id=2)
lin = {"rope_type": "linear", "factor": 2.0}
try:
    c = cfg(transformers.LlamaConfig, **llama2, rope_parameters=dict(lin, rope_theta=10000.0))
except TypeError:
    c = cfg(transformers.LlamaConfig, **llama2, rope_scaling=lin)
write("llama2-linear", transformers.LlamaForCausalLM(c), shard=False)

# Qwen2: q/k/v biases, GQA, tied embeddings, theta 1e6, sharded.
q = dict(common, hidden_size=32, intermediate_size=64, num_attention_heads=4,
         num_key_value_heads=2, tie_word_embeddings=True, eos_token_id=2)
try:
    c = cfg(transformers.Qwen2Config, **q, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
except TypeError:
    c = cfg(transformers.Qwen2Config, **q, rope_theta=1e6)
write("qwen2-sharded", transformers.Qwen2ForCausalLM(c), shard=True)

# GPT-2, sharded.
g = cfg(transformers.GPT2Config, vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64,
        bos_token_id=1, eos_token_id=2)
write("gpt2-sharded", transformers.GPT2LMHeadModel(g), shard=True)


# BERT for sequence classification: padded batch (attention mask), two token types, GELU, the
# pooler and a 3-way classifier; the reference also stores the mask and token types.
def write_bert(name):
    if only and name not in only:
        return
    d = os.path.join(out, name)
    os.makedirs(d, exist_ok=True)
    c = cfg(transformers.BertConfig, vocab_size=96, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
            type_vocab_size=2, num_labels=3)
    model = transformers.BertForSequenceClassification(c)
    randomize(model)
    model.eval()
    model.save_pretrained(d)
    ids = torch.randint(0, 96, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.int64)
    mask[1, 11:] = 0
    types = torch.zeros(2, 16, dtype=torch.int64)
    types[:, 8:] = 1
    ref = model.to(torch.float64)
    with torch.no_grad():
        logits = ref(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    save_file({"input_ids": ids.contiguous(), "attention_mask": mask.contiguous(),
               "token_type_ids": types.contiguous(), "logits": logits.contiguous()},
              os.path.join(d, "reference.safetensors"))
    print("==", name, sorted(os.listdir(d)), logits)


write_bert("bert-padded")


# MPNet (the encoder model, with its pooler): relative position bias, positions counted from the
# padding index, no token types; right-padded second row (pad id 1). Stores the last hidden
# state and the pooler output.
def write_mpnet(name):
    if only and name not in only:
        return
    d = os.path.join(out, name)
    os.makedirs(d, exist_ok=True)
    c = cfg(transformers.MPNetConfig, vocab_size=96, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
            relative_attention_num_buckets=32, pad_token_id=1)
    model = transformers.MPNetModel(c)
    randomize(model)
    model.eval()
    model.save_pretrained(d)
    ids = torch.randint(3, 96, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.int64)
    mask[1, 11:] = 0
    ids[1, 11:] = 1
    ref = model.to(torch.float64)
    with torch.no_grad():
        o = ref(input_ids=ids, attention_mask=mask)
    save_file({"input_ids": ids.contiguous(), "attention_mask": mask.contiguous(),
               "hidden": o.last_hidden_state.contiguous(), "pooled": o.pooler_output.contiguous()},
              os.path.join(d, "reference.safetensors"))
    print("==", name, sorted(os.listdir(d)))


write_mpnet("mpnet-padded")
