"""A/B analysis: the sequential test's error rate under peeking and its power, Bradley-Terry
against a hand-worked example, intervals, and the report / promote / rollback commands."""

from __future__ import annotations

import datetime as dt
import json
import math

import numpy as np
import pytest
from scipy import special, stats
from sqlalchemy import insert, select

from rlhfkit.feedback.db import Database, upgrade
from rlhfkit.feedback.models import AuditEvent
from rlhfkit.models.registry import Registry
from rlhfkit.serving import ab
from rlhfkit.serving.ab_cli import cli
from rlhfkit.serving.abstats import bradley_terry, mean_interval, quantile_interval, sequential_test
from rlhfkit.serving.experiments import load_experiment
from rlhfkit.serving.tables import ServedResponse, UseFeedback

# ---------------------------------------------------------------------------------------------
# the sequential test


def _peeking_rejections(rng, p_control: float, p_candidate: float, experiments: int, users: int = 2000,
                        every: int = 50, naive: bool = False) -> list[int | None]:
    """Users at which each simulated experiment first rejects (None: never), looking every `every` users.
    Each user gives 1-3 thumbs; their value is their share of thumbs up."""
    out = []
    for _ in range(experiments):
        g = rng.integers(0, 2, users)
        k = rng.integers(1, 4, users)
        x = rng.binomial(k, np.where(g == 1, p_candidate, p_control)) / k
        if naive:  # a fixed-horizon Welch test read at every look: what peeking does to it
            looks = np.arange(every, users + 1, every)
            n0, n1 = (np.cumsum(g == 0)[looks - 1], np.cumsum(g == 1)[looks - 1])
            m0, m1 = np.cumsum(x * (g == 0))[looks - 1] / n0, np.cumsum(x * (g == 1))[looks - 1] / n1
            v0 = (np.cumsum(x**2 * (g == 0))[looks - 1] - n0 * m0**2) / (n0 - 1)
            v1 = (np.cumsum(x**2 * (g == 1))[looks - 1] - n1 * m1**2) / (n1 - 1)
            z = np.abs(m1 - m0) / np.sqrt(v0 / n0 + v1 / n1)
            hit = np.nonzero(z > stats.norm.ppf(0.975))[0]
            out.append(int(looks[hit[0]]) if hit.size else None)
        else:
            out.append(sequential_test(x, g, alpha=0.05, mixture_sd=0.2, every=every).first_rejection)
    return out


def test_aa_false_positive_rate_under_peeking_every_50_users_is_at_most_alpha():
    rng = np.random.default_rng(0)
    hits = _peeking_rejections(rng, 0.6, 0.6, experiments=400)
    rate = np.mean([h is not None for h in hits])
    assert rate <= 0.05, rate
    # the simulation can see the problem the test solves: the same peeking inflates a t-test
    naive = np.mean([h is not None for h in _peeking_rejections(rng, 0.6, 0.6, experiments=200, naive=True)])
    assert naive > 0.15, naive


def test_aa_false_positive_rate_looking_after_every_user_is_at_most_alpha():
    """Continuous monitoring, the report's own use: early looks see a handful of users, whose
    per-group variance is often 0; the test must not reject on them."""
    rng = np.random.default_rng(4)
    for p in (0.5, 0.9):
        rate = np.mean([sequential_test(rng.binomial(1, p, 1000).astype(float), rng.integers(0, 2, 1000)).rejected
                        for _ in range(300)])
        assert rate <= 0.05, (p, rate)


def test_a_rare_event_not_yet_seen_does_not_give_a_zero_width_confidence_sequence():
    """Safety flags at 0.5% in the candidate, none in the control: the first hundreds of users
    show no flag at all. The bounded variance keeps the sequence honest: it covers the true
    difference at every look, together, in at least 95% of experiments."""
    rng = np.random.default_rng(5)
    miss = 0
    for _ in range(200):
        g = rng.integers(0, 2, 2000)
        x = rng.binomial(1, np.where(g == 1, 0.005, 0.0)).astype(float)
        r = sequential_test(x, g, bounded=True)
        miss += bool(np.any((r.low > 0.005) | (r.high < 0.005)))
    assert miss / 200 <= 0.05, miss


