"""The training run in named steps: `setup` -> `fit` -> `finish`, with `train_step` on its own.

The shape follows torchtune's recipe classes and LitGPT's `setup -> fit -> validate`: set-up
returns a `Run` holding everything the loop needs; `train_step` does one optimiser step and
reports what it did (so it is tested in-process); `fit` makes the order of the stop check, eval
and save explicit; `finish` does the final eval, export and report. Checks on the user's input
ran before this module was imported (preflight/checks.py); what is left here needs torch.
"""
from __future__ import annotations

import gc
import signal
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from launcher.checkpoint import saves as ckpt, verify
from launcher.checkpoint.diskspace import run_bytes
from launcher.data.batching import StepPlan
from launcher.data.cache import datasets_for_run
from launcher.data.encode import Datasets
from launcher.data.reference_logps import attach_reference
from launcher.data.mixing import mixture_line
from launcher.distributed import launch, sequence, slurm
from launcher.distributed.strategies import Strategy, strategy_for
from launcher.errors import UserError
from launcher.evaluation.evaluate import Best, EvalInterrupted, Evaluation, eval_rows, evaluate, never, synced_generation, to_device
from launcher.memory.advice import EVALUATION, TRAINING, MemoryCheck, check_before_loading, measured_pass, peak_rss_kib, predicted_and_measured
from launcher.memory.counts import ParamCount, count_parameters, parameter_bytes
from launcher.model import loading as modeling
from launcher.model.loss import objective_count, objective_loss_sum
from launcher.model.preference import PairTally
from launcher.recipe.files import resolved_yaml
from launcher.recipe.objective import reference_precomputed
from launcher.recipe.schema import Recipe
from launcher.report import trackers
from launcher.report.console import Console, end_line, header_rows, quiet_libraries
from launcher.report.records import Reporter, first_samples, paired_samples, read_metrics, write_rank_log, write_report
from launcher.rundir import directory as rundir
from launcher.rundir.paths import RunDir
from launcher.rundir.provenance import write_provenance
from launcher.training import guard, optim, rescale
from launcher.training.stop import StopRequest


@dataclass
class StepStats:
    """What one optimiser step did, reduced over all processes."""
    loss: float            # mean loss per target over the whole global batch
    tokens: int            # real (unpadded) tokens the step read
    slots: int             # token slots in its batches, padding included
    grad_norm: float | None
    lr: float              # the learning rate this step's update used
    seconds: float
    skipped: bool = False  # a non-finite gradient norm under train.skip_nonfinite: the update was not applied
    overflow: bool = False  # fp16: the loss scaler found inf/NaN gradients, skipped the update and lowered its scale
    pairs: dict = field(default_factory=dict)  # objective dpo: rewards and accuracies, means over the step's pairs


@dataclass
class Run:
    """Everything the loop needs, built once by `setup`."""
    recipe: Recipe
    strategy: Strategy
    accelerator: Any
    run_dir: Path
    weights: str
    tokenizer: Any
    data: Datasets
    plan: StepPlan
    total_steps: int
    model: Any = None
    optimizer: Any = None
    scheduler: Any = None
    layout: Any = None     # what a checkpoint holds (launcher/layouts.py)
    params: ParamCount | None = None
    reporter: Any = None
    best: Best | None = None
    step: int = 0
    first_eval: Evaluation | None = None
    memory: MemoryCheck | None = None  # the plan checked before the model loaded
    totals: dict = field(default_factory=lambda: {"tokens": 0, "slots": 0, "seconds": 0.0})
    console: Console | None = None
    sources: dict = field(default_factory=dict)  # fingerprint of each data source as this run read it

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def micro_batches(self, step: int) -> list[dict]:
        """This rank's collated micro-batches of optimiser step `step`, on its device."""
        train, rank = self.data.train.dataset, self.accelerator.process_index
        return [to_device(sequence.rank_slice(self.data.collate(train.select(rows)), self.recipe, rank), self.accelerator.device)
                for rows in self.plan.micro_batches(step)]


def run(recipe: Recipe, overwrite: bool = False, allow_data_change: bool = False) -> int:
    """Train as the recipe says; returns the process exit status. Preflight has already run."""
    stop = StopRequest()  # first thing: a signal during start-up is then acted on at the first step boundary
    quiet_libraries()
    session = setup(recipe, overwrite, allow_data_change)
    if session is None:
        return 0
    try:
        stopped = fit(session, stop)
        if not stopped:
            finish(session, stop)
    except EvalInterrupted:  # a stop agreed between eval batches: the eval is dropped, the steps it followed are saved
        stopped = _checkpoint_and_leave(session, stop, "during the evaluation after")
    finally:
        session.console.close()
    status = close(session)
    return stop.exit_status() if stopped else status


