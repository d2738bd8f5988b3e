"""The memory estimate of `ftune validate` against a measurement, for the shipped recipes: a Markdown table.

    .venv/bin/python scripts/estimate_table.py                      # every recipe in recipes/
    .venv/bin/python scripts/estimate_table.py recipes/lora_sst2.yaml recipes/full_sst2.yaml --max-peak-gib 4
    .venv/bin/python scripts/estimate_table.py recipes/lora_sst2.yaml --set train.gradient_checkpointing=true

For each recipe: the estimated memory of a training step on top of the weights, the measured one (a few real steps
at the recipe's batch and data.max_length, on this machine: `ftune validate --measure`), their ratio, the estimated
peak with the weights, the rise of the process's resident memory, and the time per step. A recipe whose estimated
peak exceeds --max-peak-gib is measured at half its batch size, then half again, until it fits (the note says so).
A recipe that cannot run here (no GPU, a model or data that is not available, a stage-1 run it reads not trained
yet) is listed with the reason.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

from ftune import assemble
from ftune.errors import FtuneError
from ftune.estimate.report import estimate_recipe
from ftune.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*", type=Path, help="default: every recipe in recipes/")
    parser.add_argument(
        "--max-peak-gib",
        type=float,
        default=3.0,
        help="halve the batch until the estimated peak fits (the machine is shared)",
    )
    parser.add_argument("--steps", type=int, default=2, help="timed steps after the measured ones")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="override a field of every recipe, e.g. train.gradient_checkpointing=true",
    )
    args = parser.parse_args()
    recipes = args.recipes or sorted((ROOT / "recipes").glob("*.yaml"))
    print(
        "| recipe | batch × tokens | estimated step | measured step | estimate / measured | estimated peak with "
        "weights | resident rise | s / step | note |\n|---|---|---|---|---|---|---|---|---|"
    )
    for path in recipes:
        print(row(path, args.overrides, args.max_peak_gib, args.steps), flush=True)
        gc.collect()


def row(path: Path, overrides: list[str], max_peak_gib: float, steps: int) -> str:
    name = path.stem + "".join(f" ({o})" for o in overrides)
    try:
        recipe = load_recipe(path, overrides)
        if reason := cannot_run_here(recipe):
            return f"| {name} | | | | | | | | skipped: {reason} |"
        note, batch = "", recipe.train.batch_size
        while True:
            print(f"{name}: estimating at batch {batch}", file=sys.stderr, flush=True)
            recipe = load_recipe(path, [*overrides, f"train.batch_size={batch}"])
            built = build(recipe)
            e = estimate_recipe(*built, both_ways=False)
            if e.peak <= max_peak_gib * 2**30 or batch == 1:
                break
            note += f"at batch {batch} the estimated peak is {gib(e.peak)} > {max_peak_gib:g} GiB; "
            batch //= 2
            del built, e
            gc.collect()
        print(f"{name}: measuring at batch {batch}", file=sys.stderr, flush=True)
        e = estimate_recipe(*built, measure_steps=steps, both_ways=False)
    except FtuneError as error:
        return f"| {name} | | | | | | | | skipped: {error} |"
    m = e.measured
    rows, length, accum = e.batch
    shape = f"{rows} × {length}" + (f" (× {accum} micro-batches)" if accum > 1 else "")
    if note:
        note += f"measured at batch {batch} (the recipe's: {load_recipe(path, overrides).train.batch_size})"
    resident = mib(m.resident_rise) if m.resident_rise is not None else "n/a"
    return (
        f"| {name} | {shape} | {mib(e.step.peak)} | {mib(m.peak)} | {e.step.peak / m.peak:.4f} | {mib(e.peak)} | "
        f"{resident} | {m.seconds_per_step:.2f} | {note} |"
    )


def cannot_run_here(recipe) -> str | None:
    t = recipe.train
    if not torch.cuda.is_available():
        if t.precision == "fp16":
            return "train.precision fp16 needs a CUDA GPU"
        if t.distributed == "fsdp":
            return "FSDP needs CUDA GPUs"
    return None


def build(recipe):
    source, tokenizer = assemble.source_and_tokenizer(recipe)
    rows = assemble.read_split(recipe, "train")
    names = assemble.label_names(recipe, rows)
    return recipe, assemble.build_model(recipe, source, tokenizer, names), tokenizer, names, rows


def mib(size: int) -> str:
    return f"{size / 2**20:,.1f} MiB"


def gib(size: int) -> str:
    return f"{size / 2**30:,.2f} GiB"


if __name__ == "__main__":
    main()
