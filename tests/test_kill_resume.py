"""Kill and resume: `python -m ftune train` is killed with SIGKILL at pseudo-random moments and resumed until it
finishes; it must end exactly where an uninterrupted run of the same recipe ends.

Per case, 7 kills (seeded): start, save, then step, step, clock, save shuffled, then final. The kinds:
  start  the first run, a random moment after recipe.yaml appears (mostly before the first checkpoint)
  clock  a random moment in the start-up (imports, model load) of a resumed run
  step   a random moment just after the run logs a randomly chosen step (training, evaluation or a save)
  save   the moment a chosen checkpoint's `.step-N.tmp` folder (or one of its files) appears: inside the write
  final  the moment the final checkpoint is complete: the resume then starts from the final checkpoint
After every kill, each complete checkpoint (one with state.json) must load: a kill during a save leaves the
previous checkpoints intact. A run with no complete checkpoint must refuse --resume (exit 1, one line) and is
started again with --overwrite.

The uninterrupted reference runs in its own output_dir (recipe.yaml differs there only in output_dir): the final
method.safetensors must be bitwise equal (its tensor bytes; the header is compared parsed, see _safetensors_parts),
metrics.json "validation" equal, and metrics.jsonl equal but for tokens_per_s. A summary table goes to stdout (pytest -s) and, as JSON, to the pytest temp dir.

Each process start costs seconds of imports, so the cases run two at a time (this is sized for a 2-core CPU).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from conftest import recipe_doc, write_recipe
from safetensors.torch import load_file
from torch import nn

from ftune import rundir
from ftune.run import checkpoint

REPO = Path(__file__).resolve().parents[1]
SEED = 1729
MAX_STEPS, EVAL_EVERY = 8, 2
CASES = {  # kind of data, method, train settings
    "lora-cls": ("cls", {"name": "lora", "r": 4, "dropout": 0.1}, {"save_every": 1, "keep_checkpoints": 2}),
    "full-sft": ("sft", {"name": "full"}, {"save_every": 2, "keep_checkpoints": 1}),
    "adapter-drop-cls": ("cls", {"name": "adapter_drop", "placement": "houlsby", "bottleneck": 4, "drop_first": 1,
                                 "robust": True},
                         {"save_every": 1, "keep_checkpoints": 3, "grad_accum": 2, "best_metric": "loss",
                          "best_mode": "min"}),
    # whole-model wrappers: prefixes through a folded MLP (best weights saved folded mid-run), and input prompts
    "prefix-cls": ("cls", {"name": "prefix_tuning", "n_tokens": 4, "mlp_hidden": 16, "dropout": 0.1},
                   {"save_every": 1, "keep_checkpoints": 2, "best_metric": "accuracy"}),
    "p-tuning-sft": ("sft", {"name": "p_tuning", "n_tokens": 4, "encoder": "lstm", "encoder_hidden": 8,
                             "lstm_dropout": 0.1}, {"save_every": 2, "keep_checkpoints": 1}),
}
MIDDLE_KILLS = ["save", "step", "step", "clock"]  # shuffled per case, after "start" and "save", before "final"
STARTED = "parameters train"  # stderr, printed once the run dir is prepared (and swept, when resuming)
PHASES = ["before first checkpoint", "start-up of a resumed run", "training", "evaluation", "checkpoint write",
          "after final checkpoint"]
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
        return subprocess.Popen([sys.executable, "-m", "ftune", "train", str(recipe), *flags], cwd=REPO, env=_env(),
                                stdout=subprocess.DEVNULL, stderr=err)


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
        assert lines[0].startswith("error: --resume:") and ("no complete checkpoint" in lines[0]
                                                             or "no run to resume" in lines[0]), lines[0]
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
    return {"kind": kind, "flags": flags, "reached": bool(reached), "phase": _phase(case, stderr),
            "in_save": in_save, "torn_log_lines": torn, **detail}


def _reference(case: Case) -> None:
    """The uninterrupted run; also times the start-up and the steps, to place the timed kills."""
    err = case.out.parent / f"{case.name}-reference.err"
    launched = time.monotonic()
    proc = _launch(case.reference_recipe, [], err)
    _wait(proc, lambda: STARTED in err.read_text(), 0.005)
    case.startup_s = time.monotonic() - launched
    _wait(proc, lambda: any(f'"step": {MAX_STEPS}, "loss"' in line for line in _log_lines(case.reference)), 0.005)
    case.per_step_s = (time.monotonic() - launched - case.startup_s) / MAX_STEPS
    assert proc.wait(timeout=TIMEOUT) == 0, err.read_text()


def _safetensors_parts(path: Path) -> tuple[dict, bytes]:
    """(header, tensor bytes). The header is compared parsed: safetensors writes its __metadata__ from a Rust
    HashMap, so the order of those keys (not the tensors) differs from one process to the next."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _compare(case: Case) -> None:
    out, reference = case.out, case.reference
    header, data = _safetensors_parts(out / rundir.WEIGHTS)
    expected_header, expected_data = _safetensors_parts(reference / rundir.WEIGHTS)
    assert header == expected_header and data == expected_data, (
        f"{case.name}: method.safetensors differs from the uninterrupted run")
    final = json.loads((out / "metrics.json").read_text())
    assert final["validation"] == json.loads((reference / "metrics.json").read_text())["validation"], case.name

    def log(run):
        return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in _log_lines(run)]

    assert log(out) == log(reference), f"{case.name}: metrics.jsonl differs from the uninterrupted run"


