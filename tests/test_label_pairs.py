"""RLAIF: `ftune label-pairs` samples two completions per prompt from a causal-LM run and keeps the judge's choice."""

from __future__ import annotations

import json

import pytest

from ftune.serve.judges import QUESTION, PairwiseJudge, RewardJudge
from ftune.serve.label_pairs import Sampling, label, read_prompts, write_rows


def _known_answerer(prefer: str, bias: str | None = None, garbage: bool = False):
    """A judge whose choice is known in advance: it answers the letter of the response containing `prefer`
    (or always `bias`, a judge that only looks at positions; or text naming neither letter)."""

    def answer(text: str) -> str:
        if garbage:
            return "I cannot decide."
        if bias:
            return bias
        a = text.split("Response A:\n", 1)[1].split("\n\nResponse B:", 1)[0]
        return "A" if prefer in a else "B"

    return answer


def test_pairwise_judge_undoes_the_swap():
    judge = PairwiseJudge(_known_answerer("good"), "fake")
    assert judge.decide("p", "a good one", "a bad one").winner == 0
    assert judge.decide("p", "a bad one", "a good one").winner == 1
    biased = PairwiseJudge(_known_answerer("good", bias="A"), "fake").decide("p", "good", "bad")
    assert biased.winner is None and biased.reason.startswith("position bias")
    unusable = PairwiseJudge(_known_answerer("good", garbage=True), "fake").decide("p", "good", "bad")
    assert unusable.winner is None and unusable.reason == "unusable judge answer"


def test_question_names_both_responses():
    text = QUESTION.format(prompt="P", a="first", b="second")
    assert "Response A:\nfirst" in text and "Response B:\nsecond" in text


def test_reward_judge_picks_the_higher_score():
    judge = RewardJudge(lambda prompt, completions: [float(len(c)) for c in completions], "rm")
    verdict = judge.decide("p", "short", "much longer")
    assert verdict.winner == 1 and verdict.detail["scores"] == [5.0, 11.0]
    assert judge.decide("p", "abc", "xyz").winner is None


def test_label_rows_follow_the_judge(tiny_llama):
    from ftune import models
    from ftune.tasks import TASKS

    model, _ = models.load_model(TASKS["causal_lm"], str(tiny_llama))
    tokenizer = models.load_tokenizer(str(tiny_llama))
    judge = RewardJudge(lambda prompt, completions: [float(len(c)) for c in completions], "rm")
    prompts = ["repeat the word good", "repeat the word bad", "say something"]
    sampling = Sampling(seed=3, temperature=1.0, max_new_tokens=6)
    first = label(prompts, model.eval(), tokenizer, judge, sampling, "policy-run")
    again = label(prompts, model, tokenizer, judge, sampling, "policy-run")
    assert first.rows == again.rows  # seeded per prompt: the same pairs
    assert len(first.rows) + sum(first.dropped.values()) == len(prompts)
    for row in first.rows:
        assert len(row["chosen"]) > len(row["rejected"])  # the judge's known preference
        assert row["judge"]["scores"][0] != row["judge"]["scores"][1]
        assert row["policy"] == {
            "run": "policy-run",
            "seed": 3,
            "index": row["policy"]["index"],
            "temperature": 1.0,
            "top_p": 1.0,
            "max_new_tokens": 6,
        }
    assert first.rows, "the tiny policy sampled only identical pairs"


def test_read_prompts_names_the_bad_row(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"text": "b"}) + "\n")
    from ftune.errors import DataError

    with pytest.raises(DataError, match=r"line 2: no text in 'prompt'"):
        read_prompts(path)


def test_write_rows_never_replaces_without_overwrite(tmp_path):
    from ftune.errors import RunDirError

    out = tmp_path / "pairs.jsonl"
    out.write_text("keep\n")
    with pytest.raises(RunDirError, match="already exists"):
        write_rows(out, [{"prompt": "p"}], overwrite=False)
    assert out.read_text() == "keep\n"
    write_rows(out, [{"prompt": "p"}], overwrite=True)
    assert json.loads(out.read_text()) == {"prompt": "p"}


