"""The kill harness the kill tests share (tests/test_kill_*.py): `python -m ftune train` launched as a process (one
thread, unbuffered), waited on, and SIGKILLed at a moment of a chosen kind (_kill_once), and what a kill leaves on
disk read back: complete checkpoints (each must load), half-written ones, the log, the phase the kill landed in.
Also the helpers for comparing results: a run's method.safetensors split into its parsed header and tensor bytes.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from ftune import rundir

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS, EVAL_EVERY = 8, 2
STARTED = "parameters train"  # stderr, printed once the run dir is prepared (and swept, when resuming)
PHASES = [
    "before first checkpoint",
    "start-up of a resumed run",
    "training",
    "evaluation",
    "checkpoint write",
    "after final checkpoint",
]
TIMEOUT = 120.0


@dataclass
class Case:
    name: str
    recipe: Path
    out: Path
    save_steps: list[int]
    keep: int
    rng: random.Random
    reference_recipe: Path | None = None
    reference: Path | None = None
    startup_s: float = 0.0  # reference: launch to STARTED
    per_step_s: float = 0.0  # reference: the rest, per step
    kills: list[dict] = field(default_factory=list)
    resumes: int = 0
    refused_resume: int = 0
    finished_early: int = 0


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "FTUNE_DEBUG"}
    # one thread per process: two processes run at once on two cores, and tiny models gain nothing from more;
    # the reference runs the same way, so the results compare exactly
    return env | {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _launch(recipe: Path, flags: list[str], stderr: Path) -> subprocess.Popen:
    with open(stderr, "w") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "ftune", "train", str(recipe), *flags],
            cwd=REPO,
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


def _wait(proc: subprocess.Popen, condition, interval: float) -> bool:
    """Poll `condition` until it holds (True) or the process has ended (False)."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return condition()
        time.sleep(interval)
    proc.kill()
    raise AssertionError(f"no progress in {TIMEOUT:.0f} s")


def _complete(out: Path) -> list[Path]:
    return sorted(p for p in (out / "checkpoints").glob("step-*") if (p / "state.json").is_file())


def _tmp_dirs(out: Path) -> list[Path]:
    return sorted((out / "checkpoints").glob(".step-*.tmp"))


