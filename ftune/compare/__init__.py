"""`ftune compare`: several methods trained on one recipe's model, task and data, on one budget, then measured side by
side (trainable parameters, bytes saved, peak memory, tokens/s, wall time, the task metric, the inference cost each
method adds), plotted (metric against cost, the Pareto frontier marked) and summed up in a recommendation.

    plan.py       which methods run, with which recipe each (the method's recommended settings, one budget)
    run.py        runs them one after another, each in its own process (worker.py), reusing and resuming runs
    worker.py     one method: train, then measure peak memory and the cost of a forward
    table.py      the table from the run directories (terminal, Markdown, JSON)
    pareto.py     the Pareto frontier and its plot
    recommend.py  the recommendation drawn from the measured table
"""
