"""Data sources and mixtures: local files of every kind, datasets folders, hub ids from a local
datasets cache, and weighted mixtures that are exact, deterministic and the same for any process count."""
import json
import shutil
from collections import Counter

import pytest

from launcher.cli import main
from launcher.data.batching import StepPlan
from launcher.data.encode import tokenise_train
from launcher.data.mixing import Share, pick_rows, row_counts
from launcher.recipe.files import load_recipe
from support import MIXTURE_WEIGHTS as WEIGHTS
from support import launch, mixture_recipe, write_sources

@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_model)


def test_weights_count_out_exact_shares_and_epochs_repeat_a_source():
    assert row_counts([1200, 800, 500], [Share(w, None) for w in WEIGHTS]) == [1250, 750, 500]
    assert row_counts([10, 4], [Share(None, 2.0), Share(None, 0.5)]) == [20, 2]
    rows = pick_rows(4, 10, seed=1, source=0)
    assert Counter(rows) == {0: 3, 1: 3, 2: 2, 3: 2} or sorted(Counter(rows).values()) == [2, 2, 3, 3]
    assert rows[:8] == [0, 1, 2, 3] * 2 and len(set(rows[8:])) == 2  # whole passes, then distinct rows


def test_mixture_realises_its_weights_over_2000_rows_for_one_and_two_processes(tmp_path, tiny_model, tokenizer):
    recipe = load_recipe(mixture_recipe(tiny_model, tmp_path, write_sources(tmp_path / "data")))
    train = tokenise_train(recipe, tokenizer, None)
    assert train.mixture == tokenise_train(recipe, tokenizer, None).mixture  # deterministic from the seed
    assert [s["rows"] for s in train.mixture] == [1250, 750, 500]
    origin = train.dataset["source"]
    one = StepPlan(len(origin), micro=8, accum=1, world=1, rank=0, seed=recipe.train.seed)
    two = [StepPlan(len(origin), micro=4, accum=1, world=2, rank=r, seed=recipe.train.seed) for r in (0, 1)]
    seen = []
    for step in range(2000 // 8):  # 250 steps of 8 rows: the first 2,000 rows trained
        rows = one.micro_batches(step)[0]
        assert rows == two[0].micro_batches(step)[0] + two[1].micro_batches(step)[0]
        seen += [origin[i] for i in rows]
    realised = Counter(seen)
    for index, weight in enumerate(WEIGHTS):
        assert abs(realised[index] / 2000 - weight) <= 0.02, (realised, WEIGHTS)


def test_a_dataset_from_the_local_datasets_cache_trains(tmp_path, tiny_model):
    """hf:org/name with a config name and split, resolved offline from a datasets cache the test writes."""
    from datasets.packaged_modules.json.json import Json
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"instruction": f"say {i}", "output": f"{i}!"}) + "\n" for i in range(40)))
    built = Json(cache_dir=str(tmp_path / "build"), dataset_name="tiny_alpaca", config_name="en",
                 data_files={"train": str(rows), "test": str(rows)})
    built.download_and_prepare()
    cache = tmp_path / "hf-cache" / "datasets"
    shutil.copytree(built.cache_dir, cache / "org___tiny_alpaca" / "en" / "0.0.0" / "abc")  # where datasets keeps hub data
    recipe = mixture_recipe(tiny_model, tmp_path, [{"path": "hf:org/tiny_alpaca", "name": "en"}],
                            data={"eval": {"path": "hf:org/tiny_alpaca", "name": "en", "split": "test"}, "max_eval_rows": 8},
                            train={"max_steps": 2, "save_every": 0})
    env = {"HF_HOME": str(tmp_path / "hf-cache"), "HF_DATASETS_CACHE": str(cache), "HF_DATASETS_OFFLINE": "1"}
    result = launch([recipe], env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "data: 40 train rows" in result.stdout and "8 eval rows" in result.stdout
    assert (tmp_path / "run" / "final").is_dir()


def test_a_hub_id_that_cannot_be_resolved_offline_is_one_error(tmp_path, tiny_model, capsys):
    recipe = mixture_recipe(tiny_model, tmp_path, [{"path": "hf:nobody/no_such_dataset", "split": "train"}])
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: data source hf:nobody/no_such_dataset: cannot load it") and "\n" not in err
    assert "Traceback" not in err


def test_inspect_plain_prints_ids_pieces_and_labels_in_columns(tmp_path, tiny_model, capsys):
    sources = write_sources(tmp_path / "data", sizes=(20, 20, 20))
    recipe = mixture_recipe(tiny_model, tmp_path, sources)
    assert main(["inspect", str(recipe), "-n", "1"]) == 0  # stdout is captured, not a terminal: plain
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.split() == ["pos", "id", "label", "piece"])
    lines = out.splitlines()
    first = lines[lines.index(header) + 1:][:40]
    columns = [line.split(None, 3) for line in first if line[:5].strip().isdigit()]
    assert any(label == "-100" for _, _, label, _ in columns) and any(label != "-100" for _, _, label, _ in columns)
    trained = [(int(token), int(label)) for _, token, label, _ in columns if label != "-100"]
    assert all(token == label for token, label in trained)  # causal-lm labels are the token ids where trained
    assert "source alpaca.jsonl" in out and "source notes.txt" in out


