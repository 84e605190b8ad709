"""The `mmpeft` command: parse arguments, call the Python API, turn known errors into one clear line."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmpeft", description="PEFT workbench for vision-language models")
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logs and full tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="zero-shot -> fine-tune -> evaluate one recipe")
    run.add_argument("recipe", nargs="?", help="recipe YAML (not needed with --resume)")
    run.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.epochs=3 backbone.id=DIR")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    check = commands.add_parser("check", help="validate a recipe without loading any model")
    check.add_argument("recipe")
    check.add_argument("overrides", nargs="*")
    plan = commands.add_parser("plan", help="will it fit? one training step's memory per method, no weights loaded")
    plan.add_argument("recipe", help="recipe YAML (a compare recipe plans every method of its grid)")
    plan.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.batch_size=64")
    plan.add_argument("--gpu-memory", metavar="SIZE", help="budget, e.g. 24GiB or 80GB (default: this machine's GPU)")
    for name, what in (("compare", "methods x seeds grid over one recipe: table, paired tests, plots"),
                       ("fewshot", "methods x shots (1,2,4,8,16) x seeds grid plus zero-shot baselines")):
        grid = commands.add_parser(name, help=what)
        grid.add_argument("recipe", nargs="?", help="compare recipe YAML: a recipe plus a `grid:` section")
        grid.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. grid.seeds=[0,1] train.epochs=3")
        grid.add_argument("--resume", metavar="GRID_DIR", help="continue a grid folder; finished cells are skipped")
    found = commands.add_parser("search", help="successive-halving search over methods and settings (Optuna), the "
                                "best re-run over the seeds as a grid: leaderboard, Pareto plot")
    found.add_argument("recipe", nargs="?", help="search recipe YAML: a compare recipe plus a `search:` section")
    found.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. search.trials=8 grid.seeds=[0]")
    found.add_argument("--resume", metavar="GRID_DIR", help="continue a search folder: finished trials are kept")
    continual = commands.add_parser("continual", help="a task sequence with a regulariser: accuracy matrix, forgetting")
    continual.add_argument("recipe", nargs="?", help="continual recipe YAML: a recipe plus `tasks:` and `regulariser:`")
    continual.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. regulariser.strength=100")
    continual.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted sequence at its task")
    add_export_commands(commands)
    add_predict_command(commands)
    ui = commands.add_parser("ui", help="local web workbench: browse and compare runs, launch recipes, try a model")
    ui.add_argument("runs_dir", nargs="?", default="runs", metavar="RUNS_DIR", help="folder of runs (default: runs)")
    ui.add_argument("--port", type=int, default=7860)
    ui.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    return parser


def add_predict_command(commands) -> None:
    """`mmpeft predict` (see mmpeft.artifacts.predict)."""
    predict = commands.add_parser("predict", help="label scores or answers for images, from a run or an export")
    predict.add_argument("source", metavar="RUN_OR_EXPORT", help="a run folder or a folder written by mmpeft export")
    predict.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files; folders are walked")
    labels = predict.add_mutually_exclusive_group()
    labels.add_argument("--labels", help="comma-separated labels to score instead of the run's (zero-shot on them)")
    labels.add_argument("--labels-file", metavar="FILE", help="labels to score, one a line")
    predict.add_argument("--top-k", type=int, default=5, help="labels kept per image (default 5)")
    predict.add_argument("--question", help="generative: the question asked (default: the run's)")
    predict.add_argument("--out", metavar="FILE", help="write every result as JSON lines (e.g. predictions.jsonl)")
    predict.add_argument("--batch-size", type=int, default=16)
    predict.add_argument("--base", metavar="HUB_ID_OR_FOLDER", help="an export's base model, if it moved since export")


def add_export_commands(commands) -> None:
    """`mmpeft export` and `mmpeft merge` (see mmpeft.artifacts)."""
    export = commands.add_parser("export", help="a finished run as a merged model or its adapter alone, verified")
    export.add_argument("run_dir", metavar="RUN_DIR")
    export.add_argument("--out", required=True, help="folder to create (must not exist, or be empty)")
    how = export.add_mutually_exclusive_group()
    how.add_argument("--merge", dest="how", action="store_const", const="merged",
                     help="fold the method into the base weights; refuse a method that cannot fold")
    how.add_argument("--adapter-only", dest="how", action="store_const", const="adapter",
                     help="only the trained state (peft format where peft made the method)")
    export.set_defaults(how="auto")  # neither: merged when the method can fold, else the adapter, with a note
    export.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="merged model's dtype")
    export.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip reloading from disk and comparing outputs with the trained model")
    export.add_argument("--tolerance", type=float, help="relative tolerance of the check (default by dtype)")
    export.add_argument("--onnx", action="store_true", help="also export the towers as ONNX (needs onnxruntime)")
    merge = commands.add_parser("merge", help="combine adapters of runs on one base (linear, TIES, DARE), evaluated")
    merge.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    merge.add_argument("--weights", nargs="+", type=float, help="one per run (default: equal)")
    merge.add_argument("--how", default="linear", choices=("linear", "ties", "dare_linear", "dare_ties"))
    merge.add_argument("--density", type=float, help="ties/dare: fraction of entries kept (default 0.5)")
    merge.add_argument("--seed", type=int, default=0, help="DARE's random drops")
    merge.add_argument("--out", required=True, help="folder to create (must not exist, or be empty)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "plan" and all("=" in item and not item.startswith("-") for item in extra):
        args.overrides = [*args.overrides, *extra]  # overrides after --gpu-memory
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    pin_demo_numerics(args)  # before anything imports torch
    quiet_dependencies()
    try:
        return dispatch(args)
    except KeyboardInterrupt:
        if args.command in ("export", "merge"):
            print(f"interrupted; nothing was written to {args.out} (its staging folder was removed); run the same "
                  f"`mmpeft {args.command}` command again", file=sys.stderr)
            return 130
        if args.command not in RESUMABLE:
            print("interrupted", file=sys.stderr)
            return 130
        again = args.command if args.command in ("compare", "fewshot", "continual", "search") else "run"
        folder = "grid" if again in ("compare", "fewshot", "search") else "run"
        print(f"interrupted; continue with: mmpeft {again} --resume <{folder} folder>", file=sys.stderr)
        return 130
    except Exception as error:  # known user errors get one line; others keep their traceback with -v
        if args.verbose or not is_user_error(error):
            raise
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2


def quiet_dependencies() -> None:
    """Keep the terminal for mmpeft's own progress and results: dependencies' notices go to debug level."""
    import warnings

    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # optional CPU kernels package notice
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    from PIL import Image

    # PIL's notice as it reads a large image's header: mmpeft checks data.max_image_pixels itself and names the file
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    for handler in hf_logging.get_logger().handlers:  # the "transformers" logger prints through its own handler
        if not any(isinstance(f, DependencyNoise) for f in handler.filters):
            handler.addFilter(DependencyNoise())


class DependencyNoise(logging.Filter):
    """Dependency warnings the user cannot act on stay out of the terminal and go to the run's train.log: published
    SigLIP configs keep CLIP's default bos/eos ids (49406/49407) outside their own 32k vocabulary; the tokenizer's
    "sequence length is longer than the specified maximum ... indexing errors" when mmpeft measures texts against the
    text tower's limit (mmpeft says itself what would be cut, and cuts it: nothing is indexed out of range)."""

    NOISE = ("must be `None` or an integer within the vocabulary",
             "Token indices sequence length is longer than the specified maximum sequence length")

    def filter(self, record: logging.LogRecord) -> bool:
        if not any(text in record.getMessage() for text in self.NOISE):
            return True
        for handler in logging.getLogger("mmpeft").handlers:
            if isinstance(handler, logging.FileHandler):
                handler.handle(record)
        return False


