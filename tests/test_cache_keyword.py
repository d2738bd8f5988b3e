"""Prefixes enter a model as its attention cache, under whichever keyword its forward takes: `cache` (transformers
5.24 on) or `past_key_values` (before). A model that takes neither is refused in one line."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ftune.errors import MethodError
from ftune.layers.soft_prompts import PrefixedModel, Prompt, cache_keyword


def _config():
    from transformers import LlamaConfig

    return LlamaConfig(num_attention_heads=2, num_key_value_heads=2, hidden_size=8, num_hidden_layers=1, pad_token_id=0)


class _Body(nn.Module):
    """Records what it was called with; stands for a transformers base model."""

    def __init__(self) -> None:
        super().__init__()
        self.config, self.weight, self.seen = _config(), nn.Parameter(torch.zeros(1)), {}

    def record(self, **kwargs):
        self.seen = kwargs
        return torch.zeros(1)


class TakesCache(_Body):
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, **kwargs):
        return self.record(cache=cache)


class TakesPastKeyValues(_Body):
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, **kwargs):
        return self.record(past_key_values=past_key_values)


class TakesNeither(_Body):
    def forward(self, input_ids=None, attention_mask=None, position_ids=None):
        return self.record()


class TaskModel(_Body):
    """A task model that hands its keyword arguments on to its body, as transformers' *ForSequenceClassification."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    @property
    def base_model(self) -> nn.Module:
        return self.body

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        return self.body(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


@pytest.mark.parametrize(
    ("model", "keyword"),
    [
        (TakesCache(), "cache"),
        (TakesPastKeyValues(), "past_key_values"),
        (TakesNeither(), None),
        (TaskModel(TakesCache()), "cache"),
        (TaskModel(TakesPastKeyValues()), "past_key_values"),
        (TaskModel(TakesNeither()), None),
    ],
)
def test_the_keyword_is_read_from_the_signatures(model, keyword):
    assert cache_keyword(model) == keyword


@pytest.mark.parametrize("cls", [TakesCache, TakesPastKeyValues])
def test_prefixes_arrive_under_that_keyword(cls):
    body = cls()
    wrapped = PrefixedModel(TaskModel(body), Prompt(torch.randn(3, 2 * 1 * 2 * 4)))
    wrapped(input_ids=torch.ones(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 5, dtype=torch.long))
    ((name, cache),) = body.seen.items()
    assert name == cache_keyword(body)
    keys = cache.layers[0].keys
    assert keys.shape == (2, 2, 3, 4)  # (batch, kv heads, prefix length, head dim)


def test_a_model_without_a_cache_is_refused_in_one_line():
    with pytest.raises(MethodError, match="TakesNeither takes no attention cache") as caught:
        PrefixedModel(TakesNeither(), Prompt(torch.randn(3, 16)))
    assert "\n" not in str(caught.value)


def test_a_real_model_takes_one_of_them(tiny_llama):
    from transformers import AutoModelForCausalLM

    assert cache_keyword(AutoModelForCausalLM.from_pretrained(tiny_llama)) in ("cache", "past_key_values")
