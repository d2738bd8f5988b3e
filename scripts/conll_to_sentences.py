"""CoNLL-2003 to a sentence classification task: does the sentence mention a person?

Reads CoNLL files (one token per line, `word POS NER` or `word POS chunk NER`; a blank line ends a sentence;
`-DOCSTART-` lines are skipped) and writes `<out>/<split>.tsv` with a header and one `sentence<TAB>label` row per
sentence: the tokens joined by spaces, label 1 when any token is tagged B-PER (a person entity starts) else 0.
The second stage-1 task of recipes/adapter_fusion_sst2.yaml (read by recipes/adapter_conll_sent.yaml).

    .venv/bin/python scripts/conll_to_sentences.py                 # ../shared/data/conll2003 -> runs/data/conll_person
    .venv/bin/python scripts/conll_to_sentences.py --src DIR --out DIR --splits train validation test

Dev-only: ftune never imports this file.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path


def sentences(path: Path) -> Iterator[list[tuple[str, str]]]:
    """(word, NER tag) lists, one per sentence."""
    sentence: list[tuple[str, str]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        fields = line.split()
        if not fields or fields[0] == "-DOCSTART-":
            if sentence:
                yield sentence
            sentence = []
            continue
        sentence.append((fields[0], fields[-1]))  # the NER tag is the last column in both layouts
    if sentence:
        yield sentence


def convert(src: Path, out: Path) -> tuple[int, int]:
    """Write one TSV; returns (sentences, sentences mentioning a person)."""
    rows, positives = ["sentence\tlabel"], 0
    for sentence in sentences(src):
        label = int(any(tag == "B-PER" for _, tag in sentence))
        positives += label
        # a tab inside a token would split the TSV row; CoNLL has none, but never write a broken file
        rows.append(" ".join(word.replace("\t", " ") for word, _ in sentence) + f"\t{label}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return len(rows) - 1, positives


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=Path("../shared/data/conll2003"), help="folder with <split>.txt")
    parser.add_argument("--out", type=Path, default=Path("runs/data/conll_person"), help="folder for <split>.tsv")
    parser.add_argument("--splits", nargs="+", default=["train", "validation"])
    args = parser.parse_args()
    for split in args.splits:
        n, positives = convert(args.src / f"{split}.txt", args.out / f"{split}.tsv")
        print(f"{args.out / f'{split}.tsv'}: {n} sentences, {positives} mention a person ({100 * positives / n:.1f}%)")


if __name__ == "__main__":
    main()
