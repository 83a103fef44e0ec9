"""Issue #29 at its root: the launcher's step computes what a hand-written PyTorch + PEFT step computes.

Seconds on a shared machine say little, so these compare what runs: the profiled op table of `train_step`
against a plain forward / backward / clip / AdamW step on the same batch and the same model, the width each
micro-batch is padded to, and which threads spend CPU time while the loop trains.
"""
from __future__ import annotations

import os
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch
from support import tiny_recipe, without_eval

from launcher.recipe.schema import Recipe
from launcher.report.console import Console
from launcher.training.loop import setup, train_step

# Ops that carry the step's arithmetic: matmuls, the attention kernels, loss, embedding gradient, the optimiser's update.
COMPUTE_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
               "aten::_scaled_dot_product_attention_math", "aten::log_softmax", "aten::nll_loss_nd",
               "aten::embedding_dense_backward", "aten::dropout", "aten::addcdiv_", "aten::lerp_", "aten::_foreach_norm")


@pytest.fixture(scope="module")
def session(tiny_model, tmp_path_factory):
    """One LoRA run set up in this process, as the issue's run: AdamW, clipping at 1.0, dropout 0, micro-batch 4."""
    recipe = tiny_recipe(tiny_model, tmp_path_factory.mktemp("speed") / "run", lora={"r": 4, "alpha": 8, "dropout": 0.0},
                         train={"max_steps": 8, "micro_batch_size": 4, "grad_accum": 1, "lr": 1e-3, "schedule": "constant",
                                "warmup_steps": 0, "max_grad_norm": 1.0, "optimizer": "adamw"},
                         data={"max_length": 128})
    recipe = without_eval(recipe)
    run = setup(Recipe.model_validate(recipe))
    run.model.train()
    yield run
    run.console.close()


def hand_written_step(model, optimizer, batch: dict) -> None:
    """What a user writes: forward with the attention mask, summed CE over shifted targets / their count, clip, step."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logits, targets = logits[:, :-1].float(), batch["labels"][:, 1:]
    total = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                              ignore_index=-100, reduction="sum")
    (total / (targets != -100).sum()).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad()


def op_table(step) -> tuple[Counter, int]:
    """(calls of each compute op, total FLOPs the profiler counts) of one call of `step`."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True,
                                with_flops=True) as profiled:
        step()
    events = profiled.events()
    return Counter(e.name for e in events if e.name in COMPUTE_OPS), sum(e.flops for e in events)


def test_a_step_computes_what_a_hand_written_step_computes(session):
    """Same matmuls, attention kernel, loss, optimiser ops and FLOPs on the same padded batch: no second lm_head
    pass, no recomputation, no trained embeddings, no dropout, no slow attention path."""
    batches = session.micro_batches(0)
    assert not bool(batches[0]["attention_mask"].all()), "the batch must hold padding, as real batches do"
    ours, our_flops = op_table(lambda: train_step(session, batches))
    trainable = [p for p in session.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=0.0)
    hand_written_step(session.model, optimizer, batches[0])  # the optimiser's state exists from here on, as in ours
    plain, plain_flops = op_table(lambda: hand_written_step(session.model, optimizer, batches[0]))
    assert ours == plain
    assert our_flops == pytest.approx(plain_flops, rel=1e-6)  # the loss scale and the guard add a few scalar FLOPs
    assert ours["aten::_scaled_dot_product_flash_attention_for_cpu"] == session.model.config.num_hidden_layers
    assert ours["aten::embedding_dense_backward"] == 0 and ours["aten::dropout"] == 0


def test_micro_batches_are_padded_to_their_longest_row_not_to_max_length(session):
    """Padding to data.max_length would multiply the work of short batches; each batch ends at its longest row."""
    train, max_length = session.data.train.dataset, session.recipe.data.max_length
    widths = []
    for step in range(4):
        for rows, batch in zip(session.plan.micro_batches(step), session.micro_batches(step)):
            longest = max(len(ids) for ids in train.select(rows)["input_ids"])
            assert batch["input_ids"].shape[1] == longest
            widths.append(longest)
    assert min(widths) < max_length, "some batch of the sample data is shorter than max_length"


def cpu_ticks_per_thread() -> dict[int, int]:
    """utime + stime of each thread of this process, in clock ticks (/proc/self/task/<tid>/stat fields 14, 15)."""
    ticks = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        ticks[int(tid)] = int(fields[11]) + int(fields[12])
    return ticks


def test_no_other_thread_works_while_the_loop_trains(session):
    """A tokenizer pool, tracker or watchdog busy during training would take cores from torch's threads: only the
    threads torch computes on (this one, and its OpenMP workers when it has more than one) may spend CPU time."""
    before = cpu_ticks_per_thread()
    for step in range(1, 5):
        train_step(session, session.micro_batches(step))
    after = cpu_ticks_per_thread()
    gained = {tid: after[tid] - before.get(tid, 0) for tid in after}
    main = gained.pop(threading.get_native_id())  # the thread running the loop
    others = sorted(gained.values(), reverse=True)
    busy = others[: max(0, torch.get_num_threads() - 1)]  # OpenMP workers
    rest = sum(others[len(busy):])
    assert main > 0
    assert rest <= max(2, main // 10), f"threads other than torch's spent {rest} ticks against the main thread's {main}"


def threads_beyond(started_with: set) -> set:
    """Threads alive now that were not in `started_with`, after giving each up to a second to end (a stopped
    display's refresh thread ends on its next tick)."""
    for thread in set(threading.enumerate()) - started_with:
        thread.join(timeout=1.0)
    return set(threading.enumerate()) - started_with


def test_on_a_terminal_the_training_bar_is_redrawn_by_its_updates_not_by_a_thread(capsys):
    """rich's live display redraws from a thread ten times a second; during training that thread would take CPU
    time and the GIL from the step, so from `start_training` on the bar and the phases redraw when they change."""
    started_with = set(threading.enumerate())
    os.environ["TTY_COMPATIBLE"] = "1"  # rich: treat the captured stdout as a terminal
    try:
        console = Console(True)
    finally:
        del os.environ["TTY_COMPATIBLE"]
    assert console.live
    with console.phase("loading model"):
        assert threads_beyond(started_with), "before training, a spinner animates from rich's thread"
    console.start_training(10, 0)
    console.step(1, {"loss": "2.5000"}, log_line=True)
    with console.phase("evaluation (step 1)", 4) as phase:
        phase.advance(2)
        assert threads_beyond(started_with) == set()
    console.step(2, {"loss": "2.2500"}, log_line=True)
    assert threads_beyond(started_with) == set()
    console.close()
    shown = capsys.readouterr().out
    assert "step 2/10" in shown and "loss 2.2500" in shown and "2/4 rows" in shown
