"""`launcher plan`: predicted per-rank peak memory against peaks measured on an H200, the real-size recipes
planned offline, train's refusal before any weights load, and QLoRA's unquantised weights."""
from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from memory_reference import config_folder, recipe_for, reference_lines
from support import build_tiny_llama, launch, run_here, tiny_recipe, write_recipe

from launcher.memory import estimate as planner

from launcher.memory import advice as planning
from launcher.memory.inventory import shipped_config
from launcher.cli import main
from launcher.recipe.schema import Recipe
from launcher.recipe.files import load_recipe

REPO = Path(__file__).resolve().parents[1]
REAL_SIZE = {"llama-8b-lora.yaml": (1, 80), "llama-8b-qlora.yaml": (1, 24), "llama-8b-zero3-full.yaml": (8, 80),
             "llama-70b-lora.yaml": (8, 80), "llama-70b-2nodes-lora.yaml": (16, 80)}


@pytest.mark.parametrize("line", reference_lines(), ids=lambda line: line["label"])
def test_plan_is_within_15_percent_of_each_measured_h200_peak(line, tmp_path):
    recipe = Recipe.model_validate(recipe_for(line, config_folder(line, tmp_path)))
    predicted = planner.plan(recipe, world=line["world_size"], gpu_gib=141).peak_gib
    assert abs(predicted / line["peak_gib"] - 1) <= 0.15, f"{line['label']}: planned {predicted:.2f} GiB, measured {line['peak_gib']}"


def test_each_mechanism_moves_the_plan_the_way_it_moves_memory(tmp_path):
    """Checkpointing and chunked CE lower the peak, a larger micro-batch raises it, ZeRO-3 on 8 GPUs holds an eighth
    of the weights, QLoRA stores the base in about 4.1 bits."""
    line = next(line for line in reference_lines() if line["label"] == "1b-full")
    data = recipe_for(line, config_folder(line, tmp_path))

    def peak(world=1, **changes):
        changed = json.loads(json.dumps(data))
        for section, values in changes.items():
            changed[section] = {**changed.get(section, {}), **values} if isinstance(values, dict) else values
        return planner.plan(Recipe.model_validate(changed), world=world, gpu_gib=141)

    base = peak().peak_gib
    assert peak(train={"gradient_checkpointing": True}).peak_gib < 0.5 * base
    assert peak(train={"loss_chunk_tokens": 1024}).peak_gib < base - 4
    assert peak(train={"micro_batch_size": 16}).peak_gib > 1.8 * base - 12.3
    sharded = peak(8, distributed={"strategy": "deepspeed", "deepspeed": "zero3"}).moments["end of forward"]["weights"]
    assert sharded == pytest.approx(2 * 1.1e9 / 8, rel=0.01)  # bf16 weights, an eighth each
    qlora = peak(method="qlora", model={"path": data["model"]["path"], "dtype": "bfloat16"}, train={"precision": "fp32"})
    base_bytes = 22 * (2 * 2048 * 2048 + 2 * 2048 * 256 + 3 * 2048 * 5632)
    adapters = 4 * 22 * 16 * (4 * 2048 + 2 * 2304 + 2 * 7680 + 7680)  # float32 LoRA A and B on every linear layer
    assert qlora.moments["end of forward"]["weights"] < 2 * 2 * 32000 * 2048 + 0.52 * base_bytes + adapters + 1e6