# As the demo backbone is built (mmpeft.runs.demo.PINNED_NUMERICS, repeated here: reading it would import torch):
# AVX2 kernels on one thread, so a demo recipe's figures are the same on every x86 machine with AVX2.
DEMO_NUMERICS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                 "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def pin_demo_numerics(args: argparse.Namespace) -> bool:
    """Pin the kernels and threads (unless the environment sets them) for training commands on a demo backbone
    (`backbone.id: mmpeft-demo/...`, the quickstart's). Tiny models run no slower on one thread."""
    import re

    if args.command not in RESUMABLE:
        return False
    ids = [o.partition("=")[2] for o in getattr(args, "overrides", None) or [] if o.startswith("backbone.id=")]
    if not ids:
        source = Path(args.recipe or "")
        if getattr(args, "resume", None):  # the folder's saved recipe: a run's, a grid's or a search's
            saved = [Path(args.resume) / n for n in ("recipe.yaml", "compare.yaml", "search.yaml")]
            source = next((p for p in saved if p.is_file()), saved[0])
        try:
            text = source.read_text(encoding="utf-8")[:100_000] if source.is_file() else ""
        except (OSError, UnicodeDecodeError):
            text = ""  # the recipe reader reports it
        ids = re.findall(r"^\s+id:\s*[\"']?([^\s\"'#]+)", text, flags=re.MULTILINE)[:1]
    if not ids or not ids[-1].strip("\"'").startswith("mmpeft-demo/"):
        return False
    for name, value in DEMO_NUMERICS.items():
        os.environ.setdefault(name, value)
    return True


