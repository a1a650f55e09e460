"""SFT on tool-call traces, then GRPO / RLOO / PPO on multi-turn episodes with tools and a TRL environment class."""

from __future__ import annotations

import json

import pytest
import torch

from arch_models import make_config, make_tokenizer
from rlhfkit.errors import ConfigError
from rlhfkit.train.runs import read_metrics
from test_episodes import HERMES_TOOLS


def ping() -> str:
    """Ask the server for its answer.
    """
    return "pong"


class PingServer:
    """A TRL environment_factory class: the reward is 1 once ping was called and the answer is 'pong'."""

    def reset(self, **kwargs):
        self.calls = 0

    def ping(self) -> str:
        """Ask the server for its answer.
        """
        self.calls += 1
        return "pong"

    def get_reward(self) -> float:
        return float(self.calls > 0)


def says_pong(completions, **kwargs):
    return [float("pong" in (c[-1]["content"] if isinstance(c, list) else c)) for c in completions]


TRACE = [{"role": "user", "content": "hi"},
         {"role": "assistant", "content": "", "tool_calls": [{"type": "function",
                                                             "function": {"name": "ping", "arguments": {}}}]},
         {"role": "tool", "name": "ping", "content": "pong"},
         {"role": "assistant", "content": "pong"}]


@pytest.fixture(scope="module")
def sft_policy(tmp_path_factory):
    """A tiny Qwen2-style model fine-tuned on the ping trace (loss on assistant turns only)."""
    from transformers import AutoModelForCausalLM

    from rlhfkit.envs import tool_schema
    from rlhfkit.recipes import sft

    root = tmp_path_factory.mktemp("agentic")
    tok = make_tokenizer("qwen2")
    tok.add_tokens(["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"])
    tok.chat_template = HERMES_TOOLS
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_config("qwen2", len(tok), tok))
    model.config.max_position_embeddings = 256
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    data = root / "traces.jsonl"
    data.write_text(json.dumps({"messages": TRACE, "tools": [tool_schema(ping)]}) + "\n")
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": [{"role": "user", "content": "hi"}]}) + "\n"
                                                for _ in range(4)))
    sft.main(sft.Config(model=str(root / "base"), dataset=str(data), eval_dataset=str(data),
                        output_dir=str(root / "sft"), max_steps=60, learning_rate=1e-2, per_device_train_batch_size=1,
                        max_length=96, report_to="jsonl", num_train_epochs=100, progress=False))
    return {"policy": str(root / "sft" / "final"), "prompts": str(root / "prompts.jsonl")}


def test_sft_on_a_tool_trace_learns_to_call_the_tool(sft_policy):
    from rlhfkit.envs import make_factory
    from rlhfkit.models import load_policy, load_tokenizer
    from rlhfkit.rollout.episodes import Limits, run_episodes

    tok = load_tokenizer(sft_policy["policy"])
    model = load_policy(sft_policy["policy"])
    roll = run_episodes(model, tok, [{"prompt": "hi"}], make_factory(tools=[ping]), num_samples=4,
                        limits=Limits(3, 30, 90), temperature=0.3, seed=0)
    assert sum(e.tools_used.calls for e in roll.episodes) >= 3  # it learned the call
    assert sum(e.messages[-1]["content"] == "pong" for e in roll.episodes) >= 3  # and to read the result


