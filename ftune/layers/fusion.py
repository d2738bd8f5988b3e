"""AdapterFusion's layer: attention over N frozen bottleneck adapters after a block's feed-forward projection.

Pfeiffer et al. 2021, "AdapterFusion: Non-Destructive Task Composition for Transfer Learning", arXiv:2005.00247, §3.
Per token, with y = base(x) (..., d) and z_i = adapter_i(y) (..., N, d), no residual inside the adapters:
    s = softmax_i((Q y)·(K z_i) / temperature);   out = y + Σ_i s_i V z_i.
Q, K, V: d x d with bias. The `adapter_fusion` method (ftune/methods/adapter_fusion.py) reads the stage-1 runs and
builds one Fusion per block, its adapters rebuilt from their saved weights by `stage1_adapters`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ftune.errors import MethodError
from ftune.layers.bottleneck import Bottleneck


class Fusion(nn.Module):
    """The base output projection, N frozen stage-1 `Bottleneck`s, and the trained query/key/value linears.

    Args:
        base_layer: the block's feed-forward output projection, (..., d_ff) -> (..., d).
        adapters: the N stage-1 adapters, d -> m -> d each.
        d: hidden size.
        temperature: of the softmax over adapters.
        sources: the stage-1 run dirs, for the report.
        identity_weight: λ of `value_pull`, λ ‖I − V‖²_F; 0 for none.

    `enabled = False` computes the base projection alone (the method switched off); eval calls then add nothing to
    the attention sums either. Eval calls add s over the real tokens of `token_mask` (B, T; all when None or of
    another shape), handed over per call (ftune/layers/token_masks.py), to `weight_sum` / `tokens`; `restart`
    clears them.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        adapters: list[Bottleneck],
        d: int,
        temperature: float,
        sources: list[str],
        identity_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.base_layer, self.adapters = base_layer, nn.ModuleList(adapters)
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        with torch.no_grad():  # Q, K random (BERT's N(0, 0.02)) as the paper; V the identity; zero biases
            for linear in (self.query, self.key, self.value):
                linear.weight.copy_(torch.eye(d) if linear is self.value else torch.randn(d, d) * 0.02)
                linear.bias.zero_()
        self.temperature, self.sources, self.identity_weight = temperature, list(sources), identity_weight
        self.enabled = True
        self.token_mask: torch.Tensor | None = None
        self.weight_sum, self.tokens = torch.zeros(len(adapters), dtype=torch.float64), 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if not self.enabled:
            return y
        h = y.to(self.value.weight.dtype)  # as AdapterAt: adapters and fusion keep their dtype under a bf16 base
        z = torch.stack([a(h) for a in self.adapters], dim=-2)
        s = (torch.einsum("...d,...nd->...n", self.query(h), self.key(z)) / self.temperature).softmax(dim=-1)
        if not self.training:
            mask = self.token_mask
            mask = mask.to(s.dtype) if mask is not None and mask.shape == s.shape[:-1] else torch.ones_like(s[..., 0])
            self.weight_sum += (s.detach() * mask.unsqueeze(-1)).flatten(0, -2).sum(0).double().cpu()
            self.tokens += int(mask.sum())
        return y + torch.einsum("...n,...nd->...d", s, self.value(z)).to(y.dtype)

    def restart(self) -> None:
        """Forget the summed attention weights (an evaluation begins)."""
        self.weight_sum, self.tokens = torch.zeros_like(self.weight_sum), 0

    def value_pull(self) -> torch.Tensor:
        """λ ‖I − V‖²_F, a scalar: the paper's l2 pull of this layer's value matrix V (d x d) towards the identity."""
        eye = torch.eye(self.value.weight.shape[0], device=self.value.weight.device, dtype=self.value.weight.dtype)
        return self.identity_weight * (eye - self.value.weight).pow(2).sum()


def stage1_adapters(key: str, d: int, runs: list[tuple[str, Any, dict]]) -> list[Bottleneck]:
    """Each stage-1 run's adapter under `key` (a block's feed-forward output path + ".adapter."), weights loaded.

    `runs`: (run dir, its `adapter` method config (activation, dropout, scaling read), its saved weights) per run.
    """
    bottlenecks = []
    for run_dir, acfg, weights in runs:
        state = {k[len(key) :]: v for k, v in weights.items() if k.startswith(key)}
        if "down.weight" not in state or state["down.weight"].shape[1] != d:
            raise MethodError(
                f"method.adapters: {run_dir} has no adapter of width {d} at {key[:-1]}; "
                "was it trained on another base model?"
            )
        width = state["down.weight"].shape[0]  # whichever option set it
        bottlenecks.append(Bottleneck(d, width, acfg.activation, acfg.dropout, acfg.scaling or 1.0, False))
        bottlenecks[-1].load_state_dict(state)
    return bottlenecks
