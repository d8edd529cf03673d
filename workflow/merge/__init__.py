"""The merge stage: merge CT and SFT models onto their base (mergekit-like methods, TIES-SV).

``python -m workflow.merge --recipe JSON --base DIR --models DIR [DIR ...] --out DIR``
(sweeps: ``--recipes JSON_LIST ... --outs DIR [DIR ...]``)

The registry and its validation live in ``workflow.merge.methods``; reading and writing
checkpoints in ``workflow.merge.engine``. Nothing is imported here, so that validating a config
does not load the engine.
"""

# One version for the merge engine: merges, sweeps and diagnostics-only passes share its code.
# Bump when a change here changes what a stage writes (see workflow/stages.py).
STAGE_VERSIONS = {"merge": "2"}
