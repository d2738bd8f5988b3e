"""The seq2seq task: every method on a tiny T5 and a tiny BART (the battery of test_methods.py for encoder-decoder
models), prefixes in Li & Liang's three places and in peft's one (equal to peft), and the CLI end to end."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import peft_side, s2s_recipe_doc, write_recipe
from ftune import models, rundir
from ftune.cli import app
from ftune.errors import MethodError
from ftune.methods import METHODS, attach, method_of
from ftune.methods.base import count_parameters, unwrap_merged
from ftune.run import checkpoint
from ftune.tasks import TASKS
from test_methods import CASES as BATTERY

TASK = "seq2seq"
PREFIX = {"n_tokens": 3, "mlp_hidden": 16}
# One config per method that applies to encoder-decoder models (a name may carry a variant after ":"); a method
# without one here runs with its case in the battery (test_methods.CASES).
CASES = BATTERY | {
    "full": {},
    "head": {},  # the output projection (tied to the shared embedding in T5 and BART), as for a causal LM
    "layers": {"top_k": 1},  # the decoder's top block: the output side
    "bitfit": {},
    "lora": {"r": 4, "alpha": 8},
    "lora:query-value": {"r": 4, "targets": "query-value"},
    "adapter": {"placement": "houlsby", "bottleneck": 8},
    "adapter:parallel": {"placement": "parallel", "parallel_at": "both", "bottleneck": 8},
    "adapter_drop": {"placement": "pfeiffer", "bottleneck": 8, "drop_first": 1},
    "prompt_tuning": {"n_tokens": 4},
    "p_tuning": {"n_tokens": 4, "encoder": "lstm", "encoder_hidden": 8},
    "prefix_tuning": PREFIX,
    "prefix_tuning:decoder": PREFIX | {"sites": "decoder"},
    "p_tuning_v2": {"n_tokens": 4},
    "adalora": {"init_r": 4, "target_r": 2},
    "compose": {"methods": [{"name": "prefix_tuning", **PREFIX}, {"name": "lora", "r": 4}]},
    "mam_adapter": {"prefix": PREFIX, "adapter": {"bottleneck": 8}},
    "unipelt": {"lora": {"r": 2}, "adapter": {"bottleneck": 4}, "prefix": PREFIX},
    "unipelt:decoder": {
        "lora": {"r": 2, "targets": "all-linear"},
        "adapter": {"bottleneck": 4},
        "prefix": PREFIX | {"sites": "decoder"},
    },
    # a function (arch, folders) -> config for a method that needs something built first: stage-1 adapter runs
    "adapter_fusion": lambda arch, folders: {"adapters": [str(run) for run in folders["adapter_runs"]()[arch]]},
    "sparse": {"selection": "random", "density": 0.05},
    "compose:l2sp": {"methods": [{"name": "layers", "top_k": 1}, {"name": "l2sp"}]},
    "compose:shrink": {"methods": [{"name": "shrink", "k": 1}, {"name": "lora", "r": 4}]},  # top block of each stack
}
# Refused with one MethodError line: T5 has no biases; l2sp and shrink alone train nothing (parts of a method list
# only, as for every task).
REFUSED = {("bitfit", "t5"), ("l2sp", "t5"), ("l2sp", "bart"), ("shrink", "t5"), ("shrink", "bart")}
ARCHES = ("t5", "bart")
PAIRS = [(c, a) for c in CASES for a in ARCHES if (c.split(":")[0], a) not in REFUSED]


def _cfg(case: str, arch: str | None = None, folders: dict | None = None):
    name, kwargs = case.split(":")[0], CASES.get(case, {})
    return METHODS[name].config_cls(name=name, **(kwargs(arch, folders) if callable(kwargs) else kwargs))


def _build(case: str, arch: str, folders: dict[str, Path]):
    cfg = _cfg(case, arch, folders)
    torch.manual_seed(0)
    model, missing = models.load_model(TASK, str(folders[arch]))
    return attach(model, cfg, models.head_parameters(model, TASK, missing)), cfg


def _nudge(model, scale: float = 0.3) -> None:
    """Move every trainable weight away from its initial value (LoRA's B and adapters' up start at zero)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * scale)