def _run_case(case: Case) -> dict:
    _reference(case)
    middle = MIDDLE_KILLS[:]
    case.rng.shuffle(middle)
    for attempt, kind in enumerate(["start", "save", *middle, "final"]):
        kill = _kill_once(case, kind, attempt)
        if kill is None:
            break  # finished before this kill: nothing left to interrupt
        case.kills.append(kill)

    # the last attempt runs to the end
    flags = _flags(case)
    latest = _complete(case.out)[-1] if flags == ["--resume"] else None
    err = case.out.parent / f"{case.name}-last.err"
    proc = _launch(case.recipe, flags, err)
    assert proc.wait(timeout=TIMEOUT) == 0, err.read_text()
    if latest is not None:
        case.resumes += 1
        said = f"resuming from {latest} (step {_step_of(latest.name)})"
        assert said in err.read_text().splitlines(), f"{case.name}: --resume did not say {said!r} (on one line)"

    _compare(case)
    # rotation kept the newest keep_checkpoints complete checkpoints; nothing half-written is left
    expected = [f"step-{s:08d}" for s in case.save_steps[-case.keep:]]
    assert [p.name for p in _complete(case.out)] == expected, case.name
    assert sorted(p.name for p in (case.out / "checkpoints").iterdir()) == expected, case.name
    record = json.loads((case.out / "run.json").read_text())
    assert "--resume" not in record["command"], "run.json should keep how the run started"
    assert 1 <= len(record.get("resumes", [])) <= case.resumes, case.name
    _assert_checkpoints_load(case.out, f"{case.name} finished")
    return _summarise(case)


def _summarise(case: Case) -> dict:
    kills = case.kills
    saves = [k for k in kills if k["kind"] == "save"]
    return {
        "case": case.name,
        "kills": len(kills),
        "resumed_runs": case.resumes,
        "resumed_equal": True,  # _compare passed
        "phases": {p: sum(k["phase"] == p for k in kills) for p in PHASES},
        "save_kills_tried": len(saves),
        "kills_inside_a_save": sum(k["in_save"] for k in kills),
        "checkpoints_intact_after_kill_inside_save": sum(k["in_save"] for k in kills),  # asserted after each kill
        "torn_log_lines": sum(k["torn_log_lines"] for k in kills),
        "refused_resume_without_checkpoint": case.refused_resume,
        "finished_before_a_kill": case.finished_early,
        "kill_points": kills,
    }


