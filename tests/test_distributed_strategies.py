"""Sharding across 2 real processes on CPU (gloo): DDP, DeepSpeed ZeRO-1/2/3 (+offload), FSDP2.

Each strategy trains once on 2 processes; its losses and saved model are compared with a 1-process
run on the same global batches (micro 4 x accum 2 on one process = micro 2 x accum 2 x 2 processes),
run once per method and shared. Some of the same 2-process runs are then resumed from their step-2
checkpoint, on 2 and on 1 process (ZeRO-3 offload full fine-tuning through a universal checkpoint; the
other ZeRO stages' resumes on another count are in test_distributed_world_size_zero.py). Launcher
processes cost 10-15 s of imports each, so cases are combined rather than split into many launches.
"""
import json
import shutil
import time
from pathlib import Path

import pytest

from support import (COMPARE_STEPS, build_tiny_llama, comparable_recipe, free_port, launch, launch_two, load_tensors, ok, rank_record, rewind, run_here, tiny_recipe, train_losses,
                     without_eval, write_recipe)

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

LOSS_RTOL = 1e-5   # fp32 on CPU: reduction order differs between 1 and 2 processes, nothing else
WEIGHT_ATOL = 1e-5


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("dist-llama"))


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory):
    """1-process runs, one per method, on the same global batches as the 2-process runs."""
    runs = {}

    def get(method: str) -> Path:
        if method not in runs:
            folder = tmp_path_factory.mktemp(f"ref-{method}")
            ok(run_here([comparable_recipe(model, folder, method, {}, micro_batch_size=4)]))
            runs[method] = folder / "run"
        return runs[method]
    return get


CASES = {  # name: (method, distributed section)
    "ddp": ("full", {"strategy": "ddp", "num_processes": 2}),
    "zero1": ("full", {"strategy": "deepspeed", "deepspeed": "zero1"}),
    "zero2": ("full", {"strategy": "deepspeed", "deepspeed": "zero2"}),
    "zero3-lora": ("lora", {"strategy": "deepspeed", "deepspeed": "zero3"}),
    "zero3_offload": ("full", {"strategy": "deepspeed", "deepspeed": "zero3_offload"}),
    "fsdp": ("full", {"strategy": "fsdp"}),
    "fsdp-lora-grad_op": ("lora", {"strategy": "fsdp", "fsdp": {"sharding": "grad_op"}}),
}


@pytest.fixture(scope="module")
def two_process(model, tmp_path_factory):
    """The 2-process run of each case, made once and shared by the tests that read it."""
    runs = {}

    def get(name: str) -> tuple[Path, Path]:
        if name not in runs:
            method, distributed = CASES[name]
            folder = tmp_path_factory.mktemp(name)
            recipe = comparable_recipe(model, folder, method, distributed)
            started = time.time()
            ok(launch_two([recipe]))
            print(f"{name}: 2-process run {time.time() - started:.0f} s")
            runs[name] = (recipe, folder / "run")
        return runs[name]
    return get


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_match_one_process(name, two_process, reference):
    import torch
    method = CASES[name][0]
    _, run = two_process(name)
    ref = reference(method)
    seen, expected = train_losses(run), train_losses(ref)
    assert sorted(seen) == list(range(1, COMPARE_STEPS + 1))
    for step in expected:
        assert seen[step] == pytest.approx(expected[step], rel=LOSS_RTOL), f"{name} step {step}: {seen} vs {expected}"
    got, want = load_tensors(run / "final"), load_tensors(ref / "final")
    assert got.keys() == want.keys() and got, f"{name}: saved tensors differ in names"
    for key in want:
        assert got[key].shape == want[key].shape and got[key].numel() > 0, key
        torch.testing.assert_close(got[key].float(), want[key].float(), atol=WEIGHT_ATOL, rtol=0, msg=f"{name}: {key}")
    if method == "full":  # and it loads as users load it
        from transformers import AutoModelForCausalLM
        reloaded = AutoModelForCausalLM.from_pretrained(run / "final")
        first = next(iter(want))
        torch.testing.assert_close(reloaded.state_dict()[first].float(), want[first].float(), atol=WEIGHT_ATOL, rtol=0)
    else:  # a sharded adapter is complete: every LoRA matrix, equal to the 1-process one (checked above)
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        adapter = [k for k in got if "lora_" in k]
        assert adapter and all(got[k].abs().sum() > 0 for k in adapter if "lora_A" in k)
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model_path(run)), run / "final")


