# lrmerge: teach LLMs low-resource languages by continual pre-training and model merging.
# Wiring only: config + validation, the plan, the rule files (each stage's rule comes from the
# stage table, workflow/stages.py), rule all.
from snakemake.utils import min_version

min_version("9.0")

# The config: config.yaml, unless --configfile names others (which then replace it rather than
# merge into it); --config KEY=VALUE overrides either. Loaded and validated in common.smk.

include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/models.smk"
include: "rules/train.smk"
include: "rules/merge.smk"
include: "rules/evaluate.smk"
include: "rules/report.smk"


rule all:
    input:
        get_final_targets(),
    default_target: True

