"""`ftune merge` and `ftune export`: a trained run as a standalone transformers model or a peft adapter dir."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from ftune.assemble import load_run, recipe_task
from ftune.errors import MethodError, RunDirError
from ftune.methods import method_of
from ftune.methods.base import unwrap_merged
from ftune.models import DTYPES, quantize


def merge_run(run_dir: str | Path, out: str | Path, trust_remote_code: bool = False) -> Path:
    """Fold the method into the base weights and save a plain HF model dir (+ tokenizer).

    A quantised base (QLoRA) is first dequantised, each weight to the values its forward used (see
    `quantize.dequantize`); the saved model carries no quantization_config and loads with AutoModelFor*.
    """
    out = check_fresh(out)  # before any loading: a refusal costs nothing
    _, model, tokenizer = merged_model(run_dir, trust_remote_code)
    make_dir(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def merged_model(run_dir: str | Path, trust_remote_code: bool = False):
    """(recipe, the run's base model with the method folded in and unwrapped to plain transformers modules,
    tokenizer); MethodError for a method that cannot merge. `ftune merge` saves it, `--format onnx` exports it."""
    recipe, model, tokenizer = load_run(run_dir, trust_remote_code)
    method = method_of(recipe.method)
    if method.merging is None:
        raise MethodError(
            f"{method.name} adds modules that cannot be folded into the base weights, so there is no "
            f"merged model; the run dir itself is the model (`ftune eval {run_dir}`)"
        )
    dtype = DTYPES[recipe.model.dtype]
    if recipe.model.quantization:  # B A cannot be added to 4/8-bit codes: dequantise (to the compute dtype), then fold
        quantize.dequantize(model, dtype)
    method.merging.merge(model)
    model = unwrap_merged(model)
    if recipe.model.quantization:  # training kept norms and head in fp32; the merged model has one dtype
        model.to(dtype)
    for p in model.parameters():
        p.requires_grad_(True)
    return recipe, model, tokenizer


def export_peft(run_dir: str | Path, out: str | Path, trust_remote_code: bool = False) -> Path:
    """adapter_config.json + adapter_model.safetensors that `peft.PeftModel.from_pretrained` loads."""
    out = check_fresh(out)
    recipe, model, tokenizer = load_run(run_dir, trust_remote_code)
    method = method_of(recipe.method)
    if method.saving.peft is None:
        raise MethodError(f"export --format peft: peft has no equivalent of {method.name}; use --format hf")
    config = method.saving.peft.config(model, recipe.method)
    if method.saving.peft.weights:  # soft prompts: peft's prompt-learning layout differs from its tuners'
        tensors, extra_owners = method.saving.peft.weights(model)
    else:
        method_params = {id(p) for p in method.trainable(model, recipe.method)}
        # weights that train beside the method (the task head) travel as peft's modules_to_save
        extra_owners = sorted(
            {
                name.rpartition(".")[0]
                for name, p in model.named_parameters()
                if p.requires_grad and id(p) not in method_params
            }
        )
        tensors = {f"base_model.model.{n}": p for n, p in model.named_parameters() if p.requires_grad}
    config |= {
        "task_type": recipe_task(recipe).peft_task_type,
        "modules_to_save": extra_owners or None,
        "base_model_name_or_path": recipe.model.name,
        "inference_mode": True,
    }
    tensors = {n: t.detach().cpu().contiguous() for n, t in tensors.items()}
    make_dir(out)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(out)
    return out


def check_fresh(out: str | Path) -> Path:
    """`out` must be new or an empty folder: merge and export never write into (or over) anything else."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"{out}: exists and is not a directory; choose a new directory")
    if out.is_dir() and any(out.iterdir()):
        raise RunDirError(f"{out}: exists and is not empty; choose a new directory")
    return out


def make_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"{out}: cannot be created ({e.strerror or type(e).__name__})") from None
