"""One battery over every registered method x {tiny BERT, tiny Llama} (peft's test_custom_models idea)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from ftune import models, rundir
from ftune.errors import MethodError
from ftune.methods import METHODS, attach, method_of
from ftune.methods.base import count_parameters, unwrap_merged
from ftune.run import checkpoint

# One config per registered method; test_every_method_has_a_case keeps this in step with the registry.
# A case is the config's keyword arguments, or a function (arch, folders) -> them for a method that needs
# something built first (AdapterFusion: finished stage-1 adapter runs on that architecture).
CASES = {
    "full": {},
    "head": {},
    "layers": {"top_k": 1},
    "bitfit": {},
    "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
    "adapter": {"placement": "houlsby", "bottleneck": 8},
    "adapter_drop": {"placement": "parallel", "bottleneck": 8, "drop_first": 1, "robust": True},
    "adapter_fusion": lambda arch, folders: {"adapters": [str(run) for run in folders["adapter_runs"]()[arch]]},
    "prompt_tuning": {"n_tokens": 4},
    "p_tuning": {"n_tokens": 4, "encoder": "lstm", "encoder_hidden": 8},
    "prefix_tuning": {"n_tokens": 4, "mlp_hidden": 16},
    "p_tuning_v2": {"n_tokens": 4},
    "adalora": {"init_r": 4, "target_r": 2, "dropout": 0.0},
    "compose": {"methods": [{"name": "prefix_tuning", "n_tokens": 4, "mlp_hidden": 16}, {"name": "lora", "r": 4}]},
    "mam_adapter": {"prefix": {"n_tokens": 4, "mlp_hidden": 16}, "adapter": {"bottleneck": 8}},
    "unipelt": {"lora": {"r": 2}, "adapter": {"bottleneck": 4}, "prefix": {"n_tokens": 3, "mlp_hidden": 8}},
    "sparse": {"selection": "random", "density": 0.05},  # a placeholder mask before calibration: trains as any mask
    "l2sp": {},
    "shrink": {"k": 1},
}
# Methods that run only in a list of methods (no run of their own), with the list tests/test_learns.py trains them in.
IN_COMPANY = {
    "compose": [{"name": "lora"}, {"name": "bitfit"}],
    "l2sp": [{"name": "full"}, {"name": "l2sp"}],
    "shrink": [{"name": "shrink", "k": 1}, {"name": "lora"}],
}
# (method, architecture) pairs that must be refused with a MethodError rather than run.
REFUSED = {("bitfit", "llama"), ("l2sp", "bert"), ("l2sp", "llama"), ("shrink", "bert"), ("shrink", "llama")}
# Llama's linears and RMSNorms have no biases; l2sp and shrink train nothing themselves (tests/test_l2sp.py and
# tests/test_shrink.py test them beside the methods they join)
ARCHES = ("bert", "llama")
PAIRS = [(m, a) for m in CASES for a in ARCHES if (m, a) not in REFUSED]


def _build(name: str, arch: str, folders: dict[str, Path], task: str = "sequence_classification"):
    case = CASES[name]
    cfg = METHODS[name].config_cls(name=name, **(case(arch, folders) if callable(case) else case))
    torch.manual_seed(0)
    model, missing = models.load_model(task, str(folders[arch]), num_labels=2, pad_token_id=0)
    return attach(model, cfg, models.head_parameters(model, task, missing)), cfg


@pytest.fixture(scope="module")
def folders(tiny_bert, tiny_llama, request):
    # the stage-1 runs are trained on first use only (session-scoped), so other methods' tests never wait for them
    return {"bert": tiny_bert, "llama": tiny_llama, "adapter_runs": lambda: request.getfixturevalue("adapter_runs")}


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 25, (4, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 1, 0])}


def test_every_method_has_a_case():
    assert set(CASES) == set(METHODS)


def test_registry_matches_files():
    files = {p.stem for p in (Path(__file__).parents[1] / "ftune" / "methods").glob("*.py")} - {
        "__init__",
        "base",
        "combine",
    }
    assert files == set(METHODS)
    for name, method in METHODS.items():
        assert method.config_cls.model_fields["name"].default == name


@pytest.mark.parametrize("name,arch", PAIRS)
def test_trains_a_proper_subset(name, arch, folders):
    model, _ = _build(name, arch, folders)
    trainable, total = count_parameters(model)
    assert trainable > 0
    assert trainable == total if name == "full" else trainable < total


@pytest.mark.parametrize("name,arch", PAIRS)
def test_only_trainable_parameters_change(name, arch, folders):
    model, _ = _build(name, arch, folders)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for step in range(2):
        loss = model(**_batch(step)).loss
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for n, p in model.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        if not p.requires_grad:
            assert not changed, f"frozen {n} changed"
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("name,arch", PAIRS)
def test_weights_round_trip(name, arch, folders, tmp_path):
    model, _ = _build(name, arch, folders)
    with torch.no_grad():  # move every trainable weight away from its initial value
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    checkpoint.save_weights(tmp_path, model, {"method": name})
    fresh, _ = _build(name, arch, folders)
    rundir.load_weights(tmp_path, fresh)
    model.eval(), fresh.eval()
    batch = _batch()
    torch.testing.assert_close(fresh(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def _mergeable(name: str) -> bool:
    case = CASES[name]
    return not callable(case) and method_of(METHODS[name].config_cls(name=name, **case)).merging is not None


@pytest.mark.parametrize("name,arch", [p for p in PAIRS if _mergeable(p[0])])
def test_merge_equals_unmerged_and_unmerge_restores(name, arch, folders):
    model, cfg = _build(name, arch, folders)
    method = method_of(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    batch = _batch()
    reference = model(**batch).logits
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    method.merging.merge(model)
    torch.testing.assert_close(model(**batch).logits, reference, rtol=0, atol=1e-5)
    method.merging.unmerge(model)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, base_weights[n], rtol=0, atol=1e-6)
    method.merging.merge(model)
    plain = unwrap_merged(copy.deepcopy(model))
    torch.testing.assert_close(plain(**batch).logits, reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name,arch", sorted(REFUSED))
def test_refused_pairs_raise_method_error(name, arch, folders):
    with pytest.raises(MethodError):
        _build(name, arch, folders)


@pytest.mark.parametrize("name", [name for name in CASES if (name, "llama") not in REFUSED])
def test_causal_lm_step(name, folders):
    """Every method also trains a causal LM (the Llama), where there is no new head."""
    model, _ = _build(name, "llama", folders, task="causal_lm")
    batch = _batch()
    batch["labels"] = batch["input_ids"].clone()
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    "cfg",
    [{"name": "lora", "r": 4}, {"name": "adapter", "placement": "parallel", "parallel_at": "both"}],
    ids=["lora", "parallel-adapter"],
)
def test_gradient_checkpointing_gives_the_same_gradients(cfg, folders):
    """Recomputation in backward must reproduce the forward, including a parallel adapter's handed-over input."""
    method = METHODS[cfg["name"]]

    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model, missing = models.load_model("causal_lm", str(folders["llama"]))
        model = attach(model, method.config_cls(**cfg), models.head_parameters(model, "causal_lm", missing))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.05)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        batch = _batch()
        batch["labels"] = batch["input_ids"].clone()
        model(**batch).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, recomputed = gradients(False), gradients(True)
    for name, grad in plain.items():
        torch.testing.assert_close(recomputed[name], grad, rtol=1e-5, atol=1e-6)
