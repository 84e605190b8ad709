"""The equivalence check of an export: the same fixed batch through the exported model, reloaded from disk, and
through the trained model in memory; every output must agree within a tolerance.

Outputs compared: the image-vs-label-text logits (what predictions come from: scaled similarities for dual encoders,
answer log-likelihoods for generative models) and, for dual encoders, the normalised image and class text
embeddings. The tolerance is relative to each output's size: max|exported - trained| <= tolerance * max(1,
max|trained|). Embeddings have entries below 1, so for them it is absolute; logits scale with the
model's logit scale (up to 100 for CLIP), so for them it is relative to the largest logit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mmpeft.artifacts.runs import ExportError
from mmpeft.data import LabelSet

if TYPE_CHECKING:
    from mmpeft.backbones import Backbone

logger = logging.getLogger("mmpeft")

PROBE_IMAGES = 8  # the first test images of the run's split
# By the export's dtype. float32: merging only reorders sums ((W + BA)x instead of Wx + BAx): ~1e-7 relative on
# tiny models, more with depth. 16-bit: each merged weight is rounded once more (bfloat16 keeps 8 bits of mantissa).
DEFAULT_TOLERANCE = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 3e-2}


@dataclass
class Probe:
    """A fixed batch: PIL images (each model applies its own saved processor) and the run's label set."""

    images: list
    labels: object


def make_probe(data) -> Probe:
    """The first test images and the run's label set; caption-only data has no classes, so its texts are the
    distinct captions of those images."""
    dataset = data.dataset("test")
    items = [dataset[i] for i in range(min(PROBE_IMAGES, len(dataset)))]
    labels = data.labels
    if not len(labels):
        captions = dict.fromkeys(item["text"] for item in items if item.get("text"))
        labels = LabelSet(list(captions), templates=("{label}",))
    return Probe([item["image"] for item in items], labels)


@torch.no_grad()
def outputs(backbone: Backbone, probe: Probe) -> dict[str, torch.Tensor]:
    """Logits (and a dual encoder's embeddings) of the probe batch, on the CPU in float32."""
    backbone.eval()
    pixels = backbone.preprocess(probe.images)
    text = None if backbone.head is not None else backbone.class_text_features(probe.labels)
    result = {"logits": backbone.classify(pixels, text)}
    if backbone.caches_image_features:
        result["image_embeddings"] = backbone.encode_images(pixels)
    if isinstance(text, torch.Tensor):
        result["text_embeddings"] = text
    return {name: value.detach().float().cpu() for name, value in result.items()}


def differences(reference: dict[str, torch.Tensor], exported: dict[str, torch.Tensor]) -> dict[str, float]:
    """Max |reference - exported| per output; "max" over all of them; "relative": the largest of each output's
    difference / max(1, max|reference|), the number held against the tolerance."""
    diffs, relative = {}, 0.0
    for name, value in reference.items():
        if name not in exported or exported[name].shape != value.shape:
            raise ExportError(f"the exported model gives no {name} of shape {tuple(value.shape)} "
                              f"(got {tuple(exported[name].shape) if name in exported else 'none'})")
        for side, tensor in (("the trained model", value), ("the exported model", exported[name])):
            if not bool(torch.isfinite(tensor).all()):  # max() with NaN keeps the other value: check first
                raise ExportError(f"verification failed: {side} gives NaN or infinite {name} "
                                  f"({int((~torch.isfinite(tensor)).sum())} of {tensor.numel()} values); nothing "
                                  "was written. Its weights are not finite: train again (a lower train.lr)")
        diffs[name] = float((value - exported[name]).abs().max())
        relative = max(relative, diffs[name] / max(1.0, float(value.abs().max())))
    return {**diffs, "max": max(diffs.values()), "relative": relative}


def check(diffs: dict[str, float], tolerance: float, what: str) -> dict:
    """Print the result; raise ExportError above `tolerance` (the caller's staging folder is then removed)."""
    detail = ", ".join(f"{k} {v:.2e}" for k, v in diffs.items() if k not in ("max", "relative"))
    print(f"verify {what}: max abs difference {diffs['max']:.2e} ({detail}); relative {diffs['relative']:.2e}, "
          f"tolerance {tolerance:g}", flush=True)
    if not diffs["relative"] <= tolerance:  # also catches NaN
        raise ExportError(f"verification failed for {what}: outputs differ from the trained model by up to "
                          f"{diffs['max']:.3g} ({detail}; relative {diffs['relative']:.3g} > tolerance {tolerance:g});"
                          " nothing was written. More than the dtype explains means the export is wrong; for a "
                          "lower-precision dtype, pass a larger tolerance if the difference is acceptable")
    return {**diffs, "tolerance": tolerance, "passed": True}
