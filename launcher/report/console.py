"""What the person running the launcher sees: a header, one indicator per slow phase, the training bar, the end.

On a terminal, one rich live display holds the training bar and the phase spinners (rich allows one
live display at a time, so both are tasks of the same `Progress`). When stdout is a file (a Slurm
log, `> run.log`), the same events are plain lines: a phase prints when it starts and when it ends,
and the bar becomes one line per logged step. Only the main process prints; the console of every
other rank is silent, so call sites never branch on rank.

`quiet_libraries` turns off what third-party libraries print on their own in the launcher's phases
(their progress bars, deprecation warnings known to be harmless): the launcher reports those phases itself.
"""
from __future__ import annotations

import os
import time
import warnings
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console as RichConsole
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn

# Library warnings that say nothing a launcher user can act on: (category, message regex).
HARMLESS_WARNINGS = (
    (FutureWarning, r".*`is_gradient_checkpointing` is deprecated"),        # peft calls it on transformers 5
    (FutureWarning, r".*`gradient_checkpointing_enable` is deprecated"),    # peft's prepare_model_for_kbit_training
)


def quiet_libraries() -> None:
    """Library progress bars off and known-harmless library warnings filtered: the launcher reports its phases itself.

    Environment switches only (read when each library loads), so this imports nothing and runs first in `main`.
    """
    for name, value in (("HF_HUB_DISABLE_PROGRESS_BARS", "1"),  # also transformers' own bars ("Loading weights")
                        ("HF_DATASETS_DISABLE_PROGRESS_BARS", "1"), ("TQDM_DISABLE", "1"),  # the GGUF conversion's bar
                        ("TRANSFORMERS_VERBOSITY", "error"), ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")):
        os.environ.setdefault(name, value)
    for category, message in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def clock(seconds: float) -> str:
    """1:02:03 / 2:03 / 4.1 s."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Phase:
    """One slow phase; `advance(n)` when it counts units (eval rows)."""

    def __init__(self, console: "Console", name: str, total: int | None, unit: str) -> None:
        self.console, self.name, self.total, self.unit = console, name, total, unit
        self.done, self.started = 0, time.perf_counter()
        self.task = None
        if console.live:
            self.task = console.display().add_task(name, total=total, status=self.status())
            console.progress.refresh()  # shown now, also while training (no redraw thread then)

    def status(self) -> str:
        count = f"{self.done}/{self.total} {self.unit}  " if self.total else ""
        return f"{count}{clock(time.perf_counter() - self.started)}"

    def advance(self, count: int = 1) -> None:
        self.done = min(self.done + count, self.total) if self.total else self.done + count
        if self.task is not None:
            self.console.progress.update(self.task, completed=self.done, status=self.status(), refresh=True)

    def end(self, finished: bool = True) -> None:
        """The spinner goes; one line stays, on a terminal as in a log (none when the phase failed)."""
        if self.task is not None:
            self.console.progress.remove_task(self.task)
            if not self.console.progress.tasks:  # nothing else on screen: no live display between phases
                self.console.close()
            else:
                self.console.progress.refresh()
        if self.console.active and finished:
            count = f" ({self.done}/{self.total} {self.unit})" if self.total else ""
            self.console.print(f"{self.name}: done{count} in {clock(time.perf_counter() - self.started)}")


class Console:
    """The main process's terminal or log; silent on other ranks."""

    def __init__(self, active: bool) -> None:
        self.active = active
        self.rich = RichConsole(highlight=False, soft_wrap=True)
        self.live = active and self.rich.is_terminal
        self.progress: Progress | None = None
        self.train_task = None
        self.started = time.perf_counter()
        self.redraw_on_change = False  # from training on: redrawn by each update, with no refresh thread (issue #29)

    def display(self) -> Progress:
        """The live display, started on demand (only while a phase or the training bar is showing), so an
        error between phases leaves a normal terminal behind.

        Before training, rich's refresh thread animates the spinners of phases that count nothing (loading the
        model). From training on there is none: it would redraw ten times a second, taking CPU time and the GIL
        from the step; the bar changes once a step and is redrawn then."""
        if self.progress is None:
            self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=30),
                                     TextColumn("{task.fields[status]}"), console=self.rich, transient=False,
                                     auto_refresh=not self.redraw_on_change)
            self.progress.start()
        return self.progress

    def print(self, *parts) -> None:
        if self.active:
            self.rich.print(*parts)

    def header(self, rows: dict[str, str]) -> None:
        """The start-of-run block: what is running, where, at which step."""
        if not self.active:
            return
        width = max(map(len, rows))
        self.rich.print("\n".join(f"{name.ljust(width)}  {value}" for name, value in rows.items()))

    @contextmanager
    def phase(self, name: str, total: int | None = None, unit: str = "rows") -> Iterator[Phase]:
        """A spinner (terminal) or a start and an end line (log) around a slow phase."""
        if self.active and not self.live:
            self.print(f"{name} ...")
        phase = Phase(self, name, total, unit)
        try:
            yield phase
        except BaseException:
            phase.end(finished=False)  # no "done" line for a phase that failed
            raise
        phase.end()

    # ---------------------------------------------------------------- the training bar

    def start_training(self, total: int, start: int) -> None:
        self.bar_total, self.bar_start, self.bar_began = total, start, time.perf_counter()
        if self.live:
            self.close()  # a display still up was started with a refresh thread
            self.redraw_on_change = True
            self.train_task = self.display().add_task("train", total=total, completed=start, status=f"step {start}/{total}")
            self.progress.refresh()

    def step(self, step: int, fields: dict[str, str], log_line: bool) -> None:
        """The bar after optimiser step `step`: counts from the resume step, so its ETA is this run's."""
        elapsed = time.perf_counter() - self.bar_began
        done = step - self.bar_start
        left = (self.bar_total - step) * elapsed / done if done else 0.0
        status = "  ".join([f"step {step}/{self.bar_total}", *(f"{k} {v}" for k, v in fields.items()),
                            f"elapsed {clock(elapsed)}", f"eta {clock(left)}"])
        if self.train_task is not None:
            self.display().update(self.train_task, completed=step, status=status, refresh=True)
        elif log_line:
            self.print(status)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress, self.train_task = None, None