# ---------------------------------------------------------------- setup

def setup(recipe: Recipe, overwrite: bool = False, allow_data_change: bool = False) -> Run | None:
    """Run directory, data, step plan, model, optimiser and resume state; None when nothing is left to train."""
    from accelerate.utils import set_seed

    run_dir = Path(recipe.output_dir)
    dir_plan = rundir.plan_run_dir(run_dir, recipe.model_dump(mode="json"), overwrite)
    resume_from = dir_plan.resume_from
    state = ckpt.load_state_file(resume_from) if resume_from is not None else None
    change = None
    if state is not None:  # on another process count: same global batch, or refused before anything loads
        recipe, change = rescale.hold_global_batch(recipe, state, launch.launched_world_size())
    strategy = strategy_for(recipe)
    strategy.plan_resume(state, launch.launched_world_size())
    accelerator = strategy.make_accelerator()
    memory = check_before_loading(recipe, accelerator.num_processes, accelerator.device.type)  # refuses before weights load
    console = Console(accelerator.is_main_process)
    if accelerator.is_main_process:
        for line in ([change] if change else []) + dir_plan.damage_lines():
            print(line)
        rundir.take_live_lock(run_dir)  # before anything is written: a second live run is refused here
        dir_plan.clear_earlier(run_dir, overwrite)
        run_dir.mkdir(parents=True, exist_ok=True)
        RunDir(run_dir).recipe.write_text(resolved_yaml(recipe))
        write_provenance(run_dir, accelerator)
    sources = rundir.checked_fingerprints(recipe, state, allow_data_change)  # before tokenising: refuse changed data early
    session = _load_data(recipe, strategy, accelerator, run_dir, console)
    session.sources, session.memory = sources, memory
    console.header(header_rows(session, resume_from, state["step"] if state else 0))
    if state is not None:
        if state["step"] >= session.total_steps and RunDir(run_dir).finished():  # stopped in export or report: redo them
            console.close()
            if session.main:
                print(f"nothing left to train: {run_dir} already finished step {state['step']} of {session.total_steps}. "
                      f"Raise train.max_steps or train.epochs to continue, or pass --overwrite to start again.")
            return None
    set_seed(recipe.train.seed)
    with console.phase("loading model"):
        _build_model(session)
    if reference_precomputed(recipe):  # by the model as loaded: before a checkpoint's weights replace it
        write_rank_log(run_dir, accelerator, attach_reference(accelerator, session.model, session.data, recipe,
                                                              session.tokenizer, session.weights, console))
    session.best = Best(recipe)
    if resume_from is not None:
        loaded = ckpt.load_checkpoint(session.layout, resume_from)
        write_rank_log(run_dir, accelerator, {"resumed_from": str(resume_from), "checkpoint_bytes_read": session.layout.bytes_read})
        session.step, session.best = loaded["step"], Best(recipe, loaded.get("best"))
        optim.resume_schedule(session.scheduler)  # the lr for this step under the (maybe extended) total
    _open_reporter(session, resume_from)
    if resume_from is None:
        session.first_eval = run_eval(session, 0)
    return session


def _load_data(recipe: Recipe, strategy: Strategy, accelerator, run_dir: Path, console: Console) -> Run:
    """Tokenizer and datasets (preprocessed, or tokenised by the main process first; launcher/preprocess.py) and the step plan."""
    weights, tokenizer, datasets, record = datasets_for_run(recipe, accelerator, console.phase)
    write_rank_log(run_dir, accelerator, record)
    cfg = recipe.train
    rows = len(datasets.train.dataset)
    groups, group = sequence.data_parallel(recipe, accelerator.num_processes, accelerator.process_index)
    plan = StepPlan(rows, cfg.micro_batch_size, cfg.grad_accum, groups, group, cfg.seed)
    if plan.steps_per_epoch == 0:
        raise UserError(f"data.train: {rows} usable rows is less than one global batch "
                        f"(micro_batch_size x grad_accum x processes = {plan.global_batch})")
    return Run(recipe, strategy, accelerator, run_dir, weights, tokenizer, datasets, plan,
               plan.total_steps(cfg.epochs, cfg.max_steps, cfg.warmup_steps), console=console)


