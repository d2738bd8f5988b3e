"""Train several recipes as they are (each its own method settings and learning rate) on one step budget, one after
another, and write the table `ftune compare` writes (comparison.md, comparison.json, pareto.png in --out).

`ftune compare RECIPE --methods ...` compares methods on one recipe, each with its recommended settings; this script
compares recipes: two settings of one method, or methods tuned by hand. It runs on `ftune compare`'s parts
(ftune/compare/): each recipe in its own worker process, finished runs reused and interrupted ones resumed.

    python scripts/compare_methods.py --steps 300 --out runs/c16_sparse \\
        recipes/sparse_fisher_sst2.yaml recipes/lora_sst2.yaml
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ftune import rundir
from ftune.compare import pareto, table
from ftune.compare.run import ACTIONS, launch, state_of, write_recipe
from ftune.recipe import dump_recipe, load_recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="+", type=Path)
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run (train.max_steps)")
    parser.add_argument("--out", type=Path, default=Path("runs/compare"), help="folder for the runs and table")
    parser.add_argument("--set", action="append", default=[], help="extra dotted.key=value for every run")
    args = parser.parse_args()
    recipes = {
        path.stem: load_recipe(
            path,
            [
                f"train.max_steps={args.steps}",
                f"train.eval_every={args.steps}",
                f"output_dir={args.out / path.stem}",
                *args.set,
            ],
        )
        for path in args.recipes
    }
    states = {name: state_of(Path(r.output_dir), dump_recipe(r)) for name, r in recipes.items()}
    failed = {}
    for name, recipe in recipes.items():
        what, flags = ACTIONS[states[name]]
        print(f"{name}: {what}", flush=True)
        if flags is not None and (outcome := launch(write_recipe(args.out, name, recipe), flags))[0]:
            failed[name] = outcome[1]
    metric, mode = table.metric_of(next(iter(recipes.values())))
    rows = [table.read_row(n, r, metric, mode) for n, r in recipes.items() if n not in failed]
    ctx = table.context(Path(", ".join(str(p) for p in args.recipes)), f"{args.steps} steps", metric, mode)
    rundir.write_text(args.out / "comparison.md", table.markdown(rows, ctx, {}, failed, []))
    rundir.write_json(args.out / "comparison.json", {**ctx, "rows": rows, "failed": failed})
    if rows:
        pareto.plot(rows, metric, mode, args.out / "pareto.png")
    print((args.out / "comparison.md").read_text())


if __name__ == "__main__":
    main()