def test_killed_runs_resume_to_the_uninterrupted_result(tmp_path, tmp_path_factory, tiny_bert, tiny_llama, cls_data,
                                                        sft_data):
    cases = []
    for name, (kind, method, settings) in CASES.items():
        model, data = (tiny_bert, cls_data) if kind == "cls" else (tiny_llama, sft_data)
        doc = recipe_doc(kind, model, data, tmp_path / name, method, max_steps=MAX_STEPS, eval_every=EVAL_EVERY,
                         **settings)
        reference = tmp_path / f"{name}-reference"
        every = settings["save_every"]
        save_steps = sorted({s for s in range(1, MAX_STEPS + 1) if s % every == 0} | {MAX_STEPS})
        cases.append(Case(name, write_recipe(tmp_path / f"{name}.yaml", doc), tmp_path / name, save_steps,
                          settings["keep_checkpoints"], random.Random(f"{SEED}-{name}"),
                          write_recipe(tmp_path / f"{name}-reference.yaml", doc | {"output_dir": str(reference)}),
                          reference))

    with ThreadPoolExecutor(max_workers=2) as pool:
        rows = list(pool.map(_run_case, cases))

    summary = {"seed": SEED, "cases": rows,
               "total": {key: sum(r[key] for r in rows) for key in
                         ("kills", "resumed_runs", "save_kills_tried", "kills_inside_a_save", "torn_log_lines")}}
    summary["total"]["phases"] = {p: sum(r["phases"][p] for r in rows) for p in PHASES}
    (tmp_path_factory.getbasetemp() / "kill_resume_summary.json").write_text(json.dumps(summary, indent=2))
    print(_table(rows, summary["total"]))

    assert summary["total"]["kills"] >= 20
    assert all(r["kills_inside_a_save"] >= 1 for r in rows), "no kill landed inside a checkpoint write"


def _table(rows: list[dict], total: dict) -> str:
    short = ["pre-ckpt", "resume-start", "train", "eval", "save", "post-final"]
    head = f"{'case':<18}{'kills':>6}{'resumed':>8}{'equal':>6}  " + " ".join(f"{s:>12}" for s in short)
    head += f"{'save-kills':>11}{'in-save':>8}{'intact':>7}"
    lines = ["", "kill/resume summary (phase of each kill; save-kills: tried / landed inside a write / intact)", head]
    for r in [*rows, {"case": "total", "resumed_equal": all(r["resumed_equal"] for r in rows),
                      "checkpoints_intact_after_kill_inside_save": total["kills_inside_a_save"], **total}]:
        lines.append(f"{r['case']:<18}{r['kills']:>6}{r['resumed_runs']:>8}{'yes' if r['resumed_equal'] else 'NO':>6}  "
                     + " ".join(f"{r['phases'][p]:>12}" for p in PHASES)
                     + f"{r['save_kills_tried']:>11}{r['kills_inside_a_save']:>8}"
                     f"{r['checkpoints_intact_after_kill_inside_save']:>7}")
    return "\n".join(lines)


# keep_checkpoints rotation, in-process on a toy model


def _toy():
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)


def test_rotation_keeps_the_newest_complete_checkpoints(tmp_path):
    model, optimizer, scheduler = _toy()
    for step in range(1, 6):
        checkpoint.save_checkpoint(tmp_path, step, model, optimizer, scheduler, {"step": step}, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000004", "step-00000005"]
    # an incomplete folder (a kill mid-write or mid-delete) never counts as one of the kept
    (tmp_path / "checkpoints" / "step-00000007").mkdir()
    checkpoint.save_checkpoint(tmp_path, 6, model, optimizer, scheduler, {"step": 6}, keep=2)
    assert [p.name for p in rundir.complete_checkpoints(tmp_path)] == ["step-00000005", "step-00000006"]
    assert rundir.latest_checkpoint(tmp_path).name == "step-00000006"


def test_a_kill_while_rotating_leaves_no_broken_complete_checkpoint(tmp_path, monkeypatch):
    """Deleting an old checkpoint is not atomic; a kill part-way must not leave a 'complete' one with files gone."""
    model, optimizer, scheduler = _toy()
    for step in (1, 2):
        checkpoint.save_checkpoint(tmp_path, step, model, optimizer, scheduler, {"step": step}, keep=2)

    class Killed(BaseException):
        pass

    real_rmtree = checkpoint.shutil.rmtree

    def killed_part_way(path, *args, **kwargs):
        if Path(path).name == "step-00000001":
            (Path(path) / rundir.WEIGHTS).unlink()  # the first file goes, then the process dies
            raise Killed
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_part_way)
    try:
        checkpoint.save_checkpoint(tmp_path, 3, model, optimizer, scheduler, {"step": 3}, keep=2)
    except Killed:
        pass
    monkeypatch.undo()
    assert [p.name for p in rundir.complete_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]
    _assert_checkpoints_load(tmp_path, "after a kill mid-rotation")
    # the half-deleted folder is swept when the run resumes, and so is a half-written one
    (tmp_path / "checkpoints" / ".step-00000004.tmp").mkdir()
    rundir.write_record(tmp_path, _record())
    (tmp_path / rundir.RECIPE).write_text("x: 1\n")
    lock, latest = rundir.prepare_output_dir(tmp_path, "x: 1\n", None, resume=True, overwrite=False)
    lock.release()
    assert latest.name == "step-00000003"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]


