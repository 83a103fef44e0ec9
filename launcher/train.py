"""The training run: one explicit loop on Accelerate.

Order of work follows the rule "fail before anything heavy": recipe and run directory are
checked, data is peeked, then tokenised, and only then does the model load.
"""
from __future__ import annotations

import gc
import signal
import time
from pathlib import Path

from launcher import checkpoint as ckpt
from launcher.data import StepPlan, Tokenised, check_rows, collate, label_names, split_eval, tokenise
from launcher.evaluate import Best, Evaluation, evaluate, to_device
from launcher.loss import target_count, task_loss_sum
from launcher.recipe import Recipe, UserError, resolved_yaml


class StopRequest:
    """SIGUSR1/SIGTERM set a flag; every rank agrees on it at the next step boundary."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self) -> None:
        self.signal: int | None = None
        for number in self.SIGNALS:
            signal.signal(number, self._handle)

    def _handle(self, number, frame) -> None:
        self.signal = number

    def agreed(self, accelerator) -> bool:
        import torch
        flag = torch.tensor([1.0 if self.signal else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, "max").item())


def check_inputs(recipe: Recipe) -> None:
    """Everything about the user's input that can be checked without torch."""
    check_rows(recipe.data.train, recipe.data)
    if recipe.data.eval:
        check_rows(recipe.data.eval, recipe.data)


def class_labels(recipe: Recipe) -> list[str] | None:
    """A classifier's class names, read from the train file (the model config saves them as id2label)."""
    if recipe.model.task != "classification":
        return None
    return label_names(recipe.data.train, recipe.data, recipe.data.max_train_rows)


def build_datasets(recipe: Recipe, tokenizer, labels: list[str] | None = None) -> tuple[Tokenised, Tokenised | None]:
    data, task = recipe.data, recipe.model.task
    train = tokenise(data.train, tokenizer, data, data.max_train_rows, task, labels)
    if data.eval:
        return train, tokenise(data.eval, tokenizer, data, data.max_eval_rows, task, labels)
    if data.eval_fraction:
        return split_eval(train, data.eval_fraction, recipe.train.seed)
    return train, None


