"""The workbench's readers and launcher without a browser: folder kinds and status from real run and grid folders,
comparisons from their files, `mmpeft check`'s verdicts, paths that escape, a real launch stopped with SIGINT."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("gradio", reason="mmpeft ui needs gradio: pip install 'mmpeft[ui]'")

from shipped import SHIPPED, prepare  # noqa: E402

from mmpeft.cli import check as cli_check  # noqa: E402
from mmpeft.core.io import PROJECT_ROOT  # noqa: E402
from mmpeft.ui import launch  # noqa: E402
from mmpeft.ui.catalog import OutsideError, details, inside, scan  # noqa: E402
from mmpeft.ui.compare import comparison_rows, markdown_table, paired_text  # noqa: E402
from mmpeft.ui.launch import Launcher, check_recipe  # noqa: E402


def by_path(root: Path) -> dict:
    return {e.path: e for e in scan(root)}


def test_scan_classifies_runs_grids_and_cells_with_their_numbers(ui_runs_dir):
    entries = by_path(ui_runs_dir)
    assert set(entries) == {"lora-run", "grid", "grid/cells/linear_probe-seed0", "grid/cells/bitfit-seed0"}
    run, grid = entries["lora-run"], entries["grid"]
    metrics = json.loads((ui_runs_dir / "lora-run" / "metrics.json").read_text())
    assert (run.kind, run.status, run.method) == ("run", "finished", "lora")
    assert run.accuracy == metrics["test"]["accuracy"] and run.trainable_percent == metrics["params"]["percent"]
    assert (grid.kind, grid.status, grid.method) == ("compare", "finished", "linear_probe, bitfit")
    cells = [json.loads((ui_runs_dir / "grid" / "cells" / c / "metrics.json").read_text())["test"]["accuracy"]
             for c in ("linear_probe-seed0", "bitfit-seed0")]
    assert grid.accuracy == max(cells)  # the best method's mean over its (one) seed
    assert entries["grid/cells/bitfit-seed0"].kind == "cell"


def test_a_search_in_its_trials_lists_them_with_it_and_resumes_as_a_search(ui_runs_dir, tmp_path):
    root = tmp_path / "runs"
    search = root / "search-colors"
    shutil.copytree(ui_runs_dir / "lora-run", search / "trials" / "000-lora")  # a finished trial
    recipe = yaml.safe_load((ui_runs_dir / "lora-run" / "recipe.yaml").read_text())
    recipe.pop("method")
    recipe["search"] = {"methods": [{"name": "lora", "r": {"choices": [2, 4]}}, "bitfit"], "budget": {"epochs": 9}}
    (search / "search.yaml").write_text("# mmpeft search --resume runs/search-colors\n" + yaml.safe_dump(recipe))
    entries = {e.path: e for e in scan(root)}
    assert set(entries) == {"search-colors", "search-colors/trials/000-lora"}  # not a stray plain run
    assert (entries["search-colors"].kind, entries["search-colors"].method) == ("search", "lora, bitfit")
    assert entries["search-colors"].status == "interrupted"  # no live log: `mmpeft search --resume` continues it
    trial = entries["search-colors/trials/000-lora"]
    assert (trial.kind, trial.status) == ("trial", "finished")
    assert details(root, "search-colors").recipe.startswith("# mmpeft search")
    (search / "search").mkdir()  # its trials so far: the leaderboard and the Pareto plot (report.md links them)
    (search / "search" / "leaderboard.md").write_text("# Search leaderboard (val_accuracy, validation only)\n")
    shutil.copyfile(search / "trials" / "000-lora" / "confusion_matrix.png", search / "search" / "pareto.png")
    shown = details(root, "search-colors")  # the report view had neither: no report.md yet, plots of the top only
    assert shown.report.startswith("# Search leaderboard") and search / "search" / "pareto.png" in shown.plots
    assert launch.RESUME_COMMANDS["search"] == "search"
    (search / "trials" / "000-lora" / "metrics.json").unlink()  # its search's driver was killed in it
    from mmpeft.ui.app import Workbench

    said = Workbench(root).resume("search-colors/trials/000-lora")  # raised a bare ValueError into the page
    assert said.startswith("search-colors/trials/000-lora: a search's trial is not resumed on its own: resume its "
                           "search, search-colors (`mmpeft search --resume ")
    assert not (root / ".ui" / "launches").exists()  # nothing started


def test_unfinished_folders_read_as_running_interrupted_or_failed(ui_runs_dir, tmp_path):
    root = tmp_path / "runs"
    for name in ("live", "stopped", "broken", "cell-failed"):
        shutil.copytree(ui_runs_dir / "lora-run", root / name)
        (root / name / "metrics.json").unlink()
    with open(root / "live" / "train.log", "a") as log:
        log.write("2026-01-01 00:00:00 INFO epoch 1: step=3\n")  # no `finished in` yet, written just now
    (root / "live" / ".mmpeft.lock").write_text("12345")  # held by the run writing it
    (root / "stopped" / "checkpoints" / "last").mkdir(parents=True)  # log closed, a checkpoint to resume from
    old = time.time() - 3600
    os.utime(root / "stopped" / "train.log", (old, old))
    (root / "cell-failed" / "error.txt").write_text("Traceback ...")
    statuses = {e.path: e.status for e in scan(root)}
    assert statuses == {"live": "running", "stopped": "interrupted", "broken": "failed", "cell-failed": "failed"}
    assert scan(root, {"broken": "running"})[0].status in ("running", "failed")
    assert {e.path: e.status for e in scan(root, {"broken": "running"})}["broken"] == "running"


def test_a_grid_whose_cells_run_in_workers_reads_as_running_until_its_driver_lets_go(ui_runs_dir, tmp_path):
    """Under grid.executor processes/ray the driver's compare.log is quiet while its workers write the cells' logs:
    such a grid read as `interrupted` after 5 minutes though it was running. And a driver that stopped with an
    error (its lock file removed) read as `running` for 5 minutes; a run whose process ended likewise."""
    root = tmp_path / "runs"
    shutil.copytree(ui_runs_dir / "grid", root / "grid")
    (root / "grid" / "summary.json").unlink()
    old = time.time() - 3600
    os.utime(root / "grid" / "compare.log", (old, old))
    cell = root / "grid" / "cells" / "bitfit-seed0"
    (cell / "metrics.json").unlink()
    with open(cell / "train.log", "a") as log:
        log.write("2026-01-01 00:00:00 INFO epoch 1: step=3\n")  # its worker writes it now
    (root / "grid" / ".mmpeft.lock").write_text("12345")
    assert by_path(root)["grid"].status == "running"
    shown = details(root, "grid").log  # its live progress: the cell its worker writes, under the driver's log
    assert "--- cells/bitfit-seed0/train.log ---" in shown and shown.endswith("epoch 1: step=3")
    (root / "grid" / ".mmpeft.lock").unlink()  # its driver ended
    assert by_path(root)["grid"].status == "interrupted"
    shutil.copytree(ui_runs_dir / "lora-run", root / "ended")
    (root / "ended" / "metrics.json").unlink()
    with open(root / "ended" / "train.log", "a") as log:
        log.write("2026-01-01 00:00:00 INFO epoch 1: step=3\n")  # recent, but no process holds the folder
    assert by_path(root)["ended"].status == "failed"


DAMAGES = {  # folder -> (copied from, file, what it is made to hold)
    "metrics-truncated": ("lora-run", "metrics.json", b'{"test": {"accuracy": 0.'),
    "metrics-a-list": ("lora-run", "metrics.json", b"[1, 2]"),
    "recipe-unclosed": ("lora-run", "recipe.yaml", b"method: [\n"),
    "recipe-binary": ("lora-run", "recipe.yaml", b"\xff\xfe\x00\x01"),
    "recipe-backbone-a-string": ("lora-run", "recipe.yaml", b"backbone: clip\n"),
    "grid-recipe-unclosed": ("grid", "compare.yaml", b"grid: [\n"),
    "grid-recipe-binary": ("grid", "compare.yaml", b"\xff\xfe\x00\x01"),
    "grid-summary-a-string": ("grid", "summary.json", b'"x"'),
}


def test_damaged_folders_are_listed_as_damaged_and_the_rest_still_loads(ui_runs_dir, tmp_path):
    """One hand-edited or truncated file used to crash the whole runs table (and the report view and the comparison)
    with a YAML/JSON/Unicode traceback; now that row says `damaged` and every other row is as before."""
    from mmpeft.ui.app import Workbench

    root = tmp_path / "runs"
    shutil.copytree(ui_runs_dir / "lora-run", root / "good")
    for name, (source, file, content) in DAMAGES.items():
        shutil.copytree(ui_runs_dir / source, root / name)
        (root / name / file).write_bytes(content)
    entries = by_path(root)
    assert {name: entries[name].status for name in DAMAGES} == dict.fromkeys(DAMAGES, "damaged")
    assert (entries["good"].status, entries["good"].method) == ("finished", "lora")
    assert entries["grid-recipe-binary/cells/bitfit-seed0"].status == "finished"  # its cells still read
    bench = Workbench(root)
    assert len(bench.table()[0]) == len(entries)
    for name in DAMAGES:
        assert "**damaged**" in bench.show(name)[0]
    rows = comparison_rows(root, ["good", "metrics-truncated", "grid-summary-a-string"])
    assert rows[0]["method"] == "lora" and rows[0]["accuracy"] is not None
    assert [r["note"] for r in rows[1:]] == ["damaged: its metrics.json cannot be read (JSONDecodeError)",
                                             "damaged: its summary.json cannot be read (AttributeError)"]


def test_details_hold_report_plots_recipe_and_log(ui_runs_dir):
    found = details(ui_runs_dir, "grid")
    assert "## Protocol" in found.report and "![" not in found.report
    assert {p.name for p in found.plots} >= {"accuracy_vs_params.png", "accuracy_vs_time.png"}
    assert "grid:" in found.recipe and "compare grid" in found.log
    run = details(ui_runs_dir, "lora-run")
    assert [p.name for p in run.plots] == ["confusion_matrix.png"]
    assert yaml.safe_load(run.recipe)["method"]["name"] == "lora" and run.log.strip().endswith(" s")
    with pytest.raises(FileNotFoundError, match="not a run, grid or continual folder"):
        details(ui_runs_dir, "grid/cells")


def test_paths_outside_the_runs_folder_are_refused(ui_runs_dir, tmp_path):
    assert inside(ui_runs_dir, "grid/cells/bitfit-seed0") == (ui_runs_dir / "grid/cells/bitfit-seed0").resolve()
    for escape in ("..", "../..", "grid/../../x", "/etc", str(tmp_path)):
        with pytest.raises(OutsideError, match="outside"):
            inside(ui_runs_dir, escape)
    link = tmp_path / "linked"
    link.mkdir()
    (link / "escape").symlink_to(tmp_path)  # a link inside pointing out is resolved before the check
    with pytest.raises(OutsideError):
        inside(link, "escape/x")
    with pytest.raises(OutsideError):
        details(ui_runs_dir, "../")


def test_compare_table_bolds_the_best_and_reads_grid_rows(ui_runs_dir):
    rows = comparison_rows(ui_runs_dir, ["lora-run", "grid"])
    assert [r["row"] for r in rows] == ["lora-run", "grid : linear_probe", "grid : bitfit"]
    summary = json.loads((ui_runs_dir / "grid" / "summary.json").read_text())
    assert rows[1]["accuracy"] == summary[0]["accuracy"]["mean"]
    table = markdown_table(rows)
    fewest = min(r["trainable params"] for r in rows)
    assert f"**{int(fewest):,}**" in table  # the linear probe's parameter count
    assert table.count("**") >= 2 * 3
    with pytest.raises(OutsideError):
        comparison_rows(ui_runs_dir, ["../elsewhere"])


def test_compared_rows_are_also_plotted_on_one_axis(ui_runs_dir, tmp_path):
    """Issue 16's Compare view has 'plots on one axis': it showed each folder's own plots side by side only."""
    from PIL import Image

    from mmpeft.ui.app import Workbench

    root = tmp_path / "runs"
    for name in ("lora-run", "grid"):
        shutil.copytree(ui_runs_dir / name, root / name)
    _, plots = Workbench(root).compare(["lora-run", "grid"])
    together = [(path, caption) for path, caption in plots if caption.startswith("on one axis")]
    assert [caption for _, caption in together] == ["on one axis: accuracy_vs_params.png",
                                                    "on one axis: accuracy_vs_time.png"]
    assert all(Path(path).parent == root / ".ui" / "compare" and Image.open(path).size[0] > 100
               for path, _ in together)
    assert any(caption == "lora-run: confusion_matrix.png" for _, caption in plots)  # and each folder's own
    assert scan(root) and ".ui" not in {e.path.split("/")[0] for e in scan(root)}


def test_paired_test_from_summary_json_is_shown(ui_runs_dir, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(ui_runs_dir / "grid", root / "grid")
    summary = json.loads((root / "grid" / "summary.json").read_text())
    summary[1]["paired"] = {"n": 3, "mean_difference": 0.125, "t": 4.0, "p": 0.0123, "verdict": "better"}
    (root / "grid" / "summary.json").write_text(json.dumps(summary))
    table = markdown_table(comparison_rows(root, ["grid"]))
    assert "Δ +0.1250, p = 0.0123, better, n=3" in table
    regularisers = {"average_accuracy": {"n": 2, "mean_difference": 0.1, "p": 0.04, "verdict": "better"},
                    "average_forgetting": {"n": 2, "mean_difference": -0.2, "p": 0.5, "verdict": "no difference"}}
    assert paired_text(regularisers) == ("average_accuracy: Δ +0.1000, p = 0.04, better, n=2; average_forgetting: "
                                         "Δ -0.2000, p = 0.5, no difference, n=2")  # was `, n=None`


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_check_agrees_with_mmpeft_check_on_shipped_recipes(path, tmp_path, monkeypatch):
    prepare(path, tmp_path, monkeypatch)
    checked = check_recipe(path, [])
    assert checked.ok, checked.problems
    shown, resolved = yaml.safe_load(checked.resolved), yaml.safe_load(cli_check(str(path), []))
    assert {k: shown[k] for k in resolved if k in shown} == {k: v for k, v in resolved.items() if k in shown}
    assert set(shown) >= set(resolved) - {"regulariser", "control"}


def test_check_lists_every_problem_with_its_field_path(tmp_path):
    path = tmp_path / "bad.yaml"
    text = (PROJECT_ROOT / "recipes" / "quickstart.yaml").read_text()
    path.write_text(text.replace("epochs: 15", "epochs: many").replace("lr: 0.003", "lr: -1\n  warmupp: 2"))
    checked = check_recipe(path, ["method.r=0"])
    assert not checked.ok and len(checked.problems) >= 3
    text = "\n".join(checked.problems)
    assert "train.epochs" in text and "'many'" in text and "train.warmupp" in text and "method.r" in text


def test_start_refuses_an_invalid_recipe_and_starts_nothing(tmp_path):
    launcher = Launcher(tmp_path / "runs")
    result = launcher.start("name: x\nmethod: lora\ntrain: {epochs: zero}\n", "x.yaml", ["data.source=nowhere"])
    assert not isinstance(result, dict), f"started: {result}"
    assert any(p.startswith("train.epochs") for p in result.problems)
    assert any(p.startswith("data.source") and "nowhere" in p for p in result.problems)
    assert launcher.launches() == [] and not [p for p in (tmp_path / "runs").iterdir() if p.name != ".ui"]


@pytest.mark.parametrize("extra", [["output.dir={outside}"], ["output.dir=../out"]])
def test_start_refuses_a_run_folder_outside_the_runs_folder(ui_runs_dir, tmp_path, monkeypatch, extra):
    """An override naming output.dir elsewhere (absolute, or relative to where the UI runs) used to start a run
    writing outside RUNS_DIR, where the table never shows it. (output.name is a plain name: validation says so.)"""
    recipe = yaml.safe_load((ui_runs_dir / "lora-run" / "recipe.yaml").read_text())
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # `../out` is tmp_path/out for the launched process
    launcher = Launcher(tmp_path / "runs")
    result = launcher.start(yaml.safe_dump(recipe), "colors.yaml", [e.format(outside=tmp_path / "out") for e in extra])
    assert not isinstance(result, dict), f"started: {result}"
    assert any(p.startswith("output: the run folder") and "outside" in p for p in result.problems), result.problems
    assert launcher.launches() == [] and not (tmp_path / "out").exists()
    checked, _ = launcher.check(yaml.safe_dump(recipe), "colors.yaml", [e.format(outside=tmp_path / "out")
                                                                        for e in extra])
    assert checked.problems == result.problems  # Check said `valid` to what Start then refused
    inner = launcher.start(yaml.safe_dump(recipe), "colors.yaml", [f"output.dir={tmp_path / 'runs' / 'sub'}",
                                                                   "train.epochs=1"])
    os.killpg(inner["pid"], signal.SIGKILL)  # started, which is all this test needs of it
    assert inner["folder"] == f"sub/{inner['folder'].split('/')[-1]}"  # inside: its record names it as the table does


def test_launch_writes_the_run_folder_and_stop_interrupts_it(ui_runs_dir, tmp_path):
    """A real `python -m mmpeft run` in its own session; SIGINT leaves a resumable folder; Resume finishes it."""
    recipe = yaml.safe_load((ui_runs_dir / "lora-run" / "recipe.yaml").read_text())
    recipe["train"]["epochs"] = 400
    recipe["output"] = {"dir": "ignored", "name": None}
    launcher = Launcher(tmp_path / "runs")
    record = launcher.start(yaml.safe_dump(recipe), "colors.yaml", [])
    assert isinstance(record, dict), record
    try:
        stop_and_check(launcher, record, tmp_path / "runs")
    finally:
        for launch in launcher.launches():
            if launch["status"] == "running":
                os.killpg(launch["pid"], signal.SIGKILL)


def stop_and_check(launcher: Launcher, record: dict, root: Path) -> None:
    folder = root / record["folder"]
    assert record["folder"].startswith("colors-") and record["command"][:3] == [sys.executable, "-m", "mmpeft"]
    deadline = time.time() + 90
    while not (folder / "checkpoints").is_dir() and time.time() < deadline:
        assert launcher.alive(record["pid"]), Path(record["log"]).read_text()
        time.sleep(0.3)
    assert {e.path: e.status for e in scan(root, launcher.statuses())}[record["folder"]] == "running"
    assert "sent SIGINT" in launcher.stop(record["folder"])
    while launcher.alive(record["pid"]) and time.time() < deadline:
        time.sleep(0.2)
    assert not launcher.alive(record["pid"])
    assert "interrupted; continue with: mmpeft run --resume" in Path(record["log"]).read_text()
    assert {e.path: e.status for e in scan(root, launcher.statuses())}[record["folder"]] == "interrupted"
    assert not (folder / "metrics.json").exists() and (folder / "checkpoints").is_dir()
    assert "no running launch" in launcher.stop(record["folder"])
    resumed = launcher.resume(record["folder"], "run", ["train.epochs=1"])  # the budget already spent: it just ends
    assert resumed["command"][3:6] == ["run", "--resume", str(folder)]
    while launcher.alive(resumed["pid"]) and time.time() < deadline + 60:
        time.sleep(0.3)
    assert (folder / "metrics.json").is_file(), Path(resumed["log"]).read_text()[-2000:]
    assert {e.path: e.status for e in scan(root, launcher.statuses())}[record["folder"]] == "finished"


def test_the_page_refuses_typed_paths_outside_the_runs_folder(ui_runs_dir, tmp_path):
    from mmpeft.ui.app import Workbench

    bench = Workbench(ui_runs_dir)
    head, report, plots, recipe, log = bench.show("../../etc")
    assert "outside" in head and (report, plots, recipe, log) == ("", [], "", "")
    table, plots = bench.compare(["lora-run", "grid/../../x"])
    assert "outside" in table and plots == []
    assert "finished" in bench.show("lora-run")[0]
    with pytest.raises(OutsideError):
        bench.load_recipe_text("../pyproject.toml", None)
    upload = tmp_path / "mine.yaml"
    upload.write_text("name: mine\n")
    assert bench.load_recipe_text(None, str(upload)) == ("name: mine\n", "mine.yaml")
    assert (ui_runs_dir / ".ui" / "uploads" / "mine.yaml").is_file()
    assert "valid" not in bench.check("name: x\nmethod: nothing\n", "x.yaml", "")
    assert not list((ui_runs_dir / ".ui" / "recipes").glob("*/x.yaml"))  # a check leaves no file behind


def test_a_finished_continual_run_is_listed_with_its_average_accuracy(color_recipe, tmp_path):
    import mmpeft

    recipe = {**color_recipe, "tasks": [{"classes": ["red", "green"]}, {"name": "rest", "classes": ["blue"]}],
              "regulariser": "naive", "train": {**color_recipe["train"], "epochs": 1},
              "output": {"dir": str(tmp_path / "runs"), "name": "sequence"}}
    metrics = mmpeft.continual(recipe)
    entry = by_path(tmp_path / "runs")["sequence"]
    assert (entry.kind, entry.status) == ("continual", "finished")
    assert entry.accuracy == metrics["summary"]["average_accuracy"]
    assert entry.seconds == pytest.approx(sum(t["seconds"] for t in metrics["train"]))
    assert {p.name for p in details(tmp_path / "runs", "sequence").plots} >= {"accuracy_matrix.png"}
    (row,) = comparison_rows(tmp_path / "runs", ["sequence"])
    assert (row["accuracy"], row["train s"]) == (entry.accuracy, entry.seconds)  # its seconds were `–` in Compare


def test_a_grid_folder_says_its_kind_in_its_first_line(ui_runs_dir, tmp_path):
    root = tmp_path / "runs"
    text = (ui_runs_dir / "grid" / "compare.yaml").read_text()
    assert text.startswith("# mmpeft compare --resume ")
    for command in ("fewshot", "search"):
        shutil.copytree(ui_runs_dir / "grid", root / command)
        (root / command / "compare.yaml").write_text(text.replace("# mmpeft compare", f"# mmpeft {command}", 1))
    shutil.copytree(ui_runs_dir / "grid", root / "regs")
    data = yaml.safe_load(text)
    data["grid"] = {"regularisers": ["naive", {"name": "ewc", "label": "ewc-30"}], "seeds": [0]}
    (root / "regs" / "compare.yaml").write_text(yaml.safe_dump(data))
    entries = by_path(root)
    assert {p: entries[p].kind for p in ("fewshot", "search", "regs")} == {
        "fewshot": "fewshot", "search": "search", "regs": "regularisers"}
    assert entries["regs"].method == "naive, ewc-30"


def test_ui_command_binds_to_this_machine_unless_told(tmp_path):
    from mmpeft.cli import build_parser

    args = build_parser().parse_args(["ui"])
    assert (args.runs_dir, args.host, args.port) == ("runs", "127.0.0.1", 7860)
    args = build_parser().parse_args(["ui", str(tmp_path), "--host", "0.0.0.0", "--port", "8080"])
    assert (args.runs_dir, args.host, args.port) == (str(tmp_path), "0.0.0.0", 8080)


def test_ui_refuses_a_port_in_use_and_a_runs_dir_that_is_a_file_in_one_line(tmp_path, capsys, monkeypatch):
    """Both used to end in a traceback (Gradio's `Cannot find empty port`, `[Errno 17] File exists`)."""
    import socket

    from mmpeft.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["ui", str(tmp_path / "runs"), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"error: --port {port}: cannot listen on 127.0.0.1:{port}" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # refused before anything was made
    assert main(["ui", str(tmp_path), "--port", "70000"]) == 2
    assert "--port 70000: a port is a number from 1 to 65535" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    assert main(["ui", str(tmp_path / "afile"), "--port", str(port)]) == 2
    assert f"error: RUNS_DIR {tmp_path / 'afile'} is a file, not a folder" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "gradio", None)  # not installed: it exited with code 1, not 2
    with pytest.raises(SystemExit) as exited:
        main(["ui", str(tmp_path / "runs"), "--port", str(port)])
    assert exited.value.code == 2
    assert capsys.readouterr().err == "error: mmpeft ui needs Gradio: pip install 'mmpeft[ui]'\n"


def test_stopping_a_launch_that_already_ended_says_so(tmp_path, monkeypatch):
    """The launch ends between the status look and the signal: a message, not ProcessLookupError."""
    launcher = Launcher(tmp_path)
    monkeypatch.setattr(launcher, "launches", lambda: [{"folder": "run", "status": "running", "pid": 2**22 + 7}])
    monkeypatch.setattr(os, "killpg", lambda pid, sig: (_ for _ in ()).throw(ProcessLookupError()))
    assert launcher.stop("run") == f"run: its launch (pid {2**22 + 7}) has already ended"


def test_try_it_predicts_on_the_runs_own_test_images_through_mmpeft_predict(ui_runs_dir):
    import mmpeft
    from mmpeft.ui.app import Workbench

    if getattr(mmpeft, "predict", None) is None:
        pytest.skip("mmpeft.predict is not in this version")
    bench = Workbench(ui_runs_dir)
    assert "lora-run" in bench.predict_sources()
    update, note = bench.test_images("lora-run", limit=3)
    files = [value for _, value in update["choices"]]
    assert len(files) == 3 and note == "3 test images listed" and all(Path(f).is_file() for f in files)
    table, note = bench.predict("lora-run", None, "", "", 2, picked=files)
    direct = mmpeft.predict(str(ui_runs_dir / "lora-run"), files, top_k=2)
    assert [row[0] for row in table] == [Path(f).name for f in files]
    assert [row[1] for row in table] == [", ".join(f"{i['label']} {i['score']:.3f}" for i in r["labels"])
                                         for r in direct]
    assert bench.predict("../..", None, "", "", 2, picked=files)[1].startswith("**")  # outside: refused, said
    assert "outside" in bench.test_images("../x")[1]


def test_report_images_leave_the_markdown_and_inline_thumbnails_become_their_file_names():
    from mmpeft.ui.catalog import strip_images

    report = "# Run\n![confusion](confusion_matrix.png)\n| image | answer |\n| ![row 0](samples/0.png) | red |"
    assert strip_images(report) == "# Run\n| image | answer |\n| (samples/0.png) | red |"


def test_the_launch_form_fills_overrides_checked_like_typed_ones(ui_runs_dir):
    from mmpeft.ui.app import FORM_KEYS, Workbench, form_overrides, form_placeholders

    text = (PROJECT_ROOT / "recipes" / "quickstart.yaml").read_text()
    placeholders = {key: update["placeholder"] for key, update in zip(FORM_KEYS, form_placeholders(text))}
    assert placeholders["backbone.id"] == "mmpeft-demo/digits-clip" and placeholders["train.epochs"] == "15"
    assert form_overrides(["", "ia3", " 3 ", "", "", ""]) == ["method.name=ia3", "train.epochs=3"]
    bench = Workbench(ui_runs_dir)
    bad = bench.check(text, "quickstart.yaml", "train.lr=0.01", "", "", "-1", "", "", "")
    assert "train.epochs: -1 is out of range" in bad
    good = bench.check(text, "quickstart.yaml", "", "", "", "2", "", "", "")
    assert "epochs: 2" in good and "out of range" not in good
