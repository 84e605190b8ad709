"""The equivalence check of an export: the same fixed batch through the exported model, reloaded from disk, and
through the trained model in memory; the largest absolute difference of any output must stay within a tolerance.

Outputs compared: the image-vs-label-text logits (what predictions come from), the normalised image embeddings and
the normalised class text embeddings.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from mmpeft.export.runs import ExportError

logger = logging.getLogger("mmpeft")

PROBE_IMAGES = 8  # the first test images of the run's split
# Largest allowed |difference| of any output, by the export's dtype. float32: merging reorders sums (W + BA instead
# of Wx + BAx), which moves logits by ~1e-5 on logit scales up to 100. 16-bit: one rounding of each merged weight.
DEFAULT_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.25, "float16": 0.05}


@dataclass
class Probe:
    """A fixed batch: PIL images (each model applies its own saved processor) and the run's label set."""

    images: list
    labels: object


def make_probe(data) -> Probe:
    dataset = data.dataset("test")
    return Probe([dataset[i]["image"] for i in range(min(PROBE_IMAGES, len(dataset)))], data.labels)


@torch.no_grad()
def outputs(backbone, probe: Probe) -> dict[str, torch.Tensor]:
    """Logits and embeddings of the probe batch, on the CPU in float32."""
    backbone.eval()
    pixels = backbone.preprocess(probe.images)
    text = None if backbone.head is not None else backbone.class_text_features(probe.labels)
    result = {"logits": backbone.classify(pixels, text), "image_embeddings": backbone.encode_images(pixels)}
    if text is not None:
        result["text_embeddings"] = text
    return {name: value.detach().float().cpu() for name, value in result.items()}


def differences(reference: dict[str, torch.Tensor], exported: dict[str, torch.Tensor]) -> dict[str, float]:
    """Max |reference - exported| per output, and "max" over all of them."""
    diffs = {}
    for name, value in reference.items():
        if name not in exported or exported[name].shape != value.shape:
            raise ExportError(f"the exported model gives no {name} of shape {tuple(value.shape)} "
                              f"(got {tuple(exported[name].shape) if name in exported else 'none'})")
        diffs[name] = float((value - exported[name]).abs().max())
    diffs["max"] = max(diffs.values())
    return diffs


def check(diffs: dict[str, float], tolerance: float, what: str) -> dict:
    """Print the result; raise ExportError above `tolerance` (the caller's staging folder is then removed)."""
    detail = ", ".join(f"{k} {v:.2e}" for k, v in diffs.items() if k != "max")
    print(f"verify {what}: max abs difference {diffs['max']:.2e} (tolerance {tolerance:g}; {detail})", flush=True)
    if not diffs["max"] <= tolerance:  # also catches NaN
        raise ExportError(f"verification failed for {what}: outputs differ from the trained model by up to "
                          f"{diffs['max']:.3g} (> tolerance {tolerance:g}; {detail}); nothing was written. A larger "
                          f"difference than the dtype explains means the export is wrong; for a lower-precision "
                          f"--dtype, pass a larger tolerance if the difference is acceptable")
    return {**diffs, "tolerance": tolerance, "passed": True}
