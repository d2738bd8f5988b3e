"""The tiny models and tokenizers, built in-process (no Hub) over the vocabulary of tests/tiny_data.py: a BERT-like
encoder, a Llama-like decoder (and a wider copy of it for the 4-bit and 8-bit tests), a T5 and a BART.

Session fixtures (re-exported by conftest): tiny_bert, tiny_llama, wide_llama, tiny_t5, tiny_bart; each is the folder
the model and its tokenizer were saved to.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tiny_data import WORDS


def build_bert(folder: Path) -> Path:
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(folder / "vocab.txt"))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
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
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        tie_word_embeddings=False,
    )
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
        single=template, special_tokens=[(t, vocab[t]) for t in template.split() if t in vocab]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special_tokens), len(vocab)


def build_t5(folder: Path) -> Path:
    """A tiny T5 (pre-norm, relative position buckets, tied embeddings) with T5's special ids: pad 0 (also the
    decoder start), </s> 1, <unk> 2; every text ends with </s>."""
    from transformers import T5Config, T5ForConditionalGeneration

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer, size = _word_tokenizer(
        ["<pad>", "</s>", "<unk>"], "$A </s>", pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=size,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    T5ForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_bart(folder: Path) -> Path:
    """A tiny BART (post-norm, learned positions, biases) with BART's special ids: <s> 0, <pad> 1, </s> 2 (also the
    decoder start), <unk> 3; every text is <s> ... </s>."""
    from transformers import BartConfig, BartForConditionalGeneration

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer, size = _word_tokenizer(
        ["<s>", "<pad>", "</s>", "<unk>"],
        "<s> $A </s>",
        bos_token="<s>",
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    torch.manual_seed(0)
    config = BartConfig(
        vocab_size=size,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
    )
    BartForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


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
def tiny_t5(tmp_path_factory) -> Path:
    return build_t5(tmp_path_factory.mktemp("models") / "tiny-t5")


@pytest.fixture(scope="session")
def tiny_bart(tmp_path_factory) -> Path:
    return build_bart(tmp_path_factory.mktemp("models") / "tiny-bart")
