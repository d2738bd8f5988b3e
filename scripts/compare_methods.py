"""Train several recipes on one budget, one after another, and print a table: accuracy, trainable parameters, seconds.

For comparisons on hardware without a GPU at a reduced step budget (the full 1-epoch runs are
`scripts/device_runs.sh hybrids` on a GPU). Every run is an ordinary `ftune train` with overrides, so its run
directory keeps the full record; the table is also written as JSON.

    python scripts/compare_methods.py --steps 300 --out runs/compare \
        recipes/lora_sst2.yaml recipes/adapter_sst2.yaml recipes/prefix_tuning_sst2.yaml \
        recipes/mam_adapter_sst2.yaml recipes/unipelt_sst2.yaml
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="+", type=Path)
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run (train.max_steps)")
    parser.add_argument("--out", type=Path, default=Path("runs/compare"), help="folder for the runs and table")
    parser.add_argument("--set", action="append", default=[], help="extra dotted.key=value for every run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for recipe in args.recipes:
        run_dir = args.out / recipe.stem
        overrides = [f"train.max_steps={args.steps}", f"train.eval_every={args.steps}", f"output_dir={run_dir}",
                     *args.set]
        command = [sys.executable, "-m", "ftune", "train", str(recipe), "--overwrite"]
        command += [a for o in overrides for a in ("--set", o)]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            rows.append({"recipe": recipe.name, "error": done.stderr.strip().splitlines()[-1:]})
            print(f"{recipe.name}: failed: {rows[-1]['error']}", flush=True)
            continue
        metrics = json.loads((run_dir / "metrics.json").read_text())
        row = {"recipe": recipe.name, "steps": metrics["step"], "accuracy": metrics["validation"].get("accuracy"),
               "validation_loss": metrics["validation"]["loss"], "trainable_params": metrics["trainable_params"],
               "saved_params": _saved_params(run_dir), "train_seconds": metrics["train_seconds"],
               "wall_seconds": round(wall, 1)}
        report = run_dir / "method_report.json"
        if report.is_file():
            row["method_report"] = json.loads(report.read_text())
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "method_report"}), flush=True)
        (args.out / "table.json").write_text(json.dumps(rows, indent=2))
    print("\n| recipe | steps | accuracy | trainable params (saved) | train s |\n|---|---|---|---|---|")
    for r in rows:
        if "error" not in r:
            print(f"| {r['recipe']} | {r['steps']} | {r['accuracy']:.4f} | {r['trainable_params']:,} "
                  f"({r['saved_params']:,}) | {r['train_seconds']:.0f} |")


def _saved_params(run_dir: Path) -> int:
    """Values saved: floating-point entries only (a sparse run's integer indices say where its values go)."""
    from safetensors import safe_open

    with safe_open(str(run_dir / "method.safetensors"), "pt") as f:
        return sum(_numel(f.get_slice(k).get_shape()) for k in f.keys()  # noqa: SIM118 - safe_open is not a dict
                   if f.get_slice(k).get_dtype().startswith(("F", "BF")))


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


if __name__ == "__main__":
    main()
