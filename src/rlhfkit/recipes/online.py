"""Online RLHF from live use: the pieces of a ``rlhfkit loop --source traffic:DB_URL`` round.

A round of the loop with a traffic source (see rlhfkit.recipes.loop) does:

1. **wait** until at least ``traffic_min_feedback`` pieces of feedback were logged since the
   previous round's cut-off on responses of the current production model (the registry's
   promoted model), or ``traffic_deadline`` seconds pass (then it goes on with what there is; with
   nothing, the round ends without a new model);
2. **judge the users** (rlhfkit.serving.user_quality) against the majority and the previous
   round's reward model, and turn the feedback into training data by the documented rules
   (rlhfkit.serving.online_data): unpaired KTO labels for ``--algorithm kto``, preference pairs
   otherwise (and always, for the reward model);
3. **select** what trains: the last ``traffic_window`` rounds' records, ``traffic_decay`` per
   round of age, times each user's weight, by Bernoulli thinning; the report of what was kept
   goes to ``round-R/traffic.json`` and to loop.json;
4. the loop trains the reward model and the next candidate (KTO / any DPO-family loss on the
   logged data; PPO, GRPO or RLOO on fresh samples of the users' prompts against the reward
   model), evaluates and registers it with its lineage (round, parent, data files, counts);
5. **release** it (`release`): with ``traffic_experiment`` a canary (rlhfkit.serving.canary)
   against production on live traffic decides promotion or rollback; without one the loop's gold
   rule decides as for the other sources.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from rlhfkit.feedback.db import Database, upgrade
from rlhfkit.feedback.models import utcnow
from rlhfkit.models.registry import Registry
from rlhfkit.models.reward import RewardScorer
from rlhfkit.serving.canary import Canary, CanaryPlan, run_canary, shares_arg
from rlhfkit.serving.experiments import Arm, load_experiment
from rlhfkit.serving.online_data import Rules, load_feedback, select_records, to_records
from rlhfkit.serving.user_quality import QualityRules, assess_users
from rlhfkit.train.runs import atomic_write_json, atomic_write_text

PREFIX = "traffic:"
SETTLE_S = 1.0  # feedback younger than this waits for the next read


def _jsonl(path: Path, rows: list[dict]) -> Path:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


@dataclasses.dataclass
class RoundData:
    """What a traffic round trains on, and the report of how it was chosen."""

    train_file: Path
    """KTO: unpaired records; otherwise pairs (the policy's data)."""
    pairs_file: Path
    """Pairs in the window (the reward model's data)."""
    prompts_file: Path
    """The users' prompts of this round (PPO/GRPO/RLOO sample them afresh)."""
    n_train: int
    n_pairs: int
    report: dict


class TrafficFeed:
    """The feedback database a loop learns from, and what it has read so far."""

    def __init__(self, cfg: Any, printer: Callable[[str], Any] = print):
        url = cfg.source[len(PREFIX):]
        upgrade(url)
        self.cfg, self.printer, self.url = cfg, printer, url
        self.db = Database(url, pool_size=1)
        self.since = None  # round 1 reads everything logged for the starting model
        self.rules = Rules(cfg.rating_up, cfg.rating_down, cfg.rating_margin, cfg.alike_picks)
        self.history: dict[int, list[dict]] = {}
        self.pairs: dict[int, list[dict]] = {}

    def wait(self, versions: list[str]) -> tuple[list, Any]:
        """Feedback since the last cut-off on `versions`, once there is enough or the deadline passed."""
        cfg, start = self.cfg, time.monotonic()
        while True:
            # a row stamped just before now may still be committing: it belongs to the next round
            until = utcnow() - dt.timedelta(seconds=SETTLE_S)
            events = load_feedback(self.db, self.since, until, versions)
            if len(events) >= cfg.traffic_min_feedback:
                return events, until
            if time.monotonic() - start >= cfg.traffic_deadline:
                self.printer(f"traffic: deadline of {cfg.traffic_deadline:g}s reached with {len(events)} pieces of "
                             f"feedback (wanted {cfg.traffic_min_feedback}); training on what there is")
                return events, until
            time.sleep(cfg.traffic_poll)

    def collect(self, r: int, production: str, rdir: Path, seed: int, rm_path: str | None) -> RoundData:
        cfg = self.cfg
        events, until = self.wait([production])
        scorer = RewardScorer(rm_path) if rm_path else None
        quality = assess_users(events, score=scorer.score if scorer else None, rules=self.rules,
                               q=QualityRules(min_labels=cfg.quality_min_labels))
        fmt = "unpaired" if cfg.algorithm == "kto" else "pairs"
        records, counts = to_records(events, fmt, self.rules, round=r)
        pairs, pair_counts = (records, counts) if fmt == "pairs" else to_records(events, "pairs", self.rules, round=r)
        self.history[r], self.pairs[r] = records, pairs
        weights = quality["weights"]
        train, by_round = select_records(self.history, r, cfg.traffic_window, cfg.traffic_decay, weights, seed)
        rm_train, rm_by_round = select_records(self.pairs, r, cfg.traffic_window, cfg.traffic_decay, weights, seed + 1)
        train, rm_train = _cap(train, cfg.traffic_max_records, seed), _cap(rm_train, cfg.traffic_max_records, seed + 1)
        prompts = list({json.dumps(e.prompt, sort_keys=True): e.prompt for e in events}.values())
        report = {"round": r, "production": production, "since": self.since.isoformat() if self.since else None,
                  "until": until.isoformat(), "feedback": len(events), "format": fmt, "conversion": counts,
                  "pairs_conversion": pair_counts, "users": quality["summary"], "quality_reference": quality["reference"],
                  "median_agreement": quality["median_agreement"],
                  "kept": {"train": by_round, "reward_model": rm_by_round},
                  "this_round": {"offered": len(records), "kept": by_round.get(r, {}).get("kept", 0),
                                 "share_kept": by_round.get(r, {}).get("kept", 0) / len(records) if records else None},
                  "per_user": quality["users"]}
        self.since = until
        atomic_write_json(rdir / "traffic.json", report)
        self.printer(f"traffic round {r}: {len(events)} pieces of feedback from {quality['summary']['users']} users "
                     f"({quality['summary']['flagged_users']} flagged), {len(records)} {fmt} records, "
                     f"{report['this_round']['kept']} kept; {len(train)} train in the window of {cfg.traffic_window}")
        return RoundData(_jsonl(rdir / f"traffic_{fmt}.jsonl", train), _jsonl(rdir / "traffic_pairs.jsonl", rm_train),
                         _jsonl(rdir / "prompts.jsonl", [{"prompt": p} for p in prompts]),
                         len(train), len(rm_train), report)


def _cap(records: list[dict], limit: int, seed: int) -> list[dict]:
    """At most `limit` records (0: all), a seeded uniform sample in their original order: a busy
    service logs more feedback than a round's steps read, and the reference pass covers them all."""
    if not limit or len(records) <= limit:
        return records
    keep = np.sort(np.random.default_rng(seed).choice(len(records), limit, replace=False))
    return [records[i] for i in keep]


def release(cfg: Any, reg: Registry, feed: TrafficFeed, candidate: str, production: str,
            wait: Callable[[], Any] | None = None) -> dict:
    """The candidate's canary against production in ``cfg.traffic_experiment`` (rewritten with the
    weights as they change); returns {"status": "promoted" | "rolled back", "events": [...]}."""
    base = load_experiment(cfg.traffic_experiment)
    base = dataclasses.replace(base, arms=(Arm(production, production, 1.0), Arm(candidate, candidate, 0.0)),
                               control=production, registry=str(reg.root))
    plan = CanaryPlan(shares=shares_arg(cfg.canary_shares), users_per_step=cfg.canary_users_per_step,
                      max_drop=cfg.canary_max_drop)
    canary = Canary(base, candidate, reg, feed.db, plan, arm=candidate, path=cfg.traffic_experiment, printer=feed.printer)
    out = run_canary(canary, wait or (lambda: time.sleep(cfg.canary_poll)), cfg.canary_max_looks)
    # the canary left the file with the arm that stays at weight 1 (the candidate, or production)
    return {"status": out["status"], "events": out["events"]}
