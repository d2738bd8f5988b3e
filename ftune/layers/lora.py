"""The LoRA layer (with its DoRA option), shared by the `lora` method and any method built on low-rank updates.

LoRA: Hu et al. 2021, arXiv:2106.09685. A frozen linear W (d_out x d_in) computes W x + s B A dropout(x), with
A (r x d_in) Kaiming-uniform (a = sqrt 5), B (d_out x r) zero, s = alpha / r (rsLoRA: alpha / sqrt r).

DoRA: Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv:2402.09353. The adapted weight is split
into a learned magnitude m (d_out,) and a direction: W' = m * (W + s B A) / ||W + s B A||_row. m starts at the row
norms of W (B A = 0 at init), so step 0 equals the base model. As the paper's §4.3 advises, the norm is treated as
a constant in backward (detached), which saves the memory of its graph. Numerics follow peft's `DoraLinearLayer`
(the reference `ftune export --format peft` is checked against): with dropout active in training, the base path is
recomputed on the dropped input, W x_drop, so that dropout applies to the whole DoRA update.

The base layer may be a plain nn.Linear or a bitsandbytes 4-/8-bit linear (QLoRA): the factors and the magnitude
are fp32 either way; a quantised weight is dequantised where DoRA needs the dense W.

An optional `gate` (ftune/layers/gates.py, UniPELT) scales the update per row by a value computed from the layer's
input: W x + g(x) s B A x. The gate depends on the input, so no weight can hold it and a gated layer refuses to merge.

`enabled = False` computes the base layer alone (the method's `disabled`): no update, no dropout draw, no gate call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ftune.errors import MethodError
from ftune.models.quantize import dense_weight, is_quantized_linear


class WrappedLinear(nn.Module):
    """A layer around a linear `base_layer` that still offers the linear's `weight`, as peft's layers do: models read
    a linear's `weight` (T5's feed-forward casts its input to `wo.weight.dtype`). LoRA's and AdaLoRA's layers."""

    base_layer: nn.Module

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight


class DoRAMagnitude(nn.Module):
    """DoRA's magnitude vector m, shape (d_out,), initialised to the row norms ||W||_row (fp32).

    Its own module so that the parameter is named `lora_magnitude_vector.weight`, peft's name for it.
    """

    def __init__(self, row_norms: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(row_norms.detach().clone().float())


class LoRALinear(WrappedLinear):
    """A frozen linear layer plus a trainable low-rank update, optionally weight-decomposed (DoRA).

    Args:
        base_layer: the linear layer to adapt (nn.Linear, or bitsandbytes Linear4bit / Linear8bitLt); (d_out, d_in).
        r: rank of the update.
        scaling: multiplier of B A (alpha / r, or alpha / sqrt(r) for rsLoRA).
        dropout: dropout probability on the low-rank path's input.
        dora: learn a magnitude vector too (DoRA); default False.

    `gate`: None (plain LoRA), or a module mapping the input (B, T, d_in) to a factor (B, 1, 1) of the update, or
    (B, T, 1), one per position (UniPELT in a decoder).
    `enabled`: True; False skips the update (and its dropout and gate), so the layer computes base_layer(x) alone.
    """

    def __init__(self, base_layer: nn.Module, r: int, scaling: float, dropout: float, dora: bool = False) -> None:
        super().__init__()
        self.base_layer = base_layer
        # fp32 factors even over a bf16 (or quantised) base: tiny updates to B vanish in bf16 rounding otherwise
        factory = {"device": base_layer.weight.device, "dtype": torch.float32}
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, **factory)  # Kaiming-uniform(a=sqrt 5)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, **factory)
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = scaling
        self.merged = False
        self.lora_magnitude_vector = None
        if dora:
            with torch.no_grad():
                self.lora_magnitude_vector = DoRAMagnitude(torch.linalg.norm(dense_weight(base_layer).float(), dim=1))
        self._merged_norm: torch.Tensor | None = None  # DoRA: the row norm the merge divided by, for unmerge
        self.gate: nn.Module | None = None
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged or not self.enabled:
            return y
        x = x.to(self.lora_A.weight.dtype)
        if self.lora_magnitude_vector is not None:
            return (y + self._dora_update(x, y)).to(y.dtype)
        u = self.lora_A(self.dropout(x))
        if self.gate is None and y.dtype == u.dtype:
            # y + s u B^T as one GEMM accumulating into y: no separate passes over the (tokens, d_out) update to scale
            # and add it, forward or backward
            return torch.addmm(
                y.reshape(-1, y.shape[-1]), u.reshape(-1, u.shape[-1]), self.lora_B.weight.t(), alpha=self.scaling
            ).view(y.shape)
        update = self.lora_B(u) * self.scaling
        return y + (update if self.gate is None else update * self.gate(x)).to(y.dtype)

    def _dora_update(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(..., d_out): what DoRA adds to the base output y = W x + b: (m/n - 1) W x + (m/n) s B A x, n detached."""
        weight = dense_weight(self.base_layer).to(x.dtype)  # (d_out, d_in)
        delta = (self.lora_B.weight @ self.lora_A.weight).detach()
        norm = torch.linalg.norm(weight + self.scaling * delta, dim=1).detach()  # (d_out,), a constant (paper §4.3)
        factor = (self.lora_magnitude_vector.weight / norm).view(1, -1)
        if isinstance(self.dropout, nn.Identity) or not self.training:
            bias = self.base_layer.bias
            base = y if bias is None else y - bias
        else:  # dropout must reach the base path too: recompute it on the dropped input
            x = self.dropout(x)
            base = F.linear(x, weight)
        return (factor - 1) * base + factor * self.lora_B(self.lora_A(x)) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """(d_out, d_in): the dense update the low-rank path adds (before DoRA's rescaling)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def merge(self) -> None:
        """Fold the update into the base weight: W + s B A, or for DoRA (m / ||W + s B A||_row) (W + s B A)."""
        if self.merged:
            return
        if self.gate is not None:
            raise MethodError(
                "a gated LoRA layer (UniPELT) scales its update by a gate computed from each input, "
                "which no weight can hold; it cannot be merged (the run dir is the model)"
            )
        self._refuse_quantized()
        weight = self.base_layer.weight
        with torch.no_grad():
            folded = weight.data.float() + self.delta_weight()
            if self.lora_magnitude_vector is not None:
                self._merged_norm = torch.linalg.norm(folded, dim=1)
                folded = (self.lora_magnitude_vector.weight / self._merged_norm).view(-1, 1) * folded
        weight.data = folded.to(weight.dtype)
        self.merged = True

    def unmerge(self) -> None:
        """Undo `merge` (exact up to float rounding; DoRA divides by the factor it multiplied by)."""
        if not self.merged:
            return
        weight = self.base_layer.weight
        with torch.no_grad():
            folded = weight.data.float()
            if self.lora_magnitude_vector is not None:
                folded = folded / (self.lora_magnitude_vector.weight / self._merged_norm).view(-1, 1)
                self._merged_norm = None
            weight.data = (folded - self.delta_weight()).to(weight.dtype)
        self.merged = False

    def _refuse_quantized(self) -> None:
        if is_quantized_linear(self.base_layer):
            raise MethodError(
                "lora: the base layers are 4/8-bit quantised, and adding B A to a quantised weight "
                "cannot be undone exactly; `ftune merge` dequantises the base first, then folds"
            )
