"""The preflight of `ftune train` (ftune/run/preflight.py), unit by unit: the position limits each architecture
reports, the virtual tokens of each wrapper, the memory bound against the simulated peak, the memory and disk checks.

The refusals and warnings through `ftune train`: tests/test_preflight_cli.py.
"""

from __future__ import annotations

import pytest
import torch

from conftest import recipe_doc, s2s_recipe_doc
from ftune.recipe import validate_recipe
from ftune.run import preflight, preflight_model
from preflight_helpers import LORA, _meminfo, _no_space


def _built(doc: dict):
    from ftune import assemble

    recipe = validate_recipe(doc)
    source, tokenizer = assemble.source_and_tokenizer(recipe)
    rows = assemble.read_split(recipe, "train")
    names = assemble.label_names(recipe, rows)
    return recipe, assemble.build_model(recipe, source, tokenizer, names), tokenizer, names, rows


def test_position_limits_and_offsets(tiny_bert, tiny_llama, tiny_bart, tiny_t5, tmp_path):
    from transformers import AutoModel, RobertaConfig, RobertaModel

    limits = preflight_model.position_limits
    assert limits(AutoModel.from_pretrained(tiny_bert)) == {"embeddings.position_embeddings": 64}
    bart = AutoModel.from_pretrained(tiny_bart)  # BartLearnedPositionalEmbedding: 64 + an offset of 2 rows
    assert preflight_model.position_limits(bart) == {"encoder.embed_positions": 64, "decoder.embed_positions": 64}
    roberta = RobertaModel(
        RobertaConfig(
            vocab_size=40,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=66,
            pad_token_id=1,
        )
    )
    assert preflight_model.position_limits(roberta) == {"embeddings.position_embeddings": 64}  # from padding_idx + 1
    assert preflight_model.position_limits(AutoModel.from_pretrained(tiny_llama)) == {}  # rotary
    assert preflight_model.position_limits(AutoModel.from_pretrained(tiny_t5)) == {}  # relative buckets


def test_virtual_tokens_by_wrapper(tiny_bert, tiny_bart, cls_data, s2s_data, tmp_path):
    prompt = _built(recipe_doc("cls", tiny_bert, cls_data, tmp_path, {"name": "prompt_tuning", "n_tokens": 7}))[1]
    p_tuning = _built(recipe_doc("cls", tiny_bert, cls_data, tmp_path, {"name": "p_tuning", "n_tokens": 5}))[1]
    prefix = _built(s2s_recipe_doc(tiny_bart, s2s_data, tmp_path, {"name": "prefix_tuning", "n_tokens": 3}))[1]
    lora = _built(recipe_doc("cls", tiny_bert, cls_data, tmp_path))[1]
    counted = [preflight_model.virtual_tokens(m) for m in (prompt, p_tuning, prefix, lora)]
    assert counted == [(7, 0), (5, 0), (0, 3), (0, 0)]


STEPS = {
    "bert-lora": lambda m, d, tmp: recipe_doc("cls", m["bert"], d["cls"], tmp, LORA),
    "bert-full-bf16": lambda m, d, tmp: recipe_doc("cls", m["bert"], d["cls"], tmp, {"name": "full"}, precision="bf16"),
    "bert-prompt": lambda m, d, tmp: recipe_doc("cls", m["bert"], d["cls"], tmp, {"name": "prompt_tuning"}),
    "llama-prefix": lambda m, d, tmp: recipe_doc("sft", m["llama"], d["sft"], tmp, {"name": "prefix_tuning"}),
    "llama-full-accum": lambda m, d, tmp: recipe_doc("sft", m["llama"], d["sft"], tmp, {"name": "full"}, grad_accum=2),
}


