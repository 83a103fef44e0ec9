"""What the user keeps: metrics.jsonl (and the trackers), per-rank logs, report.md, loss.png, the console summary.

Every rank holds a Reporter; only the main process's writes or prints, so call sites never branch on rank.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from rich.table import Table

from launcher.checkpoint.diskspace import append_line, replace_whole
from launcher.errors import UserError
from launcher.report import trackers
from launcher.report.console import Console
from launcher.rundir.paths import RunDir
from launcher.training.guard import json_safe

PLOT_BYTES = 64 * 1024  # about what loss.png takes, for the message when it cannot be written


class Reporter:
    """metrics.jsonl, the experiment trackers and the console of one run; silent off the main process."""

    def __init__(self, run_dir: Path, accelerator, console: Console):
        self.run_dir, self.accelerator, self.console = run_dir, accelerator, console
        self.active = accelerator.is_main_process
        self.metrics_path = RunDir(run_dir).metrics
        self.log_every = 1

    def print(self, *parts) -> None:
        self.console.print(*parts)

    def log(self, record: dict) -> None:
        """Append one line to metrics.jsonl, and the same numbers to the recipe's trackers."""
        if not self.active:
            return
        record = {"time": round(time.time(), 3), **record}
        append_line(self.metrics_path, json.dumps(json_safe(record), allow_nan=False) + "\n", "metrics record")
        trackers.log(self.accelerator, record)

    def step(self, step: int, loss: float, lr: float, tokens_per_s: float, grad_norm: float | None,
             pairs: dict | None = None) -> None:
        fields = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}"}
        if pairs:  # objective dpo: the share of pairs whose chosen reply earns the higher reward, and by how much
            fields.update({"reward acc": f"{pairs['reward_accuracy']:.2f}", "margin": f"{pairs['reward_margin']:.3f}"})
        if grad_norm is not None:
            fields["grad norm"] = f"{grad_norm:.3g}"
        fields["tok/s"] = f"{tokens_per_s:,.0f}"
        peak = peak_memory(self.accelerator.device)
        if peak:
            fields["peak mem"] = peak
        self.console.step(step, fields, log_line=step % self.log_every == 0)


def peak_memory(device) -> str | None:
    """Peak memory allocated on a GPU in the step just run (launcher/memory/advice.py `measured_pass` restarts the
    allocator's peak as each step begins); None on CPU (no allocator statistics there)."""
    if device.type != "cuda":
        return None
    import torch
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"


def write_rank_log(run_dir: Path, accelerator, record: dict) -> None:
    """Every process may log to its own file (logs/rank-R.jsonl); only the main one prints."""
    path = RunDir(run_dir).rank_log(accelerator.process_index)
    path.parent.mkdir(parents=True, exist_ok=True)
    append_line(path, json.dumps({"rank": accelerator.process_index, **record}) + "\n", "rank log")


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl's records; an unfinished last line (the run was killed while writing it) is left out."""
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(lines) and not text.endswith("\n"):
                break
            raise UserError(f"{path}:{number}: not a JSON record ({exc.msg}); remove or repair that line") from None
    return records


def first_samples(records: list[dict]) -> list[dict]:
    """The step-0 eval's predictions (prompt, reference, output), kept in metrics.jsonl so a resumed run still has them."""
    return next((r.get("samples", []) for r in records if r.get("kind") == "eval" and r.get("step") == 0), [])


def paired_samples(earlier: list[dict], after: list[dict] | None) -> list[dict]:
    """Report rows: each eval prediction before training beside the same row after it (none without a final eval)."""
    if after is None:
        return []
    return [{"prompt": row["prompt"], "reference": row["reference"], "after": row["output"],
             "before": earlier[i]["output"] if i < len(earlier) else ""} for i, row in enumerate(after)]


def plot_loss(records: list[dict], target: Path) -> bool:
    """loss.png: training loss per step, eval loss as markers."""
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("kind") == "eval"]
    if not train:
        return False
    try:
        import matplotlib
    except ImportError:  # the plots extra is not installed: report.md without the picture
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        axis.plot(*zip(*evals), "o-", label="eval loss")
    axis.set_xlabel("optimiser step")
    axis.set_ylabel("cross-entropy")
    axis.legend()
    figure.tight_layout()
    try:
        replace_whole(target, RunDir.staging(target), lambda path: figure.savefig(path, dpi=100, format="png"),
                      PLOT_BYTES, "loss plot")
    finally:
        plt.close(figure)
    return True


