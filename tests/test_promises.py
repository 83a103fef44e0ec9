"""Promises by construction (issue 24): the model folder is read before any load, a damaged checkpoint
is passed over for the newest intact one, an OS failure during a save is one line with nothing lost,
Ctrl-C checkpoints like SIGTERM, and a run directory moved with `mv` resumes from its new place."""
from __future__ import annotations

import json
import shutil
import struct
from contextlib import contextmanager
from pathlib import Path

import pytest

from launcher.cli import main
from support import launch, ok, run_here, tiny_recipe, train_losses, write_recipe


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
    "no-tokenizer": (lambda m: [(m / n).unlink(missing_ok=True) for n in ("tokenizer.json", "vocab.json")], {}, "{m}: no tokenizer files"),
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


# ---------------------------------------------------------------- damaged checkpoints, moved runs, full disks, Ctrl-C

STEPS = 6


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_model) -> Path:
    """One short run with a checkpoint after every step (step-1 .. step-6) and no eval: the cases copy it."""
    root = tmp_path_factory.mktemp("straight")
    recipe = tiny_recipe(tiny_model, root / "run", data={"eval": None},
                         train={"max_steps": STEPS, "save_every": 1, "keep_last": STEPS})
    ok(run_here([write_recipe(recipe, root / "r.yaml")]))
    return root / "run"


def copy_run(straight: Path, where: Path, keep_up_to: int) -> Path:
    """A copy of the straight run (a moved run: its recipe.yaml names the old place) with checkpoints up to
    `keep_up_to` and no final/, as if it had stopped there."""
    run = Path(shutil.copytree(straight, where))
    for folder in (run / "checkpoints").glob("step-*"):
        if int(folder.name.removeprefix("step-")) > keep_up_to:
            shutil.rmtree(folder)
    shutil.rmtree(run / "final")
    return run


def step_files(run: Path) -> dict:
    return {str(p.relative_to(run)): p.stat().st_size for p in sorted((run / "checkpoints").rglob("*"))}


def _damage(run: Path) -> dict[int, str]:
    """One kind of damage per checkpoint, newest first; step-2 stays intact. Returns step -> the reason expected."""
    folder = run / "checkpoints"
    (folder / "step-6" / "scheduler.pt").unlink()
    _truncate(folder / "step-5" / "trainable.pt")  # the adapter's weights and optimiser state
    (folder / "step-4" / "trainer_state.json").write_text("")
    (folder / "step-3" / "rng-0.pt").unlink()
    return {6: "scheduler.pt is missing", 5: "trainable.pt is", 4: "trainer_state.json is empty", 3: "rng-0.pt is missing"}


def test_damaged_checkpoints_are_passed_over_for_the_newest_intact_one_in_a_moved_run(tmp_path, straight):
    """Each damaged checkpoint is one line and the newest intact one resumes exactly; the copy is also a run
    moved with `mv` (its recipe.yaml names the old output_dir), resumed by naming its new place."""
    run = copy_run(straight, tmp_path / "elsewhere" / "moved", keep_up_to=STEPS)
    expected_reasons = _damage(run)
    result = ok(run_here(["train", run]))
    lines = [line for line in result.stdout.splitlines() if "is damaged" in line]
    assert len(lines) == 4, result.stdout
    for line, (step, reason) in zip(lines, sorted(expected_reasons.items(), reverse=True)):
        assert f"step-{step} is damaged ({reason}" in line and "resuming from step-2, the newest intact checkpoint" in line
    assert f"resuming from {run / 'checkpoints' / 'step-2'} at step 2" in result.stdout
    losses, expected = train_losses(run), train_losses(straight)  # the straight run resumed from step-2 gives these
    assert [losses[s] for s in range(3, STEPS + 1)] == [expected[s] for s in range(3, STEPS + 1)]
    from launcher.checkpoint.saves import newest_intact
    assert newest_intact(run) == (run / "checkpoints" / f"step-{STEPS}", [])  # each damaged one replaced by a good save
    assert (run / "final").is_dir() and not (straight / "checkpoints" / f"step-{STEPS}.tmp").exists()


