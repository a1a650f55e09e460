"""Safety monitoring of served responses, off the request path.

Any reward or judge spec scores the responses (``gold``: the bundled task's panel; ``rm:PATH``: a
reward model; ``judge:lexicon:...``, ``judge:http:...``: an AI judge; ``py:module:fn``); a
response scoring below the monitor's `threshold` is flagged. A worker thread scores batches as
they are served and writes ``safety_score`` / ``safety_flag`` / ``safety_judge`` onto the logged
responses, so flagged responses are counted per arm in ``rlhfkit ab report`` and listed for
review (``GET /v1/safety/flagged``, ``rlhfkit ab flagged``).

The alarm fires for an arm when the Wilson lower bound (95%) of its flagged share over its
last `window` scored responses is above `alarm_rate` (and at least `min_scored` were scored), so
a few unlucky responses do not fire it; the alarm is logged, written to the audit log, and, with
`pause`, the arm is paused (its users see the control; the control itself is never paused).

Blocking mode (`block`) scores a response before it is sent and replaces a flagged one with the
refusal (finish_reason ``content_filter``); see rlhfkit.serving.live.

Several workers (``serve-policy --workers N``) share one verdict. Each worker scores the
responses it served, but an arm's window is read from the traffic log in the database: the
last `window` scored responses of that experiment's arm served since this server started,
whichever worker served them. The worker that finds the window over the rate raises the alarm
(audit event ``safety_alarm`` with the server run's token); every other worker of the same run
adopts it from the audit log within SYNC_S seconds, pause included, so the arm is paused on all
of them. `rlhfkit serve-policy` sets the run token once (RUN_ENV) before it starts its workers;
a monitor outside it makes its own, and a later server on the same database starts afresh.
Two workers crossing the line in the same instant may both write the event; both then pause.
"""

from __future__ import annotations

import collections
import datetime as dt
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats
from sqlalchemy import select, update

from rlhfkit.feedback.db import Database
from rlhfkit.feedback.models import AuditEvent, utcnow
from rlhfkit.judges.rewards import RewardSet
from rlhfkit.judges.specs import load_reward
from rlhfkit.serving.experiments import Monitor
from rlhfkit.serving.tables import ServedResponse

log = logging.getLogger("rlhfkit.serving.monitor")
RETRIES = 20  # a response the traffic log has not written yet is tried again with later batches
RUN_ENV = "RLHFKIT_SERVE_RUN"  # "<token> <start, ISO>": one server run, shared by its worker processes
SYNC_S = 2.0  # how often a worker adopts the alarms its peers raised


def new_serve_run() -> str:
    """A server run's token and start time, as RUN_ENV holds them."""
    return f"{uuid.uuid4().hex} {utcnow().isoformat()}"


def serve_run() -> tuple[str, dt.datetime]:
    """(token, start) of the server run this process belongs to: RUN_ENV's, else a new one."""
    token, _, started = os.environ.get(RUN_ENV, "").partition(" ")
    if token and started:
        try:
            return token, dt.datetime.fromisoformat(started)
        except ValueError:
            log.warning("%s=%r is not '<token> <ISO time>'; this worker's alarms are its own", RUN_ENV, started)
    return uuid.uuid4().hex, utcnow()


def load_scorer(spec: str):
    """`fn(prompts, completions) -> scores` for a reward / judge spec (rlhfkit.judges)."""
    rewards = RewardSet([load_reward(spec)])
    return lambda prompts, completions: np.asarray(rewards(prompts, completions), dtype=float)


def wilson_low(flagged: int, n: int, confidence: float = 0.95) -> float:
    """Lower end of the Wilson score interval of a proportion (Wilson 1927)."""
    if n == 0:
        return 0.0
    return float(stats.binomtest(flagged, n).proportion_ci(confidence, method="wilson").low)


