"""PEFT against safetune on the ViT fixture (GPU machine: torch, transformers 5, peft).

    python3 interop/vit_peft_check.py ADAPTER_DIR LOGITS_JSON [MERGED_DIR]

ADAPTER_DIR: a safetune image adapter trained on tests/fixtures/hf/vit (e.g. `safetune train
--task image --model tests/fixtures/hf/vit --data FASHION_MNIST_DIR --max-steps 3 --batch-size 8`);
LOGITS_JSON: `safetune eval --adapter ADAPTER_DIR --model tests/fixtures/hf/vit --data IMAGES
--split all --logits-out LOGITS_JSON` with IMAGES a class folder holding the fixture's image0.png
and image1.png (class folders `0/` and `1/`). The adapter loads as safetune wrote it: its
target_modules name ViT's linears under transformers 4's and 5's module names
(`attention.attention.query`, `attention.q_proj`), and PEFT converts the weights' keys with
transformers' conversion mapping. MERGED_DIR, `safetune merge`'s output, must give the same
logits through ViTForImageClassification.
"""
import json, sys, torch, transformers, peft
from PIL import Image
d = "tests/fixtures/hf/vit"; a = sys.argv[1]
base = transformers.ViTForImageClassification.from_pretrained(d, attn_implementation="eager").eval()
proc = transformers.AutoImageProcessor.from_pretrained(d)
px = proc(images=[Image.open(f"{d}/image{i}.png") for i in (0, 1)], return_tensors="pt")["pixel_values"]
with torch.no_grad():
    before = base(pixel_values=px).logits
model = peft.PeftModel.from_pretrained(base, a).eval()
print("peft", peft.__version__, "transformers", transformers.__version__)
print("targeted:", sorted({n.rsplit('.lora_A', 1)[0] for n, _ in model.named_modules() if n.endswith("lora_A")}))
with torch.no_grad():
    after = model(pixel_values=px).logits
ours = torch.tensor(json.load(open(sys.argv[2]))["logits"])
# eval's row order follows its split; match each safetune row to the nearer PEFT row
diffs = [min((ours[i] - after[j]).abs().max().item() for j in range(2)) for i in range(2)]
print("max |safetune - PEFT| per image:", diffs)
print("adapter moves logits by up to", (after - before).abs().max().item(), "; logits up to", after.abs().max().item())
same = sorted(ours.argmax(1).tolist()) == sorted(after.argmax(1).tolist())
print("same argmax:", same)
moved = (after - before).abs().max().item()
ok = max(diffs) < 1e-4 and moved > 1e-3 and same
if len(sys.argv) > 3:
    merged = transformers.ViTForImageClassification.from_pretrained(sys.argv[3], attn_implementation="eager").eval()
    with torch.no_grad():
        m = merged(pixel_values=px).logits
    d = (m - after).abs().max().item()
    print("max |merged - PEFT|:", d)
    ok = ok and d < 1e-4
sys.exit(0 if ok else 1)