def test_a_checksum_catches_a_changed_byte_of_the_same_size(tmp_path, straight):
    from launcher.checkpoint.saves import damage
    run = copy_run(straight, tmp_path / "run", keep_up_to=1)
    weights = run / "checkpoints" / "step-1" / "trainable.pt"
    assert damage(weights.parent) is None
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert damage(weights.parent) == "trainable.pt differs from what was saved (checksum)"


def test_no_intact_checkpoint_is_one_line_and_nothing_is_deleted(tmp_path, straight):
    run = copy_run(straight, tmp_path / "run", keep_up_to=2)
    for step in (1, 2):
        (run / "checkpoints" / f"step-{step}" / "rng-0.pt").unlink()
    before = step_files(run)
    result = run_here(["train", run])
    assert result.returncode == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "no intact checkpoint to resume from (step-2: rng-0.pt is missing; step-1: rng-0.pt is missing)" in result.stderr
    assert step_files(run) == before


def _file_size_limit(limit: int):
    """For preexec_fn: no file of the launched process may grow past `limit` bytes (a write past it fails with
    EFBIG, as a full disk fails with ENOSPC), without the SIGXFSZ that would kill it first."""
    def apply() -> None:
        import resource
        import signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_refused_write_during_a_checkpoint_is_one_line_and_the_rerun_resumes(tmp_path, straight):
    import os
    import subprocess
    import sys
    from launcher.checkpoint.saves import damage
    run = copy_run(straight, tmp_path / "run", keep_up_to=2)
    trainable = (run / "checkpoints" / "step-2" / "trainable.pt").stat().st_size
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    full = subprocess.run([sys.executable, "-m", "launcher", "train", str(run)], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[1], timeout=300, preexec_fn=_file_size_limit(trainable // 2))
    errors = [line for line in full.stderr.splitlines() if line.startswith("error: ")]  # libraries' own notes may precede it
    assert full.returncode == 2 and len(errors) == 1 and full.stderr.endswith(errors[0] + "\n"), full.stderr
    step3 = run / "checkpoints" / "step-3"
    assert f"checkpoint of step 3: writing {step3} failed: File too large; it needs about" in full.stderr
    assert "checkpoint (step 3): done" not in full.stdout and "Traceback" not in full.stdout + full.stderr
    assert not step3.exists() and not (run / "checkpoints" / "step-3.tmp").exists()
    assert damage(run / "checkpoints" / "step-2") is None and damage(run / "checkpoints" / "step-1") is None

    again = ok(run_here(["train", run]))  # the space is back
    assert f"resuming from {run / 'checkpoints' / 'step-2'} at step 2" in again.stdout
    losses, expected = train_losses(run), train_losses(straight)
    assert [losses[s] for s in range(3, STEPS + 1)] == [expected[s] for s in range(3, STEPS + 1)]


def test_a_refused_write_is_named_with_its_errno_from_any_writer():
    import errno
    from launcher.checkpoint.diskspace import write_errno
    assert write_errno(OSError(errno.ENOSPC, "No space left on device")) == errno.ENOSPC
    assert write_errno(RuntimeError("Error while serializing: I/O error: Read-only file system (os error 30)")) == errno.EROFS
    try:
        try:
            raise PermissionError(errno.EACCES, "Permission denied")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    except RuntimeError as chained:
        assert write_errno(chained) == errno.EACCES
    assert write_errno(RuntimeError("basic_ios::clear: iostream error")) == 0
    assert write_errno(ValueError("not a write")) is None


def _interrupted(tmp_path, tiny_model):
    """A long run sent Ctrl-C (SIGINT) once it has logged a step; returns (exit status, output, run dir)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    run = tmp_path / "run"
    recipe = tiny_recipe(tiny_model, run, data={"eval": None}, train={"max_steps": 100000, "log_every": 1})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with open(tmp_path / "out.log", "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "launcher", str(write_recipe(recipe, tmp_path / "r.yaml"))],
                                   cwd=Path(__file__).resolve().parents[1], env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while not (run / "metrics.jsonl").exists() or '"kind": "train"' not in (run / "metrics.jsonl").read_text():
                assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "out.log").read_text()
                time.sleep(0.05)
            process.send_signal(signal.SIGINT)
            status = process.wait(timeout=120)
        finally:
            process.kill()
    return status, (tmp_path / "out.log").read_text(), run


def test_ctrl_c_writes_a_checkpoint_and_exits_130_without_a_traceback(tmp_path, tiny_model):
    import re
    from launcher.checkpoint.saves import damage
    status, output, run = _interrupted(tmp_path, tiny_model)
    assert status == 130 and "Traceback" not in output and "KeyboardInterrupt" not in output, output
    stopped = int(re.search(r"stopped by SIGINT after step (\d+)/100000; checkpoint written", output).group(1))
    assert damage(run / "checkpoints" / f"step-{stopped}") is None


def test_a_second_ctrl_c_stops_at_once():
    """Real signals to this process through the run's own handler (the earlier handlers restored after)."""
    import os
    import signal
    from launcher.training.stop import StopRequest
    earlier = {number: signal.getsignal(number) for number in StopRequest.SIGNALS}
    try:
        stop = StopRequest()
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signal == signal.SIGINT and stop.exit_status() == 130
        with pytest.raises(SystemExit) as stopped:
            os.kill(os.getpid(), signal.SIGINT)
        assert stopped.value.code == 130
    finally:
        for number, handler in earlier.items():
            signal.signal(number, handler)


def test_a_moved_run_named_by_its_recipe_and_a_new_output_dir_resumes(tmp_path, straight):
    import yaml
    from launcher.rundir.directory import plan_run_dir
    run = copy_run(straight, tmp_path / "moved", keep_up_to=2)
    resolved = {**yaml.safe_load((run / "recipe.yaml").read_text()), "output_dir": str(run)}
    assert plan_run_dir(run, resolved, overwrite=False).resume_from == run / "checkpoints" / "step-2"


def test_a_refused_write_during_an_export_removes_the_partial_folder_and_names_the_bytes(tmp_path):
    from launcher.checkpoint.diskspace import refused_writes
    from launcher.errors import UserError
    target, staging = tmp_path / "final", tmp_path / "final.tmp"
    staging.mkdir()
    (staging / "adapter_model.safetensors").write_bytes(b"partial")
    with pytest.raises(UserError) as refused:
        with refused_writes(target, 2048, f"export to {target}", staging):
            raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert str(refused.value).startswith(f"export to {target}: writing {target} failed: No space left on device; "
                                         f"it needs about 2.2 KB")
    assert not staging.exists()
    with pytest.raises(ValueError):  # not a write the filesystem refused: left as it was
        with refused_writes(target, 2048, "export", None):
            raise ValueError("a bug of ours")


# ---------------------------------------------------------------- a full disk during the export and the records

@contextmanager
def small_disk(folder: Path):
    """A tmpfs mounted at `folder` (a real disk that fills up: ENOSPC), resized with `resize`; None where this
    process may not mount one (not root), and the test falls back to a file-size limit (EFBIG)."""
    import os
    import subprocess
    folder.mkdir(parents=True, exist_ok=True)
    mounted = os.geteuid() == 0 and shutil.which("mount") and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(folder)], capture_output=True).returncode == 0
    try:
        yield folder if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], check=True)