@pytest.mark.parametrize("case", list(STEPS))
def test_the_bound_is_above_the_estimate(case, tiny_bert, tiny_llama, cls_data, sft_data, tmp_path):
    """step_bound, which lets most runs skip the simulation, is never below the simulated peak."""
    from ftune.estimate import step
    from ftune.estimate.simulate import simulate

    doc = STEPS[case]({"bert": tiny_bert, "llama": tiny_llama}, {"cls": cls_data, "sft": sft_data}, tmp_path)
    recipe, model, tokenizer, names, rows = _built(doc)
    setup, batch = step.prepare_step(recipe, model, tokenizer, names, rows, torch.device("cpu"))
    peak = simulate(model, batch, setup, recipe.train.gradient_checkpointing).peak
    bound = preflight.step_bound(recipe, model, setup.extra_models, setup.precision)
    assert peak < bound < 50 * peak


def test_memory_fits_warns_or_refuses(tiny_bert, cls_data, tmp_path, monkeypatch):
    """Enough memory: nothing, without a simulation; too little: a refusal on CPU and the same line as a warning on
    CUDA; an unreadable MemAvailable: no check; several processes share the machine's memory."""
    from ftune.errors import RecipeError

    recipe, model, tokenizer, _, _ = _built(recipe_doc("cls", tiny_bert, cls_data, tmp_path, LORA))
    examples = [{"input_ids": [2, 5, 6, 3], "attention_mask": [1] * 4, "labels": 1}]
    simulated = []
    monkeypatch.setattr(preflight, "simulated_peak", lambda *a: simulated.append(a) or 5 * 2**20)

    def check(kib, device="cpu", processes=1):
        monkeypatch.setattr(preflight, "free_memory", lambda d: None if kib is None else kib * 1024)
        return preflight.memory(recipe, model, tokenizer, examples, None, {}, "fp32", torch.device(device), processes)

    assert check(16 * 2**20) is None and not simulated  # 16 GiB: the bound settles it
    assert check(None) is None
    assert check(8 * 1024) is None and simulated  # 8 MiB: the bound does not fit, the 5 MiB step does
    with pytest.raises(RecipeError, match=r"needs about 5.0 MiB .* only 4.0 MiB of RAM is available"):
        check(4 * 1024)
    with pytest.raises(RecipeError, match="8.0 MiB of RAM is available, 4.0 MiB for each of 2 processes"):
        check(8 * 1024, processes=2)
    assert "4.0 MiB is free on cuda" in check(4 * 1024, "cuda")


def test_free_memory_reads_meminfo(tmp_path, monkeypatch):
    monkeypatch.setattr(preflight, "MEMINFO", _meminfo(tmp_path, 2048))
    assert preflight.free_memory(torch.device("cpu")) == 2048 * 1024
    monkeypatch.setattr(preflight, "MEMINFO", str(tmp_path / "absent"))
    assert preflight.free_memory(torch.device("cpu")) is None


def test_run_bytes_counts_a_checkpoint(tiny_bert, cls_data, tmp_path):
    """Trainable weights twice (a checkpoint's and the run's) and AdamW's two moments, + margin and slack."""
    _, model, _, _, _ = _built(recipe_doc("cls", tiny_bert, cls_data, tmp_path, {"name": "full"}))
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert preflight.run_bytes(model, "adamw") == int(4 * n * 4 * preflight.DISK_MARGIN) + preflight.DISK_SLACK
    linear = torch.nn.Linear(128, 128)  # 8-bit moments for the weight (16,384 values), 32-bit for the bias (128)
    weights, state = 2 * (128 * 128 + 128) * 4, 2 * 128 * 128 * 1 + 2 * 128 * 4
    expected = int((weights + state) * preflight.DISK_MARGIN) + preflight.DISK_SLACK
    assert preflight.run_bytes(linear, "adamw_8bit") == expected


def test_overwrite_counts_the_old_run_as_free(tiny_bert, cls_data, tmp_path, monkeypatch):
    from ftune.errors import RunDirError

    recipe, model, _, _, _ = _built(recipe_doc("cls", tiny_bert, cls_data, tmp_path / "out", {"name": "full"}))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.bin").write_bytes(b"0" * preflight.run_bytes(model, "adamw"))
    _no_space(monkeypatch)
    with pytest.raises(RunDirError, match="1000 B free"):
        preflight.free_space(recipe, model, tmp_path / "out", overwrite=False)
    preflight.free_space(recipe, model, tmp_path / "out", overwrite=True)
