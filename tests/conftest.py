"""Tiny models, tokenizers and data, built in-process (no Hub): a BERT-like encoder and a Llama-like decoder.

The data is learnable on purpose: a sentence's label is decided by its sentiment word, so a few steps of training
move the loss, and a broken method shows up as a loss that does not fall.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
POSITIVE, NEGATIVE = ["good", "great", "fine", "lovely", "superb"], ["bad", "awful", "poor", "dull", "weak"]
FILLER = ["the", "movie", "film", "was", "a", "plot", "really", "quite", "story", "actors", "and", "very"]
WORDS = POSITIVE + NEGATIVE + FILLER + ["say", "answer", "yes", "no", "word", "repeat", "please"]


def _sentence(rng: random.Random, positive: bool) -> str:
    words = rng.sample(FILLER, 4) + [rng.choice(POSITIVE if positive else NEGATIVE)]
    rng.shuffle(words)
    return " ".join(words)


def build_bert(folder: Path) -> Path:
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(folder / "vocab.txt"))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    BertForMaskedLM(config).save_pretrained(folder)  # a pretrained body; the classifier head is new on load
    tokenizer.save_pretrained(folder)
    return folder


def build_llama(folder: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS + [":", "#", "\n", ",", ".", "-"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="<pad>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _word_tokenizer(specials: list[str], template: str, **special_tokens):
    """A whitespace word-level fast tokenizer over WORDS that wraps every text in `template` (e.g. "$A </s>")."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(specials + WORDS + [".", ","])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=special_tokens["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, vocab[t]) for t in template.split() if t in vocab])
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special_tokens), len(vocab)