def resize(disk: Path, free_bytes: int) -> None:
    """The tmpfs holds what it holds now and `free_bytes` more."""
    import os
    import subprocess
    stat = os.statvfs(disk)
    used = (stat.f_blocks - stat.f_bfree) * stat.f_frsize
    subprocess.run(["mount", "-o", f"remount,size={used + free_bytes}", str(disk)], check=True)


def _train(run: Path, limit: int | None = None):
    import os
    import subprocess
    import sys
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "launcher", "train", str(run)], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[1], timeout=300,
                          preexec_fn=_file_size_limit(limit) if limit else None)


def test_a_full_disk_during_the_export_is_one_line_and_the_rerun_after_freeing_space_finishes(tmp_path, straight):
    from launcher.checkpoint.saves import damage
    with small_disk(tmp_path / "disk") as disk:
        run = copy_run(straight, (disk or tmp_path) / "run", keep_up_to=STEPS)  # trained; stopped before the export
        for name in ("report.md", "loss.png"):
            (run / name).unlink()
        checkpoint = sum(f.stat().st_size for f in (run / "checkpoints" / f"step-{STEPS}").iterdir())
        tokenizer = (straight / "final" / "tokenizer.json").stat().st_size
        assert tokenizer > 2 * checkpoint  # room for the last checkpoint's rewrite, not for the export
        if disk is not None:
            resize(disk, 2 * checkpoint)
        full = _train(run, None if disk else (checkpoint + tokenizer) // 2)
        errors = [line for line in full.stderr.splitlines() if line.startswith("error: ")]
        assert full.returncode == 2 and len(errors) == 1 and full.stderr.endswith(errors[0] + "\n"), full.stderr
        assert f"export to {run / 'final'}" in errors[0] and "it needs about" in errors[0], errors[0]
        assert "saved" not in full.stdout and "Traceback" not in full.stdout + full.stderr
        assert not (run / "final").exists() and not (run / "final.tmp").exists() and not (run / "report.md").exists()
        assert damage(run / "checkpoints" / f"step-{STEPS}") is None
        if disk is not None:
            resize(disk, 64 * 2**20)  # the space is back
        again = _train(run)
        assert again.returncode == 0 and f"saved {run / 'final'}" in again.stdout, again.stderr
        assert (run / "final" / "adapter_model.safetensors").is_file() and (run / "report.md").is_file()


RECORD_WRITES = """
import sys, types
from pathlib import Path
from launcher.cli import refused
from launcher.errors import UserError
from launcher.report.records import write_rank_log, write_report
run = Path(sys.argv[1])
try:
    if sys.argv[2] == "log":
        write_rank_log(run, types.SimpleNamespace(process_index=0), {"note": "x" * 20000})
    else:
        write_report(run, {"summary": "y" * 20000}, [])
except UserError as exc:
    sys.exit(refused(str(exc)))
"""


@pytest.mark.parametrize("writer", ["log", "report"])
def test_a_full_disk_while_writing_the_records_is_one_line_and_keeps_what_they_held(tmp_path, writer):
    import os
    import subprocess
    import sys
    with small_disk(tmp_path / "disk") as disk:
        run = (disk or tmp_path) / "run"
        (run / "logs").mkdir(parents=True)
        log, report = run / "logs" / "rank-0.jsonl", run / "report.md"
        log.write_text('{"rank": 0, "step": 1}\n')
        report.write_text("# an earlier report\n")
        if disk is not None:
            resize(disk, 8192)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, "-c", RECORD_WRITES, str(run), writer], capture_output=True, text=True, env=env,
                              cwd=Path(__file__).resolve().parents[1], timeout=120,
                              preexec_fn=None if disk else _file_size_limit(4096))
        path = log if writer == "log" else report
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
        assert f"writing {path} failed" in done.stderr and "it needs about 21" in done.stderr  # 20000 bytes and a margin
        assert log.read_text() == '{"rank": 0, "step": 1}\n' and report.read_text() == "# an earlier report\n"
        assert sorted(p.name for p in run.iterdir()) == ["logs", "report.md"]  # no partial file left behind


