"""The recipe's sections below its top level (model, data, train, generation): each a pydantic model that rejects
unknown keys with a did-you-mean and coerces scalars; `Recipe` (ftune/recipe.py) holds them and checks what spans
sections."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ftune.models.quantize import Quantization
from ftune.step.optim import OPTIMIZERS
from ftune.tasks import TASKS
from ftune.trackers import TRACKERS, known_trackers

TaskName = Literal[tuple(TASKS)]  # the task registry's names (ftune/tasks/)
TrackerName = Literal[tuple(TRACKERS)]  # accelerate's trackers (ftune/trackers.py)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class ModelSpec(_Section):
    name: str
    """Local folder, Hugging Face Hub id, or an id served offline by an installed package (see README)."""
    gguf_file: str | None = None
    """A GGUF file inside `name` (or a path to one); dequantised on load and cached as safetensors."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the base weights are loaded in. Mixed precision is `train.precision`."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when `name` is a Hub id."""
    trust_remote_code: bool = False
    """Run modelling code shipped with a Hub model. Off unless you trust its author."""
    quantization: Quantization | None = None
    """Load the base linears 4- or 8-bit quantised through bitsandbytes (QLoRA); only methods that train weights
    outside them may use it (e.g. lora, adapters, head). Unquantised weights are kept in fp32.
    See ftune/models/quantize.py."""


class HubSource(_Section):
    hub: str
    """Hub dataset id, e.g. nyu-mll/glue."""
    config: str | None = None
    """Dataset configuration, e.g. sst2."""
    split: str
    """Split to read, e.g. train or validation."""


def _as_list(value: Any) -> Any:
    return value if isinstance(value, list) else [value]


Sources = Annotated[list[str | HubSource], BeforeValidator(_as_list), Field(min_length=1)]


class DataSpec(_Section):
    model_config = ConfigDict(validate_default=True)  # the column checks below compare defaults too

    train: Sources
    """Where the training rows come from: a file, a folder holding `train.*`, or a Hub source; a list is tried in
    order and the first available source is used (local copy first, Hub second)."""
    validation: Sources | None = None
    """Rows for evaluation, same forms as `train`."""
    validation_fraction: float | None = Field(None, gt=0, lt=1)
    """Instead of `validation`: hold out this share of the training rows for evaluation. Rows are grouped (preference
    pairs by prompt, so no prompt is on both sides; other tasks row by row) and the groups with the smallest
    hashes are held out: the split depends only on the data, the same in every run and in `ftune eval --split
    validation`. max_train_rows applies before the split, max_validation_rows to the held-out part."""
    text_column: str = "text"
    """Classification: column holding the input text."""
    text_pair_column: str | None = None
    """Classification: optional second text column (sentence pairs)."""
    label_column: str = "label"
    """Classification: column holding the label (an integer id or a class name)."""
    labels: list[str] | None = None
    """Classification: class names in id order; token classification: tag names in id order (needed when the
    tags are integer ids, e.g. the Hub's conll2003). Default: the sorted set of training labels (tags). Each name
    once. Training refuses a training set of a single class (tag), and a class that validation rows have but no
    training row; a class only this list names is said on the console (ftune/tasks/base.py: check_classes)."""
    tokens_column: str = "tokens"
    """Token classification: column holding a list of words per row (CoNLL .txt/.conll files fill it)."""
    tags_column: str = "ner_tags"
    """Token classification: column holding a list of tags per row, one per word: tag names (e.g. IOB2 B-PER)
    or integer ids into data.labels."""
    instruction_column: str = "instruction"
    """SFT: column with the instruction."""
    input_column: str | None = "input"
    """SFT: optional column with extra input appended to the instruction."""
    response_column: str = "output"
    """SFT: column with the response; only its tokens carry loss."""
    template: Literal["auto", "chat", "alpaca"] = "auto"
    """SFT and preference prompt format: the tokenizer's chat template (`auto` uses it when there is one), or
    Alpaca's."""
    prompt_column: str = "prompt"
    """Preference: column with the prompt (the user turn)."""
    chosen_column: str = "chosen"
    """Preference: column with the preferred completion."""
    rejected_column: str = "rejected"
    """Preference: column with the dispreferred completion."""
    source_column: str = "source"
    """Seq2seq: column with the input text (e.g. a document or dialogue to summarise)."""
    target_column: str = "target"
    """Seq2seq: column with the output text the decoder learns (e.g. the summary); its tokens carry the loss."""
    source_prefix: str = ""
    """Seq2seq: text put before every source, e.g. "summarize: " for T5."""
    max_target_length: int = Field(128, gt=0)
    """Seq2seq: target tokens per example after truncation (the source is cut to max_length)."""
    max_length: int = Field(128, gt=0)
    """Tokens per example after truncation."""
    allow_truncation: bool = False
    """Train even when data.max_length (seq2seq: also max_target_length) cuts more than 20% of a split's rows, or
    drops more than 5% (SFT rows whose prompt fills it, leaving no response token). Off: training is refused above
    those shares, naming the counts (ftune/tasks/checks.py). The counts are printed and kept in run.json either way."""
    max_train_rows: int | None = Field(None, gt=0)
    """Use only the first N training rows."""
    max_validation_rows: int | None = Field(None, gt=0)
    """Use only the first N validation rows."""
    packing: bool = False
    """Causal LM: put each micro-batch's sequences end to end in one row, without padding; attention stays inside
    each sequence (position ids restart per sequence) and the loss equals the unpacked batch's. Fastest with
    flash-attention kernels; on CPU (sdpa) train.group_by_length removes padding at less attention cost."""
    cache: bool = True
    """Keep the encoded examples on disk ($FTUNE_ENCODED_CACHE, else $FTUNE_CACHE/encoded, default
    ~/.cache/ftune/encoded), keyed by the data files, tokenizer and encoding settings, so the next run of the same
    data skips reading and tokenising it (local files only; Hub datasets are tokenised every run)."""

    @field_validator("labels")
    @classmethod
    def _each_label_once(cls, labels: list[str] | None) -> list[str] | None:
        """A name listed twice would give the head an output no row can have (and shift the ids after it)."""
        for i, label in enumerate(labels or []):
            if label in labels[:i]:
                raise ValueError(
                    f"{label!r} is listed twice (entries {labels.index(label) + 1} and {i + 1}); "
                    "name each class (tag) once, in id order"
                )
        return labels

    @field_validator(
        "text_pair_column",
        "label_column",
        "tags_column",
        "input_column",
        "response_column",
        "chosen_column",
        "rejected_column",
        "target_column",
    )
    @classmethod
    def _one_role_per_column(cls, name: str | None, info: ValidationInfo) -> str | None:
        """Within one task's columns, each role reads its own column: a pair whose chosen and rejected text are one
        column has nothing to prefer (DPO's loss stays at log 2), an SFT response that is its instruction is copied."""
        roles = (
            ("text_column", "text_pair_column", "label_column"),
            ("tokens_column", "tags_column"),
            ("instruction_column", "input_column", "response_column"),
            ("prompt_column", "chosen_column", "rejected_column"),
            ("source_column", "target_column"),
        )
        group = next(g for g in roles if info.field_name in g)
        for earlier in group[: group.index(info.field_name)]:
            if name is not None and info.data.get(earlier) == name:
                raise ValueError(f"names column {name!r}, as data.{earlier} does; each role reads its own column")
        return name


class TrainSpec(_Section):
    epochs: float = Field(1.0, gt=0)
    """Passes over the training data; ignored when max_steps is set."""
    max_steps: int | None = Field(None, gt=0)
    """Optimizer steps to run (overrides epochs)."""
    max_seconds: float | None = Field(None, gt=0)
    """Stop once training has run this long (seconds, evaluations included; a resumed run counts its earlier time),
    then evaluate and save as at the end. The schedule still spans max_steps or epochs
    (`ftune compare --budget 600s`)."""
    lr: float = Field(2e-4, gt=0)
    """Peak learning rate (AdamW)."""
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    """Decay after warmup."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warmup steps (takes precedence over warmup_ratio)."""
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    """Warmup as a fraction of all optimizer steps."""
    batch_size: int = Field(16, gt=0)
    """Examples per micro-batch, on each process (batch_scope: per_device) or over all of them (global)."""
    distributed: Literal["ddp", "fsdp"] = "ddp"
    """With several processes: ddp (each holds the whole model; gradients averaged) or fsdp (FSDP2: parameters,
    gradients and optimizer state sharded, one unit per transformer block; CUDA GPUs only). See README."""
    batch_scope: Literal["per_device", "global"] = "per_device"
    """Whether batch_size counts one process's examples or all processes' together (it must then divide by the
    number of processes). run.json records the global batch: batch per device × processes × grad_accum."""
    eval_batch_size: int | None = Field(None, gt=0)
    """Examples per evaluation batch (default: 2 x batch_size)."""
    grad_accum: int = Field(1, gt=0)
    """Micro-batches per optimizer step."""
    weight_decay: float = Field(0.0, ge=0.0)
    """AdamW decoupled weight decay."""
    optimizer: Literal[OPTIMIZERS] = "adamw"
    """adamw (torch), or bitsandbytes' adamw_8bit (8-bit moments), paged_adamw_8bit, paged_adamw_32bit, paged_adamw
    (= paged_adamw_32bit): paged states move to CPU memory under GPU memory pressure (on CPU they are not paged)."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip the gradient norm to this; null disables clipping."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A NaN/inf loss or gradient norm: stop the run naming the step (the last checkpoint stays intact), or skip
    that optimizer step (its data is consumed, nothing is applied; counted as skipped_steps in the metrics)."""
    seed: int = 0
    """Seeds initialisation, data order and dropout."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Mixed precision; auto = bf16 on a GPU that supports it, fp32 otherwise."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    group_by_length: bool = True
    """Put rows of similar length in the same optimizer step (sorted within megabatches of 50 steps, steps in
    random order), which removes most padding; the order still depends only on the seed, so resuming is exact."""
    compile: Literal["auto"] | bool = "auto"
    """torch.compile the model: auto = on a CUDA GPU when torch can (not sharded, not quantized), off on CPU;
    true = try anywhere; when not used, the run says why."""
    log_every: int = Field(10, gt=0)
    """Optimizer steps between metrics.jsonl lines."""
    eval_every: int | None = Field(None, gt=0)
    """Optimizer steps between evaluations (always evaluated at the end)."""
    save_every: int | None = Field(None, gt=0)
    """Optimizer steps between resumable checkpoints (always saved at the end)."""
    keep_checkpoints: int = Field(1, gt=0)
    """Resumable checkpoints kept; older ones are deleted."""
    best_metric: str | None = None
    """Validation metric that picks the saved weights (e.g. accuracy, loss); default: the last weights."""
    best_mode: Literal["max", "min"] | None = None
    """Whether a larger or smaller best_metric is better; default (null) from its name: min for a loss-like metric
    (loss, perplexity, ppl, mse, mae, rmse, or a name ending in _loss or /loss), max otherwise (and max without a
    best_metric). The resolved recipe (recipe.yaml, `ftune validate`) shows the value used."""
    report_to: Annotated[list[TrackerName], BeforeValidator(known_trackers)] = []
    """Experiment trackers that also get metrics.jsonl's values (accelerate's): tensorboard (event files under
    <output_dir>/tracking/), wandb, mlflow, comet_ml, aim, clearml, dvclive, swanlab, trackio; each needs its
    package."""

    @model_validator(mode="before")
    @classmethod
    def _infer_best_mode(cls, data: Any) -> Any:
        # filled in before validation, so the frozen spec and dump_recipe hold the mode the loop uses; a metric
        # of the wrong type is left to the field's own error
        if not isinstance(data, dict) or data.get("best_mode") is not None:
            return data
        metric = data.get("best_metric")
        return {**data, "best_mode": best_mode_for(metric)} if isinstance(metric, str | None) else data


LOSS_LIKE = ("loss", "perplexity", "ppl", "mse", "mae", "rmse")
"""Metric names where smaller is better (train.best_mode's default: min); also any name ending in _loss or /loss."""


def best_mode_for(metric: str | None) -> Literal["max", "min"]:
    """train.best_mode's default for `metric`: "min" for a loss-like name (LOSS_LIKE), else "max"."""
    name = (metric or "").strip().lower()
    return "min" if name in LOSS_LIKE or name.endswith(("_loss", "/loss")) else "max"


class GenerationSpec(_Section):
    """How a generating task (seq2seq) produces text, in validation (ROUGE) and `ftune predict`: greedy or beam
    search."""

    max_new_tokens: int = Field(64, gt=0)
    """Tokens generated per row at most."""
    num_beams: int = Field(1, gt=0)
    """Beam width; 1 is greedy decoding."""
    length_penalty: float = 1.0
    """Beam search: exponent of the length normalisation; above 1 favours longer outputs."""
    no_repeat_ngram_size: int = Field(0, ge=0)
    """Never repeat an n-gram of this size (0: no constraint)."""