def base_model_path(run: Path) -> str:
    import yaml
    return yaml.safe_load((run / "recipe.yaml").read_text())["model"]["path"]


def test_fsdp2_really_shards(two_process):
    _, run = two_process("fsdp")
    ranks = [rank_record(run, r, "parameter_bytes") for r in (0, 1)]
    full = ranks[0]["full_parameter_bytes"]
    assert [r["read_weights"] for r in ranks] == [True, False]  # rank 1 built on meta and received its shards
    for record in ranks:
        assert record["world_size"] == 2 and record["strategy"] == "fsdp"
        assert 0.45 * full <= record["parameter_bytes"] <= 0.55 * full, ranks
    assert sum(r["parameter_bytes"] for r in ranks) == full


@pytest.mark.parametrize("name", ["zero3-lora", "fsdp"])
def test_resume_two_to_two_is_exact_and_two_to_one_holds_the_global_batch(name, two_process):
    import torch
    recipe, run = two_process(name)
    straight, weights = train_losses(run), load_tensors(run / "final")
    rewind(run, 2)
    resumed = ok(launch_two([recipe]))
    assert "resuming from" in resumed.stdout and "step-2 at step 2" in resumed.stdout
    for line in ("resuming from", "finished in", "eval before -> after"):  # printed once, by rank 0, not once per rank
        assert resumed.stdout.count(line) == 1, (line, resumed.stdout[-3000:])
    again = train_losses(run)  # later lines for steps 3-4 win
    assert [again[s] for s in range(1, COMPARE_STEPS + 1)] == [straight[s] for s in range(1, COMPARE_STEPS + 1)]  # bitwise
    if name == "fsdp":  # each rank wrote, and read back, only its own shards: about half of the checkpoint each
        files = {f.name: f.stat().st_size for f in (run / "checkpoints" / "step-2" / "dcp").glob("*.distcp")}
        stored = sum(files.values())
        assert sorted(files) == ["__0_0.distcp", "__1_0.distcp"], files  # one file per rank, written by that rank
        assert all(0.4 * stored <= size <= 0.6 * stored for size in files.values()), files
        reads = [json.loads(line)["checkpoint_bytes_read"] for r in (0, 1)
                 for line in (run / "logs" / f"rank-{r}.jsonl").read_text().splitlines() if "checkpoint_bytes_read" in line]
        assert len(reads) == 2 and all(0.4 * stored <= b <= 0.6 * stored for b in reads), (reads, stored)

    rewind(run, 2)  # on one process: grad_accum doubles, so the same rows make each step
    one = ok(launch([recipe]))
    assert "step-2 at step 2" in one.stdout and "train.grad_accum 2 -> 4" in one.stdout
    again = train_losses(run)
    for step in (3, 4):
        assert again[step] == pytest.approx(straight[step], rel=LOSS_RTOL), (again, straight)
    for key, value in load_tensors(run / "final").items():
        torch.testing.assert_close(value.float(), weights[key].float(), atol=WEIGHT_ATOL, rtol=0, msg=key)


def test_zero3_offload_full_fine_tuning_resumes_on_one_process_through_a_universal_checkpoint(two_process, reference):
    """ZeRO-3 with its optimiser offloaded to the CPU, stopped at step 2 on 2 processes, resumes on 1 through its
    universal conversion with the global batch held. ZeRO-1/2/3 without offload, the reuse of a conversion and
    1 -> 2 are specified in test_distributed_world_size_zero.py."""
    recipe, run = two_process("zero3_offload")
    expected = train_losses(reference("full"))
    rewind(run, 2)
    one = ok(launch([recipe]))
    assert "train.grad_accum 2 -> 4" in one.stdout and "converted " in one.stdout and "DeepSpeed universal checkpoint" in one.stdout
    for step in (3, 4):
        assert train_losses(run)[step] == pytest.approx(expected[step], rel=LOSS_RTOL), (train_losses(run), expected)
    converted = run / "checkpoints" / "step-2" / "universal"
    assert converted.is_dir() and not converted.with_name("universal.tmp").exists()


