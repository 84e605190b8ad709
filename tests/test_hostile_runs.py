"""Hostile conditions for runs (issue 20): two runs claiming one folder, damaged backbones and checkpoints, a full disk,
read-only outputs: one line naming the file and what to do (exit 2 on the CLI), and nothing half-written."""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import SafetensorError

import mmpeft
from mmpeft.backbones import BackboneError
from mmpeft.cli import main
from mmpeft.core.io import OutputError, atomic_dir
from mmpeft.core.schema import RecipeError
from mmpeft.runs.folder import LOCK_FILE, RECIPE_FILE, claim_run_dir, new_run_dir, release_run_dir
from mmpeft.runs.recipe import load_recipe
from mmpeft.train.checkpoint import CheckpointError, read_checkpoint, write_checkpoint


@pytest.fixture
def quick(color_recipe, tmp_path):
    """The colour recipe cut to one short epoch without zero-shot or validation."""
    return {**color_recipe, "data": {**color_recipe["data"], "shots": 4, "split": {"val": 0.0, "test": 0.25}},
            "train": {**color_recipe["train"], "epochs": 1, "batch_size": 12},
            "eval": {"batch_size": 32, "zero_shot": False}}


def write_recipe(tmp_path, recipe: dict) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text("# mmpeft run recipe.yaml\n" + yaml.safe_dump(recipe))
    return str(path)


def test_threads_claiming_one_run_folder_at_once_get_one_winner(quick, tmp_path):
    recipe = load_recipe(quick)
    barrier, results = threading.Barrier(6), []

    def claim():
        barrier.wait()
        try:
            mine = new_run_dir(recipe)
        except FileExistsError as error:
            mine = error
        results.append(mine)
        barrier.wait()  # the winner holds its claim until every thread has tried
        if not isinstance(mine, Exception):
            release_run_dir(mine)

    threads = [threading.Thread(target=claim) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    won = [r for r in results if not isinstance(r, Exception)]
    lost = [r for r in results if isinstance(r, Exception)]
    assert len(won) == 1 and len(lost) == 5
    assert all("is in use by another run right now" in str(error) for error in lost)
    assert sorted(p.name for p in won[0].iterdir()) == [RECIPE_FILE]


@contextmanager
def claimed_by_another(folder: Path):
    """`folder` claimed by a thread for the block, as another process's run or grid driver holds it (flock: as
    exclusive between threads as between processes)."""
    claimed, done = threading.Event(), threading.Event()

    def hold():
        claim_run_dir(folder)
        claimed.set()
        done.wait(60)
        release_run_dir(folder)

    first = threading.Thread(target=hold)
    first.start()
    try:
        claimed.wait(60)
        yield
    finally:
        done.set()
        first.join()


def test_a_second_run_with_the_same_output_name_is_refused_and_touches_nothing(quick, tmp_path, capsys):
    """The first run is another thread holding the claim (flock: as exclusive as between processes)."""
    run_dir = tmp_path / "runs" / "run"
    run_dir.mkdir(parents=True)
    first_recipe = load_recipe(quick).to_yaml()
    (run_dir / RECIPE_FILE).write_text(first_recipe)
    with claimed_by_another(run_dir):
        assert main(["run", write_recipe(tmp_path, quick)]) == 2
        err = capsys.readouterr().err
        assert f"run folder {run_dir} is in use by another run right now (process {os.getpid()})" in err
        assert "Traceback" not in err
        assert (run_dir / RECIPE_FILE).read_text() == first_recipe  # the first run's folder is untouched
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE, RECIPE_FILE]
        with pytest.raises(FileExistsError, match="in use by another run"):  # a resume waits its turn too
            mmpeft.run(None, resume=run_dir)
    mmpeft.run(quick)  # once the first run is gone, its folder (nothing finished in it) can be taken over
    assert (run_dir / "metrics.json").is_file() and not (run_dir / LOCK_FILE).exists()


