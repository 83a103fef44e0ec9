"""Tokenise once, train anywhere: `launcher preprocess`, its fingerprint, and tokenisation that
outlasts the training collectives' timeout. Runs real processes (2 of them where it matters)."""
import json
import time
from pathlib import Path

import pytest

from launcher.cli import main
from launcher.data.cache import inputs, load_preprocessed, stale
from launcher.errors import UserError
from launcher.recipe.files import load_recipe
from support import launch_two, mixture_recipe, ok, run_here, train_losses, write_sources

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]


def data_records(run_dir: Path) -> dict[int, dict]:
    """rank -> how that process got its data (logs/rank-R.jsonl)."""
    found = {}
    for log in sorted((run_dir / "logs").glob("rank-*.jsonl")):
        for line in log.read_text().splitlines():
            record = json.loads(line)
            if "rows_tokenised" in record:
                found[record["rank"]] = record
    return found


def test_preprocessed_mixture_trains_on_two_processes_without_tokenising_like_one_process_and_resumes_bitwise(tmp_path, tiny_model, capsys):
    sources = write_sources(tmp_path / "data", sizes=(120, 80, 50))
    shared = {"preprocessed_dir": str(tmp_path / "pre")}
    straight = mixture_recipe(tiny_model, tmp_path / "straight", sources, data=shared)
    split = mixture_recipe(tiny_model, tmp_path / "split", sources, data=shared)
    two = mixture_recipe(tiny_model, tmp_path / "two", sources, data=shared,
                         train={"micro_batch_size": 2}, distributed={"num_processes": 2})  # same global batch of 4

    ok(run_here([straight]))  # nothing preprocessed yet: the run tokenises
    assert data_records(tmp_path / "straight" / "run")[0]["rows_tokenised"] == 250
    assert main(["preprocess", str(two)]) == 0
    assert f"preprocessed data written to {tmp_path / 'pre'}" in capsys.readouterr().out

    ok(run_here([split, "train.max_steps=2"]))
    resumed = ok(run_here([split]))
    started = time.time()
    result = ok(launch_two([two]))
    print(f"2-process run from preprocessed data: {time.time() - started:.0f} s")
    assert "mixture: alpaca.jsonl: 125 rows (50.0%)" in result.stdout

    records = data_records(tmp_path / "two" / "run")
    assert sorted(records) == [0, 1]
    assert all(r["rows_tokenised"] == 0 and r["data"].startswith("preprocessed") for r in records.values()), records
    expected = train_losses(tmp_path / "straight" / "run")
    assert "resuming from" in resumed.stdout
    assert train_losses(tmp_path / "split" / "run") == expected  # bitwise
    distributed = train_losses(tmp_path / "two" / "run")
    assert sorted(distributed) == [1, 2, 3, 4]
    assert all(abs(distributed[s] - expected[s]) <= 1e-5 * abs(expected[s]) for s in expected), (distributed, expected)


def test_a_changed_template_or_source_is_named_by_the_fingerprint(tmp_path, tiny_model):
    from transformers import AutoTokenizer
    sources = write_sources(tmp_path / "data", sizes=(20, 20, 20))
    path = mixture_recipe(tiny_model, tmp_path, sources)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    assert main(["preprocess", str(path)]) == 0
    assert load_preprocessed(load_recipe(path), tokenizer) is not None

    with pytest.raises(UserError, match=r"data.max_length changed: 32 -> 48; run `launcher preprocess` again"):
        load_preprocessed(load_recipe(path, ["data.max_length=48"]), tokenizer)
    saved = json.loads((tmp_path / "run" / "preprocessed" / "fingerprint.json").read_text())
    tokenizer.chat_template = tokenizer.chat_template.replace("<|im_start|>", "<|im_begin|>")
    assert stale(saved, inputs(load_recipe(path), tokenizer)) == "the tokenizer's chat template changed"
    (tmp_path / "data" / "notes.txt").write_text("a different note\n")
    assert stale(saved, inputs(load_recipe(path), AutoTokenizer.from_pretrained(tiny_model))).startswith(
        "source data.train[2] notes.txt: size")


def seconds_to_tokenise(tokenizer, line: str, copies: int = 10) -> float:
    """Seconds per copy of `line`, measured on `copies` at once."""
    started = time.perf_counter()
    tokenizer([line] * copies, add_special_tokens=False)
    return (time.perf_counter() - started) / copies


def test_tokenisation_longer_than_the_collective_timeout_does_not_end_a_two_process_run(tmp_path, tiny_model):
    """distributed.timeout_minutes 0.1 (6 s); the main process tokenises a file for longer while the other waits."""
    from transformers import AutoTokenizer
    timeout_s = 6
    line = " ".join(f"word{i % 997} and more text" for i in range(4000)) + "\n"  # ~100 kB: tokenised whole, then truncated
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    per_line = min(seconds_to_tokenise(tokenizer, line) for _ in range(3))  # the fastest: a busy moment only slows it
    lines = max(40, int(2 * timeout_s / per_line))  # about twice the timeout at full speed, more on a busy machine
    (tmp_path / "big.txt").write_text(line * lines)
    recipe = mixture_recipe(tiny_model, tmp_path, [{"path": str(tmp_path / "big.txt"), "format": "text"}],
                            train={"max_steps": 2, "micro_batch_size": 2, "save_every": 0},
                            distributed={"timeout_minutes": timeout_s / 60, "num_processes": 2})
    ok(launch_two([recipe], timeout=600))
    main_record = data_records(tmp_path / "run")[0]
    assert main_record["rows_tokenised"] == lines
    assert main_record["data_seconds"] > timeout_s, f"tokenising took {main_record['data_seconds']} s: make the file larger"
    assert (tmp_path / "run" / "final").is_dir()
