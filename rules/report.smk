# Report: scores.csv, paper-style tables and plots over every evaluated model, under
# results/report/<digest>/ (content-addressed too); results/report/latest points at the
# report of the last successful run.

stage_rules("report")


rule verify:
    # `snakemake verify`: check every artifact under results/ against its manifest.
    localrule: True
    params:
        command=f"{JOB_ENV} {PY} -m workflow.artifacts verify results",
    log:
        "logs/verify.log",
    conda:
        "../envs/report.yaml"
    shell:
        "{params.command} 2>&1 | tee {log}"
