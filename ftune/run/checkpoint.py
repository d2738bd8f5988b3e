"""The run directory: its layout, atomic writes, resumable checkpoints, and rebuilding a trained model from it.

    <output_dir>/
      recipe.yaml            the resolved recipe (after --set)
      run.json               versions, git sha, seed, command, parameter counts, data sources, label names (and
                             under "resumes", each --resume: its command, versions, checkpoint)
      metrics.jsonl          one line per log step and per evaluation
      metrics.json           final metrics
      method.safetensors     the method's weights only (best by train.best_metric, else the last)
      method.json            which method, its config, the step the weights come from
      tokenizer/             the tokenizer, so eval/merge/export need nothing else
      checkpoints/step-N/    resumable state: method.safetensors, optimizer.pt, state.json (and
                             method_state.safetensors for a method with training state, e.g. AdaLoRA)

Every file is written to a temporary name, fsynced and renamed, so a crash never leaves half a file behind.
A checkpoint is written as checkpoints/.step-N.tmp/ and renamed when whole; it counts as complete only with its
state.json (written last, deleted first). What a kill leaves half-written or half-deleted is ignored, and swept
away by --resume.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ftune.errors import RunDirError

WEIGHTS, METHOD_META, RECIPE, RUN, TOKENIZER = "method.safetensors", "method.json", "recipe.yaml", "run.json", "tokenizer"
METHOD_STATE = "method_state.safetensors"


def check_run_dir(out: Path, recipe_yaml: str, *, resume: bool, overwrite: bool) -> Path | None:
    """Refuse an unusable `out` (RunDirError); returns the checkpoint to resume from, if resuming."""
    blocking = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        what = "is a file" if blocking == out else f"lies under {blocking}, which is a file"
        raise RunDirError(f"output_dir: {out} {what}, not a folder; choose another output_dir")
    holds_run = (out / RECIPE).is_file()
    if resume:
        if not holds_run:
            raise RunDirError(f"--resume: {out} holds no run to resume; drop --resume to start one")
        if (out / RECIPE).read_text() != recipe_yaml:
            raise RunDirError(f"--resume: the recipe differs from {out / RECIPE}; resume with the same recipe")
        latest = latest_checkpoint(out)
        if latest is None:
            raise RunDirError(f"--resume: {out} has no complete checkpoint (checkpoints/step-*) to resume from")
        return latest
    if out.exists() and any(out.iterdir()):
        if not holds_run:
            raise RunDirError(f"output_dir: {out} exists and is not an ftune run; choose another output_dir")
        if not overwrite:
            raise RunDirError(f"output_dir: {out} holds another run; pass --overwrite or choose another output_dir")
    return None


def prepare_run_dir(out: Path, recipe_yaml: str, *, resume: bool, overwrite: bool) -> Path | None:
    """Make `out` ready. Returns the checkpoint to resume from (or None). Never deletes what is not a run."""
    latest = check_run_dir(out, recipe_yaml, resume=resume, overwrite=overwrite)
    if resume:
        _sweep_checkpoints(out)
        return latest
    if out.exists() and any(out.iterdir()):  # check_run_dir allowed it: an ftune run and --overwrite
        # the recipe goes last (it is replaced below): a kill mid-way leaves a run that --overwrite still accepts,
        # not a folder check_run_dir refuses as "not an ftune run"
        for child in out.iterdir():
            if child.name == RECIPE:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / RECIPE, recipe_yaml)
    return None


def _temporary(path: Path) -> Path:
    """A temporary name beside `path` that no other process or earlier attempt uses (pid and a random suffix)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")


def write_text(path: Path, text: str) -> None:
    tmp = _temporary(path)
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def save_weights(folder: Path, model: nn.Module, meta: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> None:
    """The method's weights as safetensors (default: the trainable parameters and the buffers the method's modules
    name in `saved_buffers`), plus `meta` as method.json."""
    if tensors is None:
        tensors = {n: p for n, p in model.named_parameters() if p.requires_grad} | saved_buffers(model)
    _save_tensors(folder / WEIGHTS, tensors, str(meta.get("method")))
    write_json(folder / METHOD_META, meta)


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], method: str) -> None:
    tmp = _temporary(path)
    save_file({n: t.detach().cpu().contiguous() for n, t in tensors.items()}, str(tmp),
              metadata={"format": "pt", "method": method})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """A run's method.safetensors, or a one-line RunDirError naming it (missing, truncated, not safetensors)."""
    try:
        return load_file(str(Path(folder) / WEIGHTS))
    except (FileNotFoundError, SafetensorError, OSError) as e:
        raise RunDirError(f"{Path(folder) / WEIGHTS}: cannot be read ({str(e).splitlines()[0]})") from None


def load_weights(folder: Path, model: nn.Module) -> None:
    """Load method weights into a freshly attached model: the names must be exactly its trainable parameters and
    `saved_buffers` (a sparse mask's indices, which the values need: loaded first)."""
    tensors = read_weights(folder)
    buffers = saved_buffers(model)
    expected = {n for n, p in model.named_parameters() if p.requires_grad} | buffers.keys()
    missing, unexpected = expected - tensors.keys(), tensors.keys() - expected
    if missing or unexpected:
        which = f"missing {min(missing)}" if missing else f"unexpected {min(unexpected)}"
        raise RunDirError(f"{folder / WEIGHTS}: does not fit this method and model ({which}); was it written by another run?")
    params = dict(model.named_parameters()) | buffers
    with torch.no_grad():
        for name in sorted(tensors, key=lambda n: n not in buffers):
            params[name].copy_(tensors[name])


