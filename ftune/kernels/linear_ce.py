"""The output layer and cross-entropy together, in chunks of positions: full-vocabulary logits never materialise.

A causal LM's loss needs logits only where a label is kept (SFT: the response tokens), and even there a
(positions × vocabulary) fp32 tensor, its softmax and its gradient dominate memory for large vocabularies (49,152
for SmolLM2, 128,256 for Llama 3). `linear_cross_entropy` takes the final hidden states of the kept positions and
the output layer, and per chunk of CHUNK_ELEMENTS logits computes the loss and, at once, the gradient of the summed
loss with respect to the hidden states (and to the layer's weight and bias when they train): softmax - one-hot,
times the weight. Only those gradients are kept for backward (N × d, not N × V) — the approach of Liger Kernel's
fused linear cross-entropy (Hsu et al. 2024, arXiv:2410.10989) and of Cut Your Losses (Wijmans et al. 2024,
arXiv:2411.09009), in plain torch. The result equals `cross_entropy(linear(h, W, b), y, reduction="sum")`.

`exact_through_hidden` checks on the model itself that its logits are its output layer applied to its last hidden
state (no soft-capping, scaling or method wrapper in between), which the hidden-state route of a task relies on.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

CHUNK_ELEMENTS = 1 << 24
"""Logits computed at once: 16M fp32 values (64 MiB), e.g. 341 positions of a 49,152-token vocabulary."""


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        grad_bias = (
            torch.zeros_like(bias, dtype=torch.float32) if bias is not None and ctx.needs_input_grad[2] else None
        )
        for first in range(0, hidden.shape[0], rows):
            h, y = hidden[first : first + rows], targets[first : first + rows]
            logits = F.linear(h, weight, bias).float()  # (rows, V)
            norm = torch.logsumexp(logits, dim=-1)
            total += (norm - logits.gather(1, y[:, None]).squeeze(1)).sum()
            # d(summed loss)/d(logits) = softmax - one-hot, made in place of the logits
            grad = logits.sub_(norm[:, None]).exp_()
            grad[torch.arange(len(y), device=y.device), y] -= 1.0
            if grad_hidden is not None:
                grad_hidden[first : first + rows] = grad.to(weight.dtype) @ weight
            if grad_weight is not None:
                grad_weight += grad.t() @ h.float()
            if grad_bias is not None:
                grad_bias += grad.sum(0)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        scaled = lambda g, dtype: None if g is None else (g * grad_total).to(dtype)
        return (
            scaled(grad_hidden, grad_hidden.dtype if grad_hidden is not None else None),
            scaled(grad_weight, weight_dtype),
            scaled(grad_bias, bias_dtype),
            None,
            None,
        )


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor
) -> torch.Tensor:
    """Summed cross-entropy of `linear(hidden, weight, bias)` against `targets`, in fp32, without the logits.

    hidden (N, d), weight (V, d), bias (V,) or None, targets (N,) class ids (no ignored positions: select the kept
    ones first). Differentiable in hidden, weight and bias; N = 0 gives 0.
    """
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, max(1, CHUNK_ELEMENTS // weight.shape[0]))


def output_layer(model: nn.Module) -> nn.Module | None:
    """The model's output layer (its `get_output_embeddings()`), through a DDP wrapper; None when it has none."""
    model = getattr(model, "module", model)
    get = getattr(model, "get_output_embeddings", None)
    return get() if get else None


def exact_through_hidden(model: nn.Module) -> bool:
    """Whether `model(ids).logits` equals its output layer applied to `model(ids, output_hidden_states=True,
    logits_to_keep=1).hidden_states[-1]` (checked on two random rows, in eval mode, without gradients): then a loss
    can be taken from the hidden states (`Task.hidden_loss`). False for a model whose forward does more after the
    layer (soft-capping, logit scaling), takes no `logits_to_keep`, or whose method wraps it (virtual tokens)."""
    head = output_layer(model)
    if not isinstance(head, nn.Linear) or not head.weight.is_floating_point():
        return False
    ids = torch.randint(0, head.out_features, (2, 12), generator=torch.Generator().manual_seed(0))
    ids = ids.to(head.weight.device)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            full = model(input_ids=ids).logits
            hidden = model(input_ids=ids, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
            mine = head(hidden)
        scale = 1.0 + float(full.abs().max())
        return mine.shape == full.shape and bool((mine.float() - full.float()).abs().max() <= 1e-5 * scale)
    except (TypeError, ValueError, RuntimeError, AttributeError, IndexError):
        return False
    finally:
        model.train(training)


def training_task(task, model: nn.Module, sharded: bool):
    """`task` as the task's own objective trains `model`: its `hidden_loss` kept only where it is exact for this
    model (`exact_through_hidden`) and the output layer is whole on every process (not FSDP-sharded)."""
    if task.hidden_loss is None or (not sharded and exact_through_hidden(model)):
        return task
    return replace(task, hidden_loss=None)