RESUMABLE = {"run": "RUN_DIR", "compare": "GRID_DIR", "fewshot": "GRID_DIR", "continual": "RUN_DIR",
             "search": "GRID_DIR"}


def dispatch(args: argparse.Namespace) -> int:
    import mmpeft

    if args.command in RESUMABLE:
        if args.recipe is None and args.resume is None:
            raise ValueError(f"mmpeft {args.command} needs a recipe file or --resume {RESUMABLE[args.command]}")
        overrides = args.overrides
        if args.resume and args.recipe and "=" in args.recipe:  # `--resume DIR key=value`: no recipe given
            overrides = [args.recipe, *overrides]
        getattr(mmpeft, args.command)(None if args.resume else args.recipe, overrides, resume=args.resume)
    elif args.command == "export":
        mmpeft.export(args.run_dir, args.out, how=args.how, dtype=args.dtype, verify=args.verify,
                      tolerance=args.tolerance, onnx=args.onnx)
    elif args.command == "merge":
        mmpeft.merge(args.run_dirs, args.weights, how=args.how, density=args.density, out=args.out, seed=args.seed)
    elif args.command == "predict":
        from mmpeft.artifacts.predict import iter_labels_file, table

        labels = list(iter_labels_file(args.labels_file)) if args.labels_file is not None else None
        if args.labels is not None:  # `a,b,` is a,b; nothing at all is refused by predict
            labels = [name for name in args.labels.split(",") if name.strip()]
        rows = mmpeft.predict(args.source, args.images, labels=labels, top_k=args.top_k, question=args.question,
                              out=args.out, batch_size=args.batch_size, base=args.base)
        print(table(rows), end="")
        if args.out:
            print(f"predictions: {args.out}")
    elif args.command == "plan":
        from mmpeft.planner import render

        print(render(mmpeft.plan(args.recipe, args.overrides, gpu_memory=args.gpu_memory)), end="")
    elif args.command == "check":
        print(check(args.recipe, args.overrides), end="")
    elif args.command == "ui":
        from mmpeft.ui import serve

        serve(args.runs_dir, host=args.host, port=args.port)
    return 0


def check(path: str, overrides: list[str]) -> str:
    """Validate any kind of recipe (run, compare/fewshot grid, continual) and return it resolved as YAML."""
    import yaml

    from mmpeft.validation import check_recipe

    checked = check_recipe(path, overrides)
    return yaml.safe_dump(checked.resolved, sort_keys=False) + checked.notes


# Writing outputs: a full disk, a read-only or not-a-folder destination is the user's to fix, not a bug.
OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR}


def one_line(error: Exception) -> str:
    """An OSError with a file as "FILE: what is wrong; what to do"; anything else as its message."""
    from mmpeft.core.io import OutputError

    if isinstance(error, OSError) and not isinstance(error, OutputError) and error.errno in OUTPUT_ERRNOS:
        where = error.filename or "an output"
        return (f"cannot write {where}: {error.strerror or error}; choose a writable folder (output.dir, --out) "
                "or free some space")
    return str(error)


def is_user_error(error: Exception) -> bool:
    from mmpeft.backbones import BackboneError
    from mmpeft.core.io import OutputError
    from mmpeft.core.schema import RecipeError
    from mmpeft.data import DataError
    from mmpeft.train import TrainingDiverged

    if isinstance(error, OutputError) or (isinstance(error, OSError) and error.errno in OUTPUT_ERRNOS):
        return True
    return isinstance(error, (RecipeError, DataError, BackboneError, TrainingDiverged, FileNotFoundError,
                              FileExistsError, ValueError))
