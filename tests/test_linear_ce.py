"""The causal LM's loss from hidden states (Task.hidden_loss): the output layer and cross-entropy in chunks equal the
loss from full logits, in value and in every gradient, and the route is taken only where the model allows it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import recipe_doc
from ftune import assemble
from ftune.data.loader import collate
from ftune.kernels import linear_ce
from ftune.recipe import validate_recipe
from ftune.tasks import TASKS


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_rows", [1, 7, 1000])
def test_chunked_loss_and_gradients_equal_cross_entropy_of_the_full_logits(bias, chunk_rows, monkeypatch):
    vocab = 300
    monkeypatch.setattr(linear_ce, "CHUNK_ELEMENTS", chunk_rows * vocab)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(50, 16, generator=g, requires_grad=True)
    weight = torch.randn(vocab, 16, generator=g, requires_grad=True)
    b = torch.randn(vocab, generator=g, requires_grad=True) if bias else None
    targets = torch.randint(0, vocab, (50,), generator=g)
    leaves = [t for t in (hidden, weight, b) if t is not None]

    def run(fn):
        for t in leaves:
            t.grad = None
        loss = fn()
        (0.37 * loss).backward()  # a scale on the way back: the stored gradients are multiplied by it
        return loss.detach(), [t.grad.clone() for t in leaves]

    chunked, chunked_grads = run(lambda: linear_ce.linear_cross_entropy(hidden, weight, b, targets))
    full, full_grads = run(lambda: F.cross_entropy(F.linear(hidden, weight, b), targets, reduction="sum"))
    assert chunked.item() == pytest.approx(full.item(), rel=1e-6)
    for mine, reference in zip(chunked_grads, full_grads, strict=True):
        assert (mine - reference).abs().max().item() <= 1e-5


def test_no_kept_position_gives_zero_and_zero_gradients():
    hidden, weight = torch.randn(0, 4, requires_grad=True), torch.randn(9, 4, requires_grad=True)
    loss = linear_ce.linear_cross_entropy(hidden, weight, None, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0 and weight.grad.abs().sum() == 0


def _tiny_lm(tiny_llama, sft_data, tmp_path, method: dict):
    recipe = validate_recipe(recipe_doc("sft", tiny_llama, sft_data, tmp_path / "unused", method))
    source, tokenizer = assemble.source_and_tokenizer(recipe)
    examples = assemble.encode_rows(recipe, assemble.read_split(recipe, "train"), tokenizer, None).examples
    return assemble.build_model(recipe, source, tokenizer, None), examples, tokenizer


@pytest.mark.parametrize("method", [{"name": "full"}, {"name": "lora", "r": 4, "alpha": 8}])
def test_the_causal_lm_loss_from_hidden_states_equals_the_loss_from_logits(
    method, tiny_llama, sft_data, tmp_path, monkeypatch
):
    monkeypatch.setattr(linear_ce, "CHUNK_ELEMENTS", 5 * 64)  # several chunks even on the tiny vocabulary
    model, examples, tokenizer = _tiny_lm(tiny_llama, sft_data, tmp_path, method)
    assert linear_ce.exact_through_hidden(model)
    task, batch = TASKS["causal_lm"], collate(tokenizer.pad_token_id)(examples[:5])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def run(loss_fn):
        model.zero_grad()
        total, count = loss_fn()
        total.backward()
        return total.item(), int(count), {n: p.grad.clone() for n, p in trainable}

    full = run(lambda: task.loss(model(**inputs).logits, batch["labels"]))
    out = lambda: model(**inputs, output_hidden_states=True, logits_to_keep=1)
    hidden = run(lambda: task.hidden_loss(out().hidden_states[-1], linear_ce.output_layer(model), batch["labels"]))
    assert hidden[1] == full[1] > 0
    assert hidden[0] == pytest.approx(full[0], rel=1e-6)
    assert max((hidden[2][n] - full[2][n]).abs().max().item() for n in full[2]) <= 1e-5
    # frozen weights get no gradient either way (LoRA: the base and the output layer)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


class _ScaledLogits(nn.Module):
    """A causal LM whose forward scales its logits after the output layer (as Cohere's logit_scale does)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, **kwargs):
        out = self.inner(**kwargs)
        out.logits = out.logits * 0.5
        return out


def test_the_route_is_kept_only_where_it_is_exact(tiny_llama, sft_data, tmp_path):
    model, _, _ = _tiny_lm(tiny_llama, sft_data, tmp_path, {"name": "full"})
    task = TASKS["causal_lm"]
    assert linear_ce.training_task(task, model, sharded=False).hidden_loss is task.hidden_loss
    assert linear_ce.training_task(task, model, sharded=True).hidden_loss is None
    assert linear_ce.training_task(task, _ScaledLogits(model), sharded=False).hidden_loss is None
    assert model.training  # the check leaves the model in the mode it found it in
