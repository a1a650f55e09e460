"""Canary releases: grow while the evidence holds, promote when better, roll back at once when
worse or a guardrail trips; every decision in the registry and the audit log with its evidence."""

from __future__ import annotations

import datetime as dt
import time
import types

import numpy as np
import pytest
from sqlalchemy import insert, select

from rlhfkit.errors import ConfigError
from rlhfkit.feedback.db import Database, upgrade
from rlhfkit.feedback.models import AuditEvent
from rlhfkit.models.registry import Registry
from rlhfkit.serving.canary import (
    Canary,
    CanaryPlan,
    experiment_yaml,
    follow_experiment,
    run_canary,
)
from rlhfkit.serving.experiments import load_experiment, parse_experiment
from rlhfkit.serving.tables import ServedResponse, UseFeedback


def _setup(tmp_path, db_url, guardrails=None):
    reg = Registry(tmp_path / "registry")
    for name, gold in (("prod", 0.1), ("cand", 0.2)):
        (tmp_path / name).mkdir()
        reg.register(tmp_path / name, model_id=name, metrics={"gold": gold})
    reg.promote("prod")
    base = parse_experiment({"name": "live", "control": "production",
                             "arms": {"production": {"model": "prod"}, "other": {"model": "prod", "weight": 0}},
                             "decision": {"metric": "thumbs_up", "min_users": 30},
                             "guardrails": guardrails or {"safety_flag_rate": 0.05}, "registry": str(tmp_path / "registry")})
    upgrade(db_url)
    return reg, base, Database(db_url, pool_size=1)


class Users:
    """Users arrive in waves; each is routed by the canary's current experiment and thumbs two
    responses, up with the arm's probability."""

    def __init__(self, db, p_up, latency=None, seed=0):
        self.db, self.p_up, self.latency = db, p_up, latency or {}
        self.rng, self.n = np.random.default_rng(seed), 0
        self.t0 = dt.datetime(2026, 12, 1)

    def wave(self, canary: Canary, users: int = 40) -> None:
        exp = canary.experiment()
        served, fb = [], []
        for _ in range(users):
            unit = f"user{self.n}"
            arm = exp.assign(unit).name
            for j in range(2):
                rid = f"r{self.n}-{j}"
                t = self.t0 + dt.timedelta(seconds=self.n)
                served.append(dict(response_id=rid, experiment=exp.name, arm=arm, model_version=exp.arm(arm).model,
                                   user_key=exp.user_key(unit), endpoint="completions", request="hi", response=["ok"],
                                   sampling={}, latency_ms=float(self.rng.normal(self.latency.get(arm, 100), 5)),
                                   status=200, created_at=t, safety_flag=False))
                fb.append(dict(response_id=rid, kind="thumbs", value={"up": bool(self.rng.random() < self.p_up[arm]),
                                                                      "choice": 0}, user_key=exp.user_key(unit), created_at=t))
            self.n += 1
        with self.db.session() as s:
            s.execute(insert(ServedResponse), served)
            s.execute(insert(UseFeedback), fb)


def test_better_candidate_grows_then_is_promoted(tmp_path, db_url):
    reg, base, db = _setup(tmp_path, db_url)
    seen = []
    # a wide margin: shown not much worse long before it is shown better, so it grows on the way
    canary = Canary(base, "cand", reg, db, CanaryPlan(shares=(0.1, 0.3, 0.5), users_per_step=15, max_drop=0.2),
                    on_change=seen.append, path=tmp_path / "exp.yaml", printer=lambda *a: None)
    assert canary.share == 0.1 and [a.weight for a in seen[0].arms] == [0.9, 0.1]
    users = Users(db, {"production": 0.5, "candidate": 0.75})
    out = run_canary(canary, lambda: users.wave(canary, 60), deadline_steps=60)
    assert out["status"] == "promoted", [e["reason"] for e in out["events"]]
    actions = [e["action"] for e in out["events"]]
    assert actions[-1] == "promote" and "grow" in actions
    assert reg.promoted()["id"] == "cand"
    hist = [h for h in reg.history() if h["id"] == "cand"]
    assert [h["action"] for h in hist][-2:] == ["promote", "canary_promote"]
    ev = hist[-1]["evidence"]
    assert ev["verdict"] == "better" and ev["low"] > 0 and ev["guardrails"] == {"safety_flag_rate": "ok"}
    with db.read_session() as s:
        audit = [a.action for a in s.scalars(select(AuditEvent).order_by(AuditEvent.id))]
    assert audit[-1] == "canary_promote" and "canary_grow" in audit
    # the published experiment: the candidate now takes all traffic, and the file reads back
    assert [a.weight for a in seen[-1].arms] == [0.0, 1.0]
    assert load_experiment(tmp_path / "exp.yaml").arm("candidate").weight == 1.0
    db.dispose()


