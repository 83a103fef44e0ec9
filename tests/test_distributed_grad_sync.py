"""When FSDP2 reduce-scatters gradients under accumulation (2 real gloo processes): adapters once per optimiser
step (their unsharded gradients are small); full fine-tuning every micro-batch, so that no rank holds whole
fp32 gradients between micro-batches (issue 25 #6).

The collectives are counted with torch's profiler around the launcher's own train_step: every
reduce-scatter FSDP2 issues shows up as a c10d op, whatever code path issued it.
"""
import os

import pytest

from support import build_tiny_llama, free_port, tiny_recipe, without_eval, write_recipe

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

STEPS, ACCUM = 2, 4


def _rank(rank: int, port: int, recipe_path: str, queue) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    from torch.distributed.fsdp import FSDPModule
    from torch.profiler import ProfilerActivity, profile

    from launcher.recipe.files import load_recipe
    from launcher.training.loop import close, setup, train_step
    session = setup(load_recipe(recipe_path))
    units = sum(isinstance(m, FSDPModule) for m in session.model.modules())
    batches = [session.micro_batches(step) for step in range(STEPS)]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for micro_batches in batches:
            assert len(micro_batches) == ACCUM
            train_step(session, micro_batches)
    # c10d::_reduce_scatter_base_ on gloo (reduce_scatter_tensor elsewhere): the collective itself, once per call
    scatters = sum(1 for event in prof.events() if event.name.startswith("c10d::") and "reduce_scatter" in event.name)
    queue.put((rank, units, scatters))
    close(session)


# full: three units (two blocks and the root) at every micro-batch; LoRA: the two blocks that hold adapters (the
# root's own parameters are frozen, so nothing to reduce) once per step
@pytest.mark.parametrize("method,expected", [("full", 3 * STEPS * ACCUM), ("lora", 2 * STEPS)])
def test_fsdp2_reduce_scatters_per_micro_batch_for_full_fine_tuning_once_per_step_for_adapters(tmp_path, method, expected):
    import torch.multiprocessing as mp
    model = build_tiny_llama(tmp_path / "model")
    recipe = tiny_recipe(model, tmp_path / "run", method=method, distributed={"strategy": "fsdp"},
                         train={"max_steps": STEPS, "micro_batch_size": 1, "grad_accum": ACCUM})
    recipe = without_eval(recipe)
    path = write_recipe(recipe, tmp_path / "r.yaml")
    context = mp.get_context("spawn")
    queue, port = context.Queue(), free_port()
    processes = [context.Process(target=_rank, args=(rank, port, str(path), queue)) for rank in (0, 1)]
    for process in processes:
        process.start()
    results = [queue.get(timeout=600) for _ in processes]
    for process in processes:
        process.join(timeout=120)
    for rank, units, scatters in results:
        assert units == 3, results  # two transformer blocks and the root
        assert scatters == expected, results