@pytest.fixture(scope="module")
def folders(tiny_t5, tiny_bart, request):
    # the stage-1 runs are trained on first use only (session-scoped), so other methods' tests never wait for them
    return {"t5": tiny_t5, "bart": tiny_bart, "adapter_runs": lambda: request.getfixturevalue("s2s_adapter_runs")}


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded sources (row 1 shorter) and targets (row 2 shorter; its padding carries no loss)."""
    g = torch.Generator().manual_seed(seed)
    ids, dec = torch.randint(4, 25, (3, 7), generator=g), torch.randint(4, 25, (3, 5), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    labels = torch.cat([dec[:, 1:], torch.full((3, 1), 4)], 1)
    labels[2, 3:] = -100
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec, "labels": labels}


def _loss(model, batch):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    total, count = TASKS[TASK].loss(model(**inputs).logits, batch["labels"])
    return total / count


def test_every_method_is_covered():
    """Every method serves seq2seq: with a case here or in the battery, or by a refusal."""
    assert {c.split(":")[0] for c in CASES} | {m for m, _ in REFUSED} == set(METHODS)


@pytest.mark.parametrize("case,arch", PAIRS)
def test_only_trainable_parameters_change(case, arch, folders):
    model, _ = _build(case, arch, folders)
    trainable, total = count_parameters(model)
    assert 0 < trainable and (trainable == total if case == "full" else trainable < total)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for step in range(2):
        loss = _loss(model, _batch(step))
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for n, p in model.named_parameters():
        assert p.requires_grad or torch.equal(before[n], p.detach()), f"frozen {n} changed"
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("case,arch", PAIRS)
def test_weights_round_trip_and_generation_follows_the_logits(case, arch, folders, tmp_path):
    """Saved and loaded weights give the same logits; greedy generation writes the argmax of the model's own logits
    (the prompt or prefixes reach every decoding step as they reach the forward)."""
    model, cfg = _build(case, arch, folders)
    _nudge(model)
    checkpoint.save_weights(tmp_path, model, {"method": cfg.name}, method_of(cfg).saving.weights(model))
    fresh, _ = _build(case, arch, folders)
    if method_of(cfg).saving.fold:
        method_of(cfg).saving.fold(fresh)
    rundir.load_weights(tmp_path, fresh)
    model.eval(), fresh.eval()
    batch = {k: v for k, v in _batch().items() if k != "labels"}
    torch.testing.assert_close(fresh(**batch).logits, model(**batch).logits, rtol=0, atol=1e-6)
    with torch.no_grad():
        out = fresh.generate(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=5, do_sample=False
        )
        logits = fresh(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=out[:, :-1]
        ).logits
    eos = fresh.config.eos_token_id
    for row, predicted in zip(out[:, 1:].tolist(), logits.argmax(-1).tolist()):
        # up to the first EOS; the last position may be BART's forced EOS at the length limit, not the argmax
        end = min(row.index(eos) + 1 if eos in row else len(row), len(row) - 1)
        assert row[:end] == predicted[:end]


def _mergeable(case: str) -> bool:
    return not callable(CASES[case]) and method_of(_cfg(case)).merging is not None


@pytest.mark.parametrize("case,arch", [p for p in PAIRS if _mergeable(p[0])])
def test_merge_equals_unmerged(case, arch, folders):
    model, cfg = _build(case, arch, folders)
    _nudge(model, 0.05)
    model.eval()
    batch = {k: v for k, v in _batch().items() if k != "labels"}
    reference = model(**batch).logits
    method_of(cfg).merging.merge(model)
    plain = unwrap_merged(copy.deepcopy(model))
    torch.testing.assert_close(plain(**batch).logits, reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name,arch", sorted(REFUSED))
def test_refused_pairs_raise_one_line(name, arch, folders):
    with pytest.raises(MethodError) as caught:
        _build(name, arch, folders)
    assert "\n" not in str(caught.value)


def test_lora_query_value_covers_self_and_cross_attention(folders):
    from ftune.layers.lora import LoRALinear

    model, _ = _build("lora:query-value", "t5", folders)
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear))
    assert len(wrapped) == 2 * (2 + 2 * 2)  # q and v: 2 encoder self-attentions, 2 decoder self + 2 cross
    assert any("EncDecAttention.q" in n for n in wrapped) and not any("lm_head" in n for n in wrapped)
    model, _ = _build("lora", "t5", folders)  # all-linear: never the output layer
    assert not any(isinstance(m, LoRALinear) for m in [model.get_output_embeddings()])


# Prefix tuning: where the prefixes go.


def _odd_decoder(arch: str, folder: Path) -> Path:
    """The tiny model with 3 decoder layers: peft gives decoder layer l the pair 2l mod L, a permutation only for odd
    L (see prefix_tuning.peft_decoder_order), so equality with peft is defined there."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer

    config = AutoConfig.from_pretrained(folder)
    setattr(config, "num_decoder_layers" if arch == "t5" else "decoder_layers", 3)
    torch.manual_seed(0)
    out = folder.parent / f"{folder.name}-3"
    AutoModelForSeq2SeqLM.from_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(folder).save_pretrained(out)
    return out