def test_a_second_grid_driver_on_the_same_grid_folder_is_refused_and_touches_nothing(quick, tmp_path, capsys):
    """Two `mmpeft compare` (or `search`, or a `--resume`) on one grid folder at once: the second is refused with one
    line, and the first one's folder (its compare.yaml, results) is not written by it. The first driver is a thread
    holding the folder's claim (flock: as exclusive as between processes)."""
    grid = {**{k: v for k, v in quick.items() if k != "method"}, "output": {"dir": str(tmp_path / "runs"), "name": "g"},
            "grid": {"methods": ["zero_shot"], "seeds": [0]}}
    grid_dir = tmp_path / "runs" / "g"
    grid_dir.mkdir(parents=True)
    with claimed_by_another(grid_dir):
        assert main(["compare", write_recipe(tmp_path, grid)]) == 2
        err = capsys.readouterr().err
        assert (f"grid folder {grid_dir} is in use by another `mmpeft compare` right now (process {os.getpid()})"
                in err) and "Traceback" not in err
        assert sorted(p.name for p in grid_dir.iterdir()) == [LOCK_FILE]
        search = {**{k: v for k, v in grid.items() if k != "grid"},
                  "data": {**grid["data"], "split": {"val": 0.25, "test": 0.25}},
                  "search": {"methods": ["bitfit"], "budget": {"epochs": 1}, "trials": 1, "top": 1}}
        with pytest.raises(FileExistsError, match="in use by another `mmpeft search`"):
            mmpeft.search(search)
        assert sorted(p.name for p in grid_dir.iterdir()) == [LOCK_FILE, "search"]
    mmpeft.compare(grid)  # once the first driver is gone, the folder is free again
    assert (grid_dir / "results.csv").is_file() and not (grid_dir / LOCK_FILE).exists()


