"""Multi-turn episodes in the on-policy recipes: one round of scored episodes (what GRPO's and
PPO's `collect` train on) and `sample`'s episode lines. The options and loaders live in
rlhfkit.rollout.episode_args (eval runs episodes too).

With `--environment` or `--tools`, a rollout row is a whole episode (rlhfkit.rollout.episodes):
its sampled ids plus the environment's, the loss on the sampled ones only. Rewards: the
`--reward` specs score each episode with TRL's arguments for tool-using rollouts
(`completions` = the messages after the prompt, `environments` = the episode's environment
objects), and the environment's own reward (per-turn rewards summed, a TRL environment's
`get_reward()`) is added as the reward named `environment`, weight 1.
"""

from __future__ import annotations

from rlhfkit.judges.rewards import completion_id_lists, with_environment_reward
from rlhfkit.recipes.group_sampling import Round
from rlhfkit.rollout.episode_args import (
    limits_of,
    load_factory,
    reward_from_environment,  # noqa: F401 -- run configs saved earlier name it here
)
from rlhfkit.rollout.episodes import run_episodes, transcript
from rlhfkit.rollout.forward import unwrap
from rlhfkit.rollout.prompts import load_prompt_set, rollout_seed, rows_of


def sample_rows(cfg, model, tokenizer) -> list[dict]:
    """`rlhfkit sample` with --environment / --tools: num_samples episodes per prompt, one output line
    each: the prompt, the episode's messages after it, its transcript, turns, tool calls and reward."""
    prompts = load_prompt_set(cfg.prompts, "eval", cfg.max_prompts)
    rows = [{"prompt": p, **{k: v[i] for k, v in prompts.columns.items()}} for i, p in enumerate(prompts.prompts)]
    roll = run_episodes(model, tokenizer, rows, load_factory(cfg), cfg.num_samples, limits_of(cfg), cfg.temperature,
                        cfg.top_p, seed=cfg.seed, batch_size=cfg.batch_size, max_prompt_length=cfg.max_prompt_length,
                        tool_format=cfg.tool_format)
    return [{"prompt": prompts.prompts[int(i)], "messages": m, "transcript": transcript(e), "turns": e.turns,
             "tool_calls": e.tools_used.calls, "tool_errors": e.tools_used.errors, "truncated": e.truncated,
             "env_reward": e.reward}
            for i, m, e in zip(roll.prompt_index, roll.completions(), roll.episodes)]


def sample_episodes(policy, tok, rewards, eval_reward, prompts, cfg, step, accelerator, factory,
                    trainer_state=None, round_: int = 0, num_samples: int | None = None) -> Round:
    """One round of `num_samples` (default num_generations) episodes per prompt, scored: the multi-turn
    counterpart of GRPO's sample_round."""
    rows = [{"prompt": p, **{k: v[i] for k, v in prompts.columns.items()}} for i, p in enumerate(prompts.prompts)]
    roll = run_episodes(unwrap(policy), tok, rows, factory, num_samples or cfg.num_generations, limits_of(cfg),
                        cfg.temperature, cfg.top_p, cfg.top_k,
                        seed=rollout_seed(cfg.seed + 7919 * round_, step, accelerator.process_index),
                        batch_size=cfg.generation_batch_size, max_prompt_length=cfg.max_prompt_length,
                        tool_format=cfg.tool_format)
    row_prompts, columns = rows_of(prompts, roll.prompt_index)
    completions = roll.completions()
    environments = [getattr(e.env, "instance", e.env) for e in roll.episodes]
    scored = rewards.score(row_prompts, completions, completion_ids=completion_id_lists(roll),
                           trainer_state=trainer_state, environments=environments, **columns)
    eval_scores = eval_reward(row_prompts, completions, **columns) if eval_reward is not None else None
    scored = with_environment_reward(scored, roll)
    rewards.last_extra = scored.extra  # the samples table shows each episode's transcript
    return Round(roll, row_prompts, columns, completions, scored, eval_scores)
