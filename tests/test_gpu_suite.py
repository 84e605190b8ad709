"""The GPU suite (tests/benchmarks/gpu_suite.py) in --smoke mode, run as a user runs it (a subprocess): every section
runs, measured numbers are finite and positive, skipped rows say why, and the markdown has a row per method.
About 30-50 s on two CPU cores; on a CUDA machine the smoke run uses the GPU and the CUDA-only checks run too.

    python -m pytest -q tests/test_gpu_suite.py
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "benchmarks" / "gpu_suite.py"
sys.path.insert(0, str(SCRIPT.parent))

import gpu_suite  # noqa: E402  (the suite's own lists: sections, methods, which fields must be positive)

CUDA_ONLY_ROWS = {"quantization": ["qlora 4-bit", "lora-r8 8-bit base", "lora-r8 adamw_8bit"],
                  "generative": ["qlora 4-bit (language model)"]}


def _reject_constant(name: str) -> float:
    raise ValueError(f"non-standard JSON constant {name} in the results")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    """(results JSON, markdown) of one smoke run, shared by the tests of this module."""
    out, scratch = tmp_path_factory.mktemp("gpu-suite"), tmp_path_factory.mktemp("gpu-suite-tmp")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out), "--tmp", str(scratch)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, f"suite failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    results = json.loads((out / gpu_suite.JSON_FILE).read_text(), parse_constant=_reject_constant)
    return results, (out / gpu_suite.MARKDOWN_FILE).read_text()


def _rows(results: dict, section: str) -> list[dict]:
    return results["sections"][section]["rows"]


def test_every_section_is_present_and_ran(smoke: tuple[dict, str]) -> None:
    results, _ = smoke
    assert results["complete"] is True
    assert list(results["sections"]) == list(gpu_suite.SECTIONS)
    for name, section in results["sections"].items():
        assert section["status"] == "ok", f"{name}: {section.get('error')}\n{section.get('traceback', '')}"
        assert section["seconds"] >= 0
        if name != "environment":
            assert section["rows"], f"{name} has no rows"
            assert section["notes"], f"{name} has no notes saying what was measured"


def test_environment_is_recorded(smoke: tuple[dict, str]) -> None:
    info = smoke[0]["sections"]["environment"]["info"]
    assert info["mode"] == "smoke" and "--smoke" in info["command"]
    assert info["date"] and info["python"] and info["peak_source"]
    for package in ("torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        assert info["versions"][package] != "not installed", package
    if info["device"] == "cpu":
        assert info["gpu"] is None and info["peak_bf16_tflops"] is None
        assert info["gpu_utilisation"].startswith("n/a")
    else:
        assert info["gpu"] and info["driver_source"] and info["torch_cuda"]


def test_measured_numbers_are_finite_and_positive(smoke: tuple[dict, str]) -> None:
    results, _ = smoke
    measured = 0
    for name in gpu_suite.SECTIONS[1:]:
        for row in _rows(results, name):
            assert row["status"] in ("ok", "skipped"), f"{name} / {row['label']}: {row.get('error')}"
            if row["status"] != "ok":
                continue
            measured += 1
            assert row["samples_per_second"] is not None, (name, row["label"])
            for key in gpu_suite.POSITIVE_KEYS:
                value = row.get(key)
                if value is None:
                    continue
                assert isinstance(value, (int, float)) and not isinstance(value, bool), (name, row["label"], key)
                assert math.isfinite(value) and value > 0, (name, row["label"], key, value)
    assert measured >= 2 * len(gpu_suite.METHOD_PRESETS) + 4


def test_method_rows_have_flops_and_plans(smoke: tuple[dict, str]) -> None:
    results, _ = smoke
    rows = _rows(results, "methods")
    for label in gpu_suite.METHOD_PRESETS:
        kinds = {row["batch_kind"]: row for row in rows if row["label"] == label}
        assert set(kinds) == {"fixed", "largest"}, label
        fixed, largest = kinds["fixed"], kinds["largest"]
        assert fixed["batch"] == results["sections"]["environment"]["info"]["sizes"]["batch"]
        assert largest["batch"] >= fixed["batch"] and largest["search"].startswith("doubling stopped")
        for row in (fixed, largest):
            assert row["flops_per_step"] and row["achieved_tflops"], label
            assert row["plan_peak_bytes"], label
            assert row["trainable_params"] <= row["total_params"], label
            if row.get("mfu") is None:
                assert row["mfu_note"], label


def test_skipped_rows_say_why(smoke: tuple[dict, str]) -> None:
    results, _ = smoke
    for name in gpu_suite.SECTIONS[1:]:
        for row in _rows(results, name):
            if row["status"] == "skipped":
                assert isinstance(row["reason"], str) and len(row["reason"]) > 10, (name, row)
    if results["sections"]["environment"]["info"]["device"] == "cpu":
        for name, labels in CUDA_ONLY_ROWS.items():
            by_label = {row["label"]: row for row in _rows(results, name)}
            for label in labels:
                assert by_label[label]["status"] == "skipped", (name, label)
                assert by_label[label]["reason"].startswith("needs CUDA"), (name, label)
        for row in _rows(results, "methods"):
            assert row["peak_bytes"] is None and row["peak_note"]


def test_input_pipeline_compares_loader_with_tensors(smoke: tuple[dict, str]) -> None:
    rows = _rows(smoke[0], "input_pipeline")
    assert [row["status"] for row in rows] == ["ok", "ok", "ok"]
    default, workers, tensors = rows
    assert default["num_workers"] == "auto"  # mmpeft's default loader setting, read back from the run's recipe
    assert workers["num_workers"] >= 1
    for row in (default, workers):
        assert row["images"] > 0 and row["pipeline_efficiency"] > 0
        assert row["utilisation_window"]["source"] == "the training window read from train.log"
        assert (row["gpu_utilisation"] is None) == (row["gpu_utilisation_note"].startswith("n/a"))
    assert tensors["samples_per_second"] > 0


def test_markdown_has_a_row_per_method(smoke: tuple[dict, str]) -> None:
    _, text = smoke
    methods = text.split("## methods", 1)[1].split("\n## ", 1)[0]
    table = [line for line in methods.splitlines() if line.startswith("| ") and not line.startswith("| method ")]
    labels = [line.split("|")[1].strip() for line in table]
    for label in gpu_suite.METHOD_PRESETS:
        assert labels.count(label) == 2, f"{label}: {labels.count(label)} rows (fixed and largest batch expected)"
    for section in gpu_suite.SECTIONS[1:]:
        assert f"## {section}" in text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-only figures: peak memory and the 4/8-bit rows")
def test_cuda_rows_measure_memory_and_quantization(smoke: tuple[dict, str]) -> None:
    results, _ = smoke
    for row in _rows(results, "methods"):
        assert row["peak_bytes"] > 0 and row["plan_ratio"] > 0, row["label"]
    for name, labels in CUDA_ONLY_ROWS.items():
        by_label = {row["label"]: row for row in _rows(results, name)}
        for label in labels:
            assert by_label[label]["status"] == "ok", (name, label, by_label[label].get("error"))
            assert by_label[label]["peak_bytes"] > 0, (name, label)
