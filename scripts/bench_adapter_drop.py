"""AdapterDrop inference speed-up: forward time with the adapters of the lowest k blocks skipped.

    python scripts/bench_adapter_drop.py --device cuda            # GPU (the numbers reported in issue notes)
    python scripts/bench_adapter_drop.py --device cpu --batch 8 --seq 64 --iters 5

A 12-layer BERT-base-shaped classifier (hidden 768, 12 heads, FFN 3072) with random weights, ftune's
`adapter_drop` method (Pfeiffer placement, bottleneck 48 = 768 / 16; `--placement houlsby` for two per block),
timed in eval mode for k = 0, 3, 6 and against the same model without adapters. Median over `--rounds` interleaved
rounds of `--iters` timed forwards each, after warm-up; CUDA timings synchronise before reading the clock. bf16
autocast on CUDA, fp32 on CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext

import torch
from transformers import BertConfig, BertForSequenceClassification

from ftune.methods import adapter_drop


def build(placement: str, k: int | None, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    model = BertForSequenceClassification(config)
    if k is not None:
        model = adapter_drop.apply(model, adapter_drop.Config(placement=placement, inference_drop=k))
    return model.to(device).eval()


def time_forward(model, batch, iters: int, device: str) -> list[float]:
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else nullcontext()
    times = []
    with torch.inference_mode(), autocast:
        for _ in range(iters):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(**batch)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--iters", type=int, default=20, help="timed forwards per setting per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--placement", default="pfeiffer", choices=["pfeiffer", "houlsby", "parallel"])
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()

    ids = torch.randint(1000, 20000, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids.to(args.device), "attention_mask": torch.ones_like(ids).to(args.device)}
    models = {"no adapters": build(args.placement, None, args.device)}
    models |= {f"k={k}": build(args.placement, k, args.device) for k in (0, 3, 6)}
    for model in models.values():  # warm up kernels and the allocator before any timing
        time_forward(model, batch, 10, args.device)
    samples = {name: [] for name in models}
    for _ in range(args.rounds):  # interleaved rounds, so clock or thermal drift hits every setting alike
        for name, model in models.items():
            samples[name] += time_forward(model, batch, args.iters, args.device)
    rows = {name: statistics.median(times) * 1000 for name, times in samples.items()}
    base = rows["k=0"]
    print(
        f"AdapterDrop inference, BERT-base shape, {args.placement}, batch {args.batch} x seq {args.seq}, {args.device}"
    )
    print(f"{'setting':<12} {'ms/forward':>10} {'speed-up vs k=0':>16}")
    for name, ms in rows.items():
        print(f"{name:<12} {ms:>10.2f} {base / ms:>15.3f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "ms_per_forward": rows, "torch": torch.__version__}, f, indent=2)


if __name__ == "__main__":
    main()
