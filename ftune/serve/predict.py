"""`ftune predict`: several trained runs on one frozen base, loaded once; JSONL rows in, predictions out.

Prompt tuning's promise (Lester et al. 2021, §1): one frozen model serves many tasks, each task only a prompt. The
soft-prompt runs given here share one base model; their prompts (or prefixes) form a bank, and each row of a batch
uses its own task's prompt, so one batch can mix rows of different tasks. Each task's head (its classifier, and any
weight its checkpoint lacked) is kept per task in a `PerTask` module that answers each row with its own task's copy.
A run alone is the special case of one task, so `predict` with one run of any method equals `ftune eval`'s model.

Runs of a mergeable method (LoRA, DoRA, AdaLoRA) share the base by hot-swap instead (`ftune/serve/hotswap.py`): rows are
grouped by task, and each group runs with its run's update merged into the base and its head loaded; outputs keep the
input order. `weights` combines several LoRA runs into one adapter (Σ w_i ΔW_i) that answers every row.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ftune import assemble, rundir
from ftune.errors import DataError, RunDirError
from ftune.layers.soft_prompts import Prompt
from ftune.methods import method_of
from ftune.recipe import Recipe
from ftune.serve import hotswap
from ftune.tasks import TASKS, Decoding


@dataclass
class Task:
    name: str
    recipe: Recipe
    labels: list[str]


class PerTask(nn.Module):
    """T copies of one module (a task head); row i of the output comes from copy `task_ids[i]`.

    Every copy runs on the whole batch (heads are small), and outputs of different widths (tasks with different
    label sets) are padded with -inf, which no argmax picks and softmax gives probability zero.
    """

    def __init__(self, copies: list[nn.Module]) -> None:
        super().__init__()
        self.copies = nn.ModuleList(copies)
        self.task_ids: torch.Tensor | None = None

    def forward(self, *args, **kwargs) -> torch.Tensor:
        outs = [m(*args, **kwargs) for m in self.copies]
        width = max(o.shape[-1] for o in outs)
        outs = [nn.functional.pad(o, (0, width - o.shape[-1]), value=float("-inf")) for o in outs]
        return torch.stack(outs)[self.task_ids, torch.arange(len(self.task_ids), device=self.task_ids.device)]


class MultiTask(nn.Module):
    """One base model with a bank of soft prompts and per-task heads. forward(input_ids, attention_mask, task_ids)."""

    def __init__(self, model: nn.Module, switches: list[PerTask]) -> None:
        super().__init__()
        self.model, self.switches = model, switches
        self.banked = isinstance(getattr(model, "source", None), Prompt)  # a soft-prompt wrapper takes task_ids

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def schedule(self, task_of: list[int]):
        """All rows in one group: a batch may mix tasks (see `HotSwap.schedule` for the grouped kind)."""
        yield self, list(range(len(task_of)))

    def forward(self, task_ids: torch.Tensor, **batch):
        for switch in self.switches:
            switch.task_ids = task_ids
        try:
            return self.model(**batch, task_ids=task_ids) if self.banked else self.model(**batch)
        finally:
            for switch in self.switches:
                switch.task_ids = None


def load_tasks(run_dirs: list[Path], weights: list[float] | None = None, trust_remote_code: bool = False):
    """(model, tasks, tokenizer): several soft-prompt runs as one MultiTask (the first run's base and method, the
    others' prompts and heads added); several runs of a mergeable method as a `HotSwap`; with `weights`, the weighted
    combination of LoRA runs as one task."""
    recipes = hotswap.read_recipes(run_dirs, trust_remote_code)
    first = recipes[0]
    hotswap.check_same_base(run_dirs, recipes)
    kind = TASKS[first.task]
    if kind.predict_row is None and kind.generate is None:
        serves = ", ".join(name for name, task in TASKS.items() if task.predict_row or task.generate)
        raise RunDirError(f"{run_dirs[0]}: predict serves {serves} runs; score {first.task} runs with `ftune eval`")
    if kind.generate is not None and len(run_dirs) > 1 and weights is None:
        raise RunDirError(f"{run_dirs[1]}: predict writes {first.task} text with one run at a time; give one run")
    if weights is not None:
        recipe, model, tokenizer, names = hotswap.mix_runs(run_dirs, weights, trust_remote_code)
        return MultiTask(model, []), [Task("combined", recipe, names)], tokenizer
    tasks = [Task(Path(run).name, r, rundir.read_record(run).label_names) for run, r in zip(run_dirs, recipes)]
    if len(run_dirs) > 1 and hotswap.swappable(recipes):
        bank = hotswap.load_bank(run_dirs, recipes, trust_remote_code)
        return bank, tasks, bank.tokenizer
    _, model, tokenizer = assemble.load_run(run_dirs[0], trust_remote_code)
    if len(run_dirs) == 1:
        return MultiTask(model, []), tasks, tokenizer
    sites = {method_of(r.method).runs_with.prompt_site for r in recipes}
    if sites == {None}:
        raise RunDirError(
            f"{run_dirs[0]}: {first.method.name} is neither a soft-prompt method nor mergeable; several "
            "runs share one base through their prompts (prompt_tuning, p_tuning, prefix_tuning, "
            "p_tuning_v2) or by hot-swap (methods with merge: lora, adalora, ...)"
        )
    states = [rundir.read_weights(run) for run in run_dirs]
    kinds = {(method_of(r.method).runs_with.prompt_site, getattr(r.method, "tokens_before", None)) for r in recipes}
    if len(kinds) > 1 or None in sites:
        raise RunDirError(
            "runs mix input prompts with layer prefixes or with other methods (or differ in "
            "tokens_before); give runs of one kind"
        )
    prompts = [s.pop("source.weight") for s in states]
    n = max(p.shape[0] for p in prompts)
    bank = torch.stack([nn.functional.pad(p, (0, 0, 0, n - p.shape[0])) for p in prompts])
    model.source = Prompt(bank.to(model.source.weight.device), [p.shape[0] for p in prompts])
    owners = sorted({name.rpartition(".")[0] for name in states[0]})
    switches = []
    for owner in owners:
        module = model.get_submodule(owner)
        copies = []
        for run, state in zip(run_dirs, states):
            twin = copy.deepcopy(module)
            for pname, _ in list(twin.named_parameters()):
                key = f"{owner}.{pname}"
                if key not in state:
                    raise RunDirError(f"{run}: its weights lack {key}; it is not the same kind of run as the first")
                parent, _, leaf = pname.rpartition(".")
                setattr(
                    twin.get_submodule(parent) if parent else twin, leaf, nn.Parameter(state[key], requires_grad=False)
                )
            copies.append(twin)
        switch = PerTask(copies)
        parent, _, leaf = owner.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, switch)
        switches.append(switch)
    return MultiTask(model.eval(), switches), tasks, tokenizer


@torch.no_grad()
def predict(
    multi: MultiTask | hotswap.HotSwap, tasks: list[Task], tokenizer, rows: list[dict[str, Any]], batch_size: int = 32
):
    """One prediction per row, in input order: {"task", "label", "scores", "logits"}, or {"task", "text"} for a task
    that generates (seq2seq: the recipe's `generation:` settings); a row names its task by run name or index."""
    from ftune.data.loader import collate
    from ftune.data.sources import Rows

    by_name = {t.name: i for i, t in enumerate(tasks)}
    examples = []
    for i, row in enumerate(rows):
        key = row.get("task", 0 if len(tasks) == 1 else None)
        index = by_name.get(key, key if isinstance(key, int) and 0 <= key < len(tasks) else None)
        if index is None:
            raise DataError(f"input row {i + 1}: task {key!r} is none of {list(by_name)} (or their indices)")
        task = tasks[index]
        d = task.recipe.data
        # encoding wants a label (or a target text); predictions ignore it
        labelled = (
            {d.target_column: ""} if TASKS[task.recipe.task].generate else {d.label_column: task.labels[0]}
        ) | row
        encoded = assemble.encode_rows(task.recipe, Rows([labelled], f"input row {i + 1}"), tokenizer, task.labels)
        examples.append(encoded.examples[0] | {"task": index})
    device = multi.device
    out: list[dict[str, Any]] = [{}] * len(examples)
    for forward, positions in multi.schedule([e["task"] for e in examples]):  # one group, or one per hot-swapped task
        for start in range(0, len(positions), batch_size):
            chunk = positions[start : start + batch_size]
            batch = collate(tokenizer.pad_token_id)([examples[i] for i in chunk])
            batch.pop("labels")
            kind = TASKS[tasks[examples[chunk[0]]["task"]].recipe.task]
            if kind.generate is not None:  # one run: write each row's text
                decoding = Decoding(tokenizer, tasks[0].recipe.generation.model_dump())
                texts = kind.generate(multi.model, {k: v.to(device) for k, v in batch.items()}, decoding)
                for i, text in zip(chunk, texts):
                    out[i] = {"task": tasks[examples[i]["task"]].name, "text": text}
                continue
            task_ids = torch.tensor([examples[i]["task"] for i in chunk], device=device)
            logits = forward(task_ids, **{k: v.to(device) for k, v in batch.items()}).logits.float()
            for i, row_logits in zip(chunk, logits):
                task = tasks[examples[i]["task"]]
                out[i] = {"task": task.name, **TASKS[task.recipe.task].predict_row(row_logits, task.labels)}
    return out


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}: not UTF-8 text (byte {e.start}); JSONL rows are UTF-8, one JSON object a line"
        ) from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or type(e).__name__})") from None
    for i, line in enumerate(text.splitlines()):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {i + 1}: not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path} line {i + 1}: a row is a JSON object")
            rows.append(row)
    if not rows:
        raise DataError(f"{path}: has no rows")
    return rows
