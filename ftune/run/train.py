"""The training loop: one function, read top to bottom. Tasks, objectives and methods plug in through their
records; one process or several (accelerate) run the same lines (ftune/run/processes.py holds what they agree on)."""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from ftune import rundir, step, trackers
from ftune.data import prefetch
from ftune.data.loader import token_count
from ftune.errors import TrainingError
from ftune.recipe import Recipe
from ftune.run import checkpoint, fsdp, plots, processes
from ftune.run.evaluate import evaluate
from ftune.run.setup import Position, Run, prepare, sharded, state_of

# skipped steps in a row (train.on_nonfinite: skip) that stop the run anyway: the fault is not a passing spike
MAX_SKIPS_IN_A_ROW = 25


def train(
    recipe: Recipe,
    *,
    resume: bool = False,
    overwrite: bool = False,
    console: Console | None = None,
    allow_changed_data: bool = False,
) -> dict:
    """Train `recipe` into `recipe.output_dir` and return the final metrics (also written to metrics.json).
    `allow_changed_data`: with `resume`, go on although the data files changed since the run started (recorded in
    run.json's resume entry); else that is refused (ftune/data/fingerprint.py)."""
    console = console or Console(stderr=True)
    run = prepare(recipe, resume=resume, overwrite=overwrite, console=console, allow_changed_data=allow_changed_data)
    try:
        return _fit(run, console)
    finally:
        run.release()  # the output_dir's lock; the kernel releases it too if this process is killed


