"""Several runs of a mergeable method on one loaded base: hot-swap by merge / unmerge, and weighted combination.

Hu et al. 2021, "LoRA", arXiv:2106.09685, §4: a deployed model switches tasks by subtracting one update and adding
another, (W + ΔW) - ΔW + ΔW', without reloading W. `HotSwap` holds one base with the method attached (built from the
first run) and each run's method.safetensors (its update AND its own head, on the CPU). For one task it loads that
run's weights, calls `Method.merging.merge` (W + ΔW), runs the rows, and `.unmerge` (back to W). A method that cannot be
merged exactly over its base (a 4/8-bit base, QLoRA) runs its update beside the base instead; the swap is the same.

Rounding makes (W + ΔW) - ΔW differ from W by a few ulps, and repeated swaps would add up, so `restore_base` (run
after every `schedule`) compares the base weights with a CPU copy taken at load, refuses a drift larger than the
rounding of the merged magnitudes could explain (a broken unmerge), and puts the copy back bit for bit. The copy
costs host memory the size of the base.

Weighted combination (`combine`): one LoRA adapter equal to Σ w_i ΔW_i exactly, by concatenating ranks: with
ΔW_i = s_i B_i A_i (B_i: d_out x r_i, A_i: r_i x d_in, s_i = alpha_i / r_i, or alpha_i / sqrt(r_i) with rsLoRA),
A = [A_1; A_2; ...] (Σ r_i x d_in) and B = [w_1 s_1 B_1, w_2 s_2 B_2, ...] (d_out x Σ r_i) at scaling 1. Heads cannot
be summed, so only runs without trained head weights combine (causal LM runs, or method.train_head: false).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ftune import assemble, models, rundir
from ftune.errors import MethodError, RecipeError, RunDirError
from ftune.methods import METHODS, method_of
from ftune.methods.lora import LoRALinear
from ftune.recipe import Recipe

# config fields that act only in training: hot-swapped runs may differ in them (the rest is the attached structure)
TRAINING_ONLY = {"dropout"}


def read_recipes(run_dirs: list[Path], trust_remote_code: bool = False) -> list[Recipe]:
    """Each run's stored recipe (`assemble.stored_recipe`; RunDirError for a folder that is not a finished run)."""
    return [assemble.stored_recipe(run, trust_remote_code)[0] for run in run_dirs]


def check_same_base(run_dirs: list[Path], recipes: list[Recipe]) -> None:
    """Every run must have the first run's model section (name, dtype, quantization, ...) and task."""
    first = recipes[0]
    for run, r in zip(run_dirs[1:], recipes[1:]):
        if r.task != first.task:
            raise RunDirError(
                f"{run}: task is {r.task}, {run_dirs[0]} has {first.task}; give runs of one base and task"
            )
        for field, value in r.model.model_dump().items():
            if value != getattr(first.model, field):
                raise RunDirError(
                    f"{run}: model.{field} is {value!r}, {run_dirs[0]} has {getattr(first.model, field)!r}; "
                    "several runs share one loaded base, so give runs of one base"
                )


def swappable(recipes: list[Recipe]) -> bool:
    """True when the first run's method can be merged and unmerged and its saved weights are its trainable parameters
    (what a swap loads): LoRA, DoRA, AdaLoRA; also the methods whose weights are the model's own (full, bitfit, layers,
    head: merge is a no-op, and a swap loads those weights). Not sparse, whose runs carry their own mask."""
    method = method_of(recipes[0].method)
    return method.merging is not None and method.saving.own_form is None


