"""SST-2 LoRA on all-MiniLM-L6-v2, end to end on CPU: ftune against transformers' Trainer + peft, one run.

    nice -n 5 .venv/bin/python scripts/bench_sst2_cpu.py                 # 200 steps of batch 32 (6,400 examples)
    nice -n 5 .venv/bin/python scripts/bench_sst2_cpu.py --steps 300 --repeat 2 --out sst2.json

Both sides train the same model (sentence-transformers/all-MiniLM-L6-v2, as ftune resolves it), on the same data
(../shared/data/sst2, max_length 64), with the same LoRA (r 8, alpha 16, dropout 0, every body linear: ftune's
`all-linear` selection passed to peft by name; the new classifier trains fully), schedule (lr 1e-3, linear decay,
warmup 6%, AdamW, clip 1.0, seed 0) and number of optimizer steps. The peer is Trainer as users run it: rows read
with `datasets`, tokenised with `Dataset.map` (every run: its map cache is off, as a first run), batches padded per
batch by DataCollatorWithPadding, Trainer's defaults otherwise. ftune runs recipes/lora_sst2.yaml with only
max_steps and output_dir overridden: once with an empty encoded-data cache (it tokenises), once with that cache
filled, and once filled but with train.group_by_length false (what grouping alone is worth).

Each side is its own process. `work s` is measured inside it, from before the tokenizer and data are loaded to after
the final validation accuracy (model loading, reading, tokenisation, training, evaluation; not the Python imports);
examples/s = steps x batch / work s. `train s` is the training loop alone. Peak RSS is the process's high-water mark
(libraries included), CPU s its user + system time. The ratio is the peer's work s over the side's.
Dev-only: ftune never imports this file.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import tempfile
import time
from pathlib import Path

from bench_common import machine, markdown, run_side, self_usage

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DATA = Path("../shared/data/sst2")
SIDES = ("peer", "ftune", "ftune-cached", "ftune-ungrouped")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--repeat", type=int, default=1, help="rounds; odd rounds run the peer last")
    p.add_argument("--sides", default=",".join(SIDES))
    p.add_argument("--out", default=None, help="also write every number to this JSON file")
    p.add_argument("--side", choices=SIDES, default=None, help="(internal) run one side in this process")
    p.add_argument("--cache", default=None, help="(internal) the encoded-data cache folder")
    return p.parse_args()


def peer_side(args: argparse.Namespace) -> dict:
    import datasets
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from ftune.methods.lora import target_linears
    from ftune.models import resolve_model

    start = time.perf_counter()
    source = resolve_model(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(source)
    raw = datasets.load_dataset(
        "csv",
        data_files={s: str(DATA / f"{s}.tsv") for s in ("train", "validation")},
        delimiter="\t",
        quoting=csv.QUOTE_NONE,
        keep_default_na=False,
    )
    encoded = raw.map(
        lambda b: tokenizer(b["sentence"], truncation=True, max_length=args.max_length),
        batched=True,
        load_from_cache_file=False,
        remove_columns=["sentence"],
    )
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=2)
    targets = sorted(target_linears(model, "all-linear"))
    model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets, modules_to_save=["classifier"])
    )
    with tempfile.TemporaryDirectory() as out:
        settings = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=args.batch,
            per_device_eval_batch_size=2 * args.batch,
            learning_rate=1e-3,
            max_steps=args.steps,
            warmup_steps=round(0.06 * args.steps),
            lr_scheduler_type="linear",
            weight_decay=0.0,
            max_grad_norm=1.0,
            seed=0,
            logging_steps=50,
            save_strategy="no",
            eval_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=model, args=settings, train_dataset=encoded["train"], data_collator=DataCollatorWithPadding(tokenizer)
        )
        train_s = trainer.train().metrics["train_runtime"]
        predicted = trainer.predict(encoded["validation"])
    accuracy = float((predicted.predictions.argmax(-1) == predicted.label_ids).mean())
    return {"work_s": time.perf_counter() - start, "train_s": train_s, "accuracy": accuracy}


def ftune_side(args: argparse.Namespace) -> dict:
    from rich.console import Console

    from ftune.recipe import load_recipe
    from ftune.run.train import train

    start = time.perf_counter()
    overrides = [
        f"train.max_steps={args.steps}",
        f"train.batch_size={args.batch}",
        f"data.max_length={args.max_length}",
    ]
    if args.side == "ftune-ungrouped":
        overrides.append("train.group_by_length=false")
    with tempfile.TemporaryDirectory() as out:
        recipe = load_recipe("recipes/lora_sst2.yaml", [*overrides, f"output_dir={out}/run"])
        result = train(recipe, console=Console(file=io.StringIO()))
    return {
        "work_s": time.perf_counter() - start,
        "train_s": result["train_seconds"],
        "accuracy": result["validation"]["accuracy"],
    }


def main() -> None:
    args = parse_args()
    if args.side:  # a child: one side, one JSON line
        import os

        os.environ["FTUNE_ENCODED_CACHE"] = args.cache
        result = peer_side(args) if args.side == "peer" else ftune_side(args)
        print(json.dumps({**result, **self_usage()}))
        return
    sides = [s for s in args.sides.split(",") if s]
    common = ["--steps", str(args.steps), "--batch", str(args.batch), "--max-length", str(args.max_length)]
    rows = []
    for round_ in range(args.repeat):
        order = [s for s in sides if s != "peer"]
        order = (["peer"] if "peer" in sides and round_ % 2 == 0 else []) + order
        order += ["peer"] if "peer" in sides and round_ % 2 == 1 else []
        with tempfile.TemporaryDirectory() as cache:  # empty for "ftune", filled by it for the cached sides
            for side in order:
                print(f"round {round_ + 1}: {side} ...", file=sys.stderr, flush=True)
                rows.append(
                    {
                        "side": side,
                        "round": round_ + 1,
                        **run_side(Path(__file__), ["--side", side, "--cache", cache, *common]),
                    }
                )
    examples = args.steps * args.batch
    peer = {r["round"]: r["work_s"] for r in rows if r["side"] == "peer"}
    for row in rows:
        row["examples_per_s"] = examples / row["work_s"]
        row["train_examples_per_s"] = examples / row["train_s"]
        row["ratio"] = peer[row["round"]] / row["work_s"] if row["round"] in peer else None
    columns = [
        ("side", "side", ""),
        ("round", "round", "d"),
        ("examples/s", "examples_per_s", ".1f"),
        ("work s", "work_s", ".1f"),
        ("train s", "train_s", ".1f"),
        ("train examples/s", "train_examples_per_s", ".1f"),
        ("CPU s", "cpu_s", ".0f"),
        ("peak RSS MiB", "rss_mib", ".0f"),
        ("accuracy", "accuracy", ".4f"),
        ("x peer", "ratio", ".2f"),
        ("load at start", "load_at_start", ".1f"),
    ]
    print(
        f"\nSST-2 LoRA r8 all-linear, all-MiniLM-L6-v2, {args.steps} steps x batch {args.batch} "
        f"({examples:,} examples), max_length {args.max_length} | {machine()}\n"
    )
    print(markdown(rows, columns))
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
