"""Benchmark QLoRA against LoRA, ftune beside the reference (peft + transformers), on one random Llama-shaped model.

Commands (from the repository root; peft and bitsandbytes come with the dev extra):

    GPU:  .venv/bin/python scripts/bench_qlora.py                       # ~1.1B Llama, seq 2048, batch 2, bf16
          .venv/bin/python scripts/bench_qlora.py --batch 4 --grad-ckpt --optimizer paged_adamw_8bit
    CPU:  .venv/bin/python scripts/bench_qlora.py --tiny                # a check that every side runs (seconds)

Four sides, each in its own spawned process: `lora` and `qlora` (4-bit NF4, double quantisation, bf16 compute),
each done by ftune (`models.load_model` with `model.quantization`, the k-bit preparation, `attach`, `make_optimizer`:
the code `ftune train` runs) and by the reference (transformers' BitsAndBytesConfig, peft's
`prepare_model_for_kbit_training` and `get_peft_model`). The model is built once from a seeded LlamaConfig (default:
hidden 2048, 16 blocks, 16 heads, 8 KV heads, MLP 5632, vocab 32000, untied: ~1.1B parameters), saved to a temporary
folder, and loaded by every side (no Hub). All sides adapt every linear of the blocks with r=16, alpha=32, dropout 0,
see the same random token batches, and run under bf16 autocast on CUDA, as `ftune train` does with precision auto.

Measured per side: tokens/s (batch x seq over the median step time; a step is forward + backward + optimizer step +
zero_grad, `--warmup` untimed then `--steps` timed, CUDA synchronised); peak memory, `torch.cuda.max_memory_allocated`
over load and training (CPU: peak RSS minus RSS before loading); memory after loading (the weights); the step-0 loss
(B = 0, so ftune and peft agree within a pair: printed as |d loss|). On CUDA each side runs alone on the GPU, one
after the other; on CPU the two sides of a pair alternate step by step (which goes first alternates too), so that
noisy neighbours hit both alike.
Dev-only: ftune never imports this file.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import tempfile
import time

SIDES = ("ftune-lora", "peft-lora", "ftune-qlora", "peft-qlora")
PAIRS = (("ftune-lora", "peft-lora"), ("ftune-qlora", "peft-qlora"))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="QLoRA vs LoRA, ftune vs peft: tokens/s and peak memory.")
    p.add_argument("--tiny", action="store_true", help="tiny model and sequence on the CPU: a check that all sides run")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 3; --tiny: 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; --tiny: 3)")
    p.add_argument("--optimizer", default="adamw", help="ftune's train.optimizer name, used by every side")
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing (non-reentrant) on every side")
    p.add_argument("--sides", default=",".join(SIDES), help="comma-separated subset of " + ", ".join(SIDES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON output (default: $OUT/bench_qlora.json when $OUT is set)")
    args = p.parse_args(argv)
    if args.tiny:
        args.hidden, args.layers, args.heads, args.kv_heads, args.intermediate = 128, 2, 4, 2, 256
        args.vocab, args.seq, args.batch, args.r = 512, 64, 2, 4
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    args.steps = args.steps if args.steps is not None else (3 if args.tiny else 10)
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    args.sides = [s for s in args.sides.split(",") if s]
    unknown = set(args.sides) - set(SIDES)
    if unknown:
        p.error(f"--sides: unknown {sorted(unknown)}; choose from {', '.join(SIDES)}")
    return args


def build_model(args, folder: str) -> int:
    """A seeded random Llama saved to `folder` in bf16; returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        intermediate_size=args.intermediate,
        max_position_embeddings=max(args.seq, 256),
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def target_names(model) -> list[str]:
    from ftune.methods.lora import target_linears

    return sorted(target_linears(model, "all-linear"))  # the very selection ftune's `all-linear` makes