def run(recipe: Recipe, overwrite: bool = False) -> int:
    """Train as the recipe says; returns the process exit status."""
    import torch
    from accelerate.utils import set_seed

    from launcher import modeling, optim
    from launcher.distributed import (check_resume, check_synchronised, make_accelerator, parameter_bytes, prepare,
                                      shard_model, write_rank_log)
    from launcher.report import Reporter, write_report

    stop = StopRequest()  # first thing: a signal during start-up is then acted on at the first step boundary
    run_dir = Path(recipe.output_dir)
    resolved = recipe.model_dump(mode="json")
    resume_from = ckpt.plan_run_dir(run_dir, resolved, overwrite)
    check_inputs(recipe)

    accelerator = make_accelerator(recipe)
    modeling.check_backend(recipe, accelerator.device.type)  # bitsandbytes' device support, before the run dir is written
    main = accelerator.is_main_process
    if main:
        if overwrite:
            ckpt.clear_run_dir(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(resolved_yaml(recipe))
    with accelerator.main_process_first():
        weights = modeling.resolve_weights(recipe)
        tokenizer = modeling.load_tokenizer(weights, recipe)
        labels = class_labels(recipe)
        train_data, eval_data = build_datasets(recipe, tokenizer, labels)
        if recipe.data.packing:  # several examples per row (launcher/packing.py)
            from launcher.packing import pack_dataset
            train_data = Tokenised(pack_dataset(train_data.dataset, recipe.data.max_length), train_data.rows, train_data.dropped)

    cfg = recipe.train
    plan = StepPlan(len(train_data.dataset), cfg.micro_batch_size, cfg.grad_accum, accelerator.num_processes,
                    accelerator.process_index, cfg.seed)
    if plan.steps_per_epoch == 0:
        raise UserError(f"data.train: {len(train_data.dataset)} usable rows is less than one global batch "
                        f"(micro_batch_size x grad_accum x processes = {plan.global_batch})")
    total_steps = plan.total_steps(cfg.epochs, cfg.max_steps)
    if resume_from is not None:
        previous = ckpt.load_state_file(resume_from)
        check_resume(previous, recipe, accelerator.num_processes)
        done = previous["step"]
        if done >= total_steps and (run_dir / "final").is_dir():  # without final/ (stopped during export) go on and export
            if main:
                print(f"nothing left to train: {run_dir} already finished step {done} of {total_steps}. "
                      f"Raise train.max_steps or train.epochs to continue, or pass --overwrite to start again.")
            return 0

    set_seed(cfg.seed)
    model = modeling.load_model(weights, recipe, on_gpu=accelerator.device.type == "cuda", labels=labels)
    params = modeling.count_parameters(model, cfg.optimizer)
    model = shard_model(model, recipe, accelerator)  # FSDP2 shards before the optimiser sees the parameters
    if cfg.compile:  # in place: parameter names and saved keys stay as they are
        model.compile()
    optimizer = optim.build_optimizer(model, cfg)
    scheduler = optim.build_scheduler(optimizer, cfg, total_steps)
    model, optimizer, scheduler = prepare(accelerator, recipe, model, optimizer, scheduler)
    write_rank_log(run_dir, accelerator, {"strategy": recipe.distributed.strategy, "world_size": accelerator.num_processes,
                                          **parameter_bytes(model)})
    if recipe.method != "full":
        trainable = {name for name, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}
        accelerator.register_save_state_pre_hook(ckpt.keep_trainable_only(trainable))

    reporter = Reporter(run_dir, main, recipe.report.tensorboard, total_steps)
    reporter.print(f"model {weights}: {params.line()}")
    reporter.print(f"data: {train_data.rows} train rows ({sum(train_data.dropped.values())} dropped: {train_data.dropped or 'none'}), "
                   f"{len(eval_data.dataset) if eval_data else 0} eval rows; {total_steps} steps of {plan.global_batch} examples")
    pad_id, task = tokenizer.pad_token_id, recipe.model.task
    best = Best(recipe)
    first_eval: Evaluation | None = None

    def run_eval(step: int) -> Evaluation | None:
        """Task metrics into metrics.jsonl; a new best (after step 0) is exported to output_dir/best."""
        if eval_data is None:
            return None
        result = evaluate(accelerator, model, tokenizer, eval_data.dataset, recipe, labels)
        extra = {"confusion": result.confusion} if result.confusion else {}
        reporter.log({"kind": "eval", "step": step, **result.metrics, **extra})
        if best.update(result.metrics, step) and step > 0:
            ckpt.export_final(accelerator, model, tokenizer, run_dir, name="best")
        return result

    step = 0
    if resume_from is not None:
        state = ckpt.load_checkpoint(accelerator, resume_from)
        step, best = state["step"], Best(recipe, state.get("best"))
        reporter.print(f"resuming from {resume_from} at step {step}")
    else:
        first_eval = run_eval(0)

    def save(at: int) -> None:
        state = {"step": at, "total_steps": total_steps, "best": best.state(),
                 "world_size": accelerator.num_processes, "strategy": recipe.distributed.strategy}
        ckpt.save_checkpoint(accelerator, run_dir, at, state, cfg.keep_last)

    model.train()
    start_step = step
    real_tokens = token_slots = 0  # padding efficiency for the summary
    with reporter:
        while step < total_steps:
            started = time.perf_counter()
            micro = [to_device(collate(train_data.dataset.select(rows), pad_id, task), accelerator.device)
                     for rows in plan.micro_batches(step)]
            local_tokens = sum(target_count(b["labels"], task) for b in micro)
            step_tokens = accelerator.reduce(local_tokens.double(), "sum")
            loss_sum = torch.zeros((), device=accelerator.device, dtype=torch.float64)
            for batch in micro:
                with accelerator.accumulate(model):
                    total, _ = task_loss_sum(model, batch, task, cfg.loss_chunk_tokens)
                    scale = accelerator.num_processes * cfg.grad_accum / step_tokens
                    accelerator.backward(total * scale.float() + optim.l2_penalty(model, cfg.l2_lambda))
                    grad_norm = None
                    if accelerator.sync_gradients and cfg.max_grad_norm:
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    optimizer.step()
                    if accelerator.sync_gradients:
                        scheduler.step()
                    optimizer.zero_grad()
                loss_sum += total.detach().double()
            step += 1
            if step == start_step + 1:
                check_synchronised(accelerator, model, recipe)  # refuses processes that train independently
            loss = (accelerator.reduce(loss_sum, "sum") / step_tokens).item()
            seen = accelerator.reduce(sum(b["attention_mask"].sum() for b in micro), "sum").item()
            real_tokens, token_slots = real_tokens + seen, token_slots + sum(b["attention_mask"].numel() for b in micro) * accelerator.num_processes
            elapsed = time.perf_counter() - started
            lr = scheduler.get_last_lr()[0]
            if step % cfg.log_every == 0 or step == total_steps:
                reporter.log({"kind": "train", "step": step, "loss": loss, "lr": lr, "tokens": seen,
                              "grad_norm": float(grad_norm) if grad_norm is not None else None,
                              "step_seconds": round(elapsed, 4)})
            reporter.step(step, loss, lr, seen / max(elapsed, 1e-9))
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                run_eval(step)
            if step < total_steps and stop.agreed(accelerator):  # at the last step, finishing is the quickest way out
                save(step)
                _preempted(reporter, stop, step, total_steps)
                del model, optimizer, scheduler
                return _release(accelerator)
            if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                save(step)

    last_eval = run_eval(total_steps)
    samples = paired_samples(first_eval, last_eval)
    save(total_steps)
    final = ckpt.export_final(accelerator, model, tokenizer, run_dir)
    if main:
        if task == "classification":  # an adapter folder has no config.json: keep the label names beside it
            accelerator.unwrap_model(model).config.save_pretrained(final)
        summary = {"model": weights, "method": recipe.method, "task": task, "parameters": params.line(),
                   "steps": total_steps, "processes": accelerator.num_processes, "final": str(final)}
        if token_slots:  # real tokens / batch slots (slots estimated from this process's batch shapes)
            summary["padding efficiency"] = f"{real_tokens / token_slots:.1%} ({'packed' if recipe.data.packing else 'padded'})"
        if best.step is not None:
            summary["best"] = f"{best.key} {best.value:.4f} at step {best.step}" + (f" ({run_dir / 'best'})" if best.step else "")
        write_report(run_dir, summary, samples, reporter.console)
        reporter.print(f"saved {final}; report {run_dir / 'report.md'}")
    del model, optimizer, scheduler
    return _release(accelerator)


def paired_samples(before: Evaluation | None, after: Evaluation | None) -> list[dict]:
    """Report rows: each eval prediction before training beside the same row after it."""
    if after is None:
        return []
    earlier = before.predictions if before else []
    return [{"prompt": row["prompt"], "reference": row["reference"], "after": row["output"],
             "before": earlier[i]["output"] if i < len(earlier) else ""} for i, row in enumerate(after.predictions)]


def _preempted(reporter, stop: StopRequest, step: int, total: int) -> None:
    from launcher import slurm
    name = signal.Signals(stop.signal).name if stop.signal else "a signal on another rank"
    reporter.print(f"stopped by {name} after step {step}/{total}; checkpoint written")
    requeued = slurm.requeue_self() if reporter.active else False  # Slurm ends this run soon after
    reporter.print("requeued this Slurm job: it resumes from the checkpoint when Slurm restarts it"
                   if requeued else "run the same command again to resume")


def _release(accelerator) -> int:
    """Called once the caller dropped model and optimiser: collecting them before the process group
    goes avoids gloo's exit-time aborts on torch 2.13 (ENVIRONMENT.md)."""
    accelerator.free_memory()
    gc.collect()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0