def before_after(records: list[dict]) -> list[tuple[str, float, float]]:
    """(metric, first eval, last eval) for every numeric eval metric."""
    evals = [r for r in records if r.get("kind") == "eval"]
    if len(evals) < 1:
        return []
    first, last = evals[0], evals[-1]
    return [(k, first[k], last[k]) for k in first if k.startswith("eval_") and isinstance(first[k], (int, float))]


def confusion_markdown(confusion: dict) -> list[str]:
    """Rows are the gold label, columns the predicted one."""
    labels = confusion["labels"]
    lines = ["| gold \\ predicted | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    return lines + [f"| {label} | " + " | ".join(map(str, row)) + " |" for label, row in zip(labels, confusion["matrix"])]


PASSES = ("training", "evaluation")  # the passes planned and measured apart (launcher/memory/advice.py)


def memory_rows(record: dict) -> list[tuple[str, float | None, float | None, str]]:
    """(pass, planned GiB, measured GiB, note) from a metrics.jsonl memory record: training and evaluation apart,
    then the overall peak; a measured figure that is only an upper bound is marked "<=" in its note."""
    rows = []
    for name in PASSES:
        planned, measured = record.get(f"predicted_{name}_peak_gib"), record.get(f"measured_{name}_peak_gib")
        if planned is not None or measured is not None:
            rows.append((name, planned, measured, "upper bound" if name in record.get("upper_bounds", []) else ""))
    return rows + [("peak", record.get("predicted_peak_gib"), record.get("measured_peak_gib"), "")]


def memory_markdown(record: dict) -> list[str]:
    """report.md's table of planned against measured peak memory per process."""
    def gib(value, note=""):
        return "-" if value is None else ("<= " if note else "") + f"{value:.3f}"

    lines = ["## Memory per process: planned vs measured (GiB)", "",
             f"Measured by {record.get('measured_by', '?')} on {record.get('device', '?')}"
             + (", against a plan with the dtypes a CPU run resolves" if record.get("device") == "cpu" else "") + ".", "",
             "| pass | planned | measured | measured / planned |", "|---|---|---|---|"]
    for name, planned, measured, note in memory_rows(record):
        ratio = f"{measured / planned:.2f}" if planned and measured is not None else "-"
        lines.append(f"| {name} | {gib(planned)} | {gib(measured, note)} | {ratio} |")
    return lines


def write_report(run_dir: Path, summary: dict, samples: list[dict], console: Console | None = None) -> None:
    """report.md, loss.png and a console table of every eval metric before and after."""
    run = RunDir(run_dir)
    records = read_metrics(run.metrics)
    rows = before_after(records)
    has_plot = plot_loss(records, run.loss_plot)
    lines = [f"# Run report: {run_dir.name}", ""]
    lines += [f"- {key}: {value}" for key, value in summary.items()]
    lines += ["", "| metric | before | after |", "|---|---|---|"]
    lines += [f"| {name} | {a:.4f} | {b:.4f} |" for name, a, b in rows]
    confusion = next((r["confusion"] for r in reversed(records) if r.get("kind") == "eval" and r.get("confusion")), None)
    if confusion:
        lines += ["", "## Confusion matrix (last eval)", ""] + confusion_markdown(confusion)
    memory = next((r for r in reversed(records) if r.get("kind") == "memory"), None)
    if memory:
        lines += [""] + memory_markdown(memory)
    if has_plot:
        lines += ["", f"![loss]({run.loss_plot.name})"]
    if samples:
        lines += ["", "## Samples", ""]
        for sample in samples:
            lines += [f"**Prompt:** {sample['prompt']!r}", "", f"- reference: {sample['reference']!r}",
                      f"- before: {sample.get('before', '')!r}", f"- after: {sample.get('after', '')!r}", ""]
    text = "\n".join(lines) + "\n"
    replace_whole(run.report, RunDir.staging(run.report), lambda path: path.write_text(text), len(text.encode()), "report")
    if console is None:
        return
    table = Table(title="eval before -> after")
    for column in ("metric", "before", "after"):
        table.add_column(column)
    for name, a, b in rows:
        table.add_row(name, f"{a:.4f}", f"{b:.4f}")
    console.print(table)
    for sample in samples:
        console.print(f"[bold]prompt[/] {sample['prompt'][-120:]!r}\n  reference {sample['reference']!r}\n"
                      f"  before    {sample.get('before', '')!r}\n  after     {sample.get('after', '')!r}")

