# Training: SFT of the base, CT per language and budget, and the CT-then-SFT baseline.


rule sft:
    input:
        unpack(get_inputs("sft")),
    output:
        directory(PATTERNS["sft"]),
    params:
        recipe=get_recipe("sft"),
        args=get_args("sft"),
    log:
        log_path("sft"),
    benchmark:
        benchmark_path("sft")
    conda:
        "../envs/train.yaml"
    threads: get_resource("sft", "threads")
    resources:
        mem_mb=get_resource("sft", "mem_mb"),
        gpu=get_resource("sft", "gpu"),
    shell:
        STAGE_ENV + " {PY} -m workflow.train sft --recipe {params.recipe:q} {params.args}"
        " --out {output} --threads {threads} > {log} 2>&1"


rule ct:
    input:
        unpack(get_inputs("ct")),
    output:
        directory(PATTERNS["ct"]),
    params:
        recipe=get_recipe("ct"),
        args=get_args("ct"),
    log:
        log_path("ct"),
    benchmark:
        benchmark_path("ct")
    conda:
        "../envs/train.yaml"
    threads: get_resource("ct", "threads")
    resources:
        mem_mb=get_resource("ct", "mem_mb"),
        gpu=get_resource("ct", "gpu"),
    shell:
        STAGE_ENV + " {PY} -m workflow.train ct --recipe {params.recipe:q} {params.args}"
        " --out {output} --threads {threads} > {log} 2>&1"


rule ctsft:
    input:
        unpack(get_inputs("ctsft")),
    output:
        directory(PATTERNS["ctsft"]),
    params:
        recipe=get_recipe("ctsft"),
        args=get_args("ctsft"),
    log:
        log_path("ctsft"),
    benchmark:
        benchmark_path("ctsft")
    conda:
        "../envs/train.yaml"
    threads: get_resource("sft", "threads")
    resources:
        mem_mb=get_resource("sft", "mem_mb"),
        gpu=get_resource("sft", "gpu"),
    shell:
        STAGE_ENV + " {PY} -m workflow.train sft --recipe {params.recipe:q} {params.args}"
        " --out {output} --threads {threads} > {log} 2>&1"
