"""A run on conversation data (data.source: llava | sharegpt | messages | llamafactory): read and check every row
before the model loads, measure the untouched model, train on assistant turns, evaluate, save.

Conversations have no labels: validation and the run's headline number are the held-out assistant-token loss (lower
is better), and `eval.generate` adds the last assistant turn generated and matched against the reference.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

from accelerate.utils import set_seed
from tqdm.auto import tqdm

from mmpeft.backbones import Backbone, BackboneError
from mmpeft.core.distributed import process_state
from mmpeft.core.io import write_json, write_text
from mmpeft.data import DataError, load_image
from mmpeft.data.conversation_data import ConversationSplits, load_conversations
from mmpeft.data.conversations import Conversation, chat_messages
from mmpeft.data.validate import BadRow, report_bad_rows
from mmpeft.evaluation.conversations import assistant_loss, last_turn_answers
from mmpeft.methods import METHODS, count_parameters
from mmpeft.objectives.generative import ConversationLoss
from mmpeft.runs.build import apply_method, build, load_base
from mmpeft.runs.folder import METRICS_FILE, check_same_data, save_adapter
from mmpeft.specs import DataSpec, Recipe
from mmpeft.train import Trainer

logger = logging.getLogger("mmpeft")
REPORT_FILE = "report.md"
SAMPLE_SIDE = 96  # thumbnail pixels in report.md's samples table


def execute_conversations(recipe: Recipe, run_dir: Path, resume: bool = False,
                          data: ConversationSplits | None = None) -> dict:
    """`data` (already read and checked) or the recipe's, read and checked here before any model loads."""
    set_seed(recipe.seed, deterministic=False)
    data = data if data is not None else load_conversations(recipe.data, recipe.seed)
    check_same_data(run_dir, data.info, resume)
    logger.info("data: %s", ", ".join(f"{k}={v}" for k, v in data.info["counts"].items()))
    backbone = load_base(recipe)
    backbone.require("generative", f"data.source: {recipe.data.source} (conversations)")
    data = drop_rows_that_cannot_fit(backbone, data, recipe.data)
    method = METHODS.get(recipe.method.name)()
    metrics: dict = {"recipe": recipe.name, "backbone": recipe.backbone.id, "method": recipe.method.name,
                     "seed": recipe.seed, "data": data.info}
    if recipe.eval.zero_shot and method.name != "zero_shot":
        metrics["zero_shot"] = evaluate_conversations(backbone, data, recipe, "zero-shot")
    apply_method(backbone, recipe, None)  # no label set: methods that need classes say so
    metrics["params"] = count_parameters(backbone)
    if method.trains:
        metrics["train"], final_state = train_conversations(recipe, run_dir, backbone, data, resume)
        if final_state is not None:  # FSDP left the trained model sharded: evaluate and save a whole one
            backbone = build(recipe, None, final_state)
    metrics["test"] = evaluate_conversations(backbone, data, recipe, "test")
    state = process_state()
    if state.is_main_process:
        save_adapter(method, backbone, recipe, run_dir)
        write_text(run_dir / REPORT_FILE, conversation_report(run_dir, metrics, data.test))
        write_json(run_dir / METRICS_FILE, metrics)
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        logger.info("run folder: %s", run_dir)
    state.wait_for_everyone()
    return metrics


def drop_rows_that_cannot_fit(backbone: Backbone, data: ConversationSplits, spec: DataSpec) -> ConversationSplits:
    """Every row through the processor once, before anything trains (its encoding is cached for the first epoch):
    a row whose images or first answer lie past data.max_length, or that is longer than the model's context without
    data.max_length, is a bad row (an error, or skipped under data.on_bad_rows: skip)."""
    kept: dict[str, list] = {}
    bad: list[BadRow] = []
    for split in ("train", "val", "test"):
        kept[split] = []
        for row in tqdm(getattr(data, split), desc=f"token lengths ({split})", leave=False, disable=None):
            try:
                backbone.encode_conversation(chat_messages(row.turns), [load_image(ref) for ref in row.images])
                kept[split].append(row)
            except BackboneError as error:
                bad.append(BadRow(row.source, "length", str(error)))
    where = data.info["where"]
    report_bad_rows(bad, where, spec.on_bad_rows)
    if not bad:
        return data
    if not kept["train"] or not kept["test"] or (data.val and not kept["val"]):
        raise DataError(f"no rows of a split fit in {where}: {len(bad)} rows are too long (see above); raise "
                        "data.max_length or lower the image budget")
    info = {**data.info, "counts": {split: len(rows) for split, rows in kept.items()},
            "skipped": data.info["skipped"] + len(bad),
            "skipped_rows": (data.info["skipped_rows"] + [str(b) for b in bad])[:100]}
    return dataclasses.replace(data, **kept, info=info)