def test_power_on_a_clear_difference():
    rng = np.random.default_rng(1)
    hits = _peeking_rejections(rng, 0.5, 0.62, experiments=100)
    assert np.mean([h is not None for h in hits]) >= 0.9
    assert np.median([h for h in hits if h is not None]) < 1500


def test_the_direction_and_a_one_sample_win_rate():
    rng = np.random.default_rng(2)
    g = rng.integers(0, 2, 1500)
    worse = sequential_test(rng.binomial(1, np.where(g == 1, 0.4, 0.6)).astype(float), g)
    assert worse.direction == -1 and worse.high[-1] < 0
    # one-sample form: a candidate's share of side-by-side picks against 1/2
    picks = rng.binomial(1, 0.65, 600).astype(float)
    res = sequential_test(picks, np.ones(600, int), null=0.5)
    assert res.direction == 1 and res.low[-1] > 0.5 and res.estimate[-1] == pytest.approx(picks.mean())
    fp = np.mean([sequential_test(rng.binomial(1, 0.5, 1000).astype(float), np.ones(1000, int), null=0.5,
                                  every=50).rejected for _ in range(300)])
    assert fp <= 0.05


def test_the_confidence_sequence_covers_the_effect_at_every_look_together():
    rng = np.random.default_rng(3)
    miss = 0
    for _ in range(200):
        g = rng.integers(0, 2, 1000)
        x = rng.normal(np.where(g == 1, 0.3, 0.0), 1.0)
        r = sequential_test(x, g, every=10)
        miss += bool(np.any((r.low > 0.3) | (r.high < 0.3)))
    assert miss / 200 <= 0.05


# ---------------------------------------------------------------------------------------------
# Bradley-Terry and intervals


def test_bradley_terry_on_a_hand_worked_example():
    """Strengths 4 : 2 : 1. A played B 3 times (won 3 * 4/6 = 2), B played C 3 times (won 2), A
    played C 5 times (won 5 * 4/5 = 4): every pair's wins equal their expectation, so the score
    equations  wins_i = sum_j n_ij pi_i / (pi_i + pi_j)  hold at pi = (4, 2, 1) exactly."""
    wins = np.array([[0, 2, 4], [1, 0, 2], [1, 1, 0]])
    bt = bradley_terry(wins, reference=2)
    np.testing.assert_allclose(np.exp(bt.theta), [4.0, 2.0, 1.0], rtol=1e-6)
    assert bt.win_probability(0, 1) == pytest.approx(2 / 3, rel=1e-6) and not bt.smoothed
    # two arms: the MLE is the win share, its variance 1 / (n p (1 - p)) on the logit scale
    two = bradley_terry(np.array([[0, 30], [10, 0]]), reference=1)
    assert two.win_probability(0, 1) == pytest.approx(0.75, rel=1e-6)
    assert two.cov[0, 0] == pytest.approx(1 / (40 * 0.75 * 0.25), rel=1e-6)
    m, lo, hi = two.win_interval(0)
    z = stats.norm.ppf(0.975)
    assert (lo, hi) == pytest.approx((special.expit(math.log(3) - z * math.sqrt(two.cov[0, 0])),
                                      special.expit(math.log(3) + z * math.sqrt(two.cov[0, 0]))), rel=1e-6)


def test_an_arm_that_never_lost_gets_a_finite_smoothed_strength():
    bt = bradley_terry(np.array([[0, 5], [0, 0]]), reference=1)
    assert bt.smoothed and bt.win_probability(0, 1) == pytest.approx(5.5 / 6, rel=1e-6)


def test_intervals():
    x = np.arange(1.0, 11.0)
    m, lo, hi = mean_interval(x)
    half = stats.t.ppf(0.975, 9) * x.std(ddof=1) / math.sqrt(10)
    assert (m, lo, hi) == pytest.approx((5.5, 5.5 - half, 5.5 + half))
    # order statistics: for n = 100 and the median, ranks 40 and 60 (binomial 2.5% and 97.5% points)
    q, qlo, qhi = quantile_interval(np.arange(1.0, 101.0), 0.5)
    assert (q, qlo, qhi) == (50.5, 40.0, 61.0)
    assert all(math.isnan(v) for v in mean_interval([]))


# ---------------------------------------------------------------------------------------------
# the analysis and the commands, on logged traffic

