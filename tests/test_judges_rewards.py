"""Reward specs (issue 12 item 1): built-in verifiers, `load_reward(spec)`, the weighted reward set,
and reward functions with extra dataset columns inside the GRPO/RLOO/PPO recipes."""

import asyncio
import json

import numpy as np
import pytest

from rl_helpers import save_tiny, tiny_policy, tiny_tokenizer
from rlhfkit.errors import ConfigError, NonFiniteError
from rlhfkit.judges.rewards import (
    RewardFunctionError,
    RewardSet,
    as_reward,
    extract_answer,
    length_penalty,
    math_exact_match,
    normalise_answer,
    regex_reward,
)
from rlhfkit.judges.specs import load_reward, load_rewards
from rlhfkit.train.runs import read_metrics


def test_math_exact_match_boxed_last_number_and_normalisation():
    assert extract_answer("so 2+2 = 4, then 5") == "5"
    assert extract_answer(r"\boxed{\frac{1}{2}} or 7") == r"\frac{1}{2}"
    assert extract_answer(r"first \boxed{3} then \boxed{{4}}") == "{4}"
    assert extract_answer("no digits") is None
    assert normalise_answer("1,000") == normalise_answer("1000") == "1000"
    assert normalise_answer("0.50") == normalise_answer("1/2") == "1/2"
    assert normalise_answer(" $4.0$ ") == "4"
    completions = ["the answer is 1,000.", r"\boxed{0.5}", "it is 12 or 13", "nothing"]
    assert math_exact_match(None, completions, answer=["1000", "1/2", "12", "3"]) == [1.0, 1.0, 0.0, 0.0]
    with pytest.raises(ConfigError, match="answer"):
        math_exact_match(None, ["1"])


def test_regex_and_length_hand_values():
    fmt = regex_reward(r"^<answer>.*</answer>$")
    assert fmt(None, ["<answer>4</answer>", "4 <answer>4</answer>", "<answer>\n4\n</answer>"]) == [1.0, 0.0, 1.0]
    pen = length_penalty(10)
    assert pen(None, ["x" * 5, "x" * 10, "x" * 15]) == [0.0, 0.0, -0.5]
    with pytest.raises(ConfigError, match="regular expression"):
        regex_reward("(")


def test_load_reward_specs(tmp_path, monkeypatch):
    f = tmp_path / "my_rewards.py"
    f.write_text("def shout(prompts, completions, **kw):\n    return [float(c.count('!')) for c in completions]\n")
    r = load_reward(f"py:{f}:shout")
    assert r.name == "shout" and r.fn(prompts=["p"], completions=["a!!"]) == [2.0]
    monkeypatch.chdir(tmp_path)
    assert load_reward("py:my_rewards:shout").name == "shout"
    assert load_reward("math").name == "math" and load_reward("length:5").name == "length"
    for bad, msg in [("py:nope.py:f", "does not exist"), ("py:my_rewards:missing", "no function"),
                     ("frobnicate", "unknown"), ("length:x", "positive"), ("py:justmodule", "py:module:function")]:
        with pytest.raises(ConfigError, match=msg):
            load_reward(bad)
    with pytest.raises(ConfigError, match="reward_weights"):
        load_rewards(["math", "length:3"], [1.0])
    with pytest.raises(ConfigError, match="at least one reward"):
        load_rewards([])


def test_judge_spec_goes_through_load_judge(monkeypatch):
    import rlhfkit.judges.specs as specs
    from rlhfkit.judges.panel import GoldPanel

    texts = ["was a lovely day", "was awful"]
    gold = load_rewards(["judge:gold"])  # the real load_judge: the gold panel as a judge
    assert gold(["p", "q"], texts).tolist() == GoldPanel().score(["p", "q"], texts).tolist()

    class Echo:
        def score(self, prompts, responses):
            return [float(len(r)) for r in responses]

    seen = []
    monkeypatch.setattr(specs, "load_judge", lambda spec: seen.append(spec) or Echo())
    rs = load_rewards(["judge:anything?k=v"])
    assert rs.names == ["judge"] and seen == ["anything?k=v"]
    assert rs(["p", "q"], ["abc", "de"]).tolist() == [3.0, 2.0]


