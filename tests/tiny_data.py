"""The tiny data sets, written in-process: learnable on purpose (a sentence's label is decided by its sentiment word,
so a few steps of training move the loss, and a broken method shows up as a loss that does not fall), over the
vocabulary WORDS that the tiny models' tokenizers know (tests/tiny_models.py).

Session fixtures (re-exported by conftest): cls_data (sentiment classification, TSV), sft_data (instructions, JSONL),
s2s_data (summaries, JSONL), conll_data (CoNLL-2003-style tags) and pref_data (preference pairs, JSONL).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
POSITIVE, NEGATIVE = ["good", "great", "fine", "lovely", "superb"], ["bad", "awful", "poor", "dull", "weak"]
FILLER = ["the", "movie", "film", "was", "a", "plot", "really", "quite", "story", "actors", "and", "very"]
WORDS = POSITIVE + NEGATIVE + FILLER + ["say", "answer", "yes", "no", "word", "repeat", "please"]


def _sentence(rng: random.Random, positive: bool) -> str:
    words = rng.sample(FILLER, 4) + [rng.choice(POSITIVE if positive else NEGATIVE)]
    rng.shuffle(words)
    return " ".join(words)


@pytest.fixture(scope="session")
def cls_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cls")
    rng = random.Random(0)
    for split, n in (("train", 48), ("validation", 16)):
        rows = ["sentence\tlabel"] + [f"{_sentence(rng, i % 2 == 0)}\t{i % 2}" for i in range(n)]
        (folder / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return folder


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


# Preference pairs: the chosen completion repeats the prompt's word, the rejected one answers a word of the opposite
# sentiment (shorter or longer, so batches carry padding). Several pairs share a prompt, as in hhh_alignment.
@pytest.fixture(scope="session")
def pref_data(tmp_path_factory) -> Path:
    """train.jsonl (32 pairs over 8 prompts), validation.jsonl (8 pairs over 4 other prompts)."""
    folder = tmp_path_factory.mktemp("pref")
    rng = random.Random(4)
    splits = (
        ("train", "repeat the word", POSITIVE[:4] + NEGATIVE[:4], 4),
        ("validation", "please repeat the word", ["superb", "weak", "good", "bad"], 2),
    )
    for split, ask, words, per_prompt in splits:
        with open(folder / f"{split}.jsonl", "w") as f:
            for i, word in enumerate(words):
                opposite = NEGATIVE if word in POSITIVE else POSITIVE
                for k in range(per_prompt):
                    row = {
                        "prompt": f"{ask} {word}",
                        "chosen": f"{word} " * (1 + k % 2) + "please",
                        "rejected": " ".join(rng.sample(opposite, 1 + (i + k) % 3)),
                    }
                    f.write(json.dumps(row) + "\n")
    return folder
