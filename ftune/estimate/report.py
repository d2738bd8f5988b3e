"""The memory estimate of a recipe, itemised, and the table `ftune validate` prints.

Weights are counted from the built model itself, at the size each tensor takes (a bitsandbytes 4-bit weight at its
packed size plus its quantisation constants; tied weights once), with any frozen model the objective reads (a
teacher). Gradients, optimizer state, activations and temporaries come from the simulated step (simulate.py), with
gradient checkpointing as the recipe sets it and, for comparison, the other way.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from ftune.estimate import step
from ftune.estimate.measure import Measured, measure
from ftune.estimate.simulate import KINDS, Footprint, simulate
from ftune.recipe import Recipe


@dataclass(frozen=True)
class Estimate:
    weights: dict[str, int]
    """Bytes of the weights (and buffers) by storage type: "float32", "bfloat16", "nf4 4-bit", ..."""
    trainable: int
    """Trainable parameters."""
    gradient_bytes: int
    """Their gradients' bytes (each in its parameter's dtype)."""
    batch: tuple[int, int, int]
    """(micro-batch rows, tokens per row, micro-batches per step)."""
    precision: str
    optimizer: str
    device: str
    checkpointing: bool
    """train.gradient_checkpointing, as `step` was simulated."""
    step: Footprint
    other: Footprint | None
    """The step with gradient checkpointing the other way; None where the method cannot be checkpointed (or it was
    not asked for)."""
    measured: Measured | None = None

    @property
    def weight_bytes(self) -> int:
        return sum(self.weights.values())

    @property
    def peak(self) -> int:
        return self.weight_bytes + self.step.peak


def estimate_recipe(
    recipe: Recipe,
    model: nn.Module,
    tokenizer,
    names: list[str] | None,
    rows,
    measure_steps: int | None = None,
    device: torch.device | None = None,
    both_ways: bool = True,
) -> Estimate:
    """The estimate for `recipe` with `model` (as assemble.build_model made it, with class `names`), its batch made
    from the first training `rows`. `measure_steps`: also run the step for real, timing that many steps after the
    measured ones (the model trains). `device`: where training would run (default: CUDA if present, else CPU).
    `both_ways`: also simulate the step with gradient checkpointing the other way."""
    from ftune.methods import method_of

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    setup, batch = step.prepare_step(recipe, model, tokenizer, names, rows, device)
    checkpointing = recipe.train.gradient_checkpointing
    footprint = simulate(model, batch, setup, checkpointing)
    if both_ways and method_of(recipe.method).runs_with.gradient_checkpointing:
        other = simulate(model, batch, setup, not checkpointing)
    else:
        other = None
    measured = measure(model, batch, setup, checkpointing, measure_steps) if measure_steps else None
    trained = [p for p in model.parameters() if p.requires_grad]
    return Estimate(
        weight_bytes_by_type(model, *setup.extra_models.values()),
        sum(p.numel() for p in trained),
        sum(p.numel() * p.element_size() for p in trained),
        (batch["input_ids"].shape[0], batch["input_ids"].shape[1], setup.grad_accum),
        setup.precision,
        recipe.train.optimizer,
        device.type,
        checkpointing,
        footprint,
        other,
        measured,
    )


def weight_bytes_by_type(*models: nn.Module) -> dict[str, int]:
    """Bytes of every parameter and buffer of `models`, by storage type; a tensor shared by several (tied
    embeddings) once. A bitsandbytes 4-bit weight counts its packed bytes and its quantisation constants (absmax
    per block, and their own constants under double quantisation); an 8-bit one its int8 bytes and row scales."""
    sizes: Counter[str] = Counter()
    seen: set[int] = set()

    def add(label: str, tensor) -> None:
        if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in seen:
            seen.add(tensor.untyped_storage().data_ptr())
            sizes[label] += tensor.untyped_storage().nbytes()

    for module in (m for model in models for m in model.modules()):
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            state = getattr(tensor, "quant_state", None)
            label = f"{state.quant_type} 4-bit" if state is not None else str(tensor.dtype).removeprefix("torch.")
            add(label, tensor)
            while state is not None:  # absmax per block, the code book, and their own constants (double quant)
                for constant in (state.absmax, state.code, getattr(state, "offset", None)):
                    add(label, constant)
                state = getattr(state, "state2", None)
            add(label, getattr(tensor, "SCB", None))  # LLM.int8()'s row scales, on the weight until the first forward
        add("int8", getattr(getattr(module, "state", None), "SCB", None))  # ... and on the layer after it
    return dict(sizes)


def render(e: Estimate):
    """The rich table of `e` (a row per part: its whole size, and what of it is held at the step's peak) and the
    lines that go under it."""
    from rich.table import Table

    rows, length, accum = e.batch
    title = (
        f"memory of one training step, estimated: {rows} rows × {length} tokens"
        f"{f' × {accum} micro-batches' if accum > 1 else ''}, {e.precision}, {e.optimizer}, on {e.device}, "
        f"gradient checkpointing {'on' if e.checkpointing else 'off'}"
    )
    table = Table(title=title, title_justify="left", show_edge=False)
    for column in ("part", "size", "held at the peak"):
        table.add_column(column, justify="left" if column == "part" else "right")
    for label, size in sorted(e.weights.items(), key=lambda kv: -kv[1]):
        table.add_row(f"weights ({label})", size_text(size), size_text(size))
    s = e.step
    parts = {
        "gradients": (f"gradients ({e.trainable:,} trainable)", e.gradient_bytes),
        "optimizer state": (f"optimizer state ({e.optimizer})", s.optimizer_state),
        "activations": ("activations (saved for backward)", s.saved_for_backward),
        "temporaries": ("backward temporaries", None),
        "optimizer scratch": ("optimizer step scratch", None),
    }
    for kind in KINDS:
        label, size = parts[kind]
        table.add_row(label, "" if size is None else size_text(size), size_text(s.at_peak[kind]))
    table.add_row("[bold]peak[/]", "", f"[bold]{size_text(e.peak)}[/]")
    lines = [f"the peak falls in the {s.phase}; {s.flops / 1e9:,.3g} GFLOP per optimizer step"]
    if e.other is not None:
        lines.append(
            f"with gradient checkpointing {'off' if e.checkpointing else 'on'}: peak "
            f"{size_text(e.weight_bytes + e.other.peak)} (activations saved for backward "
            f"{size_text(e.other.saved_for_backward)})"
        )
    if e.measured:
        m = e.measured
        lines.append(
            f"measured: {size_text(e.weight_bytes + m.peak)} at the peak (the step: {size_text(m.peak)} "
            f"against {size_text(s.peak)} estimated, ratio {s.peak / max(1, m.peak):.3f})"
            + (f"; resident memory rose {size_text(m.resident_rise)}" if m.resident_rise is not None else "")
            + f"; {m.seconds_per_step:.3g} s per optimizer step (mean of {m.steps})"
        )
    lines.append(NOTE)
    return table, lines


NOTE = (
    "assumes every row is data.max_length tokens long (the loop pads each batch to its longest row), one "
    "process and the eager step (not train.compile's); counts tensors only: not the CUDA context, the allocator's "
    "cache, kernels' scratch space, evaluation, or a method's calibration before training (a sparse mask)"
)


def size_text(size: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:,.1f} {unit}"
    return f"{size} B"
