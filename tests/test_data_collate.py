"""Chat templating, prompt-masked tokenization, padding and the batch collators."""

from __future__ import annotations

import pytest
import torch

from _data_tokenizers import bundled_tokenizer, trained_tokenizer
from rlhfkit.data import (
    IGNORE_INDEX,
    PLAIN_CHAT_TEMPLATE,
    PadCollator,
    apply_chat_template,
    render_plain,
    to_prompt_completion,
    to_text_pair,
    tokenize_prompt_completion,
)
from rlhfkit.errors import ConfigError


@pytest.fixture(scope="module")
def trained():
    return trained_tokenizer()


@pytest.fixture(scope="module")
def bundled():
    tok = bundled_tokenizer()
    if tok is None:
        pytest.skip("bundled tokenizer not built")
    return tok


@pytest.fixture(scope="module", params=["trained", "bundled"])
def tokenizer(request, trained):
    if request.param == "trained":
        return trained
    tok = bundled_tokenizer()
    if tok is None:
        pytest.skip("bundled tokenizer not built")
    return tok


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


USER = [{"role": "user", "content": "Say something nice."}]


def conv_record():
    return {"prompt": USER, "chosen": [{"role": "assistant", "content": "You are kind."}],
            "rejected": [{"role": "assistant", "content": "Go away now."}]}


# ---------------------------------------------------------------- chat templates

def test_plain_fallback_matches_its_jinja_form(trained):
    messages = USER + [{"role": "assistant", "content": "Hello there."}, {"role": "user", "content": "More?"}]
    for gen in (False, True):
        jinja = trained.apply_chat_template(messages, chat_template=PLAIN_CHAT_TEMPLATE, tokenize=False,
                                            add_generation_prompt=gen)
        assert apply_chat_template(trained, messages, gen) == jinja == render_plain(messages, gen, "</s>")
    assert apply_chat_template(None, USER, True) == "user: Say something nice.\nassistant:"


def test_tokenizer_template_is_used(bundled):
    expected = bundled.apply_chat_template(USER, tokenize=False, add_generation_prompt=True)
    assert apply_chat_template(bundled, USER, add_generation_prompt=True) == expected


@pytest.mark.parametrize("which", ["none", "trained", "bundled"])
def test_conversation_pair_shares_the_prompt(which, trained):
    tok = {"none": None, "trained": trained, "bundled": bundled_tokenizer()}[which]
    if which == "bundled" and tok is None:
        pytest.skip("bundled tokenizer not built")
    prompt, chosen, rejected = to_text_pair(conv_record(), tok)
    assert prompt == apply_chat_template(tok, USER, add_generation_prompt=True)
    full_chosen = apply_chat_template(tok, USER + conv_record()["chosen"])
    full_rejected = apply_chat_template(tok, USER + conv_record()["rejected"])
    assert full_chosen.startswith(prompt + chosen) and full_rejected.startswith(prompt + rejected)
    assert "You are kind." in chosen and "Go away now." in rejected and "Say something" not in chosen
    # TRL's implicit-prompt form (no prompt column) gives the same three texts
    implicit = {"chosen": USER + conv_record()["chosen"], "rejected": USER + conv_record()["rejected"]}
    assert to_text_pair(implicit, tok) == (prompt, chosen, rejected)
    if tok is not None:  # the separator after EOS is not part of the response
        assert chosen.endswith(tok.eos_token) and rejected.endswith(tok.eos_token)


def test_plain_text_pairs_and_implicit_text_prompt():
    assert to_text_pair({"prompt": "Hi", "chosen": " there", "rejected": " you"}) == ("Hi", " there", " you")
    assert to_text_pair({"chosen": "Human: hi Assistant: nice day", "rejected": "Human: hi Assistant: nasty"}) == (
        "Human: hi Assistant:", " nice day", " nasty")


def test_messages_to_prompt_completion(trained):
    record = {"messages": USER + [{"role": "assistant", "content": "Hello there."}]}
    prompt, completion = to_prompt_completion(record, trained)
    assert prompt == "user: Say something nice.</s>\nassistant:" and completion == " Hello there.</s>"
    assert to_prompt_completion({"text": "Just text."}) == ("", "Just text.")


# ---------------------------------------------------------------- prompt masks

def test_prompt_mask_is_exact_across_a_bpe_merge(trained):
    # a byte-level BPE (the bundled tokenizer is word-level: it has no merge to cross the boundary)
    tokenizer = trained
    prompt, completion = "Hello wor", "ld is big."
    # the joined text tokenizes differently: a merge crosses the boundary, so no joint split is exact
    joined = ids(tokenizer, prompt + completion)
    assert joined != ids(tokenizer, prompt) + ids(tokenizer, completion)
    out = tokenize_prompt_completion(tokenizer, prompt, completion, max_length=64)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    p, c = [bos] + ids(tokenizer, prompt), ids(tokenizer, completion) + [eos]
    assert out["input_ids"] == p + c
    assert out["labels"] == [IGNORE_INDEX] * len(p) + c
    assert out["attention_mask"] == [1] * (len(p) + len(c))
    assert tokenizer.decode(out["input_ids"][len(p):-1]) == completion


