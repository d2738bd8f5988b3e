"""SVD-form low-rank layers and their rank budget: the parts of AdaLoRA that are not its config or Method record.

Zhang et al. 2023, "AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning", ICLR 2023,
arXiv:2303.10512, §3 and Algorithm 1. `SVDLinear` computes as peft's SVDLinear and the allocator decides as peft's
`RankAllocator` (tuners/adalora/layer.py), step for step: given the same weights and gradients a run prunes the same
triplets as peft's `update_and_allocate` (tests/test_adalora.py runs the two in lockstep).

A layer holds P (lora_B, d_out x r), Λ (lora_E, r x 1) and Q (lora_A, r x d_in). Triplet i is (P[:, i], λ_i, Q[i, :]);
pruning it zeroes λ_i while P and Q keep their shapes, so a pruned triplet can come back at a later masking while the
budget is still falling.

Importance (eq. 8-11): for every entry w, sensitivity I = |w · ∂L/∂w|, smoothed Ī ← β1 Ī + (1-β1) I; uncertainty
Ū ← β2 Ū + (1-β2) |I - Ī|; entry score s = Ī · Ū. A triplet scores S_i = s(λ_i) + mean s(Q[i, :]) + mean s(P[:, i]).
Budget (eq. 12): b(t) = b(T) + (b(0) - b(T)) (1 - (t - t_i) / (T - t_f - t_i))³, where b(0) = init_r · n and
b(T) = target_r · n over n matrices; b(0) while t <= t_i, masking every ΔT steps while it falls, and at step T - t_f
the final mask at b(T), which holds (reapplied every step) for the last t_f steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ftune.errors import MethodError
from ftune.layers.lora import WrappedLinear

PARTS = ("lora_A", "lora_E", "lora_B")
# what an exact resume needs besides the weights, per triplet module (the buffers below)
STATE = tuple(f"{part}_{kind}" for part in PARTS for kind in ("sensitivity", "uncertainty")) + ("rank_mask",)


def add_importance_state(module: nn.Module) -> None:
    """Register the EMAs of sensitivity and uncertainty (one per entry of P, Λ, Q; zero at start) and the rank mask
    (r,) bool, all True: nothing is pruned before the first masking. Non-persistent: they are training state (saved
    in checkpoints through `Method.hooks.resume`), not weights."""
    for part in PARTS:
        weight = getattr(module, part)
        module.register_buffer(f"{part}_sensitivity", torch.zeros_like(weight), persistent=False)
        module.register_buffer(f"{part}_uncertainty", torch.zeros_like(weight), persistent=False)
    rank = module.lora_E.shape[0]
    module.register_buffer(
        "rank_mask", torch.ones(rank, dtype=torch.bool, device=module.lora_E.device), persistent=False
    )


class SVDLinear(WrappedLinear):
    """A frozen linear layer plus P Λ Q · alpha / (r + 1e-5), and the importance state of its r triplets.

    Args:
        base_layer: the linear layer to adapt; shapes (d_out, d_in).
        r: initial rank (init_r). The divisor stays r however many triplets are pruned, as in peft.
        alpha: peft's lora_alpha.
        dropout: dropout probability on the update path's input.

    Λ starts at 0 and P, Q ~ N(0, 0.02) (reference code and peft), so step 0 equals the base model.
    `enabled = False` skips the update (and its dropout): the layer computes base_layer(x) alone.
    """

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.base_layer = base_layer
        # fp32 factors even over a bf16 base: small updates to Λ vanish in bf16 rounding otherwise
        factory = {"device": base_layer.weight.device, "dtype": torch.float32}
        self.lora_A = nn.Parameter(nn.init.normal_(torch.empty(r, base_layer.in_features, **factory), std=0.02))
        self.lora_E = nn.Parameter(torch.zeros(r, 1, **factory))
        self.lora_B = nn.Parameter(nn.init.normal_(torch.empty(base_layer.out_features, r, **factory), std=0.02))
        self.register_buffer("ranknum", torch.full((1,), float(r), **factory), persistent=False)
        add_importance_state(self)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha
        self.merged, self.enabled = False, True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged or not self.enabled:
            return y
        x = self.dropout(x.to(self.lora_A.dtype))  # the operation order of peft's SVDLinear, for equal outputs
        update = (x @ (self.lora_A * self.lora_E).T @ self.lora_B.T) * self.scaling / (self.ranknum + 1e-5)
        return y + update.to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """(d_out, d_in): the dense update P Λ Q · scaling."""
        return self.lora_B @ (self.lora_A * self.lora_E) * self.scaling / (self.ranknum + 1e-5)

    def merge(self) -> None:
        if not self.merged:
            weight = self.base_layer.weight
            weight.data = (weight.data.float() + self.delta_weight().detach()).to(weight.dtype)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            weight = self.base_layer.weight
            weight.data = (weight.data.float() - self.delta_weight().detach()).to(weight.dtype)
            self.merged = False


def svd_layers(model: nn.Module) -> dict[str, SVDLinear]:
    """The SVDLinear layers of `model` by module name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SVDLinear)}


def orthogonality(layers: Sequence[SVDLinear]) -> torch.Tensor:
    """R(P, Q): mean over matrices of ‖Q Qᵀ - I‖_F and ‖Pᵀ P - I‖_F (each r x r), non-squared and summed in
    peft's order (reference code: the same norm)."""
    total, count = 0, 0
    for layer in layers:
        for cov in (layer.lora_A @ layer.lora_A.T, layer.lora_B.T @ layer.lora_B):
            total = total + torch.norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device), p="fro")
            count += 1
    return total / count


