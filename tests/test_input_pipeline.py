"""What keeps host work off the training step: batches collated ahead on a thread (same batches, same order, errors
raised where they belong, the thread stopped when the loop leaves), the fused optimizer switch, and when
train.compile compiles."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from ftune.data.loader import token_count
from ftune.data.prefetch import ahead
from ftune.run.compiling import compile_model, why_not
from ftune.step.optim import make_optimizer


def _threads() -> int:
    return sum(t.name == "ftune-collate" for t in threading.enumerate())


def _settled(expected: int) -> bool:
    for _ in range(50):
        if _threads() == expected:
            return True
        time.sleep(0.05)
    return False


def test_batches_come_out_as_the_loader_made_them():
    made = [{"input_ids": torch.full((2, 3), i)} for i in range(7)]
    assert [b["input_ids"][0, 0].item() for b in ahead(iter(made))] == list(range(7))


def test_an_error_while_collating_is_raised_to_the_loop():
    def broken():
        yield {"input_ids": torch.zeros(1)}
        raise ValueError("row 3 is broken")

    got = ahead(broken())
    assert next(got)["input_ids"].shape == (1,)
    with pytest.raises(ValueError, match="row 3 is broken"):
        next(got)


def test_leaving_early_stops_the_thread():
    before = _threads()
    endless = ({"input_ids": torch.zeros(1)} for _ in iter(int, 1))
    got = ahead(endless, depth=2)
    next(got)
    assert _threads() == before + 1
    got.close()
    assert _settled(before)


def test_tokens_are_counted_without_padding():
    padded = {
        "input_ids": torch.zeros(2, 5, dtype=torch.long),
        "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
    }
    assert token_count(padded) == 8
    assert token_count({"input_ids": torch.zeros(1, 9, dtype=torch.long)}) == 9  # a packed row has no padding


def test_fused_adamw_is_asked_for_only_when_the_caller_says_so():
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert make_optimizer("adamw", params, 1e-3, 0.0).defaults["fused"] is None
    fused = make_optimizer("adamw", params, 1e-3, 0.0, fused=True)
    assert fused.defaults["fused"] is True


def test_compile_on_cpu_only_when_asked():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert why_not("auto", cpu, sharded=False, quantized=False) == ""  # off, nothing to say
    assert why_not(False, cuda, sharded=False, quantized=False) == ""
    assert "FSDP" in why_not("auto", cuda, sharded=True, quantized=False)
    assert "quantized" in why_not(True, cpu, sharded=False, quantized=True)
    model = torch.nn.Linear(2, 2)
    assert compile_model(model, "auto", cpu, False, False) == ""
    assert model._compiled_call_impl is None  # untouched


def test_frozen_parameters_get_no_gradient_under_lora(tiny_bert, cls_data, tmp_path):
    from conftest import recipe_doc
    from ftune import assemble
    from ftune.data.loader import collate
    from ftune.recipe import validate_recipe

    recipe = validate_recipe(recipe_doc("cls", tiny_bert, cls_data, tmp_path / "unused"))
    (names, train_set, _), _ = assemble.encoded_splits(recipe, assemble.source_and_tokenizer(recipe)[1])
    source, tokenizer = assemble.source_and_tokenizer(recipe)
    model = assemble.build_model(recipe, source, tokenizer, names)
    batch = collate(tokenizer.pad_token_id)(train_set.examples[:4])
    model(**{k: v for k, v in batch.items() if k != "labels"}).logits.sum().backward()
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
