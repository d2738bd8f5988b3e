"""Preference tuning: the preference task, the reward objective (Bradley-Terry) and the dpo objective (DPO, cDPO,
IPO, ORPO, SimPO), against published test vectors and direct computations, on the tiny Llama, end to end through
the CLI, resumed, and refusing bad input in one line."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import pref_recipe_doc, write_recipe
from ftune import assemble
from ftune.cli import app
from ftune.data.loader import collate
from ftune.objectives import dpo, reward
from ftune.recipe import validate_recipe
from ftune.run.evaluate import evaluate
from ftune.run.train import train
from ftune.rundir import latest_checkpoint
from ftune.tasks import IGNORE_INDEX, TASKS
from ftune.tasks.preference import completion_logps

runner = CliRunner()


def _sigmoid_nll(x: float) -> float:
    """−log σ(x), written out."""
    return math.log(1 + math.exp(-x))


# ---- formulas ------------------------------------------------------------------------------------------------------


def test_dpo_published_vector():
    """torchtune's DPO test vector (tests/torchtune/rlhf/loss/test_dpo_loss.py): βΔ = [0, 1, 2]."""
    policy = torch.tensor([-0.5, -10.0, -1.0, -0.1, -30.0, -21.0])  # chosen, then rejected
    ref = torch.tensor([-0.5, -10.1, -0.1, -0.1, -20.1, -0.1])
    losses, rewards = dpo.preference_losses(dpo.Config(), policy, torch.ones(6), ref)
    assert losses.tolist() == pytest.approx([0.6931, 0.3133, 0.1269], abs=1e-4)
    assert rewards.tolist() == pytest.approx((0.1 * (policy - ref)).tolist())


@pytest.mark.parametrize("loss", ["sigmoid-cdpo", "ipo", "orpo", "simpo"])
def test_variants_against_direct_computation(loss):
    """Each loss from per-pair floats, written out with `math` from the papers' formulas (TRL's conventions)."""
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([3.0, 5.0, 2.0, 4.0, 6.0, 1.0])
    sums = -torch.rand(6, generator=g, dtype=torch.float64) * counts  # mean log-prob in (-1, 0)
    ref = -torch.rand(6, generator=g, dtype=torch.float64) * counts
    s, r, n = sums.tolist(), ref.tolist(), counts.tolist()
    if loss == "sigmoid-cdpo":
        cfg, eps, beta = dpo.Config(label_smoothing=0.2, beta=0.5), 0.2, 0.5
        want = [
            (1 - eps) * _sigmoid_nll(beta * ((s[i] - r[i]) - (s[i + 3] - r[i + 3])))
            + eps * _sigmoid_nll(-beta * ((s[i] - r[i]) - (s[i + 3] - r[i + 3])))
            for i in range(3)
        ]
    elif loss == "ipo":
        cfg, beta = dpo.Config(loss="ipo", beta=0.3), 0.3
        want = [((s[i] - r[i]) / n[i] - (s[i + 3] - r[i + 3]) / n[i + 3] - 1 / (2 * beta)) ** 2 for i in range(3)]
    elif loss == "orpo":
        cfg, lam = dpo.Config(loss="orpo"), 0.1
        mean = [s[i] / n[i] for i in range(6)]
        odds = [math.log(math.exp(m) / (1 - math.exp(m))) for m in mean]
        want = [-mean[i] + lam * _sigmoid_nll(odds[i] - odds[i + 3]) for i in range(3)]
    else:
        cfg, beta, gamma = dpo.Config(loss="simpo"), 2.0, 0.5
        want = [_sigmoid_nll(beta * (s[i] / n[i] - s[i + 3] / n[i + 3]) - gamma) for i in range(3)]
    got, _ = dpo.preference_losses(cfg, sums, counts, ref if loss in ("sigmoid-cdpo", "ipo") else None)
    assert got.tolist() == pytest.approx(want, rel=1e-9)


def test_reward_loss_by_hand():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 1, generator=g)  # 4 pairs: chosen rows, then rejected
    labels = torch.full((8, 5), IGNORE_INDEX)
    r = logits[:, 0].tolist()
    c = 0.01
    want = sum(_sigmoid_nll(r[i] - r[i + 4]) + c * (r[i] + r[i + 4]) ** 2 for i in range(4))
    total, count = reward.bradley_terry(logits, labels, center=c)
    assert float(total) == pytest.approx(want, rel=1e-5) and int(count) == 4
    scorer = reward.Scorer(center=c)
    scorer.add(logits, labels)
    metrics = scorer.result()
    assert metrics["accuracy"] == sum(r[i] > r[i + 4] for i in range(4)) / 4
    assert metrics["margin"] == pytest.approx(sum(r[i] - r[i + 4] for i in range(4)) / 4, rel=1e-5)


# ---- the task ------------------------------------------------------------------------------------------------------


@pytest.fixture()
def recipe_of(tiny_llama, pref_data, tmp_path):
    def make(objective=None, method=None, **train_options):
        return validate_recipe(
            pref_recipe_doc(tiny_llama, pref_data, tmp_path / "run", objective, method, **train_options)
        )

    return make