EXPERIMENT = """\
name: kindly-ab
control: sft
arms:
  sft: {{model: sft-r0, weight: 0.5}}
  ppo: {{model: ppo-r1, weight: 0.5}}
decision: {{metric: thumbs_up, min_users: 30}}
guardrails: {{safety_flag_rate: 0.02, latency_ms: 50}}
registry: {registry}
"""


def fill(db_url: str, users: int, p_up: dict, flag: dict, seed: int = 0) -> None:
    """`users` users, each assigned an arm, served 2 responses, thumbing each (up with p_up[arm])."""
    rng = np.random.default_rng(seed)
    upgrade(db_url)
    db = Database(db_url, pool_size=1)
    t0 = dt.datetime(2026, 12, 1)
    served, feedback = [], []
    for u in range(users):
        arm = "ppo" if u % 2 else "sft"
        for j in range(2):
            rid = f"r{u}-{j}"
            served.append(dict(response_id=rid, experiment="kindly-ab", arm=arm, model_version=f"{arm}-v", user_key=f"u{u}",
                               endpoint="chat", request=[{"role": "user", "content": "hi"}], response=["ok"], sampling={},
                               prompt_tokens=2, completion_tokens=3, latency_ms=float(rng.normal(100, 10)), status=200,
                               created_at=t0 + dt.timedelta(seconds=u), safety_flag=bool(rng.random() < flag[arm])))
            feedback.append(dict(response_id=rid, kind="thumbs", value={"up": bool(rng.random() < p_up[arm]), "choice": 0},
                                 user_key=f"u{u}", created_at=t0 + dt.timedelta(seconds=u)))
    with db.session() as s:
        s.execute(insert(ServedResponse), served)
        s.execute(insert(UseFeedback), feedback)
    db.dispose()


@pytest.fixture
def setup(tmp_path):
    reg = Registry(tmp_path / "registry")
    for name, gold in (("sft-r0", 0.1), ("ppo-r1", 0.2)):
        (tmp_path / name).mkdir()
        reg.register(tmp_path / name, model_id=name, metrics={"gold": gold})
    reg.promote("sft-r0")
    path = tmp_path / "exp.yaml"
    path.write_text(EXPERIMENT.format(registry=tmp_path / "registry"))
    return {"exp": load_experiment(path), "path": str(path), "db": f"sqlite:///{tmp_path}/fb.db", "reg": reg,
            "tmp": tmp_path}