@pytest.mark.parametrize("recipe", ["grpo", "rloo", "ppo"])
def test_on_policy_recipes_train_multi_turn_episodes(sft_policy, tmp_path, recipe):
    import importlib

    mod = importlib.import_module(f"rlhfkit.recipes.{recipe}")
    extra = {"num_generations": 2} if recipe != "ppo" else {}
    cfg = mod.Config(model=sft_policy["policy"], prompts=sft_policy["prompts"], eval_prompts="", output_dir=str(tmp_path),
                     max_steps=2, prompts_per_step=2, max_completion_length=60, max_turn_tokens=30, max_turns=3,
                     per_device_train_batch_size=4, report_to="jsonl", temperature=0.5, environment=PingServer,
                     perplexity_data="", sample_every=1, **extra)
    out = mod.main(cfg, reward_funcs=[says_pong])
    rows = read_metrics(tmp_path)
    assert len(rows) == 2 and out
    for key in ("episodes/turns_mean", "episodes/tool_calls_mean", "episodes/tool_errors_mean", "episodes/truncated",
                "rewards/environment/mean", "rewards/says_pong/mean"):
        assert key in rows[0], key
    assert rows[0]["episodes/tool_calls_mean"] > 0 and rows[0]["episodes/turns_mean"] > 1
    assert all(torch.isfinite(torch.tensor(r["policy_loss"])) for r in rows)
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert any("[tool] pong" in s.get("transcript", "") for s in samples)
    if recipe == "grpo":  # the HTML report shows the episode curves and transcripts
        from rlhfkit.eval.report import _curve_keys, build_report

        assert "[tool] pong" in build_report(tmp_path)
        assert {"episodes/turns_mean", "episodes/tool_calls_mean", "episodes/truncated"} <= set(_curve_keys(rows))


def test_episode_config_checks():
    from rlhfkit.recipes import grpo

    with pytest.raises(ConfigError, match="max_turns"):
        grpo.Config(model="x", max_turns=0)
    with pytest.raises(ConfigError, match="tool_format"):
        grpo.Config(model="x", tool_format="xml")
    with pytest.raises(ConfigError, match="dynamic_sampling"):
        grpo.Config(model="x", tools=["python"], dynamic_sampling=True)


def test_sample_writes_episodes(sft_policy, tmp_path):
    from rlhfkit.recipes import sample

    out = tmp_path / "episodes.jsonl"
    rows = sample.main(sample.Config(model=sft_policy["policy"], prompts=sft_policy["prompts"], output=str(out),
                                     num_samples=2, max_new_tokens=60, max_turn_tokens=30, max_turns=3, temperature=0.5,
                                     environment=PingServer))
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == len(rows) == 8
    assert {"prompt", "messages", "transcript", "turns", "tool_calls", "env_reward"} <= set(lines[0])
    assert sum(r["tool_calls"] for r in lines) > 0 and any(r["env_reward"] == 1.0 for r in lines)


def test_the_environment_alone_may_give_the_reward(sft_policy, tmp_path):
    from rlhfkit.recipes import grpo

    cfg = grpo.Config(model=sft_policy["policy"], prompts=sft_policy["prompts"], eval_prompts="", output_dir=str(tmp_path),
                      max_steps=1, prompts_per_step=2, num_generations=2, max_completion_length=60, max_turn_tokens=30,
                      per_device_train_batch_size=4, report_to="jsonl", environment=PingServer, perplexity_data="")
    assert cfg.reward == ["py:rlhfkit.rollout.episode_args:reward_from_environment"]
    grpo.main(cfg)
    row = read_metrics(tmp_path)[0]
    assert row["rewards/reward_from_environment/abstained"] == 1.0
    assert row["reward"] == row["rewards/environment/mean"] > 0


