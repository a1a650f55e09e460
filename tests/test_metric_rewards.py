"""`--reward metric:NAME`: hand-checked metric values, the reference column, errors, and the same spec
in GRPO, best-of-n and eval."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rl_helpers import save_tiny, tiny_policy, tiny_tokenizer
from rlhfkit.errors import ConfigError
from rlhfkit.judges.specs import load_reward, load_rewards
from rlhfkit.train.runs import read_metrics

pytest.importorskip("sacrebleu")
pytest.importorskip("rouge_score")


def score(spec: str, completions, **columns):
    return load_rewards([spec])(["p"] * len(completions), completions, **columns).tolist()


def test_reference_metrics_by_hand():
    ref = {"reference": ["the cat sat on the mat"]}
    # ROUGE-1: precision 3/3, recall 3/6 -> F = 2/3; ROUGE-2: bigrams 2/2 and 2/5 -> F = 2 * 0.4 / 1.4
    assert score("metric:rouge1", ["the cat sat"], **ref) == pytest.approx([2 / 3], rel=1e-12)
    assert score("metric:rouge2", ["the cat sat"], **ref) == pytest.approx([0.8 / 1.4], rel=1e-12)
    assert score("metric:rouge", ["the cat sat"], **ref) == pytest.approx([2 / 3], rel=1e-12)  # LCS 3
    # BLEU: every n-gram precision 1, brevity penalty exp(1 - 5/4)
    assert score("metric:bleu", ["a b c d"], reference=["a b c d e"]) == pytest.approx([math.exp(-0.25)], rel=1e-9)
    # TER: one substitution over three reference words, as a negative reward
    assert score("metric:ter", ["a b c"], reference=["a b d"]) == pytest.approx([-1 / 3], rel=1e-9)
    # chrF (beta 2): orders 1-2 only ('ab' has no 3-gram): P = 1, R = (2/3 + 1/2) / 2 = 7/12 -> 5PR / (4P + R)
    assert score("metric:chrf", ["ab"], reference=["abc"]) == pytest.approx([35 / 55], rel=1e-9)
    assert score("metric:chrf", ["abc", "xyz"], reference=["abc", "abc"]) == pytest.approx([1.0, 0.0])
    # a list of references: the best match counts
    assert score("metric:bleu", ["a b c d"], reference=[["x y", "a b c d"]]) == pytest.approx([1.0])
    # conversational completions are read as their text
    conv = [[{"role": "assistant", "content": "the cat sat"}]]
    assert score("metric:rouge1?column=gold_text", conv, gold_text=["the cat sat on the mat"]) == pytest.approx([2 / 3])


def test_distinct_and_perplexity(tmp_path):
    # "a b a b": bigrams (a b) (b a) (a b) -> 2 distinct of 3; one word has no bigram
    assert score("metric:distinct-2", ["a b a b", "a", "a b c"]) == pytest.approx([2 / 3, 0.0, 1.0])
    assert score("metric:distinct-1", ["a b a b"]) == pytest.approx([0.5])
    tok = tiny_tokenizer()
    model = tiny_policy(tok)
    path = save_tiny(tmp_path / "lm", model, tok)
    reward = load_reward(f"metric:perplexity?model={path}")
    prompts, completions = ["the cat", "a kind word makes"], [" sat on the mat", " the day"]
    got = reward.fn(prompts, completions)
    for p, c, g in zip(prompts, completions, got):  # -mean NLL of the completion's tokens, by hand
        q, r = tok(p)["input_ids"], tok(c, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = model(torch.tensor([q + r])).logits[0].double().log_softmax(-1)
        want = sum(logp[len(q) - 1 + i, t].item() for i, t in enumerate(r)) / len(r)
        assert g == pytest.approx(want, rel=1e-5)
    assert reward.fn(["the cat"], [""]) == [None]  # nothing to score: abstains


def test_metric_errors():
    with pytest.raises(ConfigError, match="no 'reference' column .*column=NAME"):
        score("metric:bleu", ["a"], answer=["a"])
    with pytest.raises(ConfigError, match="unknown metric 'meteor'"):
        load_reward("metric:meteor")
    with pytest.raises(ConfigError, match="unknown option"):
        load_reward("metric:bleu?colum=x")
    with pytest.raises(ConfigError, match="metric:NAME"):
        load_reward("metrics:bleu")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("metric")
    tok = tiny_tokenizer()
    policy = save_tiny(root / "policy", tiny_policy(tok), tok)
    rows = [{"prompt": p, "reference": r} for p, r in [("the cat", "sat on the mat"), ("a kind", "word makes the day"),
                                                       ("the rain", "fell on the town"), ("she smiled", "and thanked him")]]
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"policy": policy, "prompts": str(prompts)}


def test_metric_reward_in_grpo_best_of_n_and_eval(assets, tmp_path):
    from rlhfkit.eval import run_eval
    from rlhfkit.recipes import best_of_n, grpo

    grpo.main(grpo.Config(model=assets["policy"], prompts=assets["prompts"], reward=["metric:chrf"], eval_prompts="",
                          output_dir=str(tmp_path / "grpo"), max_steps=1, prompts_per_step=2, num_generations=2,
                          max_completion_length=4, per_device_train_batch_size=4, report_to="jsonl"))
    row = read_metrics(tmp_path / "grpo")[0]
    assert 0.0 <= row["rewards/chrf/mean"] <= 1.0
    res = best_of_n.main(best_of_n.Config(model=assets["policy"], prompts=assets["prompts"], reward=["metric:rouge1"],
                                          n=3, kl_pool=3, max_new_tokens=4, output_dir=str(tmp_path / "bon")))
    assert res["score_selected"] >= res["score_mean_all"]
    m = run_eval.main(run_eval.Config(model=assets["policy"], reference=assets["policy"], prompts=assets["prompts"],
                                      judge=["metric:bleu"], max_new_tokens=4, n_boot=10, output_dir=str(tmp_path / "ev")))
    assert 0.0 <= m["gold"]["mean"] <= 1.0 and m["judge"] == "metric:bleu"
