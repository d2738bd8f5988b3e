"""Measured evaluation speed-up of a shrunk classifier: forward time over the SST-2 validation set, model A vs B.

    python scripts/shrink_speed.py runs/shrink_sst2_merged runs/full_sst2_merged
    python scripts/shrink_speed.py A B --batch 64 --max-length 64 --rounds 5 --data ../shared/data/sst2/validation.tsv

A and B are plain transformers classifier folders (`ftune merge` output). The rows are tokenised once, up to
--max-length tokens, and run in file order, --batch rows per forward, each batch padded to its longest row (as
`ftune eval` batches them: twice the recipes' batch size 32), in eval mode without gradients. After one warm-up pass
each, rounds alternate between the two models (so a busy machine slows both alike) and the median round is reported,
with accuracy as a check that each folder is the trained model, and the torch thread count.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer


def batches(folder: str, rows: list[dict], batch: int, max_length: int) -> list[dict]:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return [
        tokenizer(
            [r["sentence"] for r in rows[i : i + batch]],
            truncation=True,
            max_length=max_length,
            padding=True,
            return_tensors="pt",
        )
        for i in range(0, len(rows), batch)
    ]


@torch.no_grad()
def one_pass(model, encoded: list[dict]) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    predictions = torch.cat([model(**b).logits.argmax(-1) for b in encoded])
    return time.perf_counter() - start, predictions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/sst2/validation.tsv"))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with open(args.data, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    labels = torch.tensor([int(r["label"]) for r in rows])
    folders = {"a": args.a, "b": args.b}
    models = {k: AutoModelForSequenceClassification.from_pretrained(f).eval() for k, f in folders.items()}
    encoded = {k: batches(f, rows, args.batch, args.max_length) for k, f in folders.items()}
    seconds: dict[str, list[float]] = {"a": [], "b": []}
    accuracy = {}
    for k in folders:  # warm-up
        _, predictions = one_pass(models[k], encoded[k])
        accuracy[k] = (predictions == labels).float().mean().item()
    for _ in range(args.rounds):
        for k in folders:
            seconds[k].append(one_pass(models[k], encoded[k])[0])
    median = {k: statistics.median(v) for k, v in seconds.items()}
    print(
        json.dumps(
            {
                "rows": len(rows),
                "batch": args.batch,
                "max_length": args.max_length,
                "threads": torch.get_num_threads(),
                **{
                    k: {
                        "folder": folders[k],
                        "blocks": models[k].config.num_hidden_layers,
                        "accuracy": round(accuracy[k], 4),
                        "median_s": round(median[k], 3),
                        "rounds_s": [round(s, 3) for s in seconds[k]],
                    }
                    for k in folders
                },
                "speed_up_b_over_a": round(median["b"] / median["a"], 3),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