@pytest.mark.parametrize("arch", ARCHES)
def test_decoder_prefixes_equal_peft(arch, folders):
    from peft import PeftModel, PrefixTuningConfig, get_peft_model

    from ftune.methods.prefix_tuning import peft_config, peft_weights

    folder = _odd_decoder(arch, folders[arch])
    cfg = METHODS["prefix_tuning"].config_cls(n_tokens=4, reparameterize=False, sites="decoder")
    ours = attach(models.load_model(TASK, str(folder))[0], cfg, []).eval()
    _nudge(ours)
    fields = peft_config(ours, cfg)
    reference = models.load_model(TASK, str(folder))[0]
    keys = ("num_virtual_tokens", "num_transformer_submodules", "num_layers", "token_dim", "num_attention_heads")
    peft_model = peft_side(
        lambda: get_peft_model(reference, PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", **{k: fields[k] for k in keys}))
    )
    assert isinstance(peft_model, PeftModel)
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.copy_(peft_weights(ours)[0]["prompt_embeddings"])
    peft_model.eval()
    batch = {k: v for k, v in _batch().items() if k != "labels"}
    expected = peft_side(lambda: peft_model(**batch).logits)
    torch.testing.assert_close(ours(**batch).logits, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["prompt_tuning", "p_tuning"])
@pytest.mark.parametrize("arch", ARCHES)
def test_input_prompt_export_equals_peft(name, arch, folders, tmp_path):
    """peft's PROMPT_TUNING / P_TUNING for SEQ_2_SEQ_LM, loaded from what `export --format peft` writes, computes
    what the run computes (the prompt before the encoder input)."""
    from peft import PeftModel
    from safetensors.torch import save_file

    method, cfg = METHODS[name], METHODS[name].config_cls(n_tokens=3)
    ours = attach(models.load_model(TASK, str(folders[arch]))[0], cfg, []).eval()
    _nudge(ours)
    config = method.saving.peft.config(ours, cfg) | {
        "task_type": "SEQ_2_SEQ_LM",
        "inference_mode": True,
        "base_model_name_or_path": str(folders[arch]),
    }
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    tensors, _ = method.saving.peft.weights(ours)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "adapter_model.safetensors"))
    reference = PeftModel.from_pretrained(models.load_model(TASK, str(folders[arch]))[0], tmp_path).eval()
    batch = {k: v for k, v in _batch().items() if k != "labels"}
    torch.testing.assert_close(ours(**batch).logits, reference(**batch).logits, rtol=0, atol=1e-5)


def test_peft_export_refuses_what_peft_cannot_hold(folders):
    from ftune.methods.prefix_tuning import peft_weights

    for case, needle in (("prefix_tuning", "sites: all"), ("prefix_tuning:decoder", "2 decoder layers")):
        model, _ = _build(case, "t5", folders)
        with pytest.raises(MethodError, match=needle):
            peft_weights(model)


@pytest.mark.parametrize("arch", ARCHES)
def test_li_liang_prefixes_reach_the_encoder_and_peft_placement_does_not(arch, folders):
    batch = {k: v for k, v in _batch().items() if k != "labels"}
    outputs = {}
    for case in ("prefix_tuning", "prefix_tuning:decoder"):
        model, cfg = _build(case, arch, folders)
        _nudge(model)
        model.eval()
        with method_of(cfg).disabled(model):
            base = model(**batch)
        outputs[case] = (model(**batch), base)
    prefixed, base = outputs["prefix_tuning"]
    assert (prefixed.encoder_last_hidden_state - base.encoder_last_hidden_state).abs().max() > 1e-3
    assert (prefixed.logits - base.logits).abs().max() > 1e-3
    prefixed, base = outputs["prefix_tuning:decoder"]
    torch.testing.assert_close(prefixed.encoder_last_hidden_state, base.encoder_last_hidden_state, rtol=0, atol=0)
    assert (prefixed.logits - base.logits).abs().max() > 1e-3