def test_failing_rank_ends_the_launch_with_its_error(tmp_path, model):
    """Rank 1 raises in its third forward; the launch must end non-zero, quickly, showing rank 1's error."""
    boom = tmp_path / "boom-model"
    shutil.copytree(model, boom)
    (boom / "boom.py").write_text(
        "import os\nfrom transformers import LlamaForCausalLM\n\n\n"
        "class BoomForCausalLM(LlamaForCausalLM):\n    calls = 0\n\n"
        "    def forward(self, *args, **kwargs):\n        BoomForCausalLM.calls += 1\n"
        "        if os.environ.get('RANK') == '1' and BoomForCausalLM.calls == 3:\n"
        "            raise RuntimeError('boom on rank 1')\n        return super().forward(*args, **kwargs)\n")
    config = json.loads((boom / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "boom.BoomForCausalLM"}
    (boom / "config.json").write_text(json.dumps(config))
    recipe = tiny_recipe(boom, tmp_path / "run", method="full", train={"max_steps": COMPARE_STEPS}, distributed={"timeout_minutes": 1})
    recipe["model"]["trust_remote_code"] = True
    recipe = without_eval(recipe)
    started = time.time()
    result = launch_two([write_recipe(recipe, tmp_path / "r.yaml")], timeout=300)
    elapsed = time.time() - started
    assert result.returncode != 0
    assert "boom on rank 1" in result.stderr
    assert elapsed < 180, f"took {elapsed:.0f} s"


def test_wrong_process_count_is_refused_before_loading(tmp_path, model):
    recipe = tiny_recipe(model, tmp_path / "run", distributed={"num_processes": 2})
    result = launch([write_recipe(recipe, tmp_path / "r.yaml")])
    assert result.returncode == 2
    assert "distributed.num_processes is 2 but 1 process started" in result.stderr
    assert "--num_processes 2" in result.stderr and "Traceback" not in result.stderr


def _unsynchronised_rank(rank: int, port: int, queue) -> None:
    """One of two real gloo processes whose models never exchanged gradients (different weights)."""
    import os
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    from launcher.recipe.schema import Recipe

    from launcher.errors import UserError
    from launcher.distributed.strategies import strategy_for
    accelerator = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    torch.manual_seed(rank)
    recipe = Recipe.model_validate({"model": {"path": "m"}, "data": {"train": "t.jsonl"}, "output_dir": "o"})
    try:
        strategy_for(recipe).check_synchronised(accelerator, torch.nn.Linear(4, 4))
        queue.put((rank, "passed"))
    except UserError as exc:
        queue.put((rank, str(exc)))
    accelerator.end_training()


def test_unsynchronised_processes_are_refused():
    import torch.multiprocessing as mp
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    processes = [context.Process(target=_unsynchronised_rank, args=(rank, port, queue)) for rank in (0, 1)]
    for process in processes:
        process.start()
    results = dict(queue.get(timeout=900) for _ in processes)
    for process in processes:
        process.join(timeout=300)
    for message in results.values():
        assert "gradients are not synchronised" in message and "accelerate launch" in message, results


def test_fsdp_cpu_offload_without_a_gpu_is_refused_before_loading(tmp_path, model, capsys):
    from launcher.cli import main
    recipe = tiny_recipe(model, tmp_path / "run", distributed={"strategy": "fsdp", "fsdp": {"cpu_offload": True}})
    assert main([str(write_recipe(recipe, tmp_path / "r.yaml"))]) == 2
    assert "distributed.fsdp.cpu_offload" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
