"""Hostile run folders and exports (issue 20): NaN weights or outputs never verify, weights changed after the run are
refused by their sha256, merges refuse non-finite weights, damaged files get one line naming them, and a staging
folder a killed export left behind is cleaned by the next export."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mmpeft
from mmpeft.artifacts import ExportError, read_run
from mmpeft.artifacts.verify import differences
from mmpeft.cli import main
from mmpeft.core.io import atomic_dir, folder_hashes, remove_stale_staging, write_json
from mmpeft.runs.folder import ADAPTER_DIR, HASH_FILE

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, color_folder, tiny_clip_dir):
    """One finished LoRA run (one step, 4 shots per class, no validation, no zero-shot)."""
    root = tmp_path_factory.mktemp("hostile-runs")
    mmpeft.run({"name": "run", "seed": 0, "backbone": {"id": str(tiny_clip_dir)},
                "data": {"source": "folder", "path": str(color_folder), "templates": ["a photo of a {label} image."],
                         "split": {"val": 0.0, "test": 0.25}, "shots": 4},
                "method": {"name": "lora", "r": 4, "alpha": 8},
                "train": {"epochs": 1, "batch_size": 12, "lr": 0.02, "warmup_ratio": 0.0},
                "eval": {"batch_size": 32, "zero_shot": False}, "output": {"dir": str(root), "name": "run"}})
    return root / "run"


@pytest.fixture
def run_copy(finished_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def poison(run_dir, rehash: bool) -> None:
    """Put a NaN into the saved LoRA weights; `rehash`: as if the run itself had saved them (hashes match)."""
    adapter = run_dir / ADAPTER_DIR
    state = load_file(str(adapter / WEIGHTS))
    first = sorted(state)[0]
    state[first] = torch.full_like(state[first], float("nan"))
    save_file(state, str(adapter / WEIGHTS))
    if rehash:
        write_json(adapter / HASH_FILE, {"algorithm": "sha256", "files": folder_hashes(adapter, skip=(HASH_FILE,))})


def truncate(run_dir, rehash: bool) -> None:
    path = run_dir / ADAPTER_DIR / WEIGHTS
    path.write_bytes(path.read_bytes()[:100])
    if rehash:
        adapter = run_dir / ADAPTER_DIR
        write_json(adapter / HASH_FILE, {"algorithm": "sha256", "files": folder_hashes(adapter, skip=(HASH_FILE,))})


DAMAGES = {  # how the run folder is damaged -> what export and merge must say
    "nan_weights_saved_by_the_run": (lambda d: poison(d, rehash=True), "hold NaN or infinity"),
    "weights_changed_after_the_run": (lambda d: poison(d, rehash=False), "changed after the run saved it"),
    "truncated_weights": (lambda d: truncate(d, rehash=True), "cannot be read"),
    "truncated_weights_after_the_run": (lambda d: truncate(d, rehash=False), "changed after the run saved it"),
    "damaged_hash_record": (lambda d: (d / ADAPTER_DIR / HASH_FILE).write_text("{"), f"{HASH_FILE} is damaged"),
    "corrupt_metrics": (lambda d: (d / "metrics.json").write_text("{\"test\": "), "metrics.json is not valid JSON"),
    "metrics_not_an_object": (lambda d: (d / "metrics.json").write_text("[]"), "metrics.json holds a JSON list"),
}


@pytest.mark.parametrize("case", list(DAMAGES))
def test_damaged_run_folders_are_refused_by_export_and_merge(case, run_copy, tmp_path, capsys):
    damage, expected = DAMAGES[case]
    damage(run_copy)
    with pytest.raises(ExportError, match=expected):
        read_run(run_copy)
    out = tmp_path / "export"
    assert main(["export", str(run_copy), "--out", str(out), "--no-verify"]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["merge", str(run_copy), str(run_copy), "--out", str(tmp_path / "merged")]) == 2
    assert expected in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "merged").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith((".staging", ".lock"))]


def test_the_run_records_the_sha256_of_its_saved_state(finished_run):
    adapter = finished_run / ADAPTER_DIR
    recorded = json.loads((adapter / HASH_FILE).read_text())["files"]
    assert recorded == folder_hashes(adapter, skip=(HASH_FILE,)) and WEIGHTS in recorded
    assert read_run(finished_run).adapter == adapter


def test_adapter_export_leaves_out_the_runs_hash_record(finished_run, tmp_path):
    mmpeft.export(finished_run, tmp_path / "adapter", how="adapter")
    assert (tmp_path / "adapter" / WEIGHTS).is_file() and not (tmp_path / "adapter" / HASH_FILE).exists()


@pytest.mark.parametrize("side", ["reference", "exported"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_outputs_never_verify(side, bad):
    reference = {"logits": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "image_embeddings": torch.ones(2, 3)}
    exported = {name: value.clone() for name, value in reference.items()}
    target = reference if side == "reference" else exported
    target["image_embeddings"][0, 0] = bad  # max() over the outputs used to keep the finite logits' 0.0
    with pytest.raises(ExportError, match="gives NaN or infinite image_embeddings"):
        differences(reference, exported)


def test_finite_outputs_still_verify():
    reference = {"logits": torch.tensor([[1.0, 2.0]])}
    assert differences(reference, {"logits": torch.tensor([[1.0, 2.5]])})["relative"] == pytest.approx(0.25)


@pytest.mark.parametrize("weights", [["nan", "1"], ["inf", "1"], ["1", "inf"]])
def test_merge_refuses_non_finite_weights(finished_run, tmp_path, capsys, weights):
    out = tmp_path / "merged"
    assert main(["merge", str(finished_run), str(finished_run), "--weights", *weights, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "weights:" in err and "must all be finite" in err and not out.exists()



def test_merge_refuses_weights_that_overflow_the_adapter(finished_run, run_copy, tmp_path, capsys):
    """Finite weights, but 1e300 * a float32 LoRA matrix is infinite: the merged adapter must not be written."""
    out = tmp_path / "merged"
    assert main(["merge", str(finished_run), str(run_copy), "--weights", "1e300", "1e300", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "merge with weights [1e+300, 1e+300] holds NaN or infinity" in err and "Traceback" not in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if "staging" in p.name]



def test_predict_skips_an_image_over_the_pixel_cap_before_decoding_it(finished_run, color_folder, tmp_path, capsys):
    """A 200-byte PNG claiming 12000x12000 pixels was decoded by `mmpeft predict` (3 GB resident, then scored)."""
    from test_hostile_data import write_bomb

    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(next((color_folder / "red").iterdir()), photos / "ok.png")
    write_bomb(photos / "bomb.png")
    assert main(["predict", str(finished_run), str(photos), "--out", str(tmp_path / "p.jsonl")]) == 0
    rows = {Path(row["path"]).name: row for row in map(json.loads, (tmp_path / "p.jsonl").read_text().splitlines())}
    assert rows["bomb.png"]["error"] == ("image too large: 12000x12000 = 144,000,000 pixels, over 50,000,000 "
                                         "(data.max_image_pixels' default); downscale it")
    assert rows["ok.png"]["labels"] and "Traceback" not in capsys.readouterr().err


def test_pils_bomb_notice_stays_out_of_the_terminal(tmp_path):
    """Reading a large image's header (mmpeft's own size check) made PIL print a DecompressionBombWarning with its
    source line beside mmpeft's line naming the file."""
    import warnings

    from PIL import Image
    from test_hostile_data import write_bomb

    from mmpeft.cli import quiet_dependencies

    path = write_bomb(tmp_path / "bomb.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_dependencies()
        with Image.open(path) as opened:
            assert opened.size == (12000, 12000)
    assert [w.category for w in caught if issubclass(w.category, Image.DecompressionBombWarning)] == []


# (command after `mmpeft`, with {run}: a finished run, {copy}: a copy of it) -> a fragment of the one-line error
REFUSED_COMMANDS = {
    "export_into_the_runs_saved_state": (["export", "{run}", "--out", "{run}/adapter/exported"],
                                         "is inside {run}/adapter, the run's saved state"),
    "export_onto_the_saved_state_itself": (["export", "{run}", "--out", "{run}/adapter", "--adapter-only"],
                                           "is inside {run}/adapter"),
    "merge_into_a_runs_saved_state": (["merge", "{run}", "{copy}", "--out", "{copy}/adapter/merged"],
                                      "is inside {copy}/adapter"),
    "merge_of_one_run_twice": (["merge", "{run}", "{run}/../run", "--out", "{tmp}/merged"],
                               "run {run}/../run is given twice (also as {run})"),
    "merge_weights_all_zero": (["merge", "{run}", "{copy}", "--weights", "0", "0", "--out", "{tmp}/merged"],
                               "weights: [0.0, 0.0] are all zero"),
    "export_inside_a_file": (["export", "{run}", "--out", "{run}/metrics.json/exported"],
                             "out: {run}/metrics.json is a file, so the folder"),
    "merge_inside_a_file": (["merge", "{run}", "{copy}", "--out", "{run}/metrics.json/merged"],
                            "out: {run}/metrics.json is a file, so the folder"),
    # the whole export ran, then failed as "the export is wrong"
    "export_negative_tolerance": (["export", "{run}", "--out", "{tmp}/e", "--tolerance", "-1"],
                                  "tolerance: -1.0 must be a finite number >= 0"),
    "export_nan_tolerance": (["export", "{run}", "--out", "{tmp}/e", "--tolerance", "nan"],
                             "tolerance: nan must be a finite number >= 0"),
}


@pytest.mark.parametrize("case", sorted(REFUSED_COMMANDS))
def test_exports_and_merges_that_would_damage_a_run_or_do_nothing_are_refused(case, run_copy, tmp_path, capsys):
    arguments, fragment = REFUSED_COMMANDS[case]
    other = tmp_path / "copy"
    shutil.copytree(run_copy, other)
    fill = {"run": str(run_copy), "copy": str(other), "tmp": str(tmp_path)}
    before = {folder: folder_hashes(folder) for folder in (run_copy, other)}
    assert main([a.format(**fill) for a in arguments]) == 2
    err = capsys.readouterr().err
    assert fragment.format(**fill) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert {folder: folder_hashes(folder) for folder in (run_copy, other)} == before  # the runs are untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "run"]


@pytest.mark.parametrize("arguments, fragment", [
    ({"run_dirs": "one"}, "run_dirs: 'one' is one folder; give a list of at least 2"),  # was: read_run('o'), ...
    ({"weights": 0.5}, "weights: 0.5 must be a list of numbers, one per run"),  # was: TypeError
    ({"weights": ["a", "b"]}, "weights: ['a', 'b'] must be a list of numbers"),
    ({"how": "ties", "density": "x"}, "density: 'x' must be a number in (0, 1]"),
])
def test_merge_api_arguments_of_the_wrong_type_are_said_clearly(arguments, fragment, finished_run, run_copy,
                                                                tmp_path):
    given = {"run_dirs": [finished_run, run_copy], "out": tmp_path / "merged", **arguments}
    with pytest.raises(ExportError) as error:
        mmpeft.merge(**given)
    assert fragment in str(error.value) and not (tmp_path / "merged").exists()


def test_a_damaged_export_manifest_is_one_line_not_a_traceback(finished_run, tmp_path, capsys):
    export = tmp_path / "adapter"
    mmpeft.export(finished_run, export, how="adapter", verify=False)
    capsys.readouterr()  # the export's own progress
    manifest = export / "mmpeft_export.json"
    good = json.loads(manifest.read_text())
    damages = {"[]": "holds a JSON list, not the export's manifest",  # were: KeyError, AttributeError tracebacks
               "{}": "format: None is not one of peft, transformers, mmpeft",
               json.dumps({**good, "format": "onnx"}): "format: 'onnx' is not one of",
               json.dumps({**good, "files": []}): "files: missing or not an object",
               json.dumps({**good, "labels": {"keys": ["a"]}}): "labels.names: missing or not a list"}
    for text, fragment in damages.items():
        manifest.write_text(text)
        assert main(["predict", str(export), str(finished_run)]) == 2
        err = capsys.readouterr().err
        assert fragment in err, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_metrics_without_test_scores_are_refused_by_export_not_a_key_error(run_copy, tmp_path, capsys):
    (run_copy / "metrics.json").write_text("{}")
    assert main(["export", str(run_copy), "--out", str(tmp_path / "e"), "--no-verify"]) == 2
    err = capsys.readouterr().err
    assert "metrics.json has no test accuracy and macro_f1" in err and "Traceback" not in err
    assert not (tmp_path / "e").exists()


def test_a_staging_folder_left_by_a_killed_export_is_removed_by_the_next(tmp_path):
    out = tmp_path / "export"
    script = ("import sys, time; from mmpeft.core.io import atomic_dir\n"
              "with atomic_dir(sys.argv[1]) as stage:\n"
              "    (stage / 'model.safetensors').write_bytes(b'x' * 1000); print('staged', flush=True); time.sleep(60)")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    child = subprocess.Popen([sys.executable, "-c", script, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    assert child.stdout.readline().strip() == "staged"
    staged = [p for p in tmp_path.iterdir() if p.name.endswith(".staging")]
    assert len(staged) == 1
    assert remove_stale_staging(out) == []  # alive: its lock is held, nothing is removed
    child.kill()  # kill -9: no cleanup runs
    child.wait()
    assert staged[0].is_dir()
    with atomic_dir(out) as stage:
        (stage / "done").write_text("ok")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"] and (out / "done").is_file()


def test_an_unlocked_staging_folder_from_before_this_process_is_stale(tmp_path):
    old = tmp_path / ".export.abc123.staging"
    old.mkdir()
    past = time.time() - 3600
    os.utime(old, (past, past))
    fresh = tmp_path / ".export.def456.staging"  # made after this process started, by a live one: kept
    fresh.mkdir()
    assert remove_stale_staging(tmp_path / "export") == [old] and fresh.is_dir()


def test_ctrl_c_in_export_does_not_suggest_resume(monkeypatch, capsys, tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mmpeft, "export", interrupted)
    monkeypatch.setattr(mmpeft, "merge", interrupted)
    assert main(["export", "RUN", "--out", str(tmp_path / "x")]) == 130
    err = capsys.readouterr().err
    assert "--resume" not in err and "run the same `mmpeft export` command again" in err
    assert main(["merge", "A", "B", "--out", str(tmp_path / "y")]) == 130
    assert "--resume" not in capsys.readouterr().err
