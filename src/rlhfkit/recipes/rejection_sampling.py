"""Rejection sampling / expert iteration: sample K per prompt, keep the best, fine-tune on them, repeat.

    rlhfkit rejection-sampling --model runs/sft/final --judge rm:runs/rm/final --rounds 3 --k 8

Each round r (Anthony et al. 2017, "Thinking Fast and Slow with Deep Learning and Tree
Search"; Touvron et al. 2023, Llama 2, sec. 3.2.3 "Rejection Sampling"):

1. the current policy samples `k` responses for each of `prompts_per_round` training prompts;
2. the judge (a reward model, or the gold panel) scores them; the top `keep` per prompt are
   kept (and only those scoring at least `min_score`, when set);
3. the policy is fine-tuned on the kept (prompt, response) pairs with the SFT loss (the same
   loop as `rlhfkit sft`), starting from the previous round's weights.

Per-round metrics (metrics.jsonl, `round` = r): mean judge score of all samples (the policy's
quality before this round's update), mean score of the kept ones, gold panel means when the
judge is not the gold panel, share of distinct responses, and the SFT loss. Every round's
model is saved in `round-r/final`; a re-run with `--resume` skips finished rounds.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated

import numpy as np
import tyro

from rlhfkit.config import ModelArgs, TrainArgs, require
from rlhfkit.judges import GoldPanel
from rlhfkit.judges.rewards import completion_id_lists
from rlhfkit.judges.specs import is_bundled_kindly, load_rewards, rewards_or_default
from rlhfkit.models import load_policy, load_tokenizer
from rlhfkit.models.lora import disable_dropout
from rlhfkit.recipes.sft import train_causal_lm
from rlhfkit.rollout import generate
from rlhfkit.rollout.prompts import as_completions, load_prompt_set, render_prompt, rows_of
from rlhfkit.train.accelerator import make_accelerator
from rlhfkit.train.runs import (
    MetricsLogger,
    atomic_path,
    atomic_write_json,
    one_run_per_folder,
    prepare_run_dir,
)


@dataclasses.dataclass
class Config(ModelArgs, TrainArgs):
    reward: Annotated[list[str], tyro.conf.UseAppendAction] = dataclasses.field(default_factory=list)
    """Who scores samples, repeatable: rm:PATH, py:module:fn, math, judge:SPEC, gold, ... (default: gold on the bundled task only)."""
    reward_weights: list[float] = dataclasses.field(default_factory=list)
    """Weight of each --reward in the total (default 1 each)."""
    judge: str = ""
    """Shorthand for one --reward (gold or rm:PATH)."""
    prompts: str = "kindly"
    """Training prompts: 'kindly' (bundled train prompts), a .txt file, or records with 'prompt' or 'messages' (+ columns for rewards)."""
    rounds: int = 3
    """Rounds R of sample -> select -> fine-tune."""
    k: int = 8
    """Samples per prompt each round."""
    keep: int = 1
    """Best samples kept per prompt."""
    min_score: float = float("-inf")
    """Keep a sample only if its judge score is at least this (default: no threshold)."""
    prompts_per_round: int = 256
    """Prompts sampled each round (drawn without replacement, a different slice each round)."""
    max_new_tokens: int = 32
    """Longest sampled response in tokens."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    generation_batch_size: int = 64
    """Rows per generation forward."""
    gold: bool = True
    """Also score samples with the gold panel when it is not the reward (bundled task only)."""

    def __post_init__(self) -> None:
        self._check_train_args()
        require(self.rounds >= 1, "rounds", "must be >= 1")
        require(self.k >= 1, "k", "must be >= 1")
        require(1 <= self.keep <= self.k, "keep", f"must be between 1 and k ({self.k})")
        require(self.prompts_per_round >= 1, "prompts_per_round", "must be >= 1")

        self.reward = rewards_or_default(self.reward + ([self.judge] if self.judge else []), self.prompts)
        self.judge = ""
        if not self.model:
            self.model = "kindly"


