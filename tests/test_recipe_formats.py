"""The data formats, as a specification: what each one reads, which tasks learn it, how it is scored.

launcher/formats.py holds one entry per format; the recipe schema, the row checks, the prompts and the
scorers must all agree with it. Then how rows become batches: the train collate is chosen once.
"""
import ast
from pathlib import Path

import pytest
from pydantic import ValidationError

from launcher.data.encode import PROMPT_BUILDERS, Encoder, load_datasets, to_segments
from launcher.evaluation.evaluate import SCORERS
from launcher.recipe.formats import FORMATS, IGNORE, LOWER_IS_BETTER, METRICS, TASKS, formats_for_task
from launcher.recipe.schema import DataFormat, DataSection, Recipe
from launcher.errors import UserError
from launcher.recipe.files import load_recipe

REPO = Path(__file__).resolve().parents[1]


def recipe_for(fmt: str, task: str = "causal-lm", **sections) -> dict:
    method = "lora" if FORMATS[fmt].objective == "dpo" else "full"  # a DPO reference is the base without the adapter
    recipe = {"model": {"path": "x", "task": task}, "method": method,
              "data": {"train": "x.jsonl", "format": fmt, "eval_fraction": 0.25},  # evaluated, so eval keys apply
              "output_dir": "x"}
    for section, values in sections.items():
        recipe[section] = {**recipe.get(section, {}), **values}
    return recipe


# ---------------------------------------------------------------- the registry and the recipe schema

