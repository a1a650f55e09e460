"""Gao et al. 2022 fits, the best-of-N estimator, the reward-hacking and collapse alarms on synthetic data."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from rlhfkit.eval import overopt as O


def test_bon_fit_recovers_coefficients_exactly_without_noise():
    kl = O.bon_kl(np.array([1, 2, 4, 8, 16, 32, 64]))
    gold = O.bon_gold(np.sqrt(kl), 0.8, 0.25)
    fit = O.fit_bon(kl, gold)
    assert fit["alpha"] == pytest.approx(0.8, rel=1e-10)
    assert fit["beta"] == pytest.approx(0.25, rel=1e-10)
    assert fit["r2"] == pytest.approx(1.0)


def test_rl_fit_recovers_coefficients_with_noise():
    rng = np.random.default_rng(0)
    kl = np.linspace(0.0, 30.0, 200)
    d = np.sqrt(kl)
    gold = O.rl_gold(d, 1.5, 0.6) + rng.normal(0, 0.05, size=d.size)
    fit = O.fit_rl(kl, gold)
    assert fit["alpha"] == pytest.approx(1.5, abs=0.03)
    assert fit["beta"] == pytest.approx(0.6, abs=0.02)
    # the wrong form fits worse
    assert O.fit_bon(kl, gold)["r2"] < fit["r2"]


def test_rl_form_hand_worked():
    # d = e: e * (alpha - beta * 1)
    assert O.rl_gold(math.e, 2.0, 0.5) == pytest.approx(math.e * 1.5)
    assert O.rl_gold(0.0, 2.0, 0.5) == 0.0
    assert O.bon_gold(2.0, 1.0, 0.25) == pytest.approx(2.0 * 0.5)


def test_fit_errors():
    with pytest.raises(ValueError, match="at least 2"):
        O.fit_bon([1.0], [0.1])
    with pytest.raises(ValueError, match=">= 0"):
        O.fit_rl([-1.0, 1.0], [0.0, 0.1])


def test_bon_kl_values():
    assert float(O.bon_kl(1)) == 0.0
    assert float(O.bon_kl(2)) == pytest.approx(math.log(2) - 0.5)


def test_bon_expected_hand_worked():
    sel = np.array([[1.0, 3.0, 2.0]])
    val = np.array([[10.0, 30.0, 20.0]])
    assert O.bon_expected(sel, val, 1)[0] == pytest.approx(20.0)
    assert O.bon_expected(sel, val, 2)[0] == pytest.approx(80.0 / 3)
    assert O.bon_expected(sel, val, 3)[0] == pytest.approx(30.0)


def test_bon_expected_matches_subset_enumeration():
    rng = np.random.default_rng(1)
    sel, val = rng.normal(size=(3, 6)), rng.normal(size=(3, 6))
    for n in range(1, 7):
        got = O.bon_expected(sel, val, n)
        for p in range(3):
            picks = [val[p, max(c, key=lambda j: sel[p, j])] for c in itertools.combinations(range(6), n)]
            assert got[p] == pytest.approx(np.mean(picks), rel=1e-12)


def test_bon_sweep_proxy_rises():
    rng = np.random.default_rng(2)
    proxy = rng.normal(size=(50, 16))
    gold = proxy - 0.8 * proxy**2 + rng.normal(0, 0.1, size=proxy.shape)  # over-optimised at the top
    rows = O.bon_sweep(proxy, gold)
    assert [r["n"] for r in rows] == [1, 2, 4, 8, 16]
    assert rows[0]["gold_delta"] == pytest.approx(0.0, abs=1e-12)
    assert all(b["proxy"] > a["proxy"] for a, b in zip(rows, rows[1:]))
    assert rows[-1]["gold"] < max(r["gold"] for r in rows)  # the gold turns over


# --------------------------------------------------------------------------- alarm


def _feed(alarm, proxy, gold):
    fired = []
    for t, (p, g) in enumerate(zip(proxy, gold)):
        if alarm.update(t, p, g):
            fired.append(t)
    return fired


def test_slope_and_se_hand_worked():
    s, se = O.slope_and_se([0, 1, 2], [1, 3, 5])
    assert s == pytest.approx(2.0) and se == pytest.approx(0.0)
    s, se = O.slope_and_se([0, 1, 2, 3], [0, 1, 1, 2])
    # slope = sum(xc*yc)/sxx = (-1.5*-1 + -.5*0 + .5*0 + 1.5*1)/5 = 0.6 ; resid = [0.1,0.5,-0.1,-0.3]... computed
    assert s == pytest.approx(0.6)
    resid = np.array([0, 1, 1, 2]) - (0.1 + 0.6 * np.arange(4))
    assert se == pytest.approx(math.sqrt(resid @ resid / 2 / 5))


def test_alarm_fires_on_hacking_and_logs(tmp_path):
    rng = np.random.default_rng(0)
    steps = 60
    proxy = np.linspace(0, 3, steps) + rng.normal(0, 0.1, steps)
    # gold rises for 20 steps then falls while proxy keeps rising
    gold = np.concatenate([np.linspace(0, 1, 20), np.linspace(1, -1, 40)]) + rng.normal(0, 0.1, steps)
    alarm = O.HackingAlarm(window=10, stop=True, log_path=tmp_path / "alarms.jsonl")
    fired = _feed(alarm, proxy, gold)
    assert fired and 20 < fired[0] < 40
    assert alarm.should_stop
    logged = [json.loads(x) for x in (tmp_path / "alarms.jsonl").read_text().splitlines()]
    assert logged[0]["step"] == fired[0] and logged[0]["gold_slope"] < 0 < logged[0]["proxy_slope"]
    assert O.read_alarms(tmp_path / "alarms.jsonl") == logged


def test_alarm_silent_on_joint_improvement_and_noise():
    rng = np.random.default_rng(0)
    n = 500
    up = np.linspace(0, 5, n)
    assert _feed(O.HackingAlarm(), up + rng.normal(0, 0.2, n), up + rng.normal(0, 0.2, n)) == []
    assert _feed(O.HackingAlarm(), rng.normal(0, 1, n), rng.normal(0, 1, n)) == []
    # proxy rises, gold flat and noisy: not hacking
    assert _feed(O.HackingAlarm(), up + rng.normal(0, 0.2, n), rng.normal(0, 0.5, n)) == []


def test_alarm_without_stop_keeps_running_and_validates():
    a = O.HackingAlarm(window=3, patience=1)
    for t in range(5):
        a.update(t, proxy=float(t), gold=-float(t))
    assert len(a.events) == 3 and not a.should_stop
    assert a.metrics()["alarm/fired"] == 3
    with pytest.raises(ValueError, match="window"):
        O.HackingAlarm(window=2)
    with pytest.raises(ValueError, match="finite"):
        a.update(9, float("nan"), 0.0)


def test_rl_sweep_and_replay_from_metrics(tmp_path):
    rows = [{"step": s, "kl": 0.1 * s, "gold_reward": 0.5 - 0.02 * s, "proxy_reward": 0.03 * s, "loss": 1.0}
            for s in range(1, 41)]
    rows.insert(3, {"step": 3, "eval_loss": 2.0})  # rows without the keys are ignored
    sweep = O.rl_sweep_from_metrics(rows, bins=4)
    assert len(sweep) == 4
    assert sweep[0]["step"] == pytest.approx(5.5) and sweep[0]["kl"] == pytest.approx(0.55)
    assert sweep[1]["gold_delta"] == pytest.approx(-0.02 * 10)
    assert sweep[3]["proxy_delta"] == pytest.approx(0.03 * 30)
    events = O.replay_alarm(rows, window=5, patience=1, log_path=tmp_path / "a.jsonl")
    assert events and events[0]["step"] == 5
    assert len(O.read_alarms(tmp_path / "a.jsonl")) == len(events)
    assert O.rl_sweep_from_metrics([{"loss": 1.0}]) == []


# ---------------------------------------------------------------------------------------------
# the collapse alarm: mode collapse (distinct-n falls) and capability loss (perplexity rises)


def test_collapse_alarm_fires_on_diversity_collapse_once_and_logs(tmp_path):
    from rlhfkit.eval.overopt import CollapseAlarm

    alarm = CollapseAlarm(window=3, patience=2, log_path=tmp_path / "alarms.jsonl")
    # baseline 0.40 (mean of the first 3); then windows of the last 3: 0.3867, 0.3467, 0.30 (0.75 of
    # the baseline, below 0.8: streak 1), 0.24 (streak 2: fires), 0.20 (fired already: no second event)
    series = [0.40, 0.42, 0.38, 0.36, 0.30, 0.24, 0.18, 0.18]
    fired_at = [s for s, v in enumerate(series) if alarm.update(s, distinct_1=v)]
    assert fired_at == [6]
    (event,) = alarm.events
    assert event["event"] == "diversity_collapse" and event["metric"] == "distinct_1"
    assert event["baseline"] == pytest.approx(0.40, abs=1e-12)
    assert event["value"] == pytest.approx((0.30 + 0.24 + 0.18) / 3, abs=1e-12)
    assert event["ratio"] == pytest.approx(0.24 / 0.40, abs=1e-12) and event["step"] == 6
    assert json.loads((tmp_path / "alarms.jsonl").read_text()) == event
    assert not alarm.should_stop  # stop=False: it reports, the run goes on


def test_collapse_alarm_fires_on_perplexity_blowup_against_the_first_measurement():
    from rlhfkit.eval.overopt import CollapseAlarm

    alarm = CollapseAlarm(window=10, patience=2, stop=True)
    assert alarm.update(0, perplexity=100.0) == []          # the starting policy: the baseline
    assert alarm.update(10, perplexity=149.0) == []         # 1.49x: within the budget
    assert alarm.update(20, perplexity=160.0) == []         # 1.6x: streak 1
    (event,) = alarm.update(30, perplexity=170.0)           # streak 2: fires
    assert event["event"] == "perplexity_blowup" and event["ratio"] == pytest.approx(1.7, abs=1e-12)
    assert alarm.should_stop


def test_collapse_alarm_quiet_on_noise_around_a_steady_level():
    from rlhfkit.eval.overopt import CollapseAlarm

    rng = np.random.default_rng(0)
    alarm = CollapseAlarm(window=5, patience=2)
    for s in range(200):
        alarm.update(s, distinct_1=0.4 + rng.normal(0, 0.03), distinct_2=0.85 + rng.normal(0, 0.03),
                     perplexity=500 * (1 + rng.normal(0, 0.05)))
    assert alarm.events == []


def test_collapse_events_of_a_finished_policy():
    from rlhfkit.eval.overopt import collapse_events, describe

    sft = {"distinct_1": 0.41, "distinct_2": 0.89, "perplexity": 580.0}
    # the collapsed demo policy's figures: every rule trips
    collapsed = {"distinct_1": 0.19, "distinct_2": 0.57, "perplexity": {"mean": 1157.0}}
    kinds = [(e["event"], e["metric"]) for e in collapse_events(collapsed, sft)]
    assert kinds == [("diversity_collapse", "distinct_1"), ("diversity_collapse", "distinct_2"),
                     ("perplexity_blowup", "perplexity")]
    assert all(describe(e) for e in collapse_events(collapsed, sft))
    # within 20% and 1.5x: healthy; a missing metric is not judged
    assert collapse_events({"distinct_1": 0.33, "distinct_2": 0.72, "perplexity": 860.0}, sft) == []
    assert collapse_events({"distinct_1": 0.1}, {"distinct_2": 0.9}) == []