def _build_model(session: Run) -> None:
    """Model (sharded by the strategy before the optimiser sees it), optimiser and schedule, prepared."""
    recipe, accelerator, strategy = session.recipe, session.accelerator, session.strategy
    rss_before = peak_rss_kib()  # the load's own growth of peak host memory goes into the rank log
    loads = strategy.rules.reads_weights(accelerator.num_processes, accelerator.process_index)
    model = modeling.load_model(session.weights, recipe, accelerator.device.type == "cuda", session.data.labels, loads)
    session.params = count_parameters(model, recipe.train.optimizer)
    model = strategy.shard(model, accelerator)
    peak_rss_after_load = peak_rss_kib()
    if recipe.train.compile:  # in place: parameter names and saved keys stay as they are
        model.compile()
    optimizer = optim.build_optimizer(model, recipe.train, recipe.lora.plus_lr_ratio)
    scheduler = optim.build_scheduler(optimizer, recipe.train, session.total_steps)
    session.model, session.optimizer, session.scheduler = strategy.prepare(accelerator, model, optimizer, scheduler)
    write_rank_log(session.run_dir, accelerator, {"strategy": strategy.name, "world_size": accelerator.num_processes,
                                                  "sequence_parallel": getattr(session.model, "sequence_parallel_size", 1),
                                                  "read_weights": loads, **parameter_bytes(session.model),
                                                  "load_rss_growth_bytes": (peak_rss_after_load - rss_before) * 1024})
    session.layout = strategy.checkpoint_layout(accelerator, session.model, session.optimizer, session.scheduler)
    accelerator.register_save_state_pre_hook(verify.checksum_hook(accelerator))  # layouts through save_state: what is written


def _open_reporter(session: Run, resume_from: Path | None) -> None:
    from rich.text import Text

    recipe, train, evaluation = session.recipe, session.data.train, session.data.eval
    session.reporter = Reporter(session.run_dir, session.accelerator, session.console)
    session.reporter.log_every = recipe.train.log_every
    trackers.start(session.accelerator, recipe, session.step)
    session.reporter.print(f"model {session.weights}: {session.params.line()}")
    session.reporter.print(f"data: {train.rows} train rows ({train.tally.line()}), "
                           f"{len(evaluation.dataset) if evaluation else 0} eval rows; "
                           f"{session.total_steps} steps of {session.plan.global_batch} examples")
    for warning in session.data.warnings:
        session.reporter.print(Text(f"warning: {warning}", style="bold yellow"))
    if train.mixture:
        session.reporter.print(f"mixture: {mixture_line(train.mixture)}")
    if recipe.eval.metric == "auto" and evaluation is not None and recipe.data.eval_format() is None:
        session.reporter.print("eval.metric auto: the eval rows mix formats, so the best checkpoint is chosen on eval loss")
    if resume_from is not None:
        session.reporter.print(f"resuming from {resume_from} at step {session.step}")


# ---------------------------------------------------------------- one step, and the loop

def train_step(session: Run, micro_batches: list[dict]) -> StepStats:
    """One optimiser step over this rank's micro-batches.

    The summed loss of every micro-batch is divided by the target count of the whole global batch
    (all micro-batches, all processes), so each target weighs the same however the batch is split.
    """
    import torch
    accelerator, model, cfg, recipe = session.accelerator, session.model, session.recipe.train, session.recipe
    started, lr = time.perf_counter(), session.scheduler.get_last_lr()[0]  # the rate this step's update uses
    step_targets = accelerator.reduce(sum(objective_count(b, recipe) for b in micro_batches).double(), "sum")
    averaged_over = sequence.averaged_over(recipe, accelerator.num_processes)  # what the engine divides summed gradients by
    pairs = PairTally()
    loss_sum = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    grad_norm, skipped, overflow, scaled = None, False, False, guard.loss_scaled(accelerator)
    for batch in micro_batches:
        with accelerator.accumulate(model), measured_pass(session.memory, TRAINING):  # each micro-batch's peak memory
            session.strategy.sync_gradients(model, accelerator.sync_gradients)
            total, _, pair_sums = objective_loss_sum(model, batch, recipe)  # its count is in step_targets already
            pairs.add(pair_sums)
            scale = averaged_over * cfg.grad_accum / step_targets
            accelerator.backward(total * scale.float() + optim.l2_penalty(model, cfg.l2_lambda))
            if accelerator.sync_gradients and (cfg.max_grad_norm or cfg.skip_nonfinite):  # measured to skip a bad step
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or float("inf"))
                skipped = guard.skip_update(grad_norm, scaled, session.totals, cfg.skip_nonfinite)
            if not skipped:
                session.optimizer.step()  # under fp16 the scaler's step: it skips an overflow and updates its scale
                overflow = accelerator.sync_gradients and scaled and session.optimizer.step_was_skipped
            if accelerator.sync_gradients:
                session.scheduler.step()
            session.optimizer.zero_grad()
        loss_sum += total.detach().double()
    loss = (accelerator.reduce(loss_sum, "sum") / step_targets).item()
    if overflow and not guard.finite(loss):  # a non-finite loss is divergence, not a scale too high
        skipped = guard.may_skip(session.totals, cfg.skip_nonfinite)
    tokens = accelerator.reduce(sum(b["attention_mask"].sum() for b in micro_batches), "sum").item()
    slots = sum(b["attention_mask"].numel() for b in micro_batches) * accelerator.num_processes
    return StepStats(loss, int(tokens), slots, float(grad_norm) if grad_norm is not None else None, lr,
                     time.perf_counter() - started, skipped, overflow, pairs.means(accelerator, step_targets))


