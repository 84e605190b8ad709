"""mmpeft's training loop vs a minimal hand-written torch+peft loop: same backbone, data, batch size, steps.

    python tests/benchmarks/bench_train_loop.py [--epochs 3] [--repeats 3]

Prints samples/s for each and their ratio (target: mmpeft >= 0.95x). Both loops run in this one process,
alternating, so machine noise hits both; the best of `repeats` is reported for each.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from peft import get_peft_model  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from mmpeft.backbones import load_backbone  # noqa: E402
from mmpeft.data import collate_images, load_data  # noqa: E402
from mmpeft.methods import METHODS  # noqa: E402
from mmpeft.objectives import make_objective  # noqa: E402
from mmpeft.runs.recipe import load_recipe  # noqa: E402
from mmpeft.testing import save_tiny_clip  # noqa: E402
from mmpeft.train import Trainer  # noqa: E402


def setup(backbone_dir: str):
    recipe = load_recipe({"method": {"name": "lora", "r": 8}, "backbone": {"id": backbone_dir},
                          "data": {"source": "digits", "templates": ["a photo of the digit {label}."]},
                          "train": {"batch_size": 64, "lr": 1e-3, "max_grad_norm": None}})
    data = load_data(recipe.data, recipe.seed)
    return recipe, data


def run_mmpeft(recipe, data, epochs: int) -> float:
    torch.manual_seed(0)
    backbone = load_backbone(recipe.backbone)
    METHODS.get("lora")().apply(backbone, recipe.method)
    spec = recipe.train.__class__(**{**recipe.train.__dict__, "epochs": epochs})
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(backbone, make_objective("classification", backbone, data.labels),
                          data.dataset("train"), spec, 0, run_dir)
        trainer.save_checkpoint = lambda: None  # the hand loop saves nothing either
        progress = trainer.fit()
    return progress.samples_seen / progress.train_seconds


def run_hand_loop(recipe, data, epochs: int) -> float:
    torch.manual_seed(0)
    backbone = load_backbone(recipe.backbone)
    lora = METHODS.get("lora")()
    model = get_peft_model(backbone.model, lora.peft_config(backbone, recipe.method))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    prompts = [data.labels.prompts(i)[0] for i in range(len(data.labels))]
    tokens = backbone.tokenizer(prompts, padding=True, return_tensors="pt")
    loader = DataLoader(data.dataset("train"), batch_size=64, shuffle=True,
                        collate_fn=collate_images(backbone.preprocess))
    model.train()
    samples, start = 0, time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            image = F.normalize(model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output, dim=-1)
            text = F.normalize(model.get_text_features(**tokens).pooler_output, dim=-1)
            logits = image @ text.t() * model.base_model.model.logit_scale.exp()
            loss = F.cross_entropy(logits, batch["labels"])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            samples += len(batch["labels"])
    return samples / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as folder:
        backbone_dir = str(save_tiny_clip(folder + "/clip", hidden=64, layers=3,
                                          config_overrides={"projection_dim": 64}))
        recipe, data = setup(backbone_dir)
        best = {"mmpeft": 0.0, "hand-written": 0.0}
        for _ in range(args.repeats):
            best["hand-written"] = max(best["hand-written"], run_hand_loop(recipe, data, args.epochs))
            best["mmpeft"] = max(best["mmpeft"], run_mmpeft(recipe, data, args.epochs))
    print(f"LoRA r=8, tiny CLIP (hidden 64, 3 layers), digits train split ({len(data.train)} images), "
          f"batch 64, {args.epochs} epochs, best of {args.repeats}")
    print("| loop | samples/s |\n|---|---|")
    for name, value in best.items():
        print(f"| {name} | {value:.1f} |")
    print(f"ratio mmpeft / hand-written: {best['mmpeft'] / best['hand-written']:.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()