def header_rows(session, resume_from, resume_step: int) -> dict[str, str]:
    """What is about to run, from a train.Run: the lines a user checks before walking away."""
    recipe, accelerator, plan = session.recipe, session.accelerator, session.plan
    method = {"lora": f"lora (r {recipe.lora.r}, alpha {recipe.lora.alpha:g})",
              "qlora": f"qlora ({recipe.quant.bits}-bit {recipe.quant.type if recipe.quant.bits == 4 else 'int8'}, r {recipe.lora.r})"}
    device = accelerator.device
    if device.type == "cuda":
        import torch
        device_name = f"cuda ({torch.cuda.get_device_name(device)})"
    else:
        device_name = device.type
    precision = {"no": "fp32"}.get(str(accelerator.mixed_precision), str(accelerator.mixed_precision))
    train = recipe.train
    return {
        "model": f"{session.weights} ({recipe.model.task})",
        "method": method.get(recipe.method, recipe.method),
        "strategy": session.strategy.name,
        "processes": f"{accelerator.num_processes} x {device_name}",
        "precision": precision,
        "global batch": f"{plan.global_batch} = {train.micro_batch_size} micro x {train.grad_accum} accum "
                        + (f"x {plan.world} processes" if plan.world == accelerator.num_processes else
                           f"x {plan.world} sequence groups of {accelerator.num_processes // plan.world} processes"),
        "steps": f"{session.total_steps} ({plan.steps_per_epoch} per epoch)",
        "output": str(session.run_dir),
        "resume": f"step {resume_step} from {resume_from}" if resume_from is not None else "none (fresh run)",
    }


def end_line(started: float, totals: dict, device, peak_gib: float | None = None) -> str:
    """Wall time, average training throughput and peak GPU memory of the whole run (`peak_gib`: the run's, as the
    memory record measured it; the allocator's own peak restarts with each measured pass)."""
    wall = time.perf_counter() - started
    rate = totals["tokens"] / totals["seconds"] if totals.get("seconds") else 0.0
    line = f"finished in {clock(wall)}: {rate:,.0f} tokens/s on average over the training steps"
    if device.type == "cuda":
        import torch
        line += f", peak memory {peak_gib if peak_gib is not None else torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
    return line
