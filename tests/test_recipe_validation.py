"""Bad input: one clear message naming the key, file, row or field; exit status 2; no traceback."""
import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from launcher.cli import main
from support import header_only_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def good_recipe(tmp_path) -> dict:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"en": f"verse {i}", "es": f"verso {i}"}) + "\n" for i in range(8)))
    model = header_only_model(tmp_path / "model")
    return {"model": {"path": str(model)}, "method": "lora",
            "data": {"train": str(data), "format": "translation", "fields": {"source": "en", "target": "es"}},
            "train": {"max_steps": 2, "micro_batch_size": 2, "lr": 1e-3}, "output_dir": str(tmp_path / "run")}


def write(tmp_path, recipe, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe) if not isinstance(recipe, str) else recipe)
    return str(path)


def set_key(recipe: dict, dotted: str, value):
    node = recipe
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    if value is DELETE:
        node.pop(last)
    else:
        node[last] = value
    return recipe


DELETE = object()

# (case id, dotted key to change, new value, fragment the error must contain)
BAD_RECIPES = [
    ("top-level typo", "trian", {"lr": 1e-3}, "unknown key 'trian'; did you mean 'train'?"),
    ("nested typo", "train.micro_batch", 4, "unknown key 'train.micro_batch'; did you mean 'micro_batch_size'?"),
    ("lora typo", "lora.alpah", 8, "unknown key 'lora.alpah'; did you mean 'alpha'?"),
    ("wrong type", "train.lr", "fast", "key 'train.lr': Input should be a valid number"),
    ("out of range", "train.lr", 5, "key 'train.lr': Input should be less than or equal to 1"),
    ("zero batch", "train.micro_batch_size", 0, "key 'train.micro_batch_size': Input should be greater than or equal to 1"),
    ("bad method", "method", "adapters", "key 'method': Input should be 'full', 'lora' or 'qlora'"),
    ("qlora 8-bit with fsdp", "quant.bits", 8, "method: qlora with quant.bits 8 and distributed.strategy: fsdp"),
    ("missing output_dir", "output_dir", DELETE, "missing key 'output_dir'"),
    ("missing data file", "data.train", "/nonexistent/train.jsonl", "key 'data.train': file not found: /nonexistent/train.jsonl"),
    ("missing model folder", "model.path", "/nonexistent/model", "key 'model.path': folder not found: /nonexistent/model"),
    ("freeze with lora", "freeze", {"embeddings": True}, "freeze: applies only with method full"),
    ("field typo", "data.fields", {"sorce": "en"}, "unknown key 'data.fields.sorce'; did you mean 'source'?"),
    ("eval twice", "data.eval_fraction", 0.1, None),  # filled below with an eval file
    ("bad format", "data.format", "csv", "key 'data.format': Input should be"),
    ("bad schedule", "train.schedule", "step", "key 'train.schedule'"),
    ("bad dropout", "lora.dropout", 1.5, "key 'lora.dropout': Input should be less than 1"),
    ("warmup past the run", "train.warmup_steps", 5,
     "train.warmup_steps 5 is more than the run's 2 steps (train.max_steps): the learning rate would never reach train.lr"),
    ("samples without eval data", "eval.samples", 2, "eval.samples: applies only when data.eval or data.eval_fraction is set"),
    ("home of no user", "output_dir", "~no_such_user_here/run", "key 'output_dir': there is no user 'no_such_user_here'"),
]


@pytest.mark.parametrize("case,key,value,expected", BAD_RECIPES, ids=[c[0] for c in BAD_RECIPES])
def test_bad_recipe_names_the_key(tmp_path, capsys, case, key, value, expected):
    recipe = set_key(good_recipe(tmp_path), key, value)
    if case == "qlora 8-bit with fsdp":  # 4-bit QLoRA shards under FSDP2 (tests/test_distributed_qlora.py); 8-bit cannot
        recipe["method"], recipe["distributed"] = "qlora", {"strategy": "fsdp"}
    if case == "eval twice":
        recipe["data"]["eval"] = recipe["data"]["train"]
        expected = "data.eval and data.eval_fraction both set"
    assert main(["validate", write(tmp_path, recipe)]) == 2
    err = capsys.readouterr().err
    assert expected in err
    assert err.count("\n") == 1 and "Traceback" not in err


