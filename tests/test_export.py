"""Export round trips on tiny CLIP/SigLIP: merged models in plain transformers, adapters in plain peft, methods that
cannot merge, a 4-bit run, weighted merges, and refusals of damaged or mismatched folders."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

import mmpeft
from mmpeft.artifacts import ExportError, load_adapter, read_run
from mmpeft.artifacts.runs import rebuild, run_data
from mmpeft.artifacts.verify import make_probe, outputs

GENERATIVE_TASK = {
    "llava": {"question": "Which colour fills this picture?", "answer_template": "The colour is {label}."},
    "qwen2vl": {"question": "Name the colour of the image.", "answer_template": "It looks {label} to me."},
}
HAS_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime", "onnxscript"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, color_folder, tiny_clip_dir, tiny_siglip_dir):
    """trained(name) -> a finished run folder, made once per module on first use (one step on 4 shots per class, no
    validation, no zero-shot)."""
    from mmpeft.testing import tiny_backbone

    root, made = tmp_path_factory.mktemp("export-runs"), {}
    dirs = {"clip": lambda: tiny_clip_dir, "siglip": lambda: tiny_siglip_dir, "llava": lambda: tiny_backbone("llava"),
            "qwen2vl": lambda: tiny_backbone("qwen2vl")}
    methods = {"lora": {"name": "lora", "r": 4, "alpha": 8}, "bottleneck": {"name": "bottleneck",
                                                                           "reduction_factor": 8}}
    specs = {"clip": ("clip", "lora", {}), "clip_b": ("clip", "lora", {"seed": 1}),
             "clip_two": ("clip", "lora", {"seed": 2, "data": {"classes": ["red", "green"], "on_bad_rows": "skip"}}),
             "siglip": ("siglip", "lora", {}), "bottleneck": ("clip", "bottleneck", {}), "llava": ("llava", "lora", {}),
             "qwen2vl": ("qwen2vl", "lora", {}), "untested": ("clip", "lora", {"seed": 3, "eval": {"test": False}}),
             "clip_4bit": ("clip", "lora", {"backbone": {"id": str(tiny_clip_dir), "quantization": {"bits": 4}}})}

    def make(name: str):
        if name not in made:
            backbone, method, extra = specs[name]
            recipe = {"name": name, "seed": 0,
                      "backbone": {"id": str(dirs[backbone]())},
                      "data": {"source": "folder", "path": str(color_folder),
                               "templates": ["a photo of a {label} image."], "split": {"val": 0.0, "test": 0.25},
                               "shots": 4},
                      "method": methods[method], "train": {"epochs": 1, "batch_size": 12, "lr": 0.02,
                                                           "warmup_ratio": 0.0},
                      "eval": {"batch_size": 32, "zero_shot": False}, "output": {"dir": str(root), "name": name},
                      **{k: v for k, v in extra.items() if k not in ("data", "eval")}}
            recipe["eval"].update(extra.get("eval", {}))
            recipe["data"].update(extra.get("data", {}))
            if backbone in GENERATIVE_TASK:  # not the defaults: the export must carry them to score the same way
                recipe["data"].update(GENERATIVE_TASK[backbone])
                recipe["eval"]["length_normalize"] = True
            mmpeft.run(recipe)
            made[name] = root / name
        return made[name]

    return make


def trained_outputs(run_dir):
    """The trained model's outputs on the export probe batch, rebuilt from the run folder."""
    run = read_run(run_dir)
    data = run_data(run)
    probe = make_probe(data)
    return outputs(rebuild(run, data.labels), probe), probe


def no_staging_left(parent) -> bool:
    return not [p for p in parent.iterdir() if p.name.endswith(".staging")]


@pytest.mark.parametrize("backbone", ["clip", "siglip"])
def test_merged_export_gives_the_adapter_models_logits_in_plain_transformers(trained, backbone, tmp_path):
    from transformers import AutoModel, AutoProcessor

    run_dir = trained(backbone)
    result = mmpeft.export(run_dir, tmp_path / "merged", how="merged")
    out = tmp_path / "merged"
    assert result["kind"] == "merged" and result["verification"]["relative"] <= 1e-4
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file() and no_staging_left(tmp_path)
    assert "AutoModel.from_pretrained" in (out / "README.md").read_text()

    reference, probe = trained_outputs(run_dir)
    model, processor = AutoModel.from_pretrained(out).eval(), AutoProcessor.from_pretrained(out)
    prompts = [probe.labels.prompts(i)[0] for i in range(len(probe.labels))]
    siglip = backbone == "siglip"
    inputs = processor(text=prompts, images=probe.images, padding="max_length" if siglip else True,
                       return_tensors="pt")
    if siglip:  # mmpeft scores SigLIP text without a mask, as SigLIP was trained (padded to max_length)
        inputs.pop("attention_mask", None)
    with torch.no_grad():
        logits = model(**inputs).logits_per_image
    torch.testing.assert_close(logits, reference["logits"], rtol=0, atol=1e-4)


