"""README.md model cards for export folders: what the model is, what it was trained on, how well, and how to load it
(with code) on a machine without mmpeft where the format allows."""

from __future__ import annotations

import json
from pathlib import PurePath

import yaml

FORMAT_TEXT = {
    "transformers": "a complete transformers model (safetensors) with its processor; the method is folded into "
                    "the weights",
    "peft": "a peft adapter: `PeftModel.from_pretrained(base, folder)` loads it onto the base",
    "mmpeft": "mmpeft's own format (the method's trained tensors as safetensors + method.json); "
              "`mmpeft.artifacts.load_adapter(folder)` rebuilds base + method",
}


def model_card(manifest: dict, title: str, extra: list[str] | None = None) -> str:
    base, method = manifest["base"], manifest["method"]
    lines = [front_matter(manifest, title), f"# {title}", "",
             f"Exported by mmpeft {manifest['mmpeft_version']}: {FORMAT_TEXT[manifest['format']]}.",
             "", "| | |", "|---|---|",
             f"| base model | `{base['id']}` |",
             f"| method | `{method['name']}` `{json.dumps({k: v for k, v in method.items() if k != 'name'})}` |"]
    lines += [f"| {key} | {value} |" for key, value in summary_rows(manifest)]
    lines += extra or []
    labels = manifest["labels"]
    if base.get("family") == "generative":
        answer = (manifest.get("task") or {}).get("answer_template", "{label}")
        lines += ["", "## Labels", "", "| class | scored answer |", "|---|---|"]
        lines += [f"| {name} | {answer.format(label=name)} |" for name in labels["names"]]
    else:
        lines += ["", "## Labels", "", "| class | prompt texts (embeddings averaged) |", "|---|---|"]
        lines += [f"| {name} | {'; '.join(prompts)} |" for name, prompts in zip(labels["names"], labels["prompts"])]
    lines += ["", "## How to load", ""] + how_to_load(manifest)
    return "\n".join(lines) + "\n"


LIBRARY = {"transformers": "transformers", "peft": "peft", "mmpeft": "mmpeft"}
PIPELINE_TAG = {"dual_encoder": "zero-shot-image-classification", "generative": "image-text-to-text"}


def front_matter(manifest: dict, title: str) -> str:
    """Hugging Face model-card metadata (YAML between --- lines): what the Hub and `huggingface_hub.ModelCard` read
    to index the model: its base, library, pipeline, data and test scores."""
    base, data = manifest["base"], manifest.get("data") or {}
    family = base.get("family", "dual_encoder")
    dataset = data_name(data)
    meta: dict = {"base_model": base["id"], "library_name": LIBRARY[manifest["format"]],
                  "pipeline_tag": PIPELINE_TAG[family],
                  "tags": ["mmpeft", manifest["method"]["name"], family, manifest["kind"]]}
    if dataset:
        meta["datasets"] = [dataset]
    scored = [metrics for metrics in (test_metrics(run) for run in manifest.get("metrics", [])) if metrics]
    results = [{"task": {"type": PIPELINE_TAG[family], "name": "image classification" if any(
                    m["type"] != "recall" for m in metrics) else "image-text retrieval"},
                "dataset": {"name": dataset or "unknown", "type": dataset or "unknown", "split": "test"},
                "metrics": metrics} for metrics in scored]
    if results:
        meta["model-index"] = [{"name": title, "results": results}]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def data_name(data: dict) -> str | None:
    """The data's name: a hub dataset's id, else the folder or file name it was read from."""
    where = data.get("where")
    if not where:
        return None
    if data.get("source") == "digits":  # built-in; `where` is this machine's cache folder, not a name to publish
        return "digits"
    return str(where) if data.get("source") == "hf" else PurePath(str(where)).name or str(where)


def test_metrics(run: dict) -> list[dict]:
    found = []
    for key, kind, name in (("test", "accuracy", "test accuracy"), ("test_macro_f1", "f1", "test macro-F1"),
                            ("zero_shot", "accuracy", "zero-shot accuracy (before training)"),
                            ("merged", "accuracy", "merged adapter accuracy"),
                            ("test_retrieval_r1", "recall", "test image->text R@1"),
                            ("zero_shot_retrieval_r1", "recall", "zero-shot image->text R@1 (before training)")):
        if run.get(key) is not None:
            found.append({"type": kind, "value": round(float(run[key]), 6), "name": f"{name} ({run['run']})"})
    return found


def summary_rows(manifest: dict) -> list[tuple[str, str]]:
    rows = []
    data = manifest.get("data")
    if data:
        counts = ", ".join(f"{k} {v}" for k, v in data.get("counts", {}).items())
        rows.append(("data", f"{data.get('source')} `{data.get('where')}`: {data.get('classes')} classes ({counts})"))
    for run in manifest.get("metrics", []):
        scores = "; ".join(f"{label} {run[key]:.4f}" for key, label in
                           (("zero_shot", "zero-shot accuracy"), ("test", "fine-tuned accuracy"),
                            ("merged", "merged adapter accuracy"), ("zero_shot_retrieval_r1", "zero-shot R@1"),
                            ("test_retrieval_r1", "fine-tuned R@1")) if run.get(key) is not None)
        rows.append((f"test split of `{run['run']}`", scores or "not evaluated (eval.test: false)"))
    if manifest.get("dtype"):
        rows.append(("dtype", f"`{manifest['dtype']}`"))
    if manifest.get("size_bytes"):
        rows.append(("size", f"{manifest['size_bytes'] / 2**20:.2f} MiB of weights"))
    check = manifest.get("verification")
    if check:
        rows.append(("verification", f"reloaded from disk: max abs difference {check['max']:.2e} from the trained "
                                     f"model (relative {check['relative']:.2e}, tolerance {check['tolerance']:g})"))
    onnx = manifest.get("onnx")
    if onnx:
        rows.append(("ONNX", f"{', '.join(f'`{f}`' for f in onnx['files'])} (opset {onnx['opset']}), checked in "
                             f"onnxruntime: max abs difference {onnx['verification']['max']:.2e}; "
                             f"{onnx['usage']} with logit_scale {onnx['logit_scale']:.4g}, "
                             f"logit_bias {onnx['logit_bias']:.4g}"))
    for note in manifest.get("notes", []):
        rows.append(("note", note))
    return rows


