"""Tiny models, tokenizers and data, built in-process (no Hub): a BERT-like encoder and a Llama-like decoder.

The data is learnable on purpose: a sentence's label is decided by its sentiment word, so a few steps of training
move the loss, and a broken method shows up as a loss that does not fall.

They live in three modules, re-exported here (tests import them from conftest; pytest finds the fixtures here):
tests/tiny_data.py (vocabulary, data sets), tests/tiny_models.py (models, tokenizers), tests/tiny_recipes.py (recipe
documents, the finished runs shared by the session). This file keeps what every test gets (autouse fixtures) and
peft's known breaks.
"""

from __future__ import annotations

import pytest
import torch

from tiny_data import (
    CONLL_TAGS,
    FILLER,
    FIRST_NAMES,
    NEGATIVE,
    PLACES,
    POSITIVE,
    SHARED_DATA,
    SURNAMES,
    WORDS,
    _sentence,
    cls_data,
    conll_data,
    conll_sentence,
    pref_data,
    s2s_data,
    sft_data,
    write_conll,
)
from tiny_models import (
    _word_tokenizer,
    build_bart,
    build_bert,
    build_llama,
    build_t5,
    tiny_bart,
    tiny_bert,
    tiny_llama,
    tiny_t5,
    wide_llama,
)
from tiny_recipes import (
    adapter_runs,
    full_run,
    pref_recipe_doc,
    recipe_doc,
    s2s_adapter_runs,
    s2s_recipe_doc,
    token_recipe_doc,
    write_recipe,
)

__all__ = [  # re-exported: the names tests import from conftest, and the session fixtures
    "CONLL_TAGS",
    "FILLER",
    "FIRST_NAMES",
    "NEGATIVE",
    "PEFT_BREAKS",
    "PLACES",
    "POSITIVE",
    "SHARED_DATA",
    "SURNAMES",
    "WORDS",
    "_sentence",
    "_word_tokenizer",
    "adapter_runs",
    "build_bart",
    "build_bert",
    "build_llama",
    "build_t5",
    "cls_data",
    "conll_data",
    "conll_sentence",
    "full_run",
    "peft_side",
    "pref_data",
    "pref_recipe_doc",
    "recipe_doc",
    "s2s_adapter_runs",
    "s2s_data",
    "s2s_recipe_doc",
    "sft_data",
    "tiny_bart",
    "tiny_bert",
    "tiny_llama",
    "tiny_t5",
    "token_recipe_doc",
    "wide_llama",
    "write_conll",
    "write_recipe",
]


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

        pytest.skip(
            f"peft {peft.__version__} fails on transformers {transformers.__version__}: {str(e).splitlines()[0]}"
        )
