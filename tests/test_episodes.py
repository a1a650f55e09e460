"""Multi-turn episodes, token in and token out (rlhfkit.rollout.episodes, rlhfkit.data.turns)."""

from __future__ import annotations

import json

import pytest
import torch

from arch_models import make_config, make_tokenizer
from rlhfkit.data.turns import encode_conversation, encode_text, render
from rlhfkit.envs import StepResult, make_factory
from rlhfkit.logprobs import response_logprobs
from rlhfkit.rollout.episodes import Limits, episode_stats, run_episodes, transcript

# a compact Qwen 2.5-style template: tools in the system turn, calls in <tool_call> blocks, results as user turns
HERMES_TOOLS = (
    "{% if tools %}{{ '<|im_start|>system\nTools:' }}{% for t in tools %}{{ ' ' + t['function']['name'] }}{% endfor %}"
    "{{ '<|im_end|>\n' }}{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'tool' %}{{ '<|im_start|>user\n<tool_response>\n' + m['content'] + '\n</tool_response><|im_end|>\n' }}"
    "{% elif m['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' + (m['content'] or '') }}"
    "{% for c in m.get('tool_calls') or [] %}{{ '<tool_call>\n' + ({'name': c['function']['name'], "
    "'arguments': c['function']['arguments']} | tojson) + '\n</tool_call>' }}{% endfor %}{{ '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first
        b: the second
    """
    return a + b


@pytest.fixture(scope="module")
def tok():
    t = make_tokenizer("qwen2")
    t.add_tokens(["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"])
    t.chat_template = HERMES_TOOLS
    return t


@pytest.fixture(scope="module")
def model(tok):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = make_config("qwen2", len(tok), tok)
    cfg.max_position_embeddings = 512
    m = AutoModelForCausalLM.from_config(cfg).float()
    # a biased head that ends a turn every ~20 tokens, so random weights still play several turns
    head = torch.nn.Linear(m.lm_head.in_features, m.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(m.lm_head.weight)
        head.bias.zero_()
        head.bias[tok.eos_token_id] = 5.0
    m.lm_head = head
    m.config.tie_word_embeddings = False
    return m.eval()


def char_ids(tok, text: str) -> list[int]:
    """`text` as one token per character: a valid sampled sequence the tokenizer itself would never produce."""
    return [i for ch in text for i in encode_text(tok, ch)]


class Script:
    """A policy that writes given turns, one token per character (records what it sampled)."""

    def __init__(self, tok, turns: list[str], end: bool = True):
        self.tok, self.turns, self.end, self.sampled = tok, turns, end, []

    def __call__(self, contexts, max_new):
        out = []
        for _ in contexts:
            ids = char_ids(self.tok, self.turns[min(len(self.sampled), len(self.turns) - 1)])
            ids = (ids + [self.tok.eos_token_id] if self.end else ids)[:max_new]
            out.append((ids, [-0.5] * len(ids), self.end and len(ids) and ids[-1] == self.tok.eos_token_id))
        self.sampled.append([len(contexts)] + [o[0] for o in out])
        return out


CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'


def test_trained_ids_are_the_sampled_ids_where_retokenising_differs(tok, model):
    script = Script(tok, [CALL, "The sum is 5."])
    roll = run_episodes(model, tok, [{"prompt": "What is 2+3?"}], make_factory(tools=[add]),
                        limits=Limits(4, 100, 300), sample=script)
    ep = roll.episodes[0]
    sampled = [ids for turn in script.sampled for ids in turn[1:]]
    # what the loss covers is exactly the sampled ids, turn after turn
    trained = roll.response_ids[0][roll.response_mask[0].bool()].tolist()
    assert trained == sampled[0] + sampled[1]
    # the final conversation, as the template renders it, is what the trained ids spell ...
    ids, attn = roll.sequences()
    full_ids = ids[0][attn[0].bool()].tolist()
    final = render(tok, ep.messages, ep.tools).removesuffix("\n")  # the template's separator after the last EOS
    assert ep.messages[1]["tool_calls"][0]["function"] == {"name": "add", "arguments": {"a": 2, "b": 3}}
    assert ep.messages[2] == {"role": "tool", "name": "add", "content": "5"}
    assert tok.decode(full_ids, skip_special_tokens=False) == final
    # ... but re-tokenising that rendering gives other ids, first inside the policy's first turn
    retok = encode_text(tok, final)
    assert retok != full_ids
    first_diff = next(i for i, (a, b) in enumerate(zip(retok, full_ids)) if a != b)
    p = roll.query_mask[0].sum().item()
    assert first_diff >= p and roll.response_mask[0][first_diff - p] == 1
    # the tool's answer and the next generation prompt are in the sequence, masked out of the loss
    env_text = tok.decode(roll.response_ids[0][(roll.response_mask[0] == 0) & (roll.attention[0] == 1)])
    assert env_text == "\n<|im_start|>user\n<tool_response>\n5\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    assert ep.turns == 2 and not ep.truncated and bool(roll.ended_with_eos[0])
    assert roll.completions()[0][-1] == {"role": "assistant", "content": "The sum is 5."}
    assert "[tool] 5" in transcript(ep)


def test_sampler_logprobs_equal_the_training_forward_over_several_turns(tok, model):
    class Chatty:  # answers every turn until the third
        def __init__(self):
            self.n = 0

        def reset(self, row):
            return [{"role": "user", "content": row["prompt"]}]

        def step(self, turn):
            self.n += 1
            return StepResult([] if self.n >= 3 else [{"role": "user", "content": "go on"}], float(self.n == 3), self.n >= 3)

    roll = run_episodes(model, tok, [{"prompt": "the cat"}, {"prompt": "a kind word"}], Chatty, num_samples=3,
                        limits=Limits(3, 40, 200), temperature=1.0, seed=0)
    assert roll.prompt_index.tolist() == [0, 0, 0, 1, 1, 1]
    assert max(e.turns for e in roll.episodes) >= 2
    ids, attn = roll.sequences()
    logp, _ = response_logprobs(model, input_ids=ids, attention_mask=attn, response_width=roll.response_ids.shape[1])
    mask = roll.response_mask.bool()
    torch.testing.assert_close(logp[mask], roll.sampler_logp[mask], atol=2e-5, rtol=0)
    assert (roll.sampler_logp[~mask] == 0).all()
    for i, e in enumerate(roll.episodes):  # each row holds the episode's ids: sampled + environment
        n = len(e.ids)
        assert roll.response_ids[i, :n].tolist() == e.ids and attn[i, -roll.response_ids.shape[1]:].sum() == n
        assert sum(e.loss_mask) == sum(len(s) for s in e.sampled) or e.truncated
    done = [e for e in roll.episodes if not e.truncated]
    assert all(e.reward == 1.0 and e.turns == 3 for e in done)


def test_limits_and_the_truncation_rule(tok, model):
    factory = make_factory(tools=[add])
    # (a) a turn without its end-of-turn token ends the episode, truncated
    roll = run_episodes(model, tok, [{"prompt": "2+3?"}], factory, limits=Limits(4, 6, 100),
                        sample=Script(tok, ["no end here"], end=False))
    e = roll.episodes[0]
    assert e.truncated and e.turns == 1 and len(e.ids) == 6 and not roll.ended_with_eos[0]
    # (c) the environment wants another turn after max_turns: truncated, nothing appended after the last turn
    roll = run_episodes(model, tok, [{"prompt": "2+3?"}], factory, limits=Limits(2, 100, 400),
                        sample=Script(tok, [CALL]))
    e = roll.episodes[0]
    assert e.truncated and e.turns == 2 and e.tools_used.calls == 2 and e.loss_mask[-1] == 1
    # (b) the total budget cuts the sampled ids; the observation that does not fit is not appended
    roll = run_episodes(model, tok, [{"prompt": "2+3?"}], factory, limits=Limits(4, 100, 30),
                        sample=Script(tok, [CALL]))
    e = roll.episodes[0]
    assert e.truncated and len(e.ids) == 30 and all(e.loss_mask)
    stats = episode_stats(roll.episodes)
    assert stats["episodes/truncated"] == 1.0 and stats["episodes/turns_mean"] == 1.0
    with pytest.raises(Exception, match="limits"):
        Limits(0, 1, 1)


def test_sft_encoding_of_a_tool_trace_matches_the_episode(tok, model):
    """SFT on a tool-call trace builds the same ids as an episode whose policy wrote the canonical
    tokens, with the loss on the assistant turns (content and end-of-turn token) only."""
    messages = [{"role": "user", "content": "What is 2+3?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
                {"role": "tool", "name": "add", "content": "5"},
                {"role": "assistant", "content": "The sum is 5."}]
    tools = make_factory(tools=[add])().toolbox.schemas
    enc = encode_conversation(tok, messages, tools)
    texts = [CALL, "The sum is 5."]
    turns = iter(encode_text(tok, t) + [tok.eos_token_id] for t in texts)
    roll = run_episodes(model, tok, [{"prompt": "What is 2+3?"}], make_factory(tools=[add]),
                        sample=lambda ctxs, n: [(ids, [0.0] * len(ids), True) for ids in [next(turns)]])
    ids, attn = roll.sequences()
    assert enc["input_ids"] == ids[0][attn[0].bool()].tolist()
    supervised = tok.decode([t for t in enc["labels"] if t != -100], skip_special_tokens=False)
    assert supervised == CALL + "<|im_end|>" + "The sum is 5.<|im_end|>"
    assert json.loads(CALL.split("\n")[1])["arguments"] == {"a": 2, "b": 3}
    short = encode_conversation(tok, messages, tools, max_length=10)
    assert short["truncated"] and len(short["input_ids"]) == 10


def test_gae_skips_environment_tokens():
    """PPO on episodes: GAE over a row with masked environment tokens in the middle equals GAE over
    the policy's tokens alone (the critic's values and the rewards there count for nothing)."""
    from rlhfkit.advantages import gae

    torch.manual_seed(0)
    D = torch.float64
    mask = torch.tensor([[1, 1, 0, 0, 0, 1, 1, 0, 1, 0, 0]], dtype=D)
    rewards, values = torch.randn(1, 11, dtype=D), torch.randn(1, 11, dtype=D)
    keep = mask[0].bool()
    adv, ret = gae(rewards, values, mask, 0.9, 0.8)
    want_adv, want_ret = gae(rewards[:, keep], values[:, keep], torch.ones(1, int(keep.sum()), dtype=D), 0.9, 0.8)
    torch.testing.assert_close(adv[:, keep], want_adv, rtol=1e-12, atol=0)
    torch.testing.assert_close(ret[:, keep], want_ret, rtol=1e-12, atol=0)
    assert (adv[:, ~keep] == 0).all() and (ret[:, ~keep] == 0).all()
    # by hand, gamma = lambda = 1: A_t = sum of the policy's rewards from t on minus V_t
    a1, _ = gae(torch.tensor([[0.0, 5.0, 0.0, 1.0]], dtype=D), torch.tensor([[0.5, 9.0, 2.0, 0.25]], dtype=D),
                torch.tensor([[1.0, 0.0, 0.0, 1.0]], dtype=D), 1.0, 1.0)
    torch.testing.assert_close(a1, torch.tensor([[0.5, 0.0, 0.0, 0.75]], dtype=D))