def damaged_backbone(source, tmp_path, how: str):
    folder = tmp_path / f"backbone-{how}"
    shutil.copytree(source, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000] if how == "truncated" else b"not a safetensors file")
    return folder


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_damaged_backbone_weights_are_one_line_and_leave_no_run_folder(quick, tiny_clip_dir, tmp_path, how, capsys):
    folder = damaged_backbone(tiny_clip_dir, tmp_path, how)
    recipe = {**quick, "backbone": {"id": str(folder)}}
    with pytest.raises(BackboneError, match=f"{folder / 'model.safetensors'} cannot be read .*truncated or damaged"):
        mmpeft.run(recipe)
    assert not (tmp_path / "runs" / "run").exists()  # nothing ran: the folder the run started is removed
    assert main(["run", write_recipe(tmp_path, recipe)]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors cannot be read" in err and "Traceback" not in err
    assert not (tmp_path / "runs" / "run").exists()


@pytest.mark.parametrize(("failure", "said"), [
    (PermissionError(errno.EACCES, "Permission denied"), "Permission denied"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory"), "No such file or directory"),  # /proc/...
])
def test_an_output_folder_that_cannot_be_made_is_one_line(quick, tmp_path, monkeypatch, capsys, failure, said):
    real_mkdir = type(tmp_path).mkdir

    def refused(self, *args, **kwargs):
        if "runs" in self.parts:
            raise failure
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(type(tmp_path), "mkdir", refused)
    assert main(["run", write_recipe(tmp_path, quick)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot create the run folder {tmp_path / 'runs'}")
    assert f"{said}; choose a writable output.dir" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def tiny_state() -> tuple[dict, dict, dict]:
    trainable = {"w": torch.arange(6.0).reshape(2, 3)}
    extra = {"optimizer": {"state": {}, "param_groups": []}, "scheduler": {"last_epoch": 3},
             "rng": torch.get_rng_state()}
    return trainable, extra, {"epoch": 1, "global_step": 3}


@pytest.mark.parametrize(("writer", "failure"), [
    ("torch.save", OSError(errno.ENOSPC, "No space left on device")),
    ("torch.save", RuntimeError("basic_ios::clear: iostream error")),
    ("save_file", SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                  '"No space left on device" })')),
])
def test_a_full_disk_mid_checkpoint_keeps_the_previous_checkpoint(tmp_path, monkeypatch, writer, failure):
    import mmpeft.train.checkpoint as checkpoint

    final = tmp_path / "run" / "checkpoints" / "last"
    trainable, extra, progress = tiny_state()
    write_checkpoint(final, trainable, None, extra, progress)
    before = {p.name: p.read_bytes() for p in final.iterdir()}
    calls = []

    def full_disk(*args, **kwargs):
        calls.append(args)
        if writer == "torch.save" or len(calls) > 1:  # safetensors: the second file (best) fails, mid-save
            raise failure
        return real(*args, **kwargs)

    if writer == "torch.save":
        real = torch.save
        monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    else:
        real = checkpoint.save_file
        monkeypatch.setattr(checkpoint, "save_file", full_disk)
    with pytest.raises(OutputError) as caught:
        write_checkpoint(final, {"w": torch.zeros(2, 3)}, {"w": torch.ones(2, 3)}, extra, {"epoch": 2})
    message = str(caught.value)
    assert message.startswith("no space left on the device while writing ") and f"{final} is intact" in message
    assert "mmpeft run --resume" in message
    assert {p.name: p.read_bytes() for p in final.iterdir()} == before  # byte for byte
    assert sorted(p.name for p in final.parent.iterdir()) == ["last"]  # no staging left
    assert read_checkpoint(final)[3] == progress


def corrupt(final, name: str) -> None:
    path = final / name
    if name == "progress.json":
        path.write_text('{"epoch": ')
    elif name == "optimizer.pt":
        path.write_bytes(path.read_bytes()[:40])
    else:
        path.write_bytes(path.read_bytes()[:20])


@pytest.mark.parametrize("name", ["progress.json", "trainable.safetensors", "optimizer.pt"])
def test_a_damaged_checkpoint_file_is_named(tmp_path, name):
    final = tmp_path / "run" / "checkpoints" / "last"
    trainable, extra, progress = tiny_state()
    write_checkpoint(final, trainable, None, extra, progress)
    corrupt(final, name)
    with pytest.raises(CheckpointError, match=f"checkpoint file {final / name} cannot be read .* cannot be resumed"):
        read_checkpoint(final)


def test_resume_from_a_corrupt_progress_file_is_one_line(quick, tmp_path, capsys):
    run_dir = tmp_path / "runs" / "run"
    run_dir.mkdir(parents=True)
    (run_dir / RECIPE_FILE).write_text(load_recipe(quick).to_yaml())
    final = run_dir / "checkpoints" / "last"
    write_checkpoint(final, *tiny_state()[:1], None, *tiny_state()[1:])
    corrupt(final, "progress.json")
    assert main(["run", "--resume", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint file {final / 'progress.json'} cannot be read" in err and "Traceback" not in err
    assert (final / "progress.json").is_file()  # a resumed run's folder is never removed


def test_a_full_disk_while_saving_the_adapter_leaves_no_adapter(quick, tmp_path, monkeypatch):
    from mmpeft.methods.lora import Lora

    def full_disk(self, backbone, config, directory):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "adapter_model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Lora, "save", full_disk)
    with pytest.raises(OutputError, match="no space left on the device while writing .*adapter: the trained state"):
        mmpeft.run(quick)
    run_dir = tmp_path / "runs" / "run"
    assert not (run_dir / "adapter").exists() and not (run_dir / ".adapter.staging").exists()
    assert not (run_dir / "metrics.json").exists()


def test_a_full_disk_during_an_export_leaves_nothing(tmp_path):
    out = tmp_path / "export"
    with pytest.raises(OutputError, match=f"no space left on the device while writing {out}: nothing half-written"):
        with atomic_dir(out) as stage:
            (stage / "model.safetensors").write_bytes(b"x" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_out_of_range_numbers_stop_mmpeft_run_before_a_folder_exists(quick, tmp_path, capsys):
    assert main(["run", write_recipe(tmp_path, quick), "train.batch_size=0", "train.grad_accum_steps=0"]) == 2
    err = capsys.readouterr().err
    assert "train.batch_size: 0 is out of range" in err and "train.grad_accum_steps: 0 is out of range" in err
    assert not (tmp_path / "runs").exists()


def test_a_template_longer_than_the_text_tower_is_refused_before_training(quick, tmp_path, capsys):
    template = "a very " + "long " * 20 + "photo of a {label}."  # the tiny CLIP reads 16 tokens
    recipe = {**quick, "data": {**quick["data"], "templates": [template]}}
    with pytest.raises(RecipeError, match=r"data.templates 'a very long .*: 3 of 3 class texts are longer than "
                                                 r"the text tower's limit of 16 tokens .* has 29 tokens"):
        mmpeft.run(recipe)
    assert not (tmp_path / "runs" / "run").exists()
    assert main(["run", write_recipe(tmp_path, recipe)]) == 2
    assert "limit of 16 tokens" in capsys.readouterr().err


def test_overlong_captions_are_counted_in_a_warning(quick, caplog):
    from types import SimpleNamespace

    from mmpeft.data import Example, LabelSet
    from mmpeft.runs.build import load_base
    from mmpeft.runs.texts import check_text_lengths

    recipe = load_recipe(quick)
    captions = ["a red square", "word " * 30, "a blue square", "word " * 17]
    data = SimpleNamespace(labels=LabelSet(["red", "blue"], templates=["a {label}."]), val=[], test=[],
                           train=[Example(image=f"{i}.png", label=0, text=text) for i, text in enumerate(captions)])
    with caplog.at_level("WARNING", logger="mmpeft"):
        check_text_lengths(load_base(recipe), data, recipe)
    assert "2 of 4 captions (data.text_column: text) are longer than the text tower's limit of 16 tokens" in caplog.text
    assert "the longest has 32 tokens" in caplog.text


def test_siglip_config_token_id_warnings_go_to_the_log_not_the_terminal(tmp_path, capfd):
    from transformers import SiglipConfig

    from mmpeft.cli import quiet_dependencies
    from mmpeft.runs.folder import run_logging

    quiet_dependencies()
    with run_logging(tmp_path):
        SiglipConfig(text_config={"vocab_size": 97})  # the published defaults: bos 49406, eos 49407
    err = capfd.readouterr().err
    assert "bos_token_id" not in err and "eos_token_id" not in err
    log = (tmp_path / "train.log").read_text()
    assert "bos_token_id must be `None` or an integer within the vocabulary (between 0 and 96), got 49406" in log



def test_the_tokenizers_length_notice_stays_out_of_the_terminal(tiny_clip_dir):
    """mmpeft measures every class text and caption against the text tower's limit (and says itself what is cut);
    the tokenizer's own "... will result in indexing errors" notice printed beside it, though nothing is."""
    import io
    import logging

    from transformers.utils import logging as hf_logging

    from mmpeft.backbones import load_backbone
    from mmpeft.cli import quiet_dependencies
    from mmpeft.specs import BackboneSpec

    quiet_dependencies()
    backbone = load_backbone(BackboneSpec(id=str(tiny_clip_dir)))
    terminal = io.StringIO()
    handlers = [h for h in hf_logging.get_logger().handlers if isinstance(h, logging.StreamHandler)]
    streams = [h.setStream(terminal) for h in handlers]  # what prints transformers' notices
    try:
        limit, overlong = backbone.overlong_texts(["word " * 40])
    finally:
        for handler, stream in zip(handlers, streams):
            handler.setStream(stream)
    assert limit == 16 and overlong and terminal.getvalue() == ""


def published_style_siglip(folder):
    """A tiny SigLIP laid out like the published ones: SiglipTokenizer over a sentencepiece `spiece.model` (trained
    here, offline) and the config's own default bos/eos ids."""
    import io

    import sentencepiece
    from transformers import SiglipConfig, SiglipImageProcessorPil, SiglipModel, SiglipProcessor, SiglipTokenizer

    from mmpeft.tiny.dual_encoder import _image_kwargs, tiny_siglip_config

    model_proto = io.BytesIO()
    sentences = [f"a photo of a {c} image." for c in ("red", "green", "blue")] * 20 + ["a small colour square."] * 5
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model_proto,
                                             vocab_size=40, model_type="unigram", eos_id=1, unk_id=2, pad_id=0,
                                             bos_id=-1, hard_vocab_limit=False)
    folder.mkdir()
    (folder / "spiece.model").write_bytes(model_proto.getvalue())
    tokenizer = SiglipTokenizer(vocab_file=str(folder / "spiece.model"), model_max_length=64)
    text = tiny_siglip_config(vocab_size=len(tokenizer), max_length=64).text_config.to_dict()
    for key in ("bos_token_id", "eos_token_id"):
        text.pop(key)  # as published: SiglipTextConfig's defaults (CLIP's ids, outside this vocabulary)
    config = SiglipConfig(text_config={**text, "pad_token_id": tokenizer.pad_token_id},
                          vision_config=tiny_siglip_config().vision_config.to_dict())
    torch.manual_seed(0)
    SiglipModel(config).save_pretrained(folder)
    SiglipProcessor(image_processor=SiglipImageProcessorPil(**_image_kwargs(24)), tokenizer=tokenizer
                    ).save_pretrained(folder)
    return folder


def test_a_siglip_folder_with_a_sentencepiece_tokenizer_loads_and_scores(tmp_path):
    from mmpeft.backbones import load_backbone
    from mmpeft.specs import BackboneSpec

    folder = published_style_siglip(tmp_path / "siglip-sp")
    backbone = load_backbone(BackboneSpec(id=str(folder)))
    assert type(backbone.tokenizer).__name__ == "SiglipTokenizer" and (folder / "spiece.model").is_file()
    from PIL import Image

    from mmpeft.data import LabelSet

    labels = LabelSet(["red", "green", "blue"], templates=["a photo of a {label} image."])
    texts = backbone.class_text_features(labels)
    logits = backbone.classify(backbone.preprocess([Image.new("RGB", (12, 12), (220, 30, 30))] * 2), texts)
    assert texts.shape[0] == 3 and logits.shape == (2, 3) and bool(torch.isfinite(logits).all())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the plan of a CPU-only machine")
def test_plan_on_a_cpu_machine_has_no_cuda_reserve_and_says_what_it_counts():
    from mmpeft.planner import plan, render

    (cpu,) = plan("recipes/quickstart.yaml")
    assert cpu["device"] == "cpu" and cpu["bytes"]["reserve"] == 0 and cpu["bytes"]["total"] == cpu["bytes"]["peak"]
    text = render([cpu])
    assert "CUDA context" not in text and "planned for this machine's CPU" in text and "1.6-2.2x" in text
    (gpu,) = plan("recipes/quickstart.yaml", gpu_memory="24GiB")  # a budget plans for a GPU
    assert gpu["device"] == "cuda" and gpu["bytes"]["reserve"] > 0 and "CUDA context" in render([gpu])


@pytest.mark.parametrize(("argv", "pinned"), [
    (["run", "recipes/quickstart.yaml"], True),
    (["run", "recipes/quickstart.yaml", "train.epochs=2"], True),
    (["run", "recipes/quickstart.yaml", "backbone.id=/models/clip"], False),
    (["check", "recipes/quickstart.yaml"], False),
])
def test_demo_recipes_pin_the_kernels_the_demo_backbone_was_built_with(argv, pinned, monkeypatch):
    from mmpeft.cli import DEMO_NUMERICS, build_parser, pin_demo_numerics
    from mmpeft.runs.demo import PINNED_NUMERICS

    assert DEMO_NUMERICS == PINNED_NUMERICS
    for name in DEMO_NUMERICS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "4")  # the user's own setting wins
    args, _ = build_parser().parse_known_args(argv)
    assert pin_demo_numerics(args) is pinned
    assert os.environ.get("ATEN_CPU_CAPABILITY") == ("avx2" if pinned else None)
    assert os.environ["OMP_NUM_THREADS"] == "4"


def test_resume_refuses_data_that_changed_since_the_run_started(color_recipe, color_folder, tmp_path):
    import mmpeft
    from mmpeft.data import DataError

    folder = tmp_path / "colors"
    shutil.copytree(color_folder, folder)
    recipe = {**color_recipe, "data": {**color_recipe["data"], "path": str(folder)}, "train": {
        **color_recipe["train"], "epochs": 1}}
    first = mmpeft.run(recipe)
    run_dir = tmp_path / "runs" / "run"
    assert json.loads((run_dir / "data.json").read_text())["fingerprints"] == first["data"]["fingerprints"]
    (run_dir / "metrics.json").unlink()  # as if interrupted before it finished
    assert mmpeft.run(None, resume=run_dir)["test"]["accuracy"] == first["test"]["accuracy"]  # same data: resumes
    (run_dir / "metrics.json").unlink()
    removed = sorted(folder.rglob("*.png"))[0]
    removed.unlink()
    with pytest.raises(DataError, match=r"--resume .*: the data changed since the run started \(.*colors: the "
                                        r"(train|val|test).* no longer hold the same rows\)"):
        mmpeft.run(None, resume=run_dir)
