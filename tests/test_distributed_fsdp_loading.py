"""FSDP2 over several processes loads the weights on rank 0 only (launcher/distributed/rules.py reads_weights,
launcher/distributed/strategies.py fill_shards): the other ranks build the model on the meta device and receive
their shards. That the trained result is unchanged is shown by the 2-process FSDP2 comparisons in
test_distributed_strategies.py (full fine-tuning and LoRA), which now run through this path; here: who loads,
that the meta-built model is the loaded one in all but its weights, and what rank 1's host memory does."""
from pathlib import Path

import pytest

from support import launch_two, load_tensors, ok, rank_record, small_tokenizer, tiny_recipe, without_eval, write_recipe

from launcher.distributed.rules import rules_for
from launcher.model.loading import empty_base, load_base
from launcher.recipe.schema import Recipe


def recipe_for(folder, task: str = "causal-lm", **sections) -> Recipe:
    recipe = tiny_recipe(folder, Path("unused"), **sections)
    recipe["model"]["task"] = task
    if task == "classification":
        recipe["data"].update(format="classification", fields={"text": "en", "label": "es"})
    return Recipe.model_validate(recipe)


@pytest.mark.parametrize("distributed, method, world, readers", [
    ({"strategy": "fsdp"}, "full", 2, [0]), ({"strategy": "fsdp"}, "lora", 4, [0]), ({"strategy": "fsdp"}, "full", 1, [0]),
    ({"strategy": "fsdp"}, "qlora", 2, [0, 1]),  # bitsandbytes quantises while loading, on each rank's device
    ({"strategy": "ddp"}, "full", 2, [0, 1]), ({"strategy": "deepspeed", "deepspeed": "zero3"}, "lora", 2, [0, 1]),
])
def test_who_reads_the_weights(tiny_model, distributed, method, world, readers):
    recipe = recipe_for(tiny_model, method=method, distributed=distributed)
    assert [rank for rank in range(world) if rules_for(recipe).reads_weights(world, rank)] == readers


@pytest.mark.parametrize("task", ["causal-lm", "classification"])
def test_the_meta_built_model_is_the_loaded_one_but_for_its_weights(tiny_model, task):
    """Same names, shapes, dtypes and config; buffers computed at construction (rotary inv_freq, in no checkpoint)
    equal the loaded model's, since no rank sends them."""
    import torch
    recipe = recipe_for(tiny_model, task, method="full")
    labels = ["a", "b", "c"] if task == "classification" else None
    loaded, empty = load_base(str(tiny_model), recipe, False, labels), empty_base(str(tiny_model), recipe, False, labels)
    assert all(p.is_meta for p in empty.parameters())
    assert {k: (v.shape, v.dtype) for k, v in empty.state_dict().items()} == {k: (v.shape, v.dtype) for k, v in loaded.state_dict().items()}
    buffers = dict(loaded.named_buffers())
    assert buffers and buffers.keys() == dict(empty.named_buffers()).keys()
    for name, buffer in empty.named_buffers():
        assert not buffer.is_meta and torch.equal(buffer, buffers[name]), name
    assert empty.config.to_dict() == loaded.config.to_dict()
    if task == "causal-lm":
        assert empty.generation_config.to_dict() == loaded.generation_config.to_dict()


def test_a_tied_head_is_built_tied(tmp_path):
    """FSDP2 shards a tied weight once; a rank whose head were a parameter of its own would make one more
    broadcast than rank 0 and wait forever."""
    model = build_tied_llama(tmp_path / "tied", hidden=32, layers=1)
    empty = empty_base(str(model), recipe_for(model, method="full"), False)
    assert empty.lm_head.weight is empty.model.embed_tokens.weight


def build_tied_llama(folder: Path, hidden: int = 1024, layers: int = 8) -> Path:
    """A random Llama whose head is its input embedding: about 88M parameters (352 MB in float32) by default."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    tokenizer = small_tokenizer(chat=True)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.lm_head.weight = model.model.embed_tokens.weight  # tied by hand: after in-process runs tie_weights() may not
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.multiproc
@pytest.mark.slow
def test_rank_one_never_holds_the_whole_model(tmp_path):
    """One step of 2-process FSDP2 full fine-tuning on an 88M-parameter model: while the model loads and shards,
    rank 1's peak host memory grows by its shard and little more (a rank that loaded the model grew by the whole
    model and its shard), rank 0's by the whole model more than rank 1's. Tied weights stay tied, and train."""
    import torch
    model = build_tied_llama(tmp_path / "model")
    recipe = tiny_recipe(model, tmp_path / "run", method="full", distributed={"strategy": "fsdp"},
                         train={"max_steps": 1, "micro_batch_size": 1, "grad_accum": 1, "lr": 1e-4, "schedule": "constant"})
    recipe = without_eval(recipe)
    ok(launch_two([write_recipe(recipe, tmp_path / "r.yaml")]))
    ranks = [rank_record(tmp_path / "run", rank, "load_rss_growth_bytes") for rank in (0, 1)]
    whole = ranks[0]["full_parameter_bytes"]
    assert whole > 300e6, ranks
    assert [r["read_weights"] for r in ranks] == [True, False]
    shard, growth = ranks[1]["parameter_bytes"], [r["load_rss_growth_bytes"] for r in ranks]
    # rank 1: its shard, one tensor in flight and the code the load imports (about 80 MB here); had it loaded the
    # model, it would have held the other half too (0.5 x whole more)
    assert growth[1] - shard < 0.35 * whole, ranks
    assert growth[0] - growth[1] > 0.8 * whole, ranks  # rank 0 held the whole state dict besides its shard
    saved = load_tensors(tmp_path / "run" / "final")
    embedding = saved["model.embed_tokens.weight"]
    assert "lm_head.weight" not in saved or torch.equal(saved["lm_head.weight"], embedding)
    assert not torch.equal(embedding, load_tensors(model)["model.embed_tokens.weight"])  # trained, on both ranks' shards
