# Report: scores.csv, methods x languages tables with intervals, the papers' claims checked,
# plots, under results/report/<digest>/ (content-addressed too); results/report/latest points at
# the report of the last successful run. `snakemake --report report.html` gathers the tables
# (tables.html), plots and CSV files into one self-contained HTML report.

report: "../workflow/report/workflow.rst"

REPORT_OPTIONS = dict(
    patterns=["{name}.png", "{name}.html", "{name}.csv"],
    caption="../workflow/report/caption.rst",
    category="lrmerge report",
)

stage_rules("report", report_options=REPORT_OPTIONS)


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
