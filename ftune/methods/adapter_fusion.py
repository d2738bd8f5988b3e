"""AdapterFusion: attention over N frozen task adapters, trained for a new task without touching them.

Pfeiffer et al. 2021, "AdapterFusion: Non-Destructive Task Composition for Transfer Learning", arXiv:2005.00247.
Stage 1: N `adapter` runs (placement pfeiffer, every block) on one base model; stage 2 lists their run dirs in
`adapters`. Each block's feed-forward output projection (arch `ffn_out`) becomes a `Fusion`, per token:
    y = base(x) (..., d);  z_i = adapter_i(y), no residual (..., N, d);  s = softmax_i((Q y)·(K z_i) / temperature);
    out = y + Σ_i s_i V z_i.   Q, K, V: d x d with bias, 3(d² + d) trained parameters per block (+ the head).
Q, K start random; V exactly the identity (the paper adds 1e-6 off-diagonal noise; the exact identity makes one
fused adapter reproduce its stage-1 model). The paper l2-regularises V towards the identity: `loss_term` is
λ Σ_blocks ‖I − V‖²_F, λ = `value_identity_weight`, 0.01 as the reference code (adapter-transformers' default
"dynamic" fusion; the paper gives no λ), once per optimizer step. The layer is `ftune/layers/fusion.py`.
Saved weights: Q/K/V and the head; eval and resume re-read the adapters from the listed run dirs, which must stay
(relative paths: from the working directory). Runs on different base models are refused; the stage-2 recipe must
name that base model too (checked by shape only). Eval calls sum s over non-padded tokens (all if no attention_mask),
restarting when eval follows training; `report`: {"adapters": [dirs], "tokens": n, "layers": [[mean s_i] per block]}.
Encoder-decoder models (T5, BART): a Fusion in every block of both stacks, where the stage-1 `adapter` runs put
theirs (after each feed-forward block; not after cross-attention); report rows and `tokens` count the encoder's
blocks first. The decoder's positions count all (a seq2seq batch has no decoder mask), and a seq2seq evaluation
also counts its generation calls (the encoder once more, each decoded token once).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, ValidationError
from torch import nn

from ftune import recipe_yaml, rundir
from ftune.errors import FtuneError, MethodError
from ftune.layers.fusion import Fusion, stage1_adapters
from ftune.layers.token_masks import hand_over_masks
from ftune.methods import adapter, base
from ftune.models.arch import block_stacks, hidden_size, replace_submodule


class Config(base.MethodConfig):
    name: Literal["adapter_fusion"] = "adapter_fusion"
    adapters: list[str] = Field(min_length=1)
    """Stage-1 run dirs: finished `adapter` runs, placement pfeiffer, all on this recipe's base model."""
    temperature: float = Field(1.0, gt=0)
    """Softmax temperature of the attention over adapters."""
    value_init: Literal["identity"] = "identity"
    """V starts as the exact identity (the only option)."""
    value_identity_weight: float = Field(0.01, ge=0)
    """λ of the pull of V towards the identity, λ Σ_blocks ‖I − V‖²_F in the training loss; 0 switches it off."""


def load_stage1(run_dir: str) -> tuple[adapter.Config, str, dict[str, torch.Tensor]]:
    """(adapter config, base model name, weights) of one stage-1 run, or a one-line MethodError naming it."""
    path = Path(run_dir).expanduser()
    try:
        rundir.finished(path)
        if not rundir.has_metrics(path):  # metrics.json is a run's last write
            raise MethodError(f"{run_dir} is not a finished ftune run (no {rundir.METRICS})")
        doc = recipe_yaml.parse(recipe_yaml.read_text(rundir.recipe_file(path)), str(rundir.recipe_file(path)))
        section, model = (doc.get("method"), doc.get("model")) if isinstance(doc, dict) else (None, None)
        if not isinstance(section, dict) or not isinstance(model, dict) or not isinstance(model.get("name"), str):
            raise MethodError(f"{rundir.recipe_file(path)}: not a stored ftune recipe (no method or model.name)")
        m = adapter.Config.model_validate(section) if section.get("name") == "adapter" else None
        if m is None or m.placement != "pfeiffer" or m.layers is not None:
            raise MethodError(
                f"{run_dir} is a {f'adapter placement {m.placement}' if m else section.get('name')} run;"
                " AdapterFusion fuses `adapter` runs with placement pfeiffer in every block"
            )
        return m, model["name"], rundir.read_weights(path)
    except (FtuneError, ValidationError) as e:  # an FtuneError names the run dir, its recipe.yaml or weights file
        why = str(e).splitlines()[0] if isinstance(e, FtuneError) else f"{run_dir}: {e.errors()[0]['msg']}"
        raise MethodError(f"method.adapters: {why}") from None


