"""Build recipes/data/bible_en_es_pairs/: English->Spanish preference pairs for recipes/dpo.yaml.

chosen is the shipped reference translation (bible_en_es); rejected is what the shipped SmolLM2-135M
model itself writes for the same prompt, greedily, with recipes/translate.yaml's prompt, chat template
and generation settings (but at most 48 new tokens). So the base model finds its own output likelier, and DPO has to teach it to
prefer the reference. Pairs whose output equals the reference are left out (a pair must differ).

    python recipes/data/build_preference.py [--train 160] [--eval 60] [--max-new-tokens 48]

Deterministic (greedy decoding, float32 on CPU); see SOURCES.md.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import datasets
from accelerate import PartialState

from launcher.data.encode import Encoder
from launcher.evaluation.evaluate import generate
from launcher.model import loading
from launcher.recipe.files import load_recipe

HERE = Path(__file__).resolve().parent


def pairs(recipe, tokenizer, model, rows: list[dict]) -> list[dict]:
    """Each verse as a preference row: the translation prompt, the reference, the model's own output."""
    encoder = Encoder(tokenizer, recipe.data, "causal-lm")
    columns = {"en": [row["en"] for row in rows], "es": [row["es"] for row in rows]}
    table = datasets.Dataset.from_dict(encoder.batch(columns))
    outputs = generate(PartialState(), model, tokenizer, table, len(rows), recipe, batch_size=16)
    data = recipe.data
    made = []
    for row, output in zip(rows, outputs):
        prompt = data.prompt_template.format(source_lang=data.source_lang, target_lang=data.target_lang, source=row["en"])
        if output["output"].strip() and output["output"].strip() != row["es"].strip():
            made.append({"prompt": prompt, "chosen": row["es"], "rejected": output["output"]})
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=160, help="verses from the start of bible_en_es/train.jsonl")
    parser.add_argument("--eval", type=int, default=60, help="verses from the start of bible_en_es/eval.jsonl")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="generation length (a verse is at most 160 characters)")
    parser.add_argument("--out", type=Path, default=HERE / "bible_en_es_pairs")
    args = parser.parse_args()
    recipe = load_recipe(HERE.parent / "translate.yaml")
    recipe.eval.max_new_tokens = args.max_new_tokens
    weights = loading.resolve_weights(recipe)
    tokenizer = loading.load_tokenizer(weights, recipe)
    model = loading.load_base(weights, recipe, on_gpu=False).eval()
    args.out.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", args.train), ("eval", args.eval)):
        lines = (HERE / "bible_en_es" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()[:count]
        made = pairs(recipe, tokenizer, model, [json.loads(line) for line in lines])
        with (args.out / f"{split}.jsonl").open("w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in made)
        print(f"{split}: {len(made)} pairs of {count} verses -> {args.out / f'{split}.jsonl'}")


if __name__ == "__main__":
    main()
