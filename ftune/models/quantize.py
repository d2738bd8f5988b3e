"""A 4- or 8-bit quantised base model (QLoRA) through bitsandbytes and transformers' `BitsAndBytesConfig`.

Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv:2305.14314: the frozen base linears
are stored as 4-bit NormalFloat (NF4) with one absmax per block of 64 weights, optionally double-quantised (the absmax
constants themselves 8-bit, in blocks of 256: 0.127 instead of 0.5 extra bits per weight); each forward dequantises
to the compute dtype. 8-bit is LLM.int8() (Dettmers et al. 2022, arXiv:2208.07339): row-wise absmax int8 weights,
activation columns above a threshold kept in 16 bits. Only trainable parameters outside the quantised linears
(LoRA factors, adapters, a task head) can learn; `Method.runs_with.quantized_base` says which methods qualify.

bitsandbytes is imported lazily, inside functions: `ftune --help` and runs without quantisation never load it.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import sys
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from ftune.errors import ModelError

COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_FOUR_BIT_ONLY = ("quant_type", "double_quant", "compute_dtype")
_EIGHT_BIT_ONLY = ("int8_threshold",)


class Quantization(BaseModel):
    """`model.quantization`: load the base linears quantised (QLoRA). Maps field by field onto BitsAndBytesConfig.

    The 4-bit block size is not a choice: transformers' bitsandbytes integration builds `Linear4bit` without one,
    so bitsandbytes' default of 64 weights per absmax applies (256 per constant under double quantisation).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    bits: Literal[4, 8] = 4
    """4 (QLoRA: NF4/FP4 blocks of 64) or 8 (LLM.int8(): row-wise int8 weights; activations quantised through
    fp16 for the int8 matmul, outlier columns kept in fp16)."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type: NF4 (normal-float code book, the QLoRA paper's choice) or FP4."""
    double_quant: bool = True
    """4-bit: quantise the per-block absmax constants too (8-bit, blocks of 256), saving ~0.37 bits per weight."""
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """4-bit: dtype the weights are dequantised to for each matmul (and that `ftune merge` dequantises to)."""
    int8_threshold: float = Field(6.0, ge=0.0)
    """8-bit: activation magnitude above which a column is multiplied in 16 bits (LLM.int8() outliers); 0 disables."""
    skip_modules: list[str] = []
    """Linear layers kept unquantised, by module name or name suffix. The task head, the output embeddings and any
    layer the checkpoint lacks are always kept (they train)."""

    @model_validator(mode="after")
    def _options_of_the_chosen_width(self) -> Quantization:
        unused = _EIGHT_BIT_ONLY if self.bits == 4 else _FOUR_BIT_ONLY
        for name in unused:  # a default value is fine: a stored recipe lists every field
            if getattr(self, name) != type(self).model_fields[name].default:
                other = 8 if self.bits == 4 else 4
                raise ValueError(f"{name} applies to {other}-bit quantisation only (bits is {self.bits}); remove it")
        return self


def require_bitsandbytes(field: str) -> None:
    """A one-line ModelError naming `field` when bitsandbytes is not installed."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(f"{field}: needs the bitsandbytes package; pip install bitsandbytes")


def quantized_linear_types() -> tuple[type, ...]:
    """bitsandbytes' quantised linear classes, or () when bitsandbytes was never imported (then no model has any)."""
    bnb = sys.modules.get("bitsandbytes")
    return (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt) if bnb is not None else ()


def is_quantized_linear(module: nn.Module) -> bool:
    types = quantized_linear_types()
    return bool(types) and isinstance(module, types)


def bnb_config(q: Quantization, auto, source: str, load_kwargs: dict):
    """transformers' BitsAndBytesConfig for `q`, keeping unquantised what must train (see `kept_modules`)."""
    from transformers import BitsAndBytesConfig

    require_bitsandbytes("model.quantization")
    kept = kept_modules(auto, source, load_kwargs) + list(q.skip_modules)
    if q.bits == 8:
        # int8 matmuls quantise their input through fp16 (see `bits`); bitsandbytes would log so on every call
        logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=q.int8_threshold, llm_int8_skip_modules=kept)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=COMPUTE_DTYPES[q.compute_dtype],
        llm_int8_skip_modules=kept,
    )


