"""`rlhfkit loop`: iterative RLHF, round after round.

Each round r = 1..R (Ouyang et al. 2022 sec. 3; Bai et al. 2022 "Training a Helpful and
Harmless Assistant", sec. 4.5 "iterated online RLHF"):

  1. sample two responses per prompt from the current policy (fresh prompts each round);
  2. collect preferences through one :class:`rlhfkit.judges.sources.PreferenceSource`:
     ``--source simulated`` annotators, ``judge:SPEC`` an AI judge (RLAIF), or
     ``feedback:URL`` (or ``feedback:DB_URL``) people labelling in the feedback service (the round's pairs are posted as
     a task; the round waits until ``feedback_quota`` of them are labelled or
     ``feedback_deadline`` seconds pass, then trains on what it has and says so, with batches
     no larger than the pairs it got; with no labelled pair at all the round ends without a
     new model and the next round starts from the same one);
  3. retrain the reward model on all preference data collected so far;
  4. update the policy: PPO against that reward model, or DPO on this round's pairs
     (on-policy iterative DPO, Xu et al. 2023; Xiong et al. 2024) with the current policy as reference;
  5. evaluate against the starting policy (gold panel win rate, KL, ...) and register the
     model with its lineage; ``loop.json`` is rewritten (atomically) after every round. A round whose gold reward is below the promoted model's is kept
     in the registry but not promoted, and the next round continues from the promoted model.

    rlhfkit loop --model runs/sft/final --rounds 3 --algorithm dpo --output_dir runs/loop
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from transformers.utils import logging as hf_logging

from rlhfkit.config import from_dict, require
from rlhfkit.errors import ConfigError, DataError
from rlhfkit.eval.agreement import binary_agreement
from rlhfkit.eval.attacks import read_attacks
from rlhfkit.eval.report import write_report
from rlhfkit.eval.run_eval import evaluate, write_results
from rlhfkit.judges import GoldPanel, load_judge
from rlhfkit.judges.sources import (
    SOURCES,
    AIJudgeSource,
    FeedbackServiceSource,
    to_preference_records,
)
from rlhfkit.models import load_policy, load_tokenizer
from rlhfkit.models.registry import Registry, RegistryError
from rlhfkit.models.reward import RewardScorer
from rlhfkit.recipes import dpo, grpo, online, ppo, reward, rloo
from rlhfkit.rollout import generate
from rlhfkit.tasks import kindly
from rlhfkit.train.runs import (
    atomic_write_json,
    atomic_write_text,
    one_run_per_folder,
    prepare_run_dir,
    seed_everything,
)

ALGORITHMS = ("dpo", "kto", "ppo", "grpo", "rloo")
ON_POLICY = {"ppo": ppo, "grpo": grpo, "rloo": rloo}


@dataclasses.dataclass
class Config:
    model: str = ""
    """Starting policy (the SFT model); also the reference of every evaluation."""
    rounds: int = 3
    """Number of rounds R."""
    algorithm: str = "dpo"
    """Policy update each round: dpo (any DPO-family loss, --dpo_loss), kto, or a reward-model update plus ppo, grpo or rloo."""
    source: str = "simulated"
    """Preference source: 'simulated' annotators over the gold panel, 'judge:SPEC' (an AI judge, e.g. judge:afinn), 'feedback:URL' (the feedback service at http(s)://URL, admin token in $RLHFKIT_FEEDBACK_TOKEN; or feedback:DB_URL, its database), or 'traffic:DB_URL' (feedback from real use of the served production model; docs/online.md)."""
    dpo_loss: str = "sigmoid"
    """dpo: the DPO-family loss (sigmoid, ipo, hinge, cdpo, robust, simpo, orpo)."""
    traffic_min_feedback: int = 200
    """traffic source: pieces of feedback on the production model a round waits for."""
    traffic_deadline: float = 3600.0
    """traffic source: seconds a round waits for them; then it trains on what there is."""
    traffic_poll: float = 10.0
    """traffic source: seconds between checks of the feedback log."""
    traffic_window: int = 2
    """traffic source: a round trains on the records of the last N rounds (older responses are too far off-policy)."""
    traffic_decay: float = 0.5
    """traffic source: a record one round older counts this much less (kept with probability decay**age)."""
    traffic_max_records: int = 0
    """traffic source: train on at most this many of the selected records, a seeded sample (0: all)."""
    rating_up: int = 4
    """traffic source: a rating at least this is a desirable (thumbs-up) label."""
    rating_down: int = 2
    """traffic source: a rating at most this is an undesirable label."""
    rating_margin: int = 2
    """traffic source: two ratings of responses to one prompt at least this far apart make a pair."""
    alike_picks: str = "drop"
    """traffic source: a pick between two responses its user labelled alike (both up, both down) is left out ('drop') or kept ('keep'); docs/online.md."""
    quality_min_labels: int = 8
    """traffic source: labels a user needs before their agreement can flag or down-weight them."""
    traffic_experiment: str = ""
    """traffic source: the experiment file the server follows; each candidate is released as a canary in it (empty: promotion by the gold rule)."""
    canary_shares: str = "0.05,0.1,0.25,0.5"
    """Canary: the candidate's traffic shares, step by step."""
    canary_users_per_step: int = 50
    """Canary: new candidate users seen at a share before it grows."""
    canary_max_drop: float = 0.05
    """Canary: it grows only once shown at most this much worse than production on the decision metric (e.g. 0.05 = five points of thumbs-up rate)."""
    canary_poll: float = 30.0
    """Canary: seconds between looks at the evidence."""
    canary_max_looks: int = 120
    """Canary: looks without a decision before the candidate is rolled back."""
    feedback_quota: float = 1.0
    """feedback source: share of a round's pairs that must be labelled before training."""
    feedback_deadline: float = 3600.0
    """feedback source: seconds to wait for the quota; then the round trains on the labels it has."""
    feedback_poll: float = 5.0
    """feedback source: seconds between checks of the labels' progress."""
    feedback_overlap: int = 1
    """feedback source: labels wanted per pair (majority vote when > 1)."""
    annotator_beta: float = 10.0
    """Simulated annotators' Bradley-Terry inverse temperature."""
    annotator_tie_margin: float = 0.02
    """Simulated annotators' tie margin."""
    unreliable_frac: float = 0.0
    """Share of unreliable simulated annotators."""
    prompts_per_round: int = 256
    """Training prompts sampled (two responses each) and labelled per round."""
    attack_prompts: str = ""
    """Adversarial training: a file of attack prompts (e.g. `rlhfkit red-team`'s successful_attacks.jsonl) added to every round's prompts."""
    max_new_tokens: int = 20
    """Response length for sampling, training and evaluation."""
    temperature: float = 1.0
    """Sampling temperature."""
    reward_steps: int = 60
    """Reward-model optimiser steps per round (on all data so far)."""
    reward_learning_rate: float = 3e-4
    """Reward-model learning rate."""
    policy_steps: int = 30
    """Policy optimiser steps per round (DPO steps, or PPO updates)."""
    policy_learning_rate: float = 5e-5
    """Policy learning rate."""
    dpo_beta: float = 0.1
    """DPO beta."""
    ppo_kl_coef: float = 0.05
    """PPO KL coefficient."""
    batch_size: int = 16
    """Micro-batch size of the reward-model and policy updates."""
    reward_config: str = ""
    """YAML of extra `rlhfkit reward` fields (paths and the fields above take precedence)."""
    policy_config: str = ""
    """YAML of extra `rlhfkit dpo` / `rlhfkit ppo` fields."""
    num_eval_prompts: int = 128
    """Held-out prompts in each round's evaluation."""
    n_boot: int = 500
    """Bootstrap resamples of the evaluation intervals."""
    continue_from: str = "promoted"
    """Start each round from the 'promoted' model (a worse round is not built on) or the 'latest'."""
    registry: str = ""
    """Model registry folder (default: OUTPUT_DIR/registry)."""
    output_dir: str = "runs/loop"
    """Folder of the rounds (round-1/, round-2/, ...), the registry, loop.json and the report."""
    seed: int = 0
    """Seed of sampling, labelling and training (round r uses seed + r)."""
    progress: bool = False
    """Progress bars inside the recipes."""

    def __post_init__(self) -> None:
        require(bool(self.model), "model", "give the starting (SFT) policy folder")
        require(self.rounds >= 1, "rounds", "must be >= 1")
        require(self.algorithm in ALGORITHMS, "algorithm", f"must be one of {', '.join(ALGORITHMS)}, got {self.algorithm!r}")
        require(self.source == "simulated" or self.source.startswith(("judge:", "feedback:", online.PREFIX)), "source",
                f"unknown source {self.source!r}; available: simulated, judge:SPEC, feedback:URL, traffic:DB_URL")
        require(self.traffic_window >= 1 and 0.0 < self.traffic_decay <= 1.0, "traffic_window",
                "traffic_window must be >= 1 and traffic_decay in (0, 1]")
        require(not self.traffic_experiment or self.source.startswith(online.PREFIX), "traffic_experiment",
                "canary releases need the traffic source (--source traffic:DB_URL)")
        require(0.0 < self.feedback_quota <= 1.0, "feedback_quota", "must be in (0, 1]")
        require(self.prompts_per_round >= 2, "prompts_per_round", "must be >= 2")
        require(self.continue_from in ("promoted", "latest"), "continue_from", "must be promoted or latest")
        require(self.reward_steps >= 1 and self.policy_steps >= 1, "policy_steps", "reward_steps and policy_steps must be >= 1")


def _recipe_config(cls: type, defaults: dict, yaml_path: str, forced: dict) -> Any:
    """defaults < the user's YAML < forced (the paths and step counts the loop controls)."""


    extra = {}
    if yaml_path:
        if not Path(yaml_path).is_file():
            raise ConfigError(f"config file {yaml_path} does not exist")
        extra = yaml.safe_load(Path(yaml_path).read_text()) or {}
        if not isinstance(extra, dict):
            raise ConfigError(f"{yaml_path}: expected a mapping of field: value")
    return from_dict(cls, {**defaults, **extra, **forced}, source=yaml_path or cls.__module__)


def make_source(cfg: Config, seed: int, cache: dict | None = None):
    """The round's labeller; a judge or service client is built once (``cache``) and reused."""
    cache = {} if cache is None else cache
    if cfg.source.startswith("judge:"):
        if "judge" not in cache:

            cache["judge"] = AIJudgeSource(load_judge(cfg.source[len("judge:"):]))
        return cache["judge"]
    if cfg.source.startswith("feedback:"):
        if "feedback" not in cache:

            cache["feedback"] = FeedbackServiceSource(cfg.source[len("feedback:"):], quota=cfg.feedback_quota,
                                                      deadline=cfg.feedback_deadline, poll=cfg.feedback_poll,
                                                      overlap=cfg.feedback_overlap, task_prefix="loop")
        return cache["feedback"]

    return SOURCES[cfg.source](beta=cfg.annotator_beta, tie_margin=cfg.annotator_tie_margin,
                               unreliable_frac=cfg.unreliable_frac, seed=seed)


def round_prompts(all_prompts: list[str], cfg: Config, r: int) -> list[str]:
    """Disjoint slices of a seeded permutation, wrapping around when the prompts run out."""

    order = np.random.default_rng(cfg.seed).permutation(len(all_prompts))
    start = (r - 1) * cfg.prompts_per_round
    return [all_prompts[order[(start + i) % len(order)]] for i in range(cfg.prompts_per_round)]


def collect_round(policy_path: str, prompts: list[str], source, cfg: Config, seed: int, r: int) -> tuple[list[dict], dict]:
    """Two samples per prompt from the policy, labelled by `source`."""

    tok = load_tokenizer(policy_path)
    policy = load_policy(policy_path, trainable=False).eval()
    roll = generate(policy, tok, prompts, cfg.max_new_tokens, temperature=cfg.temperature, num_samples=2, seed=seed)
    a, b = roll.responses[0::2], roll.responses[1::2]
    labels = source.compare(prompts, a, b)
    # pairs without a label (a judge abstained, or nobody labelled them in time) are left out, counted
    keep = [i for i, lab in enumerate(labels) if lab["label"] is not None]
    records, counts = to_preference_records([prompts[i] for i in keep], [a[i] for i in keep], [b[i] for i in keep],
                                            [labels[i] for i in keep], round=r)
    counts["unlabelled"] = len(labels) - len(keep)
    return records, counts


def write_judge_agreement(rdir: Path, records: list[dict]) -> None:
    """The AI labels of a round against the gold panel's preference (shown by `rlhfkit report`)."""

    panel = GoldPanel()
    decided = [x for x in records if not x["tie"]]
    gc = panel.score([x["prompt"] for x in decided], [x["chosen"] for x in decided])
    gr = panel.score([x["prompt"] for x in decided], [x["rejected"] for x in decided])
    truth = [1.0 if c > r else 0.0 if c < r else 0.5 for c, r in zip(gc, gr)]
    res = binary_agreement([1.0] * len(decided), truth)
    atomic_write_json(rdir / "agreement.json", {"a": records[0]["annotator_id"] if records else "judge",
                                                "b": "gold panel (noiseless preference)", **res})


# below this many pairs a held-out split says nothing and starves training: the reward model
# trains on all of them
FEW_PAIRS = 20


def fit_batch(rcfg: Any, n: int) -> Any:
    """`rcfg` with its micro-batch no larger than the `n` examples it will train on (a round that
    got few labels trains on what it has instead of stopping)."""
    if n >= rcfg.per_device_train_batch_size:
        return rcfg
    print(f"loop: {n} training pairs, fewer than the batch size {rcfg.per_device_train_batch_size}: batches of {n}")
    return dataclasses.replace(rcfg, per_device_train_batch_size=max(1, n))


def train_reward(data_file: Path, cfg: Config, out: Path, seed: int, n_pairs: int) -> str:

    rcfg = _recipe_config(reward.Config, dict(learning_rate=cfg.reward_learning_rate, per_device_train_batch_size=cfg.batch_size,
                                              report_to="jsonl", logging_steps=10, progress=cfg.progress,
                                              eval_fraction=0.1 if n_pairs >= FEW_PAIRS else 0.0),
                          cfg.reward_config,
                          dict(model=cfg.model, dataset=str(data_file), output_dir=str(out), max_steps=cfg.reward_steps, seed=seed))
    held_out = max(1, round(rcfg.eval_fraction * n_pairs)) if rcfg.eval_fraction > 0 else 0
    rcfg = fit_batch(rcfg, n_pairs - held_out)
    res = reward.main(rcfg, printer=lambda *a, **k: None)
    return res.get("model_path", str(out / "final"))


def train_policy(start: str, round_file: Path, rm_path: str, cfg: Config, out: Path, seed: int, n_pairs: int,
                 prompts: str = "") -> str:
    """DPO-family / KTO on `round_file` with `start` as reference, or PPO / GRPO / RLOO against the
    reward model on fresh samples of `prompts` (default: the bundled task's)."""
    common = dict(learning_rate=cfg.policy_learning_rate, per_device_train_batch_size=cfg.batch_size, report_to="jsonl",
                  logging_steps=5, progress=cfg.progress)
    forced = dict(model=start, output_dir=str(out), max_steps=cfg.policy_steps, seed=seed)
    if cfg.algorithm in ("dpo", "kto"):
        loss = "kto" if cfg.algorithm == "kto" else cfg.dpo_loss
        pcfg = _recipe_config(dpo.Config, dict(common, beta=cfg.dpo_beta, max_length=96, loss=loss), cfg.policy_config,
                              dict(forced, dataset=str(round_file), reference=start))
        dpo.main(fit_batch(pcfg, n_pairs))
    else:
        extra = dict(kl_coef=cfg.ppo_kl_coef) if cfg.algorithm == "ppo" else {}
        recipe = ON_POLICY[cfg.algorithm]
        pcfg = _recipe_config(recipe.Config, dict(common, max_completion_length=cfg.max_new_tokens, num_eval_prompts=0,
                                                  eval_prompts="", **extra, **({"prompts": prompts} if prompts else {})),
                              cfg.policy_config, dict(forced, reward_model=rm_path))
        recipe.main(pcfg)
    return str(out / "final")


class RoundEvaluator:
    """Evaluates each round's policy against the starting one on the held-out prompts, the
    reference's responses sampled once and reused."""

    def __init__(self, cfg: Config):
        self.cfg, self.panel = cfg, GoldPanel()
        self.tokenizer = load_tokenizer(cfg.model)
        self.reference = load_policy(cfg.model, trainable=False).eval()
        self.prompts = kindly.prompts("eval")[: cfg.num_eval_prompts]
        self.reference_rollout = None

    def __call__(self, path: str, rm: str | None, folder: Path) -> dict:
        cfg = self.cfg
        policy = self.reference if path == cfg.model else load_policy(path, trainable=False).eval()
        scorer = RewardScorer(rm) if rm else None
        with torch.no_grad():
            m, rows = evaluate(policy, self.reference, self.tokenizer, self.prompts, self.panel, scorer,
                               max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed,
                               n_boot=cfg.n_boot, reference_rollout=self.reference_rollout)
        self.reference_rollout = m["_reference"]["rollout"]
        write_results(folder, m, rows)
        return {k: v for k, v in m.items() if not k.startswith("_")}


def summary_row(r: int, model_id: str, metrics: dict, **extra) -> dict:
    return {"round": r, "id": model_id, "gold": metrics["gold"]["mean"], "win_rate": metrics["win_rate"]["mean"],
            "win_rate_lo": metrics["win_rate"]["lo"], "win_rate_hi": metrics["win_rate"]["hi"],
            "kl": metrics["kl"]["mean"], **extra}


@dataclasses.dataclass
class LoopState:
    """Where the loop stands between rounds."""

    current_id: str
    current_path: str
    records: list[dict]
    """Every labelled pair so far (the reward model trains on all of them)."""
    sources: dict
    """Label sources kept across rounds (a judge loads once)."""


@one_run_per_folder
def main(cfg: Config) -> dict:
    """Run the rounds; returns {"rounds": [...], "promoted": id} (also written to loop.json)."""
    hf_logging.disable_progress_bar()
    out = prepare_run_dir(cfg.output_dir, cfg)
    seed_everything(cfg.seed)
    attacks = read_attacks(cfg.attack_prompts) if cfg.attack_prompts else []  # a bad file stops the run at once
    reg = Registry(cfg.registry or out / "registry")
    evaluate_model = RoundEvaluator(cfg)
    m0 = evaluate_model(cfg.model, None, out / "round-0")
    reg.register(cfg.model, "round-0", round=0, metrics=m0, seed=cfg.seed, extra={"algorithm": "start"})
    reg.promote("round-0", reason="starting policy")
    state = LoopState("round-0", cfg.model, [], {})
    summary = [summary_row(0, "round-0", m0, promoted=True)]
    write_progress(out, summary, reg)
    train_prompts = kindly.prompts("train")
    for r in range(1, cfg.rounds + 1):
        summary.append(run_round(cfg, r, state, train_prompts, evaluate_model, reg, out, attacks))
        write_progress(out, summary, reg)
    result = write_progress(out, summary, reg)
    result["report"] = str(write_report(out, title="rlhfkit loop"))
    return result


def run_round(cfg: Config, r: int, state: LoopState, train_prompts, evaluate_model: RoundEvaluator, reg,
              out: Path, attacks: list[str] = ()) -> dict:
    """Label, train a reward model and a policy, evaluate, register and (if it holds) promote."""
    if cfg.source.startswith(online.PREFIX):
        return run_traffic_round(cfg, r, state, evaluate_model, reg, out)
    t0 = time.perf_counter()
    rdir = out / f"round-{r}"
    rdir.mkdir(parents=True, exist_ok=True)
    seed = cfg.seed + r
    # attacks that worked against an earlier policy join every round's prompts (adversarial training)
    records, counts = collect_round(state.current_path, round_prompts(train_prompts, cfg, r) + list(attacks),
                                    make_source(cfg, seed, state.sources), cfg, seed, r)
    state.records += records
    round_file, all_file = rdir / "preferences.jsonl", rdir / "preferences_all.jsonl"
    atomic_write_text(round_file, "".join(json.dumps(x) + "\n" for x in records))
    atomic_write_text(all_file, "".join(json.dumps(x) + "\n" for x in state.records))
    print(f"loop round {r}: {counts['kept']} labelled pairs ({counts['ties_skipped']} ties, {counts['identical_skipped']} "
          f"identical and {counts['empty_skipped']} empty-response pairs skipped"
          + (f", {counts['unlabelled']} without a label" if counts["unlabelled"] else "") + f"), {len(state.records)} in all")
    if not records:
        return round_without_labels(cfg, r, counts, state.current_id, round_file, t0)
    if cfg.source.startswith("judge:"):
        write_judge_agreement(rdir, records)
    rm_path = train_reward(all_file, cfg, rdir / "reward", seed, len(state.records))
    policy_path = train_policy(state.current_path, round_file, rm_path, cfg, rdir / cfg.algorithm, seed, len(records))
    metrics = evaluate_model(policy_path, rm_path, rdir / "eval")
    model_id = f"round-{r}"
    reg.register(policy_path, model_id, parent=state.current_id, round=r, metrics=metrics, seed=seed,
                 config=dataclasses.asdict(cfg), data_files=[round_file, all_file],
                 extra={"algorithm": cfg.algorithm, "reward_model": rm_path})
    promoted = promote_by_gold(reg, model_id, r)
    print(f"loop round {r}: gold {metrics['gold']['mean']:.3f}, win rate vs start {metrics['win_rate']['mean']:.3f} "
          f"[{metrics['win_rate']['lo']:.3f}, {metrics['win_rate']['hi']:.3f}], KL {metrics['kl']['mean']:.2f}"
          f"{'' if promoted else ' (not promoted)'}")
    if promoted or cfg.continue_from == "latest":
        state.current_id, state.current_path = model_id, policy_path
    return summary_row(r, model_id, metrics, pairs=counts["kept"], unlabelled=counts["unlabelled"], promoted=promoted,
                       seconds=round(time.perf_counter() - t0, 1))


def promote_by_gold(reg: Registry, model_id: str, r: int) -> bool:
    """The registry's gold guard decides (a round worse than the promoted model is not promoted)."""
    try:
        reg.promote(model_id, reason=f"round {r}")
        return True
    except RegistryError as e:
        print(f"loop round {r}: not promoted: {e}")
        return False


def run_traffic_round(cfg: Config, r: int, state: LoopState, evaluate_model: RoundEvaluator, reg: Registry,
                      out: Path) -> dict:
    """A round from real users' feedback (rlhfkit.recipes.online): wait for feedback on the
    production model, judge the users, select the data, train, evaluate, register, release."""
    t0, rdir, seed = time.perf_counter(), out / f"round-{r}", cfg.seed + r
    rdir.mkdir(parents=True, exist_ok=True)
    feed = state.sources.get("traffic") or state.sources.setdefault("traffic", online.TrafficFeed(cfg))
    production = reg.promoted()["id"]
    data = feed.collect(r, production, rdir, seed, state.sources.get("reward_model"))
    if data.n_train == 0 or (cfg.algorithm in ON_POLICY and data.n_pairs < 2):
        return round_without_labels(cfg, r, {"unlabelled": data.report["feedback"]}, production, data.train_file, t0)
    rm_path = train_reward(data.pairs_file, cfg, rdir / "reward", seed, data.n_pairs) if data.n_pairs >= 2 else None
    state.sources["reward_model"] = rm_path or state.sources.get("reward_model")
    start = reg.get(production)["path"]
    policy_path = train_policy(start, data.train_file, rm_path, cfg, rdir / cfg.algorithm, seed, data.n_train,
                               prompts=str(data.prompts_file))
    metrics = evaluate_model(policy_path, rm_path, rdir / "eval")
    model_id = f"round-{r}"
    kept = data.report["this_round"]
    lineage = {"source": "traffic", "feedback": data.report["feedback"], "since": data.report["since"],
               "until": data.report["until"], "records_kept": kept["kept"], "records_offered": kept["offered"],
               "train_records": data.n_train, "reward_pairs": data.n_pairs, "window": cfg.traffic_window,
               "flagged_users": data.report["users"]["flagged_users"]}
    reg.register(policy_path, model_id, parent=production, round=r, metrics=metrics, seed=seed,
                 config=dataclasses.asdict(cfg), data_files=[data.train_file, data.pairs_file],
                 extra={"algorithm": cfg.algorithm, "reward_model": rm_path, "training_data": lineage})
    if cfg.traffic_experiment:
        release = online.release(cfg, reg, feed, model_id, production)
        promoted = release["status"] == "promoted"
    else:
        release, promoted = None, promote_by_gold(reg, model_id, r)
    print(f"loop round {r}: gold {metrics['gold']['mean']:.3f}, win rate vs start {metrics['win_rate']['mean']:.3f}, "
          f"{'promoted' if promoted else 'not promoted'}" + (f" (canary {release['status']})" if release else ""))
    state.current_id, state.current_path = reg.promoted()["id"], reg.promoted()["path"]
    return summary_row(r, model_id, metrics, feedback=data.report["feedback"], kept=kept["kept"], offered=kept["offered"],
                       flagged_users=lineage["flagged_users"], promoted=promoted,
                       canary=[{"action": e["action"], "share": e["share"], "reason": e["reason"]}
                               for e in release["events"]] if release else None,
                       seconds=round(time.perf_counter() - t0, 1))


def round_without_labels(cfg: Config, r: int, counts: dict, current_id: str, round_file: Path, t0: float) -> dict:
    """A round with no labelled pair: with people as the source it ends without a new model (they
    may not have come before the deadline); from annotators or a judge it is an error."""
    if not cfg.source.startswith(("feedback:", online.PREFIX)):

        raise DataError(f"round {r} collected no preference pairs from source {cfg.source!r}", source=str(round_file))
    print(f"loop round {r}: no labelled pairs from {cfg.source} before the deadline; the round ends "
          f"without a new model, the next one starts from {current_id}")
    return {"round": r, "id": None, "pairs": 0, "unlabelled": counts["unlabelled"], "promoted": False,
            "skipped": "no labelled pairs", "seconds": round(time.perf_counter() - t0, 1)}


def write_progress(out: Path, summary: list[dict], reg: Any) -> dict:
    """loop.json (every round so far) and summary.json (the rounds with a model), each written to a
    temporary file and renamed, after every round: a crash later leaves the finished rounds on record."""
    result = {"rounds": summary, "promoted": reg.promoted()["id"], "registry": str(reg.root)}
    atomic_write_json(out / "loop.json", result)
    atomic_write_json(out / "summary.json", {"win_rates": [x for x in summary if x.get("id")]})
    return result
