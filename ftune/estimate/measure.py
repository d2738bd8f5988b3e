"""`ftune validate --measure`: the recipe's step run for real, its peak memory and its time on this machine.

The peak is what torch allocated beyond what was held before the first step (the model's weights), at the most:
on CUDA `torch.cuda.max_memory_allocated`; on CPU, where torch keeps no such counter, the running sum of the
allocation and free events torch's profiler records (`profile_memory=True`: every CPU tensor allocation, kernels'
own scratch space included), over the first `MEASURED_STEPS` steps (the first creates the optimizer's state), each
making the random draws the simulated step made (robust AdapterDrop's k; see `measure`). It is the quantity the
estimate predicts. The process's resident memory is reported beside it on Linux (the rise of its high-water mark,
VmHWM, reset first): it also counts what the C allocator keeps after a free, threads' stacks and the profiler's own
records, so it is usually higher and moves from run to run. Time per step is the mean wall time of `steps` further
steps, taken without the profiler. bitsandbytes' paged optimizers keep large states in CUDA unified memory, outside
torch's allocator: `max_memory_allocated` does not see them.
"""

from __future__ import annotations

import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ftune import models
from ftune.estimate import step
from ftune.models import quantize

_STATUS, _CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")
MEASURED_STEPS = 2
"""Steps whose memory is measured: the first creates the optimizer's state, the second holds it throughout."""


@dataclass(frozen=True)
class Measured:
    peak: int
    """Bytes torch allocated beyond what it held before the first step, at the most (see the module docstring)."""
    resident_rise: int | None
    """CPU on Linux: the process's peak resident memory over its resident memory before the first step; else None."""
    seconds_per_step: float
    steps: int
    """Steps timed."""


def measure(
    model: nn.Module, batch: dict[str, torch.Tensor], setup: step.StepSetup, checkpointing: bool, steps: int = 3
) -> Measured:
    """Train `model` (its weights change) for `MEASURED_STEPS` + `steps` steps of `setup` on `batch` (on
    setup.device) with gradient checkpointing on or off, and measure them."""
    models.set_gradient_checkpointing(model, checkpointing)
    if not quantize.is_quantized(model):  # bitsandbytes places a quantised model where it loads it
        model.to(setup.device)
    model.train()
    batches = [{k: v.to(setup.device) for k, v in batch.items()}] * setup.grad_accum
    optimizer = setup.optimizer(model)

    def take_step() -> None:
        step.train_step(model, batches, setup, optimizer)

    drawn_from = torch.get_rng_state()

    def measured_step() -> None:
        # each from the generator's state the simulation drew from (it leaves that state as it was): a step whose
        # size a random draw decides (robust AdapterDrop's k) is measured at the draw the estimate made
        torch.set_rng_state(drawn_from)
        take_step()

    resident_before = _reset_resident_peak() if setup.device.type == "cpu" else None
    if setup.device.type == "cuda":
        torch.cuda.synchronize(setup.device)
        torch.cuda.reset_peak_memory_stats(setup.device)
        held = torch.cuda.memory_allocated(setup.device)
        for _ in range(MEASURED_STEPS):
            measured_step()
        torch.cuda.synchronize(setup.device)
        peak = torch.cuda.max_memory_allocated(setup.device) - held
    else:
        peak = _profiled_peak(measured_step, MEASURED_STEPS)
    resident_rise = _resident_peak() - resident_before if resident_before is not None else None

    started = time.perf_counter()
    for _ in range(steps):
        take_step()
    if setup.device.type == "cuda":
        torch.cuda.synchronize(setup.device)
    return Measured(peak, resident_rise, (time.perf_counter() - started) / max(1, steps), steps)


def _profiled_peak(take_step, steps: int) -> int:
    """The highest running sum of the CPU allocations and frees torch's profiler records over `steps` steps (frees of
    what was allocated before are not recorded, so the sum starts at zero with the steps)."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        for _ in range(steps):
            take_step()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in profiler.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    live = peak = 0
    for _, size in events:
        live += size
        peak = max(peak, live)
    return peak


@contextmanager
def _quiet_stderr():
    """The profiler's own C++ log lines (start, stop, frees it cannot size) would land amid the command's output."""
    keep = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(keep, 2)
            os.close(keep)


def _reset_resident_peak() -> int | None:
    """Reset the process's resident high-water mark (Linux: `5` to clear_refs) and return its resident memory now;
    None where that is not possible."""
    try:
        _CLEAR_REFS.write_text("5")
        return _status_bytes("VmRSS")
    except (OSError, ValueError):
        return None


def _resident_peak() -> int:
    return _status_bytes("VmHWM")


def _status_bytes(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise ValueError(f"{_STATUS} has no {field}")