def apply(model: nn.Module, cfg: Config) -> nn.Module:
    if any(isinstance(m, (Fusion, adapter.AdapterAt)) for m in model.modules()):
        raise MethodError("adapter_fusion: the model already has adapters")
    d, device = hidden_size(model), next(model.parameters()).device
    runs = [load_stage1(run_dir) for run_dir in cfg.adapters]
    for run_dir, (_, model_name, _) in zip(cfg.adapters, runs):
        if model_name != runs[0][1]:
            raise MethodError(
                f"method.adapters: {run_dir} was trained on {model_name}, {cfg.adapters[0]} on "
                f"{runs[0][1]}; all fused adapters must share one base model"
            )
    stage1 = [(run_dir, acfg, weights) for run_dir, (acfg, _, weights) in zip(cfg.adapters, runs)]
    names = {id(m): name for name, m in model.named_modules()}
    for blocks, layout in block_stacks(model):  # an encoder-decoder model: its encoder, then its decoder
        for i, block in enumerate(blocks):
            bottlenecks = stage1_adapters(f"{names[id(blocks)]}.{i}.{layout.ffn_out}.adapter.", d, stage1)
            fusion = Fusion(
                block.get_submodule(layout.ffn_out),
                bottlenecks,
                d,
                cfg.temperature,
                cfg.adapters,
                cfg.value_identity_weight,
            )
            replace_submodule(block, layout.ffn_out, fusion.to(device))
    hand_over_masks(model, Fusion)
    return model


def trainable(model: nn.Module, cfg: Config) -> list[nn.Parameter]:
    fusions = [m for m in model.modules() if isinstance(m, Fusion)]
    return [p for f in fusions for linear in (f.query, f.key, f.value) for p in linear.parameters()]


def loss_term(model: nn.Module) -> torch.Tensor:
    """λ Σ_blocks ‖I − V‖²_F over every fusion layer, a scalar."""
    return torch.stack([m.value_pull() for m in model.modules() if isinstance(m, Fusion)]).sum()


def disabled(model: nn.Module) -> AbstractContextManager[None]:
    return base.switched_off(m for m in model.modules() if isinstance(m, Fusion))


def report(model: nn.Module) -> dict:
    """Mean softmax weight per adapter and block over the last evaluation's tokens ("layers" empty if none)."""
    fusions = [
        m for blocks, _ in block_stacks(model) for block in blocks for m in block.modules() if isinstance(m, Fusion)
    ]
    layers = [[round(float(w), 6) for w in f.weight_sum / f.tokens] for f in fusions if f.tokens]
    return {"adapters": fusions[0].sources, "tokens": fusions[0].tokens, "layers": layers}


METHOD = base.Method(
    name="adapter_fusion",
    config_cls=Config,
    trains=base.Trains.ADDED,
    claims=frozenset({base.Claim.SUB_BLOCKS}),
    apply=apply,
    trainable=trainable,
    disabled=disabled,
    hooks=base.Hooks(loss_term=loss_term, report=report),
    runs_with=base.RunsWith(quantized_base=True),
    about=base.About(
        "attention over frozen stage-1 pfeiffer adapters (per-layer weights in method_report.json)",
        "Pfeiffer et al. 2021, AdapterFusion, arXiv:2005.00247",
        base.Recommended(5e-4, "ftune's adapter_fusion_sst2 recipe (README); Pfeiffer et al. train fusion at 5e-5"),
    ),
)
