"""The checks `ftune train` makes once the recipe, data and model have loaded, before the run directory is written
(issue 22: every mistake caught before the first step). Each ends in one line where it used to end in a traceback at
step 1 or later, or in a run that kept the wrong weights.

- Positions (RecipeError): data.max_length (a seq2seq decoder: data.max_target_length), plus the virtual tokens a
  soft-prompt method adds where they take positions (`virtual_tokens`), against a learned position table: BERT's
  `position_embeddings`, GPT-2's `wpe`, BART's and OPT's `embed_positions` (less their offset of 2; RoBERTa's less
  padding_idx + 1, where its positions start). A longer row would index past the table. A model without one (rotary:
  Llama; ALiBi; T5's relative buckets) computes any position: past config.max_position_embeddings, the context it
  was trained at, is a warning only, since training longer rows is how such a context is extended. Not checked: the
  tokenizer's model_max_length (advice to the tokenizer's caller: ftune truncates to data.max_length itself, and a
  model's hard limit is its position table) and token types (ftune encodes none, so every row is type 0).
- Vocabulary (ModelError): the tokenizer's special ids, and the ids of the encoded training rows, against the rows
  of the input embedding; a tokenizer with more ids than rows is a warning where the data never uses the extra ones
  (`vocabulary`). More rows than the tokenizer has ids is normal (vocabularies padded to a multiple of 64).
- Memory: one training step's peak beyond the loaded weights (the estimate `ftune validate` prints, ftune/estimate/)
  against what the device has free: MemAvailable of /proc/meminfo on CPU (shared by this machine's processes), free
  CUDA memory (torch.cuda.mem_get_info) on a GPU. Refused on CPU (RecipeError), a warning on CUDA (the allocator can
  still trade speed for memory there, and other processes' use changes). The step must fit with MEMORY_MARGIN to
  spare. The simulation traces every operation of a step, too slow to run before each of the test suite's tiny
  runs, so `step_bound` comes first: an upper bound read from the parameters' and modules' shapes, and the
  simulation runs only when that bound does not fit. Skipped where the free memory cannot be read.
- Disk (RunDirError): the nearest existing folder of output_dir must be writable, and its filesystem must hold one
  checkpoint (the trainable weights and the optimizer's state) and the run's own copy of the weights, with
  DISK_MARGIN and DISK_SLACK (tokenizer, metrics, plots) to spare. Rotating checkpoints briefly holds one more
  (the new one is complete before the old one goes); a save that fails for space leaves the previous one intact.

A refusal on any process is every process's (`processes.gather`), so none waits alone at the next collective.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ftune.errors import FtuneError, RecipeError, RunDirError
from ftune.run.preflight_model import positions, virtual_tokens, vocabulary

MEMORY_MARGIN = 1.10
"""The step's estimated peak × this must fit in the free memory: the estimate counts tensors only, not the
allocator's rounding and cache, the loader's batches or Python's objects (tests/test_estimate.py holds it to ±15% of
torch's own count); a larger margin would refuse runs that fit."""
ACTIVATION_WIDTHS, ATTENTION_MAPS = 4, 6
"""`step_bound`'s activation bytes per token: ACTIVATION_WIDTHS fp32 values of each module's input and output width,
and ATTENTION_MAPS fp32 maps of (heads × sequence) scores per attention layer; chosen to stay above the simulated peak
of every architecture and method tried (tests/test_preflight.py: test_the_bound_is_above_the_estimate)."""
DISK_MARGIN, DISK_SLACK = 1.10, 64 * 2**20
"""The run's weights and optimizer state × DISK_MARGIN (safetensors and torch.save headers, state.json), + DISK_SLACK
bytes for the tokenizer's files, the recipe, metrics and plots."""
MEMINFO = "/proc/meminfo"
"""Where Linux says how much memory is available without swapping (its MemAvailable line)."""


def check(
    recipe,
    model: nn.Module,
    tokenizer,
    examples: list[dict[str, Any]],
    objective,
    extra: dict[str, nn.Module],
    precision: str,
    accelerator,
    console,
    *,
    overwrite: bool,
) -> None:
    """Every check above for `model` (the unwrapped trained model, method applied) and the encoded training
    `examples`, with `objective` (the bound objective of ftune/run/setup.py) and the frozen `extra` models it reads;
    raises the first refusal (on every process alike), prints the warnings (main process)."""
    from ftune.run import processes

    notes: list[str | None] = []  # warnings; None where a check has none
    try:
        notes += [*positions(recipe, model), vocabulary(model, tokenizer, examples)]
        free_space(recipe, model, Path(recipe.output_dir).expanduser(), overwrite=overwrite)
        notes.append(
            memory(
                recipe,
                model,
                tokenizer,
                examples,
                objective,
                extra,
                precision,
                accelerator.device,
                _local_processes(accelerator),
            )
        )
        failure = None
    except FtuneError as e:
        failure = (type(e), str(e))
    failures = [f for f in processes.gather(accelerator, failure) if f]
    if failures:
        kind, message = failures[0]
        raise kind(message)
    for line in filter(None, notes):
        console.print(f"warning: {line}", soft_wrap=True, markup=False, highlight=False)