def kept_modules(auto, source: str, load_kwargs: dict) -> list[str]:
    """Module names to leave unquantised: everything outside the body (task head, LM head) plus transformers' own
    default (tied and output embeddings), found structurally on a weightless (meta-device) copy of the model.

    Passing any skip list replaces transformers' default, so the default is computed here and kept.
    """
    from transformers import AutoConfig
    from transformers.quantizers.base import get_keys_to_not_convert

    remote = bool(load_kwargs.get("trust_remote_code"))
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=remote, revision=load_kwargs.get("revision"))
        with torch.device("meta"):
            skeleton = auto.from_config(config, trust_remote_code=remote)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"model.name: cannot read the configuration of {source}: {e}".splitlines()[0]) from None
    outside_body = [name for name, child in skeleton.named_children() if child is not skeleton.base_model]
    return [re.escape(n) for n in outside_body] + get_keys_to_not_convert(skeleton)


def after_loading(model: nn.Module, missing_keys: list[str], dtype: torch.dtype) -> None:
    """Fix up a freshly loaded quantised model, in place.

    - A quantised linear whose weight the checkpoint lacked (BERT's pooler under a masked-LM checkpoint) would be a
      quantised random init that cannot train: it becomes a plain nn.Linear, initialised by the model's own scheme.
    - bitsandbytes repacks `Linear4bit` weights for its AVX512-BF16 CPU inference kernel on the first eval-mode
      forward without grad; backward through a repacked layer yields no input gradient, so every trainable parameter
      before it silently stops learning after the first evaluation. Switching the repack off keeps training correct.
    """
    missing = {k.rpartition(".")[0] for k in missing_keys}
    for name, module in list(model.named_modules()):
        if not is_quantized_linear(module):
            continue
        if name in missing:
            fresh = nn.Linear(
                module.in_features,
                module.out_features,
                bias=module.bias is not None,
                dtype=dtype,
                device=module.weight.device,
            )
            model._init_weights(fresh)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, fresh)
        elif hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def prepare_for_training(model: nn.Module, gradient_checkpointing: bool) -> None:
    """k-bit training preparation (as peft's `prepare_model_for_kbit_training`), without touching requires_grad.

    Every unquantised floating parameter held in 16 bits (norms, embeddings, the head) is cast to fp32: layer norms
    and the output softmax are where half precision loses a quantised model's training. With gradient checkpointing,
    the embedding output requires grad, so recomputed segments always have a graph input even with the body frozen.
    """
    quantized = {id(p) for m in model.modules() if is_quantized_linear(m) for p in (m.weight,)}
    for p in model.parameters():
        if id(p) not in quantized and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
    if gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """(d_out, d_in): the weight of a linear layer, dequantised if bitsandbytes holds it (no grad).

    4-bit: `dequantize_4bit`, in the dtype the weight was quantised from (as peft's `dequantize_module_weight`);
    8-bit: row scale x int8 / 127, in fp32.
    """
    if not is_quantized_linear(layer):
        return layer.weight
    import bitsandbytes as bnb

    weight = layer.weight
    if isinstance(layer, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    scale = weight.SCB if getattr(weight, "SCB", None) is not None else layer.state.SCB
    return bnb.functional.int8_vectorwise_dequant(weight.data, scale)


def is_quantized(model: nn.Module) -> bool:
    return any(is_quantized_linear(m) for m in model.modules())


def dequantize(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Replace every bitsandbytes linear by a plain nn.Linear and drop the quantisation record, in place.

    A 4-bit weight is dequantised to the layer's compute dtype, exactly the values its forward multiplied by, then
    stored in `dtype` (the model's dtype, so one merged checkpoint has one dtype); an 8-bit weight to fp32, then
    `dtype` (its forward also quantised the activations, so no dense weight reproduces it exactly).
    """
    for name, module in list(model.named_modules()):
        if not is_quantized_linear(module):
            continue
        weight = dense_weight(module)
        compute = getattr(module, "compute_dtype", None)
        weight = weight.to(compute) if compute is not None else weight
        dense = nn.Linear(
            module.in_features, module.out_features, bias=module.bias is not None, dtype=dtype, device=weight.device
        )
        with torch.no_grad():
            dense.weight.copy_(weight)
            if module.bias is not None:
                dense.bias.copy_(module.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, dense)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if flag in vars(model):
            delattr(model, flag)
    return model
