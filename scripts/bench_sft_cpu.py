"""SFT LoRA on SmolLM2-135M-Instruct, end to end on CPU: ftune against transformers' Trainer + peft, one run.

    nice -n 5 .venv/bin/python scripts/bench_sft_cpu.py                  # 6 steps of 8 x 2 rows (96 examples)
    nice -n 5 .venv/bin/python scripts/bench_sft_cpu.py --steps 10 --sides peer,ftune --out sft.json

Both sides train HuggingFaceTB/SmolLM2-135M-Instruct (as ftune resolves it offline: the dequantised GGUF) on
../shared/data/instructions with recipes/lora_sft_smollm2.yaml's settings: the chat template, loss on the response
tokens only, max_length 512, LoRA r 16, alpha 32, dropout 0.05 on q/k/v/o/gate/up/down, batch 8 x grad_accum 2,
lr 2e-4 cosine with 3% warmup, AdamW, clip 1.0, seed 0, the same number of optimizer steps. The peer tokenises with
ftune's own SFT encoder (the identical tokens and labels; its time counts on the peer's side), pads per batch with
DataCollatorForSeq2Seq (labels padded with -100) and otherwise runs Trainer's defaults; its loss is transformers'
causal-LM loss over full logits (Trainer passes the step's token count, so accumulation weighs tokens as ftune does).
ftune runs the recipe with only max_steps, output_dir and the evaluation set overridden: as it is (length-grouped
batches, the loss from hidden states on the response positions only), with data.packing, with
train.group_by_length false (the hidden-state loss alone), and with neither (the loss from full logits, by a
bench-only patch of ftune.kernels.linear_ce.training_task: ftune's loop as it was before grouping and the hidden route).

Tokens are input tokens without padding (ftune's metrics.json train_tokens; Trainer's num_input_tokens_seen with
non_padding); tokens/s divides them by the training loop's seconds. `work s` runs from before the tokenizer and data
load to after the final evaluation (not the Python imports). The final metric is the mean cross-entropy per response
token of the first --eval-rows validation rows, computed the same way on both sides (batches of 4 rows, full logits:
evaluation is not what is compared). Peak RSS is the process's high-water mark, CPU s its user + system time.
Dev-only: ftune never imports this file.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import tempfile
import time
from pathlib import Path

from bench_common import machine, markdown, run_side, self_usage

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
RECIPE = "recipes/lora_sft_smollm2.yaml"
SIDES = ("peer", "ftune", "ftune-packed", "ftune-ungrouped", "ftune-ungrouped-logits")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EVAL_BATCH = 4


# the length the README's table was measured at (the recipe trains at 1024); the rows whose prompt fills 512 tokens
# are left out on both sides alike
PINNED = ["data.max_length=512", "data.allow_truncation=true"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--eval-rows", type=int, default=48)
    p.add_argument("--sides", default=",".join(SIDES))
    p.add_argument("--out", default=None, help="also write every number to this JSON file")
    p.add_argument("--side", choices=SIDES, default=None, help="(internal) run one side in this process")
    p.add_argument("--cache", default=None, help="(internal) the encoded-data cache folder")
    return p.parse_args()


def peer_side(args: argparse.Namespace) -> dict:
    import datasets
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    from ftune.data.sources import Rows
    from ftune.models import resolve_model
    from ftune.recipe import load_recipe
    from ftune.tasks.causal_lm import encode_sft

    start = time.perf_counter()
    d = load_recipe(RECIPE, PINNED).data
    source = resolve_model(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(source)

    def encoded(split: str, limit: int | None = None) -> list[dict]:
        rows = datasets.load_dataset("json", data_files=f"../shared/data/instructions/{split}.jsonl", split="train")
        rows = Rows(rows.to_list()[:limit], split)
        examples, _, _ = encode_sft(
            rows, tokenizer, d.instruction_column, d.input_column, d.response_column, d.template, d.max_length
        )
        return examples

    train_set, val_set = datasets.Dataset.from_list(encoded("train")), encoded("validation", args.eval_rows)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM")
    )
    with tempfile.TemporaryDirectory() as out:
        settings = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=8,
            gradient_accumulation_steps=2,
            learning_rate=2e-4,
            max_steps=args.steps,
            warmup_steps=round(0.03 * args.steps),
            lr_scheduler_type="cosine",
            weight_decay=0.0,
            max_grad_norm=1.0,
            seed=0,
            logging_steps=1,
            save_strategy="no",
            eval_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            include_num_input_tokens_seen="non_padding",
        )
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
        trainer = Trainer(model=model, args=settings, train_dataset=train_set, data_collator=collator)
        train_s = trainer.train().metrics["train_runtime"]
        tokens = trainer.state.num_input_tokens_seen
    loss = _response_loss(model, val_set, collator)
    return {"work_s": time.perf_counter() - start, "train_s": train_s, "tokens": tokens, "val_loss": loss}


def _response_loss(model, examples: list[dict], collator) -> float:
    """Mean next-token cross-entropy over the response tokens of `examples` (as ftune's causal-LM scorer)."""
    import torch
    import torch.nn.functional as F

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for first in range(0, len(examples), EVAL_BATCH):
            batch = collator(examples[first : first + EVAL_BATCH])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            total += F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum"
            ).item()
            count += int((labels != -100).sum())
    return total / count


