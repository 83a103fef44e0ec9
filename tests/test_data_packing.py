"""data.packing: bins fit, labels stay inside examples, attention stays inside examples, losses match unpacked."""
import datasets
import pytest
import torch

from launcher.data.batching import collate
from launcher.recipe.formats import IGNORE
from launcher.model.loss import task_loss_sum
from launcher.data.packing import best_fit_decreasing, collate_packed, pack_dataset


def test_best_fit_decreasing_fills_bins_within_capacity():
    lengths = [5, 3, 8, 2, 7, 1, 4, 6]
    bins = best_fit_decreasing(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 4  # 36 tokens need at least 4 bins of 10
    assert bins[0][0] == 2  # longest first
    with pytest.raises(ValueError, match="more than the packing capacity"):
        best_fit_decreasing([11], 10)


def _examples(vocab: int, lengths: list[int], seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE] * 2 + ids[2:]})  # a 2-token masked prompt
    return rows


def test_labels_never_cross_example_boundaries():
    rows = _examples(50, [6, 4, 9, 3])
    rows[1]["labels"] = list(rows[1]["input_ids"])  # train_on_prompt: the first token would be a target
    packed = pack_dataset(datasets.Dataset.from_list(rows), 12)
    batch = collate_packed(list(packed), pad_id=0)
    for r, lengths in enumerate(packed["lengths"]):
        start = 0
        for n in lengths:
            assert batch["labels"][r, start] == IGNORE  # the previous example's last token predicts nothing here
            assert batch["position_ids"][r, start] == 0
            start += n
        assert (batch["labels"][r, start:] == IGNORE).all()  # padding tail


def _model(attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, attn_implementation=attn)
    return LlamaForCausalLM(config).double().eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_no_attention_across_examples_in_a_packed_row(attn):
    model = _model(attn)
    a, b, other_b = _examples(50, [7, 9, 9], seed=1)
    logits = []
    for second in (b, other_b):
        batch = collate_packed(list(pack_dataset(datasets.Dataset.from_list([a, second]), 16)), pad_id=0)
        assert batch["input_ids"].shape == (1, 16)
        lengths = batch["position_ids"][0].tolist()
        with torch.no_grad():
            logits.append(model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0])
    start = 9 if lengths[9] == 0 else 7  # best fit puts the longer example (9 tokens) first
    a_span = slice(start, start + 7)
    torch.testing.assert_close(logits[0][a_span], logits[1][a_span], rtol=0, atol=1e-12)
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([a["input_ids"]])).logits[0]
    torch.testing.assert_close(logits[0][a_span], alone, rtol=1e-5, atol=1e-6)  # eager's softmax runs in fp32


def _per_token_ce(model, batch):
    with torch.no_grad():
        inputs = {"position_ids": batch["position_ids"], "use_cache": False} if "position_ids" in batch else {"attention_mask": batch["attention_mask"]}
        logits = model(input_ids=batch["input_ids"], **inputs).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"][:, 1:], ignore_index=IGNORE, reduction="none")


def test_packed_and_unpacked_batches_give_the_same_loss_per_example():
    model = _model("sdpa")
    rows = _examples(50, [6, 11, 4, 9, 5, 3], seed=2)
    packed = pack_dataset(datasets.Dataset.from_list(rows), 16)
    assert len(packed) < len(rows)
    packed_ce = _per_token_ce(model, collate_packed(list(packed), pad_id=0))
    order = [i for b in best_fit_decreasing([len(r["input_ids"]) for r in rows], 16) for i in b]
    per_example = {}
    for r, lengths in enumerate(packed["lengths"]):
        start = 0
        for n in lengths:
            # CE at position t scores token t+1: an example's targets sit at start .. start+n-2
            per_example[order[len(per_example)]] = packed_ce[r, start:start + n - 1].sum()
            start += n
    unpacked_ce = _per_token_ce(model, collate(rows, pad_id=0))
    for i in range(len(rows)):
        torch.testing.assert_close(per_example[i], unpacked_ce[i].sum(), rtol=1e-7, atol=1e-7)
    packed_total, packed_count = task_loss_sum(model, collate_packed(list(packed), pad_id=0), "causal-lm")
    plain_total, plain_count = task_loss_sum(model, collate(rows, pad_id=0), "causal-lm")
    assert packed_count == plain_count
    torch.testing.assert_close(packed_total, plain_total, rtol=1e-6, atol=0)


def test_packing_nothing_gives_nothing():
    import datasets
    empty = datasets.Dataset.from_dict({"input_ids": [], "labels": []})
    assert len(pack_dataset(empty, 16)) == 0
