"""One preference path: the reward and DPO recipes read the same files the same way.

Each file is given to both recipes' data loading. Either both accept it and end with the same
token rows (DPO's pairs = the reward model's comparisons, rankings expanded to their pairs), or
both refuse it with the same one-line message naming file, line and field.
"""

from __future__ import annotations

import json
from itertools import combinations

import pytest

from rlhfkit.errors import DataError
from rlhfkit.models import load_tokenizer
from rlhfkit.recipes import dpo
from rlhfkit.recipes import reward as RR

CONV = [{"role": "user", "content": "Say something kind."}]


def said(text):
    return [{"role": "assistant", "content": text}]


# words of the bundled word-level vocabulary (a made-up word would encode as <|unk|>)
FILES = {
    "pairs": [{"prompt": "The day was", "chosen": " warm", "rejected": " cold"},
              {"prompt": "She felt", "chosen": " sad", "rejected": " kind", "label": 0},  # rejected won
              {"prompt": "He was", "chosen": " good", "rejected": " nice", "tie": True},
              {"prompt": "It was", "chosen": " fine", "rejected": " bad", "label": 0.5, "margin": 1.0}],
    "full_rankings": [{"prompt": "Rank one", "responses": [" kind", " good", " sad"], "ranking": [1, 0, 2]},
                      {"prompt": "Rank two", "responses": [" warm", " cold"], "ranking": [1, 0]}],
    "partial_rankings_and_ties": [
        {"prompt": "Rank one", "responses": [" kind", " good", " sad", " bad"], "ranking": [1, 3]},  # 0, 2 unranked
        {"prompt": "Rank two", "responses": [" warm", " cold", " fine"], "ranking": [2, 0, 1]},
        {"prompt": "A tie", "chosen": " good", "rejected": " kind", "tie": True},
        {"prompt": "A pair", "chosen": " nice", "rejected": " bad"}],
    "conversational": [{"prompt": CONV, "chosen": said("You are kind."), "rejected": said("Go away.")},
                       {"chosen": CONV + said("Lovely day."), "rejected": CONV + said("Bad day.")},  # implicit prompt
                       {"prompt": CONV, "responses": [said("Good."), said("Sad."), said("Fine.")],
                        "ranking": [0, 2, 1]}],
}
REFUSED = {
    "tie_inside_a_ranking": [{"prompt": "p", "responses": [" good", " kind", " sad"], "ranking": [0, 1, 2]},
                             {"prompt": "p", "responses": [" good", " kind", " sad"], "ranking": [0, 0, 2]}],
    "one_ranked_response": [{"prompt": "p", "responses": [" good", " kind"], "ranking": [1]}],
    "identical_pair": [{"prompt": "p", "chosen": " good", "rejected": " kind"},
                       {"prompt": "p", "chosen": " good", "rejected": " good"}],
    "bad_label": [{"prompt": "p", "chosen": " good", "rejected": " kind", "label": 1.5}],
    "mixed_text_and_conversation": [{"prompt": "p", "responses": [" good", said("Sad.")], "ranking": [0, 1]}],
    "sft_record_among_pairs": [{"prompt": "p", "chosen": " good", "rejected": " kind"}, {"text": "A lovely day."}],
}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("kindly:tokenizer")


def write(tmp_path, name, rows):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def reward_pairs(path, tok):
    """The reward recipe's training comparisons (strict Bradley-Terry loss), as (prompt, better, worse) rows."""
    cfg = RR.Config(dataset=path, eval_fraction=0.0, max_length=64, progress=False)
    train, held_out, counts, _ = RR.load_data(cfg, tok, printer=lambda m: None)
    assert not held_out
    rows = [(c.prompt, *pair) for c in train for pair in combinations(c.responses, 2)]
    return rows, counts.get("ties_skipped", 0)


def dpo_pairs(path, tok):
    enc = dpo.load_encoded(path, "train", "sigmoid", tok, 64)
    return [tuple(r) for r in enc.rows], enc.ties


@pytest.mark.parametrize("name", sorted(FILES))
def test_both_recipes_accept_the_same_files_with_the_same_pairs(tmp_path, tok, name):
    path = write(tmp_path, name, FILES[name])
    rows, ties = reward_pairs(path, tok)
    assert rows and (rows, ties) == dpo_pairs(path, tok)
    if name == "pairs":  # label 0: swapped; the two ties left out by both strict losses
        assert len(rows) == 2 and ties == 2
        assert rows[1][1] == tok(" kind", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    if name == "partial_rankings_and_ties":  # 1 + 3 ranked pairs + 1 pair; the tie left out
        assert len(rows) == 5 and ties == 1


def test_tie_aware_reward_losses_keep_ties_that_dpo_leaves_out(tmp_path, tok):
    path = write(tmp_path, "pairs", FILES["pairs"])
    cfg = RR.Config(dataset=path, eval_fraction=0.0, max_length=64, loss="davidson", progress=False)
    train, _, counts, _ = RR.load_data(cfg, tok, printer=lambda m: None)
    assert [c.label for c in train] == [1.0, 0.0, 0.5, 0.5] and "ties_skipped" not in counts


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_both_recipes_refuse_the_same_files_with_the_same_message(tmp_path, tok, name):
    path = write(tmp_path, name, REFUSED[name])
    with pytest.raises(DataError) as by_reward:
        reward_pairs(path, tok)
    with pytest.raises(DataError) as by_dpo:
        dpo_pairs(path, tok)
    message = str(by_reward.value)
    assert message == str(by_dpo.value) and "\n" not in message
    assert message.startswith(f"{path}, line {len(REFUSED[name])}")


def test_kto_reads_comparisons_through_the_same_path(tmp_path, tok):
    path = write(tmp_path, "partial", FILES["partial_rankings_and_ties"])
    enc = dpo.load_encoded(path, "train", "kto", tok, 64)
    pairs, _ = dpo_pairs(path, tok)
    assert enc.rows == [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
    assert enc.labels == [True] * len(pairs) + [False] * len(pairs)
