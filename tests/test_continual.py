"""Continual learning: recipes, metrics, each regulariser's mechanics, forgetting vs naive, resume.

The end-to-end sequence is class-incremental on the pre-trained demo backbone (digits 0-4, then 5-9, held-out
digits), where naive fine-tuning forgets most of the first task. Unit checks (Fisher, replay memory, metrics,
penalties) need no training.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from mmpeft.core.schema import RecipeError
from mmpeft.sequences import load_continual_recipe
from mmpeft.sequences.metrics import (
    average_accuracy,
    average_forgetting,
    average_incremental_accuracy,
    backward_transfer,
    forward_transfer,
    summarise,
)
from mmpeft.sequences.regularisers import REGULARISERS
from mmpeft.sequences.regularisers.ewc import empirical_fisher
from mmpeft.sequences.regularisers.replay import ReplayMemory


# --- recipes ----------------------------------------------------------------------------------------------------------
def class_incremental(color_recipe: dict, **changes) -> dict:
    return {**color_recipe, "tasks": [{"classes": ["red", "green"]}, {"name": "rest", "classes": ["blue"]}],
            "regulariser": "ewc", **changes}


def test_tasks_merge_over_data_and_round_trip(color_recipe, tmp_path):
    overrides = ["regulariser.strength=5", "tasks.1.shift=[invert]"]
    recipe = load_continual_recipe(class_incremental(color_recipe), overrides)
    assert [t.name for t in recipe.tasks] == ["red,green", "rest"]
    assert recipe.tasks[0].data.classes == ("red", "green")
    assert recipe.tasks[0].data.path == color_recipe["data"]["path"]
    assert recipe.tasks[1].data.shift == ("invert",) and recipe.tasks[0].data.shift == ()
    assert (recipe.regulariser.name, recipe.regulariser.strength) == ("ewc", 5.0)
    path = tmp_path / "resolved.yaml"
    path.write_text(recipe.to_yaml())
    again = load_continual_recipe(path)
    assert again.tasks == recipe.tasks and again.regulariser == recipe.regulariser


def test_continual_recipe_problems_are_reported_together(color_recipe):
    bad = class_incremental(color_recipe, regulariser={"name": "ewcc"}, train={"epocs": 1}, controll={},
                            tasks=[{"clases": ["red"]}, {"shift": ["rot91"]}])
    with pytest.raises(RecipeError) as caught:
        load_continual_recipe(bad)
    joined = "\n".join(caught.value.problems)
    for expected in ("train.epocs: unknown key", "tasks[0].clases: unknown key", "did you mean 'classes'",
                     "regulariser.name: unknown regulariser 'ewcc'", "did you mean 'ewc'", "tasks[1].shift[0]",
                     "rot91", "controll: unknown key (did you mean 'control'?)"):
        assert expected in joined
    (problem,) = pytest.raises(RecipeError, load_continual_recipe, class_incremental(color_recipe),
                               ["regulariser.gamma=0.5"]).value.problems
    assert problem.startswith("regulariser.gamma: unknown key")


def test_recipe_without_tasks_or_with_contrastive_objective_is_refused(color_recipe):
    problems = pytest.raises(RecipeError, load_continual_recipe, {**color_recipe, "train": {"objective":
                                                                                          "contrastive"}}).value.problems
    assert any(p.startswith("tasks: required") for p in problems)
    problems = pytest.raises(RecipeError, load_continual_recipe,
                             class_incremental(color_recipe, train={"objective": "contrastive"})).value.problems
    assert any(p.startswith("train.objective:") for p in problems)
    augmented = {**color_recipe["data"], "augment": {"horizontal_flip": True}}
    (problem,) = pytest.raises(RecipeError, load_continual_recipe,
                               class_incremental(color_recipe, regulariser="lwf", data=augmented)).value.problems
    assert problem.startswith("regulariser.targets: 'precompute'") and "use targets: swap" in problem
    load_continual_recipe(class_incremental(color_recipe, regulariser={"name": "lwf", "targets": "swap"},
                                            data=augmented))


# --- metrics ----------------------------------------------------------------------------------------------------------
R = [[0.9, 0.2, 0.1],
     [0.6, 0.8, 0.3],
     [0.5, 0.7, 0.95]]
B = [0.1, 0.1, 0.2]


def test_metrics_match_hand_computation():
    assert average_accuracy(R) == pytest.approx((0.5 + 0.7 + 0.95) / 3)
    assert average_incremental_accuracy(R) == pytest.approx((0.9 + (0.6 + 0.8) / 2 + (0.5 + 0.7 + 0.95) / 3) / 3)
    # forgetting: task 0: max(0.9, 0.6) - 0.5 = 0.4; task 1: max(0.8) - 0.7 = 0.1
    assert average_forgetting(R) == pytest.approx((0.4 + 0.1) / 2)
    assert backward_transfer(R) == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)
    assert forward_transfer(R, B) == pytest.approx(((0.2 - 0.1) + (0.3 - 0.2)) / 2)
    summary = summarise(R, B, control=[0.8, 0.7, 0.6])
    assert summary["final_control_accuracy"] == 0.6 and summary["forgetting_per_task"] == pytest.approx([0.4, 0.1])
    single = summarise([[0.7]])
    assert single["average_forgetting"] is None and single["forward_transfer"] is None
    with pytest.raises(ValueError, match="square"):
        average_accuracy([[0.1, 0.2]])


# --- EWC's Fisher -----------------------------------------------------------------------------------------------------
def test_empirical_fisher_matches_hand_computation_on_logistic_model():
    """p(y=1|x) = sigmoid(w.x): d log p(y|x)/dw = (y - sigmoid(w.x)) x, so F = mean_n (y_n - s_n)^2 x_n^2."""
    w = torch.tensor([0.5, -1.0], requires_grad=True)
    x = torch.tensor([[1.0, 2.0], [0.5, -1.0], [-2.0, 0.3], [1.5, 1.5], [0.0, -0.7]])
    y = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    batches = [(x[:3], y[:3]), (x[3:], y[3:])]

    def log_likelihood(batch):
        inputs, labels = batch
        logits = inputs @ w
        return labels * torch.nn.functional.logsigmoid(logits) + (1 - labels) * torch.nn.functional.logsigmoid(-logits)

    fisher = empirical_fisher({"w": w}, batches, log_likelihood, "per_sample")["w"]
    s = torch.sigmoid(x @ w.detach())
    expected = ((y - s)[:, None] ** 2 * x ** 2).mean(0)
    torch.testing.assert_close(fisher, expected)
    per_batch = empirical_fisher({"w": w}, batches, log_likelihood, "per_batch")["w"]
    g = [((y[a:b] - s[a:b])[:, None] * x[a:b]).mean(0) for a, b in ((0, 3), (3, 5))]
    torch.testing.assert_close(per_batch, (g[0] ** 2 + g[1] ** 2) / 2)


# --- replay memory ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["reservoir", "class_balanced"])
def test_replay_memory_respects_its_bound(policy):
    memory = ReplayMemory(capacity=10, policy=policy, seed=3)
    memory.add_task(0, [0] * 30 + [1] * 5)
    assert len(memory) == 10
    memory.add_task(1, [2] * 40 + [3] * 40)
    assert len(memory) == 10 and len(set(memory.entries)) == 10
    assert all(0 <= e.index < (35 if e.task == 0 else 80) for e in memory.entries)
    again = ReplayMemory(capacity=10, policy=policy, seed=3)
    again.load_meta(memory.to_meta())
    assert again.entries == memory.entries


def test_class_balanced_memory_is_balanced_and_reservoir_is_uniform():
    memory = ReplayMemory(capacity=12, policy="class_balanced", seed=0)
    memory.add_task(0, [0] * 50 + [1] * 50)
    assert sorted(e.label for e in memory.entries) == [0] * 6 + [1] * 6
    memory.add_task(1, [2] * 50 + [3] * 2)  # class 3 has fewer than its share: it keeps both
    counts = {c: sum(e.label == c for e in memory.entries) for c in range(4)}
    assert counts == {0: 3, 1: 3, 2: 3, 3: 2}
    hits = torch.zeros(100)
    for seed in range(300):  # every streamed example is kept with probability capacity / seen
        reservoir = ReplayMemory(capacity=10, policy="reservoir", seed=seed)
        reservoir.add_task(0, [0] * 50)
        reservoir.add_task(1, [1] * 50)
        for e in reservoir.entries:
            hits[e.task * 50 + e.index] += 1
    assert hits.sum() == 3000 and abs(hits[:50].mean() - hits[50:].mean()) < 0.15 * hits.mean() + 1


def test_every_regulariser_is_registered():
    assert set(REGULARISERS.names()) >= {"naive", "ewc", "online_ewc", "l2sp", "lwf", "replay", "adapter_per_task"}


# --- penalties: zero at theta*, growing as the trainable parameters move --------------------------------------------
@pytest.fixture
def two_tasks(color_recipe):
    """Task 0 finished (no training needed) and task 1 begun, for any regulariser: (make, backbone, batch)."""
    from mmpeft.backbones import load_backbone
    from mmpeft.methods import METHODS
    from mmpeft.sequences.regularisers import make_regulariser
    from mmpeft.sequences.runner import task_context
    from mmpeft.sequences.sequence import load_sequence

    def make(name: str, **settings):
        recipe = load_continual_recipe(class_incremental(color_recipe, regulariser={"name": name, **settings}))
        sequence = load_sequence(recipe)
        backbone = load_backbone(recipe.recipe.backbone)
        torch.manual_seed(0)
        METHODS.get("lora")().apply(backbone, recipe.recipe.method, sequence.labels)
        regulariser = make_regulariser(recipe.regulariser, seed=0)
        first, _ = task_context(recipe, sequence, backbone, 0)
        regulariser.begin_task(first)
        regulariser.end_task(first)
        second, _ = task_context(recipe, sequence, backbone, 1)
        regulariser.begin_task(second)
        batch = second.collate([second.train_set[i] for i in range(8)])
        return regulariser, backbone, regulariser.transform_batch(batch)

    return make


def trainable(backbone) -> dict:
    return {n: p for n, p in backbone.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name, settings", [("ewc", {}), ("online_ewc", {}), ("l2sp", {}),
                                            ("lwf", {"targets": "precompute"}), ("lwf", {"targets": "swap"})])
def test_penalty_is_zero_at_the_anchor_and_grows_with_distance(two_tasks, name, settings):
    regulariser, backbone, batch = two_tasks(name, **settings)
    params = trainable(backbone)
    start = {n: p.detach().clone() for n, p in params.items()}
    direction = {n: torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i, (n, p) in
                 enumerate(params.items())}
    values = []
    for eps in (0.0, 0.005, 0.01, 0.02):
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(start[n] + eps * direction[n])
        values.append(regulariser.penalty(dict(batch)).item())
    assert abs(values[0]) < 1e-7
    assert 0 < values[1] < values[2] < values[3]
    if name != "lwf":  # the weighted-L2 penalties are exactly quadratic in the displacement
        assert values[2] / values[1] == pytest.approx(4, rel=1e-3)
        assert values[3] / values[2] == pytest.approx(4, rel=1e-3)
    tensors, _ = regulariser.state()  # only trainable state is kept, never the frozen backbone
    assert all(key.split("/")[-1] in params for key in tensors)
    assert sum(t.numel() for t in tensors.values()) <= 2 * sum(p.numel() for p in params.values())


@pytest.mark.parametrize("name", ["naive", "replay", "adapter_per_task"])
def test_regularisers_without_a_penalty_add_no_loss(two_tasks, name):
    regulariser, _, batch = two_tasks(name)
    assert regulariser.extra_loss(batch) is None
    if name == "replay":  # 8 new examples (task 2: blue) + round(0.5 * 8) remembered ones from task 1
        assert len(batch["labels"]) == len(batch["pixel_values"]) == 12
        assert batch["labels"][:8].tolist() == [2] * 8 and set(batch["labels"][8:].tolist()) <= {0, 1}


# --- end to end: class-incremental digits on the pre-trained demo backbone ------------------------------------------
SEQUENCE_REGULARISERS = {
    "naive": "naive",
    "ewc": {"name": "ewc", "strength": 1000},
    "lwf": {"name": "lwf", "alpha": 10},
    "replay": {"name": "replay", "memory_size": 50, "policy": "class_balanced", "ratio": 0.5},
}


def digits_sequence(digits_clip_dir, out, regulariser, **changes) -> dict:
    """Rotated held-out digits (zero-shot about 0.1): 0-4, then 5-9; naive LoRA forgets task 1 almost entirely."""
    return {
        "name": "digits-ci", "seed": 0, "backbone": {"id": str(digits_clip_dir)},
        "data": {"source": "digits", "subset": "heldout", "shift": ["rot90"], "split": {"val": 0.0, "test": 0.3},
                 "templates": ["a photo of the digit {label}."]},
        "method": {"name": "lora", "r": 4, "alpha": 8, "towers": ["vision"]},
        "train": {"epochs": 5, "batch_size": 32, "lr": 0.005, "warmup_ratio": 0.0},
        "eval": {"batch_size": 128},
        "output": {"dir": str(out), "name": changes.pop("name", "run")},
        "tasks": [{"name": "0-4", "classes": ["0", "1", "2", "3", "4"]},
                  {"name": "5-9", "classes": ["5", "6", "7", "8", "9"]}],
        "regulariser": regulariser, **changes,
    }


@pytest.fixture(scope="module")
def sequence_runs(digits_clip_dir, tmp_path_factory) -> dict:
    """Each regulariser on the same sequence and seed, run as `regularisers x seeds` grid cells (compare's entry)."""
    from mmpeft.sequences import run_continual_cell

    out = tmp_path_factory.mktemp("continual")
    recipe = digits_sequence(digits_clip_dir, out, "naive")
    runs, rows = {}, {}
    for key, regulariser in SEQUENCE_REGULARISERS.items():
        rows[key] = run_continual_cell(recipe, regulariser, seed=0, output_dir=out)
        run_dir = out / f"digits-ci-{key}-seed0"
        assert rows[key]["regulariser"] == key and rows[key]["run_dir"] == str(run_dir)
        runs[key] = (json.loads((run_dir / "metrics.json").read_text()), run_dir)
        assert rows[key]["average_forgetting"] == runs[key][0]["summary"]["average_forgetting"]
    assert run_continual_cell(recipe, "naive", seed=0, output_dir=out) == rows["naive"]  # finished: reused
    return runs


def test_run_folder_holds_matrix_plots_report_and_adapter(sequence_runs):
    metrics, run_dir = sequence_runs["replay"]
    for name in ("recipe.yaml", "metrics.json", "train.log", "report.md", "accuracy_matrix.png",
                 "accuracy_over_tasks.png", "adapter/adapter_model.safetensors"):
        assert (run_dir / name).is_file(), name
    assert not (run_dir / "state").exists() and not (run_dir / "tasks").exists()
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["accuracy_matrix"] == metrics["accuracy_matrix"] and len(saved["zero_shot"]) == 2
    assert "class-incremental" in saved["protocol"] and "| after 5-9 |" in (run_dir / "report.md").read_text()


def test_naive_forgets_and_ewc_lwf_replay_each_forget_less(sequence_runs):
    forgetting = {key: metrics["summary"]["average_forgetting"] for key, (metrics, _) in sequence_runs.items()}
    naive_matrix = sequence_runs["naive"][0]["accuracy_matrix"]
    assert naive_matrix[0][0] > 0.7 and forgetting["naive"] > 0.6, naive_matrix  # it learned task 1, then lost it
    for key in ("ewc", "lwf", "replay"):  # smallest margins over seeds 0-4: ewc 0.19, lwf 0.28, replay 0.56
        assert forgetting[key] < forgetting["naive"] - 0.1, forgetting
    assert all(math.isclose(sequence_runs[k][0]["accuracy_matrix"][0][0], naive_matrix[0][0]) for k in
               ("ewc", "lwf", "replay")), "the first task trains identically whatever the regulariser"


def test_interrupted_sequence_resumes_at_its_task_and_matches_an_unbroken_run(sequence_runs, digits_clip_dir,
                                                                               tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from mmpeft.cli import main
    from mmpeft.sequences import continual
    from mmpeft.train import Trainer

    reference, reference_dir = sequence_runs["replay"]
    steps_per_task = reference["train"][0]["steps"]
    steps = {"n": 0}
    original_step = Trainer.optimizer_step

    def step_then_die(self):
        original_step(self)
        steps["n"] += 1
        if steps["n"] == steps_per_task + steps_per_task // 2:  # mid-way through the second task
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "optimizer_step", step_then_die)
    with pytest.raises(KeyboardInterrupt):
        continual(digits_sequence(digits_clip_dir, tmp_path, SEQUENCE_REGULARISERS["replay"], name="cut"))
    run_dir = tmp_path / "cut"
    progress = json.loads((run_dir / "state" / "progress.json").read_text())
    assert progress["done"] == 1 and len(progress["matrix"]) == 1 and not (run_dir / "metrics.json").exists()
    assert json.loads((run_dir / "state" / "regulariser.json").read_text())["entries"]  # the replay memory
    assert (run_dir / "tasks" / "1" / "checkpoints" / "last" / "progress.json").is_file()  # mid-task checkpoint
    monkeypatch.setattr(Trainer, "optimizer_step", original_step)

    fits = []
    original_fit = Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self, resume=False: fits.append((self.run_dir.name, resume))
                        or original_fit(self, resume))
    assert main(["continual", "--resume", str(run_dir)]) == 0
    assert fits == [("1", True)]  # only the second task trains, continuing from its own checkpoint
    resumed = json.loads((run_dir / "metrics.json").read_text())
    assert resumed["accuracy_matrix"] == reference["accuracy_matrix"]
    whole = load_file(str(reference_dir / "adapter" / "adapter_model.safetensors"))
    again = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(whole[k], again[k]) for k in whole)


def test_adapter_per_task_keeps_each_task_exactly_and_exports_one_adapter_each(color_recipe, tmp_path):
    """Domain-incremental (same classes, new shift): with the task id, task 1's adapter is untouched by task 2."""
    from mmpeft.sequences import continual

    recipe = {**color_recipe, "train": {**color_recipe["train"], "epochs": 1}, "data": {**color_recipe["data"],
              "split": {"val": 0.0, "test": 0.25}}, "tasks": [{"name": "plain"}, {"shift": ["invert"]}],
              "regulariser": "adapter_per_task", "control": {"name": "red or green", "classes": ["red", "green"]}}
    metrics = continual(recipe)
    (first, _), (after, second) = metrics["accuracy_matrix"]
    assert after == first and metrics["summary"]["average_forgetting"] == 0.0
    assert metrics["zero_shot"][1] == metrics["accuracy_matrix"][0][1]  # untrained task: the initial (zero-shot) state
    assert "domain-incremental" in metrics["protocol"] and len(metrics["control"]["after_task"]) == 2
    run_dir = tmp_path / "runs" / "run"
    for name in ("task1", "task2"):
        assert (run_dir / "task_adapters" / name / "adapter_model.safetensors").is_file()