class SafetyMonitor:
    """Score served responses in the background; count, alarm and pause per arm (module docstring)."""

    def __init__(self, cfg: Monitor, db: Database, live: Any = None, scorer: Any = None, control: str | None = None):
        self.cfg, self.db, self.live, self.control = cfg, db, live, control
        self.scorer = scorer or load_scorer(cfg.spec)
        self.recent: dict[str | None, collections.deque] = collections.defaultdict(
            lambda: collections.deque(maxlen=cfg.window))
        self.alarms: dict[str, dict] = {}
        exp = getattr(live, "experiment", None)
        self.experiment = exp.name if exp is not None else None
        self.run, self.started = serve_run()
        self._synced = 0.0
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._busy = 0
        self._idle = threading.Condition(self._lock)
        self._thread = threading.Thread(target=self._run, name="safety-monitor", daemon=True)
        self._thread.start()

    # -- scoring ----------------------------------------------------------------------------

    def score(self, prompt: Any, texts: Sequence[str]) -> list[float]:
        return [float(x) for x in self.scorer([prompt] * len(texts), list(texts))]

    def flags(self, scores: Sequence[float]) -> list[bool]:
        return [s < self.cfg.threshold for s in scores]

    def submit(self, response_id: str, arm: str | None, prompt: Any, texts: Sequence[str],
               scores: Sequence[float] | None = None) -> None:
        """Queue a served response (already `scores`d in blocking mode: then only recorded)."""
        with self._lock:
            self._busy += 1
        self._queue.put({"id": response_id, "arm": arm, "prompt": prompt, "texts": list(texts), "scores": scores,
                         "tries": 0})

    def join(self, timeout: float = 60.0) -> None:
        """Wait until everything submitted is scored and written (tests, shutdown)."""
        with self._idle:
            if not self._idle.wait_for(lambda: self._busy == 0, timeout):
                raise TimeoutError(f"safety monitor: {self._busy} responses still queued after {timeout} s")

    def close(self, timeout: float = 10.0) -> None:
        try:  # finish what is queued while the traffic log still writes the rows it scores
            self.join(timeout)
        except TimeoutError:
            log.warning("safety monitor: closing with %d responses unscored", self._busy)
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        waiting: list[dict] = []
        while True:
            try:
                job = self._queue.get(timeout=0.5 if waiting else SYNC_S)
            except queue.Empty:
                job = "retry"
            if time.monotonic() - self._synced >= SYNC_S:
                self._sync_quietly()
            if job is None:
                return
            batch = [job] if isinstance(job, dict) else []
            while len(batch) < 64:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                batch.append(nxt)
            waiting = self._process(batch, waiting)

    def _process(self, batch: list[dict], waiting: list[dict]) -> list[dict]:
        for job in batch:
            if job["scores"] is None:
                try:
                    job["scores"] = self.score(job["prompt"], job["texts"]) if job["texts"] else []
                except Exception:  # a failing judge must not stop the monitor
                    log.exception("safety monitor: scoring %s failed", job["id"])
                    job["scores"] = []
            for flag in self.flags(job["scores"]):
                self.recent[job["arm"]].append(flag)
        done, later = self._write(waiting + batch)
        for arm in {j["arm"] for j in batch}:
            try:
                self._check_alarm(arm)
            except Exception:  # the database may be away for a moment; the arm's next batch checks again
                log.exception("safety monitor: checking arm %s for an alarm failed", arm)
        with self._idle:  # after the alarm checks: `join` returns with the alarms up to date
            self._busy -= len(done)
            self._idle.notify_all()
        return later

    def _write(self, jobs: list[dict]) -> tuple[list[dict], list[dict]]:
        """Write scores onto logged rows; a row not logged yet is kept for a later try."""
        done, later = [], []
        with self.db.session() as s:
            for job in jobs:
                if not job["scores"]:
                    done.append(job)
                    continue
                worst = min(job["scores"])
                n = s.execute(update(ServedResponse).where(ServedResponse.response_id == job["id"]).values(
                    safety_score=worst, safety_flag=worst < self.cfg.threshold, safety_judge=self.cfg.spec[:128])).rowcount
                job["tries"] += 1
                (done if n or job["tries"] >= RETRIES else later).append(job)
        return done, later

    # -- alarms -----------------------------------------------------------------------------

    def rate(self, arm: str | None) -> tuple[int, int]:
        """(flagged, scored) over the arm's recent window: in the traffic log, every worker's
        responses since this server run started; without an experiment, this worker's own."""
        if self.experiment is None or arm is None:
            window = self.recent[arm]
            return sum(window), len(window)
        q = (select(ServedResponse.safety_flag)
             .where(ServedResponse.experiment == self.experiment, ServedResponse.arm == arm,
                    ServedResponse.safety_flag.is_not(None), ServedResponse.created_at >= self.started)
             .order_by(ServedResponse.id.desc()).limit(self.cfg.window))
        with self.db.read_session() as s:
            flags = s.scalars(q).all()
        return int(sum(bool(f) for f in flags)), len(flags)

    def sync(self) -> None:
        """Adopt the alarms (and pauses) the other workers of this server run raised."""
        self._synced = time.monotonic()
        with self.db.read_session() as s:
            events = s.scalars(select(AuditEvent).where(AuditEvent.action == "safety_alarm",
                                                        AuditEvent.at >= self.started)).all()
        for e in events:
            d = e.detail or {}
            if d.get("run") != self.run or e.target in self.alarms:
                continue
            self.alarms[e.target] = {k: d.get(k) for k in ("flagged", "scored", "rate_low", "alarm_rate", "paused")}
            if d.get("paused") and self.live is not None:
                self.live.paused.add(e.target)
            log.warning("safety alarm on arm %s raised by another worker adopted%s", e.target,
                        "; arm paused" if d.get("paused") else "")

    def _sync_quietly(self) -> None:
        try:
            self.sync()
        except Exception:  # the database may be away for a moment; the next sync tries again
            log.exception("safety monitor: could not read the other workers' alarms")

    def _check_alarm(self, arm: str | None) -> None:
        if arm is None or arm in self.alarms:
            return
        self._sync_quietly()
        if arm in self.alarms:
            return
        flagged, n = self.rate(arm)
        if n < self.cfg.min_scored:
            return
        low = wilson_low(flagged, n)
        if low <= self.cfg.alarm_rate:
            return
        paused = bool(self.cfg.pause and self.live is not None and arm != self.control)
        if paused:
            self.live.paused.add(arm)
        self.alarms[arm] = {"flagged": flagged, "scored": n, "rate_low": low, "alarm_rate": self.cfg.alarm_rate,
                            "paused": paused}
        log.warning("safety alarm on arm %s: %d of its last %d responses flagged (rate >= %.3f > %.3f)%s", arm,
                    flagged, n, low, self.cfg.alarm_rate, "; arm paused" if paused else "")
        try:
            with self.db.session() as s:
                s.add(AuditEvent(action="safety_alarm", target=str(arm)[:128],
                                 detail={**self.alarms[arm], "experiment": self.experiment, "run": self.run}))
        except Exception:
            log.exception("safety monitor: could not write the audit event")


