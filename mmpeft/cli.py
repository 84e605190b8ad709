"""The `mmpeft` command: parse arguments, call the Python API, turn known errors into one clear line."""

from __future__ import annotations

import argparse
import logging
import sys


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
    for name, what in (("compare", "methods x seeds grid over one recipe: table, paired tests, plots"),
                       ("fewshot", "methods x shots (1,2,4,8,16) x seeds grid plus zero-shot baselines")):
        grid = commands.add_parser(name, help=what)
        grid.add_argument("recipe", nargs="?", help="compare recipe YAML: a recipe plus a `grid:` section")
        grid.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. grid.seeds=[0,1] train.epochs=3")
        grid.add_argument("--resume", metavar="GRID_DIR", help="continue a grid folder; finished cells are skipped")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    quiet_dependencies()
    try:
        return dispatch(args)
    except KeyboardInterrupt:
        again = args.command if args.command in ("compare", "fewshot") else "run"
        print(f"interrupted; continue with: mmpeft {again} --resume <{'grid' if again != 'run' else 'run'} folder>",
              file=sys.stderr)
        return 130
    except Exception as error:  # known user errors get one line; others keep their traceback with -v
        if args.verbose or not is_user_error(error):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2


def quiet_dependencies() -> None:
    """Keep the terminal for mmpeft's own progress and results: dependencies' notices go to debug level."""
    import warnings

    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # optional CPU kernels package notice
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def dispatch(args: argparse.Namespace) -> int:
    import mmpeft

    if args.command == "run":
        if args.recipe is None and args.resume is None:
            raise ValueError("mmpeft run needs a recipe file or --resume RUN_DIR")
        overrides = args.overrides
        if args.resume and args.recipe and "=" in args.recipe:
            overrides = [args.recipe, *overrides]
        mmpeft.run(None if args.resume else args.recipe, overrides, resume=args.resume)
    elif args.command in ("compare", "fewshot"):
        if args.recipe is None and args.resume is None:
            raise ValueError(f"mmpeft {args.command} needs a recipe file or --resume GRID_DIR")
        overrides = args.overrides
        if args.resume and args.recipe and "=" in args.recipe:
            overrides = [args.recipe, *overrides]
        grid = getattr(mmpeft, args.command)
        grid(None if args.resume else args.recipe, overrides, resume=args.resume)
    elif args.command == "check":
        recipe = mmpeft.load_recipe(args.recipe, args.overrides)
        print(recipe.to_yaml(), end="")
    return 0


def is_user_error(error: Exception) -> bool:
    from mmpeft.backbones import BackboneError
    from mmpeft.data import DataError
    from mmpeft.schema import RecipeError
    from mmpeft.train import TrainingDiverged

    return isinstance(error, (RecipeError, DataError, BackboneError, TrainingDiverged, FileNotFoundError,
                              FileExistsError, ValueError))
