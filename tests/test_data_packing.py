"""Packing: rows, positions, boundary labels, and what a tiny Llama attends to across documents."""

from __future__ import annotations

import pytest
import torch

from rlhfkit.data import (
    DataError,
    PadCollator,
    pack_sequences,
    packed_attention_mask,
    packing_efficiency,
)

IGNORE = -100


def example(start, n, prompt=0):
    ids = list(range(start, start + n))
    return {"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]}


def test_pack_positions_labels_and_contents():
    examples = [example(10, 5, prompt=2), example(20, 3, prompt=1), example(30, 4), example(40, 2)]
    rows = pack_sequences(examples, max_length=8, eos_id=0)
    packed = PadCollator(pad_token_id=0)(rows)
    assert "attention_mask" not in packed  # a mask would switch off per-document attention
    ids, labels, pos, doc = (packed[k] for k in ("input_ids", "labels", "position_ids", "document_ids"))
    assert ids.shape == labels.shape == pos.shape == (2, 8)
    # best-fit decreasing: [5-token, 3-token] then [4-token, 2-token] + 2 padding
    assert ids[0].tolist() == [10, 11, 12, 13, 14, 20, 21, 22]
    assert ids[1].tolist() == [30, 31, 32, 33, 40, 41, 0, 0]
    assert pos[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert pos[1].tolist() == [0, 1, 2, 3, 0, 1, 0, 1]
    assert doc[1].tolist() == [0, 0, 0, 0, 1, 1, -1, -1]
    # prompt masks kept; first token of every document masked; padding masked
    assert labels[0].tolist() == [IGNORE, IGNORE, 12, 13, 14, IGNORE, 21, 22]
    assert labels[1].tolist() == [IGNORE, 31, 32, 33, IGNORE, 41, IGNORE, IGNORE]
    assert packing_efficiency(rows) == pytest.approx(14 / 16)


def test_every_token_lands_once_and_labels_never_cross_boundaries():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 17, (40,), generator=gen).tolist()
    examples, start = [], 1
    for n in lengths:
        examples.append(example(start, n, prompt=n // 3))
        start += n
    packed = PadCollator(0)(pack_sequences(examples, max_length=32, eos_id=0, pad_id=-1))
    ids, labels, pos = packed["input_ids"], packed["labels"], packed["position_ids"]
    real = ids[ids != -1]
    assert sorted(real.tolist()) == list(range(1, start))  # nothing lost, nothing duplicated
    assert ids.shape[0] >= -(-sum(lengths) // 32)
    starts = pos == 0
    assert (labels[starts] == IGNORE).all()
    supervised = {t for e in examples for t, y in zip(e["input_ids"][1:], e["labels"][1:]) if y != IGNORE}
    assert set(labels[labels != IGNORE].tolist()) == supervised


def test_over_length_example_is_an_error():
    with pytest.raises(DataError, match="more than max_length=4"):
        pack_sequences([example(1, 3), example(5, 6)], max_length=4, eos_id=0)


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def tiny_llama(request):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64)
    config._attn_implementation = request.param
    return LlamaForCausalLM(config).eval()


def test_llama_masks_across_documents_only_without_attention_mask_and_cache(tiny_llama):
    docs = [example(3, 5), example(20, 4), example(40, 3)]
    packed = PadCollator(0)(pack_sequences(docs, max_length=16, eos_id=0))
    ids, pos = packed["input_ids"], packed["position_ids"]
    with torch.no_grad():
        alone = [tiny_llama(torch.tensor([d["input_ids"]])).logits[0] for d in docs]

        def matches(logits):
            doc = packed["document_ids"][0]
            return all(torch.allclose(logits[0][doc == i], alone[i], atol=1e-5) for i in range(len(docs)))

        assert matches(tiny_llama(input_ids=ids, position_ids=pos, use_cache=False).logits)
        mask4d = packed_attention_mask(packed["document_ids"])
        assert matches(tiny_llama(input_ids=ids, position_ids=pos, attention_mask=mask4d, use_cache=False).logits)
        # the pitfalls documented in rlhfkit.data.packing: these attend across documents
        assert not matches(tiny_llama(input_ids=ids, position_ids=pos, attention_mask=torch.ones_like(ids),
                                      use_cache=False).logits)
        assert not matches(tiny_llama(input_ids=ids, position_ids=pos, use_cache=True).logits)