@pytest.mark.skipif(not HAS_ONNX, reason="--onnx needs onnx, onnxscript and onnxruntime (pip install 'mmpeft[onnx]')")
def test_onnx_towers_match_pytorch(trained, tmp_path):
    import onnxruntime

    result = mmpeft.export(trained("siglip"), tmp_path / "merged", how="merged", onnx=True)
    assert result["onnx"]["verification"]["relative"] <= 1e-4
    session = onnxruntime.InferenceSession(str(tmp_path / "merged" / "onnx" / "image_encoder.onnx"))
    pixels = torch.rand(3, 3, 24, 24).numpy()  # another batch size than the export's: the batch axis is dynamic
    assert session.run(None, {"pixel_values": pixels})[0].shape[0] == 3


@pytest.mark.parametrize("family", ["llava", "qwen2vl"])
def test_generative_merged_export_carries_its_task_and_verifies(trained, family, tmp_path):
    from transformers import AutoModelForImageTextToText

    from mmpeft.backbones import load_backbone
    from mmpeft.specs import BackboneSpec

    run_dir = trained(family)
    result = mmpeft.export(run_dir, tmp_path / "merged", how="merged")
    task = {**GENERATIVE_TASK[family], "length_normalize": True, "max_new_tokens": 16}
    assert result["base"]["family"] == "generative" and result["task"] == task
    assert result["verification"]["relative"] <= 1e-4
    reference, probe = trained_outputs(run_dir)
    reloaded = load_adapter(tmp_path / "merged")
    assert reloaded.task_settings() == task
    torch.testing.assert_close(outputs(reloaded, probe)["logits"], reference["logits"], rtol=0, atol=1e-4)
    # what the export used to check: the folder asked the default question, so its label scores moved
    untasked = outputs(load_backbone(BackboneSpec(id=str(tmp_path / "merged"))), probe)["logits"]
    assert (untasked - reference["logits"]).abs().max() > 1e-3
    name = type(AutoModelForImageTextToText.from_pretrained(tmp_path / "merged")).__name__
    assert name.startswith({"llava": "Llava", "qwen2vl": "Qwen2VL"}[family])
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "model.generate" in card and GENERATIVE_TASK[family]["question"] in card and "image-text-to-text" in card


def test_model_cards_start_with_hugging_face_metadata(trained, color_folder, tmp_path):
    import yaml

    merged = mmpeft.export(trained("clip"), tmp_path / "merged", how="merged")
    mmpeft.export(trained("llava"), tmp_path / "adapter", how="adapter")
    expected = {"merged": ("transformers", "zero-shot-image-classification"), "adapter": ("peft", "image-text-to-text")}
    for kind, (library, pipeline_tag) in expected.items():
        text = (tmp_path / kind / "README.md").read_text()
        assert text.startswith("---\n")
        meta = yaml.safe_load(text.split("---\n")[1])
        assert meta["library_name"] == library and meta["pipeline_tag"] == pipeline_tag
        assert meta["datasets"] == [color_folder.name]
        assert meta["base_model"] == json.loads((tmp_path / kind / "mmpeft_export.json").read_text())["base"]["id"]
        assert "mmpeft" in meta["tags"] and "lora" in meta["tags"]
        (result,) = meta["model-index"][0]["results"]
        assert result["dataset"]["split"] == "test" and result["task"]["type"] == pipeline_tag
    meta = yaml.safe_load((tmp_path / "merged" / "README.md").read_text().split("---\n")[1])
    accuracy = meta["model-index"][0]["results"][0]["metrics"][0]
    assert accuracy["type"] == "accuracy" and accuracy["value"] == pytest.approx(merged["metrics"][0]["test"])
    assert meta["datasets"] == [meta["model-index"][0]["results"][0]["dataset"]["name"]]
    from mmpeft.artifacts.card import data_name  # the built-in digits: their name, not this machine's cache folder

    assert data_name({"source": "digits", "where": "/root/.cache/mmpeft/datasets/digits"}) == "digits"
    if importlib.util.find_spec("huggingface_hub"):
        from huggingface_hub import ModelCard

        card = ModelCard.load(tmp_path / "merged" / "README.md")
        assert card.data.library_name == "transformers" and card.data.base_model == meta["base_model"]
        assert card.data.eval_results[0].metric_value == pytest.approx(merged["metrics"][0]["test"])


