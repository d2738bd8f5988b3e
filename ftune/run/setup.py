"""Everything the training loop starts from, built in order: processes, data, model and method, objective,
optimizer and schedule, the run directory (written only once all of that has loaded), and a resumed position."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from rich.console import Console
from torch import nn
from torch.utils.data import DataLoader

from ftune import assemble, models, rundir, trackers
from ftune.data import fingerprint, packing
from ftune.data.loader import make_loader
from ftune.errors import RecipeError, RunDirError
from ftune.kernels import linear_ce
from ftune.methods import method_of
from ftune.methods.base import Method, count_parameters
from ftune.models.arch import transformer_blocks
from ftune.models.precision import resolve_precision
from ftune.objectives import Bound
from ftune.recipe import Recipe, dump_recipe
from ftune.run import checkpoint, compiling, fsdp, processes
from ftune.rundir import RunLock
from ftune.step.optim import lr_multiplier, training_optimizer
from ftune.tasks import Decoding, Task


@dataclass
class Position:
    """Where training is; saved in every checkpoint (state.json) and restored by --resume, so a resumed run logs and
    decides exactly as the uninterrupted one."""

    step: int = 0
    """Optimizer steps taken."""
    epoch: int = 0
    batch: int = 0
    """Global micro-batches of this epoch consumed (each is `world` processes' micro-batches)."""
    best: float | None = None
    """Best value of train.best_metric so far."""
    train_seconds: float = 0.0
    window_loss: float = 0.0
    """Sum of the step losses since the last log line (the mean over processes)."""
    window_steps: int = 0
    skipped_steps: int = 0
    tokens: int = 0
    """Input tokens of the applied steps, padding left out, over every process (metrics.json: train_tokens)."""


@dataclass
class Run:
    """What `prepare` built for the loop."""

    recipe: Recipe
    out: Path
    accelerator: Accelerator
    precision: str
    model: nn.Module
    """As prepared by accelerate (DDP/FSDP-wrapped with several processes); `raw_model` is the module itself."""
    raw_model: nn.Module
    method: Method
    task: Task
    objective: Bound
    optimizer: Any
    scheduler: Any
    train_loader: DataLoader
    val_loader: DataLoader | None
    decoding: Decoding | None
    """What scoring needs besides the model for a task that generates (assemble.decoding)."""
    label_names: list[str] | None
    total_steps: int
    counts: tuple[int, int]
    """(trainable, total) parameters."""
    pos: Position
    lock: RunLock | None = None
    """The output_dir's lock, held by the main process until the run ends (released by `train`)."""

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def release(self) -> None:
        """Let go of the output_dir (the run has ended, or failed)."""
        if self.lock is not None:
            self.lock.release()


def accelerator_for(recipe: Recipe, method: Method, precision: str) -> Accelerator:
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    # accelerate keeps one mixed-precision setting per interpreter; a second run in the same process (a notebook,
    # `ftune compare`, tests) may ask for another. The process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    # a method that skips some of its parameters in a step (AdapterDrop) must say so, or DDP waits for their gradients
    ddp = DistributedDataParallelKwargs(find_unused_parameters=method.runs_with.unused_parameters)
    sharding = None
    if recipe.train.distributed == "fsdp":
        from accelerate import FullyShardedDataParallelPlugin

        fsdp.check(
            method.name, method.saving.own_form is not None, bool(method.hooks.on_step_end or method.hooks.resume)
        )
        # the unit class (the transformer block) is named once the model is built, before prepare wraps it
        sharding = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            auto_wrap_policy="transformer_based_wrap",
            state_dict_type="FULL_STATE_DICT",
            reshard_after_forward=True,
        )
    # cpu=True where there is no GPU: several CPU processes then form a gloo process group (accelerate's MULTI_CPU)
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision={"fp32": "no"}.get(precision, precision),
        kwargs_handlers=[ddp],
        fsdp_plugin=sharding,
        **trackers.accelerator_options(recipe.train.report_to, Path(recipe.output_dir)),
    )