BAD_OVERRIDES = [
    ("train.lrr=1e-4", "unknown key 'train.lrr'; did you mean 'lr'?"),
    ("train.epochs=-1", "key 'train.epochs': Input should be greater than 0"),
    ("train.lr", "override 'train.lr' is not of the form key.path=value"),
    ("data.max_length=many", "key 'data.max_length': Input should be a valid integer"),
]


@pytest.mark.parametrize("override,expected", BAD_OVERRIDES)
def test_bad_override_is_checked_like_the_file(tmp_path, capsys, override, expected):
    assert main(["validate", write(tmp_path, good_recipe(tmp_path)), override]) == 2
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize("home", ["", None])
def test_a_home_path_without_a_home_is_refused_not_put_at_the_root(tmp_path, home):
    """HOME empty makes expanduser turn `~/run` into `/run`; unset, it falls back on the password database. Either
    way the recipe's `~` has no home the user set: refused naming the key (schema._path is the one expansion)."""
    recipe = write(tmp_path, {**good_recipe(tmp_path), "output_dir": "~/launcher-test-run"})
    env = {key: value for key, value in os.environ.items() if key != "HOME"} | ({"HOME": home} if home is not None else {})
    env["PYTHONPATH"] = REPO
    done = subprocess.run([sys.executable, "-m", "launcher", "validate", recipe], capture_output=True, text=True, env=env)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "key 'output_dir': starts with ~ but HOME is empty or unset" in done.stderr
    assert not os.path.exists("/launcher-test-run")


def test_override_changes_the_value(tmp_path, capsys):
    assert main(["validate", write(tmp_path, good_recipe(tmp_path)), "train.lr=3e-4"]) == 0
    from launcher.recipe.files import load_recipe
    assert load_recipe(tmp_path / "recipe.yaml", ["train.lr=3e-4", "lora.target_modules=[q_proj,v_proj]"]).lora.target_modules == ["q_proj", "v_proj"]


def test_yaml_syntax_error_names_the_line(tmp_path, capsys):
    path = write(tmp_path, "model:\n  path: x\n\tdata: 1\n")
    assert main(["validate", path]) == 2
    assert f"{path} line 3: not valid YAML" in capsys.readouterr().err


def test_recipe_must_be_a_mapping(tmp_path, capsys):
    assert main(["validate", write(tmp_path, "- a\n- b\n")]) == 2
    assert "a recipe is a mapping of keys, got list" in capsys.readouterr().err


