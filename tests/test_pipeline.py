"""End to end on a tiny CLIP: the run folder, what trains, reload through plain peft, resume, reproducibility."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import mmpeft
from mmpeft.backbones import load_backbone
from mmpeft.data import DataError, ImageDataset, collate_images, load_data
from mmpeft.methods import METHODS
from mmpeft.objectives import make_objective
from mmpeft.runs.recipe import load_recipe
from mmpeft.train import Callback, Trainer, TrainingDiverged


def test_run_writes_a_complete_folder_and_beats_zero_shot(color_recipe, tmp_path):
    metrics = mmpeft.run(color_recipe)
    run_dir = tmp_path / "runs" / "run"
    for name in ("recipe.yaml", "metrics.json", "train.log", "report.md", "confusion_matrix.png",
                 "adapter/adapter_model.safetensors", "adapter/adapter_config.json"):
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "metrics.json").read_text())["test"]["accuracy"] == metrics["test"]["accuracy"]
    assert metrics["test"]["accuracy"] >= metrics["zero_shot"]["accuracy"] + 0.3
    assert metrics["params"]["trainable"] == 4 * 2 * 2 * (4 * 32 + 4 * 32)  # towers x layers x q,k,v,out x (A+B)
    assert "| after training |" in (run_dir / "report.md").read_text()
    assert not (run_dir / "checkpoints").exists()
    resolved = load_recipe(run_dir / "recipe.yaml")
    assert resolved.method.r == 4 and resolved.train.epochs == 4


def build(color_recipe):
    recipe = load_recipe(color_recipe)
    data = load_data(recipe.data, recipe.seed)
    backbone = load_backbone(recipe.backbone)
    return recipe, data, backbone


def test_only_lora_parameters_change_and_adapter_reloads_in_plain_peft(color_recipe, tmp_path):
    from peft import PeftModel
    from transformers import AutoModel

    recipe, data, backbone = build(color_recipe)
    before = {n: p.detach().clone() for n, p in backbone.model.named_parameters()}
    method = METHODS.get("lora")()
    method.apply(backbone, recipe.method)
    Trainer(backbone, make_objective("classification", backbone, data.labels), ImageDataset(data.train),
            recipe.train, recipe.seed, tmp_path).fit()
    after = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
             for n, p in backbone.model.named_parameters()}
    changed = {n for n, p in after.items() if n not in before or not torch.equal(before[n], p)}
    assert changed and all("lora_" in n for n in changed)
    assert any("lora_B" in n for n in changed)

    method.save(backbone, recipe.method, tmp_path / "adapter")
    plain = PeftModel.from_pretrained(AutoModel.from_pretrained(recipe.backbone.id), tmp_path / "adapter").eval()
    batch = collate_images(backbone.preprocess)([ImageDataset(data.test)[i] for i in range(6)])
    tokens = backbone.tokenize(["a photo of a red image.", "a photo of a blue image."])
    backbone.eval()
    with torch.no_grad():
        ours = backbone.model(pixel_values=batch["pixel_values"], **tokens).logits_per_image
        theirs = plain(pixel_values=batch["pixel_values"], **tokens).logits_per_image
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def adapter_state(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def test_same_seed_same_metrics(color_recipe, tmp_path):
    first = mmpeft.run(color_recipe, ["output.name=a", "data.augment.horizontal_flip=true"])
    second = mmpeft.run(color_recipe, ["output.name=b", "data.augment.horizontal_flip=true"])
    assert first["test"] == second["test"] and first["train"]["history"] == second["train"]["history"]
    a, b = adapter_state(tmp_path / "runs" / "a"), adapter_state(tmp_path / "runs" / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    mmpeft.run(color_recipe, ["output.name=c", "seed=1", "data.augment.horizontal_flip=true"])
    c = adapter_state(tmp_path / "runs" / "c")
    assert not all(torch.equal(a[k], c[k]) for k in a)


class Interrupt(Callback):
    """Simulates a kill after a number of optimizer steps."""

    def __init__(self, after_batches: int):
        self.left = after_batches

    def transform_batch(self, batch):
        self.left -= 1
        if self.left < 0:
            raise KeyboardInterrupt
        return batch


def test_resume_reaches_the_same_final_metrics(color_recipe, tmp_path, monkeypatch):
    # no val split: the final weights are the last ones, so the comparison covers every step
    overrides = ["train.checkpoint_every_steps=2", "train.grad_accum_steps=2", "method.dropout=0.1",
                 "data.split.val=0"]
    reference = mmpeft.run(color_recipe, [*overrides, "output.name=whole"])

    original_init = Trainer.__init__

    def interrupted_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.callbacks = (Interrupt(after_batches=20),)  # mid-epoch 3, after a mid-epoch checkpoint

    monkeypatch.setattr(Trainer, "__init__", interrupted_init)
    with pytest.raises(KeyboardInterrupt):
        mmpeft.run(color_recipe, [*overrides, "output.name=cut"])
    run_dir = tmp_path / "runs" / "cut"
    progress = json.loads((run_dir / "checkpoints" / "last" / "progress.json").read_text())
    assert progress["epoch"] == 2 and progress["batch_in_epoch"] > 0 and not (run_dir / "metrics.json").exists()
    monkeypatch.setattr(Trainer, "__init__", original_init)

    resumed = mmpeft.run(None, resume=run_dir)
    assert resumed["test"] == reference["test"]
    assert resumed["train"]["history"] == reference["train"]["history"]
    whole = adapter_state(tmp_path / "runs" / "whole")
    assert all(torch.equal(whole[k], v) for k, v in adapter_state(run_dir).items())


def test_nan_loss_stops_with_a_clear_message(color_recipe, monkeypatch):
    from mmpeft import objectives

    monkeypatch.setattr(objectives.Classification, "loss", lambda self, batch: torch.tensor(float("nan")))
    with pytest.raises(TrainingDiverged, match=r"loss became nan at epoch 1, batch 1; no checkpoint.*train.lr"):
        mmpeft.run(color_recipe)


def test_bad_rows_stop_the_run_before_training(color_recipe, color_folder, tmp_path):
    rows = tmp_path / "rows.csv"
    shutil.copy(sorted((color_folder / "red").glob("*.png"))[0], tmp_path / "good.png")
    rows.write_text("image,label\ngood.png,red\nmissing.png,red\ngood.png,purple\n")
    recipe = {**color_recipe, "data": {"source": "csv", "path": str(rows), "classes": ["red", "blue"]}}
    with pytest.raises(DataError) as caught:
        mmpeft.run(recipe)
    message = str(caught.value)
    assert "missing.png" in message and "purple" in message and "on_bad_rows: skip" in message
    assert not (tmp_path / "runs" / "run" / "adapter").exists()


def test_unknown_hook_name_is_an_error():
    with pytest.raises(TypeError, match="on_train_strat"):
        type("Typo", (Callback,), {"on_train_strat": lambda self, trainer: None})


def test_cli_reports_user_errors_in_one_line(capsys, tmp_path):
    from mmpeft.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: lora\ntrain: {epocs: 2}\n")
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "train.epocs: unknown key (did you mean 'epochs'?)" in err and "Traceback" not in err
    assert main(["check", str(recipe), "train.epocs=1"]) == 2
    recipe.write_text("method: adapters/lora-r8.yaml\n")
    assert main(["check", str(recipe), "method.r=2"]) == 0
    assert "r: 2" in capsys.readouterr().out
