# Training: SFT of the base, CT per language and budget, and the CT-then-SFT baseline.
# workflow.launch leases resources.gpu device ids (lock files; SLURM's allocation as is) and
# starts one process per GPU (torchrun when more than one). Checkpoints go to a work dir beside
# the output (<parent>/.<name>.work), which is deliberately no output: Snakemake never deletes
# it, so a failed or killed job resumes from its last checkpoint when rerun.


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
        STAGE_ENV + " {PY} -m workflow.launch --gpus {resources.gpu} --threads {threads}"
        " -- workflow.train sft --recipe {params.recipe:q} {params.args}"
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
        STAGE_ENV + " {PY} -m workflow.launch --gpus {resources.gpu} --threads {threads}"
        " -- workflow.train ct --recipe {params.recipe:q} {params.args}"
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
        STAGE_ENV + " {PY} -m workflow.launch --gpus {resources.gpu} --threads {threads}"
        " -- workflow.train sft --recipe {params.recipe:q} {params.args}"
        " --out {output} --threads {threads} > {log} 2>&1"
