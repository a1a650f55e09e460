"""The bundled verifiable task "arith": problem sets, SFT split, tokenizer, verifier, wiring."""

from __future__ import annotations

import json
import re

import pytest

from rlhfkit.tasks import arith

# the slow learning test: configs/sft_arith.yaml's SFT, then a short GRPO run (measured on the
# shipped base: greedy accuracy on eval[:300] 0.28 after SFT, 0.38 after 60 GRPO updates)
SFT_STEPS, SFT_LR = 100, 3e-4
GRPO_STEPS, GRPO_LR, GRPO_GAIN = 60, 5e-4, 0.06
PROBLEM_RE = re.compile(r"^Q: (\d+)([+-])(\d+)= A:$")


def _parse(prompt: str) -> tuple[int, str, int]:
    m = PROBLEM_RE.match(prompt)
    assert m, prompt
    assert len(m.group(1)) == len(m.group(3)) == arith.MAX_DIGITS
    return int(m.group(1)[::-1]), m.group(2), int(m.group(3)[::-1])  # written least-significant first


def _key(a, op, b):
    return (min(a, b), op, max(a, b)) if op == "+" else (a, op, b)


def test_splits_are_disjoint_sized_and_deterministic():
    train, ev = arith.problems("train"), arith.problems("eval")
    assert len(ev) == arith.NUM_EVAL and len(train) == arith.NUM_TRAIN_PROMPTS
    assert len({r["prompt"] for r in ev}) == len(ev)  # distinct problems
    train_keys = {_key(*_parse(r["prompt"])) for r in train}
    # no eval problem, nor its mirror b+a, is a training prompt, an SFT demonstration or a corpus line
    eval_keys = {_key(*_parse(r["prompt"])) for r in ev}
    assert not train_keys & eval_keys
    sft_keys = {_key(*_parse(r["prompt"])) for r in arith.sft_records("train")}
    assert not sft_keys & eval_keys
    corpus_keys = {_key(*_parse(line.rsplit(" ", 1)[0])) for line in arith.corpus_lines("train")}
    assert not corpus_keys & eval_keys
    assert arith.problems("eval") == ev  # same list on every call


def test_problems_are_solved_and_written_least_significant_digit_first():
    for r in arith.problems("eval")[:200]:
        a, op, b = _parse(r["prompt"])
        assert 0 <= a <= 99 and 0 <= b <= 99
        truth = a + b if op == "+" else a - b
        assert truth >= 0 and r["answer"] == str(truth)
        assert r["completion"] == " " + f"{truth:03d}"[::-1]
        assert r["prompt"] == "Q: " + f"{a:02d}"[::-1] + op + f"{b:02d}"[::-1] + "= A:"
    assert arith.write_answer(95) == "590" and arith.write_answer(100) == "001" and arith.write_answer(7) == "700"
    assert arith.read_answer(" 001 ") == 100 and arith.read_answer("590") == 95 and arith.read_answer("59") == 95


def test_sft_split_has_the_documented_share_of_one_digit_errors():
    recs = arith.sft_records("train")
    assert len(recs) == arith.NUM_SFT
    wrong = 0
    for r in recs:
        a, op, b = _parse(r["prompt"])
        truth = f"{a + b if op == '+' else a - b:03d}"
        shown = r["completion"].strip()[::-1]
        assert len(shown) == len(truth)
        diff = sum(x != y for x, y in zip(shown, truth))
        assert diff in (0, 1)  # a careless annotator changes one digit at most
        wrong += diff
    assert abs(wrong / len(recs) - arith.SFT_NOISE) < 0.04
    clean = arith.sft_records("eval")
    assert all(arith.reward_fn([r["prompt"]], [r["completion"]]) == [1.0] for r in clean[:50])


def test_reward_fn_hand_cases():
    p = ["Q: 37+58= A:"] * 8
    completions = [" 590", "590", " 59", " 095", " 590 590", " 5 90", "", " 0590"]
    # right (spaces aside); right; right without the padding zero; the number written
    # big-endian; two numbers; split digits; nothing; a wrong leading digit (950) is not 95
    assert arith.reward_fn(p, completions, answer=["95"] * 8) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    # the truth comes from the answer column when present, even when the prompt says otherwise
    assert arith.reward_fn(["Q: 01+01= A:"], [" 300"], answer=["3"]) == [1.0]
    # without the column it is parsed from the prompt; a prompt of another task abstains
    # (70-30 is 7-3 written least-significant first)
    assert arith.reward_fn(["Q: 70-30= A:", "hello"], [" 400", " 400"]) == [1.0, None]
    assert arith.parse_prompt("Q: 75+68= A:") == 57 + 86
    # a malformed answer abstains rather than scoring 0
    assert arith.reward_fn(["Q: 1+1= A:"], [" 2"], answer=["two"]) == [None]
    # TRL conversational completions: the last message is scored
    conv = [[{"role": "assistant", "content": " 210"}]]
    assert arith.reward_fn(["Q: 08+04= A:"], conv, answer=["12"]) == [1.0]
    assert arith.accuracy(["hello", "Q: 20+20= A:"], [" 400", " 400"]) == [0.0, 1.0]


