"""Command line of the merge stage.

    python -m workflow.merge --recipe '<json>' --base BASE_DIR \
        --models CT_DIR [...] SFT_DIR --out OUT_DIR

A sweep (several variants over the same inputs, one pass):

    python -m workflow.merge --recipes '[<json>, <json>, ...]' --base BASE_DIR \
        --models CT_DIR [...] SFT_DIR --outs OUT_DIR OUT_DIR ...

The workflow's sweep job gives the sweep's own recipe (stage ``merge_sweep``, its variants
inside) with ``--recipe``, the sweep directory with ``--out`` and the variants' directories,
inside it, with ``--outs``: the whole sweep is then published at once, so a killed sweep never
leaves a sweep directory that looks finished.

``--models`` are given in the order of the recipes' "models" lists. A bad input (a corrupt or
truncated checkpoint, NaN/Inf weights without ``--allow-nonfinite``, tensors that do not match)
exits with status 1 and one line on stderr naming the file and tensor at fault.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path

from workflow.artifacts import atomic_dir, parse_recipe_arg, write_recipe
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
    parser.add_argument("--out", type=Path,
                        help="output model directory (with --recipe), or a sweep's directory")
    parser.add_argument("--outs", nargs="+", type=Path,
                        help="output directories, one per recipe of --recipes or of a sweep")
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
    sweep = args.recipe if args.recipe and args.recipe["stage"] == "merge_sweep" else None
    if sweep:
        recipes = sweep["variants"]
        if args.out is None or not args.outs:
            parser.error("a merge_sweep recipe needs --out (the sweep) and --outs (its variants)")
        if any(args.out not in out.parents for out in args.outs):
            parser.error(f"every --outs directory must lie inside --out {args.out}")
    else:
        recipes = [args.recipe] if args.recipe is not None else args.recipes
        if (args.out is None) == (args.outs is None):
            parser.error("give either --out or --outs")
    out_dirs = [args.out] if args.out is not None and not sweep else args.outs
    if len(recipes) != len(out_dirs):
        parser.error(f"{len(recipes)} recipes but {len(out_dirs)} output directories")
    if args.diagnostics_only and args.no_diagnostics:
        parser.error("--diagnostics-only and --no-diagnostics exclude each other")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        with contextlib.ExitStack() as stack:
            if sweep:  # the variants are built inside the sweep's temporary directory
                tmp = stack.enter_context(atomic_dir(args.out, manifest=False))
                out_dirs = [tmp / out.relative_to(args.out) for out in out_dirs]
            merge_many(recipes, args.base, args.models, out_dirs,
                       max_shard_bytes=args.max_shard_bytes, device=args.device,
                       diagnostics=not args.no_diagnostics, weights=not args.diagnostics_only,
                       allow_nonfinite=args.allow_nonfinite)
            if sweep:  # each variant has its own manifest; the sweep is complete with it
                write_recipe(tmp, sweep)
    except (ValueError, OSError) as error:
        # Bad inputs and a full disk: their messages name the file (and tensor); a traceback
        # would only bury them in the job's log.
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
