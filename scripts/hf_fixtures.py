"""Writes tiny Hugging Face checkpoints with transformers itself, plus reference outputs, for
safetensune's loader tests (tests/fixtures/hf/). Run where transformers and torch are installed:

    python3 scripts/hf_fixtures.py OUT_DIR [NAME ...]   (default: every fixture)

Each model folder gets transformers' own config.json and safetensors (sharded with an index where
noted) and `reference.safetensors`: `input_ids` (i64, [2, 16]) and the float64 `logits`
([2, 16, vocab]) of the same weights run in float64 with eager attention. The encoders' fixtures
add their masks and hidden states; `vit` stores images, its processor's `pixel_values` instead;
the QA fixtures (`*-qa`) their windows and span logits, which need a `tokenizers` other than
0.23.2.
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


# RoBERTa and DistilBERT for sequence classification (3 labels, the checkpoint's own head), each
# with a tokenizer trained here by the `tokenizers` library on CORPUS (RoBERTa: byte-level BPE,
# <s>=0 <pad>=1 </s>=2; DistilBERT: lower-cased WordPiece, [PAD]=0) and saved as tokenizer.json.
# The reference batch is TEXTS encoded by that tokenizer (cut at MAX_LENGTH tokens), the second row
# right-padded with the pad id; reference.safetensors holds input_ids, attention_mask, the float64
# last hidden state (`hidden`) and classification `logits`; reference.json the texts and the cut.
CORPUS = [
    "the match ended in a draw after a late goal from the visiting side",
    "shares fell sharply as the bank reported lower profits for the quarter",
    "the new phone has a faster chip and a brighter screen than last year",
    "voters will choose a new parliament in the election next month",
    "the film won three awards for its music, cast and direction",
    "heavy rain is expected across the north with strong winds by the evening",
    "the striker scored twice and the coach praised the young defenders",
    "the company plans to open ten new stores and hire hundreds of staff",
    "scientists found water ice in a crater near the south pole of the moon",
    "the minister said the budget would cut taxes for small firms",
    "a quiet, charming story about two friends who open a bakery",
    "the team lost the final, 2-1, despite a strong start",
] * 4
TEXTS = [
    "the striker scored a late goal and the team won the final",
    "rain expected",
]
MAX_LENGTH = 24


def byte_bpe_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, min_frequency=1, show_progress=False,
                                  special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator(CORPUS, trainer)
    ids = [t.token_to_id(s) for s in ["<s>", "<pad>", "</s>"]]
    assert ids == [0, 1, 2], ids
    t.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), trim_offsets=True,
                                                    add_prefix_space=False)
    return t, 1


def wordpiece_tokenizer():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    t = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    t.normalizer = normalizers.BertNormalizer(lowercase=True)
    t.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    t.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=120, show_progress=False,
                                        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    t.train_from_iterator(CORPUS, trainer)
    assert t.token_to_id("[PAD]") == 0
    t.post_processor = processors.BertProcessing(("[SEP]", t.token_to_id("[SEP]")),
                                                 ("[CLS]", t.token_to_id("[CLS]")))
    return t, 0


def write_classifier(name, make_tokenizer, make_model):
    if only and name not in only:
        return
    d = os.path.join(out, name)
    os.makedirs(d, exist_ok=True)
    tok, pad = make_tokenizer()
    model = make_model(tok.get_vocab_size(), pad)
    randomize(model)
    model.eval()
    model.save_pretrained(d)
    tok.save(os.path.join(d, "tokenizer.json"))
    tok.enable_truncation(MAX_LENGTH)
    tok.enable_padding(pad_id=pad, pad_token=tok.id_to_token(pad))
    enc = tok.encode_batch(TEXTS)
    ids = torch.tensor([e.ids for e in enc], dtype=torch.int64)
    mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.int64)
    assert (mask[1] == 0).any() and (mask[0] == 1).all(), mask
    assert (ids[mask == 0] == pad).all()
    ref = model.to(torch.float64)
    with torch.no_grad():
        o = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    save_file({"input_ids": ids.contiguous(), "attention_mask": mask.contiguous(),
               "hidden": o.hidden_states[-1].contiguous(), "logits": o.logits.contiguous()},
              os.path.join(d, "reference.safetensors"))
    with open(os.path.join(d, "reference.json"), "w") as f:
        json.dump({"texts": TEXTS, "max_length": MAX_LENGTH}, f, indent=1)
    print("==", name, sorted(os.listdir(d)), ids.tolist(), o.logits)
    print(open(os.path.join(d, "config.json")).read())


def roberta(vocab, pad):
    c = cfg(transformers.RobertaConfig, vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
            type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=pad, bos_token_id=0,
            eos_token_id=2, num_labels=3)
    return transformers.RobertaForSequenceClassification(c)


def distilbert(vocab, pad):
    c = cfg(transformers.DistilBertConfig, vocab_size=vocab, dim=32, n_layers=2, n_heads=4,
            hidden_dim=64, max_position_embeddings=64, pad_token_id=pad, num_labels=3)
    return transformers.DistilBertForSequenceClassification(c)


write_classifier("roberta-padded", byte_bpe_tokenizer, roberta)
write_classifier("distilbert-padded", wordpiece_tokenizer, distilbert)


# Extractive QA for BERT, RoBERTa and DistilBERT (the checkpoint's own `qa_outputs`), with the
# tokenizers above. QA_QUESTION / QA_CONTEXT are cut into windows as transformers' `run_qa.py`
# does (a PreTrainedTokenizerFast over that tokenizer: truncation only_second, QA_MAX_LENGTH
# tokens, QA_STRIDE tokens shared, overflowing windows, offsets). reference.json holds each
# window's ids, token type ids (BERT only: the others' tokenizers return none) and context
# offsets (null outside the context, as run_qa.py sets them); reference.safetensors the windows
# right-padded with the pad id (input_ids, attention_mask, token_type_ids) and the float64
# `start_logits` / `end_logits`.
QA_QUESTION = "  who scored twice for the team?"
QA_CONTEXT = ("the striker scored twice and the coach praised the young defenders. the match "
              "ended in a draw after a late goal from the visiting side, and the team lost the "
              "final, 2-1, despite a strong start.")
QA_MAX_LENGTH = 40
QA_STRIDE = 10


def write_qa(name, make_tokenizer, make_model, specials, token_types):
    if only and name not in only:
        return
    d = os.path.join(out, name)
    os.makedirs(d, exist_ok=True)
    tok, pad = make_tokenizer()
    model = make_model(tok.get_vocab_size(), pad)
    randomize(model)
    model.eval()
    model.save_pretrained(d)
    tok.save(os.path.join(d, "tokenizer.json"))
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if token_types else [])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, model_input_names=names,
                                                **specials)
    enc = fast(QA_QUESTION.lstrip(), QA_CONTEXT, truncation="only_second",
               max_length=QA_MAX_LENGTH, stride=QA_STRIDE, return_overflowing_tokens=True,
               return_offsets_mapping=True, padding="max_length")
    n = len(enc["input_ids"])
    assert n >= 3, n
    # The windows must reach the end of the context: tokenizers 0.23.2 stops a pair's overflow
    # after two windows (0.23.3 and the Rust crate do not).
    last = [o for o, q in zip(enc["offset_mapping"][-1], enc.sequence_ids(n - 1)) if q == 1]
    assert last[-1][1] == len(QA_CONTEXT), ("windows stop at", last[-1], "of", len(QA_CONTEXT))
    windows = []
    for i in range(n):
        seq = enc.sequence_ids(i)
        keep = [j for j, m in enumerate(enc["attention_mask"][i]) if m == 1]
        windows.append({
            "ids": [enc["input_ids"][i][j] for j in keep],
            "type_ids": [enc["token_type_ids"][i][j] for j in keep] if token_types else None,
            "offsets": [list(enc["offset_mapping"][i][j]) if seq[j] == 1 else None for j in keep],
        })
    ids = torch.tensor(enc["input_ids"], dtype=torch.int64)
    mask = torch.tensor(enc["attention_mask"], dtype=torch.int64)
    types = torch.tensor(enc["token_type_ids"] if token_types else [[0] * QA_MAX_LENGTH] * n,
                         dtype=torch.int64)
    ref = model.to(torch.float64)
    kw = {"token_type_ids": types} if token_types else {}
    with torch.no_grad():
        o = ref(input_ids=ids, attention_mask=mask, **kw)
    save_file({"input_ids": ids.contiguous(), "attention_mask": mask.contiguous(),
               "token_type_ids": types.contiguous(),
               "start_logits": o.start_logits.contiguous(), "end_logits": o.end_logits.contiguous()},
              os.path.join(d, "reference.safetensors"))
    with open(os.path.join(d, "reference.json"), "w") as f:
        json.dump({"question": QA_QUESTION, "context": QA_CONTEXT, "max_length": QA_MAX_LENGTH,
                   "doc_stride": QA_STRIDE, "windows": windows}, f, indent=1)
    print("==", name, sorted(os.listdir(d)), n, "windows, padded:", (mask == 0).any().item(),
          o.start_logits[0, :6])


def bert_qa(vocab, pad):
    c = cfg(transformers.BertConfig, vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
            type_vocab_size=2, pad_token_id=pad)
    return transformers.BertForQuestionAnswering(c)


def roberta_qa(vocab, pad):
    c = cfg(transformers.RobertaConfig, vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
            type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=pad, bos_token_id=0,
            eos_token_id=2)
    return transformers.RobertaForQuestionAnswering(c)


def distilbert_qa(vocab, pad):
    c = cfg(transformers.DistilBertConfig, vocab_size=vocab, dim=32, n_layers=2, n_heads=4,
            hidden_dim=64, max_position_embeddings=64, pad_token_id=pad)
    return transformers.DistilBertForQuestionAnswering(c)


WORDPIECE = dict(cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]")
BYTE_BPE = dict(bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
                pad_token="<pad>", unk_token="<unk>")
write_qa("bert-qa", wordpiece_tokenizer, bert_qa, WORDPIECE, True)
write_qa("roberta-qa", byte_bpe_tokenizer, roberta_qa, BYTE_BPE, False)
write_qa("distilbert-qa", wordpiece_tokenizer, distilbert_qa, WORDPIECE, False)
# ViT for image classification (pre-LN layers, patch embedding, [CLS] + final LayerNorm +
# classifier) with a ViTImageProcessor config: two RGB PNGs of other sizes (one upscaled, one
# downscaled to 28x28 with PIL's bilinear filter), the processor's pixel_values, and the float64
# last hidden state (before the final LayerNorm) and logits.
def write_vit(name):
    if only and name not in only:
        return
    import numpy as np
    from PIL import Image
    d = os.path.join(out, name)
    os.makedirs(d, exist_ok=True)
    c = cfg(transformers.ViTConfig, image_size=28, patch_size=7, num_channels=3, hidden_size=32,
            num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=10,
            qkv_bias=True)
    model = transformers.ViTForImageClassification(c)
    randomize(model)
    model.eval()
    model.save_pretrained(d)
    proc = transformers.ViTImageProcessor(size={"height": 28, "width": 28}, resample=2,
                                          image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3])
    proc.save_pretrained(d)
    rng = np.random.default_rng(0)
    images = []
    for i, (h, w) in enumerate([(20, 24), (56, 42)]):
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (h + w)], -1)
        arr = np.clip(base + rng.integers(0, 60, (h, w, 3)), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, "RGB")
        img.save(os.path.join(d, f"image{i}.png"))
        images.append(Image.open(os.path.join(d, f"image{i}.png")))
    pixels = proc(images=images, return_tensors="pt")["pixel_values"]
    ref = model.to(torch.float64)
    with torch.no_grad():
        o = ref(pixel_values=pixels.to(torch.float64), output_hidden_states=True)
    save_file({"pixel_values": pixels.to(torch.float32).contiguous(),
               "hidden": o.hidden_states[-1].contiguous(), "logits": o.logits.contiguous()},
              os.path.join(d, "reference.safetensors"))
    print("==", name, type(proc).__name__, sorted(os.listdir(d)), o.logits)
    print(open(os.path.join(d, "config.json")).read())
    print(open(os.path.join(d, "preprocessor_config.json")).read())


write_vit("vit")