def _record(**fields) -> rundir.RunRecord:
    return rundir.RunRecord(versions={"ftune": "test"}, **fields)


def test_a_kill_during_overwrite_leaves_a_run_that_overwrite_accepts(tmp_path, monkeypatch):
    """--overwrite deletes the old run's files, its record last (replaced by the new one); a kill part-way must not
    leave a folder ftune refuses as 'not an ftune run'."""
    run = tmp_path / "run"
    (run / "checkpoints" / "step-00000001").mkdir(parents=True)
    (run / rundir.METRICS_LOG).write_text("{}\n")
    (run / rundir.RECIPE).write_text("old: 1\n")
    rundir.write_record(run, _record(seed=1))

    class Killed(BaseException):
        pass

    def killed_part_way(path, *args, **kwargs):  # the worst order: the recipe goes first, if it is in there
        (Path(path).parent / rundir.RECIPE).unlink(missing_ok=True)
        raise Killed

    monkeypatch.setattr(rundir.output.shutil, "rmtree", killed_part_way)
    with pytest.raises(Killed):
        rundir.prepare_output_dir(run, "new: 1\n", _record(seed=2), resume=False, overwrite=True)
    monkeypatch.undo()
    assert rundir.read_record(run).seed == 1  # still the old run, which --overwrite accepts
    lock, latest = rundir.prepare_output_dir(run, "new: 1\n", _record(seed=2), resume=False, overwrite=True)
    lock.release()
    assert latest is None
    assert sorted(p.name for p in run.iterdir()) == sorted([rundir.LOCK, rundir.RECIPE, rundir.RECORD])
    assert (run / rundir.RECIPE).read_text() == "new: 1\n" and rundir.read_record(run).seed == 2


def test_resuming_a_finished_run_changes_nothing(tmp_path, tiny_bert, cls_data):
    """What a kill after the final checkpoint leads to: the resume reruns only the final evaluation. It must not log
    it twice, nor delete and rewrite the final checkpoint (with keep_checkpoints 1, the only one)."""
    import io

    from rich.console import Console

    from ftune.recipe import validate_recipe
    from ftune.run.train import train

    run = tmp_path / "run"
    recipe = validate_recipe(recipe_doc("cls", tiny_bert, cls_data, run, max_steps=3, save_every=1, eval_every=2))
    train(recipe, console=Console(file=io.StringIO()))
    log, final = _log_lines(run), json.loads((run / "metrics.json").read_text())
    (final_ckpt,) = _complete(run)
    ckpt_files = {f.name: (f.stat().st_ino, f.read_bytes()) for f in final_ckpt.iterdir()}

    (run / "metrics.json").unlink()  # as if killed before it was written
    train(recipe, resume=True, console=Console(file=io.StringIO()))

    assert _log_lines(run) == log
    assert json.loads((run / "metrics.json").read_text())["validation"] == final["validation"]
    assert _complete(run) == [final_ckpt]
    assert {f.name: (f.stat().st_ino, f.read_bytes()) for f in final_ckpt.iterdir()} == ckpt_files


# --overwrite killed while it removes, two processes racing for one output_dir, a full disk (issue 22)


