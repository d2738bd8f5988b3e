"""ftune's training loop against a plain torch + peft loop on a GPU: throughput, peak memory, final metric.

    python scripts/bench_loop_gpu.py sst2 --model M --data D      # SST-2, 1 epoch of batch 32, MiniLM LoRA r8
    python scripts/bench_loop_gpu.py llama                        # Llama-3.2-1B-shaped random model, seq 2048
    python scripts/bench_loop_gpu.py llama --sides ftune-qlora,peft-qlora --steps 20
    python scripts/bench_loop_gpu.py llama --tiny                 # CPU, seconds: a check that every side runs

sst2: `ftune train recipes/lora_sst2.yaml` for one epoch (model and data at the given local paths) against the loop
a user writes around peft: the same LoRA (r 8, alpha 16, every body linear by ftune's selection, the new head fully
trained), tokenised with the fast tokenizer, random batches of 32 padded per batch, AdamW (fused) at 1e-3 with 6%
linear warmup then linear decay, clip 1.0, bf16 autocast, then validation accuracy.

llama: a random Llama-3.2-1B-shaped model (hidden 2048, 16 blocks, 32 heads, 8 KV heads, MLP 8192, vocabulary
128,256, tied embeddings; built once from a seeded config and saved), trained on synthetic SFT rows of exactly --seq
tokens (a word-level tokenizer: one word, one token), the first half prompt and the second half response (loss on
the response). ftune runs its loop (`train` with a recipe: LoRA r 16 alpha 32 on every block linear, or QLoRA: NF4,
double quantisation, bf16 compute); the peft loop feeds the same token ids and labels to `model(labels=...)`
(transformers' loss over full logits) with peft's LoRA / prepare_model_for_kbit_training, AdamW, bf16 autocast,
fp32 master weights as ftune keeps them. tokens/s: ftune's median of its per-step tokens/s (metrics.jsonl, log_every
1) after the first --warmup steps; the peft loop's tokens over its steps after --warmup. ftune-lora runs with
train.compile auto (compiled on a GPU), ftune-lora-eager with compile off; QLoRA is never compiled.

Every side is its own process; peak memory is torch.cuda.max_memory_allocated (CPU: peak RSS). One JSON per run in
--out (default $OUT) and a Markdown table on stdout. Dev-only: ftune never imports this file.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import random
import resource
import statistics
import tempfile
import time
from pathlib import Path

LLAMA_SIDES = ("ftune-lora", "ftune-lora-eager", "peft-lora", "ftune-qlora", "peft-qlora")
SST2_SIDES = ("ftune", "peft")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("case", choices=["sst2", "llama"])
    p.add_argument("--sides", default=None)
    p.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2", help="sst2: model folder or name")
    p.add_argument("--data", default="../shared/data/sst2", help="sst2: folder with train.tsv and validation.tsv")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=2, help="llama: rows per step")
    p.add_argument("--steps", type=int, default=12, help="llama: optimizer steps per side")
    p.add_argument("--warmup", type=int, default=2, help="llama, peft loop: untimed first steps")
    p.add_argument("--tiny", action="store_true", help="llama: a tiny model on the CPU, to check the script")
    p.add_argument("--out", default=os.environ.get("OUT"))
    return p.parse_args()


def peak_memory_mib(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_llama(args: argparse.Namespace, folder: Path) -> None:
    """The random Llama-3.2-1B-shaped model, a word-level tokenizer, and train/validation SFT rows of --seq tokens."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(1000)]
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    shape = {
        "hidden_size": 2048,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 8192,
        "vocab_size": 128256,
    }
    if args.tiny:
        shape |= {
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 128,
            "vocab_size": 2048,
        }
    torch.manual_seed(0)
    config = LlamaConfig(
        **shape,
        max_position_embeddings=max(args.seq, 2048) + 8,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        rope_theta=500000.0,
    )
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    rng = random.Random(0)
    half = args.seq // 2
    for split, n in (("train", args.batch * (args.steps + 1)), ("validation", 4)):
        rows = [
            {
                "instruction": " ".join(rng.choices(words, k=half - 2)),
                "input": "",
                "output": " ".join(rng.choices(words, k=args.seq - half - 1)),
            }
            for _ in range(n)
        ]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def llama_recipe(args: argparse.Namespace, folder: Path, quantized: bool) -> dict:
    model = {"name": str(folder / "model")}
    if quantized:
        model["quantization"] = {"bits": 4}
    return {
        "model": model,
        "task": "causal_lm",
        "data": {
            "train": str(folder / "train.jsonl"),
            "validation": str(folder / "validation.jsonl"),
            "template": "alpaca",
            "max_length": args.seq,
        },
        "method": {"name": "lora", "r": 16, "alpha": 32, "targets": "all-linear"},
        "train": {"max_steps": args.steps, "batch_size": args.batch, "lr": 1e-4, "log_every": 1, "eval_batch_size": 1},
        "output_dir": str(folder / "runs" / ("qlora" if quantized else "lora")),
    }