def _ftune(*args):
    from typer.testing import CliRunner

    from ftune.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_round_trip_reward_judge_then_dpo(tiny_llama, sft_data, pref_data, tmp_path):
    """RLAIF end to end: an SFT policy samples, a reward-model run judges, DPO trains on the written pairs."""
    import io

    from rich.console import Console

    from conftest import pref_recipe_doc, recipe_doc
    from ftune.recipe import validate_recipe
    from ftune.run.train import train
    from ftune.serve.label_pairs import reward_scorer as scorer_of_run

    quiet = Console(file=io.StringIO())
    policy, judge = tmp_path / "policy", tmp_path / "rm"
    train(validate_recipe(recipe_doc("sft", tiny_llama, sft_data, policy)), console=quiet)
    train(validate_recipe(pref_recipe_doc(tiny_llama, pref_data, judge, {"name": "reward"})), console=quiet)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"prompt": f"repeat the word {w}"}) + "\n"
            for w in ("good", "bad", "great", "awful", "nice", "poor")
        )
    )
    out = tmp_path / "pairs.jsonl"
    result = _ftune("label-pairs", policy, prompts, "--out", out, "--judge", judge, "--seed", 1, "--max-new-tokens", 6)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and "pairs of 6 prompts written" in result.output
    score = scorer_of_run(judge)
    for row in rows:  # the judge's provenance is the reward model's own scores, and the chosen one scored higher
        assert row["judge"]["kind"] == "reward_model" and row["judge"]["run"] == str(judge)
        chosen, rejected = score(row["prompt"], [row["chosen"], row["rejected"]])
        assert chosen > rejected
        assert sorted(row["judge"]["scores"]) == pytest.approx(sorted([chosen, rejected]), abs=1e-5)
    again = _ftune("label-pairs", policy, prompts, "--out", out, "--judge", judge)
    assert again.exit_code != 0 and "already exists" in again.output  # nothing replaced
    doc = pref_recipe_doc(tiny_llama, pref_data, tmp_path / "dpo", {"name": "dpo"})
    doc["data"]["train"] = str(out)
    metrics = train(validate_recipe(doc), console=quiet)
    assert metrics["step"] == 4 and "rewards/margins" in metrics["validation"]


def test_a_classifier_run_cannot_sample(tiny_bert, cls_data, tmp_path):
    import io

    from rich.console import Console

    from conftest import recipe_doc
    from ftune.recipe import validate_recipe
    from ftune.run.train import train

    run = tmp_path / "cls"
    train(validate_recipe(recipe_doc("cls", tiny_bert, cls_data, run)), console=Console(file=io.StringIO()))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "hello"}) + "\n")
    result = _ftune("label-pairs", run, prompts, "--out", tmp_path / "o.jsonl", "--judge", run)
    assert result.exit_code == 1 and "does not generate text" in result.output
    assert not (tmp_path / "o.jsonl").exists()


def test_llm_judge_answers_without_a_letter_are_dropped_and_counted(tiny_llama, tmp_path):
    """A plain model as the pairwise judge: the tiny model's vocabulary has no letter A or B, so every answer is
    unusable, every pair is dropped, and the count says why (an empty file is still written)."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"repeat the word {w}"}) + "\n" for w in ("good", "bad")))
    out = tmp_path / "pairs.jsonl"
    result = _ftune(
        "label-pairs",
        tiny_llama,
        prompts,
        "--out",
        out,
        "--judge",
        tiny_llama,
        "--judge-kind",
        "llm",
        "--max-new-tokens",
        5,
    )
    assert result.exit_code == 0, result.output
    assert out.read_text() == ""
    dropped = result.output.split("dropped: ", 1)[1]
    assert "unusable judge answer" in dropped or "identical completions" in dropped
    assert sum(int(part.split()[0]) for part in dropped.split(", ")) == 2
