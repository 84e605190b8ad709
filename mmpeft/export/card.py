"""README.md model cards for export folders: what the model is, what it was trained on, how well, and how to load it
(with code) on a machine without mmpeft where the format allows."""

from __future__ import annotations

import json

FORMAT_TEXT = {
    "transformers": "a complete transformers model (safetensors) with its processor; the method is folded into "
                    "the weights",
    "peft": "a peft adapter: `PeftModel.from_pretrained(base, folder)` loads it onto the base",
    "mmpeft": "mmpeft's own format (the method's trained tensors as safetensors + method.json); "
              "`mmpeft.export.load_adapter(folder)` rebuilds base + method",
}


def model_card(manifest: dict, title: str, extra: list[str] | None = None) -> str:
    base, method = manifest["base"], manifest["method"]
    lines = [f"# {title}", "", f"Exported by mmpeft {manifest['mmpeft_version']}: {FORMAT_TEXT[manifest['format']]}.",
             "", "| | |", "|---|---|",
             f"| base model | `{base['id']}` |",
             f"| method | `{method['name']}` `{json.dumps({k: v for k, v in method.items() if k != 'name'})}` |"]
    lines += [f"| {key} | {value} |" for key, value in summary_rows(manifest)]
    lines += extra or []
    labels = manifest["labels"]
    lines += ["", "## Labels", "", "| class | prompt texts (embeddings averaged) |", "|---|---|"]
    lines += [f"| {name} | {'; '.join(prompts)} |" for name, prompts in zip(labels["names"], labels["prompts"])]
    lines += ["", "## How to load", ""] + how_to_load(manifest)
    return "\n".join(lines) + "\n"


def summary_rows(manifest: dict) -> list[tuple[str, str]]:
    rows = []
    data = manifest.get("data")
    if data:
        counts = ", ".join(f"{k} {v}" for k, v in data.get("counts", {}).items())
        rows.append(("data", f"{data.get('source')} `{data.get('where')}`: {data.get('classes')} classes ({counts})"))
    for run in manifest.get("metrics", []):
        scores = "; ".join(f"{label} accuracy {run[key]:.4f}" for key, label in
                           (("zero_shot", "zero-shot"), ("test", "fine-tuned"), ("merged", "merged adapter"))
                           if run.get(key) is not None)
        rows.append((f"test split of `{run['run']}`", scores))
    if manifest.get("dtype"):
        rows.append(("dtype", f"`{manifest['dtype']}`"))
    if manifest.get("size_bytes"):
        rows.append(("size", f"{manifest['size_bytes'] / 2**20:.2f} MiB of weights"))
    check = manifest.get("verification")
    if check:
        rows.append(("verification", f"reloaded from disk, max abs difference {check['max']:.2e} from the trained "
                                     f"model (tolerance {check['tolerance']:g})"))
    for note in manifest.get("notes", []):
        rows.append(("note", note))
    return rows


def how_to_load(manifest: dict) -> list[str]:
    base = manifest["base"]["id"]
    labels = manifest["labels"]
    prompts = [group[0] for group in labels["prompts"]]
    padding = '"max_length"' if manifest["base"].get("model_type", "").startswith("siglip") else "True"
    plain = []
    if manifest["format"] == "transformers":
        plain = ["Plain transformers (no mmpeft needed):", "", "```python", "import torch", "from PIL import Image",
                 "from transformers import AutoModel, AutoProcessor", "",
                 'model = AutoModel.from_pretrained("path/to/this/folder").eval()',
                 'processor = AutoProcessor.from_pretrained("path/to/this/folder")']
    elif manifest["format"] == "peft":
        plain = ["Plain transformers + peft (no mmpeft needed):", "", "```python", "import torch",
                 "from PIL import Image", "from peft import PeftModel",
                 "from transformers import AutoModel, AutoProcessor", "",
                 f'base = AutoModel.from_pretrained("{base}")',
                 'model = PeftModel.from_pretrained(base, "path/to/this/folder").eval()',
                 f'processor = AutoProcessor.from_pretrained("{base}")']
    if plain:
        plain += [f"labels = {labels['names']!r}", f"prompts = {prompts!r}  # first prompt of each class",
                  f'inputs = processor(text=prompts, images=[Image.open("image.png").convert("RGB")], '
                  f'padding={padding}, return_tensors="pt")', "with torch.no_grad():",
                  "    logits = model(**inputs).logits_per_image  # [images, classes]",
                  "print(labels[int(logits.argmax(-1)[0])])", "```", "",
                  "mmpeft averages the embeddings of all prompt texts of a class; with one prompt per class the "
                  "logits above are exactly mmpeft's.", ""]
    return plain + ["With mmpeft (any format; rebuilds exactly what was trained and checks the files):", "",
                    "```python", "import torch", "from PIL import Image",
                    "from mmpeft.export import export_labels, load_adapter", "",
                    'backbone = load_adapter("path/to/this/folder")  # base="..." if the base model moved',
                    'labels = export_labels("path/to/this/folder")',
                    'pixels = backbone.preprocess([Image.open("image.png").convert("RGB")])',
                    "with torch.no_grad():",
                    "    text = None if backbone.head is not None else backbone.class_text_features(labels)",
                    "    logits = backbone.classify(pixels, text)",
                    "print(labels.names[int(logits.argmax(-1)[0])])", "```"]