def prepare(
    recipe: Recipe, *, resume: bool, overwrite: bool, console: Console, allow_changed_data: bool = False
) -> Run:
    t, out = recipe.train, Path(recipe.output_dir)
    # fail before any work; the main process checks again under the lock before it writes
    rundir.check_output_dir(
        out, dump_recipe(recipe), resume=resume, overwrite=overwrite, probe_lock=os.environ.get("RANK", "0") == "0"
    )
    # the data as it is now, hashed before it is read: run.json records it, and --resume refuses data changed since
    # the run started (unless allow_changed_data), on every process alike, before any collective
    data_prints = fingerprint.data_fingerprints(recipe.data, assemble.recipe_task(recipe).reads_conll)
    changed_data = fingerprint.check_resume(
        rundir.read_record(out) if resume else None, data_prints, resume=resume, allow_changed_data=allow_changed_data
    )
    precision = resolve_precision(t.precision)
    if precision == "fp16" and not torch.cuda.is_available():
        raise RecipeError("train.precision: fp16 mixed precision needs a CUDA GPU; use bf16 or fp32 on CPU")
    method, task = method_of(recipe.method), assemble.recipe_task(recipe)
    accelerator = accelerator_for(recipe, method, precision)
    console.quiet = not accelerator.is_main_process  # progress and notes once; errors still reach every stderr
    rank, world = accelerator.process_index, accelerator.num_processes
    per_device = t.batch_size if t.batch_scope == "per_device" else t.batch_size // world
    if t.batch_scope == "global" and t.batch_size % world:
        raise RecipeError(
            f"train.batch_size: {t.batch_size} (global) does not split over {world} processes; "
            f"use a multiple of {world} or batch_scope: per_device"
        )
    from accelerate.utils import set_seed

    set_seed(t.seed)

    source, tokenizer = assemble.source_and_tokenizer(recipe)
    (names, train_set, val_set), data_note = assemble.encoded_splits(recipe, tokenizer)  # tokenised once (data.cache)
    model = assemble.build_model(recipe, source, tokenizer, names)
    # the objective checks the data and adds its per-example values (a teacher's logits); the task's own loss comes
    # from hidden states where that is exact for this model (logits only where labels are kept)
    bound, train_set.examples, extra = assemble.bind_objective(
        recipe,
        model,
        tokenizer,
        accelerator.device,
        precision,
        names,
        task=linear_ce.training_task(task, model, sharded(accelerator)),
        examples=train_set.examples,
    )
    if recipe.data.packing:  # before anything is written: examples and model must allow it
        packing.check_examples(train_set.examples)
        packing.require_isolation(model, train_set.examples)
    if t.gradient_checkpointing:
        models.set_gradient_checkpointing(model, True)
    if method.hooks.calibrate and not resume:  # a sparse mask, L2-SP's w0: before the optimizer; a resumed run has them
        model.to(accelerator.device)
        every_row = make_loader(train_set.examples, per_device, tokenizer.pad_token_id, t.seed, True)  # same on all
        method.hooks.calibrate(model, recipe.method, every_row, bound.loss)
    counts = count_parameters(model)
    compile_note = compiling.compile_model(
        model, t.compile, accelerator.device, sharded(accelerator), recipe.model.quantization is not None
    )
    train_loader, val_loader = _loaders(recipe, train_set.examples, val_set, tokenizer, per_device, rank, world)

    steps_per_epoch = math.ceil(len(train_loader) / t.grad_accum)
    total_steps = t.max_steps or math.ceil(t.epochs * steps_per_epoch)
    if method.hooks.check_total_steps:  # before anything is written
        method.hooks.check_total_steps(recipe.method, total_steps)
    warmup = t.warmup_steps or round(t.warmup_ratio * total_steps)
    optimizer = training_optimizer(
        t, model, method.hooks.decay_exempt, fused=accelerator.device.type == "cuda" and not sharded(accelerator)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(t.scheduler, warmup, total_steps))
    if sharded(accelerator):
        accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap = [type(transformer_blocks(model)[0]).__name__]
    # the schedule stays ftune's: accelerate would step a prepared one once per process per optimizer step
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    from ftune.run import preflight

    # lengths against the positions, the tokenizer against the embedding, the step's memory, the disk: refused here
    preflight.check(
        recipe,
        raw_model,
        tokenizer,
        train_set.examples,
        bound,
        extra,
        precision,
        accelerator,
        console,
        overwrite=overwrite,
    )

    # nothing is written until the recipe, data and model have all loaded; then only by the main process, which
    # holds the output_dir's lock until the run ends (Run.lock)
    resume_from, run_lock = rundir.latest_checkpoint(out) if resume else None, None
    if accelerator.is_main_process:
        record = (
            None
            if resume
            else _record(
                recipe,
                source,
                counts,
                names,
                train_set,
                val_set,
                total_steps,
                precision,
                accelerator,
                per_device,
                data_prints,
            )
        )
        run_lock, resume_from = rundir.prepare_output_dir(
            out, dump_recipe(recipe), record, resume=resume, overwrite=overwrite
        )
    run = Run(
        recipe,
        out,
        accelerator,
        precision,
        model,
        raw_model,
        method,
        task,
        bound,
        optimizer,
        scheduler,
        train_loader,
        val_loader,
        assemble.decoding(recipe, tokenizer),
        names,
        total_steps,
        counts,
        Position(),
        run_lock,
    )
    try:
        data_notes = [f"data: {line}" for line in data_note.splitlines()]  # the cache, then what was cut or dropped
        _start(run, tokenizer, resume_from, [*data_notes, compile_note], console, changed_data)
    except BaseException:
        run.release()
        raise
    return run


