"""PEFT against safetune on the ViT fixture (GPU machine: torch, transformers 5, peft).

    python3 interop/vit_peft_check.py ADAPTER_DIR LOGITS_JSON

ADAPTER_DIR: a safetune image adapter trained on tests/fixtures/hf/vit (e.g. `safetune train
--task image --model tests/fixtures/hf/vit --data FASHION_MNIST_DIR --max-steps 3 --batch-size 8`);
LOGITS_JSON: `safetune eval --adapter ADAPTER_DIR --model tests/fixtures/hf/vit --data IMAGES
--split all --logits-out LOGITS_JSON` with IMAGES a class folder holding the fixture's image0.png
and image1.png. transformers 5 names ViT's modules `vit.layers.N.attention.q_proj` (the checkpoint
keeps the 4.x names `vit.encoder.layer.N.attention.attention.query`), so the adapter is renamed
that way before PEFT loads it; safetune writes the 4.x names.
"""
import json, sys, torch, transformers, peft
from PIL import Image
d = "tests/fixtures/hf/vit"; a = sys.argv[1]
base = transformers.ViTForImageClassification.from_pretrained(d, attn_implementation="eager").eval()
proc = transformers.AutoImageProcessor.from_pretrained(d)
px = proc(images=[Image.open(f"{d}/image{i}.png") for i in (0, 1)], return_tensors="pt")["pixel_values"]
with torch.no_grad():
    before = base(pixel_values=px).logits
import os, shutil
from safetensors.torch import load_file, save_file
r = "/tmp/renamed"; os.makedirs(r, exist_ok=True)
cfg = json.load(open(f"{a}/adapter_config.json"))
cfg["target_modules"] = [{"query": "q_proj", "value": "v_proj"}[t] for t in cfg["target_modules"]]
json.dump(cfg, open(f"{r}/adapter_config.json", "w"))
t = load_file(f"{a}/adapter_model.safetensors")
ren = lambda k: k.replace("vit.encoder.layer.", "vit.layers.").replace("attention.attention.query", "attention.q_proj").replace("attention.attention.value", "attention.v_proj")
save_file({ren(k): v for k, v in t.items()}, f"{r}/adapter_model.safetensors")
print(sorted(ren(k) for k in t)[:3])
model = peft.PeftModel.from_pretrained(base, r).eval()
print("peft", peft.__version__, "transformers", transformers.__version__)
print("targeted:", sorted({n.rsplit('.lora_A', 1)[0] for n, _ in model.named_modules() if n.endswith("lora_A")}))
with torch.no_grad():
    after = model(pixel_values=px).logits
ours = torch.tensor(json.load(open(sys.argv[2]))["logits"])
# eval's row order follows its split; match each safetune row to the nearer PEFT row
diffs = [min((ours[i] - after[j]).abs().max().item() for j in range(2)) for i in range(2)]
print("max |safetune - PEFT| per image:", diffs)
print("adapter moves logits by up to", (after - before).abs().max().item(), "; logits up to", after.abs().max().item())
print("same argmax:", sorted(ours.argmax(1).tolist()) == sorted(after.argmax(1).tolist()))