def test_missing_recipe_file(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "recipe file not found" in capsys.readouterr().err


def test_base_inheritance_merges_and_detects_cycles(tmp_path, capsys):
    base = good_recipe(tmp_path)
    write(tmp_path, base, "base.yaml")
    child = write(tmp_path, {"base": "base.yaml", "train": {"lr": 5e-5}}, "child.yaml")
    from launcher.recipe.files import load_recipe
    loaded = load_recipe(child)
    assert loaded.train.lr == 5e-5 and loaded.train.max_steps == 2 and loaded.data.format == "translation"
    write(tmp_path, {"base": "b.yaml"}, "a.yaml")
    write(tmp_path, {"base": "a.yaml"}, "b.yaml")
    assert main(["validate", str(tmp_path / "a.yaml")]) == 2
    assert "'base' forms a cycle: a.yaml -> b.yaml -> a.yaml" in capsys.readouterr().err


# (case id, file name, content, fragment the error must contain)
BAD_DATA = [
    ("invalid json row", "t.jsonl", '{"en": "a", "es": "b"}\n{"en": "a", "es": "b"}\n{"en": "a", \n', "t.jsonl:3: not valid JSON"),
    ("missing field", "t.jsonl", '{"en": "a", "es": "b"}\n{"en": "a", "spanish": "b"}\n',
     "t.jsonl:2: es: missing (data.fields.target); format translation needs field 'target'; this row has: en, spanish"),
    ("not text", "t.jsonl", '{"en": "a", "es": 7}\n', "t.jsonl:1: es: expected text, got int"),
    ("not an object", "t.jsonl", '["en", "es"]\n', "t.jsonl:1: expected a JSON object, got list"),
    ("empty file", "t.jsonl", "\n", "t.jsonl: no rows"),
    ("unsupported type", "t.xml", "<a/>\n", "t.xml: unsupported data file type '.xml'"),
    ("csv missing column", "t.csv", "en,target\na,b\n", "t.csv:1: es: missing"),
    ("json not a list", "t.json", '{"en": "a"}', "t.json: a .json data file must hold a list of objects, got dict"),
]


@pytest.mark.parametrize("case,name,content,expected", BAD_DATA, ids=[c[0] for c in BAD_DATA])
def test_bad_data_names_file_row_and_field(tmp_path, capsys, case, name, content, expected):
    (tmp_path / name).write_text(content)
    recipe = set_key(good_recipe(tmp_path), "data.train", str(tmp_path / name))
    assert main(["validate", write(tmp_path, recipe)]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


BAD_CHATS = [
    ("bad role", [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}], ":1: messages[1].role: expected system, user or assistant, got 'bot'"),
    ("no assistant", [{"role": "user", "content": "hi"}], ":1: messages: no assistant turn to train on"),
    ("content not text", [{"role": "user", "content": ["hi"]}], ":1: messages[0].content: expected text, got list"),
]


@pytest.mark.parametrize("case,messages,expected", BAD_CHATS, ids=[c[0] for c in BAD_CHATS])
def test_bad_chat_rows(tmp_path, capsys, case, messages, expected):
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": messages}) + "\n")
    recipe = good_recipe(tmp_path)
    recipe["data"] = {"train": str(tmp_path / "chat.jsonl"), "format": "chat"}
    assert main(["validate", write(tmp_path, recipe)]) == 2
    assert expected in capsys.readouterr().err


def run_cli(*args, timeout=120):
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "launcher", *args], capture_output=True, text=True, cwd=REPO, timeout=timeout)
    return result, time.perf_counter() - started


def test_validate_is_fast_exits_2_and_suggests(tmp_path):
    recipe = good_recipe(tmp_path)
    recipe["train"]["learning_rat"] = recipe["train"].pop("lr")
    result, seconds = run_cli("validate", write(tmp_path, recipe))
    assert result.returncode == 2
    assert "unknown key 'train.learning_rat'" in result.stderr
    assert "Traceback" not in result.stderr
    # About 2 s on an idle 2-core machine; the bound leaves room for a loaded one. That validate imports
    # no torch at all is asserted in tests/test_shape.py.
    assert seconds < 5.0, f"validate took {seconds:.2f}s"


def test_train_on_bad_data_fails_before_loading_any_model(tmp_path):
    """The model folder is empty: reaching model loading would crash differently."""
    (tmp_path / "bad.jsonl").write_text('{"en": "a"}\n')
    recipe = set_key(good_recipe(tmp_path), "data.train", str(tmp_path / "bad.jsonl"))
    result, _ = run_cli(write(tmp_path, recipe))
    assert result.returncode == 2
    assert result.stderr.strip().endswith("bad.jsonl:1: es: missing (data.fields.target); format translation needs field "
                                          "'target'; this row has: en; map yours with data.fields.target")
    assert not (tmp_path / "run").exists(), "nothing may be written for bad input"
