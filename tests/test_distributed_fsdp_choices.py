"""FSDP2 defects that show only on a GPU, checked here through the strategy object's own choices."""
from types import SimpleNamespace

import pytest
import torch

from launcher.recipe.schema import Recipe
from launcher.distributed.strategies import strategy_for


def fsdp() -> object:
    return strategy_for(Recipe.model_validate({"model": {"path": "m"}, "data": {"train": "t.jsonl"}, "output_dir": "o",
                                               "distributed": {"strategy": "fsdp"}}))


def test_one_process_fsdp_places_the_model_on_the_accelerator_device():
    """accelerator.prepare never sees an FSDP2 model, so the strategy must move it (to cuda:0 on a GPU)."""
    target = SimpleNamespace(num_processes=1, device=torch.device("meta"))  # any device other than where it was built
    model = fsdp().shard(torch.nn.Linear(4, 4), target)
    assert {p.device for p in model.parameters()} == {torch.device("meta")}


@pytest.fixture
def process_group():
    """A real one-rank gloo group: the sharded scaler agrees on overflow over it."""
    import torch.distributed as dist
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    yield
    dist.destroy_process_group()


def test_fp16_gets_a_scaler_that_unscales_and_skips_overflowing_steps(process_group):
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
    Accelerator(cpu=True)  # accelerate's optimiser wrapper reads the process state
    cpu = torch.device("cpu")
    scaler = fsdp().gradient_scaler(SimpleNamespace(mixed_precision="fp16", device=cpu, num_processes=2))
    assert isinstance(scaler, ShardedGradScaler)
    assert fsdp().gradient_scaler(SimpleNamespace(mixed_precision="no", device=cpu, num_processes=2)) is None
    torch.manual_seed(0)
    model, reference = torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)
    reference.load_state_dict(model.state_dict())
    optimizer = AcceleratedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), device_placement=False, scaler=scaler)
    x = torch.randn(8, 4)

    scaler.scale(model(x).sum()).backward()
    model.weight.grad[0, 0] = float("inf")  # a fake fp16 overflow
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()
    assert optimizer.step_was_skipped
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    optimizer.zero_grad()

    scale = scaler.get_scale()
    assert scale < 2.0 ** 16  # backed off after the overflow
    scaler.scale(model(x).sum()).backward()
    optimizer.step()  # unscaled first: the update is the fp32 one, not `scale` times larger
    reference(x).sum().backward()
    torch.optim.SGD(reference.parameters(), lr=0.1).step()
    assert not optimizer.step_was_skipped
    for got, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
