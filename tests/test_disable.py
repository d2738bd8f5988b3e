"""Method.disabled and Method.hooks.loss_term over every registered method x {tiny BERT classifier, tiny Llama causal
LM}, and the hybrids (UniPELT, AdapterFusion) also on a tiny T5 and BART (seq2seq).

`disabled`: inside the block the attached model computes the base model's outputs (a deep copy taken before attach is
the reference), drawing the same random numbers in training mode; after it, also after an exception, the method's
outputs again. A method without it must train base weights, so a missing `disabled` is never an oversight.
`loss_term`: None, or a finite scalar whose gradient reaches the trainable parameters.
"""

from __future__ import annotations

import copy

import pytest
import torch

from ftune import models
from ftune.errors import MethodError
from ftune.methods import METHODS, attach, method_of
from test_methods import CASES, REFUSED

COMBOS = {
    "bert-cls": ("bert", "sequence_classification"),
    "llama-lm": ("llama", "causal_lm"),
    "t5-s2s": ("t5", "seq2seq"),
    "bart-s2s": ("bart", "seq2seq"),
}
ON_SEQ2SEQ = {"unipelt", "adapter_fusion"}
"""The cases that run on the seq2seq combos (the other methods' switching off is the same code in both stacks)."""
# more configs than the battery's one per method: the placements and options that switch off differently
EXTRA = {
    "lora-dora": ("lora", {"r": 4, "dora": True}),
    "adapter-pfeiffer": ("adapter", {"placement": "pfeiffer", "bottleneck": 8, "dropout": 0.1}),
    "adapter-parallel-both": ("adapter", {"placement": "parallel", "parallel_at": "both", "bottleneck": 8}),
    "p_tuning-around": ("p_tuning", {"n_tokens": 4, "tokens_before": 2}),
    "adalora+prompt": (
        "compose",
        {"methods": [{"name": "adalora", "init_r": 4, "target_r": 2}, {"name": "prompt_tuning", "n_tokens": 4}]},
    ),
    "lora+bitfit": ("compose", {"methods": [{"name": "lora", "r": 4}, {"name": "bitfit"}]}),
}
SETUPS = {name: (name, case) for name, case in CASES.items()} | EXTRA
# virtual tokens after the input suit sequence classification only; Llama has no biases for BitFit
NOT_HERE = {("p_tuning-around", "llama-lm"), ("lora+bitfit", "llama-lm")}
PAIRS = [
    (case, combo)
    for case, (name, _) in SETUPS.items()
    for combo, (arch, task) in COMBOS.items()
    if (name, arch) not in REFUSED and (case, combo) not in NOT_HERE and (task != "seq2seq" or case in ON_SEQ2SEQ)
]
HEAD_IS_NEW = {("head", "bert-cls")}
"""`head` trains only the new classifier here (nothing to switch off), but the output layer of a causal LM."""


def _record(case: str):
    """The record a case's config resolves to, without building anything (AdapterFusion needs its stage-1 runs)."""
    name, kwargs = SETUPS[case]
    return METHODS[name] if callable(kwargs) else method_of(METHODS[name].config_cls(name=name, **kwargs))


WITH = [pair for pair in PAIRS if _record(pair[0]).disabled is not None]
WITHOUT = [pair for pair in PAIRS if _record(pair[0]).disabled is None]


@pytest.fixture(scope="module")
def folders(tiny_bert, tiny_llama, tiny_t5, tiny_bart, request):
    def adapter_runs():  # stage-1 runs for AdapterFusion, trained on first use (session-scoped)
        return request.getfixturevalue("adapter_runs") | request.getfixturevalue("s2s_adapter_runs")

    return {"bert": tiny_bert, "llama": tiny_llama, "t5": tiny_t5, "bart": tiny_bart, "adapter_runs": adapter_runs}


def _setup(case: str, combo: str, folders):
    """(attached model, deep copy of the base model taken before attach, record, config, ids of base weights)."""
    name, kwargs = SETUPS[case]
    arch, task = COMBOS[combo]
    cfg = METHODS[name].config_cls(name=name, **(kwargs(arch, folders) if callable(kwargs) else kwargs))
    torch.manual_seed(0)
    extra = {} if task == "seq2seq" else {"num_labels": 2, "pad_token_id": 0}
    model, missing = models.load_model(task, str(folders[arch]), **extra)
    head = models.head_parameters(model, task, missing)
    base = {id(p) for p in model.parameters()} - {id(p) for p in head}
    reference = copy.deepcopy(model)
    return attach(model, cfg, head), reference, method_of(cfg), cfg, base