def _local_processes(accelerator) -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))


# --- memory ------------------------------------------------------------------------------------------------------


def memory(
    recipe,
    model: nn.Module,
    tokenizer,
    examples,
    objective,
    extra: dict[str, nn.Module],
    precision: str,
    device: torch.device,
    processes: int = 1,
) -> str | None:
    """Refuse (CPU) or warn (CUDA: the warning's text is returned) when one training step's peak beyond the loaded
    weights, × MEMORY_MARGIN, exceeds the free memory of `device` (on CPU shared by this machine's `processes`).
    None when it fits, or when the free memory or the estimate cannot be had."""
    free = free_memory(device)
    if free is None or not examples:
        return None
    budget = free // processes
    group = len(examples[0]["input_ids"]) if isinstance(examples[0]["input_ids"][0], list) else 1
    if step_bound(recipe, model, extra, precision, group) * MEMORY_MARGIN <= budget:  # the cheap test settles most runs
        return None
    peak = simulated_peak(recipe, model, tokenizer, examples, objective, extra, precision, device)
    if peak is None or peak * MEMORY_MARGIN <= budget:
        return None
    where = (
        f"{size(free)} of RAM is available"
        + (f", {size(budget)} for each of {processes} processes" if processes > 1 else "")
        if device.type == "cpu"
        else f"{size(free)} is free on {device}"
    )
    if device.type == "cuda":
        return _too_little(recipe, peak, where)
    raise RecipeError(_too_little(recipe, peak, where))


def _too_little(recipe, peak: int, where: str) -> str:
    """The line for a step of `peak` bytes that does not fit in what is free (`where`), with the fixes that apply."""
    from ftune.methods import method_of

    t, d = recipe.train, recipe.data
    fixes = "lower train.batch_size (raise train.grad_accum to keep the batch) or data.max_length"
    if not t.gradient_checkpointing and method_of(recipe.method).runs_with.gradient_checkpointing:
        fixes += ", or set train.gradient_checkpointing: true"
    return (
        f"train.batch_size: one training step needs about {size(peak)} beyond the loaded weights (the estimate "
        f"`ftune validate` prints, at {t.batch_size} rows × {d.max_length} tokens) and "
        f"{round(100 * (MEMORY_MARGIN - 1))}% to spare, but only {where}; {fixes}"
    )


def free_memory(device: torch.device) -> int | None:
    """Bytes `device` can still give: MemAvailable on CPU (Linux), free CUDA memory on a GPU; None if unknown."""
    if device.type == "cuda":
        try:
            return torch.cuda.mem_get_info(device)[0]
        except (RuntimeError, AssertionError):
            return None
    if device.type != "cpu":
        return None
    try:
        with open(MEMINFO, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file's unit is kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def step_bound(recipe, model: nn.Module, extra: dict[str, nn.Module], precision: str, group: int = 1) -> int:
    """Bytes one training step needs beyond the weights, at most (never below the simulation's peak): the
    gradients, AdamW's two moments and the update's temporaries (6 × the trainable parameters' bytes), the weight
    copies autocast makes under bf16/fp16, two fp32 copies of the largest linear weight (a quantised base's
    dequantised weight and its backward's), and the activations with backward's gradients of them
    (ACTIVATION_WIDTHS, ATTENTION_MAPS per token, of every model the step runs, a frozen teacher's too). The
    sequence is the longest the loop meets: data.max_length
    (+ data.max_target_length for an encoder-decoder) plus every virtual token, in train.batch_size rows of `group`
    sequences each (a preference pair: 2)."""
    params = list(model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    cast = 2 * sum(p.numel() for p in params if p.is_floating_point()) if precision in ("bf16", "fp16") else 0
    d, models = recipe.data, [model, *extra.values()]
    length = d.max_length + sum(virtual_tokens(model))
    if any(getattr(getattr(m, "config", None), "is_encoder_decoder", False) for m in models):
        length += d.max_target_length
    rows = recipe.train.batch_size * group
    widths = sum(_width(module) for m in models for module in m.modules())
    layers, heads = _attention_layers(models)
    per_token = 4 * (ACTIVATION_WIDTHS * widths + ATTENTION_MAPS * layers * heads * length)
    largest = max((m.in_features * m.out_features for m in model.modules() if _linear_like(m)), default=0)
    return 6 * trainable + cast + 2 * 4 * largest + rows * length * per_token


def _width(module: nn.Module) -> int:
    """Values per token a module reads and writes: in + out features of a linear (a quantised one too), an
    embedding's width, a norm's; 0 for a module without weights of its own."""
    if isinstance(module, nn.Embedding):
        return module.embedding_dim
    if _linear_like(module):
        return module.in_features + module.out_features
    weight = module._parameters.get("weight")
    if weight is None:
        return 0
    return sum(weight.shape) if weight.dim() > 1 else weight.numel()  # Conv1D (GPT-2): in + out; a norm: its size


def _linear_like(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, side, None), int) for side in ("in_features", "out_features"))