def test_reward_set_weights_abstentions_async_and_stats():
    def a(prompts, completions, answer, **kw):
        return [None if x == "skip" else float(x) for x in answer]

    async def b(prompts, completions, **kw):
        await asyncio.sleep(0)
        return [1.0] * len(completions)

    def legacy(prompts, responses):  # the score(prompts, responses) form of judges and reward models
        return np.array([2.0, 4.0, 6.0])

    rs = RewardSet([as_reward(a, weight=2.0), as_reward(b, weight=0.5), as_reward(legacy, "rm", weight=1.0)])
    out = rs.score(["p"] * 3, ["x", "y", "z"], answer=["1", "skip", "3"])
    # 2 * [1, -, 3] + 0.5 * [1, 1, 1] + [2, 4, 6]; an abstention adds 0
    assert out.total.tolist() == [4.5, 4.5, 12.5]
    st = out.stats()
    assert st["rewards/a/mean"] == 2.0 and st["rewards/a/std"] == 1.0
    assert st["rewards/a/abstained"] == pytest.approx(1 / 3) and st["rewards/b/abstained"] == 0.0
    assert st["rewards/rm/mean"] == 4.0
    same = RewardSet([as_reward(b), as_reward(b)])
    assert same.names == ["b", "b_2"]


def test_reward_set_failures_name_the_function():
    def boom(prompts, completions, **kw):
        raise KeyError("answer")

    def short(prompts, completions, **kw):
        return [1.0]

    def nan(prompts, completions, **kw):
        return [0.0, float("nan")]

    def text(prompts, completions, **kw):
        return ["yes", "no"]

    with pytest.raises(RewardFunctionError, match="reward 'boom' raised KeyError"):
        RewardSet([as_reward(boom)])(["p", "q"], ["a", "b"])
    with pytest.raises(RewardFunctionError, match="reward 'short' returned 1 values for 2"):
        RewardSet([as_reward(short)])(["p", "q"], ["a", "b"])
    with pytest.raises(NonFiniteError, match="reward 'nan'.*NaN"):
        RewardSet([as_reward(nan)])(["p", "q"], ["a", "b"])
    with pytest.raises(RewardFunctionError, match="reward 'text' returned 'yes'"):
        RewardSet([as_reward(text)])(["p", "q"], ["a", "b"])


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("rewards")
    tok = tiny_tokenizer()
    policy = save_tiny(root / "policy", tiny_policy(tok), tok)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"the cat sat {i}", "answer": str(i), "level": i % 2}) + "\n"
                               for i in range(6)))
    return {"policy": policy, "prompts": str(prompts), "root": root}


@pytest.mark.parametrize("recipe", ["grpo", "rloo", "ppo"])
def test_recipes_pass_dataset_columns_and_log_each_reward(task, tmp_path, recipe):
    import importlib

    mod = importlib.import_module(f"rlhfkit.recipes.{recipe}")
    seen = []

    def aligned(prompts, completions, answer, level, **kw):
        # every extra column arrives as a keyword list aligned with the completions
        assert len(prompts) == len(completions) == len(answer) == len(level)
        assert all(p == f"the cat sat {a}" and lv == int(a) % 2 for p, a, lv in zip(prompts, answer, level))
        seen.append(len(completions))
        return [float(len(c) > 3) for c in completions]

    kw = dict(num_generations=2) if recipe != "ppo" else {}
    cfg = mod.Config(model=task["policy"], prompts=task["prompts"], reward=["length:4"], reward_weights=[1.0, 0.5],
                     output_dir=str(tmp_path), max_steps=2, prompts_per_step=2, max_completion_length=5,
                     per_device_train_batch_size=4, report_to="jsonl", **kw)
    mod.main(cfg, reward_funcs=[aligned])
    rows = read_metrics(tmp_path)
    assert len(seen) == 2 and seen[0] == (4 if recipe != "ppo" else 2)
    for key in ("rewards/aligned/mean", "rewards/aligned/std", "rewards/aligned/abstained", "rewards/length/mean",
                "reward"):
        assert key in rows[0], key
    want = rows[0]["rewards/length/mean"] + 0.5 * rows[0]["rewards/aligned/mean"]
    assert rows[0]["reward"] == pytest.approx(want, rel=1e-6)
    if recipe != "ppo":
        assert 0.0 <= rows[0]["frac_reward_zero_std"] <= 1.0