def _built(recipe):
    source, tokenizer = assemble.source_and_tokenizer(recipe)
    rows = assemble.read_split(recipe, "validation")
    examples = assemble.encode_rows(recipe, rows, tokenizer, None).examples
    model = assemble.build_model(recipe, source, tokenizer, assemble.label_names(recipe, rows))
    return tokenizer, rows, examples, model


def test_completion_only_masking(recipe_of):
    """Labels are the completion's ids (and its EOS), IGNORE_INDEX over the prompt; a batch stacks chosen over
    rejected; completion_logps sums exactly the completion tokens' log-probs."""
    recipe = recipe_of()
    tokenizer, rows, examples, model = _built(recipe)
    row, example = rows.rows[0], examples[0]
    for member, text in enumerate((row["chosen"], row["rejected"])):
        ids, labels = example["input_ids"][member], example["labels"][member]
        answer = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        start = len(ids) - len(answer)
        assert ids[start:] == answer and labels[start:] == answer
        assert labels[:start] == [IGNORE_INDEX] * start
        assert ids[:start] == example["input_ids"][1 - member][:start]  # the same prompt
    batch = collate(tokenizer.pad_token_id)(examples[:3])
    assert batch["input_ids"].shape[0] == 6
    assert batch["input_ids"][3, : len(examples[0]["input_ids"][1])].tolist() == examples[0]["input_ids"][1]
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    sums, counts = completion_logps(logits, batch["labels"])
    logp = torch.log_softmax(logits.double(), -1)
    for i in range(6):
        labels = batch["labels"][i]
        positions = [t for t in range(1, labels.shape[0]) if labels[t] != IGNORE_INDEX]
        assert int(counts[i]) == len(positions)
        assert float(sums[i]) == pytest.approx(sum(float(logp[i, t - 1, labels[t]]) for t in positions), rel=1e-5)


@pytest.mark.parametrize("method", [None, {"name": "full"}])
def test_policy_equal_to_reference_gives_log2(recipe_of, method):
    """Untrained, the policy is the reference (LoRA's B = 0 switched off; full: a frozen copy of the same base):
    every pair's loss is log 2 and every reward 0."""
    recipe = recipe_of(method=method)
    tokenizer, _, examples, model = _built(recipe)
    bound = assemble.bind_objective(recipe, model, tokenizer, torch.device("cpu")).bound
    loader = assemble.eval_loader(recipe, examples, tokenizer)
    metrics = evaluate(
        model, loader, assemble.recipe_task(recipe), None, torch.device("cpu"), objective=bound.evaluation
    )
    assert metrics["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert metrics[key] == pytest.approx(0.0, abs=1e-6), key


def test_one_step_moves_margins_up(recipe_of):
    recipe = recipe_of()
    tokenizer, _, examples, model = _built(recipe)
    bound = assemble.bind_objective(recipe, model, tokenizer, torch.device("cpu")).bound
    batch = collate(tokenizer.pad_token_id)(examples)
    with torch.no_grad():
        before = bound.evaluation.sums(model.eval(), batch)
    loss, count = bound.loss(model.train(), batch)
    (loss / count).backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    with torch.no_grad():
        after = bound.evaluation.sums(model.eval(), batch)
    assert after["rewards/margins"] > before["rewards/margins"]
    assert after["loss"] < before["loss"]


def test_reward_scores_are_the_heads_values(recipe_of):
    """score_completions (the function RLAIF judges with) gives what the reward model computes on a training batch."""
    recipe = recipe_of({"name": "reward"})
    tokenizer, rows, examples, model = _built(recipe)
    model.eval()
    batch = collate(tokenizer.pad_token_id)(examples[:1])
    with torch.no_grad():
        chosen, rejected = reward.pair_rewards(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        )
    row = rows.rows[0]
    scores = reward.score_completions(model, tokenizer, recipe.data, row["prompt"], [row["chosen"], row["rejected"]])
    assert scores == pytest.approx([float(chosen[0]), float(rejected[0])], rel=1e-5)


def test_validation_fraction_holds_out_whole_prompts(tiny_llama, pref_data, tmp_path):
    doc = pref_recipe_doc(tiny_llama, pref_data, tmp_path / "run")
    doc["data"] = {"train": doc["data"]["train"], "validation_fraction": 0.25, "max_length": 64}
    recipe = validate_recipe(doc)
    train_rows, held = assemble.read_split(recipe, "train"), assemble.read_split(recipe, "validation")
    prompts = {r["prompt"] for r in held.rows}
    assert len(prompts) == 2 and len(held.rows) == 8 and len(train_rows.rows) == 24  # 2 of 8 prompts, 4 pairs each
    assert not prompts & {r["prompt"] for r in train_rows.rows}
    assert [r["prompt"] for r in assemble.read_split(recipe, "validation").rows] == [r["prompt"] for r in held.rows]
    numbers = [json.loads(line)["prompt"] for line in (pref_data / "train.jsonl").read_text().splitlines()]
    assert all(numbers[held.numbers[i] - 1] == row["prompt"] for i, row in enumerate(held.rows))


# ---- end to end ----------------------------------------------------------------------------------------------------

CLI_RUNS = {
    "reward-lora": ({"name": "reward", "center_coefficient": 0.01}, None),
    "dpo-lora-disabled": ({"name": "dpo", "reference": "disabled"}, None),
    "dpo-full-copy": ({"name": "dpo"}, {"name": "full"}),
}


@pytest.mark.parametrize("case", CLI_RUNS)
def test_train_then_eval(case, tiny_llama, pref_data, tmp_path):
    """`ftune train` then `ftune eval` of the run: eval reproduces the final validation metrics."""
    objective, method = CLI_RUNS[case]
    doc = pref_recipe_doc(tiny_llama, pref_data, tmp_path / "run", objective, method, lr=5e-3)
    result = runner.invoke(app, ["train", str(write_recipe(tmp_path / "recipe.yaml", doc))])
    assert result.exit_code == 0, result.output
    final = json.loads((tmp_path / "run" / "metrics.json").read_text())["validation"]
    scored = runner.invoke(app, ["eval", str(tmp_path / "run")])
    assert scored.exit_code == 0, scored.output
    metrics = json.loads(scored.stdout)
    accuracy = "accuracy" if objective["name"] == "reward" else "rewards/accuracies"
    assert metrics[accuracy] == final[accuracy] and metrics["loss"] == pytest.approx(final["loss"], rel=1e-5)
    assert final["pairs"] == 8
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["label_names"] == (["reward"] if objective["name"] == "reward" else None)


def test_precomputed_reference_resumes_exactly(recipe_of, tmp_path):
    """A run stopped after a checkpoint and resumed ends bitwise equal to the uninterrupted one: the precomputed
    reference log-probs are recomputed to the same values."""
    objective = {"name": "dpo", "precompute_reference": True}
    recipe = recipe_of(objective, max_steps=6, save_every=2, keep_checkpoints=3, eval_every=2, lr=5e-3)
    run = Path(recipe.output_dir)
    train(recipe)
    weights, log = load_file(run / "method.safetensors"), (run / "metrics.jsonl").read_text()
    shutil.rmtree(run / "checkpoints" / "step-00000006")
    assert latest_checkpoint(run).name == "step-00000004"
    train(recipe, resume=True)
    resumed = load_file(run / "method.safetensors")
    assert all((resumed[k] == v).all() for k, v in weights.items())

    def without_timing(text):
        return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in text.splitlines()]

    assert without_timing((run / "metrics.jsonl").read_text()) == without_timing(log)