def _attention_layers(models: list[nn.Module]) -> tuple[int, int]:
    """(attention modules, the most heads any config names): the innermost module whose class name ends in
    "Attention" is one attention layer (BERT's BertSelfAttention, Llama's LlamaAttention, BART's self and cross)."""
    layers, heads = 0, 1
    for model in models:
        for module in model.modules():
            inner = not any(type(c).__name__.endswith("Attention") for c in module.children())
            layers += type(module).__name__.endswith("Attention") and inner
        config = getattr(model, "config", None)
        for key in ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads", "decoder_attention_heads"):
            value = getattr(config, key, None)
            heads = max(heads, value) if isinstance(value, int) else heads
    return layers, heads


def simulated_peak(
    recipe,
    model: nn.Module,
    tokenizer,
    examples,
    objective,
    extra: dict[str, nn.Module],
    precision: str,
    device: torch.device,
) -> int | None:
    """The step's peak beyond the weights from the simulation (ftune/estimate/simulate.py) of the step as the loop
    will take it; None where it cannot be simulated (the estimate is advice here, never the end of a run)."""
    from ftune.estimate import step
    from ftune.estimate.simulate import simulate

    setup = step.step_setup(recipe, objective, precision, device, extra)
    try:
        batch = step.longest_batch(recipe, examples, tokenizer)
        return simulate(model, batch, setup, recipe.train.gradient_checkpointing).peak
    except Exception:
        if os.environ.get("FTUNE_DEBUG") == "1":
            raise
        return None


def size(n: int) -> str:
    from ftune.estimate.report import size_text

    return size_text(int(n))


# --- disk --------------------------------------------------------------------------------------------------------


def free_space(recipe, model: nn.Module, out: Path, *, overwrite: bool) -> None:
    """Refuse an output_dir whose nearest existing folder is not writable, or whose filesystem cannot hold the
    run's files (`run_bytes`); an old run that --overwrite replaces counts as free (RunDirError)."""
    folder = next((p for p in (out, *out.parents) if p.exists()), None)
    if folder is None:
        return
    if not os.access(folder, os.W_OK | os.X_OK):
        raise RunDirError(
            f"output_dir: {folder} is not writable, so {out} cannot be made there; "
            "choose another output_dir or make the folder writable"
        )
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if overwrite and folder == out:
        free += sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and not p.is_symlink())
    needed = run_bytes(model, recipe.train.optimizer)
    if needed > free:
        raise RunDirError(
            f"output_dir: {folder} has {size(free)} free on its filesystem but the run needs about "
            f"{size(needed)} (a checkpoint: trainable weights and optimizer state, and the weights "
            "again); free space there or choose another output_dir"
        )


def run_bytes(model: nn.Module, optimizer: str) -> int:
    """Bytes of the run's files: one checkpoint (the trainable parameters, and the optimizer's state: AdamW's two
    moments in the parameter's dtype; 8-bit AdamW's one byte each, 32-bit for tensors under 4,096 values as
    bitsandbytes keeps them) and the run's own copy of the weights, × DISK_MARGIN + DISK_SLACK."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    weights = sum(p.numel() * p.element_size() for p in trainable)
    state = sum(2 * p.numel() * _state_bytes(p, optimizer) for p in trainable)
    return int((2 * weights + state) * DISK_MARGIN) + DISK_SLACK


def _state_bytes(p: torch.Tensor, optimizer: str) -> int:
    """Bytes per value of one AdamW moment of `p` under train.optimizer `optimizer`."""
    if "8bit" in optimizer:
        return 1 if p.numel() >= 4096 else 4
    return 4 if optimizer.startswith("paged") else p.element_size()  # paged_adamw is paged_adamw_32bit