def ftune_side(args: argparse.Namespace) -> dict:
    from rich.console import Console

    from ftune.recipe import load_recipe
    from ftune.run.train import train

    start = time.perf_counter()
    overrides = [
        f"train.max_steps={args.steps}",
        "train.eval_every=null",
        "train.best_metric=null",
        f"data.max_validation_rows={args.eval_rows}",
        f"train.eval_batch_size={EVAL_BATCH}",
        *PINNED,
    ]
    overrides += {
        "ftune-packed": ["data.packing=true"],
        "ftune-ungrouped": ["train.group_by_length=false"],
        "ftune-ungrouped-logits": ["train.group_by_length=false"],
    }.get(args.side, [])
    if args.side == "ftune-ungrouped-logits":  # the loss from full logits, as before the hidden-state route
        from dataclasses import replace

        from ftune.kernels import linear_ce

        linear_ce.training_task = lambda task, model, sharded: replace(task, hidden_loss=None)
    with tempfile.TemporaryDirectory() as out:
        recipe = load_recipe(RECIPE, [*overrides, f"output_dir={out}/run"])
        result = train(recipe, console=Console(file=io.StringIO()))
    return {
        "work_s": time.perf_counter() - start,
        "train_s": result["train_seconds"],
        "tokens": result["train_tokens"],
        "val_loss": result["validation"]["loss"],
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
    common = ["--steps", str(args.steps), "--eval-rows", str(args.eval_rows)]
    rows = []
    with tempfile.TemporaryDirectory() as cache:  # the first ftune side tokenises, the later ones read the cache
        for side in sides:
            print(f"{side} ...", file=sys.stderr, flush=True)
            rows.append({"side": side, **run_side(Path(__file__), ["--side", side, "--cache", cache, *common])})
    peer = next((r for r in rows if r["side"] == "peer"), None)
    for row in rows:
        row["tokens_per_s"] = row["tokens"] / row["train_s"]
        row["work_tokens_per_s"] = row["tokens"] / row["work_s"]
        row["perplexity"] = math.exp(row["val_loss"])
        row["ratio"] = row["tokens_per_s"] / peer["tokens_per_s"] if peer else None
    columns = [
        ("side", "side", ""),
        ("train tokens/s", "tokens_per_s", ".1f"),
        ("tokens", "tokens", ",d"),
        ("train s", "train_s", ".1f"),
        ("work s", "work_s", ".1f"),
        ("tokens/work s", "work_tokens_per_s", ".1f"),
        ("CPU s", "cpu_s", ".0f"),
        ("peak RSS MiB", "rss_mib", ".0f"),
        ("val loss", "val_loss", ".4f"),
        ("x peer", "ratio", ".2f"),
        ("load at start", "load_at_start", ".1f"),
    ]
    print(
        f"\nSFT LoRA r16 on SmolLM2-135M-Instruct, {args.steps} steps x 8 x 2 rows, max_length 512, validation "
        f"loss on {args.eval_rows} rows | {machine()}\n"
    )
    print(markdown(rows, columns))
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