def _fit(run: Run, console: Console) -> dict:
    t, pos, acc, model = run.recipe.train, run.pos, run.accelerator, run.model
    n_trainable, n_total = run.counts
    console.print(
        f"[bold]{run.method.name}[/]: {n_trainable:,} of {n_total:,} parameters train "
        f"({100 * n_trainable / n_total:.3f}%); {run.total_steps} steps on {acc.device} "
        f"× {acc.num_processes}, {run.precision}"
    )
    if run.main:
        _truncate_log(run.out, pos.step, run.total_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    micro_batches = _micro_batches(run.train_loader, pos, accelerated=acc.device.type == "cuda")
    window_tokens, window_start, started = 0, time.perf_counter(), time.perf_counter() - pos.train_seconds
    skips_in_a_row = 0
    model.train()
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[stats]}"),
        console=console,
        disable=not (console.is_terminal and run.main),
        transient=True,
    )
    bar = progress.add_task("train", total=run.total_steps, completed=pos.step, stats="")
    with progress:
        out_of_time = False
        while pos.step < run.total_steps and not out_of_time:
            batches = [next(micro_batches) for _ in range(t.grad_accum)]
            # the step's loss is the mean over every row or token it sees, on every process: its count comes first
            step_count = processes.total(acc, sum(run.objective.count(b) for b in batches)).clamp(min=1)
            tokens = sum(token_count(b) for b in batches)  # host tensors: no device sync
            step_loss = torch.zeros((), device=acc.device)
            for i, batch in enumerate(batches):
                batch = {k: v.to(acc.device, non_blocking=True) for k, v in batch.items()}
                # gradients are reduced across processes once per step, on its last micro-batch
                with nullcontext() if i == len(batches) - 1 else acc.no_sync(model):
                    step_loss += step.micro_step(
                        model,
                        batch,
                        run.objective.loss,
                        scale=acc.num_processes / step_count,  # undoes DDP's mean
                        loss_term=run.method.hooks.loss_term,
                        term_model=run.raw_model,
                        grad_accum=t.grad_accum,
                        autocast=acc.autocast,
                        backward=acc.backward,
                    )
            # fp16's loss scaler skips overflowing steps itself (routine, not an error): no norm unless clipping
            unscaled = acc.scaler is None or t.max_grad_norm
            norm = (
                step.gradient_norm(params, t.max_grad_norm, partial(_clip, acc))
                if unscaled
                else torch.zeros((), device=acc.device)
            ).float()
            # the step's one collective and one host read (none per micro-batch): loss, norm, tokens and clocks over
            # every process, so a non-finite value anywhere, or train.max_seconds, is every process's decision
            clock = torch.tensor([float(tokens), time.perf_counter() - started], device=norm.device)
            seen = processes.total(acc, torch.cat([torch.stack([step_loss.float(), norm]), clock]))
            loss_all, norm_all, tokens_all, seconds_all = seen.tolist()
            bad = _why_bad(loss_all, norm_all) if acc.scaler is None else None
            if bad:  # nothing of this step reaches the weights, the optimizer or the scheduler
                if t.on_nonfinite == "stop":
                    raise _stopped(run, bad)
                run.optimizer.zero_grad(set_to_none=True)
                pos.skipped_steps += 1
                skips_in_a_row += 1
                console.print(f"step {pos.step + 1}: {bad}; skipped (train.on_nonfinite: skip)", soft_wrap=True)
                if skips_in_a_row >= MAX_SKIPS_IN_A_ROW:
                    raise _stopped(run, f"{skips_in_a_row} steps in a row skipped, the last for a {bad}")
                continue
            skips_in_a_row = 0
            step_end = run.method.hooks.on_step_end and partial(
                run.method.hooks.on_step_end, run.raw_model, pos.step + 1, run.total_steps
            )
            step.update(run.optimizer, run.scheduler, step_end)
            pos.step += 1
            pos.window_steps += 1
            pos.window_loss += loss_all / acc.num_processes
            window_tokens += tokens_all
            pos.tokens += round(tokens_all)
            pos.train_seconds = time.perf_counter() - started
            out_of_time = t.max_seconds is not None and seconds_all / acc.num_processes >= t.max_seconds
            done = pos.step

            if done % t.log_every == 0 or done == run.total_steps or out_of_time:
                span = time.perf_counter() - window_start
                entry = {
                    "step": done,
                    "loss": pos.window_loss / pos.window_steps,
                    "lr": run.scheduler.get_last_lr()[0],
                    "tokens_per_s": window_tokens / span,
                    "epoch": pos.epoch,
                    "skipped_steps": pos.skipped_steps,
                }
                _log(run, entry)
                progress.update(
                    bar, stats=f"loss {entry['loss']:.4f}  lr {entry['lr']:.2e}  {entry['tokens_per_s']:,.0f} tok/s"
                )
                pos.window_loss, pos.window_steps, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
            progress.update(bar, completed=done)

            last = done == run.total_steps or out_of_time  # the final evaluation and save follow the loop
            if run.val_loader and t.eval_every and done % t.eval_every == 0 and not last:
                metrics = _score(run)
                _log(run, {"step": done, "validation": metrics})
                console.print(f"step {done}: " + "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()), soft_wrap=True)
                _plot(run, console)
                if t.best_metric:
                    _keep_if_best(run, metrics)
            if t.save_every and done % t.save_every == 0 and not last:
                _save_checkpoint(run)

    micro_batches.close()  # stops the thread that collates ahead
    return _finish(run, console)


def _finish(run: Run, console: Console) -> dict:
    """After the last step: the final evaluation, the weights kept (the best, or the last), the final checkpoint, the
    method's report and metrics.json; every process returns the metrics."""
    t, pos, acc = run.recipe.train, run.pos, run.accelerator
    n_trainable, n_total = run.counts
    final = _score(run) if run.val_loader else {}
    if final:
        _log(run, {"step": pos.step, "validation": final})
    _plot(run, console)
    if not t.best_metric or not final:
        _save_weights(run, final)
    else:
        _keep_if_best(run, final)
    _save_checkpoint(run)
    result = {
        "step": pos.step,
        "skipped_steps": pos.skipped_steps,
        "train_seconds": round(pos.train_seconds, 2),
        "train_tokens": pos.tokens,
        "trainable_params": n_trainable,
        "total_params": n_total,
        "validation": final,
        "best": {t.best_metric: pos.best} if t.best_metric else None,
    }
    if run.method.hooks.report:  # read after the final evaluation, which the report may summarise
        result["method_report"] = run.method.hooks.report(run.raw_model)
        if run.main:
            rundir.write_json(run.out / rundir.METHOD_REPORT, result["method_report"])
    if run.main:
        rundir.write_json(run.out / rundir.METRICS, result)
    trackers.finish(acc)
    processes.barrier(acc)  # no process leaves before the run directory is complete
    return result


def _micro_batches(loader, pos: Position, accelerated: bool):
    """This process's micro-batches from `pos` on, epoch after epoch; `pos.epoch`/`pos.batch` follow what was taken.

    `accelerated` (CUDA): a background thread collates ahead into pinned memory while the device computes; what it
    holds unread is not counted. On CPU the batches are collated inline: torch's threads already use every core, and
    a collating thread beside them slows training (measured in the commit that made it so)."""
    while True:
        loader.batch_sampler.set_position(pos.epoch, pos.batch)
        for batch in prefetch.ahead(loader, pin=True) if accelerated else loader:
            pos.batch += 1
            yield batch
        pos.epoch, pos.batch = pos.epoch + 1, 0


def _clip(acc, params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """accelerate's clipping (it unscales fp16 gradients first), as one tensor on the device."""
    norm = acc.clip_grad_norm_(params, max_norm)
    # sharded gradients (FSDP2) give the norm as a DTensor of partial sums: made whole, it is the full norm
    return norm.full_tensor() if hasattr(norm, "full_tensor") else torch.as_tensor(norm, device=acc.device)


def _why_bad(loss: float, norm: float) -> str | None:
    """Why the step must be dropped: loss and gradient norm summed over the processes (a NaN anywhere stays one)."""
    if not math.isfinite(loss):
        return f"non-finite loss ({loss})"
    if not math.isfinite(norm):
        return f"non-finite gradient norm ({norm})"
    return None


def _stopped(run: Run, why: str) -> TrainingError:
    """The step being taken cannot be: nothing of it is saved."""
    latest = rundir.latest_checkpoint(run.out)
    kept = f"the last checkpoint, {latest.relative_to(run.out)}, is intact" if latest else "no checkpoint was saved yet"
    hint = ", or set train.on_nonfinite: skip" if run.recipe.train.on_nonfinite == "stop" else ""
    return TrainingError(
        f"step {run.pos.step + 1} of {run.total_steps}: {why}; training stopped without saving this "
        f"step ({kept}). Lower train.lr or check the data{hint}"
    )


def _score(run: Run) -> dict:
    gather = (lambda scorer: processes.gather(run.accelerator, scorer)) if run.accelerator.num_processes > 1 else None
    return evaluate(
        run.model,
        run.val_loader,
        run.task,
        run.label_names,
        run.accelerator.device,
        run.precision,
        gather,
        run.decoding,
        run.objective.evaluation,
    )


def _log(run: Run, entry: dict) -> None:
    if run.main:
        rundir.append_line(run.out / rundir.METRICS_LOG, json.dumps(entry))
        run.accelerator.log(trackers.scalars(entry), step=entry["step"])  # train.report_to's trackers, if any


def _plot(run: Run, console: Console) -> None:
    """Redraw loss.png (main process); a failure is one warning line, never the end of the run."""
    if run.main and (failure := plots.refresh(run.out)):
        console.print(f"warning: {failure}", soft_wrap=True, markup=False, highlight=False)


def _keep_if_best(run: Run, metrics: dict) -> None:
    t = run.recipe.train
    if t.best_metric not in metrics:  # e.g. f1 where the tags are not IOB2: known only once scored
        raise TrainingError(
            f"train.best_metric: {t.best_metric!r} is not a validation metric of this run; "
            f"use one of {', '.join(k for k, v in metrics.items() if isinstance(v, float))}"
        )
    value, best = metrics[t.best_metric], run.pos.best
    if best is None or (value > best if t.best_mode == "max" else value < best):
        run.pos.best = value
        _save_weights(run, {t.best_metric: value})


def _save_weights(run: Run, metrics: dict) -> None:
    # every process: a sharded model gathers its weights whole (a collective)
    tensors = (
        fsdp.gathered_weights(run.raw_model) if sharded(run.accelerator) else run.method.saving.weights(run.raw_model)
    )
    if run.main:
        meta = {
            "method": run.recipe.method.name,
            "config": run.recipe.method.model_dump(mode="json"),
            "step": run.pos.step,
            "metrics": metrics,
        }
        checkpoint.save_weights(run.out, run.raw_model, meta, tensors)


def _save_checkpoint(run: Run) -> None:
    state = run.method.hooks.resume.save(run.raw_model) if run.method.hooks.resume else None
    rng = processes.gather(run.accelerator, checkpoint.rng_state())  # each process draws its own dropout masks
    gathered = None
    if sharded(run.accelerator):
        gathered = (fsdp.gathered_weights(run.raw_model), fsdp.gathered_optimizer(run.raw_model, run.optimizer))
    if run.main:
        checkpoint.save_checkpoint(
            run.out,
            run.pos.step,
            run.raw_model,
            run.optimizer,
            run.scheduler,
            state_of(run.pos),
            run.recipe.train.keep_checkpoints,
            state,
            rng,
            gathered,
        )
    processes.barrier(run.accelerator)


def _truncate_log(out: Path, step: int, total_steps: int) -> None:
    """Drop log lines past `step`: a resumed run rewrites them, exactly as the uninterrupted run would.

    The final evaluation (a validation line at total_steps) is always rerun, so a run resumed from its final
    checkpoint drops that line too rather than log it twice. Appending is not atomic: a kill can leave a torn last
    line, which the bounded reader skips (it was past the checkpoint, and is rewritten)."""
    if (out / rundir.METRICS_LOG).exists():
        kept = [
            e
            for e in rundir.read_metrics_log(out)
            if e["step"] <= step and not ("validation" in e and e["step"] >= total_steps)
        ]
        rundir.write_text(out / rundir.METRICS_LOG, "".join(json.dumps(e) + "\n" for e in kept))