def budget_at(
    step: int, total_steps: int, initial: int, target: int, tinit: int, tfinal: int, every: int
) -> tuple[int, bool]:
    """(total rank allowed after optimizer step `step` (1-based), whether to mask at this step)."""
    if step <= tinit:
        return initial, False
    if step > total_steps - tfinal:
        return target, True
    remaining = 1 - (step - tinit) / (total_steps - tfinal - tinit)
    return int((initial - target) * remaining**3 + target), step % every == 0


@torch.no_grad()
def update_importance(layers: Sequence[nn.Module], beta1: float, beta2: float) -> None:
    """One EMA step of sensitivity and uncertainty from the gradients still held after the optimizer step."""
    for layer in layers:
        for part in PARTS:
            weight = getattr(layer, part)
            # no gradient (a layer off this step's loss path) is no evidence of importance
            sensitivity = (weight * weight.grad).abs() if weight.grad is not None else torch.zeros_like(weight)
            smooth, uncertain = getattr(layer, f"{part}_sensitivity"), getattr(layer, f"{part}_uncertainty")
            smooth.copy_(beta1 * smooth + (1 - beta1) * sensitivity)
            uncertain.copy_(beta2 * uncertain + (1 - beta2) * (sensitivity - smooth).abs())


def triplet_scores(layer: nn.Module) -> torch.Tensor:
    """(r,) importance S_i of each triplet of one matrix."""

    def score(part: str) -> torch.Tensor:
        return getattr(layer, f"{part}_sensitivity") * getattr(layer, f"{part}_uncertainty")

    of_q = score("lora_A").mean(dim=1, keepdim=True)
    of_p = score("lora_B").mean(dim=0).view(-1, 1)
    return score("lora_E").view(-1) + torch.cat([of_q, of_p], dim=1).sum(dim=1)


@torch.no_grad()
def mask_to_budget(layers: Sequence[nn.Module], budget: int) -> None:
    """Keep the `budget` most important triplets over all matrices; zero the singular values of the others.

    As peft: everything scoring at or below the (total - budget)-th smallest score is pruned.
    """
    scores = [triplet_scores(layer) for layer in layers]
    total = sum(len(s) for s in scores)
    threshold = torch.kthvalue(torch.cat(scores), total - budget)[0].item() if budget < total else None
    for layer, score in zip(layers, scores):
        keep = ~(score <= threshold) if threshold is not None else torch.ones_like(layer.rank_mask)
        layer.rank_mask.copy_(keep)
        layer.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)


def allocate(layers: Sequence[nn.Module], step: int, total_steps: int, cfg: Any) -> None:
    """After optimizer step `step` of `total_steps` (gradients still held): peft's `update_and_allocate`.

    `cfg` holds init_r, target_r, tinit, tfinal, deltaT, beta1, beta2 (AdaLoRA's method config).
    """
    final_start = total_steps - cfg.tfinal
    if step < final_start:
        update_importance(layers, cfg.beta1, cfg.beta2)
        budget, mask_now = budget_at(
            step, total_steps, cfg.init_r * len(layers), cfg.target_r * len(layers), cfg.tinit, cfg.tfinal, cfg.deltaT
        )
        if mask_now:
            mask_to_budget(layers, budget)
    elif step == final_start:
        mask_to_budget(layers, cfg.target_r * len(layers))
    else:  # the final ranks hold: undo what the optimizer gave back to pruned singular values
        with torch.no_grad():
            for layer in layers:
                layer.lora_E.masked_fill_(~layer.rank_mask.view(-1, 1), 0.0)


def training_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The importance state and rank mask of every SVDLinear (`STATE`), by "<module name>.<buffer>": what an exact
    resume needs besides the weights (AdaLoRA's `Method.hooks.resume`)."""
    return {f"{name}.{key}": getattr(m, key) for name, m in svd_layers(model).items() for key in STATE}


def load_training_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy a checkpoint's `training_state` back in place (a MethodError if its keys do not fit this model's)."""
    expected = training_state(model)
    if expected.keys() != tensors.keys():
        odd = min(expected.keys() ^ tensors.keys())
        raise MethodError(f"adalora: the checkpoint's rank and importance state does not fit this model ({odd})")
    with torch.no_grad():
        for key, buffer in expected.items():
            buffer.copy_(tensors[key])


def peft_config(model: nn.Module, cfg: Any) -> dict[str, Any]:
    """peft's adapter_config.json for the SVDLinear layers of `model`; `cfg` is AdaLoRA's method config."""
    # pruned triplets are saved in place with λ = 0, so no rank_pattern (peft would expect tensors cut to it);
    # total_step only drives peft's training schedule, yet peft refuses a config without one > tinit + tfinal
    return {
        "peft_type": "ADALORA",
        "init_r": cfg.init_r,
        "target_r": cfg.target_r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": list(svd_layers(model)),
        "tinit": cfg.tinit,
        "tfinal": cfg.tfinal,
        "deltaT": cfg.deltaT,
        "beta1": cfg.beta1,
        "beta2": cfg.beta2,
        "orth_reg_weight": cfg.orth_reg_weight,
        "total_step": cfg.tinit + cfg.tfinal + 1,
        "rank_pattern": None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
    }