class HotSwap:
    """One base with a mergeable method attached, serving several runs by swapping their weights in and out.

    Built by `load_bank`. `active(i)` is a context in which the model computes run i alone; `schedule` runs groups of
    rows task by task and restores the base afterwards. `last_drift`: the largest |W_after - W| `restore_base` saw.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        recipes: list[Recipe],
        states: list[dict[str, torch.Tensor]],
        label_names: list[list[str] | None],
    ) -> None:
        self.model, self.tokenizer, self.recipes, self.states = model, tokenizer, recipes, states
        self.label_names = label_names
        self.method = method_of(recipes[0].method)
        self.merges = not recipes[0].model.quantization  # B A cannot be added to 4/8-bit codes and taken back exactly
        swapped = set().union(*states)
        # unmerged (quantised) bases are never written to: nothing to compare or restore
        self._original = {
            n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if n not in swapped and self.merges
        }
        self._peak: dict[str, torch.Tensor] = {}  # largest |merged weight| per base tensor: scale of merge rounding
        self.swaps, self.last_drift = 0, 0.0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @contextmanager
    def active(self, index: int) -> Iterator[nn.Module]:
        """The model as run `index` alone: its weights and head loaded, its update merged (unmerged on exit)."""
        self._load(index)
        if self.merges:
            self.method.merging.merge(self.model)
            self._note_merged_magnitudes()
        try:
            yield self.model
        finally:
            if self.merges:
                self.method.merging.unmerge(self.model)
            self.swaps += 1

    def schedule(self, task_of: list[int]) -> Iterator[tuple[Callable, list[int]]]:
        """(forward(task_ids, **batch), positions) per task, in order of first appearance; restores the base at end."""
        order = list(dict.fromkeys(task_of))
        for index in order:
            with self.active(index) as model:
                yield (lambda task_ids, **batch: model(**batch)), [i for i, t in enumerate(task_of) if t == index]
        self.restore_base()

    def restore_base(self) -> float:
        """Compare every base weight with its copy from load time, refuse a drift beyond rounding, restore the copy.

        The allowed drift per tensor is 8 ulps of the largest magnitude the tensor held (merged or not) per swap:
        merge and unmerge round once each. Returns the largest drift seen.
        """
        params, worst = dict(self.model.named_parameters()), 0.0
        with torch.no_grad():
            for name, original in self._original.items():
                param = params[name]
                if param.numel() == 0:
                    continue
                reference = original.to(param.device)
                drift = float((param.float() - reference.float()).abs().max())
                scale = max(float(reference.abs().max()), float(self._peak.get(name, 0.0)))
                bound = (
                    max(self.swaps, 1) * 8 * torch.finfo(param.dtype).eps * max(scale, 1e-30)
                    if param.dtype.is_floating_point
                    else 0.0
                )
                if drift > bound:
                    raise MethodError(
                        f"{self.method.name}: unmerge left {name} {drift:.3g} away from the base weight "
                        f"(rounding explains at most {bound:.3g}); the hot-swapped outputs are not trusted"
                    )
                worst = max(worst, drift)
                param.copy_(reference)
        self._peak.clear()
        self.swaps, self.last_drift = 0, worst
        return worst

    def _load(self, index: int) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in self.states[index].items():
                param = params[name]
                param.data = tensor.to(param.device, param.dtype, copy=True)  # heads' widths follow each label set
        names = self.label_names[index]
        config = getattr(self.model, "config", None)
        if names and config is not None:  # token classification reads tag names from the model's config
            config.id2label, config.label2id = dict(enumerate(names)), {n: i for i, n in enumerate(names)}

    def _note_merged_magnitudes(self) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name in self._original:
                param = params[name]
                if param.numel() and param.dtype.is_floating_point:
                    peak = param.detach().abs().max().float().cpu()
                    self._peak[name] = torch.maximum(self._peak.get(name, peak), peak)


def load_bank(run_dirs: list[Path], recipes: list[Recipe] | None = None, trust_remote_code: bool = False) -> HotSwap:
    """The first run loaded (`assemble.load_run`) and every run's weights read, after checking they fit one base."""
    run_dirs = [Path(r) for r in run_dirs]
    recipes = recipes or read_recipes(run_dirs, trust_remote_code)
    check_same_base(run_dirs, recipes)
    first = recipes[0]
    if not swappable(recipes):
        raise RunDirError(
            f"{run_dirs[0]}: {first.method.name} cannot be merged into the base, so several runs cannot "
            "be hot-swapped on one base (mergeable: "
            f"{', '.join(n for n, m in METHODS.items() if m.merging)})"
        )
    for run, r in zip(run_dirs[1:], recipes[1:]):
        if r.method.name != first.method.name:
            raise RunDirError(
                f"{run}: method is {r.method.name}, {run_dirs[0]} has {first.method.name}; hot-swapped "
                "runs share one attached method"
            )
        for field, value in r.method.model_dump().items():
            if field not in TRAINING_ONLY and value != getattr(first.method, field):
                raise RunDirError(
                    f"{run}: method.{field} is {value!r}, {run_dirs[0]} has "
                    f"{getattr(first.method, field)!r}; hot-swapped runs share one attached "
                    f"{first.method.name} (same targets, rank and scaling; only "
                    f"{', '.join(sorted(TRAINING_ONLY))} may differ)"
                )
    _, model, tokenizer = assemble.load_run(run_dirs[0], trust_remote_code)
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    states = [rundir.read_weights(run) for run in run_dirs]
    for run, state in zip(run_dirs, states):
        if state.keys() != expected:
            odd = min(expected ^ state.keys())
            raise RunDirError(
                f"{Path(run) / rundir.WEIGHTS}: does not fit the first run's method and model "
                f"({'missing' if odd in expected else 'unexpected'} {odd})"
            )
    names = [rundir.read_record(run).label_names for run in run_dirs]
    return HotSwap(model, tokenizer, recipes, states, names)


