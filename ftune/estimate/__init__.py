"""How much memory a recipe's training step needs, and how long it takes: `ftune validate` (and `--measure`).

- step.py: one optimizer step at the recipe's batch and length, shared by what follows.
- simulate.py: the estimate, from running that step on fake tensors (shapes only, no compute).
- measure.py: the same step run for real, its peak memory and time.
- report.py: the table `ftune validate` prints.
"""
