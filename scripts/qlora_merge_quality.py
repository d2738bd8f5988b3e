"""What merging a QLoRA adapter costs: validation metrics of one trained quantised-base run, scored five ways.

    (a) quantised base + adapter            the model as trained (`ftune eval RUN`)
    (b) merged into the dequantised base    what `ftune merge RUN OUT` writes, reloaded with transformers
    (c) merged into the full-precision base the same adapter folded into the original (unquantised) weights
    plus, for a causal LM, two references without the adapter: the quantised base and the full-precision base
    (a classifier without its trained head is at chance, so those rows are left out for classification).

(a) vs (b) is the price of `ftune merge` (with a float32 compute dtype it is float rounding only; with bfloat16 the
quantised forward also rounds activations to bf16, the merged model does not). (b) vs (c) is the price of having
trained against quantised weights but deploying onto the originals: the adapter learned to correct the quantisation
error, which the full-precision base does not have.

Commands (from the repository root):

    # train a small QLoRA run first (CPU: a few minutes), then score it
    .venv/bin/python scripts/qlora_merge_quality.py --recipe recipes/lora_sft_smollm2.yaml \\
        --set 'model.quantization={bits: 4, compute_dtype: float32}' --set train.max_steps=30 \\
        --set data.max_validation_rows=64 --set output_dir=runs/qlora_smollm2_small
    # or score an existing quantised-base run
    .venv/bin/python scripts/qlora_merge_quality.py --run runs/qlora_smollm2_small --out merge_quality.json

Dev-only: ftune never imports this file.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="QLoRA merge quality: quantised+adapter vs merged (dequantised / original)."
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="a finished ftune run whose recipe sets model.quantization")
    source.add_argument("--recipe", help="train this recipe first (with --set overrides), then score the run")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override, dotted.key=value")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in the recipe's output_dir")
    p.add_argument("--out", default=None, help="write the numbers as JSON here (default: $OUT/merge_quality.json)")
    return p.parse_args(argv)


def score(model, recipe, examples, tokenizer) -> dict:
    from ftune import assemble
    from ftune.run.evaluate import evaluate
    from ftune.tasks import TASKS

    loader = assemble.eval_loader(recipe, examples, tokenizer)
    device = next(model.parameters()).device
    started = time.perf_counter()
    names = getattr(model.config, "id2label", None)
    names = [names[i] for i in range(len(names))] if names and TASKS[recipe.task].has_classes else None
    metrics = evaluate(
        model.eval(), loader, TASKS[recipe.task], names, device, decoding=assemble.decoding(recipe, tokenizer)
    )
    return {**metrics, "seconds": round(time.perf_counter() - started, 2)}


def main() -> None:
    args = parse_args()
    import torch
    import transformers

    from ftune import assemble, models, rundir
    from ftune.methods import METHODS
    from ftune.methods.base import unwrap_merged
    from ftune.recipe import load_recipe
    from ftune.run.train import train
    from ftune.serve import export

    transformers.logging.set_verbosity_error()
    if args.recipe:
        recipe = load_recipe(args.recipe, args.overrides)
        print(f"training {args.recipe} into {recipe.output_dir}", flush=True)
        train(recipe, overwrite=args.overwrite)
        run = Path(recipe.output_dir)
    else:
        run = Path(args.run)
    recipe, quantized, tokenizer = assemble.load_run(run)
    if not recipe.model.quantization:
        raise SystemExit(f"{run}: its recipe sets no model.quantization; this script compares a QLoRA run's merges")
    names = rundir.read_record(run).label_names
    examples = assemble.encode_rows(recipe, assemble.read_split(recipe, "validation"), tokenizer, names).examples
    device = next(quantized.parameters()).device
    rows = {}

    rows["quantised base + adapter"] = score(quantized, recipe, examples, tokenizer)
    del quantized
    with tempfile.TemporaryDirectory() as tmp:
        merged_dir = export.merge_run(run, Path(tmp) / "merged")
        auto = (
            transformers.AutoModelForCausalLM
            if recipe.task == "causal_lm"
            else transformers.AutoModelForSequenceClassification
        )
        merged = auto.from_pretrained(merged_dir).to(device)
        rows["merged into dequantised base"] = score(merged, recipe, examples, tokenizer)
        del merged

    full_precision = recipe.model_copy(update={"model": recipe.model.model_copy(update={"quantization": None})})
    source = models.resolve_model(recipe.model.name, recipe.model.gguf_file, recipe.model.revision)
    model = assemble.build_model(full_precision, source, tokenizer, names).to(device)
    rundir.load_weights(run, model)
    METHODS[recipe.method.name].merging.merge(model)
    rows["merged into full-precision base"] = score(unwrap_merged(model), recipe, examples, tokenizer)
    del model

    quantization = recipe.model.quantization
    references = (("quantised base, no adapter", quantization), ("full-precision base, no adapter", None))
    for label, q in references if recipe.task == "causal_lm" else ():
        base, _ = models.load_model(
            recipe.task,
            source,
            recipe.model.dtype,
            label_names=names,
            pad_token_id=tokenizer.pad_token_id,
            quantization=q,
        )
        rows[label] = score(base.to(device) if q is None else base, recipe, examples, tokenizer)
        del base

    metric = "accuracy" if recipe.task != "causal_lm" else "perplexity"
    q = quantization
    width = f"{q.bits}-bit" + (
        f" {q.quant_type}, double_quant {q.double_quant}, compute {q.compute_dtype}"
        if q.bits == 4
        else f", int8_threshold {q.int8_threshold}"
    )
    print(
        f"\n{run} | {recipe.model.name} | {recipe.task} | {width} | {recipe.method.name} "
        f"r={recipe.method.r} | {len(examples)} validation rows | {device}"
    )
    ref = rows["quantised base + adapter"]
    print(f"{'model':34s} {'loss':>9s} {metric:>11s} {'d loss vs (a)':>14s} {'d ' + metric + ' vs (a)':>18s}")
    for label, m in rows.items():
        print(
            f"{label:34s} {m['loss']:9.5f} {m[metric]:11.4f} {m['loss'] - ref['loss']:+14.2e} "
            f"{m[metric] - ref[metric]:+18.2e}"
        )
    b, c = rows["merged into dequantised base"], rows["merged into full-precision base"]
    print(f"(b) - (c): loss {b['loss'] - c['loss']:+.2e}, {metric} {b[metric] - c[metric]:+.2e}")
    out = args.out or (os.path.join(os.environ["OUT"], "merge_quality.json") if os.environ.get("OUT") else None)
    if out:
        result = {
            "run": str(run),
            "model": recipe.model.name,
            "task": recipe.task,
            "quantization": q.model_dump(),
            "method": recipe.method.model_dump(),
            "rows": rows,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        }
        Path(out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