def _launch_doc(tmp: Path, name: str, doc: dict) -> Path:
    return write_recipe(tmp / f"{name}.yaml", doc)


def _seed_of(out: Path) -> int:
    return json.loads((out / rundir.RECORD).read_text())["seed"]


def test_a_kill_while_overwrite_removes_the_old_run(tmp_path, tiny_bert, cls_data):
    """`ftune train --overwrite` over a run with many checkpoint files, SIGKILLed once the first of them has gone:
    the folder is still the old run (its record is removed last), --overwrite accepts it again, and the result
    equals an uninterrupted run's."""
    out, copies = tmp_path / "run", 1500
    old = _launch_doc(tmp_path, "old", recipe_doc("cls", tiny_bert, cls_data, out, max_steps=2, save_every=1, seed=0))
    new_doc = recipe_doc("cls", tiny_bert, cls_data, out, max_steps=3, save_every=1, seed=1)
    new = _launch_doc(tmp_path, "new", new_doc)
    reference = _launch_doc(tmp_path, "reference", new_doc | {"output_dir": str(tmp_path / "reference")})
    proc = _launch(old, [], tmp_path / "old.err")
    assert proc.wait(timeout=TIMEOUT) == 0, (tmp_path / "old.err").read_text()
    first = _complete(out)[0]
    for k in range(copies):  # hard links: cheap to make, one unlink each to remove
        shutil.copytree(first, out / "checkpoints" / f"step-{100 + k:08d}", copy_function=os.link)
    names = set(os.listdir(out)) - {rundir.LOCK}
    count = len(os.listdir(out / "checkpoints"))

    def removing() -> bool:
        try:
            return not names <= set(os.listdir(out)) or len(os.listdir(out / "checkpoints")) < count
        except FileNotFoundError:
            return True

    proc = _launch(new, ["--overwrite"], tmp_path / "killed.err")
    assert _wait(proc, removing, 0.0002), (tmp_path / "killed.err").read_text()
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=TIMEOUT) == -signal.SIGKILL, (tmp_path / "killed.err").read_text()
    assert _seed_of(out) == 0, "killed after the removal was done: the kill did not land while removing"
    assert rundir.is_run(out)

    refused = _launch(new, [], tmp_path / "refused.err")  # still a run: replaced only with --overwrite
    assert refused.wait(timeout=TIMEOUT) == 1
    assert "holds another run" in (tmp_path / "refused.err").read_text()
    for recipe, flags, err in ((new, ["--overwrite"], "again.err"), (reference, [], "reference.err")):
        proc = _launch(recipe, flags, tmp_path / err)
        assert proc.wait(timeout=TIMEOUT) == 0, (tmp_path / err).read_text()
    assert _seed_of(out) == 1
    assert _safetensors_parts(out / rundir.WEIGHTS) == _safetensors_parts(tmp_path / "reference" / rundir.WEIGHTS)
    assert [p.name for p in _complete(out)] == ["step-00000003"]  # none of the old run's checkpoints is left
    assert sorted(os.listdir(out / "checkpoints")) == ["step-00000003"]


