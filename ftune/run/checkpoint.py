"""Resumable checkpoints and a method's weights in a run directory (whose layout ftune/rundir owns).

    checkpoints/step-N/    method.safetensors, method.json, optimizer.pt, state.json (and method_state.safetensors for
                           a method with training state, e.g. AdaLoRA)

A checkpoint is written as checkpoints/.step-N.tmp/ and renamed when whole; it counts as complete only with its
state.json (written last, deleted first). What a kill leaves half-written or half-deleted is ignored, and swept away
by --resume. A save that fails (a full disk) removes what it began and leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ftune import rundir
from ftune.errors import RunDirError
from ftune.rundir import load_weights, saved_buffers


def save_weights(
    folder: Path, model: nn.Module, meta: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None
) -> None:
    """The method's weights as safetensors (default: the trainable parameters and the buffers the method's modules
    name in `saved_buffers`), plus `meta` as method.json."""
    if tensors is None:
        tensors = {n: p for n, p in model.named_parameters() if p.requires_grad} | saved_buffers(model)
    _save_tensors(folder / rundir.WEIGHTS, tensors, str(meta.get("method")))
    rundir.write_json(folder / rundir.METHOD_META, meta)


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], method: str) -> None:
    tmp = rundir.temporary(path)
    try:
        save_file(
            {n: t.detach().cpu().contiguous() for n, t in tensors.items()},
            str(tmp),
            metadata={"format": "pt", "method": method},
        )
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:
        tmp.unlink(missing_ok=True)
        raise RunDirError(
            f"{path}: cannot be written ({_reason(e)}); the previous version, if any, is intact"
        ) from None


def _reason(e: BaseException) -> str:
    return getattr(e, "strerror", None) or (str(e).splitlines() or [type(e).__name__])[0]


def save_checkpoint(
    out: Path,
    step: int,
    model: nn.Module,
    optimizer,
    scheduler,
    state: dict,
    keep: int,
    method_state: dict[str, torch.Tensor] | None = None,
    rng: list[dict] | None = None,
    gathered: tuple[dict, dict] | None = None,
) -> None:
    """A resumable checkpoint, written under a temporary name and renamed only when complete. A failure (a full
    disk) removes the temporary folder and is one RunDirError line; the previous checkpoint stays as it was.

    `method_state`: what the method needs besides its weights to resume exactly (`Method.hooks.resume`).
    `rng`: every process's random state in rank order (`rng_state()` of each); default this process's alone.
    `gathered`: (weights, optimizer state) already gathered whole from a sharded model (ftune/run/fsdp.py); default
    the model's trainable parameters and the optimizer's own state dict.
    """
    root = out / rundir.CHECKPOINTS
    final, tmp = root / f"step-{step:08d}", root / f".step-{step:08d}.tmp"
    if (final / rundir.STATE).is_file():
        # steps only move forward, so a complete checkpoint of this step holds this very state (a run resumed from
        # its final checkpoint); replacing it would open a window with no checkpoint at all
        rotate_checkpoints(out, keep)
        return
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        weights, optimizer_state = gathered or (None, optimizer.state_dict())
        save_weights(tmp, model, {"step": step}, weights)
        if method_state is not None:
            _save_tensors(tmp / rundir.METHOD_STATE, method_state, "state")
        torch.save(
            {"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "rng": rng or [rng_state()]},
            tmp / rundir.OPTIMIZER,
        )
        rundir.write_json(tmp / rundir.STATE, state)  # last: its presence is what makes a checkpoint complete
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    except (OSError, RuntimeError, RunDirError) as e:  # torch.save reports a full disk as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        latest = rundir.latest_checkpoint(out)
        kept = f"the previous checkpoint, {latest.relative_to(out)}, is intact" if latest else "no checkpoint was kept"
        raise RunDirError(f"{final}: cannot be written ({_reason(e)}); {kept}") from None
    rotate_checkpoints(out, keep)


def rotate_checkpoints(out: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints."""
    for old in rundir.complete_checkpoints(out)[:-keep]:
        _delete_checkpoint(old)


def _delete_checkpoint(folder: Path) -> None:
    # state.json first: a kill mid-delete then leaves an incomplete folder (ignored, swept on resume), never one
    # that still looks complete with its weights or optimizer state already gone
    (folder / rundir.STATE).unlink(missing_ok=True)
    shutil.rmtree(folder)


def load_checkpoint(
    folder: Path, model: nn.Module, optimizer, scheduler, load_method_state=None, rank: int = 0, restore_sharded=None
) -> dict:
    """Restore weights, optimizer, scheduler and process `rank`'s RNG from `folder`; returns the loop position.

    `load_method_state(model, tensors)` restores what `save_checkpoint` got as `method_state`.
    `restore_sharded(weights, optimizer_state)` hands whole tensors to a sharded model (ftune/run/fsdp.py: load).
    """
    if restore_sharded is None:
        load_weights(folder, model)
    if load_method_state is not None:
        try:
            load_method_state(model, load_file(str(rundir.weights_file(folder, rundir.METHOD_STATE))))
        except (FileNotFoundError, SafetensorError, OSError) as e:
            raise RunDirError(f"{folder / rundir.METHOD_STATE}: cannot be read ({str(e).splitlines()[0]})") from None
    saved = rundir.read_optimizer(folder)
    if restore_sharded is None:
        optimizer.load_state_dict(saved["optimizer"])
    else:
        restore_sharded(rundir.read_weights(folder), saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    states = saved["rng"] if isinstance(saved["rng"], list) else [saved["rng"]]
    if rank >= len(states):
        raise RunDirError(
            f"--resume: {folder} was written by {len(states)} process(es); resume with as many "
            "(the data order and random streams are per process)"
        )
    _set_rng_state(states[rank])
    return rundir.read_json(folder, rundir.STATE)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
