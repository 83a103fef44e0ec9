"""Checkpoints: exact resume, crash safety, never clobbering a run, and one code path for every launcher."""
import os
import signal
import subprocess
import sys
import time

import pytest

from support import REPO, build_tiny_llama, launch, run_here, train_losses, tiny_recipe, write_recipe


@pytest.fixture(scope="module")
def dropout_llama(tmp_path_factory):
    """Attention dropout makes the loss depend on the RNG, so resume must restore it."""
    folder = build_tiny_llama(tmp_path_factory.mktemp("dropout-llama"))
    import json
    config = json.loads((folder / "config.json").read_text())
    config["attention_dropout"] = 0.2
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("method", ["lora", "full"])
def test_ten_steps_straight_equal_five_plus_resumed_five_bitwise(tmp_path, dropout_llama, method):
    straight = write_recipe(tiny_recipe(dropout_llama, tmp_path / "straight", method=method), tmp_path / "a.yaml")
    split = write_recipe(tiny_recipe(dropout_llama, tmp_path / "split", method=method), tmp_path / "b.yaml")
    assert run_here([straight]).returncode == 0
    first = run_here([split, "train.max_steps=5"])
    assert first.returncode == 0, first.stderr
    second = run_here([split])  # max_steps back to 10: the run continues from its step-5 checkpoint
    assert second.returncode == 0, second.stderr
    assert "resuming from" in second.stdout and "step-5" in second.stdout
    expected, resumed = train_losses(tmp_path / "straight"), train_losses(tmp_path / "split")
    assert sorted(resumed) == list(range(1, 11))
    assert [resumed[s] for s in range(1, 11)] == [expected[s] for s in range(1, 11)]  # bitwise, not approx
    assert len(set(expected.values())) > 5, "losses should vary from step to step"


def test_rerun_of_a_finished_run_says_nothing_is_left(tmp_path, tiny_model):
    recipe = write_recipe(tiny_recipe(tiny_model, tmp_path / "run", train={"max_steps": 2}), tmp_path / "r.yaml")
    assert run_here([recipe]).returncode == 0
    again = run_here([recipe])
    assert again.returncode == 0
    assert "nothing left to train" in again.stdout and "step 2 of 2" in again.stdout
    # A run stopped after its last checkpoint but before the export finishes the export, training nothing.
    losses = train_losses(tmp_path / "run")
    import shutil
    shutil.rmtree(tmp_path / "run" / "final")
    export = run_here([recipe])
    assert export.returncode == 0, export.stderr
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()
    assert train_losses(tmp_path / "run") == losses


def test_changed_recipe_refuses_to_reuse_the_run_dir(tmp_path, tiny_model):
    recipe = write_recipe(tiny_recipe(tiny_model, tmp_path / "run", train={"max_steps": 2}), tmp_path / "r.yaml")
    assert run_here([recipe]).returncode == 0
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    refused = run_here([recipe, "train.lr=1e-4"])
    assert refused.returncode == 2
    assert "holds a run with a different recipe (train.lr changed)" in refused.stderr and "--overwrite" in refused.stderr
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before, "the old run must be untouched"
    fresh = run_here([recipe, "train.lr=1e-4", "--overwrite"])
    assert fresh.returncode == 0, fresh.stderr
    assert sorted(train_losses(tmp_path / "run")) == [1, 2]


def test_foreign_folder_is_never_used_as_output_dir(tmp_path, tiny_model):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    recipe = write_recipe(tiny_recipe(tiny_model, tmp_path / "mine"), tmp_path / "r.yaml")
    result = run_here([recipe])
    assert result.returncode == 2 and "is not a launcher run" in result.stderr
    assert os.listdir(tmp_path / "mine") == ["thesis.tex"]


def test_sigkill_during_checkpoint_save_keeps_the_previous_one(tmp_path):
    """A model large enough that saving takes a while; the process is killed once step-4 is being written."""
    model = build_tiny_llama(tmp_path / "model", hidden=256, layers=4)
    run = tmp_path / "run"
    recipe = write_recipe(tiny_recipe(model, run, method="full", train={"max_steps": 6, "save_every": 2, "grad_accum": 1}),
                          tmp_path / "r.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "launcher", str(recipe)], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = run / "checkpoints" / "step-4.tmp"
    deadline = time.time() + 240
    while not staging.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert staging.exists(), "the run never started writing step-4"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (run / "checkpoints" / "step-4").exists()
    assert (run / "checkpoints" / "step-2" / "trainer_state.json").is_file()
    resumed = run_here([recipe])
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout and "step-2 at step 2" in resumed.stdout
    assert not staging.exists()
    assert sorted(train_losses(run))[-1] == 6 and (run / "final" / "model.safetensors").is_file()


def test_the_entry_point_and_accelerate_launch_give_the_same_losses(tmp_path, tiny_model):
    plain = write_recipe(tiny_recipe(tiny_model, tmp_path / "plain", train={"max_steps": 4}), tmp_path / "p.yaml")
    accel = write_recipe(tiny_recipe(tiny_model, tmp_path / "accel", train={"max_steps": 4}), tmp_path / "a.yaml")
    assert run_here([plain]).returncode == 0
    result = launch(["-m", "launcher", accel], prefix=[sys.executable, "-m", "accelerate.commands.launch", "--cpu",
                                                         "--num_processes", "1", "--num_machines", "1",
                                                         "--mixed_precision", "no", "--dynamo_backend", "no"])
    assert result.returncode == 0, result.stderr
    expected, seen = train_losses(tmp_path / "plain"), train_losses(tmp_path / "accel")
    assert len(expected) == 4 and seen == expected