def test_a_better_candidate_within_its_guardrails_is_promoted(setup, capsys):
    fill(setup["db"], 600, {"sft": 0.45, "ppo": 0.75}, {"sft": 0.0, "ppo": 0.0})
    db = Database(setup["db"], pool_size=1)
    r = ab.analyse(setup["exp"], db)
    db.dispose()
    assert r["decision"] == "promote" and r["arm"] == "ppo", r["reasons"]
    c = r["comparisons"]["ppo"]
    assert c["verdict"] == "better" and 0.2 < c["estimate"] < 0.4 and c["low"] > 0 and c["first_rejection"] < 600
    assert {m: g["status"] for m, g in c["guardrails"].items()} == {"safety_flag_rate": "ok", "latency_ms": "ok"}
    assert r["arms"]["ppo"]["users"] == 300 and r["arms"]["ppo"]["responses"] == 600
    assert r["arms"]["sft"]["thumbs_up"]["low"] < 0.45 < r["arms"]["sft"]["thumbs_up"]["high"]
    html_out = setup["tmp"] / "report.html"
    assert cli(["report", setup["path"], "--db", setup["db"], "--html", str(html_out)]) == 0
    text = capsys.readouterr().out
    assert "decision: PROMOTE ppo" in text and "ppo vs sft: thumbs_up" in text
    page = html_out.read_text()
    assert page.count("data:image/png;base64,") == 2 and "Decision: <b>promote</b>" in page
    assert cli(["report", setup["path"], "--db", setup["db"], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["decision"] == "promote"
    # promote moves the registry's promoted model and leaves an audit trail; rollback undoes it
    assert cli(["promote", setup["path"], "--db", setup["db"]]) == 0
    assert setup["reg"].promoted()["id"] == "ppo-r1"
    assert "ab kindly-ab: thumbs_up" in setup["reg"].history()[-1]["reason"]
    assert cli(["rollback", setup["path"], "--db", setup["db"], "--reason", "complaints"]) == 0
    assert setup["reg"].promoted()["id"] == "sft-r0"
    db = Database(setup["db"], pool_size=1)
    with db.read_session() as s:
        events = [(e.action, e.target, e.detail.get("model") or e.detail.get("to")) for e in s.scalars(select(AuditEvent))]
    db.dispose()
    assert events == [("ab_promote", "kindly-ab", "ppo-r1"), ("ab_rollback", "kindly-ab", "sft-r0")]


def test_a_breached_guardrail_rolls_back_and_promotion_is_refused(setup, capsys):
    fill(setup["db"], 600, {"sft": 0.45, "ppo": 0.75}, {"sft": 0.0, "ppo": 0.3})
    db = Database(setup["db"], pool_size=1)
    r = ab.analyse(setup["exp"], db)
    db.dispose()
    assert r["decision"] == "roll back" and r["comparisons"]["ppo"]["guardrails"]["safety_flag_rate"]["status"] == "breached"
    assert cli(["promote", setup["path"], "--db", setup["db"]]) == 2
    assert "the analysis says 'roll back'" in capsys.readouterr().err
    assert setup["reg"].promoted()["id"] == "sft-r0"


def test_too_few_users_keeps_running(setup):
    fill(setup["db"], 40, {"sft": 0.2, "ppo": 0.9}, {"sft": 0.0, "ppo": 0.0})
    db = Database(setup["db"], pool_size=1)
    r = ab.analyse(setup["exp"], db)
    db.dispose()
    assert r["decision"] == "keep running" and "fewer than min_users 30" in r["reasons"][0]


def test_pairwise_picks_give_bradley_terry_win_rates(setup):
    fill(setup["db"], 60, {"sft": 0.5, "ppo": 0.5}, {"sft": 0.0, "ppo": 0.0})
    db = Database(setup["db"], pool_size=1)
    with db.session() as s:  # user u0 (sft) compared their response with a ppo one 4 times: ppo won 3
        s.execute(insert(UseFeedback), [dict(response_id="r0-0", other_response_id="r1-0", kind="pairwise",
                                             value={"chosen": "r1-0" if i < 3 else "r0-0", "choice": 0},
                                             created_at=dt.datetime(2026, 12, 2)) for i in range(4)])
    r = ab.analyse(setup["exp"], db)
    db.dispose()
    assert r["arms"]["ppo"]["win_rate"]["mean"] == pytest.approx(0.75, rel=1e-6)
    assert r["arms"]["ppo"]["pairwise"] == 4 and r["arms"]["sft"]["win_rate"]["mean"] == 0.5


def test_export_traffic_flagged_and_purge_commands(setup, capsys):
    from rlhfkit.feedback import cli as feedback_cli

    fill(setup["db"], 40, {"sft": 0.5, "ppo": 0.5}, {"sft": 0.0, "ppo": 1.0})
    tmp = setup["tmp"]
    assert cli(["export", setup["path"], "--db", setup["db"], "--kind", "kto", "--output", str(tmp / "kto.jsonl")]) == 0
    kto = [json.loads(line) for line in (tmp / "kto.jsonl").read_text().splitlines()]
    assert len(kto) == 80 and {k["arm"] for k in kto} == {"sft", "ppo"} and all(isinstance(k["label"], bool) for k in kto)
    assert cli(["traffic", setup["path"], "--db", setup["db"], "--output", str(tmp / "traffic.jsonl")]) == 0
    assert len((tmp / "traffic.jsonl").read_text().splitlines()) == 80
    assert cli(["flagged", setup["path"], "--db", setup["db"], "--output", str(tmp / "flagged.jsonl")]) == 0
    flagged = [json.loads(line) for line in (tmp / "flagged.jsonl").read_text().splitlines()]
    assert len(flagged) == 40 and {f["meta"]["arm"] for f in flagged} == {"ppo"} and flagged[0]["prompt"] == "user: hi"
    # the flagged responses go to the feedback app for review as they are
    assert feedback_cli.cli(["import", "--db", setup["db"], "--task", "safety-review", "--type", "thumbs",
                             str(tmp / "flagged.jsonl")]) == 0
    assert "imported 40 items" in capsys.readouterr().out
    assert cli(["purge", "--db", setup["db"], "--older_than_days", "1"]) == 0
    assert "deleted 80 served responses" in capsys.readouterr().out
