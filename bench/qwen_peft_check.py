"""Does Hugging Face PEFT load a safetune adapter trained on the Qwen2 GGUF (issue #19)?

    python3 bench/qwen_peft_check.py GGUF ADAPTER_DIR HF_OUT PROMPT_IDS_JSON

Loads the GGUF through transformers (dequantized, float32), writes it as a Hugging Face folder
(HF_OUT: the "Hugging Face-format equivalent"), loads the safetune adapter into it with
`PeftModel.from_pretrained`, and prints the next-token logits after the prompt ids (the ones
`safetune generate --logits-out` wrote, with and without the adapter) beside safetune's, as the
largest absolute differences.
"""
import json
import os
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

gguf, adapter, hf_out, theirs = sys.argv[1:5]
ref = json.load(open(theirs))  # {"base": {"ids", "logits"}, "adapted": {"ids", "logits"}}
model = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                             dtype=torch.float32)
# transformers marks a GGUF-loaded model as quantized and refuses to save it; its weights are
# already dequantized float32, so drop the mark, save, and check on the folder read back.
model.hf_quantizer = None
model.is_quantized = False
model.config.quantization_config = None
if hasattr(model.config, "__dict__"):
    model.config.__dict__.pop("quantization_config", None)
model.save_pretrained(hf_out)
model = AutoModelForCausalLM.from_pretrained(hf_out, dtype=torch.float32)
saved = sorted(os.listdir(hf_out))
ids = torch.tensor([ref["base"]["ids"]])
with torch.no_grad():
    base = model(input_ids=ids).logits[0, -1]
peft = PeftModel.from_pretrained(model, adapter).eval()
with torch.no_grad():
    adapted = peft(input_ids=ids).logits[0, -1]
out = {"hf_folder": saved}
for name, mine in [("base", base), ("adapted", adapted)]:
    st = torch.tensor(ref[name]["logits"])
    out[name] = {"max_abs_diff": (mine - st).abs().max().item(), "scale": st.abs().max().item(),
                 "argmax_equal": int(mine.argmax()) == int(st.argmax())}
out["adapter_changes_logits_by"] = (adapted - base).abs().max().item()
print(json.dumps(out))