def select_top(scores: np.ndarray, keep: int, min_score: float = float("-inf")) -> list[tuple[int, int]]:
    """(prompt, sample) indices of the `keep` best samples of each row of (P, K) scores at or above `min_score`.

    Ties go to the earlier sample. Non-finite scores are an error, never silently skipped.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if not np.isfinite(scores).all():
        raise ValueError(f"{int((~np.isfinite(scores)).sum())} judge score(s) are NaN or infinite")
    order = np.argsort(-scores, axis=1, kind="stable")[:, :keep]
    return [(i, int(j)) for i in range(scores.shape[0]) for j in order[i] if scores[i, j] >= min_score]


def round_indices(n: int, r: int, per_round: int, seed: int) -> list[int]:
    """A different slice of a fixed shuffle each round (wrapping around when prompts run out)."""
    order = np.random.default_rng(seed).permutation(n)
    start = (r * per_round) % n
    return [int(order[(start + i) % n]) for i in range(min(per_round, n))]


def round_prompts(prompts: list[str], r: int, per_round: int, seed: int) -> list[str]:
    """The prompts of round `r` (see :func:`round_indices`)."""
    return [prompts[i] for i in round_indices(len(prompts), r, per_round, seed)]


def examples_from_rollout(roll, picks: list[tuple[int, int]], k: int, pad_id: int) -> list[dict]:
    """SFT examples from the sampled token ids themselves (no re-tokenisation), prompt masked.

    A response cut by max_new_tokens keeps no EOS, so the policy is not taught to stop there.
    """
    out = []
    for i, j in picks:
        row = i * k + j
        q = roll.query_ids[row][roll.query_mask[row].bool()].tolist()
        r = roll.response_ids[row][roll.response_mask[row].bool()].tolist()
        out.append({"input_ids": q + r, "labels": [-100] * len(q) + r, "attention_mask": [1] * (len(q) + len(r))})
    return out


@one_run_per_folder
def main(cfg: Config) -> dict:
    accelerator = make_accelerator(cfg)
    out = prepare_run_dir(cfg.output_dir, cfg, accelerator.is_main_process)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
    prompt_set = load_prompt_set(cfg.prompts, "train")
    judge = load_rewards(cfg.reward, cfg.reward_weights, accelerator.device, cfg.generation_batch_size)
    panel = None
    if cfg.gold and "gold" not in cfg.reward and is_bundled_kindly(cfg.prompts):
        panel = GoldPanel()
    logger = MetricsLogger(out, cfg.report_to, enabled=accelerator.is_main_process)
    current = cfg.model
    history = []
    for r in range(cfg.rounds):
        round_dir = out / f"round-{r}"
        done = round_dir / "round.json"
        if cfg.resume and done.is_file() and (round_dir / "final" / "config.json").is_file():
            history.append(json.loads(done.read_text()))
            current = str(round_dir / "final")
            print(f"rejection-sampling: round {r} already finished, continuing from {current}")
            continue
        policy = load_policy(current, cfg.dtype, lora=cfg)  # LoRA: fresh adapters on the merged previous round
        disable_dropout(policy)
        batch = prompt_set.select(round_indices(len(prompt_set), r, cfg.prompts_per_round, cfg.seed))
        roll = generate(policy, tokenizer, [render_prompt(tokenizer, p) for p in batch.prompts], cfg.max_new_tokens,
                        temperature=cfg.temperature, top_p=cfg.top_p, num_samples=cfg.k,
                        batch_size=cfg.generation_batch_size, seed=cfg.seed + r)
        row_prompts, columns = rows_of(batch, roll.prompt_index)
        scores = judge(row_prompts, as_completions(row_prompts, roll.responses), completion_ids=completion_id_lists(roll),
                       **columns).reshape(len(batch), cfg.k)
        picks = select_top(scores, cfg.keep, cfg.min_score)
        if not picks:
            raise ValueError(f"round {r}: no sample reached min_score={cfg.min_score}; lower it")
        metrics = {"round": r, "score_mean": float(scores.mean()),
                   "score_kept": float(np.mean([scores[i, j] for i, j in picks])),
                   "kept": len(picks), "dropped_below_min_score": len(batch) * cfg.keep - len(picks),
                   "distinct_share": len(set(roll.responses)) / len(roll.responses),
                   "unfinished_share": float((~roll.ended_with_eos).float().mean())}
        if panel is not None:
            gold = panel.score(roll.prompts, roll.responses).reshape(scores.shape)
            metrics.update(gold_mean=float(gold.mean()), gold_kept=float(np.mean([gold[i, j] for i, j in picks])))
        examples = examples_from_rollout(roll, picks, cfg.k, tokenizer.pad_token_id)
        round_cfg = dataclasses.replace(cfg, output_dir=str(round_dir), resume=False, max_steps=cfg.max_steps)
        sft = train_causal_lm(round_cfg, policy, tokenizer, examples, [], accelerator, round_dir)
        metrics.update(sft_loss=sft.get("loss"), sft_steps=sft.get("steps"))
        logger.log(metrics, r)
        if accelerator.is_main_process:
            atomic_write_json(done, metrics)
            _write_samples(round_dir / "kept.jsonl", roll, picks, scores, cfg.k)
        print(f"rejection-sampling round {r}: score {metrics['score_mean']:.3f} (kept {metrics['score_kept']:.3f})"
              + (f", gold {metrics['gold_mean']:.3f}" if "gold_mean" in metrics else ""))
        history.append(metrics)
        current = str(round_dir / "final")
    logger.close()
    result = {"rounds": history, "final_model": current}
    if accelerator.is_main_process:
        atomic_write_json(out / "results.json", result)
    return result


def _write_samples(path: Path, roll, picks, scores, k: int) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        for i, j in picks:
            f.write(json.dumps({"prompt": roll.prompts[i * k + j], "response": roll.responses[i * k + j],
                                "score": float(scores[i, j])}) + "\n")
