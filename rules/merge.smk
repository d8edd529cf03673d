# Merging: CT and SFT task vectors combined onto the base, one language or several; a grid of
# hyperparameters in one pass (merge_sweep); or, with merge_options.materialize: false, only the
# diagnostics (merge_diagnostics) while evaluation merges on load.

stage_rules("merge", "merge_sweep", "merge_diagnostics")
