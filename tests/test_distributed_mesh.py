"""The process mesh (HSDP replicate x shard, sequence and context parallelism): refused in one line before
anything loads when it contradicts the strategy, the sequence length, the device or the process count."""
import os

import pytest

from support import tiny_recipe, validate_refusal

from launcher.distributed import mesh
from launcher.errors import UserError
from launcher.preflight.checks import Target, check
from launcher.recipe.schema import Recipe

KEY_REFUSALS = [
    ("hsdp under ddp", {"distributed": {"replicate": 2}}, "distributed.replicate: hybrid sharding (HSDP) is FSDP2's"),
    ("sp and cp together", {"distributed": {"strategy": "deepspeed", "deepspeed": "zero2", "sequence_parallel": 2,
                                            "context_parallel": 2}}, "both split the sequence"),
    ("sp without deepspeed", {"distributed": {"strategy": "fsdp", "sequence_parallel": 2}},
     "Ulysses sequence parallelism runs under DeepSpeed"),
    ("sp and max_length", {"distributed": {"strategy": "deepspeed", "deepspeed": "zero2", "sequence_parallel": 3}},
     "data.max_length 64 is not divisible by distributed.sequence_parallel 3"),
    ("cp without fsdp", {"distributed": {"context_parallel": 2}}, "distributed.context_parallel 2 needs distributed.strategy: fsdp"),
    ("cp and max_length", {"distributed": {"strategy": "fsdp", "context_parallel": 3}},
     "not divisible by 2 x distributed.context_parallel = 6"),
    ("cp on cpu", {"distributed": {"strategy": "fsdp", "context_parallel": 2}}, "distributed.context_parallel needs CUDA GPUs"),
    ("sp with packing", {"distributed": {"strategy": "deepspeed", "deepspeed": "zero2", "sequence_parallel": 2},
                         "data": {"packing": True}},
     "distributed.sequence_parallel 2 with data.packing: the split attention is one causal mask"),
]


@pytest.mark.parametrize("case,changes,expected", KEY_REFUSALS, ids=[case[0] for case in KEY_REFUSALS])
def test_mesh_keys_refused_by_validate(tiny_model, tmp_path, capsys, case, changes, expected):
    assert expected in validate_refusal(tiny_model, tmp_path, capsys, changes)


def recipe_with(tiny_model, tmp_path, **distributed) -> Recipe:
    return Recipe.model_validate(tiny_recipe(tiny_model, tmp_path / "run", distributed=distributed))


COUNT_REFUSALS = [
    ({"strategy": "fsdp", "replicate": 2, "shard": 3}, 4, "distributed.replicate 2 x shard 3 = 6 processes, but 4 run"),
    ({"strategy": "fsdp", "replicate": 3}, 4, "distributed.replicate 3 does not divide the 4 data-parallel processes"),
]


@pytest.mark.parametrize("distributed,world,expected", COUNT_REFUSALS)
def test_mesh_against_process_count(tiny_model, tmp_path, distributed, world, expected):
    with pytest.raises(UserError, match="^" + expected.split(" ", 1)[0]) as refused:
        check(recipe_with(tiny_model, tmp_path, **distributed), Target("cpu", world))
    assert expected in str(refused.value) and "\n" not in str(refused.value)


def test_context_parallel_needs_sdpa(tiny_model, tmp_path):
    recipe = tiny_recipe(tiny_model, tmp_path / "run", distributed={"strategy": "fsdp", "context_parallel": 2})
    recipe["model"]["attn_implementation"] = "eager"
    with pytest.raises(UserError, match="context parallelism replaces torch's scaled_dot_product_attention"):
        check(Recipe.model_validate(recipe), Target("cuda", 2))


@pytest.mark.parametrize("key,value,expected", [
    ("attn_implementation", "eager", "with model.attn_implementation eager: DeepSpeed's split attention needs sdpa"),
    ("task", "seq2seq", "with model.task seq2seq: the sequence split trains causal-lm next-token losses only")])
def test_sequence_parallel_needs_causal_lm_on_a_wrappable_attention(tiny_model, tmp_path, key, value, expected):
    recipe = tiny_recipe(tiny_model, tmp_path / "run", distributed={"strategy": "deepspeed", "deepspeed": "zero2",
                                                                   "sequence_parallel": 2})
    recipe["model"][key] = value
    with pytest.raises(UserError, match="^distributed.sequence_parallel 2 ") as refused:
        check(Recipe.model_validate(recipe), Target("cpu", 2))
    assert expected in str(refused.value) and "\n" not in str(refused.value)


