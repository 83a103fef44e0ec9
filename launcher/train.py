"""The training run: one explicit loop on Accelerate.

Order of work follows the rule "fail before anything heavy": recipe and run directory are
checked, data is peeked, then tokenised, and only then does the model load.
"""
from __future__ import annotations

import gc
import math
import signal
import time
from pathlib import Path

from launcher import checkpoint as ckpt
from launcher.data import IGNORE, StepPlan, Tokenised, check_rows, collate, eval_batches, split_eval, tokenise
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


def build_datasets(recipe: Recipe, tokenizer) -> tuple[Tokenised, Tokenised | None]:
    data = recipe.data
    train = tokenise(data.train, tokenizer, data, data.max_train_rows)
    if data.eval:
        return train, tokenise(data.eval, tokenizer, data, data.max_eval_rows)
    if data.eval_fraction:
        return split_eval(train, data.eval_fraction, recipe.train.seed)
    return train, None


def token_loss_sum(model, batch):
    """Summed next-token cross-entropy and the number of trained tokens (loss is never averaged early,
    so accumulation and data parallelism weight every token equally)."""
    import torch.nn.functional as F
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    shifted = logits[:, :-1].float()
    total = F.cross_entropy(shifted.reshape(-1, shifted.size(-1)), labels.reshape(-1), ignore_index=IGNORE, reduction="sum")
    return total, (labels != IGNORE).sum()


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def evaluate(accelerator, model, dataset, batch_size: int, pad_id: int) -> dict:
    import torch
    model.eval()
    loss_sum = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    tokens = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    with torch.no_grad():
        for rows, real in eval_batches(len(dataset), batch_size, accelerator.num_processes, accelerator.process_index):
            total, count = token_loss_sum(model, to_device(collate(dataset.select(rows), pad_id), accelerator.device))
            if real:
                loss_sum += total.double()
                tokens += count.double()
    model.train()
    loss = (accelerator.reduce(loss_sum, "sum") / accelerator.reduce(tokens, "sum").clamp(min=1)).item()
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}


def generate_samples(accelerator, model, tokenizer, dataset, count: int, max_new_tokens: int) -> list[dict]:
    """Greedy completions of the first eval prompts; every rank runs them (sharded models need all)."""
    import torch
    samples = []
    model.eval()
    generator = accelerator.unwrap_model(model)
    for row in dataset.select(range(min(count, len(dataset)))):
        prompt = row["input_ids"][: row["prompt_len"]]
        target = [t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE]
        with torch.no_grad():
            output = generator.generate(input_ids=torch.tensor([prompt], device=accelerator.device),
                                        attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=accelerator.device),
                                        max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                        pad_token_id=tokenizer.pad_token_id)
        samples.append({"prompt": tokenizer.decode(prompt, skip_special_tokens=True),
                        "reference": tokenizer.decode(target, skip_special_tokens=True).strip(),
                        "output": tokenizer.decode(output[0, len(prompt):], skip_special_tokens=True).strip()})
    model.train()
    return samples


