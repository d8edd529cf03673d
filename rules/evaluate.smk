# Evaluation: one job per model and group of suites (one model load), scored by lm-eval.
# Jobs start through workflow.launch so that GPU jobs lease their device ids.

stage_rules("evaluate")
