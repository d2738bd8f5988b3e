"""`ftune import-peft`: a LoRA adapter dir saved by peft (`save_pretrained`) becomes an ftune run dir.

peft writes adapter_config.json and adapter_model.safetensors. The weights are named `base_model.model.<module>.
lora_A.weight` (r x d_in), `....lora_B.weight` (d_out x r), with DoRA `....lora_magnitude_vector` (d_out,), and each
`modules_to_save` module by its own parameter names (`base_model.model.classifier.weight`); no adapter name. ftune's
`lora` names the same tensors `<module>.lora_A.weight`, `<module>.lora_B.weight`, `<module>.lora_magnitude_vector.
weight` and `classifier.weight`, and computes the same function (tests/test_export.py, tests/test_peft_import.py).

The recipe given with --recipe supplies model, task and data; its method section becomes the adapter's LoRA config
(r, lora_alpha, lora_dropout, use_rslora, use_dora; targets from the adapted modules; train_head when the adapter
carries head weights). An option ftune cannot reproduce exactly (rank_pattern, alpha_pattern, bias, fan_in_fan_out,
layers_to_transform, an initialisation that rewrites the base weights, any other peft type, ...) is refused by name.
Every check runs before anything is written, and the run dir appears whole (written aside, then renamed).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file

from ftune import assemble, models, rundir
from ftune.errors import MethodError, RunDirError
from ftune.methods.base import count_parameters
from ftune.methods.lora import Config as LoRAConfig
from ftune.methods.lora import LoRALinear
from ftune.recipe import Recipe, dump_recipe, load_recipe, validate_recipe
from ftune.run import checkpoint
from ftune.tasks import TASKS

PREFIX = "base_model.model."
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
MAPPED = {"r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "use_rslora": "rslora", "use_dora": "dora"}
# read below (from the config or, exactly, from the weights)
READ_ELSEWHERE = {
    "peft_type",
    "task_type",
    "target_modules",
    "exclude_modules",
    "modules_to_save",
    "bias",
    "init_lora_weights",
}
# bookkeeping, or settings that act only when an option refused below is on (use_qalora, megatron_config)
INFORMATIONAL = {
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "auto_mapping",
    "peft_version",
    "runtime_config",
    "megatron_core",
    "qalora_group_size",
}
# initialisations that only choose A and B (PiSSA, OLoRA, CorDA, LoftQ also rewrite W: the recipe's base is not it)
PLAIN_INITS = (True, False, "gaussian", "orthogonal", "eva")


def import_peft(peft_dir: str | Path, out: str | Path, recipe_path: str | Path) -> Path:
    """Write an ftune run dir at `out` (new or empty) from the peft LoRA adapter at `peft_dir`; returns `out`."""
    peft_dir, out = Path(peft_dir), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunDirError(f"{out}: exists and is not an empty directory; choose a new directory")
    config = _read_config(peft_dir)
    tensors = _read_weights(peft_dir)
    # a recipe without a method section is fine: it is replaced
    recipe = load_recipe(recipe_path, ["method={name: lora}"])
    _check_task(config, recipe, peft_dir)
    state, modules, head = _ftune_names(tensors, peft_dir)
    cfg_fields = {ours: config[theirs] for theirs, ours in MAPPED.items() if theirs in config}
    if cfg_fields.pop("dora", False):
        if "dora" not in LoRAConfig.model_fields:
            raise MethodError(f"{peft_dir / CONFIG}: use_dora is true, and ftune's lora has no DoRA option")
        cfg_fields["dora"] = True
    cfg_fields["train_head"] = bool(head)

    source, tokenizer = _tokenizer(recipe, peft_dir)
    names = assemble.label_names(recipe)
    recipe, model = _build(
        recipe, out, cfg_fields, config.get("target_modules"), modules, source, tokenizer, names, peft_dir
    )
    _check_fit(model, state, peft_dir, recipe)

    trainable, total = count_parameters(model)
    record = {
        "seed": recipe.train.seed,
        "model_source": source,
        "trainable_params": trainable,
        "total_params": total,
        "label_names": names,
        "imported_from": str(peft_dir),
        "peft_config": config,
    }
    meta = {
        "method": "lora",
        "config": recipe.method.model_dump(mode="json"),
        "step": None,
        "metrics": {},
        "imported_from": str(peft_dir),
    }
    params = dict(model.named_parameters())
    state = {n: t.to(params[n].dtype) for n, t in state.items()}
    _write(out, recipe, tokenizer, record, model, meta, state)
    return out


def _read_config(peft_dir: Path) -> dict[str, Any]:
    path = peft_dir / CONFIG
    if not path.is_file():
        raise RunDirError(f"{path}: missing; not a peft adapter dir (save one with PeftModel.save_pretrained)")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunDirError(f"{path}: cannot be read ({type(e).__name__})") from None
    if not isinstance(config, dict):
        raise RunDirError(f"{path}: not a peft adapter config (a JSON object)")
    if config.get("peft_type") != "LORA":
        raise MethodError(f"{path}: peft_type is {config.get('peft_type')!r}; ftune imports LORA adapters only")
    if config.get("bias", "none") != "none":
        raise MethodError(f'{path}: bias is {config["bias"]!r}; ftune\'s lora trains no biases (needs "none")')
    if config.get("init_lora_weights", True) not in PLAIN_INITS:
        raise MethodError(
            f"{path}: init_lora_weights is {config['init_lora_weights']!r}, which rewrites the base "
            "weights as well; convert the adapter to plain LoRA with peft first "
            "(save_pretrained(..., path_initial_model_for_weight_conversion=...))"
        )
    for key, value in config.items():
        if key not in MAPPED and key not in READ_ELSEWHERE and key not in INFORMATIONAL and value:
            raise MethodError(
                f"{path}: {key} is {_short(value)}; ftune's lora has no exact equivalent (it takes r, "
                "lora_alpha, lora_dropout, use_rslora, use_dora and target_modules)"
            )
    return config


def _read_weights(peft_dir: Path) -> dict[str, torch.Tensor]:
    path = peft_dir / WEIGHTS
    if not path.is_file():
        extra = (
            " (adapter_model.bin is a pickle, which ftune never loads; re-save with safe_serialization=True)"
            if (peft_dir / "adapter_model.bin").is_file()
            else ""
        )
        raise RunDirError(f"{path}: missing{extra}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise RunDirError(f"{path}: cannot be read ({str(e).splitlines()[0]})") from None


def _check_task(config: dict[str, Any], recipe: Recipe, peft_dir: Path) -> None:
    kind, expected = config.get("task_type"), TASKS[recipe.task].peft_task_type
    if kind is not None and kind != expected:
        raise MethodError(
            f"{peft_dir / CONFIG}: task_type is {kind!r}, the recipe's task is {recipe.task} "
            f"(expects {expected}); give a recipe for the adapter's task"
        )


def _ftune_names(tensors: dict[str, torch.Tensor], peft_dir: Path):
    """(state by ftune name, adapted module names, head names): peft's file format mapped onto ftune's names."""
    state = {}
    for key, tensor in tensors.items():
        if not key.startswith(PREFIX):
            raise RunDirError(
                f"{peft_dir / WEIGHTS}: {key} is not a peft LoRA tensor name (base_model.model.<module>...)"
            )
        name = key[len(PREFIX) :]
        if name.endswith(".lora_magnitude_vector"):  # peft saves DoRA's magnitude without its module's .weight
            name += ".weight"
        state[name] = tensor
    factor = ".lora_A.weight"
    modules = {n[: -len(factor)] for n in state if n.endswith(factor)}
    if not modules:
        raise RunDirError(f"{peft_dir / WEIGHTS}: holds no lora_A weights; not a LoRA adapter")
    parts = {f"{m}.{p}" for m in modules for p in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector.weight")}
    head = sorted(state.keys() - parts)
    return state, modules, head


def _tokenizer(recipe: Recipe, peft_dir: Path):
    """(model source, tokenizer): the adapter dir's tokenizer when it holds one, else the recipe model's."""
    spec = recipe.model
    source = models.resolve_model(spec.name, spec.gguf_file, spec.revision)
    if (peft_dir / "tokenizer_config.json").is_file():
        return source, models.load_tokenizer(str(peft_dir))
    return source, models.load_tokenizer(source, spec.trust_remote_code, spec.revision)


def _build(
    recipe: Recipe,
    out: Path,
    fields: dict[str, Any],
    target_modules: Any,
    modules: set[str],
    source: str,
    tokenizer,
    names,
    peft_dir: Path,
):
    """(recipe, model) with the adapter's LoRA attached. Targets: peft's target_modules (a list, or "all-linear") when
    ftune resolves them to exactly the adapted modules, else the adapted modules by full name."""
    candidates = (
        [sorted(target_modules)]
        if isinstance(target_modules, list)
        else ["all-linear"]
        if target_modules == "all-linear"
        else []
    )
    why = ""
    for targets in [*candidates, sorted(modules)]:
        try:
            method = LoRAConfig.model_validate({**fields, "targets": targets})
        except ValidationError as e:
            error = e.errors()[0]
            field = str(error["loc"][0]) if error["loc"] else "?"
            key = next((k for k, v in MAPPED.items() if v == field), field)
            raise MethodError(f"{peft_dir / CONFIG}: {key}: {error['msg']}") from None
        doc = recipe.model_dump(mode="json") | {"method": method.model_dump(mode="json"), "output_dir": str(out)}
        candidate = validate_recipe(doc, source="recipe with the adapter's method")
        try:
            model = assemble.build_model(candidate, source, tokenizer, names)
        except MethodError as e:  # a target outside the body's linears
            why = str(e)
            continue
        wrapped = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
        if wrapped == modules:
            return candidate, model
        why = f"{min(modules ^ wrapped)} differs"
    raise MethodError(
        f"{peft_dir}: the adapter adapts layers that ftune's lora (nn.Linear layers of the body of "
        f"{recipe.model.name}) cannot: {why}"
    )


def _check_fit(model, state: dict[str, torch.Tensor], peft_dir: Path, recipe: Recipe) -> None:
    """The adapter's tensors must be exactly the model's trainable parameters, shape for shape."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(params.keys() - state.keys()), sorted(state.keys() - params.keys())
    if missing:
        raise RunDirError(
            f"{peft_dir / WEIGHTS}: has no {PREFIX}{missing[0]}, which ftune's lora on "
            f"{recipe.model.name} trains (a head weight the base checkpoint lacks must be saved through "
            "modules_to_save; peft would initialise it at random)"
        )
    if unexpected:
        raise RunDirError(
            f"{peft_dir / WEIGHTS}: {PREFIX}{unexpected[0]} has no place in ftune's lora on "
            f"{recipe.model.name}; was the adapter saved for another base?"
        )
    for name, param in params.items():
        if tuple(state[name].shape) != tuple(param.shape):
            raise RunDirError(
                f"{peft_dir / WEIGHTS}: {PREFIX}{name} has shape {tuple(state[name].shape)}, "
                f"{recipe.model.name} needs {tuple(param.shape)}; was the adapter saved for another "
                "base (or, for a head, another label set)?"
            )


def _write(out: Path, recipe: Recipe, tokenizer, record: dict, model, meta: dict, state: dict) -> None:
    """The run dir, written under a temporary name beside `out` and renamed when whole."""
    tmp = out.with_name(f".{out.name}.import-tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        rundir.write_record(tmp, rundir.RunRecord.model_validate({**rundir.environment(), **record}))
        rundir.write_text(tmp / rundir.RECIPE, dump_recipe(recipe))
        checkpoint.save_weights(tmp, model, meta, state)
        tokenizer.save_pretrained(tmp / rundir.TOKENIZER)
        os.replace(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RunDirError(f"{out}: cannot be written ({e.strerror or type(e).__name__})") from None


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
