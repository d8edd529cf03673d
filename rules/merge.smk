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
        LAUNCH_ONE + " workflow.merge --recipe {params.recipe:q} {params.args}"
        " --out {output} > {log} 2>&1"


rule merge_sweep:
    # Every variant of a hyperparameter grid over the same inputs, in one pass.
    input:
        unpack(get_inputs("merge_sweep")),
    output:
        directory(PATTERNS["merge_sweep"]),
    params:
        recipes=get_sweep_recipes,
        args=get_args("merge_sweep"),
    log:
        log_path("merge_sweep"),
    benchmark:
        benchmark_path("merge_sweep")
    conda:
        "../envs/merge.yaml"
    threads: get_resource("merge", "threads")
    resources:
        mem_mb=get_resource("merge", "mem_mb"),
        gpu=get_resource("merge", "gpu"),
    shell:
        LAUNCH_ONE + " workflow.merge --recipes {params.recipes:q} {params.args}"
        " > {log} 2>&1"


rule merge_diagnostics:
    # merge_options.materialize: false: the merge's diagnostics, no weights (evaluation merges
    # on load).
    input:
        unpack(get_inputs("merge_diagnostics")),
    output:
        directory(PATTERNS["merge_diagnostics"]),
    params:
        recipe=get_recipe("merge_diagnostics"),
        args=get_args("merge_diagnostics"),
    log:
        log_path("merge_diagnostics"),
    benchmark:
        benchmark_path("merge_diagnostics")
    conda:
        "../envs/merge.yaml"
    threads: get_resource("merge", "threads")
    resources:
        mem_mb=get_resource("merge", "mem_mb"),
        gpu=get_resource("merge", "gpu"),
    shell:
        LAUNCH_ONE + " workflow.merge --diagnostics-only --recipe {params.recipe:q}"
        " {params.args} --out {output} > {log} 2>&1"
