"""Judges for `ftune label-pairs` (ftune/serve/label_pairs.py): which of two completions of a prompt is better.

- `RewardJudge`: a reward-model run (`task: preference`, `objective: reward`) scores each completion; the higher
  score wins, equal scores decide nothing. Provenance: both scores.
- `PairwiseJudge`: a causal-LM run (or model) is asked which response is better, once as (A = first, B = second) and
  once swapped. Read back through the swap, the two answers must agree: an LLM judge prefers a position more often
  than chance (Zheng et al. 2023, "Judging LLM-as-a-judge", §3.3), and asking both orders cancels that. An answer
  naming neither letter is unusable; orders that disagree are position bias. Either drops the pair, counted by reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Protocol

from ftune.tasks.causal_lm import ALPACA

QUESTION = (
    "Which response answers the request better: helpful, honest and harmless?\n\n"
    "Request:\n{prompt}\n\nResponse A:\n{a}\n\nResponse B:\n{b}\n\n"
    "Answer with the single letter A or B."
)


@dataclass(frozen=True)
class Verdict:
    winner: int | None
    """0: the first completion, 1: the second, None: undecided (see `reason`)."""
    reason: str = ""
    detail: dict[str, Any] = field(default_factory=dict)


class Judge(Protocol):
    kind: str
    source: str

    def decide(self, prompt: str, first: str, second: str) -> Verdict: ...


def chat_prompt(tokenizer, text: str) -> str:
    """`text` as a user turn ready for the assistant's answer: the chat template when the tokenizer has one, else
    Alpaca's prompt, as SFT formats it (ftune/tasks/causal_lm.py)."""
    if tokenizer.chat_template is not None:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
    return ALPACA.format(with_input="", instruction=text) + "### Response:\n"


@dataclass
class RewardJudge:
    """The completion a reward model scores higher; `score(prompt, completions) -> list[float]`."""

    score: Any
    source: str
    kind: str = "reward_model"

    def decide(self, prompt: str, first: str, second: str) -> Verdict:
        s1, s2 = self.score(prompt, [first, second])
        detail = {"scores": [round(s1, 6), round(s2, 6)]}
        if s1 == s2:
            return Verdict(None, "equal reward scores", detail)
        return Verdict(0 if s1 > s2 else 1, detail=detail)


@dataclass
class PairwiseJudge:
    """A causal LM asked `QUESTION` in both orders; `answer(text) -> str` is its greedy reply to one question."""

    answer: Any
    source: str
    kind: str = "llm_pairwise"

    def decide(self, prompt: str, first: str, second: str) -> Verdict:
        asked = self.answer(QUESTION.format(prompt=prompt, a=first, b=second))
        swapped = self.answer(QUESTION.format(prompt=prompt, a=second, b=first))
        letters = _letter(asked), _letter(swapped)
        detail = {"answers": [asked, swapped]}
        if None in letters:
            return Verdict(None, "unusable judge answer", detail)
        # through the swap: "A" in the swapped question is the second completion
        picks = ("AB".index(letters[0]), 1 - "AB".index(letters[1]))
        if picks[0] != picks[1]:
            return Verdict(None, "position bias (the orders disagree)", detail)
        return Verdict(picks[0], detail=detail)


def _letter(text: str) -> str | None:
    """The judge's choice: the first standalone A or B of its answer."""
    found = re.search(r"\b([AB])\b", text)
    return found.group(1) if found else None


def greedy_answerer(model, tokenizer, max_new_tokens: int = 8):
    """`text -> reply` of a causal LM, greedy, the question as a user turn."""
    import torch

    def answer(text: str) -> str:
        ids = tokenizer(chat_prompt(tokenizer, text), return_tensors="pt", add_special_tokens=False).to(model.device)
        with torch.no_grad():
            out = model.generate(
                **ids,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            )
        return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()

    return answer