def fit(session: Run, stop: StopRequest) -> bool:
    """Train to the last step; True when a stop signal ended it early (a checkpoint was written).

    After each step, in this order: the stop check (save and leave, before any due eval, so a
    preempted job spends its grace period on the checkpoint), then a due eval (which a stop ends
    between its batches: EvalInterrupted), then a due save.
    """
    cfg, start = session.recipe.train, session.step
    session.console.start_training(session.total_steps, start)
    session.model.train()
    while session.step < session.total_steps:
        stats = train_step(session, session.micro_batches(session.step))
        session.step += 1
        step, last = session.step, session.step == session.total_steps
        if step == start + 1:
            session.strategy.check_synchronised(session.accelerator, session.model)  # refuses independent processes
        _record(session, stats)
        guard.check_step(step, stats.loss, None if stats.overflow else stats.grad_norm, stats.skipped, partial(ckpt.last_checkpoint, session.run_dir))
        if not last and stop.agreed(session.accelerator):  # at the last step, finishing is the quickest way out
            return _checkpoint_and_leave(session, stop, "after")
        if cfg.eval_every and step % cfg.eval_every == 0 and not last:
            run_eval(session, step, stop)
        if cfg.save_every and step % cfg.save_every == 0 and not last:
            save(session)
    return False


def _record(session: Run, stats: StepStats) -> None:
    for key in ("tokens", "slots", "seconds"):  # the run's totals, for its end line and padding efficiency
        session.totals[key] += getattr(stats, key)
    step = session.step
    if step % session.recipe.train.log_every == 0 or step == session.total_steps:
        session.reporter.log({"kind": "train", "step": step, "loss": stats.loss, "lr": stats.lr, "tokens": stats.tokens,
                              "grad_norm": stats.grad_norm, "step_seconds": round(stats.seconds, 4),
                              **({"skipped": guard.skip_reason(stats.skipped, stats.overflow)} if stats.skipped or stats.overflow else {}), **stats.pairs})
    session.reporter.step(step, stats.loss, stats.lr, stats.tokens / max(stats.seconds, 1e-9), stats.grad_norm, stats.pairs)


def run_eval(session: Run, step: int, stop: StopRequest | None = None) -> Evaluation | None:
    """Task metrics into metrics.jsonl; a new best (after step 0) is exported to output_dir/best. A `stop` agreed
    between batches raises EvalInterrupted (step 0's eval runs to its end: before training there is nothing to save)."""
    if session.data.eval is None:
        return None
    dataset, unwrap = session.data.eval.dataset, partial(session.strategy.unwrap, session.accelerator)
    with session.console.phase(f"evaluation (step {step})", eval_rows(dataset, session.recipe)) as phase, \
            measured_pass(session.memory, EVALUATION):
        synced = synced_generation(session.accelerator.num_processes, session.strategy.rules.shards_parameters)
        result = evaluate(session.accelerator, session.model, session.tokenizer, dataset, session.recipe,
                          session.data.labels, unwrap, phase.advance, synced, partial(stop.agreed, session.accelerator) if stop else never)
    extra = {"confusion": result.confusion} if result.confusion else {}
    if step == 0 and result.predictions:  # the "before" samples, read back by a resumed run's report
        extra["samples"] = result.predictions
    session.reporter.log({"kind": "eval", "step": step, **result.metrics, **extra})
    if session.best.update(result.metrics, step) and 0 < step < session.total_steps:  # best at the end is final/
        with session.console.phase("export best"):
            ckpt.export_final(session.accelerator, session.strategy, session.model, session.tokenizer, session.run_dir, name="best",
                              needed_bytes=run_bytes(session.params, session.recipe.method == "full", with_optimizer=False))
    return result


