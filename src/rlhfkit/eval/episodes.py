"""`rlhfkit eval --environment E` / `--tools T`: the policy and its reference each play one
episode per prompt, with the same environment, tools and limits they were trained with
(rlhfkit.rollout.episodes), and are compared on what the episodes earned.

* **gold** is each episode's score by the `--judge` specs, called with TRL's arguments for
  tool-using rollouts (`completions` = the messages after the prompt, plus the prompt columns
  and `environments`), plus the environment's own reward (weight 1), as GRPO scores episodes.
  With `--environment` and no `--judge`, the environment's reward is the score. On a verifier
  that gives 1 or 0, gold is the accuracy.
* **win rate** against the reference (ties half), the paired gold difference, and the
  episodes' counts for both sides: turns, tool calls, tool errors and timeouts, the share
  truncated by a limit, each a mean with a 95 % bootstrap interval.
* **kl**: the summed log-ratio over the tokens the policy sampled (environment and tool tokens
  are read, not scored), from the policy's own episodes.

`samples.jsonl` keeps one line per prompt with both transcripts.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rlhfkit.errors import RlhfkitError
from rlhfkit.eval import metrics as M
from rlhfkit.judges.rewards import completion_id_lists, with_environment_reward
from rlhfkit.rollout.episode_args import ENVIRONMENT_ONLY, limits_of, load_factory
from rlhfkit.rollout.episodes import EpisodeRollout, run_episodes, transcript

COUNTS = {"turns": lambda e: e.turns, "tool_calls": lambda e: e.tools_used.calls,
          "tool_errors": lambda e: e.tools_used.errors, "tool_timeouts": lambda e: e.tools_used.timeouts,
          "truncated": lambda e: float(e.truncated)}


def play(cfg: Any, model: Any, tokenizer: Any, prompt_set: Any, seed: int) -> EpisodeRollout:
    """One episode per prompt of `prompt_set` by `model` (its columns reach the environment's reset)."""
    rows = [{"prompt": p, **{k: v[i] for k, v in prompt_set.columns.items()}} for i, p in enumerate(prompt_set.prompts)]
    return run_episodes(model, tokenizer, rows, load_factory(cfg), 1, limits_of(cfg), cfg.temperature, cfg.top_p,
                        seed=seed, batch_size=cfg.batch_size, tool_format=cfg.tool_format)


def episode_scores(rewards: Any, prompt_set: Any, roll: EpisodeRollout, judges: list[str]) -> np.ndarray:
    """Each episode's total: the judges' weighted scores plus the environment's reward. A judge
    abstaining on an episode is an error (an evaluation's mean must not drop items)."""
    scored = rewards.score(prompt_set.prompts, roll.completions(), completion_ids=completion_id_lists(roll),
                           environments=[getattr(e.env, "instance", e.env) for e in roll.episodes],
                           **prompt_set.columns)
    if judges != [ENVIRONMENT_ONLY]:
        for name, values in scored.values.items():
            missing = sum(v is None for v in values)
            if missing:
                raise RlhfkitError(f"judge '{name}' abstained on {missing} of {len(values)} episodes; an evaluation "
                                   "needs a score for every episode")
    return with_environment_reward(scored, roll).total


def episode_counts(roll: EpisodeRollout, n_boot: int, seed: int) -> dict:
    """Turns, tool calls, errors, timeouts and truncations per episode: means with intervals."""
    return {k: M.bootstrap_ci([float(f(e)) for e in roll.episodes], n_boot=n_boot, seed=seed) for k, f in COUNTS.items()}


def evaluate_episodes(cfg: Any, policy: Any, reference: Any, tokenizer: Any, prompt_set: Any, rewards: Any
                      ) -> tuple[dict, list[dict]]:
    """(metrics, sample rows) of the policy's episodes against the reference's (module docstring)."""
    pol = play(cfg, policy, tokenizer, prompt_set, cfg.seed)
    ref = play(cfg, reference, tokenizer, prompt_set, cfg.seed + 1)
    gold, gold_ref = (episode_scores(rewards, prompt_set, r, list(cfg.judge)) for r in (pol, ref))
    labels = M.preference_labels(gold, gold_ref, cfg.tie_margin)
    n_boot, seed = cfg.n_boot, cfg.seed
    out: dict[str, Any] = {
        "gold": M.bootstrap_ci(gold, n_boot=n_boot, seed=seed),
        "gold_reference": M.bootstrap_ci(gold_ref, n_boot=n_boot, seed=seed),
        "win_rate": M.win_rate(labels, n_boot=n_boot, seed=seed),
        "gold_difference": M.bootstrap_ci(gold - gold_ref, n_boot=n_boot, seed=seed),
        "episodes": {"policy": episode_counts(pol, n_boot, seed), "reference": episode_counts(ref, n_boot, seed)},
        "n_prompts": len(prompt_set.prompts),
    }
    pad = tokenizer.pad_token_id
    lp, lr = (M.query_response_logprobs(m, pol.query_ids, pol.response_ids, pol.response_mask, pad_token_id=pad,
                                        batch_size=cfg.batch_size, temperature=cfg.temperature,
                                        attention=pol.attention) for m in (policy, reference))
    kl = M.kl_from_logprobs(lp, lr, pol.response_mask)["per_response"]
    out["kl"] = M.bootstrap_ci(kl, n_boot=n_boot, seed=seed)
    rows = [{"prompt": p, "transcript": transcript(e), "reference_transcript": transcript(er), "gold": float(g),
             "gold_reference": float(gr), "label": float(lab), "kl": float(k), "turns": e.turns,
             "tool_calls": e.tools_used.calls, "tool_errors": e.tools_used.errors, "truncated": e.truncated}
            for p, e, er, g, gr, lab, k in zip(prompt_set.prompts, pol.episodes, ref.episodes, gold, gold_ref, labels, kl)]
    return out, rows
