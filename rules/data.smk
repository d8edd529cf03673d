# Data stage: corpora cut to exact token budgets, and held-out evaluation sets.


rule prepare:
    input:
        unpack(get_inputs("prepare")),
    output:
        directory(PATTERNS["prepare"]),
    params:
        recipe=get_recipe("prepare"),
        args=get_args("prepare"),
    log:
        log_path("prepare"),
    benchmark:
        benchmark_path("prepare")
    # Too little text for a budget fails here, so run these before any training.
    priority: 50
    conda:
        "../envs/data.yaml"
    threads: get_resource("prepare", "threads")
    resources:
        mem_mb=get_resource("prepare", "mem_mb"),
        gpu=get_resource("prepare", "gpu"),
    shell:
        STAGE_ENV + " {PY} -m workflow.data prepare --recipe {params.recipe:q} {params.args}"
        " --out {output} > {log} 2>&1"


rule evalset:
    input:
        unpack(get_inputs("evalset")),
    output:
        directory(PATTERNS["evalset"]),
    params:
        recipe=get_recipe("evalset"),
        args=get_args("evalset"),
    log:
        log_path("evalset"),
    benchmark:
        benchmark_path("evalset")
    conda:
        "../envs/data.yaml"
    threads: get_resource("evalset", "threads")
    resources:
        mem_mb=get_resource("evalset", "mem_mb"),
        gpu=get_resource("evalset", "gpu"),
    shell:
        STAGE_ENV + " {PY} -m workflow.data evalset --recipe {params.recipe:q} {params.args}"
        " --out {output} > {log} 2>&1"