def test_two_runs_racing_for_one_output_dir(tmp_path, tiny_bert, cls_data):
    """Two `ftune train` started together on one fresh output_dir: one trains, the other exits 1 in one line naming
    the holder's pid (it reached the lock second) or the run already there (the winner had finished); the folder
    holds the winner's run alone: its record, recipe and weights."""
    out = tmp_path / "run"
    docs = {seed: recipe_doc("cls", tiny_bert, cls_data, out, max_steps=6, save_every=2, seed=seed) for seed in (1, 2)}
    recipes = {seed: _launch_doc(tmp_path, f"seed-{seed}", doc) for seed, doc in docs.items()}
    procs = {seed: _launch(recipe, [], tmp_path / f"seed-{seed}.err") for seed, recipe in recipes.items()}
    codes = {seed: proc.wait(timeout=TIMEOUT) for seed, proc in procs.items()}
    assert sorted(codes.values()) == [0, 1], codes
    winner = next(seed for seed, code in codes.items() if code == 0)
    loser = 3 - winner
    lines = (tmp_path / f"seed-{loser}.err").read_text().strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    assert f"(pid {procs[winner].pid})" in lines[0] or "holds another run" in lines[0], lines[0]

    record = json.loads((out / rundir.RECORD).read_text())
    assert record["seed"] == winner and str(recipes[winner]) in record["command"]
    assert yaml.safe_load((out / rundir.RECIPE).read_text())["train"]["seed"] == winner
    reference = _launch_doc(tmp_path, "reference", docs[winner] | {"output_dir": str(tmp_path / "reference")})
    proc = _launch(reference, [], tmp_path / "reference.err")
    assert proc.wait(timeout=TIMEOUT) == 0, (tmp_path / "reference.err").read_text()
    assert _safetensors_parts(out / rundir.WEIGHTS) == _safetensors_parts(tmp_path / "reference" / rundir.WEIGHTS)
    for folder in _complete(out):
        assert _safetensors_parts(folder / rundir.WEIGHTS) == _safetensors_parts(
            tmp_path / "reference" / "checkpoints" / folder.name / rundir.WEIGHTS)
    assert rundir.holder(out) is None


def _fill(disk: Path, leave: int) -> Path:
    """Fill the filesystem of `disk` with a filler file, then give back `leave` bytes of it."""
    filler = disk / "filler"
    chunk = b"\0" * (1 << 20)
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(chunk)
                f.flush()
        except OSError:
            pass
    size = filler.stat().st_size
    os.truncate(filler, max(0, size - leave))
    return filler


def test_a_full_disk_during_a_checkpoint(tmp_path, tiny_bert, cls_data, monkeypatch):
    """A small tmpfs holds the run dir; after the first checkpoint it is filled up but for a few pages, so the next
    checkpoint cannot be written: one error line (exit 1), the first checkpoint intact and loadable, nothing
    half-written left; once space is freed, --resume finishes the run as an uninterrupted one ends."""
    from typer.testing import CliRunner

    from ftune.cli import app

    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=80m", "tmpfs", str(disk)], check=False,
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        out = disk / "run"
        doc = recipe_doc("cls", tiny_bert, cls_data, out, method={"name": "full"}, max_steps=3, save_every=1)
        recipe = write_recipe(tmp_path / "recipe.yaml", doc)
        real_save, filled = checkpoint.save_checkpoint, []

        def save_then_fill(out_dir, step, *args, **kwargs):
            real_save(out_dir, step, *args, **kwargs)
            if not filled:
                filled.append(_fill(disk, leave=16 << 10))  # metrics.jsonl's next line fits, a checkpoint does not

        monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_fill)
        result = CliRunner().invoke(app, ["train", str(recipe)])
        monkeypatch.undo()

        assert result.exit_code == 1, result.output
        assert "Traceback" not in result.output and not (result.exception and not isinstance(result.exception,
                                                                                            SystemExit))
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0], result.stderr
        assert "step-00000002" in errors[0] and "No space left on device" in errors[0], errors[0]
        assert "checkpoints/step-00000001, is intact" in errors[0], errors[0]
        assert [p.name for p in _complete(out)] == ["step-00000001"]
        _assert_checkpoints_load(out, "after a full disk")
        assert sorted(os.listdir(out / "checkpoints")) == ["step-00000001"]  # no .step-00000002.tmp
        assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
        assert rundir.holder(out) is None  # the lock was let go

        filled[0].unlink()
        resumed = CliRunner().invoke(app, ["train", str(recipe), "--resume"])
        assert resumed.exit_code == 0, resumed.output
        assert f"resuming from {out / 'checkpoints' / 'step-00000001'} (step 1)" in resumed.stderr
        reference = write_recipe(tmp_path / "reference.yaml", doc | {"output_dir": str(tmp_path / "reference")})
        assert CliRunner().invoke(app, ["train", str(reference)]).exit_code == 0
        assert _safetensors_parts(out / rundir.WEIGHTS) == _safetensors_parts(tmp_path / "reference" / rundir.WEIGHTS)
    finally:
        if subprocess.run(["umount", str(disk)], check=False).returncode:
            subprocess.run(["umount", "-l", str(disk)], check=False)