@pytest.mark.parametrize(
    "case", ["prefix_tuning", "prefix_tuning:decoder", "prompt_tuning", "p_tuning", "unipelt", "adapter_fusion"]
)
@pytest.mark.parametrize("arch", ARCHES)
def test_a_padded_row_equals_the_row_alone(case, arch, folders):
    model, _ = _build(case, arch, folders)
    _nudge(model)
    model.eval()
    batch = {k: v for k, v in _batch().items() if k != "labels"}
    together = model(**batch).logits
    for row in range(3):
        width = int(batch["attention_mask"][row].sum())
        alone = model(
            input_ids=batch["input_ids"][row : row + 1, :width],
            attention_mask=batch["attention_mask"][row : row + 1, :width],
            decoder_input_ids=batch["decoder_input_ids"][row : row + 1],
        ).logits
        torch.testing.assert_close(together[row : row + 1], alone, rtol=0, atol=1e-5)


# The CLI: train, eval, predict, merge, export.

runner = CliRunner()


def _invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def t5_run(tiny_t5, s2s_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("s2s-cli")
    doc = s2s_recipe_doc(tiny_t5, s2s_data, root / "run", max_steps=6, lr=3e-2)
    _invoke("train", write_recipe(root / "recipe.yaml", doc))
    return root / "run"


def test_train_eval_predict_merge(t5_run, tmp_path):
    final = json.loads((t5_run / "metrics.json").read_text())["validation"]
    assert {"loss", "rouge1", "rouge2", "rougeL", "tokens", "examples"} <= final.keys()
    assert final["examples"] == 8 and 0.0 <= final["rougeL"] <= 1.0
    scored = json.loads(_invoke("eval", t5_run).stdout)
    assert scored.pop("source").endswith("validation.jsonl")
    assert scored == pytest.approx(final, rel=1e-6)

    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"document": "the movie was good"}\n{"document": "a dull plot"}\n')
    lines = [json.loads(line) for line in _invoke("predict", t5_run, "--input", rows).stdout.splitlines()]
    assert len(lines) == 2 and all(isinstance(line["text"], str) for line in lines)

    _invoke("merge", t5_run, tmp_path / "merged")
    from transformers import AutoModelForSeq2SeqLM

    from ftune.assemble import load_run

    merged = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "merged").eval()
    _, model, _ = load_run(t5_run)
    batch = {k: v for k, v in _batch().items() if k != "labels"}
    torch.testing.assert_close(merged(**batch).logits, model(**batch).logits, rtol=0, atol=1e-5)


def test_lora_export_loads_in_peft(t5_run, tmp_path):
    from peft import PeftModel

    from ftune.assemble import load_run

    _invoke("export", t5_run, tmp_path / "peft", "--format", "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["task_type"] == "SEQ_2_SEQ_LM"
    recipe, model, _ = load_run(t5_run)
    base = models.load_model(TASK, recipe.model.name)[0]
    peft_model = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    batch = {k: v for k, v in _batch().items() if k != "labels"}
    torch.testing.assert_close(peft_model(**batch).logits, model(**batch).logits, rtol=0, atol=1e-5)


def test_shipped_recipes_name_real_models_and_a_hub_data_set():
    """The seq2seq recipes train on the Hub's SAMSum (dialogue -> summary) with T5-small and BART-base."""
    from ftune.recipe import load_recipe

    root = Path(__file__).parents[1] / "recipes"
    for name, model in (
        ("lora_t5_summarize.yaml", "google-t5/t5-small"),
        ("prefix_tuning_bart_summarize.yaml", "facebook/bart-base"),
    ):
        recipe = load_recipe(root / name)
        assert recipe.task == TASK and recipe.model.name == model
        hub = [s for s in [*recipe.data.train, *recipe.data.validation] if not isinstance(s, str)]
        assert {s.hub for s in hub} == {"knkarthick/samsum"}
        assert (recipe.data.source_column, recipe.data.target_column) == ("dialogue", "summary")
        assert yaml.safe_load((root / name).read_text())["output_dir"].startswith("runs/")
