"""The training loop: one function, read top to bottom. Methods plug in through their `Method` record only."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from ftune import assemble, checkpoint
from ftune.data import make_loader
from ftune.errors import RecipeError, TrainingError
from ftune.evaluate import evaluate
from ftune.methods import method_of
from ftune.methods.base import count_parameters
from ftune.optim import make_optimizer
from ftune.recipe import Recipe, dump_recipe

# skipped steps in a row (train.on_nonfinite: skip) that stop the run anyway: the fault is not a passing spike
MAX_SKIPS_IN_A_ROW = 25


def lr_multiplier(kind: str, warmup: int, total: int):
    """Linear warmup to the peak, then linear or cosine decay to zero, or constant (as transformers' schedules).

    Written out rather than imported: transformers' optimization module drags in bitsandbytes at import.
    """

    def multiplier(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        if kind == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        return 1.0

    return multiplier


def train(recipe: Recipe, *, resume: bool = False, overwrite: bool = False, console: Console | None = None) -> dict:
    """Train `recipe` into `recipe.output_dir` and return the final metrics (also written to metrics.json)."""
    console = console or Console(stderr=True)
    t, out = recipe.train, Path(recipe.output_dir)
    checkpoint.check_run_dir(out, dump_recipe(recipe), resume=resume, overwrite=overwrite)  # fail before any work
    precision = t.precision if t.precision != "auto" else ("bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32")
    if precision == "fp16" and not torch.cuda.is_available():
        raise RecipeError("train.precision: fp16 mixed precision needs a CUDA GPU; use bf16 or fp32 on CPU")
    accelerator = Accelerator(mixed_precision={"fp32": "no"}.get(precision, precision))
    set_seed(t.seed)

    # data and model
    source, tokenizer = assemble.load_tokenizer(recipe)
    train_rows = assemble.read_split(recipe, "train")
    names = assemble.label_names(recipe, train_rows)
    train_set = assemble.encode(recipe, train_rows, tokenizer, names)
    val_set = assemble.encode(recipe, assemble.read_split(recipe, "validation"), tokenizer, names) if recipe.data.validation else None
    model = assemble.build_model(recipe, source, tokenizer, names)
    method = method_of(recipe.method)
    if t.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # the name in recent transformers; the old goes in v6
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n_trainable, n_total = count_parameters(model)
    train_loader = make_loader(train_set.examples, t.batch_size, tokenizer.pad_token_id, t.seed, shuffle=True)
    val_loader = val_set and assemble.eval_loader(recipe, val_set.examples, tokenizer)

    # optimisation
    steps_per_epoch = math.ceil(len(train_loader) / t.grad_accum)
    total_steps = t.max_steps or math.ceil(t.epochs * steps_per_epoch)
    if method.check_total_steps:  # before anything is written
        method.check_total_steps(recipe.method, total_steps)
    warmup = t.warmup_steps or round(t.warmup_ratio * total_steps)
    optimizer = make_optimizer(t.optimizer, [p for p in model.parameters() if p.requires_grad], t.lr, t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(t.scheduler, warmup, total_steps))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    raw_model = accelerator.unwrap_model(model)
    # nothing is written until the recipe, data and model have all loaded
    resume_from = checkpoint.prepare_run_dir(out, dump_recipe(recipe), resume=resume, overwrite=overwrite)

    if resume_from:  # tokenizer/ and run.json were written before the first checkpoint: keep the run's record
        checkpoint.note_resume(out, resume_from)
    else:
        tokenizer.save_pretrained(out / checkpoint.TOKENIZER)
        record = {"seed": t.seed, "model_source": source, "trainable_params": n_trainable, "total_params": n_total,
                  "label_names": names, "train_source": train_set.source, "train_examples": len(train_set.examples),
                  "train_rows_dropped": train_set.dropped, "train_rows_truncated": train_set.truncated,
                  "validation_rows_truncated": val_set and val_set.truncated, "validation_source": val_set and val_set.source,
                  "total_steps": total_steps, "precision": precision, "device": str(accelerator.device)}
        checkpoint.write_json(out / checkpoint.RUN, checkpoint.run_record(record))
    console.print(f"[bold]{method.name}[/]: {n_trainable:,} of {n_total:,} parameters train "
                  f"({100 * n_trainable / n_total:.3f}%); {total_steps} steps on {accelerator.device}, {precision}")

    # position in the data: optimizer steps done, epoch, micro-batches consumed in that epoch
    # (the loss window is part of it so a resumed run logs the same means as an uninterrupted one)
    pos = {"step": 0, "epoch": 0, "batch": 0, "best": None, "train_seconds": 0.0, "window_loss": 0.0, "window_steps": 0,
           "skipped_steps": 0}
    if resume_from:
        pos = checkpoint.load_checkpoint(resume_from, raw_model, optimizer, scheduler, method.load_training_state)
        console.print(f"resuming from {resume_from} (step {pos['step']})", soft_wrap=True)  # a long path stays whole
    _truncate_log(out / "metrics.jsonl", pos["step"], total_steps)

    def score() -> dict:
        return evaluate(model, val_loader, recipe.task, accelerator.device, accelerator.autocast)

    def log(entry: dict) -> None:
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")

    def keep_if_best(metrics: dict) -> None:
        if t.best_metric not in metrics:  # e.g. f1 where the tags are not IOB2: known only once scored
            raise TrainingError(f"train.best_metric: {t.best_metric!r} is not a validation metric of this run; "
                                f"use one of {', '.join(k for k, v in metrics.items() if isinstance(v, float))}")
        value = metrics[t.best_metric]
        best = pos["best"]
        if best is None or (value > best if t.best_mode == "max" else value < best):
            pos["best"] = value
            checkpoint.save_weights(out, raw_model, _weights_meta(recipe, pos["step"], {t.best_metric: value}),
                                    method.saved_weights(raw_model))

    def save_checkpoint(step: int) -> None:
        state = method.training_state(raw_model) if method.training_state else None
        checkpoint.save_checkpoint(out, step, raw_model, optimizer, scheduler, pos, t.keep_checkpoints, state)

    def stopped(why: str) -> TrainingError:  # the step being taken cannot be: nothing of it is saved
        latest = checkpoint.latest_checkpoint(out)
        kept = f"the last checkpoint, {latest.relative_to(out)}, is intact" if latest else "no checkpoint was saved yet"
        hint = ", or set train.on_nonfinite: skip" if t.on_nonfinite == "stop" else ""
        return TrainingError(f"step {pos['step'] + 1} of {total_steps}: {why}; training stopped without saving this "
                             f"step ({kept}). Lower train.lr or check the data{hint}")

    model.train()
    progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TimeRemainingColumn(), TextColumn("{task.fields[stats]}"), console=console,
                        disable=not console.is_terminal, transient=True)
    bar = progress.add_task("train", total=total_steps, completed=pos["step"], stats="")
    window_tokens, window_start, started = 0, time.perf_counter(), time.perf_counter() - pos["train_seconds"]
    micro, step_loss, bad, skips_in_a_row = 0, 0.0, None, 0  # bad: why this optimizer step must not be taken
    with progress:
        while pos["step"] < total_steps:
            train_loader.sampler.set_position(pos["epoch"], pos["batch"] * t.batch_size)
            for batch in train_loader:
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                with accelerator.autocast():
                    loss = model(**batch).loss
                loss_value = loss.item()
                if not math.isfinite(loss_value):
                    bad = bad or f"non-finite loss ({loss_value})"
                    if t.on_nonfinite == "stop":
                        raise stopped(bad)
                elif not bad:  # a step already known bad is dropped whole: its other micro-batches need no backward
                    accelerator.backward(loss / t.grad_accum)
                    step_loss += loss_value / t.grad_accum
                window_tokens += int(batch["attention_mask"].sum())
                pos["batch"] += 1
                micro += 1
                if micro % t.grad_accum:
                    continue  # still accumulating this step's gradient

                bad = bad or _clip_and_check(accelerator, model, t.max_grad_norm)
                if bad:  # nothing of this step reaches the weights, the optimizer or the scheduler
                    if t.on_nonfinite == "stop":
                        raise stopped(bad)
                    optimizer.zero_grad(set_to_none=True)
                    pos["skipped_steps"] += 1
                    skips_in_a_row += 1
                    console.print(f"step {pos['step'] + 1}: {bad}; skipped (train.on_nonfinite: skip)", soft_wrap=True)
                    if skips_in_a_row >= MAX_SKIPS_IN_A_ROW:
                        raise stopped(f"{skips_in_a_row} steps in a row skipped, the last for a {bad}")
                    step_loss, bad = 0.0, None
                    continue
                skips_in_a_row = 0
                optimizer.step()
                scheduler.step()
                if method.on_step_end:
                    method.on_step_end(raw_model, pos["step"] + 1, total_steps)  # before zero_grad: reads gradients
                optimizer.zero_grad(set_to_none=True)
                pos["step"] += 1
                pos["window_steps"] += 1
                pos["window_loss"] += step_loss
                step_loss = 0.0
                step = pos["step"]
                pos["train_seconds"] = time.perf_counter() - started

                if step % t.log_every == 0 or step == total_steps:
                    span = time.perf_counter() - window_start
                    entry = {"step": step, "loss": pos["window_loss"] / pos["window_steps"], "lr": scheduler.get_last_lr()[0],
                             "tokens_per_s": window_tokens / span, "epoch": pos["epoch"],
                             "skipped_steps": pos["skipped_steps"]}
                    log(entry)
                    progress.update(bar, stats=f"loss {entry['loss']:.4f}  lr {entry['lr']:.2e}  {entry['tokens_per_s']:,.0f} tok/s")
                    pos["window_loss"], pos["window_steps"] = 0.0, 0
                    window_tokens, window_start = 0, time.perf_counter()
                progress.update(bar, completed=step)

                if val_loader and t.eval_every and step % t.eval_every == 0 and step < total_steps:
                    metrics = score()
                    log({"step": step, "validation": metrics})
                    console.print(f"step {step}: " + "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()), soft_wrap=True)
                    if t.best_metric:
                        keep_if_best(metrics)
                if t.save_every and step % t.save_every == 0 and step < total_steps:
                    save_checkpoint(step)
                if step >= total_steps:
                    break
            else:  # the epoch ran out before the step budget
                pos["epoch"], pos["batch"] = pos["epoch"] + 1, 0

    final = score() if val_loader else {}
    if final:
        log({"step": pos["step"], "validation": final})
    if not t.best_metric or not final:
        checkpoint.save_weights(out, raw_model, _weights_meta(recipe, pos["step"], final), method.saved_weights(raw_model))
    else:
        keep_if_best(final)
    save_checkpoint(pos["step"])
    result = {"step": pos["step"], "skipped_steps": pos["skipped_steps"], "train_seconds": round(pos["train_seconds"], 2),
              "trainable_params": n_trainable, "total_params": n_total, "validation": final,
              "best": {t.best_metric: pos["best"]} if t.best_metric else None}
    if method.report:  # read after the final evaluation, which the report may summarise
        result["method_report"] = method.report(raw_model)
        checkpoint.write_json(out / "method_report.json", result["method_report"])
    checkpoint.write_json(out / "metrics.json", result)
    return result


def _weights_meta(recipe: Recipe, step: int, metrics: dict) -> dict:
    return {"method": recipe.method.name, "config": recipe.method.model_dump(mode="json"), "step": step, "metrics": metrics}


def _clip_and_check(accelerator: Accelerator, model: torch.nn.Module, max_norm: float | None) -> str | None:
    """Clip the gradient norm to `max_norm` (if set); returns why the step must be dropped if the norm is not finite.

    Without clipping the norm is still computed (one small reduction per parameter). fp16 is left to its loss scaler,
    which skips overflowing steps and lowers the scale itself: routine early in training, not an error.
    """
    if max_norm:
        norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
    elif accelerator.scaler is None:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) if grads else None
    else:
        return None
    if norm is None or accelerator.scaler is not None or math.isfinite(float(norm)):
        return None
    return f"non-finite gradient norm ({float(norm)})"


def _truncate_log(path: Path, step: int, total_steps: int) -> None:
    """Drop log lines past `step`: a resumed run rewrites them, exactly as the uninterrupted run would.

    The final evaluation (a validation line at total_steps) is always rerun, so a run resumed from its final
    checkpoint drops that line too rather than log it twice. Appending is not atomic: a kill can leave a torn last line.
    """
    if path.exists():
        kept = []
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn line from a killed run: it was past the checkpoint, and is rewritten
            if entry["step"] <= step and not ("validation" in entry and entry["step"] >= total_steps):
                kept.append(line + "\n")
        checkpoint.write_text(path, "".join(kept))
