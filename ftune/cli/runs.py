"""Commands on finished runs: eval, predict, merge, import-peft, export, plot, label-pairs."""

from __future__ import annotations

import json
import os
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from ftune.cli.app import TrustRemoteCode, command, err


def _warn_if_base_changed(run_dirs: list[Path], trust_remote_code: bool) -> None:
    """One warning line per run whose base model's files differ from those it trained on (run.json's fingerprints)."""
    from ftune.serve.changed_bases import warn_changed_bases

    warn_changed_bases(
        run_dirs, trust_remote_code, lambda text: err.print(text, soft_wrap=True, markup=False, highlight=False)
    )


@command(name="eval")
def evaluate_run(
    run_dirs: Annotated[
        list[Path],
        typer.Argument(
            help="One or more runs; several of a mergeable method (LoRA, "
            "AdaLoRA, ...) are hot-swapped on one loaded base."
        ),
    ],
    split: Annotated[str, typer.Option(help="Split of the recipe's data to score.")] = "validation",
    data: Annotated[str | None, typer.Option(help="Score this file instead.")] = None,
    weights: Annotated[
        str | None,
        typer.Option(
            help="Score ONE adapter, the weighted sum of several LoRA runs' updates, e.g. 0.7,0.3 (one weight per run)."
        ),
    ] = None,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Score trained runs on a split or a file: one run prints its metrics as JSON, several print one JSON line each."""
    from ftune import assemble, rundir
    from ftune.errors import DataError
    from ftune.serve import hotswap, score

    def note(text: str) -> None:
        err.print(text, soft_wrap=True)

    run_dirs, data = [r.expanduser() for r in run_dirs], data and os.path.expanduser(data)  # a quoted ~ too
    if data and not Path(data).exists():  # before any loading: a refusal costs nothing
        raise DataError(f"--data: {data} does not exist")
    factors = hotswap.parse_weights(weights)
    _warn_if_base_changed(run_dirs, trust_remote_code)  # a base changed since training: said first
    if factors is not None:
        recipe, model, tokenizer, names = hotswap.mix_runs(run_dirs, factors, trust_remote_code)
        scored = score.score(recipe, model, tokenizer, names, split, data, note, score.trained_precision(run_dirs[0]))
        print(json.dumps({"runs": [str(r) for r in run_dirs], "weights": factors, **scored}, indent=2))
    elif len(run_dirs) == 1:
        recipe, model, tokenizer = assemble.load_run(run_dirs[0], trust_remote_code)
        names = rundir.read_record(run_dirs[0]).label_names
        scored = score.score(recipe, model, tokenizer, names, split, data, note, score.trained_precision(run_dirs[0]))
        print(json.dumps(scored, indent=2))
    else:
        for scored in score.score_runs(run_dirs, split, data, note, trust_remote_code):
            print(json.dumps(scored))


@command
def predict(
    runs: Annotated[
        list[Path],
        typer.Argument(
            help="One or more runs on the same base (several: soft-prompt runs, "
            "or runs of a mergeable method, hot-swapped)."
        ),
    ],
    input: Annotated[
        Path,
        typer.Option(
            "--input",
            help="JSONL rows: the recipe's text column(s), and `task` "
            "(a run's folder name or index) when several runs are given.",
        ),
    ],
    output: Annotated[Path | None, typer.Option(help="Write predictions here (JSONL) instead of stdout.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Rows per batch; a batch may mix tasks.")] = 32,
    weights: Annotated[
        str | None,
        typer.Option(
            help="Answer every row with ONE adapter, the weighted sum of several LoRA runs' updates, e.g. 0.7,0.3."
        ),
    ] = None,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Predict labels for JSONL rows with one base serving several tasks (soft prompts per row, or hot-swapped
    mergeable runs per task)."""
    from ftune.errors import DataError, RunDirError
    from ftune.serve.hotswap import parse_weights
    from ftune.serve.predict import load_tasks, read_jsonl
    from ftune.serve.predict import predict as run_predict

    runs, input, output = [r.expanduser() for r in runs], input.expanduser(), output and output.expanduser()
    if not input.is_file():
        raise DataError(f"--input: {input} does not exist")
    if output and output.exists():
        raise RunDirError(f"--output: {output} exists; choose a new file")
    rows = read_jsonl(input)
    _warn_if_base_changed(runs, trust_remote_code)
    multi, tasks, tokenizer = load_tasks(runs, parse_weights(weights), trust_remote_code)
    lines = "".join(json.dumps(p) + "\n" for p in run_predict(multi, tasks, tokenizer, rows, batch_size))
    if output:
        output.write_text(lines)
        err.print(f"{len(rows)} predictions written to {output}")
    else:
        print(lines, end="")


@command
def merge(run_dir: Path, out_dir: Path, trust_remote_code: TrustRemoteCode = False) -> None:
    """Write a standalone transformers model dir: base weights with the method folded in."""
    from ftune.serve.export import check_fresh, merge_run

    check_fresh(out_dir.expanduser())  # a refusal of OUT costs nothing: before the base model is read
    _warn_if_base_changed([run_dir.expanduser()], trust_remote_code)
    err.print(f"merged model written to {merge_run(run_dir.expanduser(), out_dir.expanduser(), trust_remote_code)}")


@command(name="import-peft")
def import_peft(
    peft_dir: Path,
    out_dir: Path,
    recipe: Annotated[
        Path,
        typer.Option(
            "--recipe",
            help="Recipe giving model, task and data; its method section is replaced by the adapter's LoRA config.",
        ),
    ],
) -> None:
    """Turn a LoRA adapter dir saved by peft into an ftune run dir (eval, predict, merge, export work on it)."""
    from ftune.serve.peft_import import import_peft as run_import

    err.print(f"ftune run written to {run_import(peft_dir.expanduser(), out_dir.expanduser(), recipe)}")


class ExportFormat(str, Enum):
    peft = "peft"
    hf = "hf"
    onnx = "onnx"


@command
def export(
    run_dir: Path,
    out_dir: Path,
    format: Annotated[ExportFormat, typer.Option()] = ExportFormat.peft,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Export a run as a peft adapter dir (--format peft), a merged transformers model (--format hf), or the merged
    model as ONNX checked against PyTorch with onnxruntime (--format onnx)."""
    run_dir, out_dir = run_dir.expanduser(), out_dir.expanduser()  # a quoted ~ (or OUT=~/x) the shell left alone
    from ftune.serve.export import check_fresh

    check_fresh(out_dir)  # a refusal of OUT costs nothing: before the base model is read
    _warn_if_base_changed([run_dir], trust_remote_code)
    if format is ExportFormat.onnx:
        from ftune.serve.onnx_export import export_onnx

        written, report = export_onnx(run_dir, out_dir, trust_remote_code)
        err.print(
            f"onnx export written to {written} ({report['exporter']} exporter; onnxruntime vs PyTorch logits: "
            f"max |difference| {report['check']['max_abs_diff']:.2g})",
            soft_wrap=True,
        )
        return
    from ftune.serve.export import export_peft, merge_run

    exporter = export_peft if format is ExportFormat.peft else merge_run
    written = exporter(run_dir, out_dir, trust_remote_code)
    err.print(f"{format.value} export written to {written}")


@command
def plot(
    run_dirs: Annotated[list[Path], typer.Argument(help="One or more run dirs (finished or in progress).")],
    out: Annotated[
        Path | None, typer.Option(help="PNG to write (a new file); default with one run: its own loss.png.")
    ] = None,
    metric: Annotated[
        str | None,
        typer.Option(
            help="Validation metric of the right panel (default: the recipe's "
            "train.best_metric, else the first besides loss)."
        ),
    ] = None,
) -> None:
    """Plot training loss and a validation metric against step, several runs overlaid."""
    from ftune.run.plots import plot_runs

    err.print(f"plot written to {plot_runs([r.expanduser() for r in run_dirs], out and out.expanduser(), metric)}")


class JudgeKind(str, Enum):
    reward = "reward"
    llm = "llm"


@command(name="label-pairs")
def label_pairs(
    policy: Annotated[str, typer.Argument(help="A finished causal-LM run (SFT or preference-tuned) that samples.")],
    prompts: Annotated[Path, typer.Argument(help="JSONL file with a prompt per row.")],
    out: Annotated[Path, typer.Option("--out", help="JSONL of {prompt, chosen, rejected, judge, policy} rows.")],
    judge: Annotated[
        str,
        typer.Option(
            help="A reward-model run (--judge-kind reward) or a causal-LM run or "
            "model asked which response is better (--judge-kind llm)."
        ),
    ],
    judge_kind: Annotated[JudgeKind, typer.Option(help="How the judge decides.")] = JudgeKind.reward,
    seed: int = 0,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (> 0).")] = 1.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass, in (0, 1].")] = 1.0,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 64,
    prompt_column: str = "prompt",
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """RLAIF: sample two completions per prompt from POLICY, let a judge choose, write preference pairs that
    `task: preference` trains DPO on."""
    from ftune.errors import RecipeError, RunDirError
    from ftune.serve import label_pairs as lp

    if temperature <= 0 or not 0 < top_p <= 1:
        raise RecipeError(f"--temperature {temperature} / --top-p {top_p}: temperature must be > 0 and top-p in (0, 1]")
    prompts, out, policy, judge = prompts.expanduser(), out.expanduser(), *map(os.path.expanduser, (policy, judge))
    if out.exists() and not overwrite:  # before any model loads
        raise RunDirError(f"--out {out}: already exists; choose another file or pass --overwrite")
    rows = lp.read_prompts(prompts, prompt_column)
    model, tokenizer = lp.causal_lm_of(policy, "POLICY", trust_remote_code)
    judged = lp.label(
        rows,
        model,
        tokenizer,
        lp.judge_of(judge_kind.value, judge, trust_remote_code),
        lp.Sampling(seed, temperature, top_p, max_new_tokens),
        policy,
    )
    lp.write_rows(out, judged.rows, overwrite)
    dropped = ", ".join(f"{n} {why}" for why, n in judged.dropped.items()) or "none"
    err.print(f"{len(judged.rows)} pairs of {len(rows)} prompts written to {out}; dropped: {dropped}")
