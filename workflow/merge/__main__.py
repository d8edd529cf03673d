"""Command line of the merge stage.

    python -m workflow.merge --recipe '<json>' --base BASE_DIR \
        --models CT_DIR [...] SFT_DIR --out OUT_DIR

``--models`` are given in the order of the recipe's "models" list.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from workflow.artifacts import parse_recipe_arg
from workflow.merge.engine import DEFAULT_MAX_SHARD_BYTES, merge_models


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workflow.merge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, type=parse_recipe_arg,
                        help="the merged artifact's recipe, as JSON")
    parser.add_argument("--base", required=True, type=Path, help="base model directory")
    parser.add_argument("--models", required=True, nargs="+", type=Path,
                        help="model directories, in the recipe's 'models' order")
    parser.add_argument("--out", required=True, type=Path, help="output model directory")
    parser.add_argument("--max-shard-bytes", type=int, default=DEFAULT_MAX_SHARD_BYTES,
                        help="largest safetensors shard to write (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    merge_models(args.recipe, args.base, args.models, args.out,
                 max_shard_bytes=args.max_shard_bytes)


if __name__ == "__main__":
    main()
