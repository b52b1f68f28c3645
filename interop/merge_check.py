"""Independent check of `safetune merge` for a causal LM (LLaMA family or GPT-2), with transformers
and PEFT: the merged folder, loaded by transformers without PEFT, against PEFT applying the same
adapter to the base, in float64; and the merged weights against PEFT's own merge_and_unload.

    python interop/merge_check.py BASE_DIR ADAPTER_DIR MERGED_DIR
"""
import sys

import peft
import torch
import transformers

base_dir, adapter_dir, merged_dir = sys.argv[1:4]
torch.set_grad_enabled(False)
ids = torch.tensor([[3, 17, 5, 9, 30, 2, 11, 7]])
base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float64)
plain = base(ids).logits
adapted = peft.PeftModel.from_pretrained(base, adapter_dir)
want = adapted(ids).logits
ours = transformers.AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float64)
got = ours(ids).logits
theirs = adapted.merge_and_unload().state_dict()
weights = max((theirs[k] - v).abs().max().item() for k, v in ours.state_dict().items())
diff = (got - want).abs().max().item()
print(
    f"|merged - PEFT| {diff:.3e} (logits up to {want.abs().max().item():.2f}; the adapter moves "
    f"them by {(plain - want).abs().max().item():.3e}); |weights - merge_and_unload| {weights:.3e}"
)
sys.exit(0 if diff < 1e-4 * max(1.0, want.abs().max().item()) else 1)