def test_bos_and_eos_are_not_doubled(trained):
    out = tokenize_prompt_completion(trained, "<s>Hello", " world</s>")
    assert out["input_ids"].count(trained.bos_token_id) == 1 and out["input_ids"][0] == trained.bos_token_id
    assert out["input_ids"].count(trained.eos_token_id) == 1 and out["input_ids"][-1] == trained.eos_token_id
    no_eos = tokenize_prompt_completion(trained, "Hello", " world", add_eos=False)
    assert trained.eos_token_id not in no_eos["input_ids"]


def test_truncation_policy(trained):
    prompt, completion = "Hello there, kind friend. The weather is nice today.", " What a lovely day it is."
    p_ids, c_ids = ids(trained, prompt), ids(trained, completion) + [trained.eos_token_id]
    out = tokenize_prompt_completion(trained, prompt, completion, max_length=len(p_ids) + 4, max_prompt_length=5)
    # prompt: BOS + its last 4 tokens; response: first tokens filling max_length
    assert out["input_ids"][:5] == [trained.bos_token_id] + p_ids[-4:]
    assert out["input_ids"][5:] == c_ids[: len(p_ids) + 4 - 5]
    assert out["labels"][:5] == [IGNORE_INDEX] * 5
    # a prompt that alone fills max_length keeps its last max_length // 2 tokens (BOS included)
    out = tokenize_prompt_completion(trained, prompt, completion, max_length=8)
    assert out["input_ids"] == [trained.bos_token_id] + p_ids[-3:] + c_ids[:4]


# ---------------------------------------------------------------- padding

def test_pad_collator_right_and_left():
    feats = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    right = PadCollator(0, "right")(feats)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    left = PadCollator(0, "left", pad_to_multiple_of=4)(feats)
    assert left["input_ids"].tolist() == [[0, 5, 6, 7], [0, 0, 0, 8]]
    assert left["labels"].tolist() == [[-100, -100, 6, 7], [-100, -100, -100, 8]]
    assert left["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    with pytest.raises(ConfigError, match="padding_side"):
        PadCollator(0, "middle")
    with pytest.raises(ConfigError, match="no pad token"):
        PadCollator(None)


# ---------------------------------------------------------------- preference data -> one batch

def test_preference_rows_share_the_prompt_and_lay_out_for_one_forward(tokenizer):
    from rlhfkit.data.preference import (
        collate_comparisons,
        collate_responses,
        encode_comparisons,
        encode_preferences,
        example_rows,
        preference_texts,
        read_comparisons,
    )

    records = [conv_record(), {"prompt": "The weather", "chosen": " is nice.", "rejected": " is bad."}]
    texts, labels, _, _ = preference_texts(records, False, tokenizer)
    data = encode_preferences(texts, labels, tokenizer, 64)
    assert data.paired and len(data.rows) == 2
    for (prompt, chosen, rejected), (p_ids, c_ids, r_ids) in zip(texts, data.rows):
        assert p_ids + c_ids == tokenize_prompt_completion(tokenizer, prompt, chosen, 64)["input_ids"]
        assert p_ids + r_ids == tokenize_prompt_completion(tokenizer, prompt, rejected, 64)["input_ids"]
    batch = collate_responses(example_rows(data, [0, 1]), tokenizer.pad_token_id)
    P, R = batch.prompt_width, batch.response_width
    assert batch.input_ids.shape == (4, P + R)
    for row, (p_ids, resp) in enumerate([(data.rows[0][0], data.rows[0][1]), (data.rows[1][0], data.rows[1][1]),
                                         (data.rows[0][0], data.rows[0][2]), (data.rows[1][0], data.rows[1][2])]):
        assert batch.input_ids[row, P - len(p_ids):P].tolist() == p_ids  # prompts end at column P
        assert batch.input_ids[row, P:P + len(resp)].tolist() == resp    # responses start there
        assert batch.response_mask[row].sum() == len(resp)
        assert batch.attention_mask[row].sum() == len(p_ids) + len(resp)
    unpaired_texts, unpaired_labels, _, _ = preference_texts(records, True, tokenizer)
    assert unpaired_labels == [True, True, False, False] and len(unpaired_texts) == 4
    # the reward recipe's batch of the same records: the same token rows in the same layout
    encoded, _ = encode_comparisons(read_comparisons(records, tokenizer), tokenizer, 64)
    assert [(c.prompt, *c.responses) for c in encoded] == data.rows
    rm_batch = collate_comparisons(encoded, tokenizer.pad_token_id)
    assert rm_batch.num_pairs == 2 and torch.equal(rm_batch.rows.input_ids, batch.input_ids)
    assert torch.equal(rm_batch.rows.response_mask, batch.response_mask)
