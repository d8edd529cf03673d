"""The merge stage: merge CT and SFT models onto their base (mergekit-like methods, TIES-SV).

``python -m workflow.merge --recipe JSON --base DIR --models DIR [DIR ...] --out DIR``
"""

from workflow.merge.engine import merge_models
from workflow.merge.methods import (
    MERGE_METHODS,
    METHOD_PARAMS,
    REQUIRED,
    MergeMethod,
    resolve_merge_spec,
    validate_merge_spec,
)

STAGE_VERSION = "1"
"""Bump when the merge semantics change: it goes into every merge recipe."""

__all__ = [
    "MERGE_METHODS",
    "METHOD_PARAMS",
    "REQUIRED",
    "STAGE_VERSION",
    "MergeMethod",
    "merge_models",
    "resolve_merge_spec",
    "validate_merge_spec",
]
