"""`rlhfkit eval`: did the policy get better for the humans, or only for the reward model?

Samples one response per prompt from the policy and from the reference (by default the
model the policy was trained from, read from its run folder's config.yaml), then reports:

* gold reward (the held-out panel or another judge) and proxy reward (a reward model), with
  95% bootstrap intervals, for the policy and the reference;
* KL(policy || reference) from the policy's own samples (summed per-token log-ratio);
* win rate against the reference by the judge (ties half) and the length-controlled win rate
  (Dubois et al. 2024);
* diversity: distinct-1/2 and self-BLEU over words, EAD over the tokenizer's tokens;
* held-out perplexity on the corpus's eval split, policy and reference (the alignment tax);
* reward-model accuracy on preference data, when given.

With `--environment` / `--tools` both models play multi-turn episodes instead, scored by the
judges and the environment (rlhfkit.eval.episodes; docs/agents.md).

Writes `results.json` (the metrics, as every recipe's final metrics) and `samples.jsonl` into
`output_dir`; runs of earlier versions wrote `eval.json`, which the report still reads.

    rlhfkit eval --model runs/ppo/final --reward_model runs/rm/final --output_dir runs/eval/ppo
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import tyro
import yaml

from rlhfkit.config import require
from rlhfkit.data import load_records
from rlhfkit.data.preference import read_comparisons
from rlhfkit.errors import ConfigError, DataError, RlhfkitError
from rlhfkit.eval import human, scorecard
from rlhfkit.eval import metrics as M
from rlhfkit.eval.attacks import VADER_NEGATIVE
from rlhfkit.eval.episodes import evaluate_episodes
from rlhfkit.judges.panel import GoldPanel
from rlhfkit.judges.specs import is_bundled_kindly, load_rewards, rewards_or_default
from rlhfkit.losses.reward import preference_verdicts
from rlhfkit.models import load_policy, load_tokenizer
from rlhfkit.rollout import generate
from rlhfkit.rollout.episode_args import ENVIRONMENT_ONLY, EpisodeArgs
from rlhfkit.rollout.prompts import as_completions, load_prompt_set, render_prompt
from rlhfkit.tasks import kindly
from rlhfkit.train.runs import (
    atomic_write_json,
    atomic_write_text,
    prepare_run_dir,
    seed_everything,
)


@dataclasses.dataclass
class Config(EpisodeArgs):
    model: str = ""
    """Policy to evaluate: a saved model folder (or 'kindly' for the bundled base; from Python also a loaded model)."""
    reference: str = ""
    """Reference policy (default: the `model` field of the policy run's config.yaml, i.e. the model it started from)."""
    tokenizer: str = ""
    """Tokenizer (default: the policy's own)."""
    prompts: str = ""
    """Prompts (required): 'kindly' for the bundled eval prompts, a .txt file, or records with 'prompt' or 'messages' (+ columns for rewards)."""
    num_prompts: int = 0
    """Evaluate on the first N prompts only (0: all)."""
    reward_model: str = ""
    """Proxy reward to score responses with: a reward model folder or any reward spec; empty: no proxy reward."""
    judge: Annotated[list[str], tyro.conf.UseAppendAction] = dataclasses.field(default_factory=list)
    """Judge(s) for the 'gold' reward and win rate, repeatable: gold, rm:PATH, py:module:fn, math, judge:SPEC ... (default: gold on the bundled task only)."""
    judge_weights: list[float] = dataclasses.field(default_factory=list)
    """Weight of each --judge in the total (default 1 each)."""
    preference_data: str = ""
    """Preference data (prompt/chosen/rejected) to measure the reward model's accuracy on."""
    corpus: str = "auto"
    """Held-out text for perplexity: auto (the bundled corpus's eval split on the bundled task, else none), 'kindly', a .txt file, or '' to skip."""
    max_perplexity_lines: int = 1000
    """Score at most this many corpus lines."""
    max_new_tokens: int = 24
    """Longest response sampled."""
    temperature: float = 1.0
    """Sampling temperature (KL is measured at this temperature)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1: off; the KL estimate assumes 1)."""
    tie_margin: float = 0.0
    """Judge scores closer than this count as a tie (half a win)."""
    batch_size: int = 64
    """Rows per forward pass."""
    n_boot: int = 1000
    """Bootstrap resamples for the intervals."""
    seed: int = 0
    """Sampling seed (the reference uses seed + 1, so a policy equal to its reference ties on average)."""
    output_dir: str = "runs/eval"
    """Folder for results.json and samples.jsonl."""
    name: str = ""
    """Label of this evaluation in reports (default: the model path)."""
    dtype: str = "float32"
    """Weights dtype."""
    monitor: str = "auto"
    """Scorecard, harmless: harm judge of the responses ('unkind': the gold panel's sentiment of the response; any judge spec; auto: unkind on the bundled task; '' off)."""
    attacks: str = ""
    """Scorecard, harmless: held-out attack prompts (e.g. a red-team run's successful_attacks.jsonl); their success rate against policy and reference."""
    unsafe_below: float = VADER_NEGATIVE
    """Scorecard, harmless: a response the monitor scores below this is harmful."""
    honesty_prompts: str = "auto"
    """Scorecard, honest: verifiable prompts with an answer column, for calibration (auto: the arithmetic task's eval split when --prompts arith; '' off)."""
    capability_prompts: str = "auto"
    """Scorecard, capability tax: verifiable prompts whose accuracy is compared with the reference's (auto: as honesty_prompts; '' off)."""
    verifier: str = ""
    """Scorecard: reward spec that checks the answers to those prompts (default: the arithmetic task's verifier on it, else math)."""
    confident_at: float = 0.9
    """Scorecard, honest: an answer the model gives this probability or more counts as confident."""
    human: str = ""
    """Human evaluation: feedback:http(s)://HOST:PORT (admin token in $RLHFKIT_FEEDBACK_TOKEN) or feedback:DB_URL; the samples become a blind pairwise task there (docs/online.md)."""
    human_quota: float = 1.0
    """Human evaluation: share of the items that must have --human_overlap labels before the report."""
    human_deadline: float = 3600.0
    """Human evaluation: seconds to wait for the quota; then it reports what there is."""
    human_poll: float = 5.0
    """Human evaluation: seconds between checks of the labels."""
    human_overlap: int = 3
    """Human evaluation: annotators wanted per pair (agreement needs >= 2)."""
    human_gold: int = 10
    """Human evaluation: gold items (copies of the pairs the judge separates most clearly, with its answer)."""
    human_gold_rate: float = 0.1
    """Human evaluation: share of an annotator's queue that is gold."""
    human_gold_margin: float = 0.2
    """Human evaluation: judge score gap a gold pair needs."""

    def __post_init__(self) -> None:
        self._check_episode_args()
        require(bool(self.model), "model", "name the policy to evaluate (a saved model folder)")
        require(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        require(self.temperature > 0, "temperature", "must be > 0")
        require(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        require(self.n_boot >= 0, "n_boot", "must be >= 0")
        require(self.num_prompts >= 0, "num_prompts", "must be >= 0")

        require(bool(self.prompts), "prompts", "pass --prompts FILE (JSONL/JSON/parquet with 'prompt' or 'messages', "
                "or a .txt file), or --prompts kindly for the bundled task's eval prompts")
        if isinstance(self.judge, str):
            self.judge = [self.judge] if self.judge else []
        if self.environment and not self.judge:  # the environment's reward is the score (eval/episodes.py)
            self.judge = [ENVIRONMENT_ONLY]
        self.judge = rewards_or_default(self.judge, self.prompts, "judge")
        if self.corpus == "auto":
            self.corpus = "kindly" if is_bundled_kindly(self.prompts) else ""
        if self.monitor == "auto":
            self.monitor = "unkind" if is_bundled_kindly(self.prompts) else ""
        require(not self.attacks or bool(self.monitor), "attacks", "an attack's success is judged by --monitor: name one")
        require(0 < self.confident_at <= 1, "confident_at", "must be in (0, 1]")
        for field in ("reward_model", "preference_data", "human", "attacks") if self.multi_turn else ():
            require(not getattr(self, field), field, "not available with --environment / --tools yet; "
                    "score episodes with --judge")


# ---------------------------------------------------------------------------------------------
# inputs


def load_corpus(source: str, limit: int) -> list[str]:
    if not source:
        return []
    if source == "kindly":
        lines = kindly.corpus_lines("eval")
    else:
        lines = [x for x in Path(source).read_text().splitlines() if x.strip()]
    return lines[:limit] if limit else lines


def default_reference(model: Any) -> str:
    """The model a policy was trained from: `model` in config.yaml beside or above its folder (for a
    model given in Python, the folder it was loaded from)."""


    if not isinstance(model, str | Path):
        model = getattr(model, "name_or_path", "") or ""
        if not model:
            raise ConfigError("config field 'reference': the model given in Python was not loaded from a folder; "
                              "pass reference=...")
    here = Path(model)
    for folder in (here, here.parent):
        cfg = folder / "config.yaml"
        if cfg.is_file():
            data = yaml.safe_load(cfg.read_text()) or {}
            start = data.get("model") or data.get("policy")
            if start:
                return str(start)
    raise ConfigError(f"config field 'reference': no config.yaml with a `model` field next to {model}; name the reference explicitly")


def make_judge(spec: str):
    """A judge (score(prompts, responses) -> array) from one reward spec."""

    return PromptScorer(load_rewards([spec]), None, {})


class PromptScorer:
    """A RewardSet as a judge for text metrics: `score(prompts, responses)` in the order of `raw_prompts`.

    The evaluator passes the (templated) prompt texts; the rewards see the prompts as given
    (conversations stay conversations) with their extra dataset columns.
    """

    def __init__(self, rewards, raw_prompts, columns):
        self.rewards, self.raw, self.columns = rewards, raw_prompts, columns

    def score(self, prompts, responses):
        raw = list(prompts) if self.raw is None else self.raw
        if len(raw) != len(responses):
            raise ValueError(f"{len(responses)} responses for {len(raw)} prompts")
        scored = self.rewards.score(raw, as_completions(raw, list(responses)), **self.columns)
        for name, values in scored.values.items():  # an evaluation's mean must not drop or invent items
            missing = sum(v is None for v in values)
            if missing:
                raise RlhfkitError(f"judge '{name}' abstained on {missing} of {len(values)} responses; an evaluation "
                                   "needs a score for every response (rerun: a judge's verdict cache keeps the rest)")
        return scored.total


# ---------------------------------------------------------------------------------------------
# metrics from text


def rm_accuracy(scorer, records: Sequence[dict], source: str = "preference data", n_boot: int = 1000) -> dict:
    """Reward-model accuracy on plain-text pairs (:func:`rlhfkit.losses.reward.preference_accuracy`:
    pairs labelled as ties left out, equal rewards wrong), with a bootstrap interval over the
    decisive pairs (``wins`` = ordered right, ``losses`` = wrong)."""
    for i, rec in enumerate(records, 1):
        for f in ("chosen", "rejected"):
            if not isinstance(rec.get(f), str):
                raise DataError("expected a string (plain-text preference data)", source=source, line=i, field=f)
    pairs = read_comparisons(records, None, source)
    prompts = [p.prompt for p in pairs]
    delta = (np.asarray(scorer.score(prompts, [p.responses[0] for p in pairs]), dtype=np.float64)
             - np.asarray(scorer.score(prompts, [p.responses[1] for p in pairs]), dtype=np.float64))
    correct, decisive = preference_verdicts(torch.from_numpy(delta), torch.tensor([p.label for p in pairs]))
    return M.win_rate(correct[decisive].double().numpy(), n_boot=n_boot)


def gold_panel_of(judge):
    """The gold panel behind `judge` (the panel itself, or a scorer whose rewards include `gold`), else None."""

    if isinstance(judge, GoldPanel):
        return judge
    for reward in getattr(getattr(judge, "rewards", None), "rewards", ()):
        inner = getattr(reward.fn, "judge", None)
        if isinstance(inner, GoldPanel):
            return inner
    return None


def text_metrics(prompts: Sequence[str], responses: Sequence[str], ref_responses: Sequence[str], judge,
                 scorer=None, tokenizer=None, tie_margin: float = 0.0, n_boot: int = 1000,
                 seed: int = 0, clusters: Sequence[int] | None = None) -> tuple[dict, list[dict]]:
    """Everything computable from the texts alone: gold, proxy, win rates, diversity.

    Returns (metrics, per-prompt sample rows). Used directly for best-of-N, whose "policy"
    is a selection rule rather than a model. `clusters` names the prompt of each row when a
    prompt appears several times (several samples): the win-rate and gold-difference intervals
    then resample prompts.
    """
    gold = np.asarray(judge.score(prompts, responses), dtype=np.float64)
    gold_ref = np.asarray(judge.score(prompts, ref_responses), dtype=np.float64)
    labels = M.preference_labels(gold, gold_ref, tie_margin)
    len_pol = [len(r.split()) for r in responses]
    len_ref = [len(r.split()) for r in ref_responses]
    out: dict[str, Any] = {
        "gold": M.bootstrap_ci(gold, n_boot=n_boot, seed=seed),
        "gold_reference": M.bootstrap_ci(gold_ref, n_boot=n_boot, seed=seed),
        "win_rate": M.win_rate(labels, n_boot=n_boot, seed=seed, clusters=clusters),
        # paired: the same prompts (and sample slots) for both, so the difference's interval is tight
        "gold_difference": M.bootstrap_ci(gold - gold_ref, n_boot=n_boot, seed=seed, clusters=clusters),
        "lc_win_rate": M.length_controlled_win_rate(labels, len_pol, len_ref, n_boot=min(n_boot, 200), seed=seed),
        "mean_length": float(np.mean(len_pol)),
        "mean_length_reference": float(np.mean(len_ref)),
        "n_prompts": len(prompts),
    }
    out.update(M.diversity(responses))
    panel = gold_panel_of(judge)
    if panel is not None:  # the bundled task's panel: how much of the gain is sentiment, how much quality
        raw = getattr(judge, "raw", None)
        plain_prompts = [str(p) for p in (prompts if raw is None else raw)]
        out["gold_gain_split"] = M.gold_gain_split(
            panel.sentiment(plain_prompts, list(responses)).mean(axis=1),
            panel.sentiment(plain_prompts, list(ref_responses)).mean(axis=1),
            panel.quality(list(responses)), panel.quality(list(ref_responses)), n_boot=n_boot, seed=seed,
            clusters=clusters)
    if tokenizer is not None:
        token_texts = [[str(t) for t in tokenizer(r, add_special_tokens=False)["input_ids"]] for r in responses]
        out["ead"] = M.expectation_adjusted_distinct(token_texts, vocab_size=len(tokenizer))
    rows = [{"prompt": p, "response": r, "reference": rr, "gold": float(g), "gold_reference": float(gr),
             "label": float(lab)} for p, r, rr, g, gr, lab in zip(prompts, responses, ref_responses, gold, gold_ref, labels)]
    if scorer is not None:
        proxy = np.asarray(scorer.score(prompts, responses), dtype=np.float64)
        proxy_ref = np.asarray(scorer.score(prompts, ref_responses), dtype=np.float64)
        out["proxy"] = M.bootstrap_ci(proxy, n_boot=n_boot, seed=seed)
        out["proxy_reference"] = M.bootstrap_ci(proxy_ref, n_boot=n_boot, seed=seed)
        for row, p in zip(rows, proxy):
            row["proxy"] = float(p)
    return out, rows


# ---------------------------------------------------------------------------------------------
# model-based evaluation


def evaluate(policy, reference, tokenizer, prompts: Sequence[str], judge, scorer=None, corpus: Sequence[str] = (),
             max_new_tokens: int = 24, temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 64,
             seed: int = 0, n_boot: int = 1000, tie_margin: float = 0.0, reference_rollout=None,
             reference_perplexity: dict | None = None, clusters: Sequence[int] | None = None) -> tuple[dict, list[dict]]:
    """Sample from `policy` and `reference`, then compute every metric. Returns (metrics, rows).

    Pass `reference_rollout` / `reference_perplexity` (from an earlier call's
    ``metrics["_reference"]``) to evaluate several policies against one set of reference samples.
    """

    pol = generate(policy, tokenizer, list(prompts), max_new_tokens, temperature=temperature, top_p=top_p,
                   batch_size=batch_size, seed=seed)
    ref = reference_rollout or generate(reference, tokenizer, list(prompts), max_new_tokens, temperature=temperature,
                                        top_p=top_p, batch_size=batch_size, seed=seed + 1)
    out, rows = text_metrics(prompts, pol.responses, ref.responses, judge, scorer, tokenizer, tie_margin, n_boot, seed,
                             clusters)
    pad = tokenizer.pad_token_id
    lp = M.query_response_logprobs(policy, pol.query_ids, pol.response_ids, pol.response_mask, pad_token_id=pad,
                                   batch_size=batch_size, temperature=temperature)
    lr = M.query_response_logprobs(reference, pol.query_ids, pol.response_ids, pol.response_mask, pad_token_id=pad,
                                   batch_size=batch_size, temperature=temperature)
    kl = M.kl_from_logprobs(lp, lr, pol.response_mask)
    out["kl"] = M.bootstrap_ci(kl["per_response"], n_boot=n_boot, seed=seed, clusters=clusters)
    out["ended_with_eos"] = float(pol.ended_with_eos.float().mean())
    for row, k in zip(rows, kl["per_response"]):
        row["kl"] = float(k)
    if corpus:
        ppl = M.perplexity(policy, tokenizer, corpus, batch_size=batch_size)
        reference_perplexity = reference_perplexity or M.perplexity(reference, tokenizer, corpus, batch_size=batch_size)
        out["perplexity"] = ppl["perplexity"]
        out["perplexity_reference"] = reference_perplexity["perplexity"]
        out["perplexity_lines"] = ppl["lines"]
        if ppl["truncated"] or ppl["skipped"]:
            print(f"eval: perplexity truncated {ppl['truncated']} and skipped {ppl['skipped']} corpus line(s)")
    out["_reference"] = {"rollout": ref, "perplexity": reference_perplexity}
    return out, rows


RESULTS = "results.json"
LEGACY_RESULTS = "eval.json"  # the name before results.json; still read


def write_results(output_dir: str | Path, metrics: dict, rows: Sequence[dict]) -> Path:
    """results.json (without private keys) and samples.jsonl, atomically."""
    out = Path(output_dir)
    public = {k: v for k, v in metrics.items() if not k.startswith("_")}
    atomic_write_json(out / RESULTS, public)
    atomic_write_text(out / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return out / RESULTS


def find_results(root: str | Path) -> list[Path]:
    """The evaluations under `root`: every eval.json, and every results.json written by the evaluator
    (its win rate and the reference's gold score are in no training run's results.json)."""
    root = Path(root)
    found = []
    for p in [*root.rglob(LEGACY_RESULTS), *root.rglob(RESULTS)]:
        # hidden folders (atomic-write temporaries) and checkpoints hold no results
        if any(part.startswith(".") or part == "checkpoints" for part in p.relative_to(root).parts[:-1]):
            continue
        if p.name == RESULTS:
            try:
                data = json.loads(p.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if not (isinstance(data, dict) and "win_rate" in data and "gold_reference" in data):
                continue
        found.append(p)
    return sorted(found)


def main(cfg: Config) -> dict:


    out = prepare_run_dir(cfg.output_dir, cfg)
    seed_everything(cfg.seed)
    ref_path = cfg.reference or default_reference(cfg.model)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
    policy = load_policy(cfg.model, cfg.dtype, trainable=False).eval()
    reference = load_policy(ref_path, cfg.dtype, trainable=False).eval()
    prompt_set = load_prompt_set(cfg.prompts, "eval", limit=cfg.num_prompts)
    prompts = [render_prompt(tokenizer, p) for p in prompt_set.prompts]
    if cfg.multi_turn:  # episodes with tools / an environment, policy and reference alike
        return _main_episodes(cfg, out, policy, reference, tokenizer, prompt_set, ref_path)
    judge = PromptScorer(load_rewards(cfg.judge, cfg.judge_weights, batch_size=cfg.batch_size), prompt_set.prompts,
                         prompt_set.columns)
    scorer = None
    if cfg.reward_model:
        spec = cfg.reward_model if ":" in cfg.reward_model or cfg.reward_model == "gold" else f"rm:{cfg.reward_model}"
        scorer = PromptScorer(load_rewards([spec], batch_size=cfg.batch_size), prompt_set.prompts, prompt_set.columns)
    corpus = load_corpus(cfg.corpus, cfg.max_perplexity_lines)
    with torch.no_grad():
        metrics, rows = evaluate(policy, reference, tokenizer, prompts, judge, scorer, corpus, cfg.max_new_tokens,
                                 cfg.temperature, cfg.top_p, cfg.batch_size, cfg.seed, cfg.n_boot, cfg.tie_margin)
        metrics["scorecard"] = scorecard.build(cfg, policy, reference, tokenizer, metrics, rows, corpus)
    if cfg.preference_data:
        if scorer is None:
            raise ConfigError("config field 'preference_data': RM accuracy needs --reward_model")
        metrics["rm_accuracy"] = rm_accuracy(PromptScorer(scorer.rewards, None, {}), load_records(cfg.preference_data), cfg.preference_data, cfg.n_boot)
    metrics.update(name=cfg.name or _label(cfg.model), model=_label(cfg.model), reference=_label(ref_path),
                   judge="+".join(cfg.judge))
    if cfg.human:
        report, key = human.run_human_eval(rows, human.HumanSettings(
            cfg.human, cfg.human_quota, cfg.human_deadline, cfg.human_poll, cfg.human_overlap, cfg.human_gold,
            cfg.human_gold_rate, cfg.human_gold_margin), cfg.n_boot, cfg.seed)
        metrics.update(human=report, human_win_rate=report["win_rate"])
        atomic_write_text(out / "human_items.jsonl", "".join(json.dumps(k) + "\n" for k in key))
    write_results(out, metrics, rows)
    _print_summary(metrics)
    return {k: v for k, v in metrics.items() if not k.startswith("_")}


def _main_episodes(cfg: Config, out: Path, policy, reference, tokenizer, prompt_set, ref_path: str) -> dict:
    """`main` for --environment / --tools (rlhfkit.eval.episodes): no proxy reward or scorecard
    (the config refuses the options that need them)."""
    rewards = load_rewards(cfg.judge, cfg.judge_weights, batch_size=cfg.batch_size)
    with torch.no_grad():
        metrics, rows = evaluate_episodes(cfg, policy, reference, tokenizer, prompt_set, rewards)
    metrics.update(name=cfg.name or _label(cfg.model), model=_label(cfg.model), reference=_label(ref_path),
                   judge="+".join(cfg.judge))
    write_results(out, metrics, rows)
    _print_summary(metrics)
    return metrics


def _label(model: Any) -> str:
    """A model as results.json names it: its path, or what was given in Python."""
    if isinstance(model, str | Path):
        return str(model)
    name = getattr(model, "name_or_path", "")
    return f"<{type(model).__name__} given in Python{f' (from {name})' if name else ''}>"


def _print_summary(m: dict) -> None:
    def f(key: str) -> str:
        v = m.get(key)
        if isinstance(v, dict):
            return f"{v['mean']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}]"
        return f"{v:.3f}" if isinstance(v, float) else "-"

    for key in ("gold", "gold_reference", "proxy", "kl", "win_rate", "lc_win_rate", "human_win_rate", "distinct_2",
                "self_bleu", "perplexity", "perplexity_reference", "rm_accuracy"):
        if key in m and not (key == "human_win_rate" and m[key]["mean"] is None):
            print(f"  {key:22s} {f(key)}")
    if "human" in m:  # agreement of the people behind human_win_rate, in the same table
        ag, h = m["human"]["agreement"], m["human"]
        acc = [a["gold_accuracy"] for a in h["annotators"] if a["gold_accuracy"] is not None]
        print(f"  {'human_agreement':22s} alpha {_opt(ag.get('krippendorff_alpha'))}, Fleiss kappa "
              f"{_opt(ag.get('fleiss_kappa'))} over {ag.get('items_with_overlap', 0)} items; "
              f"{len(h['annotators'])} annotators, gold accuracy {_opt(float(np.mean(acc)) if acc else None)}")
    for side, counts in m.get("episodes", {}).items():
        print(f"  {'episodes (' + side + ')':22s} " + ", ".join(f"{k} {_ci(v)}" for k, v in counts.items()))
    for row in scorecard.card_rows(m["scorecard"]) if "scorecard" in m else ():
        p, r = row["policy"], row["reference"]
        print(f"  {row['dimension']:9s} {row['measure']:44s} {f'{p}' if not isinstance(p, dict) else _ci(p)} "
              f"(reference {r if not isinstance(r, dict) else _ci(r)})")


def _opt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _ci(v: dict) -> str:
    return "-" if v.get("mean") is None else f"{v['mean']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}]"
