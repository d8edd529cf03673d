# Model sources: a scratch tokenizer and pretrained tiny Llama, or an imported hub/GGUF model.

stage_rules("tokenizer", "pretrain", "import_hf", "import_gguf")