def test_a_failing_reward_stops_the_run_before_any_update(task, tmp_path):
    from rlhfkit.recipes import grpo

    def broken(prompts, completions, **kw):
        return [1.0] * (len(completions) - 1)

    cfg = grpo.Config(model=task["policy"], prompts=task["prompts"], output_dir=str(tmp_path), max_steps=1,
                      prompts_per_step=2, num_generations=2, max_completion_length=4, per_device_train_batch_size=4,
                      report_to="jsonl")
    with pytest.raises(RewardFunctionError, match="reward 'broken' returned 3 values for 4"):
        grpo.main(cfg, reward_funcs=broken)
    assert not (tmp_path / "final").exists() and read_metrics(tmp_path) == []


def test_cli_takes_repeated_reward_and_weights(task, tmp_path, capsys):
    from rlhfkit.cli import main

    rw = task["root"] / "rw.py"
    rw.write_text("def has_a(prompts, completions, answer, **kw):\n    return [float('a' in c) for c in completions]\n")
    rc = main(["grpo", "--model", task["policy"], "--prompts", task["prompts"], "--reward", f"py:{rw}:has_a",
               "--reward", "math", "--reward_weights", "1.0", "0.5", "--output_dir", str(tmp_path), "--max_steps",
               "1", "--prompts_per_step", "2", "--num_generations", "2", "--max_completion_length", "4",
               "--per_device_train_batch_size", "4", "--report_to", "jsonl"])
    assert rc == 0
    row = read_metrics(tmp_path)[0]
    assert "rewards/has_a/mean" in row and "rewards/math/mean" in row
    rc = main(["grpo", "--model", task["policy"], "--prompts", task["prompts"], "--reward", "nonsense",
               "--output_dir", str(tmp_path / "bad")])
    assert rc == 2 and "reward 'nonsense': unknown" in capsys.readouterr().err


def test_report_plots_each_reward_and_the_zero_variance_share():
    from rlhfkit.eval.report import _curve_keys

    rows = [{"step": s, "rewards/math/mean": 0.1 * s, "rewards/math/std": 0.2, "rewards/math/abstained": 0.0,
             "rewards/fmt/mean": 0.5, "frac_reward_zero_std": 0.25, **{f"m{i}": 1.0 for i in range(20)}}
            for s in (1, 2)]
    keys = _curve_keys(rows)
    assert keys[:3] == ["rewards/fmt/mean", "rewards/math/mean", "frac_reward_zero_std"]
    assert "rewards/math/std" not in keys and "rewards/math/abstained" not in keys


def test_hacking_alarm_uses_any_held_out_reward(task, tmp_path):
    """A held-out verifier as the 'gold': training reward rising while it falls fires the alarm."""
    from rlhfkit.recipes import grpo

    held_out = tmp_path / "held_out.py"
    held_out.write_text("calls = [0]\n\ndef falling(prompts, completions, **kw):\n    calls[0] += 1\n"
                        "    return [-0.1 * calls[0]] * len(completions)\n")
    rising = {"n": 0}

    def train_reward(prompts, completions, **kw):
        rising["n"] += 1
        return [0.1 * rising["n"] + 0.01 * i for i in range(len(completions))]

    cfg = grpo.Config(model=task["policy"], prompts=task["prompts"], eval_reward=f"py:{held_out}:falling",
                      output_dir=str(tmp_path / "run"), max_steps=8, prompts_per_step=2, num_generations=2,
                      max_completion_length=3, per_device_train_batch_size=4, report_to="jsonl", hacking_window=3,
                      stop_on_hacking=True)
    grpo.main(cfg, reward_funcs=train_reward)
    rows = read_metrics(tmp_path / "run")
    assert rows[0]["eval_reward"] == pytest.approx(-0.1)
    # window of 3 full at update 3, patience 2: fires at update 4 and the run ends there
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["hacking_alarm"] == 1.0
    assert (tmp_path / "run" / "alarms.jsonl").is_file()


