"""Preference pairs: a prompt with a chosen and a rejected completion, for reward models and DPO-style objectives.

Rows hold `data.prompt_column`, `data.chosen_column` and `data.rejected_column` (default prompt, chosen, rejected,
as `Anthropic/hh-rlhf`-style sets and TRL's "explicit prompt" format write them). Each completion follows the prompt
as SFT formats it (ftune/tasks/causal_lm.py): the tokenizer's chat template with the prompt as the user turn and the
completion as the assistant's (data.template: auto), else Alpaca's prompt. Only completion tokens (and the closing
end-of-turn) carry labels; prompt and padding positions are IGNORE_INDEX.

A pair that does not fit data.max_length loses prompt tokens from its start (the end, next to the answer, is kept,
as TRL's keep_end), down to half of max_length, then completion tokens from their end; both completions keep the
same prompt tokens. Such pairs are counted as truncated; none is dropped.

A pair whose chosen and rejected completions come out as the same tokens carries no preference (DPO's loss sits at
log 2 with no gradient; a tie scores as a wrong pair): such pairs are named on the console, and a split where more
than MAX_IDENTICAL_SHARE of the pairs are such is refused (`check`). Mapping one column to both is a recipe error.

A batch of B pairs is 2B rows: the chosen sequences first, then the rejected ones in the same order (`Task.paired`).
The task's own loss (objective: task) is SFT on the chosen completions; its metrics add the policy's log-probs of
both completions and how often the chosen one is likelier per token. Preference objectives (ftune/objectives/reward.py,
dpo.py) read the same batches.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ftune.data.sources import Rows, text_column
from ftune.errors import DataError
from ftune.tasks.base import IGNORE_INDEX, Encoded, Task, token_loss
from ftune.tasks.causal_lm import ALPACA

MAX_IDENTICAL_SHARE = 0.05
"""Pairs with nothing to prefer a split may hold: a few ties happen in collected preference data; beyond this share a
column or an export is wrong (the same cap as data.max_length's dropped rows: rows that teach nothing)."""


def uses_chat(tokenizer, template: str) -> bool:
    """Whether prompts go through the tokenizer's chat template (data.template), else Alpaca's format."""
    if template == "chat" and tokenizer.chat_template is None:
        raise DataError("data.template: chat, but the tokenizer has no chat template; use alpaca")
    return template == "chat" or (template == "auto" and tokenizer.chat_template is not None)


def prompt_ids(tokenizer, prompt: str, chat: bool) -> list[int]:
    """Token ids of `prompt` as the user turn, ready for the assistant's answer."""
    if chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(ALPACA.format(with_input="", instruction=prompt) + "### Response:\n")["input_ids"]


def completion_ids(tokenizer, prompt: str, completion: str, chat: bool) -> list[int]:
    """Token ids of `completion` as the assistant's answer to `prompt`, with its end-of-turn (the chat template's
    closing tokens, or EOS)."""
    if not chat:
        return tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    user = [{"role": "user", "content": prompt}]
    head = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": completion}], tokenize=False)
    answer = full[len(head) :] if full.startswith(head) else completion + tokenizer.eos_token
    return tokenizer(answer, add_special_tokens=False)["input_ids"]


def fit(prompt: list[int], completions: list[list[int]], max_length: int) -> tuple[list[int], list[list[int]], bool]:
    """Cut a prompt and its completions to `max_length` tokens per sequence (see the module's docstring); returns
    them and whether anything was cut."""
    longest = max(len(c) for c in completions)
    if len(prompt) + longest <= max_length:
        return prompt, completions, False
    keep = min(len(prompt), max(max_length - longest, max_length // 2))
    room = max_length - keep
    return prompt[len(prompt) - keep :], [c[:room] for c in completions], True


def sequence(prompt: list[int], completion: list[int]) -> dict[str, list[int]]:
    """One row: prompt + completion ids, labels only on the completion."""
    return {"input_ids": prompt + completion, "labels": [IGNORE_INDEX] * len(prompt) + completion}


def encode(rows: Rows, tokenizer, spec, names: None = None) -> Encoded:
    """One example per row: {"input_ids": [chosen ids, rejected ids], "labels": [chosen labels, rejected labels]}
    (the loader stacks the members of a batch's pairs, chosen first)."""
    prompts = text_column(rows, spec.prompt_column, "prompt_column", blank_ok=False)
    chosen = text_column(rows, spec.chosen_column, "chosen_column", blank_ok=False)
    rejected = text_column(rows, spec.rejected_column, "rejected_column", blank_ok=False)
    chat = uses_chat(tokenizer, spec.template)
    examples, truncated = [], 0
    for prompt, good, bad in zip(prompts, chosen, rejected):
        head = prompt_ids(tokenizer, prompt, chat)
        answers = [completion_ids(tokenizer, prompt, text, chat) for text in (good, bad)]
        head, answers, cut = fit(head, answers, spec.max_length)
        truncated += cut
        pair = [sequence(head, answer) for answer in answers]
        examples.append({key: [member[key] for member in pair] for key in ("input_ids", "labels")})
    return Encoded(examples, rows.source, 0, truncated)


def check(train: Encoded, validation: Encoded | None, names: None, spec) -> list[str]:
    """Pairs whose chosen and rejected sequences are the same tokens (the same text, or cut to the same tokens by
    data.max_length), per split: a line naming them, or a DataError above MAX_IDENTICAL_SHARE."""
    lines = []
    for part in (train, validation):
        same = [i + 1 for i, e in enumerate(part.examples) if e["input_ids"][0] == e["input_ids"][1]] if part else []
        if not same:
            continue
        shown = ", ".join(map(str, same[:5])) + (", ..." if len(same) > 5 else "")
        what = (
            f"{part.source}: {len(same)} of {len(part.examples)} pairs have the same chosen and rejected "
            f"tokens (pairs {shown}), so they carry no preference"
        )
        if len(same) > MAX_IDENTICAL_SHARE * len(part.examples):
            raise DataError(
                f"{what}; more than {MAX_IDENTICAL_SHARE:.0%} of the split: check data.chosen_column and "
                "data.rejected_column name the two completions, and drop the ties"
            )
        lines.append(f"warning: {what}")
    return lines


def completion_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the summed log-probability of its completion tokens and their number.

    logits (N, T, V) at position i predict the token at i + 1; labels (N, T) with IGNORE_INDEX off the completion.
    Returns (N,) fp32 sums and (N,) counts. The log-softmax is taken as logit - logsumexp, in fp32, without
    materialising the (N, T, V) log-probabilities twice.
    """
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != IGNORE_INDEX
    picked = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    logps = (picked - torch.logsumexp(logits, dim=-1)) * mask
    return logps.sum(-1), mask.sum(-1)


def pairs_in(labels: torch.Tensor) -> int:
    """Pairs in a batch of `labels` (2B rows)."""
    return labels.shape[0] // 2


def loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SFT on the chosen completions (rows 0..B-1): next-token cross-entropy summed, and the token count."""
    chosen = pairs_in(labels)
    return token_loss(logits[:chosen, :-1], labels[:chosen, 1:])


def count(labels: torch.Tensor) -> torch.Tensor:
    return (labels[: pairs_in(labels), 1:] != IGNORE_INDEX).sum()


class Scorer:
    """loss and perplexity per chosen token (the task's loss); per pair the mean summed log-probs of the chosen and
    rejected completions (logps/chosen, logps/rejected) and `accuracy`, the share of pairs whose chosen completion
    has the higher mean log-prob per token (length-normalised, as SimPO's reward)."""

    def __init__(self, names: None = None) -> None:
        self.loss_sum, self.tokens, self.pairs, self.correct = 0.0, 0, 0, 0
        self.logps_chosen, self.logps_rejected = 0.0, 0.0

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        total, n = loss(logits, labels)
        self.loss_sum += float(total)
        self.tokens += int(n)
        sums, counts = completion_logps(logits, labels)
        b = pairs_in(labels)
        means = sums / counts.clamp(min=1)
        self.pairs += b
        self.correct += int((means[:b] > means[b:]).sum())
        self.logps_chosen += float(sums[:b].sum())
        self.logps_rejected += float(sums[b:].sum())

    def merge(self, other: Scorer) -> None:
        for key, value in vars(other).items():
            setattr(self, key, getattr(self, key) + value)

    def result(self) -> dict[str, float]:
        mean, pairs = self.loss_sum / max(self.tokens, 1), max(self.pairs, 1)
        return {
            "loss": mean,
            "perplexity": math.exp(min(mean, 50.0)),
            "tokens": self.tokens,
            "pairs": self.pairs,
            "accuracy": self.correct / pairs,
            "logps/chosen": self.logps_chosen / pairs,
            "logps/rejected": self.logps_rejected / pairs,
        }


def holdout_key(row: dict[str, Any], spec) -> str:
    """Rows with the same prompt stay on one side of data.validation_fraction's split."""
    return str(row.get(spec.prompt_column))


TASK = Task(
    name="preference",
    summary="preference pairs (prompt, chosen, rejected) for reward models and DPO/IPO/ORPO/SimPO (objective:)",
    model_class="AutoModelForCausalLM",
    peft_task_type="CAUSAL_LM",
    encode=encode,
    loss=loss,
    count=count,
    scorer=Scorer,
    next_token=True,
    paired=True,
    holdout_group=holdout_key,
    check=check,
)
