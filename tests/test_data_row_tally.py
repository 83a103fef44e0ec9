"""Rows max_length truncates or leaves with nothing to train: counted by reason, named by row, shown
by `validate --deep`, `inspect` and the run summary, warned about above data.skipped_share_warn and
refused under data.skipped_share_refuse."""
from __future__ import annotations

import json

import yaml
from rich.console import Console

from launcher.cli import main
from launcher.recipe.files import load_recipe

MEGABYTE_ROW = 12   # its source is 1 MB of text: the prompt alone fills max_length, so nothing is left to train
LONG_PROMPT_ROW = 3
LONG_TARGET_ROW = 5  # its target runs past max_length: kept, truncated
SUMMARY = (f"2 dropped (10.0%; no target token within max_length: rows {LONG_PROMPT_ROW}, {MEGABYTE_ROW}), "
           f"1 truncated (5.0%; row {LONG_TARGET_ROW})")


def write_case(tmp_path, tiny_model, **data) -> str:
    rows = [{"en": f"verse {i}", "es": f"verso {i}"} for i in range(1, 21)]
    rows[LONG_PROMPT_ROW - 1]["en"] = "the word " * 100
    rows[LONG_TARGET_ROW - 1]["es"] = "la palabra " * 100
    rows[MEGABYTE_ROW - 1]["en"] = "In the beginning God created the heaven and the earth. " * (1_000_000 // 55)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe = {"model": {"path": str(tiny_model)}, "method": "lora", "lora": {"r": 2, "alpha": 4},
              "data": {"train": "train.jsonl", "format": "translation", "fields": {"source": "en", "target": "es"},
                       "max_length": 32, **data},
              "train": {"max_steps": 1, "micro_batch_size": 2}, "output_dir": str(tmp_path / "run")}
    if data.get("eval") or data.get("eval_fraction"):
        recipe["eval"] = {"samples": 0, "generate_rows": 0}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return str(tmp_path / "recipe.yaml")


def test_validate_deep_counts_dropped_and_truncated_rows_by_reason_and_row(tmp_path, tiny_model, capsys):
    assert main(["validate", write_case(tmp_path, tiny_model), "--deep"]) == 0
    out = capsys.readouterr().out
    assert f"train: 20 rows, {SUMMARY}" in out
    assert "warning: " in out and "10.0% of its rows dropped at data.max_length 32" in out
    assert "truncated at data.max_length" not in out, "5% truncated is not above the 5% threshold"
    assert not (tmp_path / "run").exists()


def test_skipped_share_refuse_turns_the_warning_into_exit_2(tmp_path, tiny_model, capsys):
    recipe = write_case(tmp_path, tiny_model, skipped_share_refuse=True)
    assert main(["validate", recipe, "--deep"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"train.jsonl: 10.0% of its rows dropped" in err and SUMMARY in err and "refused" in err
    assert main(["train", recipe]) == 2, "train refuses in its tokenising pass, before the model loads"
    assert capsys.readouterr().err == err
    assert main(["validate", recipe, "--deep", "data.skipped_share_warn=0.2"]) == 0, "under the threshold it passes"


def test_inspect_shows_truncated_and_dropped_counts_with_their_shares(tmp_path, tiny_model):
    from launcher.commands.inspect import show
    console = Console(record=True, width=400, force_terminal=True, color_system="standard")
    counts = show(load_recipe(write_case(tmp_path, tiny_model)), 0, console)
    assert counts["dropped"] == {"no target token within max_length": 2} and counts["dropped_share"] == 0.1
    assert counts["truncated"] == 1 and counts["truncated_share"] == 0.05
    assert "\x1b[1;33mwarning: " in console.export_text(styles=True), "the warning is printed in bold yellow"


def test_a_run_refused_for_a_bad_row_is_rerun_without_overwrite_and_its_summary_counts_rows(tmp_path, tiny_model, capsys):
    recipe = write_case(tmp_path, tiny_model)
    good = (tmp_path / "train.jsonl").read_text()
    lines = good.splitlines(keepends=True)
    lines[6] = '{"en": "verse 7", "es": null}\n'
    (tmp_path / "train.jsonl").write_text("".join(lines))
    assert main(["train", recipe]) == 2
    assert "train.jsonl:7: es: null, expected text" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    (tmp_path / "train.jsonl").write_text(good)  # the corrected rerun: same command, no --overwrite
    assert main(["train", recipe]) == 0
    out = capsys.readouterr().out
    assert f"data: 20 train rows ({SUMMARY})" in out
    assert "warning: " in out and (tmp_path / "run" / "final").is_dir()

