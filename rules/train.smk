# Training: SFT of the base, CT per language and budget, and the CT-then-SFT baseline.
# workflow.launch leases resources.gpu device ids (lock files; SLURM's allocation as is) and
# starts one process per GPU (torchrun when more than one). Checkpoints go to a work dir beside
# the output (<parent>/.<name>.work), which is deliberately no output: Snakemake never deletes
# it, so a failed or killed job resumes from its last checkpoint when rerun.

stage_rules("sft", "ct", "ctsft")
