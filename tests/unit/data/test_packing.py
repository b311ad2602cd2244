"""Collator: right-padding, and padding-free packing that keeps attention inside each example."""
from __future__ import annotations

import pytest
import torch

from qlora_lab.data.packing import Collator

A = {"input_ids": [1, 10, 11, 12, 13, 14, 2], "labels": [-100, -100, -100, 12, 13, 14, 2]}
B = {"input_ids": [1, 20, 21, 2], "labels": [-100, -100, 21, 2]}


def test_padding_right_pads_with_pad_id_and_ignored_labels():
    out = Collator(pad_token_id=0, packing=False)([A, B])
    assert set(out) == {"input_ids", "labels", "attention_mask"}
    assert out["input_ids"].tolist() == [A["input_ids"], B["input_ids"] + [0, 0, 0]]
    assert out["labels"].tolist() == [A["labels"], B["labels"] + [-100] * 3]
    assert out["attention_mask"].tolist() == [[1] * 7, [1] * 4 + [0] * 3]
    out = Collator(pad_token_id=0, packing=False, pad_to_multiple_of=8)([A, B])
    assert out["input_ids"].shape == (2, 8) and out["attention_mask"][0].tolist() == [1] * 7 + [0]


def test_packing_concatenates_with_restarting_positions():
    first_b = {"input_ids": [5, 6, 7], "labels": [5, 6, 7]}  # train_on_inputs: first label set
    out = Collator(pad_token_id=0, packing=True)([A, first_b])
    assert set(out) == {"input_ids", "labels", "position_ids"}  # no attention_mask
    assert out["input_ids"].tolist() == [A["input_ids"] + [5, 6, 7]]
    assert out["position_ids"].tolist() == [list(range(7)) + [0, 1, 2]]
    # the first token of each example is never a target: it would be predicted from the neighbour
    assert out["labels"].tolist() == [A["labels"] + [-100, 6, 7]]
    padded = Collator(pad_token_id=0, packing=True, pad_to_multiple_of=8)([A, B])
    assert padded["input_ids"].shape == (1, 16)
    assert padded["position_ids"].tolist() == [list(range(7)) + list(range(4)) + list(range(5))]
    assert padded["labels"][0, 11:].tolist() == [-100] * 5


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import AutoModelForCausalLM

    from qlora_lab.presets import model_config

    torch.manual_seed(0)
    cfg = model_config("tiny-llama")
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    return model.eval()


def test_packed_forward_equals_separate_forwards(tiny_llama):
    g = torch.Generator().manual_seed(1)
    examples = []
    for n in (9, 5, 13):
        ids = [1] + torch.randint(4, 260, (n - 1,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": ids})
    batch = Collator(pad_token_id=0, packing=True)(examples)
    with torch.no_grad():
        # use_cache=False, as in training: with a KV cache transformers ignores the packed positions
        packed = tiny_llama(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                            use_cache=False).logits[0]
        naive = tiny_llama(input_ids=batch["input_ids"], use_cache=False).logits[0]  # one causal sequence
        cached = tiny_llama(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        start = 0
        for ex in examples:
            n = len(ex["input_ids"])
            alone = tiny_llama(input_ids=torch.tensor([ex["input_ids"]])).logits[0]
            torch.testing.assert_close(packed[start:start + n], alone, atol=1e-5, rtol=1e-5)
            if start:  # controls: without position ids, or with a cache, later examples see neighbours
                assert (naive[start:start + n] - alone).abs().max() > 1e-3
                assert (cached[start:start + n] - alone).abs().max() > 1e-3
            start += n


def test_packed_loss_equals_padded_loss(tiny_llama):
    # Same tokens trained, same targets: the mean loss over trained tokens must agree.
    feats = [A, B]
    with torch.no_grad():
        packed = Collator(0, packing=True)(feats)
        padded = Collator(0, packing=False)(feats)
        lp = tiny_llama(**packed, use_cache=False).loss
        ld = tiny_llama(**padded, use_cache=False).loss
    torch.testing.assert_close(lp, ld, atol=1e-5, rtol=1e-5)
