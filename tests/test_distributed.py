"""Multi-process training on CPU (gloo) and the memory savers: same results as one process, one writer."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

import mmpeft
from mmpeft.backbones import load_backbone
from mmpeft.data import collate_images, load_data
from mmpeft.methods import METHODS
from mmpeft.objectives import make_objective
from mmpeft.runs.recipe import load_recipe
from mmpeft.train import enable_gradient_checkpointing, make_optimizer, shard

# Adapter weights of a 2-process run vs a 1-process run with twice the batch: same global batches, so only
# float summation order differs (observed ~7e-6 on weights of magnitude ~0.2).
TOLERANCE = 1e-4


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_process_with_twice_the_batch(color_recipe, tmp_path, strategy):
    recipe = {**color_recipe, "train": {**color_recipe["train"], "epochs": 2, "batch_size": 6, "strategy": strategy}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "mmpeft", "run",
               str(path), "output.name=two"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "2 processes x batch 6 per process = global batch 12" in finished.stdout + finished.stderr
    one = mmpeft.run(path, ["output.name=one", "train.batch_size=12"])

    runs = tmp_path / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["one", "two"]
    two = json.loads((runs / "two" / "metrics.json").read_text())
    assert two["test"]["n"] == one["test"]["n"] == 18  # every test image once: no padded duplicates
    assert two["test"]["accuracy"] == one["test"]["accuracy"]
    assert two["train"]["steps"] == one["train"]["steps"] == 6
    a = load_file(str(runs / "one" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(runs / "two" / "adapter" / "adapter_model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < TOLERANCE
    assert (runs / "two" / "train.log").read_text().count("epoch 2:") == 1  # only the main process logs to file
    from peft import PeftModel
    from transformers import AutoModel

    PeftModel.from_pretrained(AutoModel.from_pretrained(recipe["backbone"]["id"]), runs / "two" / "adapter")


def loss_and_grads(color_recipe, checkpointing: bool):
    recipe = load_recipe(color_recipe, ["method.dropout=0.0"])
    data = load_data(recipe.data, recipe.seed)
    torch.manual_seed(0)
    backbone = load_backbone(recipe.backbone)
    METHODS.get("lora")().apply(backbone, recipe.method)
    if checkpointing:
        enable_gradient_checkpointing(backbone)
    backbone.train()
    batch = collate_images(backbone.preprocess)([data.dataset("train")[i] for i in range(8)])
    loss = make_objective("classification", backbone, data.labels).loss(batch)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in backbone.named_parameters() if p.requires_grad}


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(color_recipe):
    loss, grads = loss_and_grads(color_recipe, checkpointing=False)
    loss_ckpt, grads_ckpt = loss_and_grads(color_recipe, checkpointing=True)
    assert loss == pytest.approx(loss_ckpt, abs=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown on machines without CUDA")
def test_8bit_optimizer_without_cuda_says_so(color_recipe):
    spec = load_recipe(color_recipe, ["train.optimizer=adamw_8bit"]).train
    with pytest.raises(ValueError, match="adamw_8bit .* needs a CUDA GPU; use adamw"):
        make_optimizer(spec, [torch.nn.Parameter(torch.zeros(2))])


def test_global_batches_split_evenly_between_processes():
    assert [shard(list(range(10)), rank, 3) for rank in range(3)] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert shard([5, 6], 0, 1) == [5, 6]


def test_two_processes_train_conversations_that_mix_text_only_and_image_rows(tmp_path):
    """A batch of text-only rows skips the image tower and projector: without DDP's unused-parameter search the
    processes wait for each other's projector gradients ("Expected to have finished reduction")."""
    recipe = str(mmpeft.core.io.PROJECT_ROOT / "recipes" / "llava-instruct.yaml")
    common = ["train.epochs=1", "eval.generate=false", "eval.zero_shot=false", f"output.dir={tmp_path}"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "mmpeft", "run",
               recipe, *common, "train.batch_size=1", "output.name=two"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    one = mmpeft.run(recipe, [*common, "train.batch_size=2", "output.name=one"])
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["train"]["steps"] == one["train"]["steps"]
    a = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < TOLERANCE
    assert two["test"]["loss"] == pytest.approx(one["test"]["loss"], abs=1e-4)
