"""`ftune merge` and `ftune export`: a trained run as a standalone transformers model or a peft adapter dir."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from ftune.assemble import load_run
from ftune.errors import MethodError, RunDirError
from ftune.methods import METHODS
from ftune.methods.base import unwrap_merged

PEFT_TASK_TYPES = {"sequence_classification": "SEQ_CLS", "causal_lm": "CAUSAL_LM"}


def merge_run(run_dir: str | Path, out: str | Path) -> Path:
    """Fold the method into the base weights and save a plain HF model dir (+ tokenizer)."""
    recipe, model, tokenizer = load_run(run_dir)
    method = METHODS[recipe.method.name]
    if method.merge is None:
        raise MethodError(f"{method.name} adds modules that cannot be folded into the base weights, so there is no "
                          f"merged model; the run dir itself is the model (`ftune eval {run_dir}`)")
    out = _fresh_dir(out)
    method.merge(model)
    model = unwrap_merged(model)
    for p in model.parameters():
        p.requires_grad_(True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def export_peft(run_dir: str | Path, out: str | Path) -> Path:
    """adapter_config.json + adapter_model.safetensors that `peft.PeftModel.from_pretrained` loads."""
    recipe, model, tokenizer = load_run(run_dir)
    method = METHODS[recipe.method.name]
    if method.peft_config is None:
        raise MethodError(f"export --format peft: peft has no equivalent of {method.name}; use --format hf")
    config = method.peft_config(model, recipe.method)
    method_params = {id(p) for p in method.trainable(model, recipe.method)}
    # weights that train beside the method (the task head) travel as peft's modules_to_save
    extra_owners = sorted({name.rpartition(".")[0] for name, p in model.named_parameters()
                           if p.requires_grad and id(p) not in method_params})
    config |= {"task_type": PEFT_TASK_TYPES[recipe.task], "modules_to_save": extra_owners or None,
               "base_model_name_or_path": recipe.model.name, "inference_mode": True}
    tensors = {f"base_model.model.{n}": p.detach().cpu().contiguous()
               for n, p in model.named_parameters() if p.requires_grad}
    out = _fresh_dir(out)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(out)
    return out


def _fresh_dir(out: str | Path) -> Path:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise RunDirError(f"{out}: exists and is not empty; choose a new directory")
    out.mkdir(parents=True, exist_ok=True)
    return out