def test_merged_export_refuses_a_folder_pipelines_cannot_load(tmp_path, tiny_clip_dir):
    from mmpeft.artifacts.single import check_pipeline_files

    folder = tmp_path / "model"
    shutil.copytree(tiny_clip_dir, folder)
    check_pipeline_files(folder, "dual_encoder", folder)
    with pytest.raises(ExportError, match=r"saved no chat template \(chat_template.jinja"):
        check_pipeline_files(folder, "generative", folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ExportError, match=r"saved no tokenizer \(tokenizer.json or"):
        check_pipeline_files(folder, "dual_encoder", folder)


def test_adapter_only_reloads_exactly_in_plain_peft_and_mmpeft(trained, tiny_clip_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModel

    run_dir = trained("clip")
    result = mmpeft.export(run_dir, tmp_path / "adapter", how="adapter")
    out = tmp_path / "adapter"
    assert result["format"] == "peft" and result["verification"]["max"] == 0.0
    reference, probe = trained_outputs(run_dir)
    assert all(torch.equal(reference[k], v) for k, v in outputs(load_adapter(out), probe).items())

    plain = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_clip_dir), out).eval()
    backbone = load_adapter(out)
    backbone.model = plain  # the same scoring code on the model plain peft loaded
    assert torch.equal(outputs(backbone, probe)["logits"], reference["logits"])
    card = (out / "README.md").read_text()
    assert "PeftModel.from_pretrained" in card and "lora" in card and "blue" in card


