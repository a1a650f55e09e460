"""Several server workers share one safety verdict: an arm's window is read from the traffic log,
and an alarm one worker raises pauses the arm on every worker of the same server run."""

from __future__ import annotations

import time
import types

from sqlalchemy import insert, select

from rlhfkit.feedback.db import Database, upgrade
from rlhfkit.feedback.models import AuditEvent, utcnow
from rlhfkit.serving import monitor as M
from rlhfkit.serving.experiments import Arm, Experiment, Monitor
from rlhfkit.serving.tables import ServedResponse

EXP = Experiment(name="live", arms=(Arm("a", "m-a", 0.5), Arm("b", "m-b", 0.5)), control="a", salt="s")
CFG = Monitor(spec="test", threshold=0.0, alarm_rate=0.2, min_scored=8, pause=True)


def rude(prompts, completions):
    return [-1.0 if "from b" in c else 1.0 for c in completions]


def _worker(db_url: str) -> tuple[M.SafetyMonitor, types.SimpleNamespace]:
    live = types.SimpleNamespace(experiment=EXP, paused=set())
    return M.SafetyMonitor(CFG, Database(db_url), live, scorer=rude, control="a"), live


def _serve(db_url: str, mon: M.SafetyMonitor, ids: list[str], arm: str) -> None:
    """Log responses as the traffic log would, then let `mon` score them."""
    with Database(db_url).session() as s:
        s.execute(insert(ServedResponse), [dict(response_id=i, experiment="live", arm=arm, model_version=f"m-{arm}",
                                                request="p", response=[f"answer from {arm}"], sampling={},
                                                latency_ms=1.0, created_at=utcnow()) for i in ids])
    for i in ids:
        mon.submit(i, arm, "p", [f"answer from {arm}"])
    mon.join()


def test_an_alarm_counts_every_workers_responses_and_pauses_the_arm_everywhere(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path}/fb.db"
    upgrade(url)
    monkeypatch.setenv(M.RUN_ENV, M.new_serve_run())
    (m1, live1), (m2, live2) = _worker(url), _worker(url)
    other = None
    try:
        _serve(url, m1, [f"w1-{i}" for i in range(5)], "b")
        _serve(url, m1, [f"w1-a{i}" for i in range(3)], "a")
        assert m1.rate("b") == (5, 5) and not m1.alarms  # 5 < min_scored 8
        _serve(url, m2, [f"w2-{i}" for i in range(4)], "b")
        # worker 2 saw only 4 responses of b itself, but the window holds all 9
        assert m2.rate("b") == (9, 9) and m2.rate("a") == (0, 3)
        assert m2.alarms["b"]["paused"] is True and live2.paused == {"b"}
        deadline = time.monotonic() + 10 * M.SYNC_S
        while live1.paused != {"b"} and time.monotonic() < deadline:
            time.sleep(0.1)
        assert live1.paused == {"b"} and m1.alarms["b"]["flagged"] == 9
        with Database(url).read_session() as s:
            events = s.scalars(select(AuditEvent).where(AuditEvent.action == "safety_alarm")).all()
        assert [(e.target, e.detail["run"], e.detail["experiment"]) for e in events] == [("b", m2.run, "live")]
        # a later server run on the same database neither adopts the alarm nor counts the old responses
        monkeypatch.setenv(M.RUN_ENV, M.new_serve_run())
        other, live_other = _worker(url)
        other.sync()
        assert not other.alarms and live_other.paused == set() and other.rate("b") == (0, 0)
    finally:
        for m in (m1, m2, other):
            if m is not None:
                m.close()


def test_a_worker_outside_serve_policy_has_its_own_run(monkeypatch):
    monkeypatch.delenv(M.RUN_ENV, raising=False)
    assert M.serve_run()[0] != M.serve_run()[0]
    monkeypatch.setenv(M.RUN_ENV, "abc 2026-01-02T03:04:05")
    assert M.serve_run() == ("abc", __import__("datetime").datetime(2026, 1, 2, 3, 4, 5))