def lora_scaling(cfg: Any) -> float:
    """s = alpha / r, or alpha / sqrt(r) with rsLoRA: the factor `lora.apply` gives each LoRALinear."""
    return cfg.alpha / (math.sqrt(cfg.r) if cfg.rslora else cfg.r)


def mix_runs(run_dirs: list[Path], weights: list[float], trust_remote_code: bool = False):
    """(recipe, model, tokenizer, label names): one LoRA adapter equal to Σ w_i ΔW_i over the first run's base.

    The recipe is the first run's with method r = Σ r_i, alpha = Σ r_i (scaling 1), rslora off, dropout 0.
    """
    run_dirs = [Path(r) for r in run_dirs]
    if len(weights) != len(run_dirs):
        raise RecipeError(f"--weights: {len(weights)} values for {len(run_dirs)} runs; give one weight per run")
    if not all(math.isfinite(w) for w in weights):
        raise RecipeError("--weights: every weight must be a finite number")
    recipes = read_recipes(run_dirs, trust_remote_code)
    check_same_base(run_dirs, recipes)
    first = recipes[0]
    for run, r in zip(run_dirs, recipes):
        if r.method.name != "lora" or getattr(r.method, "dora", False):
            kind = "DoRA, whose update is not linear in B A" if r.method.name == "lora" else r.method.name
            raise RecipeError(f"--weights: {run} is {kind}; weights combine plain LoRA runs (Σ w_i s_i B_i A_i)")
        if r.method.targets != first.method.targets:
            raise RecipeError(
                f"--weights: {run} has method.targets {r.method.targets!r}, {run_dirs[0]} has "
                f"{first.method.targets!r}; combined runs must adapt the same layers"
            )
    rank = sum(r.method.r for r in recipes)
    method = type(first.method).model_validate(
        first.method.model_dump() | {"r": rank, "alpha": float(rank), "rslora": False, "dropout": 0.0}
    )
    recipe = first.model_copy(update={"method": method})
    names = rundir.read_record(run_dirs[0]).label_names
    source = models.resolve_model(recipe.model.name, recipe.model.gguf_file, recipe.model.revision)
    tokenizer = assemble.run_tokenizer(run_dirs[0], recipe, source)
    model = assemble.build_model(recipe, source, tokenizer, names)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    factors = {f"{name}.{part}.weight" for name in layers for part in ("lora_A", "lora_B")}
    states = [rundir.read_weights(run) for run in run_dirs]
    for run, state in zip(run_dirs, states):
        if state.keys() - factors:
            raise RecipeError(
                f"--weights: {run} trained head weights ({min(state.keys() - factors)}); heads of "
                "different runs cannot be combined: weights need causal_lm runs or classification runs "
                "with method.train_head: false"
            )
        if factors - state.keys():
            raise RunDirError(f"{run / rundir.WEIGHTS}: lacks {min(factors - state.keys())}")
    with torch.no_grad():
        for name, layer in layers.items():
            a = torch.cat([s[f"{name}.lora_A.weight"].float() for s in states])
            b = torch.cat(
                [
                    w * lora_scaling(r.method) * s[f"{name}.lora_B.weight"].float()
                    for w, r, s in zip(weights, recipes, states)
                ],
                dim=1,
            )
            layer.lora_A.weight.copy_(a)
            layer.lora_B.weight.copy_(b)
            layer.scaling = 1.0
    return recipe, model.eval(), tokenizer, names


def parse_weights(text: str | None) -> list[float] | None:
    """`--weights 0.7,0.3` -> [0.7, 0.3]."""
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise RecipeError(f"--weights {text!r}: expected comma-separated numbers, e.g. 0.7,0.3") from None
