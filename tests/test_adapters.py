"""Bottleneck adapters and AdapterDrop on tiny in-process models of every supported architecture family."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from ftune.errors import MethodError
from ftune.layers.bottleneck import adapters_by_block
from ftune.methods import adapter, adapter_drop, attach
from ftune.models import head_parameters
from ftune.models.arch import LAYOUTS

SMALL = {
    "hidden_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "vocab_size": 64,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
    "num_labels": 2,
}
FAMILIES = ["bert", "roberta", "xlm-roberta", "mpnet", "llama", "qwen2", "qwen3", "mistral", "gemma3_text", "gpt2"]


def tiny(model_type: str) -> torch.nn.Module:
    extra = (
        {"num_key_value_heads": 2, "head_dim": 8}
        if model_type not in ("bert", "roberta", "xlm-roberta", "mpnet", "gpt2")
        else {}
    )
    if model_type == "gpt2":
        extra = {"n_embd": 32, "n_layer": 3, "n_head": 4, "n_positions": 64}
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **SMALL, **extra)
    return AutoModelForSequenceClassification.from_config(config).eval()


def _inputs():
    ids = torch.randint(3, 60, (2, 7), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _perturb_adapters(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, adapter.Bottleneck):
                m.up.weight.normal_(std=0.2)
                m.down.weight.normal_(std=0.2)


def test_every_family_in_the_table_is_tested():
    assert set(FAMILIES) == set(LAYOUTS) - {"gemma3"}  # gemma3 is the multimodal config; its text stack = gemma3_text


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer", "parallel"])
@pytest.mark.parametrize("family", FAMILIES)
def test_placement_starts_at_the_base_model_and_then_changes_it(family, placement):
    model = tiny(family)

    def last_hidden():
        with torch.no_grad():
            return model(**_inputs(), output_hidden_states=True).hidden_states[-1]

    base = last_hidden()
    model = adapter.apply(model, adapter.Config(placement=placement, bottleneck=4, parallel_at="both"))
    torch.testing.assert_close(last_hidden(), base, rtol=0, atol=0)  # the up-projection starts at 0
    _perturb_adapters(model)
    assert (last_hidden() - base).abs().max() > 1e-3
    wrappers = [m for m in model.modules() if isinstance(m, adapter.AdapterAt)]
    assert len(wrappers) == 3 * (1 if placement == "pfeiffer" else 2)
    assert all(w.block_input is None for w in wrappers)  # a parallel adapter's input is consumed, never kept


@pytest.mark.parametrize("placement,per_layer", [("houlsby", 2), ("pfeiffer", 1), ("parallel", 1)])
def test_trainable_parameter_count(placement, per_layer):
    model = tiny("bert")
    cfg = adapter.Config(placement=placement, bottleneck=4)
    model = attach(model, cfg, head_parameters(model, "sequence_classification", []))
    d, m, layers = 32, 4, 3
    norms = 2 * 2 * d * layers if placement == "houlsby" else 0  # two LayerNorms (weight + bias) per BERT layer
    head = (d * d + d) + (d * 2 + 2)  # BERT's pooler is inside base_model; the classifier is the head
    expected = layers * per_layer * (2 * m * d + d + m) + norms + (d * 2 + 2)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    assert head > 0


def test_layers_option_and_bad_index():
    model = adapter.apply(tiny("llama"), adapter.Config(layers=[2], bottleneck=4))
    assert [len(w) for w in adapters_by_block(model)] == [0, 0, 1]
    with pytest.raises(MethodError, match="method.layers"):
        adapter.apply(tiny("llama"), adapter.Config(layers=[5]))


def test_unsupported_architecture_names_it_and_the_supported_ones():
    config = AutoConfig.for_model(
        "opt",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=64,
        vocab_size=64,
        word_embed_proj_dim=32,
        max_position_embeddings=64,
    )
    with pytest.raises(MethodError, match="'opt' is not supported.*bert.*llama"):
        adapter.apply(AutoModelForSequenceClassification.from_config(config), adapter.Config())


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_adapter_drop_skips_the_lowest_blocks(family):
    """With k = 2 at inference, the output equals a model that only has the adapter of block 2."""
    dropped = adapter_drop.apply(tiny(family), adapter_drop.Config(bottleneck=4, inference_drop=2, drop_first=2))
    _perturb_adapters(dropped)
    calls = []
    for i, wrappers in enumerate(adapters_by_block(dropped)):
        for w in wrappers:
            w.adapter.register_forward_hook(lambda *_, i=i: calls.append(i))
    only_top = adapter.apply(tiny(family), adapter.Config(bottleneck=4, layers=[2]))
    top = next(m for m in only_top.modules() if isinstance(m, adapter.Bottleneck))
    top.load_state_dict(adapters_by_block(dropped)[2][0].adapter.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(dropped(**_inputs()).logits, only_top(**_inputs()).logits, rtol=0, atol=0)
    assert calls == [2]  # the adapters of blocks 0 and 1 were never computed


def test_robust_adapter_drop_draws_k_per_training_batch():
    model = adapter_drop.apply(tiny("bert"), adapter_drop.Config(bottleneck=4, drop_first=3, robust=True))
    model.train()
    torch.manual_seed(0)
    seen = set()
    for _ in range(30):
        model(**_inputs())
        seen.add(sum(not ws[0].active for ws in adapters_by_block(model)))
    assert seen == {0, 1, 2, 3}
    model.eval()
    model(**_inputs())
    assert all(ws[0].active for ws in adapters_by_block(model))  # inference_drop defaults to 0