def test_a_malformed_tool_trace_names_its_file_and_line(tmp_path):
    from rlhfkit.errors import DataError
    from rlhfkit.recipes import sft

    tok = make_tokenizer("qwen2")
    good = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                         {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6"}]}
    bad = {"messages": [{"role": "assistant", "content": "4"}, {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "x"}]}
    path = tmp_path / "traces.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError) as err:
        sft.load_sft_examples(str(path), tok, 64)
    assert "traces.jsonl, line 3" in str(err.value) and "field 'messages'" in str(err.value)


def test_eval_plays_episodes_for_policy_and_reference(sft_policy, tmp_path):
    """`eval --environment`: both models play the environment; gold is its reward, the win rate,
    counts and KL are the episodes', and the report shows them."""
    from pathlib import Path

    from rlhfkit.eval import run_eval
    from rlhfkit.eval.report import build_report

    base = str(Path(sft_policy["policy"]).parent.parent / "base")
    m = run_eval.main(run_eval.Config(model=sft_policy["policy"], reference=base, prompts=sft_policy["prompts"],
                                      environment=PingServer, max_new_tokens=60, max_turn_tokens=30, max_turns=3,
                                      temperature=0.5, n_boot=50, output_dir=str(tmp_path / "eval")))
    rows = [json.loads(x) for x in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {"transcript", "reference_transcript", "kl", "turns", "tool_calls"} <= set(rows[0])
    # the trained policy calls the tool and earns the environment's reward; the random base does not
    assert m["gold"]["mean"] == pytest.approx(sum(r["gold"] for r in rows) / 4) and m["gold"]["mean"] > 0
    assert m["gold_reference"]["mean"] == 0.0 and m["episodes"]["reference"]["tool_calls"]["mean"] == 0.0
    assert m["episodes"]["policy"]["tool_calls"]["mean"] == sum(r["tool_calls"] for r in rows) / 4 > 0
    assert m["win_rate"]["mean"] == pytest.approx(sum(r["label"] for r in rows) / 4) and m["win_rate"]["mean"] > 0.5
    assert m["kl"]["mean"] == pytest.approx(sum(r["kl"] for r in rows) / 4) and m["kl"]["mean"] > 0
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert saved["episodes"] == m["episodes"] and saved["judge"] == run_eval.ENVIRONMENT_ONLY
    html = build_report(tmp_path)
    assert "Episodes:" in html and "reference_transcript" in html and "tool_calls" in html


def test_eval_episode_logprobs_attend_to_the_environment_tokens(sft_policy):
    """KL in `eval` scores the policy's tokens of an episode in context, environment tokens
    included: the recomputed log-probs equal the sampler's own (and would not without them)."""
    from rlhfkit.eval import metrics as M
    from rlhfkit.eval.episodes import play
    from rlhfkit.models import load_policy, load_tokenizer
    from rlhfkit.rollout.episode_args import EpisodeArgs
    from rlhfkit.rollout.prompts import load_prompt_set

    class Cfg(EpisodeArgs):
        pass

    cfg = Cfg(environment=PingServer, max_turns=3, max_turn_tokens=30)
    cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.batch_size = 60, 1.0, 1.0, 8
    tok, model = load_tokenizer(sft_policy["policy"]), load_policy(sft_policy["policy"], trainable=False).eval()
    roll = play(cfg, model, tok, load_prompt_set(sft_policy["prompts"], "eval"), seed=3)
    assert sum(e.tools_used.calls for e in roll.episodes) > 0  # there are environment tokens in between
    mask = roll.response_mask.bool()
    args = dict(pad_token_id=tok.pad_token_id, batch_size=8)
    lp = M.query_response_logprobs(model, roll.query_ids, roll.response_ids, roll.response_mask, attention=roll.attention,
                                   **args)
    torch.testing.assert_close(lp[mask], roll.sampler_logp[mask].float(), rtol=1e-4, atol=1e-4)
    blind = M.query_response_logprobs(model, roll.query_ids, roll.response_ids, roll.response_mask, **args)
    assert (blind[mask] - roll.sampler_logp[mask]).abs().max() > 1e-2


def test_eval_with_tools_scores_episodes_by_the_judge(sft_policy, tmp_path):
    from pathlib import Path

    from rlhfkit.eval import run_eval

    here = Path(__file__)
    m = run_eval.main(run_eval.Config(model=sft_policy["policy"], reference=sft_policy["policy"],
                                      prompts=sft_policy["prompts"], tools=[f"py:{here}:ping"],
                                      judge=[f"py:{here}:says_pong"], max_new_tokens=60, max_turn_tokens=30,
                                      temperature=0.5, n_boot=20, output_dir=str(tmp_path)))
    rows = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    finals = [r["transcript"].splitlines()[-2] for r in rows]  # the last message, before the counts line
    assert [r["gold"] for r in rows] == [float("pong" in f and f.startswith("[assistant]")) for f in finals]
    assert m["gold"]["mean"] == sum(r["gold"] for r in rows) / len(rows)
    with pytest.raises(ConfigError, match="reward_model.*--judge"):
        run_eval.Config(model=sft_policy["policy"], prompts=sft_policy["prompts"], tools=[f"py:{here}:ping"],
                        judge=["py:x.py:f"], reward_model="rm:x")