def load_side(args, side: str, folder: str):
    """(model, optimizer) for one side, the way ftune or the reference builds it."""
    import torch

    qlora = side.endswith("qlora")
    if side.startswith("ftune"):
        from ftune import models
        from ftune.methods import attach
        from ftune.methods.lora import Config
        from ftune.models import quantize
        from ftune.step.optim import make_optimizer

        q = (
            quantize.Quantization(bits=4, quant_type="nf4", double_quant=True, compute_dtype="bfloat16")
            if qlora
            else None
        )
        model, missing = models.load_model("causal_lm", folder, "bfloat16", quantization=q)
        if not qlora:
            model.to(args.device)
        if qlora:
            quantize.prepare_for_training(model, args.grad_ckpt)
        model = attach(
            model, Config(r=args.r, alpha=2 * args.r, dropout=0.0), models.head_parameters(model, "causal_lm", missing)
        )
        if args.grad_ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        params = [p for p in model.parameters() if p.requires_grad]
        return model, make_optimizer(args.optimizer, params, 1e-4, 0.0)
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {"dtype": torch.bfloat16}
    if qlora:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["device_map"] = {"": args.device}
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    if not qlora:
        model.to(args.device)
    ckpt = {"use_reentrant": False}
    if qlora:
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=args.grad_ckpt, gradient_checkpointing_kwargs=ckpt
        )
    elif args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt)
    if (
        qlora and args.device == "cpu"
    ):  # bitsandbytes' CPU inference repack would break training (see ftune/models/quantize.py)
        import bitsandbytes as bnb

        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False
    config = peft.LoraConfig(
        r=args.r,
        lora_alpha=2 * args.r,
        lora_dropout=0.0,
        target_modules=target_names(model),
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    else:
        import bitsandbytes as bnb

        names = {
            "adamw_8bit": "AdamW8bit",
            "paged_adamw_8bit": "PagedAdamW8bit",
            "paged_adamw_32bit": "PagedAdamW32bit",
            "paged_adamw": "PagedAdamW",
        }
        optimizer = getattr(bnb.optim, names[args.optimizer])(params, lr=1e-4, weight_decay=0.0)
    return model, optimizer


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Side:
    """One side's model, optimizer and batches; `step(i)` runs training step i and times it."""

    def __init__(self, args: argparse.Namespace, side: str, folder: str) -> None:
        import importlib

        import torch

        for name in ("transformers", "peft", "bitsandbytes", "ftune.methods", "ftune.models", "ftune.models.quantize"):
            importlib.import_module(name)  # the same imports on every side, before the memory baseline
        self.torch, self.args, self.cuda = torch, args, args.device.startswith("cuda")
        g = torch.Generator().manual_seed(args.seed + 1)
        self.batches = [
            torch.randint(0, args.vocab, (args.batch, args.seq), generator=g) for _ in range(args.warmup + args.steps)
        ]
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(args.device)
        self.rss0 = rss_mb()
        self.model, self.optimizer = load_side(args, side, folder)
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.info = {
            "trainable": sum(p.numel() for p in params),
            "loaded_mb": torch.cuda.memory_allocated(args.device) / 2**20 if self.cuda else rss_mb() - self.rss0,
            "optimizer": type(self.optimizer).__name__,
        }

    def step(self, i: int) -> dict:
        torch = self.torch
        sync = torch.cuda.synchronize if self.cuda else (lambda *a: None)
        ids = self.batches[i].to(self.args.device)
        sync(self.args.device)
        started = time.perf_counter()
        with torch.autocast(self.args.device.split(":")[0], dtype=torch.bfloat16, enabled=self.cuda):
            loss = self.model(input_ids=ids, labels=ids).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sync(self.args.device)
        return {"ms": (time.perf_counter() - started) * 1000, "loss": loss.item()}

    def peak_mb(self) -> float:
        if self.cuda:
            return self.torch.cuda.max_memory_allocated(self.args.device) / 2**20
        return rss_mb() - self.rss0


def worker(args: argparse.Namespace, side: str, folder: str, conn) -> None:
    s = Side(args, side, folder)
    conn.send(s.info)
    while (i := conn.recv()) is not None:
        conn.send(s.step(i))
    conn.send(s.peak_mb())


def run_pair(args, sides, folder) -> dict:
    """CPU: both sides of a pair alive at once, stepping alternately (noisy neighbours hit both alike). CUDA: one
    side at a time, each alone on the GPU (two caching allocators at seq 2048 could exhaust it); returns results."""
    groups = [sides] if args.device == "cpu" else [[side] for side in sides]
    info, steps = {}, {side: [] for side in sides}
    for group in groups:
        ctx, conns, procs = mp.get_context("spawn"), {}, []
        for side in group:
            conns[side], child = ctx.Pipe()
            procs.append(ctx.Process(target=worker, args=(args, side, folder, child)))
            procs[-1].start()
            child.close()  # so that a worker that dies shows up here as EOFError, not a hang
        info |= {side: conns[side].recv() for side in group}
        for i in range(args.warmup + args.steps):
            for side in group if i % 2 == 0 else group[::-1]:
                conns[side].send(i)
                steps[side].append(conns[side].recv())
        for side in group:
            conns[side].send(None)
            info[side]["peak_mb"] = conns[side].recv()
        for p in procs:
            p.join()
    results = {}
    for side in sides:
        ms = [r["ms"] for r in steps[side][args.warmup :]]
        median = statistics.median(ms)
        results[side] = {
            **info[side],
            "median_ms": median,
            "min_ms": min(ms),
            "tokens_per_s": args.batch * args.seq / (median / 1000),
            "loss0": steps[side][0]["loss"],
            "losses": [r["loss"] for r in steps[side]],
            "step_ms": ms,
        }
    return results


def main() -> None:
    args = parse_args()
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        n_params = build_model(args, folder)
        print(f"built a {n_params / 1e9:.3f}B-parameter Llama in {time.perf_counter() - started:.0f} s", flush=True)
        stats = {}
        for pair in PAIRS:
            chosen = [s for s in pair if s in args.sides]
            if chosen:
                stats |= run_pair(args, chosen, folder)
    cuda = args.device.startswith("cuda")
    device = torch.cuda.get_device_name(args.device) if cuda else f"{platform.processor() or platform.machine()} cpu"
    mem = "peak alloc GiB" if cuda else "peak RSS+ GiB"
    print(
        f"\nLlama {n_params / 1e9:.2f}B (hidden {args.hidden}, {args.layers} blocks) | r={args.r} all-linear | batch "
        f"{args.batch} x seq {args.seq} | bf16{' autocast' if cuda else ''} | optimizer {args.optimizer} | "
        f"grad ckpt {args.grad_ckpt} | {args.warmup} warmup + {args.steps} timed steps | {device}"
    )
    print(
        f"{'side':12s} {'tokens/s':>10s} {'median ms':>10s} {mem:>15s} {'loaded GiB':>11s} {'trainable':>11s} "
        f"{'loss@0':>8s}"
    )
    for side in SIDES:
        if side in stats:
            s = stats[side]
            print(
                f"{side:12s} {s['tokens_per_s']:10.0f} {s['median_ms']:10.1f} {s['peak_mb'] / 1024:15.2f} "
                f"{s['loaded_mb'] / 1024:11.2f} {s['trainable']:11d} {s['loss0']:8.4f}"
            )
    for ours, theirs in PAIRS:
        if ours in stats and theirs in stats:
            o, t = stats[ours], stats[theirs]
            print(
                f"{ours}/{theirs}: tokens/s {o['tokens_per_s'] / t['tokens_per_s']:.3f}, peak memory "
                f"{o['peak_mb'] / t['peak_mb']:.3f}, |d loss@0| {abs(o['loss0'] - t['loss0']):.2e}"
            )
    if "ftune-qlora" in stats and "ftune-lora" in stats:
        q, lo = stats["ftune-qlora"], stats["ftune-lora"]
        print(
            f"ftune qlora/lora: tokens/s {q['tokens_per_s'] / lo['tokens_per_s']:.3f}, peak memory "
            f"{q['peak_mb'] / lo['peak_mb']:.3f}"
        )
    out = args.out or (os.path.join(os.environ["OUT"], "bench_qlora.json") if os.environ.get("OUT") else None)
    if out:
        import bitsandbytes
        import peft

        result = {
            "args": vars(args),
            "device": device,
            "params": n_params,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "bitsandbytes": bitsandbytes.__version__,
            "sides": stats,
        }
        with open(out, "w") as fh:
            json.dump(result, fh, indent=1)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