def _batch(combo: str) -> dict[str, torch.Tensor]:
    """Four rows of 10: one right-padded, one left-padded (seq2seq: targets of 6, one padded)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 25, (4, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:], mask[2, :3] = 0, 0
    if COMBOS[combo][1] == "seq2seq":
        target = torch.randint(5, 25, (4, 6), generator=g)
        labels = torch.cat([target[:, 1:], target[:, :1]], 1)
        labels[3, 4:] = -100
        return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": target, "labels": labels}
    if COMBOS[combo][1] == "causal_lm":
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 1, 0])}


def _perturb(model, method, cfg) -> None:
    """Move every weight the method trains (not the head, which `disabled` keeps) away from its start."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in method.trainable(model, cfg):
            p.add_(torch.randn_like(p) * 0.1)


def _gap(a, b) -> float:
    return float((a.logits - b.logits).abs().max())


@pytest.mark.parametrize("case,combo", WITH)
def test_disabled_computes_the_base_model(case, combo, folders):
    model, reference, method, cfg, _ = _setup(case, combo, folders)
    _perturb(model, method, cfg)
    batch = _batch(combo)
    model.eval(), reference.eval()
    with torch.no_grad():
        base, enabled = reference(**batch), model(**batch)
        assert _gap(enabled, base) > 1e-4, "the perturbed method does not change the outputs: nothing to switch off"
        with method.disabled(model):
            off = model(**batch)
        after = model(**batch)
        with pytest.raises(RuntimeError, match="inside"), method.disabled(model):
            raise RuntimeError("inside")
        after_error = model(**batch)
    assert _gap(off, base) <= 1e-6 and abs(float(off.loss - base.loss)) <= 1e-6
    assert torch.equal(after.logits, enabled.logits) and torch.equal(after_error.logits, enabled.logits)

    # training mode: the base model's dropout draws, none of the method's own (prefix or adapter dropout, AdapterDrop)
    model.train(), reference.train()
    with torch.no_grad():
        torch.manual_seed(2)
        base = reference(**batch)
        torch.manual_seed(2)
        with method.disabled(model):
            off = model(**batch)
    assert _gap(off, base) <= 1e-6


@pytest.mark.parametrize("case,combo", WITHOUT)
def test_no_disabled_only_where_base_weights_train(case, combo, folders):
    """`disabled` is None only for a method that trains weights of the base model in place (only a copy undoes it)."""
    model, _, method, _, base = _setup(case, combo, folders)
    assert method.disabled is None
    trained_base = [p for p in model.parameters() if p.requires_grad and id(p) in base]
    if (case, combo) in HEAD_IS_NEW:
        assert not trained_base
        assert ("head", "llama-lm") in WITHOUT
    else:
        assert trained_base, f"{case} trains no base weight, so it can be switched off: give it `disabled`"


def test_disabled_refuses_a_merged_model(folders):
    model, _, method, _, _ = _setup("lora", "bert-cls", folders)
    method.merging.merge(model)
    with pytest.raises(MethodError, match="unmerge first"), method.disabled(model):
        pass
    method.merging.unmerge(model)
    with method.disabled(model):
        pass


@pytest.mark.parametrize("case,combo", PAIRS)
def test_loss_term_is_a_finite_scalar_on_the_trainable_graph(case, combo, folders):
    if _record(case).hooks.loss_term is None:
        return
    model, _, method, cfg, _ = _setup(case, combo, folders)
    _perturb(model, method, cfg)  # a term at its minimum (V = I) has a zero gradient
    model.train()
    term = method.hooks.loss_term(model)
    assert term.dim() == 0 and torch.isfinite(term) and term.requires_grad
    term.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def test_composite_loss_term_is_the_sum_of_its_parts(folders):
    model, _, method, cfg, _ = _setup("adalora+prompt", "bert-cls", folders)
    adalora = METHODS["adalora"]
    assert METHODS["prompt_tuning"].hooks.loss_term is None and method.hooks.loss_term is not None
    _perturb(model, method, cfg)
    torch.testing.assert_close(method.hooks.loss_term(model), adalora.hooks.loss_term(model), rtol=0, atol=0)