def test_worse_candidate_is_rolled_back_at_its_canary_share(tmp_path, db_url):
    reg, base, db = _setup(tmp_path, db_url)
    canary = Canary(base, "cand", reg, db, CanaryPlan(shares=(0.05, 0.5), users_per_step=200), printer=lambda *a: None)
    users = Users(db, {"production": 0.8, "candidate": 0.1})
    shares = []
    out = run_canary(canary, lambda: (users.wave(canary, 100), shares.append(canary.share)), deadline_steps=40)
    assert out["status"] == "rolled back" and out["last"]["reason"] == "thumbs_up worse than production"
    assert set(shares) == {0.05} and canary.share == 0.0  # never grew past its canary share
    assert reg.promoted()["id"] == "prod" and reg.history()[-1]["action"] == "canary_rollback"
    assert reg.history()[-1]["evidence"]["verdict"] == "worse"


def test_guardrail_trips_roll_back_although_the_metric_is_better(tmp_path, db_url):
    reg, base, db = _setup(tmp_path, db_url, guardrails={"latency_ms": 20})
    canary = Canary(base, "cand", reg, db, CanaryPlan(shares=(0.2, 0.5), users_per_step=500), printer=lambda *a: None)
    users = Users(db, {"production": 0.5, "candidate": 0.6}, latency={"candidate": 200})
    out = run_canary(canary, lambda: users.wave(canary, 50), deadline_steps=30)
    assert out["status"] == "rolled back" and out["last"]["reason"] == "guardrail latency_ms breached"
    assert reg.promoted()["id"] == "prod"


def test_plan_errors_and_deadline(tmp_path):
    with pytest.raises(ConfigError, match="increasing"):
        CanaryPlan(shares=(0.5, 0.1))
    with pytest.raises(ConfigError, match="increasing"):
        CanaryPlan(shares=(0.1, 1.0))
    reg, base, db = _setup(tmp_path, f"sqlite:///{tmp_path}/fb.db")
    canary = Canary(base, "cand", reg, db, printer=lambda *a: None)
    out = run_canary(canary, lambda: None, deadline_steps=2)  # nobody comes
    assert out["status"] == "rolled back" and "no decision after 2 looks" in out["last"]["reason"]
    with pytest.raises(ConfigError, match="control"):
        Canary(base, "cand", reg, db, arm="production")


def test_a_server_follows_the_experiment_file(tmp_path):
    reg, base, db = _setup(tmp_path, f"sqlite:///{tmp_path}/fb.db")
    path = tmp_path / "exp.yaml"
    path.write_text(experiment_yaml(base))
    app = types.SimpleNamespace(state=types.SimpleNamespace(models={"production": "m0"},
                                                            live=types.SimpleNamespace(experiment=base)))
    loaded = []
    stop = follow_experiment(app, path, lambda arm: loaded.append(arm.name) or f"model {arm.model}", poll_s=0.05)
    try:
        canary = Canary(base, "cand", reg, db, path=path, printer=lambda *a: None)
        for _ in range(100):
            if app.state.live.experiment.arm_names == ["production", "candidate"]:
                break
            time.sleep(0.05)
        assert app.state.live.experiment.arm("candidate").weight == canary.share
        assert loaded == ["candidate"] and app.state.models["candidate"] == "model cand"
    finally:
        stop()


def test_a_candidate_grows_only_once_shown_within_the_margin(tmp_path, db_url):
    """Slightly worse (0.45 vs 0.6 thumbs up): too few users for a 'worse' verdict, yet it must not
    grow on that silence; with no margin (the earlier rule) it grows at the first step."""
    reg, base, db = _setup(tmp_path, db_url)
    plan = CanaryPlan(shares=(0.2, 0.5), users_per_step=10, max_drop=0.05)
    canary = Canary(base, "cand", reg, db, plan, printer=lambda *a: None)
    users = Users(db, {"production": 0.6, "candidate": 0.45})
    events = [canary.step() for _ in range(4) if not users.wave(canary, 40)]
    assert canary.status == "running" and canary.share == 0.2, [e["action"] for e in events]
    assert all(e["action"] == "keep running" and e["evidence"]["verdict"] != "worse" for e in events)
    assert max(e["evidence"]["candidate_users"] for e in events) >= 20  # enough users for a step, had silence counted
    (tmp_path / "again").mkdir()
    reg2, base2, db2 = _setup(tmp_path / "again", f"sqlite:///{tmp_path}/again/fb.db")
    loose = Canary(base2, "cand", reg2, db2, CanaryPlan(shares=(0.2, 0.5), users_per_step=10, max_drop=None),
                   printer=lambda *a: None)
    users2 = Users(db2, {"production": 0.6, "candidate": 0.45})
    first = [loose.step() for _ in range(4) if not users2.wave(loose, 40)]
    grow = next(e for e in first if e["action"] == "grow")
    assert grow["evidence"]["verdict"] != "worse" and grow["evidence"]["low"] < -0.05
    with pytest.raises(ConfigError, match="max_drop"):
        CanaryPlan(max_drop=-0.1)