def _loaders(
    recipe: Recipe, examples: list[dict[str, Any]], val_set, tokenizer, per_device: int, rank: int, world: int
) -> tuple[DataLoader, DataLoader | None]:
    """This process's training batches (its shard, resumable) and its shard of the validation rows."""
    t = recipe.train
    # packed rows have no padding to group away; grouping keeps whole optimizer steps together (step_batches)
    train_loader = make_loader(
        examples,
        per_device,
        tokenizer.pad_token_id,
        t.seed,
        True,
        rank,
        world,
        group_by_length=t.group_by_length and not recipe.data.packing,
        step_batches=t.grad_accum,
        collate_fn=packing.collate_packed if recipe.data.packing else None,
    )
    return train_loader, val_set and assemble.eval_loader(recipe, val_set.examples[rank::world], tokenizer)


def _record(
    recipe: Recipe,
    source: str,
    counts: tuple[int, int],
    names,
    train_set,
    val_set,
    total_steps: int,
    precision: str,
    accelerator: Accelerator,
    per_device: int,
    data_prints: dict,
) -> rundir.RunRecord:
    """run.json of a new run: the environment, the seed, the data and model as they were, the run's shape."""
    world = accelerator.num_processes
    return rundir.RunRecord.model_validate(
        {
            **rundir.environment(),
            "seed": recipe.train.seed,
            "model_source": source,
            "trainable_params": counts[0],
            "total_params": counts[1],
            "label_names": names,
            "train_source": train_set.source,
            "train_examples": len(train_set.examples),
            "train_rows_dropped": train_set.dropped,
            "train_rows_truncated": train_set.truncated,
            "validation_rows_truncated": val_set and val_set.truncated,
            "validation_source": val_set and val_set.source,
            "total_steps": total_steps,
            "precision": precision,
            "device": str(accelerator.device),
            "world_size": world,
            "distributed": str(accelerator.distributed_type.value).lower(),
            "batch_per_device": per_device,
            "global_batch": per_device * world * recipe.train.grad_accum,
            "fingerprints": {
                "data": data_prints,
                "model": fingerprint.model_fingerprints(source, fingerprint.model_cache()),
            },
        }
    )


def _start(
    run: Run,
    tokenizer,
    resume_from: Path | None,
    notes: list[str | None],
    console: Console,
    changed_data: dict[str, dict] | None = None,
) -> None:
    """The rest of `prepare` once the run directory is ready: the tokenizer saved (a new run) or the resume noted,
    the checkpoint restored into `run.pos`, trackers started."""
    accelerator, out = run.accelerator, run.out
    if run.main and not resume_from:  # a resumed run keeps the tokenizer/ and run.json it started with
        save_tokenizer(tokenizer, out / rundir.TOKENIZER)
    processes.barrier(accelerator)  # the run dir is ready before any process reads a checkpoint from it
    if resume_from:
        restore = (lambda w, o: fsdp.load(run.raw_model, run.optimizer, w, o)) if sharded(accelerator) else None
        state = checkpoint.load_checkpoint(
            resume_from,
            run.raw_model,
            run.optimizer,
            run.scheduler,
            run.method.hooks.resume and run.method.hooks.resume.load,
            rank=accelerator.process_index,
            restore_sharded=restore,
        )
        run.pos = Position(**{k: v for k, v in state.items() if k in Position.__dataclass_fields__})
        if run.main:  # noted once the checkpoint has loaded: a resume that fails leaves no entry behind
            accepted = {"changed_data": changed_data} if changed_data else {}  # --allow-changed-data: what changed
            rundir.note_resume(out, resume_from, rundir.environment() | accepted)
        console.print(f"resuming from {resume_from} (step {run.pos.step})", soft_wrap=True)  # a long path stays whole
    for note in notes:  # said once nothing can fail on bad input any more
        if note:
            console.print(note, soft_wrap=True, markup=False, highlight=False)
    trackers.start(accelerator, run.recipe.train.report_to, run.recipe.model_dump(mode="json"), out, run.pos.step)


def save_tokenizer(tokenizer, folder: Path) -> None:
    """The tokenizer beside the weights; a failure (a full disk) is one line."""
    try:
        tokenizer.save_pretrained(folder)
    except OSError as e:
        raise RunDirError(f"{folder}: cannot be written ({e.strerror or type(e).__name__})") from None


def sharded(accelerator: Accelerator) -> bool:
    """Whether the model's parameters are sharded over the processes (FSDP)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def state_of(pos: Position) -> dict[str, Any]:
    return asdict(pos)