def test_a_record_cut_by_a_kill_is_dropped_and_a_damaged_one_is_named(tmp_path):
    """metrics.jsonl as a run killed mid-append leaves it: the report leaves the cut line out, the next record
    starts a line of its own, and a damaged line before the end is one line naming file:line."""
    from launcher.checkpoint.diskspace import append_line
    from launcher.errors import UserError
    from launcher.report.records import read_metrics
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"kind": "train", "step": 1}\n{"kind": "tr')
    assert read_metrics(metrics) == [{"kind": "train", "step": 1}]
    append_line(metrics, '{"kind": "train", "step": 2}\n', "metrics record")
    assert read_metrics(metrics) == [{"kind": "train", "step": 1}, {"kind": "train", "step": 2}]
    metrics.write_text('{"kind": "train", "step": 1}\n{"kind": tr\n{"kind": "train", "step": 3}\n')
    with pytest.raises(UserError, match=f"{metrics}:2: not a JSON record"):
        read_metrics(metrics)


def test_a_damaged_provenance_file_is_one_line_before_the_model_loads(tmp_path, straight, capsys):
    run = copy_run(straight, tmp_path / "run", keep_up_to=2)
    (run / "provenance.json").write_text('[{"started": "2026-')  # as a kill during the old, unstaged write left it
    before = step_files(run)
    assert main(["train", str(run)]) == 2
    out, err = capsys.readouterr()
    assert err.startswith(f"error: {run / 'provenance.json'}: not valid JSON") and err.count("\n") == 1, err
    assert "loading model" not in out and step_files(run) == before