def save(session: Run) -> None:
    state = {"step": session.step, "total_steps": session.total_steps, "best": session.best.state(),
             "world_size": session.accelerator.num_processes, "strategy": session.strategy.name,
             "global_batch": session.plan.global_batch, "data": session.sources}
    with session.console.phase(f"checkpoint (step {session.step})"):
        ckpt.save_checkpoint(session.accelerator, session.layout, session.run_dir, session.step, state, session.recipe.train.keep_last,
                             held_bytes=run_bytes(session.params, session.recipe.method == "full", with_optimizer=True))


# ---------------------------------------------------------------- the end

def finish(session: Run, stop: StopRequest | None = None) -> Path:
    """Final eval, last checkpoint, export to output_dir/final, and the report."""
    recipe, accelerator, run_dir = session.recipe, session.accelerator, session.run_dir
    last_eval = run_eval(session, session.total_steps, stop)
    save(session)
    with session.console.phase("export"):
        final = ckpt.export_final(accelerator, session.strategy, session.model, session.tokenizer, run_dir,
                                  needed_bytes=run_bytes(session.params, recipe.method == "full", with_optimizer=False))
    if not session.main:
        return final
    if recipe.model.task == "classification":  # an adapter folder has no config.json: keep the label names beside it
        session.strategy.unwrap(accelerator, session.model).config.save_pretrained(final)
    summary = {"model": session.weights, "method": recipe.method, "task": recipe.model.task,
               "parameters": session.params.line(), "steps": session.total_steps,
               "processes": accelerator.num_processes, "final": str(final)}
    peak = predicted_and_measured(session.memory, recipe)  # planned and measured peaks, training and evaluation apart
    session.reporter.log({"kind": "memory", "step": session.total_steps, **peak})
    summary["peak memory"] = (f"predicted {peak['predicted_peak_gib']} GiB per process, measured "
                              f"{peak['measured_peak_gib']} GiB ({peak['measured_by']})")
    if session.totals["slots"]:  # real tokens / batch slots (slots estimated from this process's batch shapes)
        efficiency = session.totals["tokens"] / session.totals["slots"]
        summary["padding efficiency"] = f"{efficiency:.1%} ({'packed' if recipe.data.packing else 'padded'})"
    best = session.best
    if best.step is not None:
        where = "" if not best.step else " (= final/)" if best.step == session.total_steps else f" ({RunDir(run_dir).export('best')})"
        summary["best"] = f"{best.key} {best.value:.4f} at step {best.step}{where}"
        if best.step == session.total_steps:  # an earlier best/ is no longer the best; final/ is
            rundir.remove_results(run_dir, "best")
    before = session.first_eval.predictions if session.first_eval else first_samples(read_metrics(RunDir(run_dir).metrics))
    write_report(run_dir, summary, paired_samples(before, last_eval.predictions if last_eval else None), session.console)
    session.reporter.print(f"saved {final}; report {RunDir(run_dir).report}")
    session.console.print(end_line(session.console.started, session.totals, accelerator.device, peak["measured_peak_gib"]))
    return final


def _checkpoint_and_leave(session: Run, stop: StopRequest, when: str) -> bool:
    """The stop every rank agreed on: save (a save under way when the signal came has finished by now), then leave."""
    session.reporter.log({"kind": "memory", "step": session.step, **predicted_and_measured(session.memory, session.recipe)})
    save(session)
    reporter, name = session.reporter, signal.Signals(stop.signal).name if stop.signal else "a signal on another rank"
    reporter.print(f"stopped by {name} {when} step {session.step}/{session.total_steps}; checkpoint written")
    requeued = slurm.requeue_self() if reporter.active else False  # Slurm ends this run soon after
    reporter.print("requeued this Slurm job: it resumes from the checkpoint when Slurm restarts it"
                   if requeued else "run the same command again to resume")
    return True


def close(session: Run) -> int:
    """Drop model and optimiser, then end the process group. Collecting them first avoids gloo's
    exit-time aborts on torch 2.13 (docs/platform.md)."""
    accelerator, session.model, session.optimizer, session.scheduler = session.accelerator, None, None, None
    accelerator.free_memory()
    gc.collect()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0
