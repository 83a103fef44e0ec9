"""train.loss_chunk_tokens: the chunked lm_head + cross-entropy equals plain CE in loss and gradients."""
import pytest
import torch

from launcher.recipe.formats import IGNORE
from launcher.model.loss import task_loss_sum
from pydantic import ValidationError

from launcher.recipe.schema import Recipe


def _model(vocab: int = 997, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaForCausalLM(config).double()  # float64 model; both paths take CE in fp32, so only summation order differs


def _batch(vocab: int = 997):
    torch.manual_seed(1)
    ids = torch.randint(0, vocab, (3, 21))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0  # a right-padded row
    labels = ids.clone()
    labels[:, :5] = IGNORE  # a masked prompt
    labels[mask == 0] = IGNORE
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss_and_grads(model, batch, chunk):
    model.zero_grad()
    total, count = task_loss_sum(model, batch, "causal-lm", chunk)
    total.backward()
    return total.detach(), count, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk", [7, 4096])
def test_chunked_ce_matches_plain_ce_in_loss_and_gradients(chunk):
    model, batch = _model(), _batch()
    plain, count, plain_grads = _loss_and_grads(model, batch, 0)
    chunked, chunked_count, chunked_grads = _loss_and_grads(model, batch, chunk)
    assert count == chunked_count
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=0)
    assert plain_grads.keys() == chunked_grads.keys() and "lm_head.weight" in plain_grads
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-5, atol=1e-9, msg=name)


def test_chunked_ce_reaches_a_lora_wrapped_head():
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(_model(), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "lm_head"], lora_dropout=0.0, init_lora_weights=False)).double()
    batch = _batch()
    plain, _, plain_grads = _loss_and_grads(model, batch, 0)
    chunked, _, chunked_grads = _loss_and_grads(model, batch, 5)
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=0)
    assert any("lm_head.lora" in name for name in plain_grads)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-5, atol=1e-9, msg=name)


def test_chunked_ce_and_packing_are_refused_where_they_cannot_work():
    base = {"model": {"path": "m", "task": "classification"}, "data": {"train": "t.jsonl", "format": "classification"},
            "output_dir": "o"}
    with pytest.raises(ValidationError, match="loss_chunk_tokens: applies only with model.task causal-lm"):
        Recipe.model_validate({**base, "train": {"loss_chunk_tokens": 64}})
    with pytest.raises(ValidationError, match="data.packing: applies only with model.task causal-lm"):
        Recipe.model_validate({**base, "data": {**base["data"], "packing": True}})


def test_chunked_ce_is_refused_with_sharded_parameters_whatever_the_deepspeed_json_is_called(tmp_path):
    """The stage is read from the JSON: a custom stage-3 file is refused like zero3, a stage-2 one is not."""
    import json

    from launcher.errors import UserError
    from launcher.distributed.rules import rules_for
    custom = {stage: tmp_path / f"my-config-{stage}.json" for stage in (2, 3)}
    for stage, path in custom.items():
        path.write_text(json.dumps({"zero_optimization": {"stage": stage}}))
    base = {"model": {"path": "m"}, "data": {"train": "t.jsonl"}, "output_dir": "o", "train": {"loss_chunk_tokens": 64}}
    for distributed in ({"strategy": "fsdp"}, {"strategy": "deepspeed", "deepspeed": "zero3"},
                        {"strategy": "deepspeed", "deepspeed": str(custom[3])}):
        with pytest.raises(UserError, match="loss_chunk_tokens with sharded parameters"):
            rules_for(Recipe.model_validate({**base, "distributed": distributed})).refuse()
    rules_for(Recipe.model_validate({**base, "distributed": {"strategy": "deepspeed", "deepspeed": str(custom[2])}})).refuse()


def test_chunked_ce_applies_the_models_final_logit_softcapping():
    """Gemma 2 squashes its logits with cap * tanh(logits / cap); the chunked path must do the same."""
    from transformers import Gemma2Config, Gemma2ForCausalLM
    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=997, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=2, head_dim=16, final_logit_softcapping=0.5, tie_word_embeddings=False)
    model, batch = Gemma2ForCausalLM(config).double(), _batch()
    plain, _, plain_grads = _loss_and_grads(model, batch, 0)
    chunked, _, chunked_grads = _loss_and_grads(model, batch, 6)
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=0)
    for name, grad in plain_grads.items():  # fp32 CE: summation order moves the sum by ~1e-7 of its largest term
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-5, atol=1e-6 * grad.abs().max().item(), msg=name)
