# Merging: CT and SFT task vectors combined onto the base, one language or several.


rule merge:
    input:
        unpack(get_inputs("merge")),
    output:
        directory(PATTERNS["merge"]),
    params:
        recipe=get_recipe("merge"),
        args=get_args("merge"),
    log:
        log_path("merge"),
    benchmark:
        benchmark_path("merge")
    conda:
        "../envs/merge.yaml"
    threads: get_resource("merge", "threads")
    resources:
        mem_mb=get_resource("merge", "mem_mb"),
        gpu=get_resource("merge", "gpu"),
    shell:
        STAGE_ENV + " {PY} -m workflow.merge --recipe {params.recipe:q} {params.args}"
        " --out {output} > {log} 2>&1"