def build_t5(folder: Path) -> Path:
    """A tiny T5 (pre-norm, relative position buckets, tied embeddings) with T5's special ids: pad 0 (also the
    decoder start), </s> 1, <unk> 2; every text ends with </s>."""
    from transformers import T5Config, T5ForConditionalGeneration

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer, size = _word_tokenizer(["<pad>", "</s>", "<unk>"], "$A </s>", pad_token="<pad>", eos_token="</s>",
                                      unk_token="<unk>")
    torch.manual_seed(0)
    config = T5Config(vocab_size=size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_bart(folder: Path) -> Path:
    """A tiny BART (post-norm, learned positions, biases) with BART's special ids: <s> 0, <pad> 1, </s> 2 (also the
    decoder start), <unk> 3; every text is <s> ... </s>."""
    from transformers import BartConfig, BartForConditionalGeneration

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer, size = _word_tokenizer(["<s>", "<pad>", "</s>", "<unk>"], "<s> $A </s>", bos_token="<s>",
                                      pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    config = BartConfig(vocab_size=size, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                        bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2)
    BartForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory) -> Path:
    return build_t5(tmp_path_factory.mktemp("models") / "tiny-t5")


@pytest.fixture(scope="session")
def tiny_bart(tmp_path_factory) -> Path:
    return build_bart(tmp_path_factory.mktemp("models") / "tiny-bart")


@pytest.fixture(scope="session")
def s2s_data(tmp_path_factory) -> Path:
    """A learnable 'summarisation': the summary of a review is its sentiment word, "movie", and "plot" when the review
    mentions the plot (so targets differ in length and batches carry padding)."""
    folder = tmp_path_factory.mktemp("s2s")
    rng = random.Random(3)
    for split, n in (("train", 32), ("validation", 8)):
        with open(folder / f"{split}.jsonl", "w") as f:
            for i in range(n):
                sentiment = rng.choice(POSITIVE if i % 2 else NEGATIVE)
                words = rng.sample(FILLER, rng.randint(3, 7)) + [sentiment]
                rng.shuffle(words)
                summary = f"{sentiment} movie" + (" plot" if "plot" in words else "")
                f.write(json.dumps({"document": " ".join(words), "summary": summary}) + "\n")
    return folder


def s2s_recipe_doc(model: Path, data: Path, out: Path, method: dict | None = None, **train) -> dict:
    """A complete tiny seq2seq recipe reading `data`/{train,validation}.jsonl (document -> summary)."""
    return {
        "model": {"name": str(model)},
        "task": "seq2seq",
        "data": {"train": str(data / "train.jsonl"), "validation": str(data / "validation.jsonl"),
                 "source_column": "document", "target_column": "summary", "max_length": 32, "max_target_length": 8},
        "method": method or {"name": "lora", "r": 4, "alpha": 8},
        "train": {"max_steps": 4, "batch_size": 8, "lr": 1e-2, "log_every": 1, "seed": 0, **train},
        "generation": {"max_new_tokens": 6},
        "output_dir": str(out),
    }


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return build_bert(tmp_path_factory.mktemp("models") / "tiny-bert")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def wide_llama(tiny_llama, tmp_path_factory):
    """tiny_llama at width 64 (every linear's d_in and d_out a multiple of 64), for the 4-bit and 8-bit tests.
    bitsandbytes' CPU repack of a Linear4bit needs that: at tiny_llama's width 32 it crashes outright, here it goes
    through and training silently stalls, the failure the trap tests look for."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("models") / "wide-llama"
    shutil.copytree(tiny_llama, folder)
    config = LlamaConfig.from_pretrained(folder)
    config.hidden_size, config.intermediate_size, config.num_key_value_heads = 64, 128, config.num_attention_heads
    config.head_dim = 64 // config.num_attention_heads
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def cls_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cls")
    rng = random.Random(0)
    for split, n in (("train", 48), ("validation", 16)):
        rows = ["sentence\tlabel"] + [f"{_sentence(rng, i % 2 == 0)}\t{i % 2}" for i in range(n)]
        (folder / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture(scope="session")
def full_run(tiny_bert, cls_data, tmp_path_factory) -> Path:
    """A finished `full` run of the tiny BERT (2 steps, a checkpoint each), shared: tests read it or copy it, never
    change it (the bad-input catalogues snapshot it)."""
    from typer.testing import CliRunner

    from ftune.cli import app

    root = tmp_path_factory.mktemp("full-run")
    doc = recipe_doc("cls", tiny_bert, cls_data, root / "run", method={"name": "full"}, max_steps=2)
    result = CliRunner().invoke(app, ["train", str(write_recipe(root / "recipe.yaml", doc))])
    assert result.exit_code == 0, result.output
    return root / "run"


@pytest.fixture(scope="session")
def sft_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sft")
    rng = random.Random(1)
    for split, n in (("train", 32), ("validation", 8)):
        with open(folder / f"{split}.jsonl", "w") as f:
            for _ in range(n):
                word = rng.choice(POSITIVE + NEGATIVE)
                row = {"instruction": "repeat the word", "input": word, "output": f"{word} {word}"}
                f.write(json.dumps(row) + "\n")
    return folder


@pytest.fixture(scope="session")
def adapter_runs(tiny_bert, tiny_llama, cls_data, tmp_path_factory) -> dict[str, list[Path]]:
    """Two finished stage-1 `adapter` runs (placement pfeiffer) per tiny architecture, for AdapterFusion.

    Different seeds and learning rates, so the two adapters of an architecture differ.
    """
    import io

    from rich.console import Console

    from ftune.recipe import validate_recipe
    from ftune.run.train import train

    root, runs = tmp_path_factory.mktemp("adapter-runs"), {}
    for arch, model in (("bert", tiny_bert), ("llama", tiny_llama)):
        runs[arch] = []
        for k, (seed, lr) in enumerate(((0, 1e-2), (1, 3e-2))):
            method = {"name": "adapter", "placement": "pfeiffer", "bottleneck": 8}
            doc = recipe_doc("cls", model, cls_data, root / f"{arch}-{k}", method, seed=seed, lr=lr)
            train(validate_recipe(doc), console=Console(file=io.StringIO()))
            runs[arch].append(root / f"{arch}-{k}")
    return runs


@pytest.fixture(scope="session")
def s2s_adapter_runs(tiny_t5, tiny_bart, s2s_data, tmp_path_factory) -> dict[str, list[Path]]:
    """As `adapter_runs`, for the tiny T5 and BART on the seq2seq data: two stage-1 runs each (adapters in both
    stacks), with different seeds and learning rates."""
    import io

    from rich.console import Console

    from ftune.recipe import validate_recipe
    from ftune.run.train import train

    root, runs = tmp_path_factory.mktemp("s2s-adapter-runs"), {}
    for arch, model in (("t5", tiny_t5), ("bart", tiny_bart)):
        runs[arch] = []
        for k, (seed, lr) in enumerate(((0, 1e-2), (1, 3e-2))):
            method = {"name": "adapter", "placement": "pfeiffer", "bottleneck": 8}
            doc = s2s_recipe_doc(model, s2s_data, root / f"{arch}-{k}", method, seed=seed, lr=lr)
            train(validate_recipe(doc), console=Console(file=io.StringIO()))
            runs[arch].append(root / f"{arch}-{k}")
    return runs


def recipe_doc(kind: str, model: Path, data: Path, out: Path, method: dict | None = None, **train) -> dict:
    """A complete tiny recipe: `kind` is "cls" (sequence classification) or "sft" (causal LM)."""
    ext = "tsv" if kind == "cls" else "jsonl"
    doc = {
        "model": {"name": str(model)},
        "task": "sequence_classification" if kind == "cls" else "causal_lm",
        "data": {"train": str(data / f"train.{ext}"), "validation": str(data / f"validation.{ext}"),
                 "max_length": 32 if kind == "cls" else 128},
        "method": method or {"name": "lora", "r": 4, "alpha": 8},
        "train": {"max_steps": 4, "batch_size": 8, "lr": 1e-2, "log_every": 1, "seed": 0, **train},
        "output_dir": str(out),
    }
    if kind == "cls":
        doc["data"] |= {"text_column": "sentence", "label_column": "label"}
    return doc


def write_recipe(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture(autouse=True)
def _encoded_cache_per_test(tmp_path_factory, monkeypatch):
    """Each test its own encoded-data cache (ftune/data/encoded_cache.py): nothing written to ~/.cache, and no
    test reads what another encoded; runs within one test share it."""
    monkeypatch.setenv("FTUNE_ENCODED_CACHE", str(tmp_path_factory.mktemp("encoded")))


@pytest.fixture(autouse=True)
def _restore_torch_state():
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


# Token classification: a tiny CoNLL corpus whose tags follow from the words (so a few steps of training learn it):
# a person is a first name (B-PER), optionally followed by a surname (I-PER); a place is one word (B-LOC).
FIRST_NAMES, SURNAMES, PLACES = ["good", "great", "lovely"], ["superb", "fine"], ["bad", "awful", "poor"]
CONLL_TAGS = ["B-LOC", "B-PER", "I-PER", "O"]  # the sorted tag set: the default data.labels


def conll_sentence(rng: random.Random) -> list[tuple[str, str]]:
    """(word, tag) pairs: filler words with one or two entities, never two entities side by side."""
    words = [(w, "O") for w in rng.sample(FILLER, rng.randint(3, 6))]
    for _ in range(rng.randint(1, 2)):
        at = rng.randrange(len(words) + 1)
        if rng.random() < 0.5:
            entity = [(rng.choice(FIRST_NAMES), "B-PER")]
            if rng.random() < 0.5:
                entity.append((rng.choice(SURNAMES), "I-PER"))
        else:
            entity = [(rng.choice(PLACES), "B-LOC")]
        words[at:at] = entity + [(rng.choice(FILLER), "O")]
    return words


def write_conll(path: Path, sentences: list[list[tuple[str, str]]]) -> Path:
    """A CoNLL-2003-style file: `word POS TAG` lines, a blank line between sentences, a -DOCSTART- line first."""
    lines = ["-DOCSTART- -X- O", ""]
    for sentence in sentences:
        lines += [f"{word} NN {tag}" for word, tag in sentence] + [""]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def conll_data(tmp_path_factory) -> Path:
    """train.txt (48 sentences), validation.txt (16), test.txt (12) in a folder, like ../shared/data/conll2003."""
    folder = tmp_path_factory.mktemp("conll")
    rng = random.Random(2)
    for split, n in (("train", 48), ("validation", 16), ("test", 12)):
        write_conll(folder / f"{split}.txt", [conll_sentence(rng) for _ in range(n)])
    return folder


def token_recipe_doc(model: Path, data: Path, out: Path, method: dict | None = None, **train) -> dict:
    """A complete tiny token-classification recipe reading the folder `data` (train.txt, validation.txt)."""
    return {
        "model": {"name": str(model)},
        "task": "token_classification",
        "data": {"train": str(data), "validation": str(data), "max_length": 32},
        "method": method or {"name": "lora", "r": 4, "alpha": 8},
        "train": {"max_steps": 4, "batch_size": 8, "lr": 1e-2, "log_every": 1, "seed": 0, **train},
        "output_dir": str(out),
    }


# Failures of peft itself on a transformers release it does not support yet, by the message peft raises. A comparison
# with peft that hits one is skipped (naming both versions), never passed: ftune's side is still tested by the rest of
# the suite. peft 0.21.2 on transformers 5.24 (past_key_values renamed to cache): prefix tuning of a classifier.
PEFT_BREAKS = ("Model does not support past key values",)


def peft_side(call):
    """Run peft's side of an equivalence test, skipping only where peft itself fails with a known break."""
    try:
        return call()
    except Exception as e:
        if not any(known in str(e) for known in PEFT_BREAKS):
            raise
        import peft
        import transformers

        pytest.skip(f"peft {peft.__version__} fails on transformers {transformers.__version__}: {str(e).splitlines()[0]}")


# Preference pairs: the chosen completion repeats the prompt's word, the rejected one answers a word of the opposite
# sentiment (shorter or longer, so batches carry padding). Several pairs share a prompt, as in hhh_alignment.
@pytest.fixture(scope="session")
def pref_data(tmp_path_factory) -> Path:
    """train.jsonl (32 pairs over 8 prompts), validation.jsonl (8 pairs over 4 other prompts)."""
    folder = tmp_path_factory.mktemp("pref")
    rng = random.Random(4)
    splits = (("train", "repeat the word", POSITIVE[:4] + NEGATIVE[:4], 4),
              ("validation", "please repeat the word", ["superb", "weak", "good", "bad"], 2))
    for split, ask, words, per_prompt in splits:
        with open(folder / f"{split}.jsonl", "w") as f:
            for i, word in enumerate(words):
                opposite = NEGATIVE if word in POSITIVE else POSITIVE
                for k in range(per_prompt):
                    row = {"prompt": f"{ask} {word}", "chosen": f"{word} " * (1 + k % 2) + "please",
                           "rejected": " ".join(rng.sample(opposite, 1 + (i + k) % 3))}
                    f.write(json.dumps(row) + "\n")
    return folder


def pref_recipe_doc(model: Path, data: Path, out: Path, objective: dict | None = None, method: dict | None = None,
                    **train) -> dict:
    """A complete tiny preference recipe reading `data`/{train,validation}.jsonl (prompt, chosen, rejected)."""
    return {
        "model": {"name": str(model)},
        "task": "preference",
        "data": {"train": str(data / "train.jsonl"), "validation": str(data / "validation.jsonl"), "max_length": 64},
        "method": method or {"name": "lora", "r": 4, "alpha": 8},
        "objective": objective or {"name": "dpo"},
        "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-2, "log_every": 1, "seed": 0, **train},
        "output_dir": str(out),
    }
