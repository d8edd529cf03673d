# Data stage: corpora cut to exact token budgets (prepare), and held-out evaluation sets
# (evalset). Each rule is defined from the stage table (workflow/stages.py) by stage_rules().

stage_rules("prepare", "evalset")
