"""Best-of-N sampling: N samples per prompt, keep the one a reward model or judge scores highest.

    rlhfkit best-of-n --model runs/sft/final --judge rm:runs/rm/final --n 16 --output_dir runs/bon16
    rlhfkit best-of-n --model runs/sft/final --judge gold --n 4 --prompts prompts.jsonl

Writes `selected.jsonl` (one line per prompt: prompt, the selected response, its score, its
index among the N samples and the mean score of all N) and `results.json`.

KL. Best-of-N has no training, but it moves away from the sampling policy pi all the same.
Two numbers are reported side by side:

* `kl_bound` = log N - (N-1)/N, the analytic value (Stiennon et al. 2020, appendix G.3) used
  as the x-axis by Gao et al. 2022. It is exact only when every sample has a distinct score
  and is an upper bound otherwise (Beirami et al. 2024, "Theoretical guarantees on the
  best-of-n alignment policy").
* `kl_measured`: the KL between best-of-N and pi over the *empirical* score distribution of
  a pool of M samples per prompt (M = `kl_pool`, at least N). Scores are grouped into levels
  (identical responses share a level); with q_k the pool share of level k and F_k its CDF,
  best-of-N draws level k with probability p_k = F_k^N - F_(k-1)^N, and within a level it
  picks like pi does, so KL = sum_k p_k log(p_k / q_k) per prompt, averaged over prompts.
  Duplicate or tied samples (common when pi is peaked) make it fall below the bound; a finite
  pool also biases it low, so `kl_measured_distinct` gives the same estimate as if all M
  scores were distinct: the gap between it and `kl_bound` is the pool's bias, the gap between
  it and `kl_measured` is what ties cost.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Annotated

import numpy as np
import tyro

from rlhfkit.config import require
from rlhfkit.judges import GoldPanel
from rlhfkit.judges.rewards import RewardSet, as_reward, completion_id_lists
from rlhfkit.judges.specs import is_bundled_kindly, load_rewards, rewards_or_default
from rlhfkit.models import load_policy, load_tokenizer
from rlhfkit.models.lora import disable_dropout
from rlhfkit.rollout import generate
from rlhfkit.rollout.prompts import (
    PromptSet,
    as_completions,
    load_prompt_set,
    render_prompt,
    rows_of,
)
from rlhfkit.train.runs import atomic_path, atomic_write_json, prepare_run_dir, seed_everything


@dataclasses.dataclass
class Config:
    model: str = "kindly"
    """Policy to sample from (a saved folder, a hub name, or 'kindly')."""
    tokenizer: str = ""
    """Tokenizer (defaults to the model's own)."""
    dtype: str = "float32"
    """Weights dtype: float32, bfloat16 or float16."""
    reward: Annotated[list[str], tyro.conf.UseAppendAction] = dataclasses.field(default_factory=list)
    """Who picks the best, repeatable: rm:PATH, py:module:fn, math, judge:SPEC, gold, ... (default: gold on the bundled task only)."""
    reward_weights: list[float] = dataclasses.field(default_factory=list)
    """Weight of each --reward in the total (default 1 each)."""
    judge: str = ""
    """Shorthand for one --reward (gold or rm:PATH)."""
    prompts: str = "kindly"
    """Prompts: 'kindly' (the bundled eval prompts), a .txt file, or records with 'prompt' or 'messages' (+ columns for rewards)."""
    max_prompts: int = 0
    """Use only the first this many prompts (0: all)."""
    n: int = 16
    """Samples per prompt to choose from."""
    kl_pool: int = 0
    """Samples per prompt for the measured KL (0: max(n, 64)); the first n of them are the candidates."""
    max_new_tokens: int = 32
    """Longest response in tokens."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    batch_size: int = 64
    """Rows per generation / scoring forward."""
    gold: bool = True
    """Also score the selected and the first sample with the gold panel (bundled task only)."""
    seed: int = 0
    """Sampling seed."""
    output_dir: str = "runs/best_of_n"
    """Folder for selected.jsonl and results.json."""

    def __post_init__(self) -> None:
        require(self.n >= 1, "n", "must be >= 1")
        require(self.kl_pool == 0 or self.kl_pool >= self.n, "kl_pool", f"must be 0 or >= n ({self.n})")

        self.reward = rewards_or_default(self.reward + ([self.judge] if self.judge else []), self.prompts)
        self.judge = ""
        require(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        require(self.temperature > 0, "temperature", "must be > 0")


# ---------------------------------------------------------------------------------------------
# the math


def select_best(scores: np.ndarray) -> np.ndarray:
    """Index of the best of each row of (P, N) scores; the first one on ties. Non-finite scores are refused."""
    scores = np.asarray(scores, dtype=np.float64)
    if not np.isfinite(scores).all():
        raise ValueError(f"{int((~np.isfinite(scores)).sum())} judge score(s) are NaN or infinite; cannot pick a best sample")
    return scores.argmax(axis=1)


def bon_kl_bound(n: int | np.ndarray):
    """log n - (n - 1)/n: the analytic best-of-n KL (Stiennon et al. 2020, appendix G.3)."""
    n = np.asarray(n, dtype=np.float64)
    return np.log(n) - (n - 1.0) / n


def bon_kl_empirical(scores: np.ndarray, n: int, distinct: bool = False, decimals: int = 9) -> np.ndarray:
    """Per-prompt KL(best-of-n || pi) over the empirical distribution of each row of (P, M) scores.

    Levels are scores equal after rounding to `decimals`; `distinct=True` treats all M as
    distinct (the pool-size bias alone). See the module docstring for the formula.
    """
    scores = np.asarray(scores, dtype=np.float64)
    P, M = scores.shape
    out = np.zeros(P)
    for i in range(P):
        if distinct:
            counts = np.ones(M)
        else:
            _, counts = np.unique(np.round(scores[i], decimals), return_counts=True)  # ascending levels
        q = counts / M
        F = np.cumsum(q)
        F[-1] = 1.0
        p = F ** n - np.concatenate([[0.0], F[:-1]]) ** n
        keep = p > 0
        out[i] = float(np.sum(p[keep] * np.log(p[keep] / q[keep])))
    return out


# ---------------------------------------------------------------------------------------------
# sampling and scoring


def sample_and_score(policy, tokenizer, prompts, judge, k: int, cfg) -> tuple[list[list[str]], np.ndarray, dict]:
    """k responses per prompt and their total reward (P, k); also counts of truncated/unfinished samples.

    `prompts` is a PromptSet (conversations through the policy's chat template; extra columns go
    to the rewards) or a list of prompt strings; `judge` a RewardSet or a score(prompts, responses).
    """

    if not isinstance(prompts, PromptSet):
        prompts = PromptSet(list(prompts), {})
    rewards = judge if isinstance(judge, RewardSet) else RewardSet([as_reward(judge, "judge")])
    roll = generate(policy, tokenizer, [render_prompt(tokenizer, p) for p in prompts.prompts], cfg.max_new_tokens,
                    temperature=cfg.temperature, top_p=cfg.top_p, num_samples=k, batch_size=cfg.batch_size,
                    seed=cfg.seed)
    responses = [roll.responses[i * k:(i + 1) * k] for i in range(len(prompts))]
    row_prompts, columns = rows_of(prompts, roll.prompt_index)
    scores = rewards(row_prompts, as_completions(row_prompts, roll.responses), completion_ids=completion_id_lists(roll),
                     **columns).reshape(len(prompts), k)
    stats = {"truncated_prompts": roll.num_truncated_prompts,
             "unfinished_responses": int((~roll.ended_with_eos).sum()),
             "samples": len(roll.responses)}
    return responses, scores, stats


def main(cfg: Config) -> dict:
    seed_everything(cfg.seed)
    out = prepare_run_dir(cfg.output_dir, cfg)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, padding_side="left")
    policy = load_policy(cfg.model, cfg.dtype, trainable=False)
    disable_dropout(policy)
    prompt_set = load_prompt_set(cfg.prompts, "eval", limit=cfg.max_prompts)
    prompts = prompt_set.prompts  # text, or conversations (written as given to selected.jsonl)
    judge = load_rewards(cfg.reward, cfg.reward_weights, batch_size=cfg.batch_size)
    M = cfg.kl_pool or max(cfg.n, 64)
    t0 = time.perf_counter()
    responses, scores, stats = sample_and_score(policy, tokenizer, prompt_set, judge, M, cfg)
    if stats["truncated_prompts"]:
        print(f"best-of-n: {stats['truncated_prompts']} prompts were longer than the model allows and were left-truncated")
    cand = scores[:, :cfg.n]
    best = select_best(cand)
    chosen = [responses[i][j] for i, j in enumerate(best)]
    best_scores = cand[np.arange(len(prompts)), best]
    results = {
        "n": cfg.n, "prompts": len(prompts), "kl_pool": M, "judge": "+".join(cfg.reward),
        "score_selected": float(best_scores.mean()), "score_first_sample": float(cand[:, 0].mean()),
        "score_mean_all": float(cand.mean()),
        "kl_bound": float(bon_kl_bound(cfg.n)),
        "kl_measured": float(bon_kl_empirical(scores, cfg.n).mean()),
        "kl_measured_distinct": float(bon_kl_empirical(scores, cfg.n, distinct=True).mean()),
        "distinct_responses_per_prompt": float(np.mean([len(set(r)) for r in responses])),
        **stats, "seconds": time.perf_counter() - t0,
    }
    gold_sel = gold_first = None
    if cfg.gold and "gold" not in cfg.reward and is_bundled_kindly(cfg.prompts):
        panel = GoldPanel()
        gold_sel = panel.score(prompts, chosen)
        gold_first = panel.score(prompts, [r[0] for r in responses])
        results.update(gold_selected=float(gold_sel.mean()), gold_first_sample=float(gold_first.mean()))
    with atomic_path(out / "selected.jsonl") as tmp, open(tmp, "w") as f:
        for i, p in enumerate(prompts):
            row = {"prompt": p, "response": chosen[i], "score": float(best_scores[i]), "index": int(best[i]),
                   "n": cfg.n, "mean_score": float(cand[i].mean())}
            if gold_sel is not None:
                row["gold"] = float(gold_sel[i])
            f.write(json.dumps(row) + "\n")
    atomic_write_json(out / "results.json", results)
    print(f"best-of-{cfg.n}: score {results['score_first_sample']:.3f} -> {results['score_selected']:.3f}; "
          f"KL bound {results['kl_bound']:.3f}, measured {results['kl_measured']:.3f} "
          f"(pool {M}, distinct-score estimate {results['kl_measured_distinct']:.3f})")
    return results

