"""train.compile: torch.compile of the trained model's forward (TorchInductor kernels fuse its elementwise work).

auto compiles on a CUDA GPU when nothing stands in the way, and leaves a CPU run alone (compiling costs minutes
there and gains little for small models); true compiles wherever torch can; false never. When compilation is asked
for (or auto on a GPU) but not used, the run prints why. The model is compiled in place (`nn.Module.compile`): its
parameters, state dict and saved weights stay those of the uncompiled module. Shapes vary from batch to batch
(dynamic padding, grouping, packing), so dynamic shapes are marked after the first recompilation (torch's default).
"""

from __future__ import annotations

import torch
from torch import nn


def why_not(setting: str | bool, device: torch.device, sharded: bool, quantized: bool) -> str | None:
    """None when the model should be compiled; else why not (empty string: off by choice, nothing to say)."""
    if setting is False or (setting == "auto" and device.type != "cuda"):
        return ""
    if sharded:
        return "not used with FSDP sharding (each unit would compile on its own)"
    if quantized:
        return "not used with a quantized base (bitsandbytes layers break the graph)"
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        return "not used: torch.compile is not supported on this Python or platform"
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "not used: Triton is not installed (pip install triton)"
    return None


def compile_model(model: nn.Module, setting: str | bool, device: torch.device, sharded: bool, quantized: bool) -> str:
    """Compile `model` in place when `setting` (train.compile) and the run allow it; returns a note for the console
    (empty: nothing worth saying)."""
    reason = why_not(setting, device, sharded, quantized)
    if reason is not None:
        return f"train.compile: {reason}" if reason else ""
    model.compile()
    return "train.compile: the model's forward is compiled (the first steps are slower while kernels build)"
