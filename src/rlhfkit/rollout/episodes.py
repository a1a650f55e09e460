"""Multi-turn episodes, token in and token out: the ids trained on are the ids the policy sampled.

An episode starts from an environment's `reset(row)` messages, rendered once by the chat
template (with the environment's tools) and encoded as SFT encodes prompts. Then, turn by turn:

1. every active episode continues from its own ids (never re-tokenised), batched;
2. the sampled ids, up to and including the end-of-turn token, are appended as they are
   (loss mask 1, the sampler's log-probs kept);
3. the turn's text goes to the environment (`step`, concurrently across episodes), whose
   messages are rendered by the template and only the text it adds after the turn's end
   (`rlhfkit.data.turns.template_suffix`: tool results plus the next generation prompt) is
   tokenised and appended (loss mask 0).

The result is a :class:`EpisodeRollout`: the prompt is the first rendering, the "response"
is everything after it (the policy's and the environment's tokens); `response_mask` is 1 on
the policy's tokens only, so every loss of the on-policy recipes covers only them, while
`attention` (used by `sequences()`) covers all.

Limits and the truncation rule: an episode ends TRUNCATED when (a) a turn reaches
`max_turn_tokens` without its end-of-turn token (the environment still sees the cut turn, with
`Turn.truncated` set: the tool environments then end the episode), (b) its response (policy
and environment tokens) would pass `max_total_tokens` (the sampled ids are cut there; an
observation that does not fit is not appended), or (c) `max_turns` policy turns were taken
and the environment still wanted another. A truncated episode is kept and trained on like a
single-turn response that hit max_completion_length: `ended_with_eos` is False (so
`--missing_eos_penalty` applies to it) and it is counted in `episodes/truncated`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch

from rlhfkit.data.collate import encode_prompt
from rlhfkit.data.turns import encode_text, render, template_suffix
from rlhfkit.envs.parsing import detect_format, parse_tool_calls, strip_tool_calls
from rlhfkit.envs.protocol import StepResult, Turn, call_maybe_async, env_tool_schemas
from rlhfkit.envs.tools import ToolStats
from rlhfkit.errors import ConfigError
from rlhfkit.rollout.generate import _generate_chunk, _stop_ids
from rlhfkit.rollout.record import Rollout


@dataclasses.dataclass
class Limits:
    max_turns: int = 4
    """Policy turns per episode at most."""
    max_turn_tokens: int = 64
    """Tokens one policy turn may sample."""
    max_total_tokens: int = 256
    """Tokens after the prompt (policy and environment) at most."""

    def __post_init__(self) -> None:
        if self.max_turns < 1 or self.max_turn_tokens < 1 or self.max_total_tokens < 1:
            raise ConfigError(f"episode limits must be >= 1: max_turns={self.max_turns}, "
                              f"max_turn_tokens={self.max_turn_tokens}, max_total_tokens={self.max_total_tokens}")


@dataclasses.dataclass
class Episode:
    """One episode's state while it runs, and its record once done."""

    env: Any
    messages: list[dict]
    tools: list[dict]
    prompt_ids: list[int]
    ids: list[int] = dataclasses.field(default_factory=list)
    """Everything after the prompt."""
    loss_mask: list[int] = dataclasses.field(default_factory=list)
    sampler_logp: list[float] = dataclasses.field(default_factory=list)
    sampled: list[list[int]] = dataclasses.field(default_factory=list)
    """Each turn's sampled ids, as the sampler returned them (before any cut)."""
    turns: int = 0
    reward: float = 0.0
    done: bool = False
    truncated: bool = False
    tools_used: ToolStats = dataclasses.field(default_factory=ToolStats)
    n_prompt_messages: int = 0
    """How many of `messages` came from reset (the rest are the episode's turns)."""