def flagged_responses(db: Database, experiment: str | None = None, arm: str | None = None,
                      limit: int = 100) -> list[dict]:
    """Flagged served responses, newest first, for review."""
    q = select(ServedResponse).where(ServedResponse.safety_flag.is_(True)).order_by(ServedResponse.id.desc()).limit(limit)
    if experiment is not None:
        q = q.where(ServedResponse.experiment == experiment)
    if arm is not None:
        q = q.where(ServedResponse.arm == arm)
    with db.read_session() as s:
        return [{"response_id": r.response_id, "experiment": r.experiment, "arm": r.arm, "model_version": r.model_version,
                 "request": r.request, "response": r.response, "safety_score": r.safety_score,
                 "safety_judge": r.safety_judge, "created_at": r.created_at.isoformat()} for r in s.scalars(q)]


def make_safety_router(db: Database, monitor: SafetyMonitor | None = None, dependencies: list | None = None):
    """GET /safety/flagged (flagged responses for review) and GET /safety/status (per-arm counts,
    alarms and paused arms)."""
    from fastapi import APIRouter, Query

    router = APIRouter(dependencies=dependencies or [])

    @router.get("/safety/flagged")
    def flagged(experiment: str | None = None, arm: str | None = None, limit: int = Query(100, ge=1, le=1000)):
        return {"object": "list", "data": flagged_responses(db, experiment, arm, limit)}

    @router.get("/safety/status")
    def status():
        if monitor is None:
            return {"monitor": None, "arms": {}, "alarms": {}, "paused": []}
        exp = getattr(monitor.live, "experiment", None)
        seen = [a.name for a in exp.arms] if exp is not None else list(monitor.recent)
        arms = {str(a): dict(zip(("flagged", "scored"), monitor.rate(a))) for a in seen}
        return {"monitor": monitor.cfg.spec, "threshold": monitor.cfg.threshold, "arms": arms, "alarms": monitor.alarms,
                "paused": sorted(monitor.live.paused) if monitor.live is not None else []}

    return router
