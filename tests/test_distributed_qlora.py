"""QLoRA across 2 real processes on CPU: FSDP2 shards the 4-bit base (stored in the compute dtype),
DeepSpeed ZeRO-1/2 replicate it and partition the adapters' optimiser state; ZeRO-3 is refused up front.

Each 2-process run is compared with one 1-process QLoRA run on the same global batches (no eval data,
so bitsandbytes never repacks its weights for inference: docs/platform.md).
"""

import pytest
from support import COMPARE_STEPS, build_tiny_llama, comparable_recipe, launch_two, ok, rank_record, run_here, train_losses

from launcher.cli import main

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]
LOSS_RTOL = 1e-4  # float32 on CPU; only the order of the gradient reduction differs


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """Wide enough (128) that 4-bit blocks are whole, as in real models."""
    return build_tiny_llama(tmp_path_factory.mktemp("sharded-qlora-llama"), hidden=128)


@pytest.fixture(scope="module")
def one_process(llama, tmp_path_factory):
    folder = tmp_path_factory.mktemp("qlora-1")
    ok(run_here([comparable_recipe(llama, folder, "qlora", {}, micro_batch_size=4)]))
    return folder / "run"


SHARDED = [({"strategy": "fsdp"}, 0.5),  # FSDP2: each rank stores half of every parameter, the 4-bit base included
           ({"strategy": "deepspeed", "deepspeed": "zero2"}, 1.0)]  # ZeRO-2: the frozen 4-bit base is replicated


@pytest.mark.parametrize("distributed,share", SHARDED, ids=["fsdp2", "zero2"])
def test_two_process_qlora_matches_one_process_and_stores_its_share(distributed, share, llama, one_process, tmp_path):
    import torch
    from safetensors.torch import load_file
    ok(launch_two([comparable_recipe(llama, tmp_path, "qlora", distributed)]))
    run = tmp_path / "run"
    seen, expected = train_losses(run), train_losses(one_process)
    assert sorted(seen) == list(range(1, COMPARE_STEPS + 1))
    for step in expected:
        assert seen[step] == pytest.approx(expected[step], rel=LOSS_RTOL), (seen, expected)
    got, want = (load_file(r / "final" / "adapter_model.safetensors") for r in (run, one_process))
    assert got.keys() == want.keys() and any("lora_B" in k for k in got)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-4, rtol=0, msg=key)
    ranks = [rank_record(run, r, "parameter_bytes") for r in (0, 1)]
    full = ranks[0]["full_parameter_bytes"]
    for record in ranks:
        assert record["parameter_bytes"] == pytest.approx(share * full, rel=0.1), ranks


def test_qlora_with_zero3_is_refused_up_front_naming_the_fsdp2_route(llama, tmp_path, capsys):
    from support import tiny_recipe, write_recipe
    recipe = tiny_recipe(llama, tmp_path / "run", method="qlora", distributed={"strategy": "deepspeed", "deepspeed": "zero3"})
    assert main(["validate", str(write_recipe(recipe, tmp_path / "r.yaml"))]) == 2
    err = capsys.readouterr().err
    assert "method: qlora with DeepSpeed ZeRO-3" in err and "distributed.strategy: fsdp" in err and err.count("\n") == 1