@dataclasses.dataclass
class EpisodeRollout(Rollout):
    """A :class:`Rollout` of episodes. `response_mask` (N, R) is 1 on the policy's sampled tokens only
    (the loss mask); `attention` (N, R) is 1 on every real response token, the policy's and the
    environment's; `episodes` keeps each one's messages, rewards and counts."""

    attention: torch.Tensor | None = None
    episodes: list[Episode] = dataclasses.field(default_factory=list)

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)  # the policy's tokens

    def sequences(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([self.query_ids, self.response_ids], 1), torch.cat([self.query_mask, self.attention], 1)

    def select(self, index: Sequence[int] | torch.Tensor) -> EpisodeRollout:
        idx = torch.as_tensor(index, dtype=torch.long)
        base = Rollout.select(self, idx)
        return EpisodeRollout(**{f.name: getattr(base, f.name) for f in dataclasses.fields(Rollout)},
                              attention=self.attention[idx], episodes=[self.episodes[i] for i in idx.tolist()])

    def completions(self) -> list[list[dict]]:
        """TRL's completions of tool-using rollouts: the messages after the prompt (assistant and tool turns)."""
        return [e.messages[e.n_prompt_messages:] for e in self.episodes]


def default_turn_sampler(model, tokenizer, temperature: float, top_p: float, top_k: int, seed: int | None,
                         batch_size: int) -> Callable:
    """sample(list of id lists, max_new_tokens) -> [(sampled ids up to and incl. the stop token, log-probs, ended)]
    with rlhfkit's KV-cache sampler (the hf engine's loop), `batch_size` rows per forward."""
    device = next(model.parameters()).device
    stop = torch.tensor(_stop_ids(model, tokenizer, None), dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(int(seed)) if seed is not None else None

    def sample(contexts: list[list[int]], max_new: int) -> list[tuple[list[int], list[float], bool]]:
        out = []
        for s in range(0, len(contexts), batch_size):
            _, _, tokens, mask, ended, logp = _generate_chunk(model, contexts[s:s + batch_size], max_new, temperature,
                                                              top_p, stop, tokenizer.pad_token_id, generator,
                                                              top_k=top_k, with_logprobs=True)
            for row, m, e, lp in zip(tokens, mask, ended, logp):
                keep = m.bool()
                out.append((row[keep].tolist(), lp[keep].tolist(), bool(e)))
        return out

    return sample


def start_episodes(factory: Callable[[], Any], rows: Sequence[dict], num_samples: int, tokenizer,
                   max_prompt_length: int | None, pool) -> tuple[list[Episode], int]:
    """One fresh environment per (row, sample), reset concurrently; prompts rendered and encoded once."""
    envs = [factory() for _ in range(len(rows) * num_samples)]
    firsts = list(pool.map(lambda i: call_maybe_async(envs[i].reset, dict(rows[i // num_samples])), range(len(envs))))
    episodes, truncated = [], 0
    for env, messages in zip(envs, firsts):
        if not messages:
            raise ConfigError(f"environment {type(env).__name__}.reset returned no messages to start from")
        tools = env_tool_schemas(env)
        ids, cut = encode_prompt(tokenizer, render(tokenizer, messages, tools, add_generation_prompt=True),
                                 max_prompt_length=max_prompt_length)
        truncated += int(cut)
        episodes.append(Episode(env, list(messages), tools, ids, n_prompt_messages=len(messages)))
    return episodes, truncated


def _append_turn(ep: Episode, ids: list[int], logp: list[float], ended: bool, limits: Limits) -> bool:
    """Append a sampled turn within the token budget; returns whether it ended with its stop token."""
    ep.sampled.append(list(ids))
    room = limits.max_total_tokens - len(ep.ids)
    if len(ids) > room:
        ids, logp, ended = ids[:room], logp[:room], False
        ep.truncated = ep.done = True
    ep.ids += ids
    ep.loss_mask += [1] * len(ids)
    ep.sampler_logp += logp
    ep.turns += 1
    return ended


def _observe(ep: Episode, result: StepResult, tokenizer, end_text: str, limits: Limits) -> None:
    """Record a step: reward, counts, and the environment's tokens (or the end of the episode)."""
    ep.reward += float(result.reward)
    ep.tools_used.add(result.tool_stats)
    ep.messages += result.messages
    if result.done or not result.messages:
        ep.done = True
        return
    if ep.turns >= limits.max_turns:
        ep.done = ep.truncated = True  # the environment wants another turn; the rule: none is left
        return
    history = ep.messages[:len(ep.messages) - len(result.messages)]
    suffix = encode_text(tokenizer, template_suffix(tokenizer, history, result.messages, ep.tools, end_text))
    if len(ep.ids) + len(suffix) >= limits.max_total_tokens:
        ep.done = ep.truncated = True  # no room for the observation and a reply
        return
    ep.ids += suffix
    ep.loss_mask += [0] * len(suffix)
    ep.sampler_logp += [0.0] * len(suffix)


def play_turn(active: list[Episode], sample: Callable, tokenizer, fmt: str, limits: Limits, pool) -> None:
    """One policy turn of every active episode, then its environment's step (concurrently)."""
    budget = max(min(limits.max_turn_tokens, limits.max_total_tokens - len(e.ids)) for e in active)
    outs = sample([e.prompt_ids + e.ids for e in active], budget)
    turns, ends = [], []
    for ep, (ids, logp, ended) in zip(active, outs):
        ended = _append_turn(ep, ids, logp, ended, limits)
        stop = ids[-1] if ended else None
        body = ids[:-1] if ended else ids
        raw = tokenizer.decode(body, skip_special_tokens=False)
        text = tokenizer.decode(body, skip_special_tokens=True)
        calls = parse_tool_calls(raw, fmt)
        turn = Turn(strip_tool_calls(text, fmt) if calls else text, calls, truncated=not ended, raw=raw)
        ep.messages.append(turn.as_message())
        if not ended:
            ep.truncated = True
        turns.append(turn)
        ends.append(tokenizer.decode([stop], skip_special_tokens=False) if stop is not None else None)
    results = list(pool.map(lambda i: call_maybe_async(active[i].env.step, turns[i]), range(len(active))))
    for ep, result, end_text in zip(active, results, ends):
        if ep.done:  # cut by the total budget: the step's reward still counts, its messages are not trained on
            ep.reward += float(result.reward)
            ep.tools_used.add(result.tool_stats)
            continue
        _observe(ep, result, tokenizer, end_text, limits)
        if ep.truncated:
            ep.done = True


def run_episodes(model, tokenizer, rows: Sequence[dict], factory: Callable[[], Any], num_samples: int = 1,
                 limits: Limits | None = None, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int | None = None, batch_size: int = 64, max_prompt_length: int | None = None,
                 tool_format: str = "auto", sample: Callable | None = None, workers: int = 8) -> EpisodeRollout:
    """`num_samples` episodes per row (prompt-major, as group baselines expect), played to the end
    or to a limit (module docstring). `sample` replaces the policy's sampler (tests, other engines)."""
    limits = limits or Limits()
    if tokenizer.pad_token_id is None:
        raise ConfigError("the tokenizer has no pad token; rlhfkit.models.load_tokenizer sets one")
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    fmt = detect_format(tokenizer) if tool_format == "auto" else tool_format
    parse_tool_calls("", fmt)  # an unknown format fails here, before any episode runs
    was_training = model.training
    model.eval()
    try:
        sample = sample or default_turn_sampler(model, tokenizer, temperature, top_p, top_k, seed, batch_size)
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rlhfkit-env") as pool:
            episodes, cut_prompts = start_episodes(factory, rows, num_samples, tokenizer, max_prompt_length, pool)
            while True:
                active = [e for e in episodes if not e.done]
                if not active:
                    break
                play_turn(active, sample, tokenizer, fmt, limits, pool)
    finally:
        model.train(was_training)
    return as_rollout(episodes, tokenizer, num_samples, cut_prompts)


def as_rollout(episodes: list[Episode], tokenizer, num_samples: int, cut_prompts: int = 0) -> EpisodeRollout:
    """Pad the episodes into the Rollout layout: prompts left-padded, responses right-padded."""
    pad = tokenizer.pad_token_id
    n, p = len(episodes), max(len(e.prompt_ids) for e in episodes)
    r = max(1, max(len(e.ids) for e in episodes))
    query, qmask = torch.full((n, p), pad, dtype=torch.long), torch.zeros((n, p), dtype=torch.long)
    resp, attn = torch.full((n, r), pad, dtype=torch.long), torch.zeros((n, r), dtype=torch.long)
    loss, logp = torch.zeros((n, r), dtype=torch.long), torch.zeros((n, r), dtype=torch.float32)
    for i, e in enumerate(episodes):
        k, m = len(e.prompt_ids), len(e.ids)
        query[i, p - k:], qmask[i, p - k:] = torch.tensor(e.prompt_ids), 1
        if m:
            resp[i, :m], attn[i, :m] = torch.tensor(e.ids), 1
            loss[i, :m], logp[i, :m] = torch.tensor(e.loss_mask), torch.tensor(e.sampler_logp)
    return EpisodeRollout(
        prompts=[tokenizer.decode(e.prompt_ids, skip_special_tokens=False) for e in episodes],
        responses=[tokenizer.decode(e.ids, skip_special_tokens=True) for e in episodes],
        query_ids=query, query_mask=qmask, response_ids=resp, response_mask=loss,
        ended_with_eos=torch.tensor([not e.truncated for e in episodes]),
        prompt_index=torch.arange(n) // num_samples, num_truncated_prompts=cut_prompts, sampler_logp=logp,
        attention=attn, episodes=episodes)


def episode_stats(episodes: Sequence[Episode]) -> dict[str, float]:
    """Per-batch means: turns, tool calls, tool errors and timeouts per episode, truncated share,
    environment reward, and the share of response tokens that are the policy's."""
    n = max(len(episodes), 1)
    policy = sum(sum(e.loss_mask) for e in episodes)
    total = sum(len(e.ids) for e in episodes)
    return {"episodes/turns_mean": sum(e.turns for e in episodes) / n,
            "episodes/tool_calls_mean": sum(e.tools_used.calls for e in episodes) / n,
            "episodes/tool_errors_mean": sum(e.tools_used.errors for e in episodes) / n,
            "episodes/tool_timeouts_mean": sum(e.tools_used.timeouts for e in episodes) / n,
            "episodes/truncated": sum(e.truncated for e in episodes) / n,
            "episodes/env_reward_mean": sum(e.reward for e in episodes) / n,
            "episodes/policy_token_share": policy / total if total else 0.0}


def transcript(e: Episode) -> str:
    """An episode as readable text: one line per message, tool calls shown as the model wrote them."""
    lines = []
    for m in e.messages:
        text = m.get("content") or ""
        if m.get("tool_calls") and not text:
            text = " ".join(f"{c['function']['name']}({c['function']['arguments']})" for c in m["tool_calls"])
        lines.append(f"[{m['role']}] {text}")
    flags = ", truncated" if e.truncated else ""
    lines.append(f"(turns {e.turns}, tool calls {e.tools_used.calls}, errors {e.tools_used.errors}{flags})")
    return "\n".join(lines)
