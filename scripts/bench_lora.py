"""Benchmark ftune's native LoRA against peft's LoRA, side by side, on one randomly initialised model.

Commands (from the repository root; peft comes with the dev extra):

    CPU:  .venv/bin/python scripts/bench_lora.py                   # MiniLM-L6-shaped BERT classifier, 32 x 64
          .venv/bin/python scripts/bench_lora.py --arch llama --batch 4 --warmup 2 --steps 10  # Llama LM
    GPU:  .venv/bin/python scripts/bench_lora.py --device cuda --out bench_cuda.json
          .venv/bin/python scripts/bench_lora.py --device cuda --arch llama --dtype bfloat16

Both sides get the same base weights (same seed, model dropout 0), adapt the same linears (every nn.Linear
of the body: ftune `targets: all-linear`, peft the explicit list of those names) with r=8, alpha=16, dropout
0, train the classifier head (ftune via `head_parameters`, peft via modules_to_save) and see identical
random batches. Measured per side: step-0 loss and logits (B = 0, so both equal the base model; max |delta|
is printed); the wall time of a training step (forward + backward + AdamW step + zero_grad; `--warmup`
untimed steps, then `--steps` timed, CUDA synchronised): median, min, and the median of paired ftune/peft
step ratios; peak memory (CUDA: `max_memory_allocated`; CPU: peak RSS `ru_maxrss` minus RSS before the model
is built, libraries already imported). Each side lives in its own spawned process (no shared allocator or
high-water mark); the parent drives them one step at a time, alternating which goes first, so drift and
noisy neighbours hit both sides alike.
Dev-only: ftune never imports this file.
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing as mp
import platform
import resource
import statistics
import time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="ftune LoRA vs peft LoRA: step time, peak memory, step 0.")
    p.add_argument("--arch", choices=["bert", "llama"], default="bert")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="base weights' dtype")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=None, help="default 64 on CPU, 256 on CUDA")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=None, help="timed steps; default 20 on CPU, 50 on CUDA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write every number to this JSON file")
    p.add_argument("--side", choices=["ftune", "peft"], default=None, help="run one side only, in-process")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.seq = args.seq or (256 if cuda else 64)
    args.steps = args.steps or (50 if cuda else 20)
    return args


def build_model(args):
    import torch
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    if args.arch == "bert":  # sentence-transformers/all-MiniLM-L6-v2's shape
        cfg = BertConfig(
            vocab_size=30522,
            hidden_size=384,
            num_hidden_layers=6,
            num_attention_heads=12,
            intermediate_size=1536,
            num_labels=2,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        model = BertForSequenceClassification(cfg)
    else:
        cfg = LlamaConfig(
            vocab_size=32000,
            hidden_size=512,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=4,
            intermediate_size=1408,
            tie_word_embeddings=False,
            max_position_embeddings=max(args.seq, 256),
        )
        model = LlamaForCausalLM(cfg)
    return model.to(device=args.device, dtype=getattr(torch, args.dtype))


def make_batches(args, n: int):
    import torch

    g = torch.Generator().manual_seed(args.seed + 1)
    vocab = 30522 if args.arch == "bert" else 32000
    batches = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
        labels = torch.randint(0, 2, (args.batch,), generator=g) if args.arch == "bert" else ids.clone()
        batches.append({"input_ids": ids.to(args.device), "labels": labels.to(args.device)})
    return batches


def adapt(model, side: str, arch: str):
    """Wrap `model` with LoRA (r=8, alpha=16, dropout 0) on every body linear, the ftune or the peft way."""
    from ftune.methods.lora import target_linears

    names = sorted(target_linears(model, "all-linear"))  # the very selection ftune's `all-linear` makes
    if side == "ftune":
        from ftune.methods import attach
        from ftune.methods.lora import Config
        from ftune.models import head_parameters

        task = "sequence_classification" if arch == "bert" else "causal_lm"
        cfg = Config(r=8, alpha=16, dropout=0.0, targets="all-linear")
        return attach(model, cfg, head_parameters(model, task, [])), len(names)
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=names,
        bias="none",
        modules_to_save=["classifier"] if arch == "bert" else None,
    )
    return get_peft_model(model, cfg), len(names)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Side:
    """One side's model, optimizer and batches; `step(i)` runs training step i and times it (ms)."""

    def __init__(self, args: argparse.Namespace, side: str) -> None:
        import torch

        for name in ("transformers", "peft", "ftune.methods", "ftune.models"):  # same imports on both sides,
            importlib.import_module(name)  # before the RSS baseline: neither delta counts library code
        self.torch, self.args, self.cuda = torch, args, args.device.startswith("cuda")
        self.batches = make_batches(args, args.warmup + args.steps)
        if self.cuda:
            torch.cuda.synchronize(args.device)
            torch.cuda.reset_peak_memory_stats(args.device)
            self.mem0 = torch.cuda.memory_allocated(args.device)
        self.rss0 = rss_mb()
        self.model, wrapped = adapt(build_model(args), side, args.arch)
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-4)
        self.info = {
            "wrapped": wrapped,
            "trainable": sum(p.numel() for p in params),
            "threads": torch.get_num_threads(),
        }

    def step(self, i: int) -> dict:
        sync = self.torch.cuda.synchronize if self.cuda else lambda *a: None
        sync(self.args.device)
        t = time.perf_counter()
        out = self.model(**self.batches[i])
        out.loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        sync(self.args.device)
        r = {"ms": (time.perf_counter() - t) * 1000}
        if i == 0:  # parameters changed only after this forward: these are the step-0 numbers
            keep = max(1, (1 << 22) // out.logits[0].numel())  # at most 4M logits cross the process boundary
            r |= {"loss0": out.loss.item(), "logits0": out.logits[:keep].detach().float().cpu()}
        return r

    def peak_mb(self) -> float:
        if self.cuda:
            return (self.torch.cuda.max_memory_allocated(self.args.device) - self.mem0) / 2**20
        return rss_mb() - self.rss0


def worker(args: argparse.Namespace, side: str, conn) -> None:
    """A side in its own process: sets up, then runs the steps the parent asks for, one at a time."""
    s = Side(args, side)
    conn.send(s.info)
    while (i := conn.recv()) is not None:
        conn.send(s.step(i))
    conn.send(s.peak_mb())


def main() -> None:
    args = parse_args()
    n = args.warmup + args.steps
    if args.side:  # one side, in this process
        s = Side(args, args.side)
        ms = [s.step(i)["ms"] for i in range(n)][args.warmup :]
        return print(json.dumps({**s.info, "median_ms": statistics.median(ms), "peak_mb": s.peak_mb()}))
    import peft
    import torch
    import transformers

    ctx, sides, conns, procs = mp.get_context("spawn"), ("ftune", "peft"), {}, []
    for side in sides:  # both processes live at once, but only one computes at any moment
        conns[side], child = ctx.Pipe()
        procs.append(ctx.Process(target=worker, args=(args, side, child)))
        procs[-1].start()
        child.close()  # so that a worker that dies shows up here as EOFError, not a hang
    info = {side: conns[side].recv() for side in sides}
    steps = {side: [] for side in sides}
    for i in range(n):  # interleaved by step, order alternating: drift and noisy neighbours hit both sides
        for side in sides if i % 2 == 0 else sides[::-1]:
            conns[side].send(i)
            steps[side].append(conns[side].recv())
    for side in sides:
        conns[side].send(None)
        info[side]["peak_mb"] = conns[side].recv()
    for p in procs:
        p.join()
    f0, p0 = steps["ftune"][0], steps["peft"][0]
    logit_diff = (f0["logits0"] - p0["logits0"]).abs().max().item()
    loss_diff = abs(f0["loss0"] - p0["loss0"])
    stats = {}
    for side in sides:
        ms = [r["ms"] for r in steps[side][args.warmup :]]
        stats[side] = {
            **info[side],
            "median_ms": statistics.median(ms),
            "min_ms": min(ms),
            "loss0": steps[side][0]["loss0"],
            "step_ms": ms,
        }
    assert stats["ftune"]["wrapped"] == stats["peft"]["wrapped"]
    pairs = zip(stats["ftune"]["step_ms"], stats["peft"]["step_ms"], strict=True)
    paired = statistics.median(a / b for a, b in pairs)
    ratio = stats["ftune"]["median_ms"] / stats["peft"]["median_ms"]
    mem_ratio = stats["ftune"]["peak_mb"] / max(stats["peft"]["peak_mb"], 1e-9)
    cuda = args.device.startswith("cuda")
    device = (
        torch.cuda.get_device_name(args.device)
        if cuda
        else f"{platform.processor() or platform.machine()} cpu, {info['ftune']['threads']} threads"
    )
    mem = "peak CUDA alloc MiB" if cuda else "peak RSS delta MiB"
    print(
        f"\n{args.arch} r=8 alpha=16 all-linear ({info['ftune']['wrapped']} linears) | batch {args.batch} "
        f"x seq {args.seq} | {args.dtype} | {args.warmup} warmup + {args.steps} timed steps, interleaved "
        f"| {device}"
    )
    print(f"{'side':6s} {'median ms/step':>15s} {'min ms/step':>12s} {mem:>20s} {'trainable':>10s} {'loss@0':>9s}")
    for side, s in stats.items():
        print(
            f"{side:6s} {s['median_ms']:15.1f} {s['min_ms']:12.1f} {s['peak_mb']:20.1f} "
            f"{s['trainable']:10d} {s['loss0']:9.5f}"
        )
    print(
        f"ftune/peft: time {ratio:.3f} (median of paired steps {paired:.3f}), memory {mem_ratio:.3f} | "
        f"step 0: |d loss| {loss_diff:.2e}, max |d logits| {logit_diff:.2e} "
        f"over {tuple(f0['logits0'].shape)}"
    )
    if args.out:
        result = {
            "args": vars(args),
            "device": device,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "sides": stats,
            "ratio_time_ftune_over_peft": ratio,
            "ratio_time_paired_median": paired,
            "ratio_mem_ftune_over_peft": mem_ratio,
            "step0_loss_abs_diff": loss_diff,
            "step0_logits_max_abs_diff": logit_diff,
        }
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