@pytest.mark.parametrize("use_lora", [False, True])
def test_final_check_goes_through_the_one_evaluator(task, tmp_path, use_lora):
    """With an eval reward and held-out prompts the run ends with rlhfkit.eval.run_eval.evaluate:
    policy vs reference (with LoRA: the policy with its adapters off) by the held-out reward."""
    from rlhfkit.recipes import grpo

    verifier = tmp_path / "verifier.py"
    verifier.write_text("def level(prompts, completions, level, **kw):\n    return [float(x) for x in level]\n")
    cfg = grpo.Config(model=task["policy"], prompts=task["prompts"], eval_prompts=task["prompts"], num_eval_prompts=4,
                      eval_reward=f"py:{verifier}:level", reward=["length:4"], output_dir=str(tmp_path / "run"),
                      max_steps=1, prompts_per_step=2, num_generations=2, max_completion_length=3,
                      per_device_train_batch_size=4, report_to="jsonl", use_lora=use_lora, lora_r=4)
    ev = grpo.main(cfg)["eval"]
    # the verifier scores the prompt's own column: both models get the same score, every prompt ties
    assert ev["eval_reward"] == ev["eval_reward_reference"] == pytest.approx(0.5)
    assert ev["eval_win_rate"] == 0.5
    assert abs(ev["kl"]) < 0.1 and "reward_reference" in ev  # one small step from the reference


def test_final_check_with_the_gold_panel_splits_the_gain(task, tmp_path):
    """With the bundled panel as the held-out reward the final check also splits the gold gain into
    its sentiment and quality terms, which add up to the gold difference."""
    from rlhfkit.recipes import grpo

    cfg = grpo.Config(model=task["policy"], prompts=task["prompts"], eval_prompts=task["prompts"], num_eval_prompts=4,
                      eval_reward="gold", reward=["length:4"], output_dir=str(tmp_path / "run"), max_steps=1,
                      prompts_per_step=2, num_generations=2, max_completion_length=3, per_device_train_batch_size=4,
                      report_to="jsonl")
    ev = grpo.main(cfg)["eval"]
    assert ev["gold_gain"] == pytest.approx(ev["eval_reward"] - ev["eval_reward_reference"], abs=1e-9)
    assert ev["gold_gain_sentiment"] + ev["gold_gain_quality"] == pytest.approx(ev["gold_gain"], abs=1e-9)
    assert 0.0 <= ev["q1_share"] <= 1.0 and ev["gold_gain_lo"] <= ev["gold_gain"] <= ev["gold_gain_hi"]


def test_judge_spec_with_the_bundled_lexicon_judge_and_eval_refuses_abstentions():
    from rlhfkit.errors import RlhfkitError
    from rlhfkit.eval.run_eval import PromptScorer

    rs = load_rewards(["judge:afinn"])
    assert rs(["", ""], ["good", "bad bad"]).tolist() == [3.0, -6.0]

    def half(prompts, completions, **kw):
        return [1.0 if i % 2 else None for i in range(len(completions))]

    with pytest.raises(RlhfkitError, match="judge 'half' abstained on 2 of 3"):
        PromptScorer(RewardSet([as_reward(half)]), None, {}).score(["p"] * 3, ["a", "b", "c"])


@pytest.mark.parametrize("recipe", ["grpo", "rloo", "ppo"])
def test_reward_functions_get_every_trl_keyword(task, tmp_path, recipe):
    """TRL's call: prompts, completions, completion_ids (the sampled ids, EOS included, no padding),
    trainer_state (a transformers TrainerState), log_extra / log_metric, and the dataset's columns."""
    import importlib

    from transformers import TrainerState

    mod = importlib.import_module(f"rlhfkit.recipes.{recipe}")
    tok = tiny_tokenizer()
    steps = []

    def uses_all(prompts, completions, completion_ids, trainer_state, log_extra, log_metric, answer, level):
        assert isinstance(trainer_state, TrainerState) and trainer_state.max_steps == 2
        assert len(completion_ids) == len(completions) == len(answer) == len(level)
        for ids, text in zip(completion_ids, completions):
            assert all(isinstance(i, int) for i in ids) and tok.pad_token_id not in ids[:-1]
            assert tok.decode(ids, skip_special_tokens=True) == text
        steps.append(trainer_state.global_step)
        log_extra("n_ids", [len(ids) for ids in completion_ids])
        log_metric("ids_per_completion", float(np.mean([len(ids) for ids in completion_ids])))
        return [float(len(ids)) for ids in completion_ids]

    kw = dict(num_generations=2) if recipe != "ppo" else {}
    mod.main(mod.Config(model=task["policy"], prompts=task["prompts"], output_dir=str(tmp_path), max_steps=2,
                        prompts_per_step=2, max_completion_length=5, per_device_train_batch_size=4, report_to="jsonl",
                        sample_every=1, **kw), reward_funcs=[uses_all])
    assert steps == [0, 1]  # completed updates when the batch is scored
    rows = read_metrics(tmp_path)
    assert rows[0]["ids_per_completion"] == pytest.approx(rows[0]["rewards/uses_all/mean"])
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["n_ids"] == s["reward"] for s in samples)


