"""`ftune label-pairs`: preference pairs from AI feedback (RLAIF: Bai et al. 2022, "Constitutional AI"; Lee et al.
2023, "RLAIF: Scaling Reinforcement Learning from Human Feedback with AI Feedback").

For each prompt of a file, two completions are sampled from a trained causal-LM run (seeded per prompt, so a rerun
writes the same pairs), a judge picks the better one (ftune/serve/judges.py: a reward-model run, or a causal-LM run
asked a pairwise question in both orders), and a row `{prompt, chosen, rejected, judge}` is written: the rows
`task: preference` trains DPO on directly. Pairs the judge cannot decide are dropped and counted by reason.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftune.errors import DataError, RunDirError
from ftune.serve.judges import Judge, PairwiseJudge, RewardJudge, Verdict, chat_prompt


@dataclass(frozen=True)
class Sampling:
    """How the policy samples its two completions per prompt."""

    seed: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64


@dataclass
class Labelled:
    rows: list[dict[str, Any]]
    dropped: Counter = field(default_factory=Counter)
    """Prompts without a row, by reason (identical completions, or the judge's reason)."""


def read_prompts(path: Path, column: str = "prompt") -> list[str]:
    """The `column` of a JSONL file, one prompt per row (DataError naming the row otherwise)."""
    if not path.is_file():
        raise DataError(f"{path}: no such prompts file; give a JSONL file with a {column!r} field per row")
    prompts = []
    for i, line in enumerate(path.read_text(encoding="utf-8", errors="strict").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {i}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get(column), str) or not row[column].strip():
            raise DataError(f"{path} line {i}: no text in {column!r}; every row needs a prompt (--prompt-column)")
        prompts.append(row[column])
    if not prompts:
        raise DataError(f"{path}: holds no prompts")
    return prompts


def sample_pair(model, tokenizer, prompt: str, sampling: Sampling, index: int) -> tuple[str, str]:
    """Two completions of `prompt` sampled from `model`, seeded by (sampling.seed, index): the same file and seed
    give the same pairs whatever else is labelled alongside."""
    import torch

    ids = tokenizer(chat_prompt(tokenizer, prompt), return_tensors="pt", add_special_tokens=False)
    torch.manual_seed(sampling.seed * 1_000_003 + index)
    with torch.no_grad():
        out = model.generate(
            **ids.to(model.device),
            do_sample=True,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_new_tokens=sampling.max_new_tokens,
            num_return_sequences=2,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
    new = out[:, ids["input_ids"].shape[1] :]
    first, second = tokenizer.batch_decode(new, skip_special_tokens=True)
    return first.strip(), second.strip()


def label(prompts: list[str], model, tokenizer, judge: Judge, sampling: Sampling, policy: str) -> Labelled:
    """Sample a pair per prompt and keep the pairs `judge` decides, with the judge's provenance on each row."""
    result = Labelled(rows=[])
    for i, prompt in enumerate(prompts):
        a, b = sample_pair(model, tokenizer, prompt, sampling, i)
        if a == b:
            result.dropped["identical completions"] += 1
            continue
        verdict: Verdict = judge.decide(prompt, a, b)
        if verdict.winner is None:
            result.dropped[verdict.reason] += 1
            continue
        chosen, rejected = (a, b) if verdict.winner == 0 else (b, a)
        result.rows.append(
            {
                "prompt": prompt,
                "chosen": chosen,
                "rejected": rejected,
                "judge": {"kind": judge.kind, "run": judge.source, **verdict.detail},
                "policy": {
                    "run": policy,
                    "seed": sampling.seed,
                    "index": i,
                    "temperature": sampling.temperature,
                    "top_p": sampling.top_p,
                    "max_new_tokens": sampling.max_new_tokens,
                },
            }
        )
    return result


def write_rows(path: Path, rows: list[dict[str, Any]], overwrite: bool) -> None:
    """JSONL through a temporary file and a rename: a file already there is replaced only with --overwrite, and
    never left half written."""
    if path.exists() and not overwrite:
        raise RunDirError(f"{path}: already exists; choose another --out or pass --overwrite")
    if path.parent and not path.parent.is_dir():
        raise RunDirError(f"{path.parent}: no such directory for --out")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)


def judge_of(kind: str, where: str, trust_remote_code: bool = False) -> Judge:
    """A reward-model run (`kind` reward) or a causal-LM run or model (`kind` llm) as a judge."""
    if kind == "reward":
        return RewardJudge(reward_scorer(where, trust_remote_code), where)
    from ftune.serve.judges import greedy_answerer

    model, tokenizer = causal_lm_of(where, "--judge", trust_remote_code)
    return PairwiseJudge(greedy_answerer(model, tokenizer), where)


def reward_scorer(run_dir: str | Path, trust_remote_code: bool = False):
    """`(prompt, completions) -> rewards` of a finished reward-model run (RunDirError for another kind of run)."""
    from functools import partial

    from ftune import assemble
    from ftune.objectives import reward

    recipe, model, tokenizer = assemble.load_run(run_dir, trust_remote_code)
    if recipe.objective.name != reward.OBJECTIVE.name:
        raise RunDirError(
            f"{run_dir}: trained objective {recipe.objective.name}, not a reward model "
            f"(objective: {{name: {reward.OBJECTIVE.name}}})"
        )
    return partial(reward.score_completions, model.eval(), tokenizer, recipe.data)


def causal_lm_of(where: str, option: str, trust_remote_code: bool = False):
    """(model in eval mode, tokenizer) of a finished run whose model generates text, or of a plain causal LM."""
    from ftune import assemble, models, rundir
    from ftune.tasks.causal_lm import TASK as SAMPLER  # a plain model samples as the SFT task loads it

    if (Path(where) / rundir.RECORD).is_file():
        recipe, model, tokenizer = assemble.load_run(where, trust_remote_code)
        if assemble.recipe_task(recipe).model_class != SAMPLER.model_class:
            raise RunDirError(
                f"{option} {where}: a {recipe.task} run does not generate text; give a causal_lm "
                "(or preference-tuned) run"
            )
        return model.eval(), tokenizer
    source = models.resolve_model(where)
    model, _ = models.load_model(SAMPLER, source)
    return model.eval(), models.load_tokenizer(source)
