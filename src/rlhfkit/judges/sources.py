"""Every source of preference labels behind one interface, :class:`PreferenceSource`.

Iterative RLHF (`rlhfkit loop`) and the demo ask a source to compare response pairs:
``compare(prompts, a, b)`` returns one dict per pair with ``label`` (1.0 a better, 0.0 b better,
0.5 tie, or None: no label -- the judge abstained, or nobody labelled the pair before the
deadline) and ``annotator_id``.

* :class:`SimulatedSource` -- simulated human annotators over the gold panel.
* :class:`AIJudgeSource` -- any judge from :func:`rlhfkit.judges.load_judge` (RLAIF).
* :class:`FeedbackServiceSource` -- the human-feedback service, through its HTTP API as an
  admin client (``feedback:http://host:port``; the admin API token is read from the environment
  variable ``token_env``) or through the service's own functions on its database
  (``feedback:DB_URL``): each round's pairs become a pairwise task (``POST /api/admin/tasks``
  and ``.../items``), the source polls the task's labels until ``quota`` of the pairs are
  labelled or ``deadline`` seconds pass (then it goes on with what it has and says so), and
  exports them (``GET .../export``). The task is then closed to annotators, on every exit path
  (labels in, an error, Ctrl-C): ``rlhfkit.feedback.service.tasks.close_task`` through the database,
  ``POST /api/admin/tasks/{id}/close`` over HTTP (a service too old to have it is named, and
  the task stays open there). RLHF's collect -> train -> collect cycle, with
  people in it.

:func:`to_preference_records` turns labelled pairs into TRL preference records
(`prompt`/`chosen`/`rejected`) for the reward-model and DPO recipes.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from rlhfkit.errors import ConfigError
from rlhfkit.judges.annotators import SimulatedAnnotators
from rlhfkit.judges.http import redact


@runtime_checkable
class PreferenceSource(Protocol):
    """Anything that labels response pairs."""

    name: str

    def compare(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[dict]:
        """One dict per pair with at least ``label`` (1.0 a better, 0.0 b better, 0.5 tie) and
        ``annotator_id``; extra keys (reliability, scores) are kept in the records."""
        ...


class SimulatedSource:
    """Simulated human annotators over the gold panel (Bradley-Terry noise, ties, unreliable raters)."""

    def __init__(self, beta: float = 10.0, tie_margin: float = 0.02, unreliable_frac: float = 0.0,
                 mode: str = "random", seed: int = 0, annotators=None):
        self.annotators = annotators or SimulatedAnnotators(beta=beta, tie_margin=tie_margin,
                                                            unreliable_frac=unreliable_frac, mode=mode, seed=seed)
        self.name = "simulated"

    def compare(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[dict]:
        return self.annotators.compare(list(prompts), list(a), list(b))


class AIJudgeSource:
    """An AI judge as the loop's labeller; abstentions come back as label None."""

    def __init__(self, judge):
        self.judge, self.name = judge, judge.name

    def compare(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[dict]:
        out = []
        for v in self.judge.compare(list(prompts), list(a), list(b)):
            row = {"label": v.label, "annotator_id": self.name}
            if v.p_a is not None:
                row["p_a"] = v.p_a
            out.append(row)
        return out


class _HTTPBackend:
    """The service's admin API over HTTP (the admin token from an environment variable)."""

    def __init__(self, url: str, token_env: str):
        import httpx  # the judges (or serve) extra

        token = os.environ.get(token_env, "")
        if not token:
            raise ConfigError(f"feedback source: set {token_env} to an admin API token of the service "
                              f"(rlhfkit serve create-user ... --role admin, then POST /api/login)")
        self.url, self.token = url.rstrip("/"), token
        self.client = httpx.Client(timeout=60.0, headers={"Authorization": f"Bearer {token}"})

    def _call(self, method: str, path: str, **kw):
        r = self.client.request(method, self.url + path, **kw)
        if r.status_code >= 400:
            raise ConfigError(redact(f"feedback service {method} {path}: {r.status_code} {r.text[:200]}", self.token))
        return r

    def create(self, name: str, overlap: int, instructions: str, records: list[dict]) -> int:
        tid = self._call("POST", "/api/admin/tasks", json={
            "name": name, "question_type": "pairwise", "overlap": overlap, "instructions": instructions,
            "randomize_order": True, "gold_rate": 0.0}).json()["id"]
        self._call("POST", f"/api/admin/tasks/{tid}/items", json=records)
        return tid

    def label_counts(self, tid: int) -> dict[int, int]:
        counts: dict[int, int] = {}
        for lab in self._call("GET", f"/api/admin/tasks/{tid}/labels").json():
            counts[lab["item_id"]] = counts.get(lab["item_id"], 0) + 1
        return counts

    def export(self, tid: int, aggregate: str) -> list[dict]:
        r = self._call("GET", f"/api/admin/tasks/{tid}/export",
                       params={"kind": "preferences", "aggregate": aggregate, "ties": "keep"})
        return [json.loads(line) for line in r.text.splitlines() if line.strip()]

    def close(self, tid: int) -> str:
        """Take the task away from annotators; '' when done, else why it could not be."""
        r = self.client.post(f"{self.url}/api/admin/tasks/{tid}/close")
        if r.status_code in (404, 405):
            return (f"the service at {self.url} has no task-closing endpoint (POST /api/admin/tasks/{{id}}/close); "
                    "close it there by hand")
        if r.status_code >= 400:
            return redact(f"closing it answered {r.status_code} {r.text[:200]}", self.token)
        return ""


class _DatabaseBackend:
    """The service's own functions on its database (people label through a server on that database).
    rlhfkit.feedback needs the serve extra (SQLAlchemy), so its modules are imported where used."""

    def __init__(self, db_url: str):
        from rlhfkit.feedback.db import Database

        self.db = Database(db_url, pool_size=1)

    def create(self, name: str, overlap: int, instructions: str, records: list[dict]) -> int:
        from rlhfkit.feedback.service import items, tasks

        with self.db.session() as s:
            task = tasks.create_task(s, name, "pairwise", overlap=overlap, instructions=instructions, gold_rate=0.0)
            items.import_records(s, task, records, source="loop round")
            return task.id

    def label_counts(self, tid: int) -> dict[int, int]:
        from sqlalchemy import func, select

        from rlhfkit.feedback.models import Label

        with self.db.read_session() as s:
            rows = s.execute(select(Label.item_id, func.count()).where(Label.task_id == tid).group_by(Label.item_id))
            return {int(i): int(c) for i, c in rows}

    def export(self, tid: int, aggregate: str) -> list[dict]:
        from rlhfkit.feedback.export import export_records
        from rlhfkit.feedback.models import Task

        with self.db.read_session() as s:
            return export_records(s, s.get(Task, tid), "preferences", aggregate, ties="keep")[0]

    def close(self, tid: int) -> str:
        """Take the task away from annotators: not open to all, and no members (labels and export stay)."""
        from rlhfkit.feedback.models import Task
        from rlhfkit.feedback.service import tasks

        with self.db.session() as s:
            tasks.close_task(s, s.get(Task, tid))
        return ""


class FeedbackServiceSource:
    """People labelling in the feedback service (see the module docstring).

    ``target`` is the service's address (``http://host:port``: its admin API, token in the
    environment variable ``token_env``) or its database URL (``sqlite:///feedback.db``,
    ``postgresql://...``: the service's own functions; people label through a server on it).
    """

    def __init__(self, target: str, token_env: str = "RLHFKIT_FEEDBACK_TOKEN", quota: float = 1.0,
                 deadline: float = 3600.0, poll: float = 5.0, overlap: int = 1, aggregate: str = "majority",
                 task_prefix: str = "loop", instructions: str = "Which response is better?", printer=print):
        if not 0.0 < quota <= 1.0:
            raise ConfigError(f"feedback source: quota must be in (0, 1], got {quota}")
        if target.startswith(("http://", "https://")):
            self.backend = _HTTPBackend(target, token_env)
        else:
            self.backend = _DatabaseBackend(target)
        self.quota, self.deadline, self.poll, self.overlap = float(quota), float(deadline), float(poll), int(overlap)
        self.aggregate = aggregate if overlap > 1 else "none"
        self.task_prefix, self.instructions, self.printer = task_prefix, instructions, printer
        self.name = f"feedback:{target}"
        self.rounds: list[dict] = []

    def compare(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[dict]:
        n = len(prompts)
        name = f"{self.task_prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        tid = self.backend.create(name, self.overlap, self.instructions,
                                  [{"prompt": p, "responses": [x, y], "id": str(i)}
                                   for i, (p, x, y) in enumerate(zip(prompts, a, b))])
        try:
            need = max(1, int(round(self.quota * n)))
            start = time.monotonic()
            while True:
                done = sum(c >= self.overlap for c in self.backend.label_counts(tid).values())
                if done >= need:
                    break
                if time.monotonic() - start >= self.deadline:
                    self.printer(f"feedback: deadline of {self.deadline:g}s reached with {done} of {n} pairs labelled "
                                 f"(quota {need}); training on what there is")
                    break
                time.sleep(self.poll)
            return self._labels(prompts, a, b, self.backend.export(tid, self.aggregate), name, tid, done)
        finally:  # done, failed or interrupted: annotators must not label pairs nobody will read
            self._close(tid, name)

    def _close(self, tid: int, name: str) -> None:
        try:
            problem = self.backend.close(tid)
        except Exception as e:  # noqa: BLE001 -- closing must not hide the error that ended the round
            problem = f"closing it failed ({type(e).__name__}: {e})"
        if problem:
            self.printer(f"feedback: task {name!r} (id {tid}) stays open to annotators: {problem}")

    def _labels(self, prompts, a, b, records, name, tid, done) -> list[dict]:
        """Exported records -> one label per pair (the latest record of a pair wins; None if unlabelled)."""
        index = {}
        for i, (p, x, y) in enumerate(zip(prompts, a, b)):
            index[(p, x, y)] = (i, 1.0)
            index[(p, y, x)] = (i, 0.0)
        out: list[dict] = [{"label": None, "annotator_id": self.name} for _ in prompts]
        for rec in records:
            hit = index.get((rec["prompt"], rec["chosen"], rec["rejected"]))
            if hit is None:
                continue
            i, lab = hit
            out[i] = {"label": 0.5 if rec.get("tie") else lab, "annotator_id": f"feedback:{name}"}
        got = sum(x["label"] is not None for x in out)
        self.rounds.append({"task": name, "task_id": tid, "pairs": len(prompts), "labelled": got, "complete": done})
        self.printer(f"feedback: task {name!r}: {got} of {len(prompts)} pairs labelled and exported")
        return out


SOURCES = {"simulated": SimulatedSource}


def to_preference_records(prompts: Sequence[str], a: Sequence[str], b: Sequence[str], labels: Sequence[dict],
                          keep_ties: bool = False, round: int | None = None) -> tuple[list[dict], dict]:
    """Labelled pairs -> TRL preference records; returns (records, counts).

    Ties are left out unless `keep_ties` (then written with ``tie: true`` and ``label: 0.5``,
    chosen/rejected in input order); identical responses are never a comparison, and pairs
    with an empty (whitespace-only) response are left out because preference data must not hold
    empty responses (rlhfkit.data validates that). All are counted, so nothing is dropped silently.
    """
    if not len(prompts) == len(a) == len(b) == len(labels):
        raise ValueError(f"lengths differ: {len(prompts)} prompts, {len(a)} a, {len(b)} b, {len(labels)} labels")
    records = []
    counts = {"pairs": len(labels), "ties_skipped": 0, "identical_skipped": 0, "empty_skipped": 0, "kept": 0}
    for p, x, y, lab in zip(prompts, a, b, labels):
        if not x.strip() or not y.strip():
            counts["empty_skipped"] += 1
            continue
        if x == y:
            counts["identical_skipped"] += 1
            continue
        label = float(lab["label"])
        if label == 0.5 and not keep_ties:
            counts["ties_skipped"] += 1
            continue
        chosen, rejected = (x, y) if label >= 0.5 else (y, x)
        rec = {"prompt": p, "chosen": chosen, "rejected": rejected, "label": 1.0 if label != 0.5 else 0.5,
               "tie": label == 0.5, "annotator_id": lab.get("annotator_id")}
        if "reliable" in lab:
            rec["reliable"] = bool(lab["reliable"])
        if round is not None:
            rec["round"] = round
        records.append(rec)
    counts["kept"] = len(records)
    return records, counts