def _log_lines(out: Path) -> list[str]:
    try:  # not `exists()` first: the run may replace the file between the check and the read
        return (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []


def _step_of(name: str) -> int:
    return int(name.split("-")[1].split(".")[0])


def _assert_checkpoints_load(out: Path, context: str) -> None:
    """Every complete checkpoint opens: safetensors weights, optimizer state (weights_only), state.json."""
    for folder in _complete(out):
        try:
            tensors = load_file(folder / rundir.WEIGHTS)
            saved = torch.load(folder / "optimizer.pt", weights_only=True)
            state = json.loads((folder / "state.json").read_text())
        except Exception as e:  # noqa: BLE001 - any failure here is the finding
            raise AssertionError(f"{context}: {folder.name} is complete but does not load: {e!r}") from None
        assert tensors and {"optimizer", "scheduler", "rng"} <= saved.keys(), f"{context}: {folder.name}"
        assert state["step"] == _step_of(folder.name), f"{context}: {folder.name}"


def _phase(case: Case, stderr: str) -> str:
    """Where the kill landed, read from what is on disk (heuristic except for checkpoint writes)."""
    out = case.out
    if STARTED in stderr and _tmp_dirs(out):  # made by the run just killed: a resume sweeps stale ones first
        return "checkpoint write"
    if not _complete(out):
        return "before first checkpoint"
    if STARTED not in stderr:
        return "start-up of a resumed run"
    if (out / "checkpoints" / f"step-{MAX_STEPS:08d}" / "state.json").is_file():
        return "after final checkpoint"
    lines = _log_lines(out)
    try:
        last = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        return "training"  # a torn line: counted separately
    if "loss" in last and (last["step"] % EVAL_EVERY == 0 or last["step"] == MAX_STEPS):
        return "evaluation"  # a step that evaluates is logged, its evaluation is not yet
    return "training"


def _flags(case: Case) -> list[str]:
    """--resume from a complete checkpoint; otherwise resume must refuse cleanly, and the run starts over."""
    out = case.out
    if _complete(out):
        return ["--resume"]
    if not out.exists() or not any(out.iterdir()):
        return []
    if case.refused_resume == 0:  # once per case: the refusal costs a process start
        log = out.parent / f"{case.name}-refuse.err"
        proc = _launch(case.recipe, ["--resume"], log)
        assert proc.wait(timeout=TIMEOUT) == 1, log.read_text()
        lines = log.read_text().strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in lines[0], lines
        assert lines[0].startswith("error: --resume:") and (
            "no complete checkpoint" in lines[0] or "no run to resume" in lines[0]
        ), lines[0]
        case.refused_resume += 1
    return ["--overwrite"]


def _kill_once(case: Case, kind: str, attempt: int) -> dict | None:
    """One attempt killed at a point chosen by `kind`; None if the run finished before the kill."""
    out, rng = case.out, case.rng
    flags = _flags(case)
    resume_step = _step_of(_complete(out)[-1].name) if flags == ["--resume"] else 0
    detail = {}
    if kind in ("step", "save") and resume_step >= MAX_STEPS - 1:
        # a kill landed late: no step or save left to aim at, only a resumed run's start-up
        kind, detail["planned"] = "clock", kind
    before = set(_log_lines(out))
    err = out.parent / f"{case.name}-{attempt}.err"
    launched = time.monotonic()
    proc = _launch(case.recipe, flags, err)
    started = lambda: STARTED in err.read_text()

    if kind == "start":
        delay = rng.uniform(0.0, 0.1)
        reached = _wait(proc, (out / rundir.RECIPE).is_file, 0.005)
        if reached:
            time.sleep(delay)
        detail["delay_s"] = round(delay, 3)
    elif kind == "clock":
        delay = rng.uniform(0.3, 1.0) * case.startup_s
        reached = _wait(proc, lambda: time.monotonic() >= launched + delay, 0.005)
        detail["after_s"] = round(delay, 2)
    elif kind == "step":  # one of the next two steps, never the last: progress is slow enough for every kill to land
        target = min(resume_step + rng.randint(1, 2), MAX_STEPS - 1)
        delay = rng.uniform(0.0, case.per_step_s)

        def logged() -> bool:  # a line this attempt wrote (timing makes each one new) at or past the target
            for line in _log_lines(out)[-3:]:
                try:
                    if line not in before and "tokens_per_s" in line and json.loads(line)["step"] >= target:
                        return True
                except json.JSONDecodeError:
                    pass  # read while being appended
            return False

        reached = _wait(proc, logged, 0.002)
        if reached:
            time.sleep(delay)
        detail |= {"target_step": target, "delay_s": round(delay, 3)}
    elif kind == "save":
        ahead = [s for s in case.save_steps if s > resume_step]
        target = rng.choice(ahead[:-1][:2] or ahead)  # one of the next two saves, the final one only if it is all
        inside = rng.choice(["(folder)", rundir.WEIGHTS, "optimizer.pt", rundir.METHOD_META])
        tmp = out / "checkpoints" / f".step-{target:08d}.tmp"
        mark = tmp if inside == "(folder)" else tmp / inside
        done = out / "checkpoints" / f"step-{target:08d}" / "state.json"  # newer than any complete one at launch
        # should the poll miss the write (a busy CPU), it kills just after it rather than let the run finish
        reached = _wait(proc, started, 0.005) and _wait(proc, lambda: mark.exists() or done.exists(), 0.0002)
        detail |= {"target_step": target, "at": inside}
    elif kind == "final":
        final = out / "checkpoints" / f"step-{MAX_STEPS:08d}" / "state.json"
        reached = _wait(proc, started, 0.005) and _wait(proc, final.is_file, 0.0005)
    else:
        raise ValueError(kind)

    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    rc = proc.wait(timeout=TIMEOUT)
    stderr = err.read_text()
    if flags == ["--resume"] and rc in (0, -signal.SIGKILL):  # a resumed run that finished before the kill counts too
        case.resumes += 1
    if rc == 0:
        case.finished_early += 1
        return None
    assert rc == -signal.SIGKILL, f"{case.name} attempt {attempt} ({kind}) failed on its own (rc {rc}):\n{stderr}"

    context = f"{case.name} attempt {attempt} ({kind})"
    _assert_checkpoints_load(out, context)
    torn = 0
    for line in _log_lines(out):
        try:
            json.loads(line)
        except json.JSONDecodeError:
            torn += 1
    in_save = STARTED in stderr and bool(_tmp_dirs(out))
    return {
        "kind": kind,
        "flags": flags,
        "reached": bool(reached),
        "phase": _phase(case, stderr),
        "in_save": in_save,
        "torn_log_lines": torn,
        **detail,
    }


def _safetensors_parts(path: Path) -> tuple[dict, bytes]:
    """(header, tensor bytes). The header is compared parsed: safetensors writes its __metadata__ from a Rust
    HashMap, so the order of those keys (not the tensors) differs from one process to the next."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]
