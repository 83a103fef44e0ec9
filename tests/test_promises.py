"""Promises by construction (issue 24): the model folder is read before any load, a damaged checkpoint
is passed over for the newest intact one, an OS failure during a save is one line with nothing lost,
Ctrl-C checkpoints like SIGTERM, and a run directory moved with `mv` resumes from its new place."""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from launcher.cli import main
from support import launch, ok, tiny_recipe, train_losses, write_recipe


# ---------------------------------------------------------------- the model folder, before any load

def _truncate(path: Path, keep: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep is None else keep])


def _no_weights(folder: Path) -> None:
    for path in folder.glob("*.safetensors"):
        path.unlink()


def _write_gguf(folder: Path, keep_bytes: int | None) -> None:
    """A tiny GGUF (one F32 tensor, a context length), cut to `keep_bytes` when given."""
    import gguf
    import numpy as np
    path = folder / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(256)
    writer.add_tensor("token_embd.weight", np.zeros((16, 64), dtype=np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    if keep_bytes is not None:
        _truncate(path, path.stat().st_size - keep_bytes)


FOLDER_DEFECTS = {  # name: (damage to a copy of the tiny model, recipe changes, what the line must say)
    "no-config": (lambda m: (m / "config.json").unlink(), {}, "{m}: no config.json"),
    "config-not-json": (lambda m: (m / "config.json").write_text("{\"hidden_size\": 32,"), {}, "{m}/config.json: not valid JSON"),
    "truncated-safetensors": (lambda m: _truncate(m / "model.safetensors"), {}, "{m}/model.safetensors: truncated"),
    "empty-safetensors": (lambda m: _truncate(m / "model.safetensors", 0), {}, "{m}/model.safetensors: truncated or not a safetensors"),
    "no-weights": (_no_weights, {}, "{m}: no weights file"),
    "no-tokenizer": (lambda m: [(m / n).unlink() for n in ("tokenizer.json", "vocab.json")], {}, "{m}: no tokenizer files"),
    "truncated-gguf": (lambda m: _write_gguf(m, 100), {"model": {"gguf_file": "m.gguf"}}, "{m}/m.gguf: truncated"),
    "max-length-beyond-positions": (lambda m: None, {"data": {"max_length": 600}},
                                    "data.max_length 600 is beyond the model's position limit ({m}/config.json "
                                    "max_position_embeddings is 512)"),
    "generation-beyond-positions": (lambda m: None, {"data": {"max_length": 500}, "eval": {"samples": 2, "max_new_tokens": 64}},
                                    "data.max_length 500 + eval.max_new_tokens 64 is beyond"),
}


@pytest.mark.parametrize("name", sorted(FOLDER_DEFECTS))
def test_a_damaged_model_folder_is_one_line_before_any_load(tmp_path, tiny_model, capsys, name):
    damage, changes, expected = FOLDER_DEFECTS[name]
    model = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    damage(model)
    recipe = tiny_recipe(model, tmp_path / "run")
    for section, values in changes.items():
        recipe[section] = {**recipe.get(section, {}), **values}
    path = write_recipe(recipe, tmp_path / "r.yaml")
    for verb in ("validate", "train"):
        assert main([verb, str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert expected.format(m=model) in err, err
    assert not (tmp_path / "run").exists()


def test_an_intact_gguf_passes_the_header_check(tmp_path):
    from launcher.preflight.modelfolder import check_gguf
    _write_gguf(tmp_path, None)
    assert check_gguf(tmp_path / "m.gguf") == 256


def test_a_sharded_index_naming_a_missing_shard_is_refused(tmp_path, tiny_model, capsys):
    model = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    (model / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    path = write_recipe(tiny_recipe(model, tmp_path / "run"), tmp_path / "r.yaml")
    assert main(["validate", str(path)]) == 2
    assert "model.safetensors.index.json: names 2 shards not in the folder" in capsys.readouterr().err


def test_a_truncated_safetensors_reaches_the_terminal_as_one_line(tmp_path, tiny_model):
    model = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    _truncate(model / "model.safetensors")
    result = launch([write_recipe(tiny_recipe(model, tmp_path / "run"), tmp_path / "r.yaml")])
    assert result.returncode == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