def test_every_local_kind_reads_the_same_rows_and_a_bad_row_past_the_peek_is_named(tmp_path, tiny_model, tokenizer):
    import datasets
    from launcher.errors import UserError
    from launcher.data.sources import Source, load_table
    rows = [{"instruction": f"say {i}", "output": f"{i}"} for i in range(8)]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "rows.parquet"))
    broken = rows[:6] + [{"instruction": "say 6"}] + rows[7:]  # row 7 lacks its output: named when tokenised
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows),
                          "train": datasets.Dataset.from_list([{**r, "output": r.get("output")} for r in broken])}
                         ).save_to_disk(str(tmp_path / "saved"))
    for path in ("rows.json", "rows.parquet"):
        assert load_table(tmp_path / path).to_list() == rows
    assert load_table(Source(str(tmp_path / "saved"), None, split="validation")).to_list() == rows
    recipe = load_recipe(mixture_recipe(tiny_model, tmp_path, [{"path": str(tmp_path / "saved"), "format": "instruction"}]))
    with pytest.raises(UserError, match=r"/saved:7: output: null, expected text$"):
        tokenise_train(recipe, tokenizer, None)


def test_several_eval_sources_each_get_their_own_loss_in_the_metrics_and_the_report(tmp_path, tiny_model, tokenizer, capsys):
    """data.eval as a list: rows interleaved by source; each source's eval loss is the loss that source alone
    gets (the step-0 eval is the base model: LoRA starts as a no-op), and the report lists each."""
    import json

    from launcher.data.encode import tokenise_eval
    from launcher.commands.eval import compare_checkpoints
    sources = write_sources(tmp_path / "data", sizes=(40, 30, 20))
    evals = [{key: value for key, value in source.items() if key != "weight"} for source in sources[:2]]
    recipe = mixture_recipe(tiny_model, tmp_path, sources[0]["path"],
                            data={"eval": evals, "max_eval_rows": 6}, train={"max_steps": 2, "save_every": 0})
    interleaved = tokenise_eval(load_recipe(recipe), tokenizer, None).dataset
    assert interleaved["source"] == [0, 1] * 6  # every source in turn: the first rows (the generated ones) cover each

    assert main(["train", str(recipe)]) == 0
    run = tmp_path / "run"
    before = next(json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in line)
    losses = {key: before[key] for key in ("eval_loss/alpaca.jsonl", "eval_loss/pairs.csv")}
    assert losses["eval_loss/alpaca.jsonl"] != losses["eval_loss/pairs.csv"]
    assert min(losses.values()) < before["eval_loss"] < max(losses.values())  # the overall loss is over both
    report = (run / "report.md").read_text()
    assert "eval_loss/alpaca.jsonl" in report and "eval_loss/pairs.csv" in report

    for source, key in zip(evals, losses):  # each source alone, scored on the base model
        alone = mixture_recipe(tiny_model, tmp_path / key.split("/")[1], sources[0]["path"],
                               data={"eval": source, "max_eval_rows": 6})
        assert compare_checkpoints(load_recipe(alone), checkpoint="base")["base"]["eval_loss"] == pytest.approx(losses[key], rel=1e-5)


def test_task_metrics_are_scored_per_eval_source_when_the_sources_share_a_format():
    import datasets

    from launcher.evaluation.evaluate import score, scores_by_source
    from launcher.data.mixing import interleave
    tables = [datasets.Dataset.from_dict({"input_ids": [[1, 2]] * size}) for size in (3, 2)]
    mixed, _ = interleave(tables, ["bible.jsonl", "hf:org/news:test"])
    generated = [{"reference": "the same words", "output": "the same words" if source == 0 else "something else"}
                 for source in mixed["source"]]
    found = scores_by_source("translation", generated, mixed)
    assert found["eval_chrf/bible.jsonl"] == 100.0 and found["eval_chrf/hf_org_news_test"] < 50.0
    metrics = score("translation", generated)  # the same metrics as the whole set's, once per source
    assert sorted(found) == sorted(f"{key}/{name}" for key in metrics for name in ("bible.jsonl", "hf_org_news_test"))


def test_generate_puts_prompts_in_the_first_sources_format_and_fields(tmp_path, tiny_model):
    from launcher.commands.generate import prompt_data, prompt_rows
    sources = write_sources(tmp_path / "data", sizes=(4, 4, 4))
    recipe = load_recipe(mixture_recipe(tiny_model, tmp_path, sources[1:]))  # completion .csv first, mapped fields q/a
    assert prompt_rows(["two times 9"], prompt_data(recipe)) == [{"q": "two times 9", "a": ""}]
    with_eval = load_recipe(mixture_recipe(tiny_model, tmp_path, sources[1:], data={"eval": sources[0]["path"]}))
    assert prompt_rows(["count to 3"], prompt_data(with_eval)) == [{"instruction": "count to 3", "output": ""}]
