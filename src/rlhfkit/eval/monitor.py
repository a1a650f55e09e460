"""What an on-policy run logs each update: rollout statistics, per-reward curves, the share of
groups without learning signal, sample tables, the reward-hacking and collapse alarms, and the
final check against the starting policy with a held-out reward.

The "eval reward" is any reward spec held out from training (the bundled task's gold panel by
default, a held-out verifier, a second reward model); the hacking alarm watches the training
reward rising while the eval reward falls; the collapse alarm watches the rollouts' distinct-1/2
falling and the held-out perplexity rising (mode collapse, capability loss).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlhfkit.eval.metrics import distinct_n, perplexity
from rlhfkit.eval.overopt import DIVERSITY_KEYS, CollapseAlarm, HackingAlarm, describe
from rlhfkit.eval.run_eval import PromptScorer, evaluate, load_corpus
from rlhfkit.judges.specs import load_rewards
from rlhfkit.masked import masked_mean
from rlhfkit.rollout.forward import unwrap
from rlhfkit.rollout.prompts import default_eval_source, load_prompt_set, render_prompt
from rlhfkit.rollout.record import Rollout


def eval_reward_spec(cfg: Any) -> str | None:
    """The held-out reward spec of a run, or None: `eval_reward` if set ('none' = off), else the gold
    panel when training on the bundled task and not already training on it."""
    spec = getattr(cfg, "eval_reward", "")
    if spec == "none":
        return None
    if spec:
        return spec
    if str(cfg.prompts).split(":")[0] == "kindly" and "gold" not in cfg.reward:
        return "gold"
    return None


def load_eval_reward(cfg: Any, device: Any = "cpu"):
    """A RewardSet with the one held-out reward (named after its spec), or None."""
    spec = eval_reward_spec(cfg)
    if spec is None:
        return None

    return load_rewards([spec], device=device, batch_size=cfg.generation_batch_size)


def rollout_stats(rollout: Rollout, scores: torch.Tensor, kl_per_token: torch.Tensor, logp: torch.Tensor,
                  eval_scores: np.ndarray | None) -> dict[str, float]:
    """Per-update metrics of a rollout batch (before training on it). `reward` is the training total."""

    mask = rollout.response_mask.to(kl_per_token.device)
    out = {
        "reward": scores.mean().item(),
        "reward_std": scores.std(unbiased=False).item() if len(scores) > 1 else 0.0,
        "kl": (kl_per_token * mask).sum(-1).mean().item(),
        "response_length": rollout.response_lengths.float().mean().item(),
        "eos_rate": rollout.ended_with_eos.float().mean().item(),
        "rollout_neg_logp": -masked_mean(logp, mask).item(),
    }
    out["proxy_reward"] = out["reward"]  # the name reports and the over-optimisation tools read
    # the batch's diversity, which the collapse alarm watches (mode collapse shows here first)
    out.update(distinct_1=distinct_n(rollout.responses, 1), distinct_2=distinct_n(rollout.responses, 2))
    if eval_scores is not None:
        out["eval_reward"] = float(np.mean(eval_scores))
        out["gold_reward"] = out["eval_reward"]
        out["gold_proxy_gap"] = out["reward"] - out["eval_reward"]
    return out


@dataclasses.dataclass
class Alarms:
    """An on-policy run's alarms: reward hacking (proxy up, eval reward down) and collapse
    (diversity down, held-out perplexity up); either may be off (None)."""

    hacking: HackingAlarm | None
    collapse: CollapseAlarm | None
    perplexity_lines: list[str]
    perplexity_every: int
    measured: dict = dataclasses.field(default_factory=dict)  # taken at an update's start, fed with its metrics


def perplexity_source(cfg: Any) -> str:
    """The held-out text the collapse alarm measures perplexity on ('' = none)."""
    if cfg.perplexity_data != "auto":
        return cfg.perplexity_data
    return "kindly" if str(cfg.prompts).partition(":")[0] == "kindly" else ""


def make_hacking_alarm(cfg: Any, output_dir: str | Path, is_main: bool = True) -> Alarms:
    """The alarms of `rlhfkit.eval.overopt` for an on-policy run (`hacking_window` 0 turns both off).

    Events go to `alarms.jsonl` in the run folder, where `rlhfkit report` shows them.
    """

    if cfg.hacking_window <= 0:
        return Alarms(None, None, [], 0)
    log = Path(output_dir) / "alarms.jsonl" if is_main else None
    lines = load_corpus(perplexity_source(cfg), 64) if cfg.perplexity_every > 0 else []
    return Alarms(HackingAlarm(window=cfg.hacking_window, stop=cfg.stop_on_hacking, log_path=log),
                  CollapseAlarm(window=max(1, cfg.hacking_window // 2), stop=cfg.stop_on_hacking, log_path=log),
                  lines, cfg.perplexity_every)


@torch.no_grad()
def measure_perplexity(alarms: Alarms, policy, tokenizer, step: int) -> None:
    """Held-out perplexity of the policy at the start of every `perplexity_every`-th update (update
    0 included: the starting policy's, the alarm's baseline), logged with that update's metrics as
    `heldout_perplexity`: the collapse alarm's capability check."""
    if not alarms.perplexity_lines or step % alarms.perplexity_every != 0:
        return

    model = unwrap(policy)
    was_training = model.training
    model.eval()
    alarms.measured["heldout_perplexity"] = perplexity(model, tokenizer, alarms.perplexity_lines)["perplexity"]
    model.train(was_training)


