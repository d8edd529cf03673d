# Evaluation: one job per model and group of suites (one model load), scored by lm-eval.
# Jobs start through workflow.launch so that GPU jobs lease their device ids.


rule evaluate:
    input:
        unpack(get_inputs("evaluate")),
    output:
        PATTERNS["evaluate"],
    params:
        recipe=get_recipe("evaluate"),
        args=get_args("evaluate"),
    log:
        log_path("evaluate"),
    benchmark:
        benchmark_path("evaluate")
    conda:
        "../envs/evaluate.yaml"
    threads: get_resource("evaluate", "threads")
    resources:
        mem_mb=get_resource("evaluate", "mem_mb"),
        gpu=get_resource("evaluate", "gpu"),
    shell:
        LAUNCH_ONE + " workflow.evaluate --recipe {params.recipe:q} {params.args}"
        " --out {output} --threads {threads} > {log} 2>&1"
