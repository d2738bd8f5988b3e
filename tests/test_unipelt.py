"""UniPELT (LoRA + adapter + prefix, each gated) on the tiny BERT, Llama, T5 and BART from conftest: pinned gates
reduce it to each plain method, learned gates keep padded rows exact (and a decoder causal), train, are reported,
saved and refused where they must be. tests/test_seq2seq.py runs the seq2seq battery over it too."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import recipe_doc, s2s_recipe_doc, write_recipe
from ftune import models
from ftune.cli import app
from ftune.errors import MethodError
from ftune.layers.gates import Gate, force
from ftune.layers.lora import LoRALinear
from ftune.methods import attach, compose, method_of
from ftune.methods.unipelt import Config

CLS, LM, S2S = "sequence_classification", "causal_lm", "seq2seq"
SMALL = {"lora": {"r": 2}, "adapter": {"bottleneck": 4}, "prefix": {"n_tokens": 3, "mlp_hidden": 8}}
runner = CliRunner()


@pytest.fixture(scope="module")
def folders(tiny_bert, tiny_llama, tiny_t5, tiny_bart):
    return {"bert": tiny_bert, "llama": tiny_llama, "t5": tiny_t5, "bart": tiny_bart}


def _build(folder, cfg, task=CLS):
    torch.manual_seed(0)
    extra = {} if task == S2S else {"pad_token_id": 0} | ({"num_labels": 2} if task == CLS else {})
    model, missing = models.load_model(task, str(folder), **extra)
    return attach(model, cfg, models.head_parameters(model, task, missing))


def _unipelt(folder, task=CLS):
    """A UniPELT model whose every trainable weight (B of LoRA, the adapters' up-projections, the gates) is non-zero."""
    model = _build(folder, Config(**SMALL), task)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _batch(task=CLS):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 25, (4, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:], ids[1, 7:] = 0, 0  # a right-padded row
    return {"input_ids": ids, "attention_mask": mask} | (
        {"decoder_input_ids": torch.randint(5, 25, (4, 6), generator=g)} if task == S2S else {}
    )


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


# pinned gates -> the plain method(s) that UniPELT must then equal
PLAIN = {
    "lora": ({"lora": 1, "adapter": 0, "prefix": 0}, lambda c: c.lora),
    "adapter": ({"lora": 0, "adapter": 1, "prefix": 0}, lambda c: c.adapter),
    "prefix": ({"lora": 0, "adapter": 0, "prefix": 1}, lambda c: c.prefix),
    "all": ({"lora": 1, "adapter": 1, "prefix": 1}, lambda c: compose.Config(methods=[c.lora, c.adapter, c.prefix])),
}
CASES = (
    [(p, a, CLS) for p in PLAIN for a in ("bert", "llama")]
    + [("all", "llama", LM), ("prefix", "llama", LM)]
    + [(p, a, S2S) for p in PLAIN for a in ("t5", "bart")]
)


@pytest.mark.parametrize("plain_name,arch,task", CASES)
def test_pinned_gates_give_the_plain_methods(plain_name, arch, task, folders):
    gated = _unipelt(folders[arch], task)
    pins, plain_cfg = PLAIN[plain_name]
    plain = _build(folders[arch], plain_cfg(Config(**SMALL)), task).eval()
    source = dict(gated.named_parameters())
    with torch.no_grad():  # the plain model's trained weights (and head) from the gated one, by name
        for name, p in plain.named_parameters():
            if p.requires_grad:
                key = name if name in source else f"model.{name}"  # the plain one may lack the prefix wrapper
                p.copy_(source[key])
    batch = _batch(task)
    want = _logits(plain, batch)
    assert (_logits(gated, batch) - want).abs().max() > 1e-3  # learned gates: not the plain method
    force(gated, **pins)
    assert (_logits(gated, batch) - want).abs().max() <= 1e-5


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_the_prefix_gate_scales_the_prefix(arch, folders):
    model, batch = _unipelt(folders[arch]), _batch()
    outs = {}
    for pin in (None, 1, 0):  # learned (about 0.5), as plain prefix tuning, removed
        force(model, lora=0, adapter=0, prefix=pin)
        outs[pin] = _logits(model, batch)
    pins = list(outs)
    assert all((outs[a] - outs[b]).abs().max() > 1e-4 for i, a in enumerate(pins) for b in pins[i + 1 :])


def test_gate_means_over_real_tokens_only():
    gate = Gate(8)
    h = torch.randn(2, 5, 8)
    gate.token_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    together = gate(h)
    gate.token_mask = None
    alone, every_position = gate(h[1:, :3]), gate(h)  # every_position: the reference code's mean
    assert together.shape == (2, 1, 1) and ((together > 0) & (together < 1)).all()
    assert torch.allclose(together[1], alone[0], atol=1e-7)
    assert not torch.allclose(every_position[1], alone[0], atol=1e-4)


@pytest.mark.parametrize(
    "arch,side,task", [("bert", "right", CLS), ("llama", "right", CLS), ("llama", "left", CLS), ("llama", "right", LM)]
)  # BERT pools its first token: padded right
def test_a_padded_row_gives_its_unpadded_output(arch, side, task, folders):
    model = _unipelt(folders[arch], task)
    ids = torch.randint(5, 25, (2, 10), generator=torch.Generator().manual_seed(2))
    short, pad = ids[1, :6], torch.zeros(4, dtype=torch.long)
    row, row_mask = (
        (torch.cat([short, pad]), torch.tensor([1] * 6 + [0] * 4))
        if side == "right"
        else (torch.cat([pad, short]), torch.tensor([0] * 4 + [1] * 6))
    )
    together = _logits(
        model,
        {
            "input_ids": torch.stack([ids[0], row]),
            "attention_mask": torch.stack([torch.ones(10, dtype=torch.long), row_mask]),
        },
    )[1]
    alone = _logits(model, {"input_ids": short[None], "attention_mask": torch.ones(1, 6, dtype=torch.long)})[0]
    if task == LM:
        together = together[row_mask.bool()]
    assert (together - alone).abs().max() <= 1e-5


def test_gates_get_gradients_and_train(folders):
    model = _build(folders["bert"], Config(**SMALL))
    gates = [m for m in model.modules() if isinstance(m, Gate)]
    assert len(gates) == 2 * 4  # per block: LoRA on query and value, the adapter, the prefix
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert all(id(p) in trainable for g in gates for p in g.parameters())
    before = [g.linear.weight.detach().clone() for g in gates]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(3):  # LoRA's gates see a gradient once B has left zero (after the first step)
        model(**_batch(), labels=torch.tensor([0, 1, 1, 0])).loss.backward()
        if step == 2:
            assert all(g.linear.weight.grad.abs().sum() > 0 for g in gates)
        optimizer.step()
        optimizer.zero_grad()
    assert all(not torch.equal(b, g.linear.weight) for b, g in zip(before, gates))


def test_a_gated_lora_layer_refuses_to_merge(folders):
    model = _unipelt(folders["bert"])
    layer = next(m for m in model.modules() if isinstance(m, LoRALinear))
    with pytest.raises(MethodError, match="gate"):
        layer.merge()
    assert method_of(Config(**SMALL)).merging is None


@pytest.fixture(scope="module")
def unipelt_run(tiny_bert, cls_data, tmp_path_factory):
    """`ftune train` of UniPELT on the tiny BERT: 4 steps, evaluated at step 2 and at the end."""
    root = tmp_path_factory.mktemp("unipelt")
    doc = recipe_doc("cls", tiny_bert, cls_data, root / "run", {"name": "unipelt", **SMALL}, eval_every=2, lr=5e-3)
    result = runner.invoke(app, ["train", str(write_recipe(root / "recipe.yaml", doc))])
    assert result.exit_code == 0, result.output
    return root / "run"


def test_the_run_reports_mean_gates_per_layer(unipelt_run, cls_data):
    report = json.loads((unipelt_run / "method_report.json").read_text())
    assert report == json.loads((unipelt_run / "metrics.json").read_text())["method_report"]
    assert len(report["layers"]) == 2  # one row per block of the tiny BERT
    names = {"lora.attention.self.query", "lora.attention.self.value", "adapter.output.dense", "prefix"}
    for row in report["layers"]:
        assert row.keys() == names
        assert all(0 < value < 1 for value in row.values())
    # the sums restart at each evaluation: only the final one (16 rows, padding excluded) counts
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(unipelt_run / "tokenizer")
    rows = (cls_data / "validation.tsv").read_text().splitlines()[1:]
    assert report["tokens"] == sum(len(tokenizer(r.split("\t")[0])["input_ids"]) for r in rows)


def test_the_run_dir_is_the_model(unipelt_run, tmp_path):
    from safetensors.torch import load_file

    saved = load_file(str(unipelt_run / "method.safetensors"))
    assert "source.weight" in saved and not any(k.startswith("source.transform") for k in saved)  # prefix folded
    assert sum(k.endswith("gate.linear.weight") for k in saved) == 2 * 4
    result = runner.invoke(app, ["eval", str(unipelt_run)])
    assert result.exit_code == 0, result.output
    scored = json.loads(result.stdout)
    expected = json.loads((unipelt_run / "metrics.json").read_text())["validation"]
    for key, value in expected.items():
        assert scored[key] == pytest.approx(value, abs=1e-6), key
    result = runner.invoke(app, ["merge", str(unipelt_run), str(tmp_path / "merged")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1 and "unipelt" in result.stderr
    assert not (tmp_path / "merged").exists()


def test_part_sections_keep_unipelt_defaults():
    cfg = Config(lora={"r": 4}, adapter={"activation": "gelu"})
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.targets) == (4, 16, "query-value")
    assert (cfg.adapter.placement, cfg.adapter.bottleneck, cfg.adapter.activation) == ("pfeiffer", 48, "gelu")
    assert (cfg.prefix.n_tokens, cfg.prefix.mlp_hidden) == (10, 512)


@pytest.mark.parametrize(
    "part,value,needles",
    [
        ("lora", {"dora": True}, ["method.lora", "dora"]),
        ("adapter", {"placement": "houlsby"}, ["method.adapter", "placement"]),
    ],
)
def test_ungateable_options_are_one_line_recipe_errors(part, value, needles, tiny_bert, cls_data, tmp_path):
    doc = recipe_doc("cls", tiny_bert, cls_data, tmp_path / "run", {"name": "unipelt", part: value})
    result = runner.invoke(app, ["train", str(write_recipe(tmp_path / "recipe.yaml", doc))])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and all(n in lines[0] for n in needles), result.stderr
    assert not (tmp_path / "run").exists()


# Encoder-decoder models: the decoder's gates must leave it causal, and a run is the model.


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_decoder_positions_do_not_see_later_ones(arch, folders):
    """Per-position gates in decoder blocks and source-read prefix gates: changing the target from position 3 on
    leaves the logits before it as they were (a mean over the target's tokens would not)."""
    model, batch = _unipelt(folders[arch], S2S), _batch(S2S)
    later = batch["decoder_input_ids"].clone()
    later[:, 3:] = 30 - later[:, 3:]
    a, b = _logits(model, batch), _logits(model, batch | {"decoder_input_ids": later})
    assert (a[:, :3] - b[:, :3]).abs().max() <= 1e-6 and (a[:, 3:] - b[:, 3:]).abs().max() > 1e-3


@pytest.fixture(scope="module", params=["t5", "bart"])
def s2s_run(request, folders, s2s_data, tmp_path_factory):
    """`ftune train` of UniPELT on the tiny T5 or BART: 4 steps, evaluated (loss and ROUGE) at the end."""
    root = tmp_path_factory.mktemp(f"unipelt-{request.param}")
    doc = s2s_recipe_doc(folders[request.param], s2s_data, root / "run", {"name": "unipelt", **SMALL}, lr=5e-3)
    result = runner.invoke(app, ["train", str(write_recipe(root / "recipe.yaml", doc))])
    assert result.exit_code == 0, result.output
    return root / "run"


def test_a_seq2seq_run_reports_saves_and_reloads(s2s_run, tmp_path):
    from safetensors.torch import load_file

    report = json.loads((s2s_run / "method_report.json").read_text())
    encoder = {"lora.q", "lora.v", "adapter", "prefix"}  # by kind and last name: T5 and BART name paths apart
    decoder = encoder | {"lora.cross.q", "lora.cross.v", "prefix.cross"}
    rows = [{_kind(name) for name in row} for row in report["layers"]]
    assert rows == [encoder, encoder, decoder, decoder]  # two encoder blocks, then two decoder blocks
    assert all(0 < value < 1 for row in report["layers"] for value in row.values()) and report["tokens"] > 0
    saved = load_file(str(s2s_run / "method.safetensors"))
    assert sum(k.endswith("gate.linear.weight") for k in saved) == 2 * len(encoder) + 2 * len(decoder)
    result = runner.invoke(app, ["eval", str(s2s_run)])
    assert result.exit_code == 0, result.output
    scored = json.loads(result.stdout)
    expected = json.loads((s2s_run / "metrics.json").read_text())["validation"]
    assert {"loss", "rougeL"} <= expected.keys()
    for key, value in expected.items():
        assert scored[key] == pytest.approx(value, abs=1e-6), key
    for command in (
        ["merge", str(s2s_run), str(tmp_path / "merged")],
        ["export", str(s2s_run), str(tmp_path / "peft"), "--format", "peft"],
    ):
        result = runner.invoke(app, command)
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert len(result.stderr.strip().splitlines()) == 1 and "unipelt" in result.stderr
    assert not (tmp_path / "merged").exists() and not (tmp_path / "peft").exists()


def _kind(name: str) -> str:
    """A report name without the architecture's paths: lora.q / lora.cross.v / adapter / prefix / prefix.cross."""
    if not name.startswith("lora."):
        return name.split(".")[0] if name.startswith("adapter.") else name
    cross = any(part in name for part in ("EncDecAttention", "encoder_attn"))
    return "lora." + ("cross." if cross else "") + name.rsplit(".", 1)[1][0]


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_seq2seq_gates_count_their_own_stacks_tokens(arch, folders):
    """An evaluation restarts every gate's sums; encoder gates and the decoder's prefix gates (which read the
    encoder's output) count the real source tokens, the decoder's per-position gates every position they see: the
    target's, and the source's for LoRA on the cross-attention's values (its input is the encoder's output)."""
    from ftune.layers.gates import gates_by_block

    model, batch = _unipelt(folders[arch], S2S), _batch(S2S)
    model.train()
    model(**batch)
    model.eval()
    for _ in range(2):  # the second call adds to the first: no restart within one evaluation
        _logits(model, batch)
    rows = gates_by_block(model)
    source, target = 2 * int(batch["attention_mask"].sum()), 2 * batch["decoder_input_ids"].numel()
    for row in rows[:2]:
        assert {gate.tokens for gate in row.values()} == {source}
    for row in rows[2:]:
        want = {name: source if name.startswith("prefix") else target for name in row}
        want |= {name: 2 * batch["input_ids"].numel() for name in row if _kind(name) == "lora.cross.v"}
        assert {name: gate.tokens for name, gate in row.items()} == want
