"""Human evaluation through the feedback service: ``rlhfkit eval --human feedback:URL``.

The evaluator's samples (one policy and one reference response per prompt) become a blind
pairwise task in the feedback service (``feedback:http(s)://host:port`` through the admin API,
admin token in ``$RLHFKIT_FEEDBACK_TOKEN``; or ``feedback:DB_URL`` through the service's own
functions on its database):

- **blind, randomised sides**: which model is stored as response a is drawn per item (seeded), the
  service shows the two in a random order to each annotator (``randomize_order``), and nothing in
  an item names a model; the side of each item stays with the evaluator (``human_items.jsonl``);
- **overlap**: each item is wanted from ``overlap`` annotators, for agreement;
- **gold items**: copies of the ``gold`` pairs the judge separates most clearly (score gap at
  least ``gold_margin``), with the judge's answer; the service mixes them into annotators' queues
  at ``gold_rate`` and its QC reports each annotator's accuracy on them. They are left out of the
  win rate;
- pairs whose two responses are the same text are not posted: they are ties by construction
  (counted).

The evaluation waits until ``quota`` of the items have ``overlap`` labels or ``deadline`` seconds
pass (then it reports what there is and says so). The win rate counts every label (a pick of the
policy 1, of the reference 0, a tie 1/2; "both bad" is no preference and left out), with a
bootstrap interval that resamples items (labels of one item are not independent). Agreement is
the service's QC: Krippendorff's alpha, Fleiss' kappa and mean pairwise Cohen's kappa over items
with overlap, plus each annotator's gold accuracy.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from rlhfkit.errors import ConfigError
from rlhfkit.eval.metrics import bootstrap_ci
from rlhfkit.judges.sources import _DatabaseBackend, _HTTPBackend

INSTRUCTIONS = "Which response continues the text better? Judge the responses only; pick 'tie' if neither is better."


@dataclasses.dataclass(frozen=True)
class HumanSettings:
    target: str
    quota: float = 1.0
    deadline: float = 3600.0
    poll: float = 5.0
    overlap: int = 3
    gold: int = 10
    gold_rate: float = 0.1
    gold_margin: float = 0.2
    token_env: str = "RLHFKIT_FEEDBACK_TOKEN"

    def __post_init__(self) -> None:
        if not self.target.startswith("feedback:") or len(self.target) <= len("feedback:"):
            raise ConfigError(f"--human {self.target!r}: give feedback:http(s)://HOST:PORT or feedback:DB_URL")
        if not 0.0 < self.quota <= 1.0:
            raise ConfigError(f"--human_quota must be in (0, 1], got {self.quota}")
        if self.overlap < 1 or self.gold < 0 or not 0.0 <= self.gold_rate < 1.0:
            raise ConfigError("--human_overlap must be >= 1, --human_gold >= 0 and --human_gold_rate in [0, 1)")


class _HTTP(_HTTPBackend):
    def create(self, name: str, overlap: int, gold_rate: float, records: list[dict]) -> int:
        tid = self._call("POST", "/api/admin/tasks", json={
            "name": name, "question_type": "pairwise", "overlap": overlap, "instructions": INSTRUCTIONS,
            "randomize_order": True, "gold_rate": gold_rate}).json()["id"]
        self._call("POST", f"/api/admin/tasks/{tid}/items", json=records)
        return tid

    def export_labels(self, tid: int) -> list[dict]:
        return super().export(tid, "none")

    def qc(self, tid: int) -> dict:
        return self._call("GET", f"/api/admin/tasks/{tid}/qc").json()


class _DB(_DatabaseBackend):
    def create(self, name: str, overlap: int, gold_rate: float, records: list[dict]) -> int:
        from rlhfkit.feedback.service import items, tasks  # the serve extra, as in the base class

        with self.db.session() as s:
            task = tasks.create_task(s, name, "pairwise", overlap=overlap, instructions=INSTRUCTIONS,
                                     randomize_order=True, gold_rate=gold_rate)
            items.import_records(s, task, records, source="rlhfkit eval --human")
            return task.id

    def export_labels(self, tid: int) -> list[dict]:
        return super().export(tid, "none")

    def qc(self, tid: int) -> dict:
        from rlhfkit.feedback.export import task_qc
        from rlhfkit.feedback.models import Task

        with self.db.read_session() as s:
            return task_qc(s, s.get(Task, tid))


def backend(settings: HumanSettings):
    target = settings.target[len("feedback:"):]
    return _HTTP(target, settings.token_env) if target.startswith(("http://", "https://")) else _DB(target)


def build_items(rows: Sequence[dict], settings: HumanSettings, seed: int) -> tuple[list[dict], list[dict], dict]:
    """(items to post, the evaluator's key of each item, counts): blind pairs with random sides,
    and gold copies of the clearest pairs (module docstring)."""
    rng = np.random.default_rng(seed)
    items, key, identical = [], [], 0
    for i, row in enumerate(rows):
        pol, ref = row["response"], row["reference"]
        if pol == ref or not pol.strip() or not ref.strip():
            identical += pol == ref
            continue
        policy_side = "a" if rng.random() < 0.5 else "b"
        responses = [pol, ref] if policy_side == "a" else [ref, pol]
        items.append({"id": f"h{i}", "prompt": row["prompt"], "responses": responses})
        key.append({"id": f"h{i}", "prompt": row["prompt"], "policy": pol, "reference": ref, "policy_side": policy_side})
    gaps = sorted(((abs(r["gold"] - r["gold_reference"]), i) for i, r in enumerate(rows)
                   if r["response"] != r["reference"] and "gold" in r), reverse=True)
    gold = []
    for gap, i in gaps[:settings.gold]:
        if gap < settings.gold_margin:
            break
        r = rows[i]
        better, worse = (r["response"], r["reference"]) if r["gold"] > r["gold_reference"] else (r["reference"], r["response"])
        first = rng.random() < 0.5
        gold.append({"id": f"g{i}", "prompt": r["prompt"], "responses": [better, worse] if first else [worse, better],
                     "gold": {"choice": "a" if first else "b"}})
    return items + gold, key, {"posted": len(items), "gold": len(gold), "identical": identical,
                               "prompts": len(rows)}


def win_rate(labels: Sequence[dict], key: Sequence[dict], identical: int, n_boot: int, seed: int) -> dict:
    """The policy's win rate over labels (ties half, identical pairs ties), intervals over items."""
    lookup = {}
    for j, k in enumerate(key):
        lookup[(k["prompt"], k["policy"], k["reference"])] = (j, 1.0)
        lookup[(k["prompt"], k["reference"], k["policy"])] = (j, 0.0)
    values, clusters, ties = [], [], 0
    for rec in labels:
        hit = lookup.get((rec["prompt"], rec["chosen"], rec["rejected"]))
        if hit is None:
            continue  # a gold copy, or an item of another evaluation
        j, v = hit
        if rec.get("tie"):
            v, ties = 0.5, ties + 1
        values.append(v)
        clusters.append(j)
    values += [0.5] * identical
    clusters += list(range(len(key), len(key) + identical))
    if not values:
        return {"mean": None, "lo": None, "hi": None, "n": 0, "labels": 0, "items": 0, "ties": 0}
    ci = bootstrap_ci(np.asarray(values), n_boot=n_boot, seed=seed, clusters=np.asarray(clusters))
    return {**ci, "labels": len(values) - identical, "items": len(set(clusters)) - identical, "ties": ties}


def run_human_eval(rows: Sequence[dict], settings: HumanSettings, n_boot: int = 1000, seed: int = 0,
                   printer: Callable[[str], Any] = print, name: str | None = None) -> tuple[dict, list[dict]]:
    """Post the task, wait for the quota or the deadline, and report (module docstring); returns
    the report and the evaluator's key of the items (which side was the policy)."""
    client = backend(settings)
    records, key, counts = build_items(rows, settings, seed)
    if not counts["posted"]:
        raise ConfigError("--human: every policy response equals the reference's; there is nothing to compare")
    name = name or f"eval-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    tid = client.create(name, settings.overlap, settings.gold_rate if counts["gold"] else 0.0, records)
    printer(f"eval --human: posted task {name!r} (id {tid}): {counts['posted']} blind pairs and {counts['gold']} gold "
            f"items, {settings.overlap} labels wanted per pair")
    try:
        need, start = max(1, int(round(settings.quota * len(records)))), time.monotonic()
        while True:
            done = sum(c >= settings.overlap for c in client.label_counts(tid).values())
            if done >= need:
                break
            if time.monotonic() - start >= settings.deadline:
                printer(f"eval --human: deadline of {settings.deadline:g}s reached with {done} of {len(records)} items "
                        f"fully labelled (quota {need}); reporting what there is")
                break
            time.sleep(settings.poll)
        labels, qc = client.export_labels(tid), client.qc(tid)
    finally:
        client.close(tid)
    result = {"task": name, "task_id": tid, "complete": done >= need, **counts,
              "win_rate": win_rate(labels, key, counts["identical"], n_boot, seed),
              "agreement": qc.get("agreement", {}),
              "annotators": [{"user": a["user"], "labels": a["labels"], "gold_answered": a["gold_answered"],
                              "gold_accuracy": a["gold_correct"] / a["gold_answered"] if a["gold_answered"] else None,
                              "flags": a["flags"]} for a in qc.get("annotators", [])]}
    return result, key