def evaluate_conversations(backbone: Backbone, data: ConversationSplits, recipe: Recipe, stage: str) -> dict:
    """{"loss", "perplexity", "tokens", "n"} on the test split, plus "answers" with `eval.generate`; printed."""
    test = data.dataset("test")
    result = assistant_loss(backbone, test, recipe.eval.batch_size, desc=f"{stage} loss")
    line = f"{stage:>10}: assistant-token loss {result['loss']:.4f} ({result['tokens']} tokens, {result['n']} rows)"
    if recipe.eval.generate:
        result["answers"] = last_turn_answers(backbone, test, recipe.eval.batch_size, recipe.eval.max_new_tokens,
                                              desc=f"{stage} answers")
        line += (f"  last answer exact match {result['answers']['exact_match']:.3f}  normalised "
                 f"{result['answers']['normalized_match']:.3f}  token-F1 {result['answers']['token_f1']:.3f}")
    if process_state().is_main_process:
        print(line, flush=True)
    return result


def train_conversations(recipe: Recipe, run_dir: Path, backbone: Backbone, data: ConversationSplits,
                        resume: bool) -> tuple[dict, dict | None]:
    """Train on assistant turns; validation (when data.split.val > 0) selects by held-out assistant-token loss."""
    spec = recipe.train
    if spec.select_metric != "loss":
        logger.info("train.select_metric: %s has no meaning without labels; conversations select by val loss",
                    spec.select_metric)
        spec = dataclasses.replace(spec, select_metric="loss")
    val_set = data.dataset("val") if data.val else None

    def evaluate_val() -> dict:
        return {"loss": assistant_loss(backbone, val_set, recipe.eval.batch_size, desc="val")["loss"]}

    trainer = Trainer(backbone, ConversationLoss(backbone), data.dataset("train"), spec, recipe.seed, run_dir,
                      evaluate_val=evaluate_val if val_set is not None else None)
    progress = trainer.fit(resume=resume)
    seconds = progress.train_seconds
    summary = {"epochs_run": progress.epoch, "steps": progress.global_step, "seconds": round(seconds, 3),
               "samples_per_second": round(progress.samples_seen / seconds, 2) if seconds else None,
               "best_epoch": progress.best_epoch, "history": progress.history}
    return summary, trainer.final_state


def conversation_report(run_dir: Path, metrics: dict, test_rows: list[Conversation] = ()) -> str:
    """report.md: the data, the held-out assistant-token loss before and after training, generated answers, and
    (with eval.generate) a table of the first test rows: thumbnail, question, reference, answer before and after."""
    data = metrics["data"]
    lines = [f"# Run `{run_dir.name}`", "", f"Recipe `{metrics['recipe']}`, backbone `{metrics['backbone']}`, method "
             f"`{metrics['method']}`, seed {metrics['seed']}; data.source `{data['source']}` ({data['where']}): "
             + ", ".join(f"{k} {v}" for k, v in data["counts"].items()) + " rows.", "",
             "| evaluation | assistant-token loss | perplexity | exact match | normalised match | token-F1 |",
             "|---|---|---|---|---|---|"]
    for label, scores in (("zero-shot", metrics.get("zero_shot")), ("after training", metrics["test"])):
        if scores is not None:
            answers = scores.get("answers")
            matches = (f"{answers['exact_match']:.3f} | {answers['normalized_match']:.3f} | "
                       f"{answers.get('token_f1', float('nan')):.3f}") if answers else "- | - | -"
            lines.append(f"| {label} | {scores['loss']:.4f} | {scores['perplexity']:.2f} | {matches} |")
    return "\n".join(lines + sample_table(run_dir, metrics, test_rows)) + "\n"


def sample_table(run_dir: Path, metrics: dict, test_rows: list[Conversation]) -> list[str]:
    """The first generated test answers beside their row's first image (a thumbnail under samples/)."""
    after = metrics["test"].get("answers")
    if not after or not test_rows:
        return []
    before = (metrics.get("zero_shot") or {}).get("answers") or {"examples": []}
    lines = ["", "## Samples (last assistant turn of the first test rows)", "",
             "| image | question | reference | before training | after training |", "|---|---|---|---|---|"]
    for i, example in enumerate(after["examples"]):
        thumbnail = "(text only)"
        if i < len(test_rows) and test_rows[i].images:
            image = load_image(test_rows[i].images[0])
            image.thumbnail((SAMPLE_SIDE, SAMPLE_SIDE))
            (run_dir / "samples").mkdir(exist_ok=True)
            image.save(run_dir / "samples" / f"{i}.png")
            thumbnail = f"![row {i}](samples/{i}.png)"
        earlier = before["examples"][i]["prediction"] if i < len(before["examples"]) else "-"
        cells = [example.get("question", ""), example["reference"], earlier, example["prediction"]]
        lines.append(f"| {thumbnail} | " + " | ".join(_cell(text) for text in cells) + " |")
    return lines


def _cell(text: str) -> str:
    """Text for a markdown table cell: one line, pipes escaped, cut to 120 characters."""
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= 120 else text[:117] + "..."
