"""Command line of the merge stage.

    python -m workflow.merge --recipe '<json>' --base BASE_DIR \
        --models CT_DIR [...] SFT_DIR --out OUT_DIR

A sweep (several variants over the same inputs, one pass):

    python -m workflow.merge --recipes '[<json>, <json>, ...]' --base BASE_DIR \
        --models CT_DIR [...] SFT_DIR --outs OUT_DIR OUT_DIR ...

``--models`` are given in the order of the recipes' "models" lists. A bad input (a corrupt or
truncated checkpoint, NaN/Inf weights without ``--allow-nonfinite``, tensors that do not match)
exits with status 1 and one line on stderr naming the file and tensor at fault.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from workflow.artifacts import parse_recipe_arg
from workflow.merge.engine import DEFAULT_MAX_SHARD_BYTES, merge_many


def _recipe_list(text: str) -> list[dict]:
    value = json.loads(text)
    if not isinstance(value, list) or not value:
        raise ValueError("--recipes must be a non-empty JSON list of recipe objects")
    return [parse_recipe_arg(json.dumps(item)) for item in value]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workflow.merge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--recipe", type=parse_recipe_arg,
                       help="the merged artifact's recipe, as JSON")
    which.add_argument("--recipes", type=_recipe_list,
                       help="a JSON list of recipes over the same inputs (a sweep)")
    parser.add_argument("--base", required=True, type=Path, help="base model directory")
    parser.add_argument("--models", required=True, nargs="+", type=Path,
                        help="model directories, in the recipe's 'models' order")
    outs = parser.add_mutually_exclusive_group(required=True)
    outs.add_argument("--out", type=Path, help="output model directory (with --recipe)")
    outs.add_argument("--outs", nargs="+", type=Path,
                      help="output directories, one per recipe of --recipes")
    parser.add_argument("--max-shard-bytes", type=int, default=DEFAULT_MAX_SHARD_BYTES,
                        help="largest safetensors shard to write (default: %(default)s)")
    parser.add_argument("--device", default=None,
                        help="torch device for the math (default: cuda when present, else cpu)")
    parser.add_argument("--no-diagnostics", action="store_true",
                        help="skip diagnostics.json (faster)")
    parser.add_argument("--diagnostics-only", action="store_true",
                        help="compute the merge for diagnostics.json and write no weights "
                        "(merge_options.materialize: false)")
    parser.add_argument("--allow-nonfinite", action="store_true",
                        help="merge inputs holding NaN/Inf weights instead of refusing them "
                        "(config: integrity.allow_nonfinite)")
    args = parser.parse_args(argv)
    recipes = [args.recipe] if args.recipe is not None else args.recipes
    out_dirs = [args.out] if args.out is not None else args.outs
    if len(recipes) != len(out_dirs):
        parser.error(f"{len(recipes)} recipes but {len(out_dirs)} output directories")
    if args.diagnostics_only and args.no_diagnostics:
        parser.error("--diagnostics-only and --no-diagnostics exclude each other")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        merge_many(recipes, args.base, args.models, out_dirs,
                   max_shard_bytes=args.max_shard_bytes, device=args.device,
                   diagnostics=not args.no_diagnostics, weights=not args.diagnostics_only,
                   allow_nonfinite=args.allow_nonfinite)
    except (ValueError, OSError) as error:
        # Bad inputs and a full disk: their messages name the file (and tensor); a traceback
        # would only bury them in the job's log.
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