def test_mesh_filled_in_and_unknown_count_passes(tiny_model, tmp_path):
    hybrid = recipe_with(tiny_model, tmp_path, strategy="fsdp", replicate=2, shard=8)
    check(hybrid, Target("cpu", 1))  # plain validate on a login node: 16 processes are not known yet
    assert mesh.mesh_for(hybrid, 16) == mesh.Mesh(2, 8)
    assert mesh.mesh_for(recipe_with(tiny_model, tmp_path, strategy="fsdp", shard=2), 4) == mesh.Mesh(2, 2)
    assert mesh.mesh_for(recipe_with(tiny_model, tmp_path, strategy="fsdp"), 4) == mesh.Mesh(1, 4)
    ulysses = mesh.mesh_for(recipe_with(tiny_model, tmp_path, strategy="deepspeed", deepspeed="zero2", sequence_parallel=2), 8)
    assert (ulysses.replicate * ulysses.shard, ulysses.world) == (4, 8)
    with pytest.raises(UserError, match="distributed.sequence_parallel 4 does not divide the 6 processes"):
        mesh.mesh_for(recipe_with(tiny_model, tmp_path, strategy="deepspeed", deepspeed="zero2", sequence_parallel=4), 6)


def test_slurm_chooses_hybrid_sharding_on_several_nodes(tiny_model, tmp_path):
    fsdp = recipe_with(tiny_model, tmp_path, strategy="fsdp")
    assert mesh.hybrid_overrides(fsdp, 2, 8) == ["distributed.replicate=2", "distributed.shard=8"]
    assert mesh.hybrid_overrides(fsdp, 1, 8) == []
    assert mesh.hybrid_overrides(recipe_with(tiny_model, tmp_path, strategy="fsdp", replicate=1), 2, 8) == []
    assert mesh.hybrid_overrides(recipe_with(tiny_model, tmp_path), 2, 8) == []


def test_slurm_render_passes_the_hybrid_mesh(tiny_model, tmp_path, capsys):
    from support import write_recipe

    from launcher.cli import main
    recipe = write_recipe(tiny_recipe(tiny_model, tmp_path / "run", distributed={"strategy": "fsdp"}), tmp_path / "r.yaml")
    assert main(["slurm", "render", str(recipe), "--nodes", "2", "--gpus-per-node", "4"]) == 0
    assert "distributed.replicate=2 distributed.shard=4" in capsys.readouterr().out
    assert main(["slurm", "render", str(recipe), "distributed.replicate=1", "--nodes", "2", "--gpus-per-node", "4"]) == 0
    script = capsys.readouterr().out
    assert "distributed.replicate=1" in script and "distributed.shard" not in script


def test_sequence_parallel_recipe_validates_and_context_split_waits_for_the_loop(tiny_model, tmp_path, capsys):
    from support import write_recipe

    from launcher.cli import main
    ulysses = tiny_recipe(tiny_model, tmp_path / "run", distributed={"strategy": "deepspeed", "deepspeed": "zero3",
                                                                    "sequence_parallel": 2})
    assert main(["validate", str(write_recipe(ulysses, tmp_path / "sp.yaml"))]) == 0, capsys.readouterr().err
    check(Recipe.model_validate(ulysses), Target("cpu", 4))
    with pytest.raises(UserError, match="does not train with it yet; set distributed.context_parallel: 1"):
        check(recipe_with(tiny_model, tmp_path, strategy="fsdp", context_parallel=2), Target("cuda", 2))


def test_slurm_render_refuses_a_job_whose_processes_cannot_form_the_mesh(tiny_model, tmp_path, capsys):
    """The script would start, load, and die at the first mesh check: render and submit say so before."""
    from support import write_recipe

    from launcher.cli import main
    split = tiny_recipe(tiny_model, tmp_path / "run", distributed={"strategy": "deepspeed", "deepspeed": "zero2",
                                                                   "sequence_parallel": 4})
    recipe = write_recipe(split, tmp_path / "r.yaml")
    assert main(["slurm", "render", str(recipe), "--gpus-per-node", "2"]) == 2
    assert "distributed.sequence_parallel 4 does not divide the 2 processes" in capsys.readouterr().err
    assert main(["slurm", "render", str(recipe), "--nodes", "2", "--gpus-per-node", "2"]) == 0
    assert "sbatch" in capsys.readouterr().out.lower()


def test_validate_in_a_plain_shell_checks_the_process_count_the_recipe_asks_for(tiny_model, tmp_path, capsys):
    """Before the launch (no WORLD_SIZE), `validate` checks the mesh on the recipe's num_processes instead of
    refusing the one process it runs in; `train` started that way is still refused (test_distributed_strategies)."""
    from support import write_recipe

    from launcher.cli import main
    assert "WORLD_SIZE" not in os.environ
    recipe = tiny_recipe(tiny_model, tmp_path / "run", distributed={"strategy": "fsdp", "num_processes": 4})
    assert main(["validate", str(write_recipe(recipe, tmp_path / "r.yaml"))]) == 0
    assert main(["validate", str(tmp_path / "r.yaml"), "distributed.replicate=3"]) == 2
    assert "distributed.replicate 3 does not divide the 4 data-parallel processes" in capsys.readouterr().err