def test_methods_that_cannot_merge_say_why_and_export_their_adapter(trained, tmp_path, capsys):
    from mmpeft.cli import main

    run_dir = trained("bottleneck")
    with pytest.raises(ExportError, match=r"method 'bottleneck' cannot be merged into the base weights: it adds "
                                          r"\d+ tensors .*--adapter-only"):
        mmpeft.export(run_dir, tmp_path / "merged", how="merged")
    assert not (tmp_path / "merged").exists() and no_staging_left(tmp_path)
    assert main(["export", str(run_dir), "--out", str(tmp_path / "cli"), "--merge"]) == 2
    assert "cannot be merged" in capsys.readouterr().err and not (tmp_path / "cli").exists()

    result = mmpeft.export(run_dir, tmp_path / "auto")  # how="auto": falls back to the adapter, with a note
    assert "exporting the adapter alone" in capsys.readouterr().out
    assert result["kind"] == "adapter" and result["format"] == "mmpeft" and result["verification"]["max"] == 0.0
    assert "load_adapter" in (tmp_path / "auto" / "README.md").read_text()


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="4-bit loading needs bitsandbytes")
def test_4bit_run_merges_into_a_dequantised_base(trained, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModel

    result = mmpeft.export(trained("clip_4bit"), tmp_path / "merged", how="merged", dtype="float32")
    out = tmp_path / "merged"
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    with safe_open(str(out / "model.safetensors"), "pt") as weights:
        assert {weights.get_tensor(k).dtype for k in weights.keys()} == {torch.float32}
    assert any("4-bit" in note and "MiB" in note for note in result["notes"])
    assert result["verification"]["passed"] and result["verification"]["vs_trained_run"] > 0
    AutoModel.from_pretrained(out)


def test_weighted_merges_write_an_evaluation_table(trained, tmp_path):
    from mmpeft.cli import main

    runs = [trained("clip"), trained("clip_b")]
    for how in ("linear", "dare_ties"):
        result = mmpeft.merge(runs, [0.5, 0.5], how=how, out=tmp_path / how)
        table = json.loads((tmp_path / how / "merge_results.json").read_text())
        assert [row["run"] for row in table["runs"]] == ["clip", "clip_b"] and table["how"] == how
        assert all(0 <= row["merged"] <= 1 for row in result["table"])
        assert "| clip_b | 18 |" in (tmp_path / how / "merge_results.md").read_text()
    assert main(["merge", *map(str, runs), "--weights", "0.7", "0.3", "--how", "ties", "--density", "0.6",
                 "--out", str(tmp_path / "ties")]) == 0
    manifest = json.loads((tmp_path / "ties" / "mmpeft_export.json").read_text())
    assert manifest["merge"] == {"how": "ties", "weights": [0.7, 0.3], "density": 0.6, "seed": 0}
    load_adapter(tmp_path / "ties")  # peft format, checked against its manifest


def test_a_merge_of_runs_with_different_label_sets_says_whose_labels_it_predicts_with(trained, tmp_path, capsys):
    mmpeft.merge([trained("clip"), trained("clip_two")], out=tmp_path / "merged")
    note = "the source runs have different label sets; `mmpeft predict` on this adapter uses the first run's"
    assert note in capsys.readouterr().out and note in (tmp_path / "merged" / "README.md").read_text()
    mmpeft.merge([trained("clip"), trained("clip_b")], out=tmp_path / "same")
    assert "different label sets" not in capsys.readouterr().out


def test_merge_refuses_runs_with_different_bases_or_methods(trained, tmp_path):
    with pytest.raises(ExportError, match=r"different bases \(backbone.id"):
        mmpeft.merge([trained("clip"), trained("siglip")], out=tmp_path / "x")
    with pytest.raises(ExportError, match="different methods \\('lora' vs 'bottleneck'\\)"):
        mmpeft.merge([trained("clip"), trained("bottleneck")], out=tmp_path / "x")
    with pytest.raises(ExportError, match="weights: 1 given for 2 runs"):
        mmpeft.merge([trained("clip"), trained("clip_b")], [1.0], out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_damaged_or_mismatched_folders_are_refused(trained, tiny_siglip_dir, tmp_path):
    run_dir = trained("clip")
    mmpeft.export(run_dir, tmp_path / "good", how="adapter", verify=False)

    def damaged(name: str, change) -> object:
        folder = tmp_path / name
        shutil.copytree(tmp_path / "good", folder)
        change(folder)
        return folder

    wrong_base = r"was trained on base .*another architecture \(model_type: 'clip' \(trained\) vs 'siglip'"
    with pytest.raises(ExportError, match=wrong_base):
        load_adapter(tmp_path / "good", base=str(tiny_siglip_dir))
    missing = damaged("missing", lambda f: (f / "adapter_model.safetensors").unlink())
    with pytest.raises(ExportError, match="missing adapter_model.safetensors"):
        load_adapter(missing)
    corrupt = damaged("corrupt", lambda f: (f / "adapter_model.safetensors").write_bytes(b"not safetensors"))
    with pytest.raises(ExportError, match="adapter_model.safetensors changed after export"):
        load_adapter(corrupt)
    with pytest.raises(ExportError, match="no mmpeft_export.json"):
        load_adapter(run_dir / "adapter")

    broken_run = tmp_path / "broken-run"
    shutil.copytree(run_dir, broken_run)
    (broken_run / "adapter" / "adapter_config.json").unlink()
    with pytest.raises(ExportError, match=r"adapter: missing adapter_config.json \(method 'lora' saves"):
        mmpeft.export(broken_run, tmp_path / "out")
    (broken_run / "metrics.json").unlink()
    with pytest.raises(ExportError, match="the run did not finish; continue it with `mmpeft run --resume"):
        mmpeft.export(broken_run, tmp_path / "out")
    with pytest.raises(FileExistsError, match="already exists and is not an empty folder"):
        mmpeft.export(run_dir, tmp_path / "good")


def test_failed_verification_writes_nothing(trained, tmp_path, monkeypatch):
    import mmpeft.artifacts.single as single

    real = single.differences  # an export whose outputs went wrong (a negative tolerance is refused up front now)
    monkeypatch.setattr(single, "differences", lambda *outputs: {**real(*outputs), "relative": 1.0})
    with pytest.raises(ExportError, match=r"verification failed .*nothing was written"):
        mmpeft.export(trained("clip"), tmp_path / "merged", how="merged")
    assert not (tmp_path / "merged").exists() and no_staging_left(tmp_path)


def test_a_linear_merge_is_the_weighted_sum_of_the_runs_lora_changes(trained, tmp_path):
    """peft's `cat`, not its `linear` (which weights A and B apart): merged B'A' = sum(w_i * scaling_i * B_i A_i)."""
    from safetensors.torch import load_file

    runs = [trained("clip"), trained("clip_b")]
    mmpeft.merge(runs, [0.7, 0.3], how="linear", out=tmp_path / "linear")

    def deltas(folder: Path) -> dict[str, torch.Tensor]:
        config = json.loads((folder / "adapter_config.json").read_text())
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        scaling = config["lora_alpha"] / config["r"]
        return {key[:-len(".lora_A.weight")]: scaling * tensors[key.replace("lora_A", "lora_B")] @ tensors[key]
                for key in tensors if key.endswith(".lora_A.weight")}

    a, b, merged = deltas(runs[0] / "adapter"), deltas(runs[1] / "adapter"), deltas(tmp_path / "linear")
    assert merged.keys() == a.keys() and len(a) > 0
    for key in a:
        torch.testing.assert_close(merged[key], 0.7 * a[key] + 0.3 * b[key], rtol=1e-5, atol=1e-6)


def test_a_run_with_eval_test_false_exports_but_does_not_merge(trained, tmp_path):
    """Was refused as "the run folder is damaged or did not finish its evaluation" (its metrics have no test split)."""
    run = trained("untested")
    mmpeft.export(run, tmp_path / "out", how="merged")
    assert "not evaluated (eval.test: false)" in (tmp_path / "out" / "README.md").read_text()
    shutil.copytree(run, tmp_path / "again")
    with pytest.raises(ValueError, match=r"was not tested \(eval.test: false\): merge compares the merged adapter"):
        mmpeft.merge([run, tmp_path / "again"], out=tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