def how_to_load(manifest: dict) -> list[str]:
    generative = manifest["base"].get("family") == "generative"
    plain = (generative_code if generative else dual_encoder_code)(manifest) if manifest["format"] != "mmpeft" else []
    if manifest["format"] == "transformers":
        plain = pipeline_code(manifest, generative) + plain
    return plain + ["With mmpeft (any format; rebuilds exactly what was trained and checks the files):", "",
                    "```python", "import torch", "from PIL import Image",
                    "from mmpeft.artifacts import export_labels, load_adapter", "",
                    'backbone = load_adapter("path/to/this/folder")  # base="..." if the base model moved',
                    'labels = export_labels("path/to/this/folder")',
                    'pixels = backbone.preprocess([Image.open("image.png")])  # any mode: 16-bit, float, RGBA, ...',
                    "with torch.no_grad():",
                    "    text = None if backbone.head is not None else backbone.class_text_features(labels)",
                    "    logits = backbone.classify(pixels, text)  # [images, classes]",
                    "print(labels.names[int(logits.argmax(-1)[0])])", "```"]


def pipeline_code(manifest: dict, generative: bool) -> list[str]:
    """A merged model in transformers' own pipeline (offline, name the task: without it the Hub is asked)."""
    if generative:
        question = (manifest.get("task") or {}).get("question", "What is in the image?")
        return ["In a transformers pipeline:", "", "```python", "from transformers import pipeline", "",
                'chat = pipeline("image-text-to-text", model="path/to/this/folder")',
                f'messages = [{{"role": "user", "content": [{{"type": "image", "image": "image.png"}}, '
                f'{{"type": "text", "text": {question!r}}}]}}]',
                'print(chat(text=messages, max_new_tokens=16, generate_kwargs={"do_sample": False}, '
                'return_full_text=False)[0]["generated_text"])', "```", ""]
    labels = manifest["labels"]
    templates = manifest.get("templates") or ["a photo of a {label}."]
    return ["In a transformers pipeline:", "", "```python", "from transformers import pipeline", "",
            'classify = pipeline("zero-shot-image-classification", model="path/to/this/folder")',
            f'print(classify("image.png", candidate_labels={labels["names"]!r}, '
            f'hypothesis_template={templates[0].replace("{label}", "{}")!r}))', "```", ""]


def loading_lines(manifest: dict, model_class: str) -> list[str]:
    """Imports and the model + processor, from this folder (merged) or from the base + this adapter (peft)."""
    if manifest["format"] == "transformers":
        return ["Plain transformers (no mmpeft needed):", "", "```python", "import torch", "from PIL import Image",
                f"from transformers import {model_class}, AutoProcessor", "",
                f'model = {model_class}.from_pretrained("path/to/this/folder").eval()',
                'processor = AutoProcessor.from_pretrained("path/to/this/folder")']
    base = manifest["base"]["id"]
    return ["Plain transformers + peft (no mmpeft needed):", "", "```python", "import torch", "from PIL import Image",
            "from peft import PeftModel", f"from transformers import {model_class}, AutoProcessor", "",
            f'model = PeftModel.from_pretrained({model_class}.from_pretrained("{base}"), "path/to/this/folder").eval()',
            f'processor = AutoProcessor.from_pretrained("{base}")']


def dual_encoder_code(manifest: dict) -> list[str]:
    labels = manifest["labels"]
    prompts = [group[0] for group in labels["prompts"]]
    siglip = manifest["base"].get("model_type", "").startswith("siglip")
    lines = loading_lines(manifest, "AutoModel") + [
        f"labels = {labels['names']!r}", f"prompts = {prompts!r}  # first prompt of each class",
        f'inputs = processor(text=prompts, images=[Image.open("image.png").convert("RGB")], '
        f'padding={"max_length" if siglip else True!r}, return_tensors="pt")']
    if siglip:
        lines.append('inputs.pop("attention_mask", None)  # SigLIP scores text unmasked, padded to max_length')
    return lines + ["with torch.no_grad():", "    logits = model(**inputs).logits_per_image  # [images, classes]",
                    "print(labels[int(logits.argmax(-1)[0])])", "```", "",
                    "mmpeft averages the embeddings of all prompt texts of a class; with one prompt per class the "
                    "logits above are exactly mmpeft's.", ""]


def generative_code(manifest: dict) -> list[str]:
    task = manifest.get("task") or {}
    question = task.get("question", "What is in the image?")
    return loading_lines(manifest, "AutoModelForImageTextToText") + [
        f'messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": {question!r}}}]}}]',
        "prompt = processor.apply_chat_template(messages, add_generation_prompt=True)",
        'inputs = processor(text=[prompt], images=[Image.open("image.png").convert("RGB")], return_tensors="pt")',
        "with torch.no_grad():",
        f"    out = model.generate(**inputs, max_new_tokens={task.get('max_new_tokens', 16)}, do_sample=False)",
        'print(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))', "```", "",
        "mmpeft classifies by scoring each class's answer "
        f"({task.get('answer_template', '{label}')!r} with the class name) instead of generating.", ""]
