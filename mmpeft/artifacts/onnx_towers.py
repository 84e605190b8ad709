"""ONNX export of a merged dual encoder's two towers for serving (image -> embedding, text -> embedding), each run in
onnxruntime on the probe batch and checked against PyTorch. Needs `pip install 'mmpeft[onnx]'`."""

from __future__ import annotations

import importlib.util
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from mmpeft.artifacts.runs import ExportError
from mmpeft.artifacts.verify import check, differences

logger = logging.getLogger("mmpeft")

ONNX_DIR = "onnx"
OPSET = 18


class ImageTower(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        output = self.model.get_image_features(pixel_values=pixel_values)
        return output if isinstance(output, torch.Tensor) else output.pooler_output


class TextTower(nn.Module):
    def __init__(self, model: nn.Module, use_mask: bool):
        super().__init__()
        self.model, self.use_mask = model, use_mask

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask if self.use_mask else None  # SigLIP was trained without one (padded to max_length)
        output = self.model.get_text_features(input_ids=input_ids, attention_mask=mask)
        return output if isinstance(output, torch.Tensor) else output.pooler_output


def export_towers(directory: Path, probe, tolerance: float, what: str) -> dict:
    """`directory/onnx/{image,text}_encoder.onnx` from the merged model saved in `directory` (float32)."""
    missing = [name for name in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(f"--onnx needs {', '.join(missing)}: pip install 'mmpeft[onnx]' (or leave out --onnx)")
    import onnxruntime

    from mmpeft.backbones import load_backbone
    from mmpeft.specs import BackboneSpec

    backbone = load_backbone(BackboneSpec(id=str(directory), dtype="float32")).eval()
    if backbone.family != "dual_encoder":
        raise ExportError(f"--onnx exports the two towers of a dual encoder; this is a {backbone.family} model "
                          "(leave out --onnx)")
    model = backbone.base_model
    pixels = backbone.preprocess(probe.images)
    texts = [text for i in range(len(probe.labels)) for text in probe.labels.prompts(i)]
    tokens = backbone.tokenize(texts)
    tokens.setdefault("attention_mask", torch.ones_like(tokens["input_ids"]))
    use_mask = not backbone.model_type.startswith("siglip")
    towers = {
        "image_encoder": (ImageTower(model), {"pixel_values": pixels}),
        "text_encoder": (TextTower(model, use_mask), {"input_ids": tokens["input_ids"],
                                                       "attention_mask": tokens["attention_mask"]}),
    }
    (directory / ONNX_DIR).mkdir()
    reference, exported = {}, {}
    for name, (tower, inputs) in towers.items():
        path = directory / ONNX_DIR / f"{name}.onnx"
        batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
        shapes = {key: ({0: batch} if key == "pixel_values" else {0: batch, 1: sequence}) for key in inputs}
        try:
            with warnings.catch_warnings():  # the exporter's notes on axis names and absent torchvision ops
                warnings.filterwarnings("ignore", message="# The axis name")
                logging.getLogger("torch.onnx").setLevel(logging.ERROR)
                torch.onnx.export(tower.eval(), tuple(inputs.values()), str(path), input_names=list(inputs),
                                  output_names=["embeddings"], dynamic_shapes=shapes, opset_version=OPSET,
                                  dynamo=True, external_data=False, verbose=False)
        except Exception as error:  # the exporter raises many types; say which tower and why
            raise ExportError(f"ONNX export of the {name} failed: {str(error).splitlines()[0]}") from None
        with torch.no_grad():
            reference[name] = tower(**inputs).float()
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = {arg.name: inputs[arg.name].numpy() for arg in session.get_inputs()}  # unused inputs may be pruned
        exported[name] = torch.from_numpy(session.run(None, feed)[0]).float()
    verification = check(differences(reference, exported), tolerance, f"ONNX towers of {what}")
    with torch.no_grad():
        scale, bias = float(backbone.logit_scale()), float(backbone.logit_bias())
    return {"files": [f"{ONNX_DIR}/{name}.onnx" for name in towers], "opset": OPSET, "verification": verification,
            "text_attention_mask": use_mask, "logit_scale": scale, "logit_bias": bias,
            "usage": "logits = logit_scale * normalize(image_embeddings) @ normalize(text_embeddings).T + logit_bias"}