def run(recipe: Recipe, overwrite: bool = False) -> int:
    """Train as the recipe says; returns the process exit status."""
    import torch
    from accelerate.utils import set_seed

    from launcher import modeling, optim
    from launcher.distributed import make_accelerator
    from launcher.report import Reporter, write_report

    stop = StopRequest()  # first thing: a signal during start-up is then acted on at the first step boundary
    run_dir = Path(recipe.output_dir)
    resolved = recipe.model_dump(mode="json")
    resume_from = ckpt.plan_run_dir(run_dir, resolved, overwrite)
    check_inputs(recipe)

    accelerator = make_accelerator(recipe)
    main = accelerator.is_main_process
    if main:
        if overwrite:
            ckpt.clear_run_dir(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(resolved_yaml(recipe))
    with accelerator.main_process_first():
        weights = modeling.resolve_weights(recipe)
        tokenizer = modeling.load_tokenizer(weights, recipe)
        train_data, eval_data = build_datasets(recipe, tokenizer)

    cfg = recipe.train
    plan = StepPlan(len(train_data.dataset), cfg.micro_batch_size, cfg.grad_accum, accelerator.num_processes,
                    accelerator.process_index, cfg.seed)
    if plan.steps_per_epoch == 0:
        raise UserError(f"data.train: {len(train_data.dataset)} usable rows is less than one global batch "
                        f"(micro_batch_size x grad_accum x processes = {plan.global_batch})")
    total_steps = plan.total_steps(cfg.epochs, cfg.max_steps)
    if resume_from is not None:
        done = ckpt.load_state_file(resume_from)["step"]
        if done >= total_steps:
            if main:
                print(f"nothing left to train: {run_dir} already finished step {done} of {total_steps}. "
                      f"Raise train.max_steps or train.epochs to continue, or pass --overwrite to start again.")
            return 0

    set_seed(cfg.seed)
    model = modeling.load_model(weights, recipe, on_gpu=accelerator.device.type == "cuda")
    params = modeling.count_parameters(model)
    optimizer = optim.build_optimizer(model, cfg)
    scheduler = optim.build_scheduler(optimizer, cfg, total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if recipe.method != "full":
        trainable = {name for name, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}
        accelerator.register_save_state_pre_hook(ckpt.keep_trainable_only(trainable))

    reporter = Reporter(run_dir, main, recipe.report.tensorboard, total_steps)
    reporter.print(f"model {weights}: {params.line()}")
    reporter.print(f"data: {train_data.rows} train rows ({sum(train_data.dropped.values())} dropped: {train_data.dropped or 'none'}), "
                   f"{len(eval_data.dataset) if eval_data else 0} eval rows; {total_steps} steps of {plan.global_batch} examples")
    pad_id = tokenizer.pad_token_id
    eval_size = cfg.eval_batch_size or cfg.micro_batch_size
    samples_before: list[dict] = []

    def run_eval(step: int) -> None:
        if eval_data is not None:
            reporter.log({"kind": "eval", "step": step, **evaluate(accelerator, model, eval_data.dataset, eval_size, pad_id)})

    step = 0
    if resume_from is not None:
        step = ckpt.load_checkpoint(accelerator, resume_from)["step"]
        reporter.print(f"resuming from {resume_from} at step {step}")
    else:
        run_eval(0)
        if eval_data is not None and recipe.eval.samples:
            samples_before = generate_samples(accelerator, model, tokenizer, eval_data.dataset, recipe.eval.samples,
                                              recipe.eval.max_new_tokens)

    def save(at: int) -> None:
        ckpt.save_checkpoint(accelerator, run_dir, at, {"step": at, "total_steps": total_steps}, cfg.keep_last)

    model.train()
    with reporter:
        while step < total_steps:
            started = time.perf_counter()
            micro = [to_device(collate(train_data.dataset.select(rows), pad_id), accelerator.device)
                     for rows in plan.micro_batches(step)]
            local_tokens = sum((b["labels"][:, 1:] != IGNORE).sum() for b in micro)
            step_tokens = accelerator.reduce(local_tokens.double(), "sum")
            loss_sum = torch.zeros((), device=accelerator.device, dtype=torch.float64)
            for batch in micro:
                with accelerator.accumulate(model):
                    total, _ = token_loss_sum(model, batch)
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
            loss = (accelerator.reduce(loss_sum, "sum") / step_tokens).item()
            seen = accelerator.reduce(sum(b["attention_mask"].sum() for b in micro), "sum").item()
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

    run_eval(total_steps)
    samples = []
    if eval_data is not None and recipe.eval.samples:
        after = generate_samples(accelerator, model, tokenizer, eval_data.dataset, recipe.eval.samples, recipe.eval.max_new_tokens)
        for index, sample in enumerate(after):
            before = samples_before[index]["output"] if index < len(samples_before) else ""
            samples.append({"prompt": sample["prompt"], "reference": sample["reference"], "before": before, "after": sample["output"]})
    save(total_steps)
    final = ckpt.export_final(accelerator, model, tokenizer, run_dir)
    if main:
        summary = {"model": weights, "method": recipe.method, "parameters": params.line(), "steps": total_steps,
                   "processes": accelerator.num_processes, "final": str(final)}
        write_report(run_dir, summary, samples, reporter.console)
        reporter.print(f"saved {final}; report {run_dir / 'report.md'}")
    del model, optimizer, scheduler
    return _release(accelerator)


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