# ---- bad input: one line, nothing written --------------------------------------------------------------------------


def _missing_rejected(doc, tmp):
    rows = [json.loads(line) for line in Path(doc["data"]["train"]).read_text().splitlines()]
    del rows[4]["rejected"]
    path = tmp / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    doc["data"]["train"] = str(path)
    return doc


BAD = {
    "row-missing-rejected": (_missing_rejected, 1, ["pairs.jsonl row 5", "'rejected'"]),
    "disabled-reference-of-full": (
        lambda d, t: d | {"method": {"name": "full"}, "objective": {"name": "dpo", "reference": "disabled"}},
        2,
        ["objective.reference", "full", "reference: copy"],
    ),
    "beta-zero": (lambda d, t: d | {"objective": {"name": "dpo", "beta": 0}}, 2, ["objective.beta", "greater than 0"]),
    "reward-without-pairs": (
        lambda d, t: d | {"task": "causal_lm", "objective": {"name": "reward"}},
        2,
        ["objective.name", "reward", "causal_lm", "preference pairs"],
    ),
    "orpo-with-reference": (
        lambda d, t: d | {"objective": {"name": "dpo", "loss": "orpo", "reference": "copy"}},
        2,
        ["objective", "orpo uses no reference"],
    ),
    "smoothing-of-ipo": (
        lambda d, t: d | {"objective": {"name": "dpo", "loss": "ipo", "label_smoothing": 0.1}},
        2,
        ["objective", "label_smoothing", "ipo"],
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input(case, tiny_llama, pref_data, tmp_path):
    build, code, needles = BAD[case]
    doc = build(pref_recipe_doc(tiny_llama, pref_data, tmp_path / "run"), tmp_path)
    recipe = write_recipe(tmp_path / "recipe.yaml", doc)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = runner.invoke(app, ["train", str(recipe)])
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.stderr
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert sorted(p.name for p in tmp_path.iterdir()) == before and not (tmp_path / "run").exists()


def test_dpo_on_a_model_without_a_causal_lm_head(tiny_t5, pref_data, tmp_path):
    """The policy is a causal LM: an encoder-decoder model is refused by name before anything is written."""
    recipe = write_recipe(tmp_path / "recipe.yaml", pref_recipe_doc(tiny_t5, pref_data, tmp_path / "run"))
    result = runner.invoke(app, ["train", str(recipe)])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert "model.name" in lines[0] and "T5Config" in lines[0] and not (tmp_path / "run").exists()


def test_registry_entry():
    assert TASKS["preference"].paired and not TASKS["causal_lm"].paired