def saved_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Buffers that are part of a method's weights, by name: those its modules list in `saved_buffers`."""
    return {f"{name}.{b}" if name else b: getattr(m, b) for name, m in model.named_modules()
            for b in getattr(m, "saved_buffers", ())}


def save_checkpoint(out: Path, step: int, model: nn.Module, optimizer, scheduler, state: dict, keep: int,
                    method_state: dict[str, torch.Tensor] | None = None, rng: list[dict] | None = None,
                    gathered: tuple[dict, dict] | None = None) -> None:
    """A resumable checkpoint, written under a temporary name and renamed only when complete.

    `method_state`: what the method needs besides its weights to resume exactly (`Method.training_state`).
    `rng`: every process's random state in rank order (`rng_state()` of each); default this process's alone.
    `gathered`: (weights, optimizer state) already gathered whole from a sharded model (ftune/run/fsdp.py); default
    the model's trainable parameters and the optimizer's own state dict.
    """
    root = out / "checkpoints"
    final, tmp = root / f"step-{step:08d}", root / f".step-{step:08d}.tmp"
    if (final / "state.json").is_file():
        # steps only move forward, so a complete checkpoint of this step holds this very state (a run resumed from
        # its final checkpoint); replacing it would open a window with no checkpoint at all
        rotate_checkpoints(out, keep)
        return
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights, optimizer_state = gathered or (None, optimizer.state_dict())
    save_weights(tmp, model, {"step": step}, weights)
    if method_state is not None:
        _save_tensors(tmp / METHOD_STATE, method_state, "state")
    torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "rng": rng or [rng_state()]},
               tmp / "optimizer.pt")
    write_json(tmp / "state.json", state)  # last: its presence is what makes a checkpoint complete
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    rotate_checkpoints(out, keep)


def rotate_checkpoints(out: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints."""
    for old in complete_checkpoints(out)[:-keep]:
        _delete_checkpoint(old)


def complete_checkpoints(out: Path) -> list[Path]:
    """The checkpoints with a state.json, oldest first."""
    return sorted(p for p in (out / "checkpoints").glob("step-*") if (p / "state.json").is_file())


def latest_checkpoint(out: Path) -> Path | None:
    done = complete_checkpoints(out)
    return done[-1] if done else None


def _delete_checkpoint(folder: Path) -> None:
    # state.json first: a kill mid-delete then leaves an incomplete folder (ignored, swept on resume), never one
    # that still looks complete with its weights or optimizer state already gone
    (folder / "state.json").unlink(missing_ok=True)
    shutil.rmtree(folder)


def _sweep_checkpoints(out: Path) -> None:
    """Remove what a killed run left half-done: temporary files, `.step-N.tmp` folders, checkpoints without a
    state.json."""
    for leftover in out.glob(".*.tmp"):
        leftover.unlink()
    root = out / "checkpoints"
    for folder in root.glob(".step-*.tmp"):
        shutil.rmtree(folder)
    for folder in root.glob("step-*"):
        if not (folder / "state.json").is_file():
            shutil.rmtree(folder)


def note_resume(out: Path, checkpoint: Path) -> None:
    """Add a resume (its command, versions, checkpoint) to run.json, keeping the record of how the run started."""
    record = json.loads((out / RUN).read_text()) if (out / RUN).is_file() else {}
    record.setdefault("resumes", []).append({"from": str(checkpoint.relative_to(out)), **run_record({})})
    write_json(out / RUN, record)


def load_checkpoint(folder: Path, model: nn.Module, optimizer, scheduler, load_method_state=None, rank: int = 0,
                    restore_sharded=None) -> dict:
    """Restore weights, optimizer, scheduler and process `rank`'s RNG from `folder`; returns the loop position.

    `load_method_state(model, tensors)` restores what `save_checkpoint` got as `method_state`.
    `restore_sharded(weights, optimizer_state)` hands whole tensors to a sharded model (ftune/run/fsdp.py: load).
    """
    if restore_sharded is None:
        load_weights(folder, model)
    if load_method_state is not None:
        try:
            load_method_state(model, load_file(str(folder / METHOD_STATE)))
        except (FileNotFoundError, SafetensorError, OSError) as e:
            raise RunDirError(f"{folder / METHOD_STATE}: cannot be read ({str(e).splitlines()[0]})") from None
    # weights_only: this file was written by ftune, yet it is never unpickled as arbitrary objects
    saved = torch.load(folder / "optimizer.pt", weights_only=True)
    if restore_sharded is None:
        optimizer.load_state_dict(saved["optimizer"])
    else:
        restore_sharded(read_weights(folder), saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    states = saved["rng"] if isinstance(saved["rng"], list) else [saved["rng"]]
    if rank >= len(states):
        raise RunDirError(f"--resume: {folder} was written by {len(states)} process(es); resume with as many "
                          "(the data order and random streams are per process)")
    _set_rng_state(states[rank])
    return json.loads((folder / "state.json").read_text())


def run_record(extra: dict[str, Any]) -> dict[str, Any]:
    """What reproduces a run: versions, the git revision of ftune's own code (None when it is not a git checkout,
    e.g. installed from a wheel), command line, plus `extra`."""
    import accelerate
    import datasets
    import transformers

    import ftune

    try:
        code = Path(ftune.__file__).resolve().parent
        sha = subprocess.run(["git", "-C", str(code), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    versions = {"ftune": ftune.__version__, "python": sys.version.split()[0], "torch": torch.__version__,
                "transformers": transformers.__version__, "accelerate": accelerate.__version__,
                "datasets": datasets.__version__}
    return {"versions": versions, "git_sha": sha or None, "command": sys.argv, **extra}


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
