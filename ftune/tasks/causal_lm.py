"""Causal language modelling on instructions (SFT): prompt + response, the loss on the response tokens only.

Rows hold an instruction, an optional input and a response (data.*_column). The prompt is the tokenizer's chat
template when it has one (data.template: auto), else Alpaca's. Token i predicts token i + 1; prompt and padding
positions carry no loss. Metrics: the mean cross-entropy per response token, its perplexity, and the token count.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ftune.data.sources import Rows, text_column
from ftune.errors import DataError
from ftune.kernels.linear_ce import linear_cross_entropy
from ftune.tasks.base import IGNORE_INDEX, Encoded, Task, token_loss

ALPACA = (
    "Below is an instruction that describes a task{with_input}. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
)


def encode_sft(
    rows: Rows,
    tokenizer,
    instruction_column: str,
    input_column: str | None,
    response_column: str,
    template: str,
    max_length: int,
) -> tuple[list[dict[str, Any]], int, int]:
    """Prompt + response token ids; only response tokens (and the closing EOS) carry loss.

    Returns the examples, the number of rows dropped because truncation left no response token, and the number
    of rows kept but cut to `max_length`.
    """
    instructions = text_column(rows, instruction_column, "instruction_column")
    responses = text_column(rows, response_column, "response_column")
    has_input = input_column and input_column in rows.rows[0]
    inputs = text_column(rows, input_column, "input_column") if has_input else None
    use_chat = template == "chat" or (template == "auto" and tokenizer.chat_template is not None)
    if template == "chat" and tokenizer.chat_template is None:
        raise DataError("data.template: chat, but the tokenizer has no chat template; use alpaca")
    examples, dropped, truncated = [], 0, 0
    for i, (instruction, response) in enumerate(zip(instructions, responses)):
        extra = inputs[i] if inputs else ""
        if use_chat:
            user = [{"role": "user", "content": instruction + (f"\n\n{extra}" if extra else "")}]
            prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
            answer = full[len(prompt) :] if full.startswith(prompt) else response + tokenizer.eos_token
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        else:
            prompt = ALPACA.format(with_input=", paired with an input" if extra else "", instruction=instruction)
            prompt += (f"### Input:\n{extra}\n\n" if extra else "") + "### Response:\n"
            prompt_ids = tokenizer(prompt)["input_ids"]
            answer_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (prompt_ids + answer_ids)[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:max_length]
        if all(y == IGNORE_INDEX for y in labels):
            dropped += 1
            continue
        truncated += len(prompt_ids) + len(answer_ids) > max_length
        examples.append({"input_ids": ids, "labels": labels})
    if not examples:
        raise DataError(f"{rows.source}: every row's prompt fills data.max_length={max_length}; raise it")
    return examples, dropped, truncated


def encode(rows: Rows, tokenizer, spec, names: None = None) -> Encoded:
    examples, dropped, truncated = encode_sft(
        rows,
        tokenizer,
        spec.instruction_column,
        spec.input_column,
        spec.response_column,
        spec.template,
        spec.max_length,
    )
    return Encoded(examples, rows.source, dropped, truncated)


def loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy: logits (B, T, V) at position i against labels at i + 1."""
    return token_loss(logits[:, :-1], labels[:, 1:])


def hidden_loss(hidden: torch.Tensor, output_layer, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`loss` from the final hidden states (B, T, d): the output layer is applied only at the positions whose next
    token carries loss (SFT: the response, a few percent of the tokens), in chunks (linear_ce)."""
    targets = labels[:, 1:]
    kept = targets != IGNORE_INDEX
    total = linear_cross_entropy(hidden[:, :-1][kept], output_layer.weight, output_layer.bias, targets[kept])
    return total, kept.sum()


def count(labels: torch.Tensor) -> torch.Tensor:
    return (labels[:, 1:] != IGNORE_INDEX).sum()


class Scorer:
    def __init__(self, names: None = None) -> None:
        self.loss_sum, self.tokens = 0.0, 0

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        total, n = loss(logits, labels)
        self.loss_sum += float(total)
        self.tokens += int(n)

    def merge(self, other: Scorer) -> None:
        self.loss_sum += other.loss_sum
        self.tokens += other.tokens

    def result(self) -> dict[str, float]:
        mean = self.loss_sum / max(self.tokens, 1)
        return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "tokens": self.tokens}


TASK = Task(
    name="causal_lm",
    summary="SFT: next-token loss on the response tokens of instruction rows (loss, perplexity)",
    model_class="AutoModelForCausalLM",
    peft_task_type="CAUSAL_LM",
    encode=encode,
    loss=loss,
    count=count,
    scorer=Scorer,
    next_token=True,
    hidden_loss=hidden_loss,
    packs=True,
)
