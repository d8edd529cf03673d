# Model sources: a scratch tokenizer and pretrained tiny Llama, or an imported hub/GGUF model.


rule tokenizer:
    input:
        unpack(get_inputs("tokenizer")),
    output:
        directory(PATTERNS["tokenizer"]),
    params:
        recipe=get_recipe("tokenizer"),
        args=get_args("tokenizer"),
    log:
        log_path("tokenizer"),
    benchmark:
        benchmark_path("tokenizer")
    conda:
        "../envs/models.yaml"
    threads: get_resource("tokenizer", "threads")
    resources:
        mem_mb=get_resource("tokenizer", "mem_mb"),
        gpu=get_resource("tokenizer", "gpu"),
    shell:
        STAGE_ENV + " {PY} -m workflow.models tokenizer --recipe {params.recipe:q} {params.args}"
        " --out {output} > {log} 2>&1"


rule pretrain:
    input:
        unpack(get_inputs("pretrain")),
    output:
        directory(PATTERNS["pretrain"]),
    params:
        recipe=get_recipe("pretrain"),
        args=get_args("pretrain"),
    log:
        log_path("pretrain"),
    benchmark:
        benchmark_path("pretrain")
    conda:
        "../envs/train.yaml"
    threads: get_resource("pretrain", "threads")
    resources:
        mem_mb=get_resource("pretrain", "mem_mb"),
        gpu=get_resource("pretrain", "gpu"),
    shell:
        STAGE_ENV + " {PY} -m workflow.launch --gpus {resources.gpu} --threads {threads}"
        " -- workflow.train pretrain --recipe {params.recipe:q} {params.args}"
        " --out {output} --threads {threads} > {log} 2>&1"


rule import_hf:
    output:
        directory(PATTERNS["import_hf"]),
    params:
        recipe=get_recipe("import_hf"),
    log:
        log_path("import_hf"),
    benchmark:
        benchmark_path("import_hf")
    conda:
        "../envs/models.yaml"
    threads: get_resource("import", "threads")
    resources:
        mem_mb=get_resource("import", "mem_mb"),
        gpu=get_resource("import", "gpu"),
    shell:
        STAGE_ENV + " {PY} -m workflow.models hf --recipe {params.recipe:q} --out {output} > {log} 2>&1"


rule import_gguf:
    output:
        directory(PATTERNS["import_gguf"]),
    params:
        recipe=get_recipe("import_gguf"),
    log:
        log_path("import_gguf"),
    benchmark:
        benchmark_path("import_gguf")
    conda:
        "../envs/models.yaml"
    threads: get_resource("import", "threads")
    resources:
        mem_mb=get_resource("import", "mem_mb"),
        gpu=get_resource("import", "gpu"),
    shell:
        STAGE_ENV + " {PY} -m workflow.models gguf --recipe {params.recipe:q} --out {output} > {log} 2>&1"
