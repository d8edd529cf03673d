# Report: scores.csv, paper-style tables and plots over every evaluated model.


rule report:
    input:
        scores=[artifact.path for artifact in PLAN.evaluations],
        models=[artifact.path for artifact in PLAN.trained],
        diagnosed=PLAN.diagnosed,
    output:
        **REPORT_FILES,
    params:
        metrics=[f"{artifact.path}/metrics.json" for artifact in PLAN.trained],
        diagnostics=[f"{path}/diagnostics.json" for path in PLAN.merged],
        outdir=os.path.dirname(REPORT_FILES["scores"]),
    log:
        "logs/report/report.log",
    benchmark:
        "benchmarks/report/report.tsv"
    conda:
        "../envs/report.yaml"
    threads: get_resource("report", "threads")
    resources:
        mem_mb=get_resource("report", "mem_mb"),
        gpu=get_resource("report", "gpu"),
    shell:
        STAGE_ENV + " {PY} -m workflow.report --scores {input.scores:q}"
        " --train-metrics {params.metrics:q} --diagnostics {params.diagnostics:q}"
        " --out {params.outdir} > {log} 2>&1"