def test_tokenizer_round_trip_is_character_level():
    from rlhfkit.models import load_tokenizer

    tok = load_tokenizer(str(arith.tokenizer_path()))
    assert len(tok) == len(arith.SPECIAL_TOKENS) + len(arith.CHARACTERS)
    for r in arith.problems("eval")[:20]:
        text = r["prompt"] + r["completion"]
        ids = tok(text, add_special_tokens=False).input_ids
        assert len(ids) == len(text)
        assert tok.decode(ids) == text
    assert tok.eos_token == "<eos>" and tok.pad_token == "<pad>"
    # the shipped tokenizer is what build_tokenizer makes
    built = arith.build_tokenizer()
    assert built.get_vocab() == tok.get_vocab()


def test_base_checkpoint_is_small_and_loads():
    from rlhfkit.models import load_policy
    from rlhfkit.train.memory import count_parameters

    path = arith.base_model_path()
    assert (path / "model.safetensors").stat().st_size < 5 * 2**20
    model = load_policy(str(path))
    assert count_parameters(model) < 2_000_000


def test_reward_spec_and_prompt_set_wiring():
    from rlhfkit.judges.specs import load_rewards
    from rlhfkit.rollout.prompts import load_prompt_set

    ps = load_prompt_set("arith", "train", limit=4)
    assert set(ps.columns) == {"answer"} and len(ps.prompts) == 4
    held_out = load_prompt_set("arith:eval", "train")
    assert held_out.prompts == arith.prompts("eval")
    rewards = load_rewards(["py:rlhfkit.tasks.arith:reward_fn"])
    right = [" " + arith.write_answer(int(a)) for a in ps.columns["answer"]]
    scored = rewards.score(ps.prompts, right[:3] + [" 7777"], answer=ps.columns["answer"])
    assert list(scored.total) == [1.0, 1.0, 1.0, 0.0]


def test_export_writes_every_file(tmp_path):
    from rlhfkit.tasks.arith.__main__ import main

    assert main(["export", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "prompts_eval.jsonl").read_text().splitlines()]
    assert rows == arith.prompt_records("eval")
    sft = [json.loads(line) for line in (tmp_path / "sft_train.jsonl").read_text().splitlines()]
    assert sft == arith.sft_records("train")
    assert (tmp_path / "corpus_train.txt").read_text().splitlines() == arith.corpus_lines("train")
    assert not list(tmp_path.glob("*.tmp"))



def _greedy_accuracy(path, records) -> float:
    import torch

    from rlhfkit.models import load_policy, load_tokenizer
    from rlhfkit.rollout import generate

    prompts = [r["prompt"] for r in records]
    tok, model = load_tokenizer(str(path)), load_policy(str(path))
    with torch.no_grad():
        roll = generate(model, tok, prompts, max_new_tokens=5, temperature=0.0, batch_size=300)
    hits = arith.accuracy(prompts, roll.responses, [r["answer"] for r in records])
    return sum(hits) / len(hits)


@pytest.mark.slow
def test_grpo_with_the_verifier_beats_the_sft_policy(tmp_path):
    """The shipped base, SFT on the noisy demonstrations (configs/sft_arith.yaml settings), then
    GRPO with the exact-match verifier, fixed seeds: greedy exact-match accuracy on 300 held-out
    problems rises by at least GRPO_GAIN."""
    from rlhfkit.recipes import grpo, sft

    data = tmp_path / "data"
    data.mkdir()
    (data / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in arith.sft_records("train")))
    sft.main(sft.Config(model=str(arith.base_model_path()), dataset=str(data / "sft.jsonl"), max_length=32,
                        per_device_train_batch_size=32, learning_rate=SFT_LR, max_steps=SFT_STEPS, warmup_steps=10,
                        lr_scheduler_type="cosine", eval_steps=0, output_dir=str(tmp_path / "sft"), seed=0,
                        progress=False, report_to="jsonl"))
    policy0 = tmp_path / "sft" / "final"
    grpo.main(grpo.Config(model=str(policy0), prompts="arith", reward=["py:rlhfkit.tasks.arith:reward_fn"],
                          eval_reward="none", eval_prompts="", num_eval_prompts=0, max_steps=GRPO_STEPS,
                          prompts_per_step=32, num_generations=8, max_completion_length=5, temperature=1.0,
                          per_device_train_batch_size=256, generation_batch_size=256, num_ppo_epochs=1,
                          num_mini_batches=1, beta=0.0, loss_type="sequence", learning_rate=GRPO_LR, warmup_steps=0,
                          lr_scheduler_type="constant", sample_every=0, hacking_window=0, seed=0, report_to="jsonl",
                          progress=False, output_dir=str(tmp_path / "grpo")))
    held_out = arith.prompt_records("eval")[:300]
    before, after = _greedy_accuracy(policy0, held_out), _greedy_accuracy(tmp_path / "grpo" / "final", held_out)
    assert after >= before + GRPO_GAIN, (before, after)