def check_hacking(alarms: Alarms, metrics: dict, step: int, accelerator) -> bool:
    """Feed one update's metrics to the alarms; True when the run should stop.

    The alarms' slopes and ratios are added to `metrics`. Every process sees the same
    (process-averaged) metrics, so all stop together.
    """
    events = []
    metrics.update(alarms.measured)
    alarms.measured.clear()
    if alarms.hacking is not None and "eval_reward" in metrics:
        event = alarms.hacking.update(step, metrics["reward"], metrics["eval_reward"])
        metrics.update({f"hacking_{k}": v for k, v in alarms.hacking.last.items()})
        if event is not None:
            metrics["hacking_alarm"] = 1.0
            events.append(event)
    if alarms.collapse is not None:
        observed = {k: metrics[k] for k in DIVERSITY_KEYS if k in metrics}
        if "heldout_perplexity" in metrics:
            observed["perplexity"] = metrics["heldout_perplexity"]
        new = alarms.collapse.update(step, **observed)
        metrics.update({f"collapse_{k}": v for k, v in alarms.collapse.last.items()})
        if new:
            metrics["collapse_alarm"] = 1.0
            events.extend(new)
    stop = any(a is not None and a.should_stop for a in (alarms.hacking, alarms.collapse))
    for event in events:
        accelerator.print("warning: " + describe(event) + (" - stopping" if stop else ""))
    return stop


class _UnderContext(torch.nn.Module):
    """A model whose every forward runs inside `ctx()`: the reference of a LoRA policy (adapters off)."""

    def __init__(self, model: torch.nn.Module, ctx: Callable[[], Any]):
        super().__init__()
        self.model, self._ctx = model, ctx

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self._ctx():
            return self.model(*args, **kwargs)


@torch.no_grad()
def evaluate_against_reference(policy, reference, tokenizer, prompts: Sequence[Any], columns: dict, eval_reward,
                               train_reward, cfg: Any, ref_ctx: Callable[[], Any] | None = None,
                               seed: int = 12345, n_boot: int = 200) -> dict[str, float]:
    """Held-out check of a finished run through the one evaluator (`rlhfkit.eval.run_eval.evaluate`):
    win rate of the policy over the reference by the eval reward (ties half), both rewards for both
    models, and the mean summed per-response KL(policy || reference), flattened to means."""

    prompts = list(prompts)
    ref = _UnderContext(unwrap(reference), ref_ctx) if ref_ctx is not None else unwrap(reference)
    m, _ = evaluate(unwrap(policy), ref, tokenizer, [render_prompt(tokenizer, p) for p in prompts],
                    PromptScorer(eval_reward, prompts, columns), PromptScorer(train_reward, prompts, columns), (),
                    cfg.max_completion_length, cfg.temperature, cfg.top_p, cfg.generation_batch_size, seed, n_boot)
    out = {"eval_win_rate": m["win_rate"]["mean"], "kl": m["kl"]["mean"], "eval_reward": m["gold"]["mean"],
           "eval_reward_reference": m["gold_reference"]["mean"], "reward": m["proxy"]["mean"],
           "reward_reference": m["proxy_reference"]["mean"], "response_length_words": m["mean_length"],
           "eval_win_rate_lo": m["win_rate"]["lo"], "eval_win_rate_hi": m["win_rate"]["hi"]}
    # the names reports of the bundled task read
    if "gold_gain_split" in m:  # the bundled panel: the gain's sentiment and quality parts (eval.metrics)
        split = m["gold_gain_split"]
        for key, name in (("gain", "gold_gain"), ("sentiment_term", "gold_gain_sentiment"),
                          ("quality_term", "gold_gain_quality"), ("sentiment_share", "gold_gain_sentiment_share")):
            out.update({name: split[key]["mean"], f"{name}_lo": split[key]["lo"], f"{name}_hi": split[key]["hi"]})
        out.update(q1_share=split["q1_share"]["policy"]["mean"],
                   q1_share_reference=split["q1_share"]["reference"]["mean"])
    out.update(gold_win_rate=out["eval_win_rate"], gold_reward=out["eval_reward"],
               gold_reward_reference=out["eval_reward_reference"], proxy_reward=out["reward"],
               proxy_reward_reference=out["reward_reference"])
    return out


def final_check(name: str, cfg: Any, accelerator, policy, reference, tokenizer, eval_reward, train_reward,
                ref_ctx: Callable[[], Any] | None, sharded: bool) -> dict[str, float] | None:
    """The end-of-run held-out check of an on-policy recipe (None without an eval reward or prompts):
    :func:`evaluate_against_reference` on `cfg.eval_prompts` ("auto": the eval split of the training
    prompts), printed. A sharded policy's forwards are collectives, so every process then runs it."""

    source = default_eval_source(cfg.prompts) if cfg.eval_prompts == "auto" else cfg.eval_prompts
    if eval_reward is None or not source or not (accelerator.is_main_process or sharded):
        return None
    held_out = load_prompt_set(source, "eval", limit=cfg.num_eval_prompts)
    out = evaluate_against_reference(policy, reference, tokenizer, held_out.prompts, held_out.columns, eval_reward,
                                     train_reward, cfg, ref_ctx)
    accelerator.print(f"{name}: held-out evaluation " + ", ".join(f"{k}={v:.4g}" for k, v in out.items()))
    return out
