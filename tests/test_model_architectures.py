"""Architecture x method: every architecture a user is likely to bring, with each method, for the tasks it has.

Each case trains three steps in this process on a tiny random model (built from a config, no weights),
then checks: the loss is finite and the model learnt (its logits moved away from the base's); final/
reloaded with plain transformers / peft gives the trained model's logits; and `launcher merge` either
passes its own reload self-check or refuses before loading anything (full fine-tuning: nothing to merge).
"""
import math

import pytest
from architectures import ARCHITECTURES, CLASSIFY, Trained, batch, build, logits, recipe_for, reload
from support import small_tokenizer, train_losses

from launcher.errors import UserError

METHODS = ["full", "lora", "qlora", "dora"]
# QLoRA cases are the slowest quarter (pytest --durations): marked slow, still in the suite.
CASES = [pytest.param(arch, method, id=f"{arch}-{method}", marks=[pytest.mark.slow] if method == "qlora" else [])
         for arch in ARCHITECTURES for method in METHODS]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Each architecture built once per module, on first use."""
    built, tokenizer = {}, small_tokenizer()

    def get(name):
        if name not in built:
            built[name] = build(name, tmp_path_factory.mktemp(name), tokenizer)
        return built[name]
    return get


@pytest.mark.parametrize("arch,method", CASES)
def test_trains_reloads_and_merges(arch, method, models, tmp_path):
    import torch

    from launcher.commands.merge import merge
    task = ARCHITECTURES[arch][2]
    model_path = models(arch)
    run = Trained(recipe_for(model_path, task, method, tmp_path / "run"), tmp_path)
    try:
        inputs = batch(model_path)
        trained = logits(run.model, inputs)
        if method == "full":
            from launcher.model.loading import auto_class
            base = logits(auto_class(task).from_pretrained(model_path, dtype=torch.float32), inputs) if task != CLASSIFY else None
        else:
            with run.model.disable_adapter():
                base = logits(run.model, inputs) if task != CLASSIFY else None  # a classifier's head is new: no base
    finally:
        run.close()
    losses = train_losses(run.run_dir)
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values()), losses
    scale = trained.abs().max().item()
    if base is not None:
        assert (trained - base).abs().max().item() > 1e-3 * scale, "three steps at lr 1e-2 must move the logits"
    again = logits(reload(run, model_path), inputs)
    assert (again - trained).abs().max().item() <= 1e-4 * max(1.0, scale)
    if method == "full":
        with pytest.raises(UserError, match="a full model: nothing to merge"):
            merge(run.run_dir, "fp32")
        return
    assert merge(run.run_dir, "fp32") <= 1e-4 * max(1.0, scale)
    assert (run.run_dir / "merged" / "config.json").is_file()
    assert not (run.run_dir / "merged.tmp").exists()