def ftune_llama(args: argparse.Namespace, folder: Path, side: str) -> dict:
    import torch
    from rich.console import Console

    from ftune.recipe import validate_recipe
    from ftune.run.train import train

    doc = llama_recipe(args, folder, side.endswith("qlora"))
    doc["train"]["compile"] = False if side.endswith("eager") else "auto"
    result = train(validate_recipe(doc), overwrite=True, console=Console(file=io.StringIO()))
    log = [json.loads(line) for line in (Path(doc["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    per_step = [e["tokens_per_s"] for e in log if "tokens_per_s" in e][args.warmup :]  # log_every 1: one per step
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {
        "tokens_per_s": statistics.median(per_step),
        "train_s": result["train_seconds"],
        "peak_mib": peak_memory_mib(device),
        "val_loss": result["validation"]["loss"],
    }


def peft_llama(args: argparse.Namespace, folder: Path, side: str) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    from ftune import assemble
    from ftune.data.loader import collate
    from ftune.methods.lora import target_linears
    from ftune.recipe import validate_recipe

    recipe = validate_recipe(llama_recipe(args, folder, side.endswith("qlora")))
    _, tokenizer = assemble.source_and_tokenizer(recipe)
    examples = assemble.encode_rows(recipe, assemble.read_split(recipe, "train"), tokenizer, None).examples
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    options = {"dtype": torch.float32}
    if side.endswith("qlora"):
        from transformers import BitsAndBytesConfig

        options = {
            "quantization_config": BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            ),
            "dtype": torch.float32,
            "device_map": {"": device.index or 0},
        }
    model = AutoModelForCausalLM.from_pretrained(str(folder / "model"), **options)
    if side.endswith("qlora"):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    targets = sorted({n.rsplit(".", 1)[-1] for n in target_linears(model, "all-linear")})
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets))
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda" or None)
    pad = collate(tokenizer.pad_token_id)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    timed, tokens, start = 0.0, 0, 0.0
    for step in range(args.steps):
        batch = pad(examples[step * args.batch : (step + 1) * args.batch])
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        if step == args.warmup:
            torch.cuda.synchronize() if device.type == "cuda" else None
            start = time.perf_counter()
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= args.warmup:
            tokens += int(batch["attention_mask"].sum())
    if device.type == "cuda":
        torch.cuda.synchronize()
    timed = time.perf_counter() - start
    return {"tokens_per_s": tokens / timed, "train_s": timed, "peak_mib": peak_memory_mib(device), "val_loss": None}


def ftune_sst2(args: argparse.Namespace) -> dict:
    import torch
    from rich.console import Console

    from ftune.recipe import load_recipe
    from ftune.run.train import train

    with tempfile.TemporaryDirectory() as out:
        recipe = load_recipe(
            "recipes/lora_sst2.yaml",
            [
                f"model.name={args.model}",
                f"data.train={args.data}/train.tsv",
                f"data.validation={args.data}/validation.tsv",
                "train.eval_every=null",
                f"output_dir={out}/run",
            ],
        )
        result = train(recipe, console=Console(file=io.StringIO()))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = len((Path(args.data) / "train.tsv").read_text().splitlines()) - 1  # one epoch: every row once
    return {
        "examples_per_s": rows / result["train_seconds"],
        "train_s": result["train_seconds"],
        "peak_mib": peak_memory_mib(device),
        "accuracy": result["validation"]["accuracy"],
    }


def peft_sst2(args: argparse.Namespace) -> dict:
    import csv

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ftune.methods.lora import target_linears
    from ftune.models import resolve_model

    source = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(source)

    def split(name: str) -> tuple[list[list[int]], list[int]]:
        with open(f"{args.data}/{name}.tsv") as f:
            rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        ids = tokenizer([r["sentence"] for r in rows], truncation=True, max_length=64)["input_ids"]
        return ids, [int(r["label"]) for r in rows]

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train_ids, train_labels = split("train")
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=2)
    targets = sorted(target_linears(model, "all-linear"))
    model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets, modules_to_save=["classifier"])
    ).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=device.type == "cuda" or None)
    total = len(train_ids) // 32 + bool(len(train_ids) % 32)
    warmup = round(0.06 * total)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: s / max(1, warmup) if s < warmup else max(0.0, (total - s) / max(1, total - warmup))
    )

    def padded(ids: list[list[int]]) -> dict:
        width = max(map(len, ids))
        input_ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in ids])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids])
        return {"input_ids": input_ids.to(device, non_blocking=True), "attention_mask": mask.to(device)}

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    order = torch.randperm(len(train_ids), generator=torch.Generator().manual_seed(0)).tolist()
    model.train()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for first in range(0, len(order), 32):
        rows = order[first : first + 32]
        labels = torch.tensor([train_labels[i] for i in rows], device=device)
        with autocast:
            loss = model(**padded([train_ids[i] for i in rows]), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    val_ids, val_labels = split("validation")
    model.eval()
    correct = 0
    with torch.no_grad(), autocast:
        for first in range(0, len(val_ids), 64):
            logits = model(**padded(val_ids[first : first + 64])).logits
            correct += int((logits.argmax(-1).cpu() == torch.tensor(val_labels[first : first + 64])).sum())
    return {
        "examples_per_s": len(train_ids) / seconds,
        "train_s": seconds,
        "peak_mib": peak_memory_mib(device),
        "accuracy": correct / len(val_ids),
    }


def run_side(args: argparse.Namespace, side: str, folder: str, conn) -> None:
    if args.case == "sst2":
        result = ftune_sst2(args) if side == "ftune" else peft_sst2(args)
    else:
        run = ftune_llama if side.startswith("ftune") else peft_llama
        result = run(args, Path(folder), side)
    conn.send(result)


def main() -> None:
    args = parse_args()
    if args.tiny:
        args.seq, args.steps, args.warmup = 64, 3, 1
    sides = (args.sides or ",".join(SST2_SIDES if args.case == "sst2" else LLAMA_SIDES)).split(",")
    ctx = mp.get_context("spawn")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        if args.case == "llama":
            build_llama(args, Path(folder))
        for side in sides:  # one after the other: each has the device to itself
            receive, send = ctx.Pipe(duplex=False)
            child = ctx.Process(target=run_side, args=(args, side, folder, send))
            child.start()
            send.close()
            rows.append({"side": side, **receive.recv()})
            child.join()
    rate = "examples_per_s" if args.case == "sst2" else "tokens_per_s"
    metric = "accuracy" if args.case == "sst2" else "val_loss"
    print(
        f"\n{args.case}: {'seq ' + str(args.seq) + ', ' if args.case == 'llama' else ''}"
        f"{len(sides)} sides, one process each\n"
    )
    print(f"| side | {rate} | train s | peak MiB | {metric} |\n|---|---|---|---|---|")
    for row in rows:
        value = "" if row[metric] is None else f"{row[metric]:.4f}"
        print(f"| {row['side']} | {row[rate]:.1f} | {row['train_s']:.1f} | {row['peak_mib']:.0f} | {value} |")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"bench_loop_{args.case}.json").write_text(
            json.dumps({"args": vars(args), "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
