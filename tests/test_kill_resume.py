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
metrics.json "validation" equal, and metrics.jsonl equal but for tokens_per_s. A summary table goes to stdout
(pytest -s) and, as JSON, to the pytest temp dir.

Each process start costs seconds of imports, so the cases run two at a time (this is sized for a 2-core CPU).
The harness (launching, the kills, reading what they leave) is tests/kill_harness.py; kills simulated in-process
(rotation, --overwrite, a finished run resumed) are in tests/test_kill_in_process.py, and --overwrite killed while it
removes, two runs racing for one output_dir and a full disk in tests/test_kill_races.py.
"""

from __future__ import annotations

import json
import random
import time
from concurrent.futures import ThreadPoolExecutor

from conftest import recipe_doc, write_recipe
from ftune import rundir
from kill_harness import (
    EVAL_EVERY,
    MAX_STEPS,
    PHASES,
    STARTED,
    TIMEOUT,
    Case,
    _assert_checkpoints_load,
    _complete,
    _flags,
    _kill_once,
    _launch,
    _log_lines,
    _safetensors_parts,
    _step_of,
    _wait,
)

SEED = 1729
CASES = {  # kind of data, method, train settings
    "lora-cls": ("cls", {"name": "lora", "r": 4, "dropout": 0.1}, {"save_every": 1, "keep_checkpoints": 2}),
    "full-sft": ("sft", {"name": "full"}, {"save_every": 2, "keep_checkpoints": 1}),
    "adapter-drop-cls": (
        "cls",
        {"name": "adapter_drop", "placement": "houlsby", "bottleneck": 4, "drop_first": 1, "robust": True},
        {"save_every": 1, "keep_checkpoints": 3, "grad_accum": 2, "best_metric": "loss", "best_mode": "min"},
    ),
    # whole-model wrappers: prefixes through a folded MLP (best weights saved folded mid-run), and input prompts
    "prefix-cls": (
        "cls",
        {"name": "prefix_tuning", "n_tokens": 4, "mlp_hidden": 16, "dropout": 0.1},
        {"save_every": 1, "keep_checkpoints": 2, "best_metric": "accuracy"},
    ),
    "p-tuning-sft": (
        "sft",
        {"name": "p_tuning", "n_tokens": 4, "encoder": "lstm", "encoder_hidden": 8, "lstm_dropout": 0.1},
        {"save_every": 2, "keep_checkpoints": 1},
    ),
}
MIDDLE_KILLS = ["save", "step", "step", "clock"]  # shuffled per case, after "start" and "save", before "final"


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


def _compare(case: Case) -> None:
    out, reference = case.out, case.reference
    header, data = _safetensors_parts(out / rundir.WEIGHTS)
    expected_header, expected_data = _safetensors_parts(reference / rundir.WEIGHTS)
    assert header == expected_header and data == expected_data, (
        f"{case.name}: method.safetensors differs from the uninterrupted run"
    )
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
    expected = [f"step-{s:08d}" for s in case.save_steps[-case.keep :]]
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


def test_killed_runs_resume_to_the_uninterrupted_result(
    tmp_path, tmp_path_factory, tiny_bert, tiny_llama, cls_data, sft_data
):
    cases = []
    for name, (kind, method, settings) in CASES.items():
        model, data = (tiny_bert, cls_data) if kind == "cls" else (tiny_llama, sft_data)
        doc = recipe_doc(
            kind, model, data, tmp_path / name, method, max_steps=MAX_STEPS, eval_every=EVAL_EVERY, **settings
        )
        reference = tmp_path / f"{name}-reference"
        every = settings["save_every"]
        save_steps = sorted({s for s in range(1, MAX_STEPS + 1) if s % every == 0} | {MAX_STEPS})
        cases.append(
            Case(
                name,
                write_recipe(tmp_path / f"{name}.yaml", doc),
                tmp_path / name,
                save_steps,
                settings["keep_checkpoints"],
                random.Random(f"{SEED}-{name}"),
                write_recipe(tmp_path / f"{name}-reference.yaml", doc | {"output_dir": str(reference)}),
                reference,
            )
        )

    with ThreadPoolExecutor(max_workers=2) as pool:
        rows = list(pool.map(_run_case, cases))

    summary = {
        "seed": SEED,
        "cases": rows,
        "total": {
            key: sum(r[key] for r in rows)
            for key in ("kills", "resumed_runs", "save_kills_tried", "kills_inside_a_save", "torn_log_lines")
        },
    }
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
    for r in [
        *rows,
        {
            "case": "total",
            "resumed_equal": all(r["resumed_equal"] for r in rows),
            "checkpoints_intact_after_kill_inside_save": total["kills_inside_a_save"],
            **total,
        },
    ]:
        lines.append(
            f"{r['case']:<18}{r['kills']:>6}{r['resumed_runs']:>8}{'yes' if r['resumed_equal'] else 'NO':>6}  "
            + " ".join(f"{r['phases'][p]:>12}" for p in PHASES)
            + f"{r['save_kills_tried']:>11}{r['kills_inside_a_save']:>8}"
            f"{r['checkpoints_intact_after_kill_inside_save']:>7}"
        )
    return "\n".join(lines)


# keep_checkpoints rotation, in-process on a toy model