def test_the_registry_is_a_leaf_the_schema_can_import_without_torch():
    imported = set()
    for node in ast.walk(ast.parse((REPO / "launcher" / "recipe" / "formats.py").read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
    assert imported <= {"__future__", "dataclasses"}, imported


def test_every_format_is_a_recipe_choice_and_has_a_prompt_or_is_classified():
    assert DataFormat.__args__ == tuple(FORMATS)
    for name, spec in FORMATS.items():
        assert spec.name == name
        assert (name in PROMPT_BUILDERS) == (spec.tasks != ("classification",)), name


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("task", TASKS)
def test_a_task_trains_only_on_the_formats_the_registry_gives_it(fmt, task):
    recipe = recipe_for(fmt, task)
    if fmt in formats_for_task(task):
        assert Recipe.model_validate(recipe).data.format == fmt
    else:
        with pytest.raises(ValidationError, match=f"model.task {task} cannot train on data.format {fmt}"):
            Recipe.model_validate(recipe)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_format_is_judged_by_a_metric_it_computes(fmt):
    spec = FORMATS[fmt]
    task = spec.tasks[0]
    assert spec.default_metric in LOWER_IS_BETTER + spec.metrics
    assert Recipe.model_validate(recipe_for(fmt, task)).eval.chosen(fmt)[0] == f"eval_{spec.default_metric}"
    for metric in METRICS:
        recipe = recipe_for(fmt, task, eval={"metric": metric})
        if metric in spec.selectable_metrics:
            Recipe.model_validate(recipe)
        else:
            with pytest.raises(ValidationError, match=f"eval.metric {metric} is not computed for data.format {fmt}"):
                Recipe.model_validate(recipe)


@pytest.mark.parametrize("fmt", FORMATS)
def test_data_fields_may_rename_only_the_fields_a_format_reads(fmt):
    spec = FORMATS[fmt]
    renamed = {field: f"my_{field}" for field in spec.fields}
    assert Recipe.model_validate(recipe_for(fmt, spec.tasks[0], data={"fields": renamed})).data.field(spec.required[0]) \
        == f"my_{spec.required[0]}"
    with pytest.raises(ValidationError, match=f"unknown key 'data.fields.nonsense'.*format {fmt} reads"):
        Recipe.model_validate(recipe_for(fmt, spec.tasks[0], data={"fields": {"nonsense": "x"}}))


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_scorer_reports_exactly_its_formats_metrics(fmt):
    spec = FORMATS[fmt]
    if not spec.metrics or spec.objective == "dpo":  # pairs are scored from log-probabilities (evaluate.pair_pass)
        assert fmt not in SCORERS and spec.reference is None
        return
    outputs, references = ["la casa", "el perro"], ["la casa", "un gato"]
    assert set(SCORERS[fmt](outputs, references)) == {f"eval_{metric}" for metric in spec.metrics}


def test_generation_scored_formats_keep_their_reference_as_written(tokenizer):
    data = DataSection(train="unused.jsonl", format="qa", max_length=12, chat_template="never")
    out = Encoder(tokenizer, data)({"question": "Who? " * 10, "answer": "Nobody at all"})
    assert FORMATS["qa"].reference == "answer" and out["reference"] == "Nobody at all"  # the tokens were cut, not this
    plain = Encoder(tokenizer, DataSection(train="unused.jsonl", format="completion"))({"prompt": "a", "completion": "b"})
    assert FORMATS["completion"].reference is None and "reference" not in plain


# ---------------------------------------------------------------- prompts

@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_model)


def test_an_instruction_rows_system_field_overrides_the_recipes_system_prompt():
    data = DataSection(train="unused.jsonl", format="instruction", system_prompt="Be kind.")
    own = {"instruction": "Add.", "input": "2 and 3", "output": "5", "system": "Be terse."}
    assert to_segments(own, data, use_chat=True) == [
        {"role": "system", "content": "Be terse."}, {"role": "user", "content": "Add.\n\n2 and 3"},
        {"role": "assistant", "content": "5"}]
    without = {key: value for key, value in own.items() if key != "system"}
    assert to_segments(without, data, use_chat=True)[0] == {"role": "system", "content": "Be kind."}
    assert to_segments({**own, "system": None}, data, use_chat=True)[0] == {"role": "system", "content": "Be kind."}


def test_without_a_chat_template_the_system_field_is_the_first_paragraph(tokenizer):
    data = DataSection(train="unused.jsonl", format="instruction", chat_template="never", system_prompt="Be kind.")
    out = Encoder(tokenizer, data)({"instruction": "Add.", "output": "5", "system": "Be terse."})
    prompt = "Be terse.\n\n### Instruction:\nAdd.\n\n### Response:\n"
    assert tokenizer.decode(out["input_ids"][: out["prompt_len"]]) == prompt
    assert tokenizer.decode([t for t, label in zip(out["input_ids"], out["labels"]) if label != IGNORE]) == "5<|im_end|>"
    plain = Encoder(tokenizer, data)({"instruction": "Add.", "output": "5"})  # system_prompt is for chat templates only
    assert tokenizer.decode(plain["input_ids"][: plain["prompt_len"]]) == "### Instruction:\nAdd.\n\n### Response:\n"


def test_the_system_field_reaches_the_chat_template(tokenizer):
    data = DataSection(train="unused.jsonl", format="instruction", system_prompt="Be kind.")
    out = Encoder(tokenizer, data)({"instruction": "Add.", "output": "5", "system": "Be terse."})
    prompt = tokenizer.decode(out["input_ids"][: out["prompt_len"]])
    assert prompt == "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nAdd.<|im_end|>\n<|im_start|>assistant\n"


# ---------------------------------------------------------------- datasets and batches

def _tiny(tmp_path, tiny_model, **data):
    from support import tiny_recipe, write_recipe
    recipe = tiny_recipe(tiny_model, tmp_path / "run", data={"max_train_rows": 24, "max_eval_rows": 4, **data})
    return load_recipe(write_recipe(recipe, tmp_path / "r.yaml"))


@pytest.mark.parametrize("packing", [True, False])
def test_the_train_collate_is_chosen_once_packed_or_padded(tmp_path, tiny_model, tokenizer, packing):
    found = load_datasets(_tiny(tmp_path, tiny_model, packing=packing, max_length=256), tokenizer)
    assert found.labels is None and found.train.rows == 24 and len(found.eval.dataset) == 4
    assert (len(found.train.dataset) < 24) == packing, "packing puts several examples in a row"
    batch = found.collate(list(found.train.dataset.select(range(2))))
    assert ("position_ids" in batch) == packing  # restarting positions are how transformers sees the packed examples
    assert batch["input_ids"].shape == batch["labels"].shape
    assert "lengths" not in found.eval.dataset.column_names, "eval rows are never packed"


def test_check_sources_names_the_eval_file_that_lacks_a_field(tmp_path, tiny_model):
    from launcher.data.sources import check_sources
    bad = tmp_path / "eval.jsonl"
    bad.write_text('{"en": "hello"}\n')
    recipe = _tiny(tmp_path, tiny_model, eval=str(bad))
    with pytest.raises(UserError, match=r"eval.jsonl:1: es: missing \(data.fields.target\); format translation needs field 'target'"):
        check_sources(recipe)


def test_inspect_a_classification_recipe_uses_its_class_labels():
    from rich.console import Console

    from launcher.commands.inspect import show
    recipe = load_recipe(REPO / "recipes" / "classify.yaml", ["data.max_train_rows=20", "data.max_eval_rows=5"])
    console = Console(record=True, width=200)
    counts = show(recipe, 1, console)
    assert counts["rows"] == counts["kept"] == 20 and counts["eval_rows"] == 5
    assert counts["labels"] == ["business", "entertainment", "politics", "sports", "tech"]  # sorted, from the train rows
    text = console.export_text()
    assert "example 0" in text and any(f"-> {label}" in text for label in counts["labels"])