def test_none_is_not_applicable_as_in_trl():
    """None = not applicable: nansum over the functions; a completion every function skips is
    unscorable: flagged, and in a group it takes the group's mean of scorable completions (so it
    moves neither the baseline nor itself)."""
    def a(prompts, completions, **kw):
        return [1.0, None, 3.0, None]

    def b(prompts, completions, **kw):
        return [10.0, 20.0, None, None]

    out = RewardSet([as_reward(a), as_reward(b, weight=0.5)]).score(["p"] * 4, ["w", "x", "y", "z"])
    assert out.total.tolist() == [6.0, 10.0, 3.0, 0.0]
    assert out.unscorable.tolist() == [False, False, False, True]
    assert out.total_for_groups(2).tolist() == [6.0, 10.0, 3.0, 3.0]
    assert out.total_for_groups(4).tolist() == [6.0, 10.0, 3.0, pytest.approx(19 / 3)]
    assert out.stats()["rewards/unscorable"] == 0.25
    skip = RewardSet([as_reward(lambda prompts, completions, **kw: [None] * len(completions), "skip")])
    assert skip.score(["p"] * 2, ["x", "y"]).total_for_groups(2).tolist() == [0.0, 0.0]


def test_best_of_n_and_rejection_sampling_pass_completion_ids(task, tmp_path):
    from rlhfkit.recipes import best_of_n, rejection_sampling

    rw = tmp_path / "ids.py"
    rw.write_text("def n_ids(prompts, completions, completion_ids, answer):\n"
                  "    return [float(len(ids)) for ids in completion_ids]\n")
    res = best_of_n.main(best_of_n.Config(model=task["policy"], prompts=task["prompts"], reward=[f"py:{rw}:n_ids"], n=2,
                                          kl_pool=2, max_new_tokens=3, gold=False, output_dir=str(tmp_path / "bon")))
    assert 1.0 <= res["score_selected"] <= 3.0
    rejection_sampling.main(rejection_sampling.Config(
        model=task["policy"], prompts=task["prompts"], reward=[f"py:{rw}:n_ids"], rounds=1, k=2, prompts_per_round=4,
        max_new_tokens=3, per_device_train_batch_size=4, output_dir=str(tmp_path / "rs"), report_to="jsonl",
        progress=False))


def test_grpo_gives_an_unscorable_completion_no_advantage(task, tmp_path, monkeypatch):
    """Rows are prompt-major (2 prompts x 2 samples); row 1 is unscorable. TRL leaves it out of its
    group's baseline and zeroes its advantage; scored 0 instead it would push its group apart."""
    from rlhfkit.recipes import grpo

    seen = []
    monkeypatch.setattr(grpo, "Trajectory", lambda *a, **kw: _record(seen, a, kw))  # the advantages of the update

    def some(prompts, completions, **kw):
        return [None if i == 1 else float(i + 1) for i in range(len(completions))]

    grpo.main(grpo.Config(model=task["policy"], prompts=task["prompts"], output_dir=str(tmp_path), max_steps=1,
                          prompts_per_step=2, num_generations=2, max_completion_length=3, per_device_train_batch_size=4,
                          report_to="jsonl", scale_rewards=False), reward_funcs=[some])
    adv = seen[0].tolist()
    assert adv[0] == 0.0 and adv[1] == 0.0  # group 0: one scorable completion, nothing to compare
    assert adv[2] == pytest.approx(-0.5) and adv[3] == pytest.approx(0.5)
    assert read_metrics(tmp_path)[0]["rewards/unscorable"] == 0.25


def _record(seen, args, kwargs):
    from rlhfkit.rollout import Trajectory

    seen.append(args[6].clone())
    return Trajectory(*args, **kwargs)