def test_plan_json_names_components_peak_fit_and_cheapest_fitting_changes(capsys):
    recipe = REPO / "recipes" / "llama-8b-lora.yaml"
    assert main(["plan", str(recipe), "train.gradient_checkpointing=false", "train.loss_chunk_tokens=0",
                 "--gpu-memory", "40", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["components"]) >= {"weights", "optimizer state", "gradients", "buffers"}
    assert result["fits"] is False and result["peak_gib"] > result["usable_gib"]
    first = result["suggestions"][0]
    assert first["fits"] and first["peak_gib"] <= result["usable_gib"]
    costs = [item["relative_step_time"] for item in result["suggestions"]]
    assert costs == sorted(costs)  # cheapest first


def cpu_seconds(command: list) -> tuple[float, subprocess.CompletedProcess]:
    """CPU time (user + system) a child process used: on two cores shared by many jobs, wall time says little."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = launch(command, timeout=300) if command[0] != sys.executable else subprocess.run(command, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, result


@pytest.fixture(scope="module")
def import_cpu_seconds() -> float:
    """What a fresh process spends importing what `launcher plan` needs: measured once, shared by the cases."""
    seconds, _ = cpu_seconds([sys.executable, "-c", "import torch; from transformers.models.llama import modeling_llama; "
                              "import launcher.cli, launcher.memory.advice"])
    return seconds


@pytest.mark.parametrize("name", sorted(REAL_SIZE))
def test_real_size_recipe_validates_and_plans_offline_in_seconds(name, import_cpu_seconds):
    """No weights exist here: the hub id resolves to the config shipped in launcher/model_configs. The plan's own
    work takes under 2 CPU-seconds; the rest of the command is importing torch and the model's transformers code
    (8.4 of the command's 8.9 CPU-seconds, measured here while other jobs saturated the two cores)."""
    from launcher.preflight import checks as preflight
    world, gpu = REAL_SIZE[name]
    recipe = load_recipe(REPO / "recipes" / name)
    assert shipped_config(recipe.model.path) is not None
    preflight.check(recipe, preflight.Target("cuda", world))  # as `launcher slurm submit` checks for the job
    planned, result = cpu_seconds(["plan", REPO / "recipes" / name, "--gpus", world, "--gpu-memory", gpu, "--json"])
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["fits"] is True
    imports = import_cpu_seconds
    assert planned - imports < 4.0, f"plan {planned:.1f} CPU-s, of which imports {imports:.1f}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("plan-llama"), hidden=128, layers=2)


def test_train_refuses_a_recipe_the_plan_says_cannot_fit_before_any_weights_load(tiny, tmp_path):
    data = tiny_recipe(tiny, tmp_path / "run", train={"max_steps": 2, "micro_batch_size": 8, "grad_accum": 1}, data={"eval": None})
    recipe = Recipe.model_validate(data)
    planned = planner.plan(recipe, 1, 1.0)
    # just too small for the recipe as written: its usable memory 97 % of the peak, once the overheads are set aside
    gpu = planner.CUDA_CONTEXT_GIB + (1 + planner.FRAGMENTATION) * 0.97 * planned.peak_gib
    top = planning.suggestions(recipe, 1, gpu)[0]
    assert top["fits"]
    data["memory"] = {"gpu_gib": gpu}
    result = run_here([write_recipe(data, tmp_path / "r.yaml")])
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()[-1:]
    assert line.startswith("error: memory plan: peak") and " ".join(top["overrides"]) in line
    assert not (tmp_path / "run").exists()  # refused before the run directory, let alone the weights


def test_over_budget_warn_trains_and_reports_planned_beside_measured_peaks_and_plan_run_dir_replans_it(tiny, tmp_path, capsys):
    """One CPU run: its memory record, report.md and `launcher plan RUN_DIR` give the planned training and eval peaks
    beside the measured ones; on CPU the measured figure is the growth of peak resident memory, said so."""
    data = tiny_recipe(tiny, tmp_path / "run", train={"max_steps": 2}, memory={"gpu_gib": 1e-4, "over_budget": "warn"})
    result = run_here([write_recipe(data, tmp_path / "r.yaml")])
    assert result.returncode == 0, result.stderr
    assert "warning: memory plan: peak" in result.stderr
    [peak] = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if json.loads(line).get("kind") == "memory"]
    # ru_maxrss is a high-water mark (here the test process's, set by whatever ran in it before), so the growth
    # measured after loading can be 0; bench/cpu_memory.py compares the two on a 1.6 GB model in fresh processes.
    assert peak["predicted_peak_gib"] > 0 and peak["measured_peak_gib"] >= 0 and "ru_maxrss" in peak["measured_by"]
    assert peak["device"] == "cpu" and peak["world_size"] == 1
    assert 0 < peak["predicted_training_peak_gib"] and 0 < peak["predicted_evaluation_peak_gib"]
    assert max(peak["predicted_training_peak_gib"], peak["predicted_evaluation_peak_gib"]) == peak["predicted_peak_gib"]
    assert 0 <= peak["measured_training_peak_gib"] <= peak["measured_peak_gib"]
    assert 0 <= peak["measured_evaluation_peak_gib"] <= peak["measured_peak_gib"]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "peak memory" in report and "planned vs measured" in report
    assert "| training |" in report and "| evaluation |" in report and "ru_maxrss" in report
    assert main(["plan", str(tmp_path / "run"), "--json"]) == 0
    replanned = json.loads(capsys.readouterr().out)
    passes = {row["pass"]: row for row in replanned["measured"]["passes"]}
    assert replanned["measured"]["device"] == "cpu" and set(passes) == {"training", "evaluation", "peak"}
    for name in ("training", "evaluation"):  # the same recipe planned again gives the figures the run recorded
        assert passes[name]["planned_gib"] == pytest.approx(peak[f"predicted_{name}_peak_gib"], abs=0.002)
        assert passes[name]["measured_gib"] == peak[f"measured_{name}_peak_gib"]
    assert main(["plan", str(tmp_path / "run")]) == 0
    text = capsys.readouterr().out
    assert "on CPU: resident memory" in text and "training" in text and "evaluation" in text


@pytest.mark.parametrize("upcast", [False, True])
def test_qlora_unquantised_weights_keep_the_compute_dtype_unless_upcast_is_asked(tiny, tmp_path, upcast):
    import torch

    from launcher.memory import counts as memory

    from launcher.model import loading as modeling
    recipe = Recipe.model_validate(tiny_recipe(tiny, tmp_path / "run", method="qlora",
                                               quant={"compute_dtype": "bfloat16", "fp32_non_quantised": upcast}))
    model = modeling.load_model(str(tiny), recipe, on_gpu=False)
    base = model.get_base_model()
    wanted = torch.float32 if upcast else torch.bfloat16
    kept = [base.get_input_embeddings().weight, base.get_output_embeddings().weight, base.model.norm.weight,
            base.model.layers[0].input_layernorm.weight]
    assert {p.dtype for p in kept} == {wanted}
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}  # peft's adapters
    loaded = memory.count_parameters(model).weight_bytes  # what the planner must predict, 4-bit packing included
    planned = planner.plan(recipe, 1, 80, device="cpu").moments["end of forward"]["weights"]
    assert planned == pytest.approx(loaded, rel=0.005)


