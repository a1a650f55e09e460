"""Multi-turn episodes in the on-policy recipes: the config piece, loading environments and tools,
and one round of scored episodes (what GRPO's and PPO's `collect` train on).

With `--environment` or `--tools`, a rollout row is a whole episode (rlhfkit.rollout.episodes):
its sampled ids plus the environment's, the loss on the sampled ones only. Rewards: the
`--reward` specs score each episode with TRL's arguments for tool-using rollouts
(`completions` = the messages after the prompt, `environments` = the episode's environment
objects), and the environment's own reward (per-turn rewards summed, a TRL environment's
`get_reward()`) is added as the reward named `environment`, weight 1.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import sys
import typing
from pathlib import Path
from typing import Any

import numpy as np
import tyro

from rlhfkit.config import require
from rlhfkit.envs import make_factory, sandbox
from rlhfkit.envs.parsing import PARSERS
from rlhfkit.errors import ConfigError
from rlhfkit.judges.rewards import RewardScores, completion_id_lists
from rlhfkit.recipes.group_sampling import Round
from rlhfkit.rollout.episodes import EpisodeRollout, Limits, episode_stats, run_episodes, transcript
from rlhfkit.rollout.forward import unwrap
from rlhfkit.rollout.prompts import load_prompt_set, rollout_seed, rows_of

BUILTIN_TOOLS = {"python": sandbox.python}
ENVIRONMENT_ONLY = "py:rlhfkit.recipes.agentic:reward_from_environment"


def reward_from_environment(prompts, completions, **kwargs) -> list[None]:
    """Abstains on every episode: with `--environment` and no `--reward`, the environment's reward is the only one."""
    return [None] * len(completions)


@dataclasses.dataclass
class EpisodeArgs:
    environment: str = ""
    """Multi-turn episodes against an environment: a bundled task ('calc'), py:module:Factory or py:file.py:Factory (rlhfkit's reset/step protocol, or a TRL environment_factory class, unchanged); docs/agents.md."""
    tools: typing.Annotated[list[str], tyro.conf.UseAppendAction] = dataclasses.field(default_factory=list)
    """Tools the policy may call, repeatable: py:module:function, py:file.py:function, or python (the sandboxed code tool)."""
    max_turns: int = 4
    """Policy turns per episode at most (environment answers in between)."""
    max_turn_tokens: int = 0
    """Tokens one policy turn may sample (0 = max_completion_length, which bounds the whole episode after the prompt)."""
    tool_timeout: float = 10.0
    """Seconds a tool call may take; a timeout is answered to the model as an error."""
    tool_format: str = "auto"
    """Tool-call format: auto (read from the chat template), hermes, llama3 or mistral."""

    @property
    def multi_turn(self) -> bool:
        return bool(self.environment or self.tools)

    def _check_episode_args(self) -> None:
        require(self.max_turns >= 1, "max_turns", "must be >= 1")
        require(self.max_turn_tokens >= 0, "max_turn_tokens", "must be >= 0 (0 = max_completion_length)")
        require(self.tool_timeout > 0, "tool_timeout", "must be > 0 seconds")
        require(self.tool_format == "auto" or self.tool_format in PARSERS, "tool_format",
                f"must be auto or one of {sorted(PARSERS)}")
        if self.environment and not getattr(self, "reward", True) and not getattr(self, "reward_model", ""):
            # the environment owns the reward (TRL's get_reward): the specs' place is held by one that abstains
            self.reward = [ENVIRONMENT_ONLY]
        if self.multi_turn:
            require(not getattr(self, "dynamic_sampling", False), "dynamic_sampling",
                    "dynamic sampling is not supported with multi-turn episodes yet; turn one of them off")
            require(not getattr(self, "async_rollouts", False), "async_rollouts",
                    "async rollout workers do not run episodes yet; turn off async_rollouts")


def load_object(spec: str, field: str) -> Any:
    """A Python object from py:module:name or py:path/to/file.py:name."""
    target = spec[3:] if spec.startswith("py:") else spec
    module_part, _, name = target.rpartition(":")
    if not module_part or not name:
        raise ConfigError(f"config field '{field}': {spec!r}: write py:module:name or py:path/to/file.py:name")
    if module_part.endswith(".py") or "/" in module_part:
        path = Path(module_part)
        if not path.is_file():
            raise ConfigError(f"config field '{field}': file {path} does not exist")
        mod_spec = importlib.util.spec_from_file_location(f"rlhfkit_{field}_{path.stem}", path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_part)
        except ImportError as e:
            raise ConfigError(f"config field '{field}': cannot import {module_part!r} ({e})") from e
    if not hasattr(module, name):
        raise ConfigError(f"config field '{field}': {module_part} has no {name!r}")
    return getattr(module, name)


def load_tools(specs: list[str]) -> list:
    return [BUILTIN_TOOLS[s] if s in BUILTIN_TOOLS else load_object(s, "tools") for s in specs]


def load_factory(cfg, environment: Any = None, tools: list | None = None):
    """The per-episode environment factory of a run: `environment` / `tools` given from Python
    win over the `--environment` / `--tools` specs. A bundled task name reads that task module's
    `environment` (a factory) or `tools` (a list)."""
    tools = list(tools) if tools is not None else load_tools(cfg.tools)
    if environment is None and callable(cfg.environment):  # a class or factory set from Python
        environment = cfg.environment
    elif environment is None and cfg.environment:
        if cfg.environment.startswith("py:") or ":" in cfg.environment:
            environment = load_object(cfg.environment, "environment")
        else:
            try:
                task = importlib.import_module(f"rlhfkit.tasks.{cfg.environment}")
            except ImportError as e:
                raise ConfigError(f"config field 'environment': no bundled task {cfg.environment!r} ({e})") from e
            environment = getattr(task, "environment", None)
            tools = tools or list(getattr(task, "tools", []))
    return make_factory(environment, tools, cfg.tool_timeout)


def limits_of(cfg) -> Limits:
    total = getattr(cfg, "max_completion_length", None) or cfg.max_new_tokens  # `sample` calls it max_new_tokens
    return Limits(cfg.max_turns, cfg.max_turn_tokens or total, total)


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


def with_environment_reward(scored: RewardScores, roll: EpisodeRollout) -> RewardScores:
    """`scored` plus the episodes' environment rewards as the reward 'environment' (weight 1), the
    episode counts as `log_metric` scalars and each transcript as a `log_extra` column."""
    env = [e.reward for e in roll.episodes]
    values = {**scored.values, "environment": env}
    metrics = {**scored.metrics, **{k: [v] for k, v in episode_stats(roll.episodes).items()}}
    extra = {**scored.extra, "transcript": [transcript(e) for e in roll.episodes]}
    return RewardScores([*scored.names, "environment"], values, scored.total + np.asarray(env), extra, metrics)


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