def test_long_context_recipe_plans_activations_over_the_sequence_split_and_names_the_split_when_it_does_not_fit(capsys):
    """recipes/llama-8b-32k-sp.yaml (8B full, ZeRO-3, 32k-token rows) split over 2 and 8 processes: each rank holds
    a half and an eighth of the checkpointed block inputs and of the loss's float32 logits; the model state is the
    same. Without the split it does not fit a 60 GiB GPU, and a split is the cheapest change that does."""
    path = REPO / "recipes" / "llama-8b-32k-sp.yaml"
    plans = {split: planner.plan(load_recipe(path, [f"distributed.sequence_parallel={split}"]), 8, 60) for split in (1, 2, 8)}
    for split in (2, 8):
        for term in ("activations", "logits/loss"):
            assert plans[split].moments["end of forward"][term] == pytest.approx(plans[1].moments["end of forward"][term] / split,
                                                                                 rel=0.001)
        for term in ("weights", "optimizer state", "gradients"):
            assert plans[split].moments["end of forward"][term] == plans[1].moments["end of forward"][term]
        assert plans[split].fits and f"sequence split {split}" in plans[split].label
    assert not plans[1].fits
    assert main(["plan", str(path), "distributed.sequence_parallel=1", "--gpus", "8", "--gpu-memory", "60", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)["suggestions"][0]
    assert first["overrides"] == ["distributed.sequence_parallel=2"] and first["fits"]
    assert "sequence parallelism" in first["change"]
    assert main(["plan", str(path), "--json"]) == 0  # as its header runs it, without --gpus: the split's 8 processes
    assert json.loads(capsys.readouterr().out)["world_size"] == 8


def test_hsdp_divides_weights_by_the_shard_group_not_the_world(capsys):
    """The 2-node 70B recipe (replicate 2 x shard 8): each node's replica is sharded eight ways, so a rank holds an
    eighth of the weights (twice what plain FSDP2 over 16 would give it). A plain FSDP2 recipe on 2 nodes is
    planned with the HSDP mesh `slurm submit` gives it."""
    hybrid = planner.plan(load_recipe(REPO / "recipes" / "llama-70b-2nodes-lora.yaml"), 16, 80)
    flat = planner.plan(load_recipe(REPO / "recipes" / "llama-70b-lora.yaml"), 16, 80)
    eight = planner.plan(load_recipe(REPO / "recipes" / "llama-70b-lora.yaml"), 8, 80)
    weights = {name: result.moments["end of forward"]["weights"] for name, result in
               (("hybrid", hybrid), ("flat", flat), ("eight", eight))}
    assert weights["hybrid"] == weights["eight"] == pytest.approx(2 * weights["flat"], rel=1e-6)
    assert weights["hybrid"] == pytest.approx(70.6e9 * 2 / 8 / 2**0, rel=0.02)  # bf16 weights, an eighth
    assert "HSDP 2 replicas x 8" in hybrid.label
    assert main(["plan", str(REPO / "recipes" / "llama-70b-lora.yaml"), "--gpus", "8", "--nodes", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["mesh_overrides"] == ["distributed.replicate=2", "distributed.shard=8"]
    assert result["components"]["weights"] == pytest.approx(weights["hybrid"] / 2**30, abs=0.01)


def test_dpo_plans_two_sequences_per_row_and_the_references_no_grad_forward(tmp_path):
    """The same LoRA recipe on preference pairs: chosen and rejected of every row in one forward, so the step's
    activations and loss tensors double; the reference (adapter disabled) runs first without gradients."""
    line = next(line for line in reference_lines() if line["label"] == "8b-lora-nogc")
    sft = recipe_for(line, config_folder(line, tmp_path))
    dpo = json.loads(json.dumps(sft))
    dpo["data"] = {"train": str(REPO / "recipes" / "data" / "bible_en_es_pairs" / "train.jsonl"), "format": "preference",
                   "max_length": sft["data"]["max_length"]}
    sft_plan, dpo_plan = (planner.plan(Recipe.model_validate(data), 1, 141) for data in (sft, dpo))
    assert Recipe.model_validate(dpo).objective == "dpo"
    for term in ("activations", "logits/loss"):
        assert dpo_plan.moments["end of forward"][term] == pytest.approx(2 * sft_plan.moments["end of forward"][term], rel=0.01)
    assert "reference forward" not in sft_plan.moments
    reference = dpo_plan.moments["reference forward"]["reference forward"]
    assert 0 < reference < dpo_plan.moments["end of forward"]["activations"]
    assert dpo_plan.moments["end of forward"]["weights"] == sft_plan.moments["end of forward"]["weights"]  # one model


MEASURED_PASSES = """
import json, resource
from pathlib import Path
from launcher.memory.advice import MemoryCheck, measured_pass, measured_passes, peak_rss_kib
check = MemoryCheck(None, "cpu", 1, peak_rss_kib())
resident_kib = int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() // 1024
room = max(check.rss_before_kib - resident_kib, 0) * 1024  # below the mark the imports left
with measured_pass(check, "evaluation"):
    held = bytearray(b"x") * (room + 256 * 2**20)  # every page written: 256 MiB above the mark
del held
with measured_pass(check, "training"):
    held = bytearray(b"x") * (16 * 2**20)  # far below the mark: this pass's own peak cannot be seen
print(json.dumps({**measured_passes(check), "room": room}))
"""


def test_cpu_passes_are_measured_exactly_when_they_raise_the_high_water_mark_and_as_a_bound_otherwise():
    """In a fresh process (its high-water mark its own): a pass that writes 256 MiB above the mark is measured at
    that growth; a later, smaller pass gets only the mark as its upper bound, flagged so."""
    result = subprocess.run([sys.executable, "-c", MEASURED_PASSES], capture_output=True, text=True, timeout=300,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    passes = json.loads(result.stdout.strip().splitlines()[-1])
    assert passes["evaluation"]["upper_bound"] is False and 0.2 < passes["evaluation"]["gib"] < 0.3, passes
    assert passes["training"]["upper_bound"] is True and passes["training"]["gib"] == passes["evaluation"]["gib"], passes
