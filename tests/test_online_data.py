"""Feedback from real use -> training records (the documented rules), the off-policy window,
and per-user quality (agreement, flags, weights)."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
from sqlalchemy import insert

from rlhfkit.errors import ConfigError
from rlhfkit.feedback.db import Database, upgrade
from rlhfkit.serving.online_data import Feedback, Rules, load_feedback, select_records, to_records
from rlhfkit.serving.tables import ServedResponse, UseFeedback
from rlhfkit.serving.user_quality import QualityRules, assess_users

T0 = dt.datetime(2026, 12, 1)


def _served(rid, text, version="prod", user="u1", prompt="The day", t=0, endpoint="completions"):
    return dict(response_id=rid, experiment="x", arm="a", model_version=version, user_key=user, endpoint=endpoint,
                request=prompt if endpoint == "completions" else [{"role": "user", "content": prompt}],
                response=[text], sampling={}, prompt_tokens=1, completion_tokens=1, latency_ms=1.0, status=200,
                created_at=T0 + dt.timedelta(seconds=t))


def _fb(rid, kind, value, user="u1", t=0, other=None):
    return dict(response_id=rid, other_response_id=other, kind=kind, value=value, user_key=user,
                created_at=T0 + dt.timedelta(seconds=t))


def _fill(url, served, feedback):
    upgrade(url)
    db = Database(url, pool_size=1)
    with db.session() as s:
        s.execute(insert(ServedResponse), served)
        s.execute(insert(UseFeedback), feedback)
    return db


def test_load_feedback_window_versions_and_latest_label(db_url):
    served = [_served("r1", "was kind", version="round-1@abc"), _served("r2", "was bad", version="round-0"),
              _served("r3", "was fine", version="round-1", endpoint="chat"), _served("r4", "other", version="round-9")]
    feedback = [_fb("r1", "thumbs", {"up": False, "choice": 0}, t=1), _fb("r1", "thumbs", {"up": True, "choice": 0}, t=2),
                _fb("r2", "thumbs", {"up": True, "choice": 0}, t=3), _fb("r3", "rating", {"rating": 5, "choice": 0}, t=4),
                _fb("r4", "thumbs", {"up": True, "choice": 0}, t=5), _fb("r1", "comment", {"text": "ok", "choice": 0}, t=6)]
    db = _fill(db_url, served, feedback)
    ev = load_feedback(db, since=T0 + dt.timedelta(seconds=1), until=T0 + dt.timedelta(seconds=6), versions=["round-1"])
    db.dispose()
    # t=1 is not after `since`; r2 and r4 are other models; the id matches id@stamp; the later thumbs wins
    assert [(e.response_id, e.kind) for e in ev] == [("r1", "thumbs"), ("r3", "rating"), ("r1", "comment")]
    assert ev[0].value["up"] is True and ev[1].chat and ev[1].prompt == [{"role": "user", "content": "The day"}]


def _ev(i, kind, value, text="a", user="u", prompt="p", other_text=None):
    return Feedback(i, kind, user, prompt, text, f"r{i}", "m", T0, value, False, other_text=other_text,
                    other_response_id=f"o{i}" if other_text else None, other_model_version="m2" if other_text else None)


def test_rules_unpaired_and_pairs():
    ev = [_ev(1, "thumbs", {"up": True}, "good one"), _ev(2, "thumbs", {"up": False}, "bad one"),
          _ev(3, "rating", {"rating": 5}, "great", prompt="q"), _ev(4, "rating", {"rating": 3}, "meh", prompt="q"),
          _ev(5, "rating", {"rating": 1}, "awful", prompt="q"),
          _ev(6, "edit", {"text": "fixed", "choice": 0}, "broken"),
          _ev(7, "pairwise", {"chosen": "o7"}, "left", other_text="right"),
          _ev(8, "comment", {"text": "hm"}, "x"), _ev(9, "thumbs", {"up": True}, "lonely", prompt="z")]
    un, c = to_records(ev, "unpaired", round=3)
    got = {(r["completion"], r["label"]) for r in un}
    assert got == {("good one", True), ("bad one", False), ("great", True), ("awful", False), ("fixed", True),
                   ("broken", False), ("right", True), ("left", False), ("lonely", True)}
    assert c["unused"] == {"neutral rating": 1, "comment": 1} and all(r["round"] == 3 for r in un)
    pairs, c = to_records(ev, "pairs")
    got = {(r["prompt"], r["chosen"], r["rejected"], r["source"]) for r in pairs}
    assert got == {("p", "fixed", "broken", "edit"), ("p", "right", "left", "pairwise"), ("q", "great", "awful", "rating"),
                   ("p", "good one", "bad one", "thumbs")}
    assert c["unused"]["thumbs without a partner"] == 1 and c["records"] == 4
    # a narrower margin pairs 5 with 3 first (highest with lowest still comes first)
    pairs, _ = to_records(ev[2:5], "pairs", Rules(rating_up=5, rating_down=3, rating_margin=4))
    assert [(r["chosen"], r["rejected"]) for r in pairs] == [("great", "awful")]
    with pytest.raises(ConfigError, match="rating_down < rating_up"):
        Rules(rating_up=3, rating_down=3)


def test_window_and_decay_and_user_weights_thin_records():
    hist = {r: [{"prompt": "p", "completion": "c", "label": True, "users": ["a" if i % 2 else "b"]} for i in range(4000)]
            for r in (1, 2, 3)}
    kept, rep = select_records(hist, current=3, window=2, decay=0.5, user_weights={"a": 0.5}, seed=0)
    assert rep[1] == {"offered": 4000, "kept": 0, "why": "older than the window of 2 round(s)"}
    # round 3: a kept w.p. 0.5, b w.p. 1 -> 3000 expected; round 2 (age 1): half of that
    assert abs(rep[3]["kept"] - 3000) < 120 and abs(rep[2]["kept"] - 1500) < 120
    assert {r["weight"] for r in kept} == {1.0, 0.5, 0.25}
    assert select_records(hist, 3, window=1, seed=1)[1][2]["kept"] == 0
    with pytest.raises(ConfigError, match="window"):
        select_records(hist, 3, window=0)


def _population(rng, honest=30, n=20):
    """Honest users thumb responses by a hidden quality (the 'RM' score), 10% noise; shared items so
    majorities exist; one always-down, one random and one inverted user; a coordinated trio."""
    ev, i = [], 0
    texts = [f"resp {k}" for k in range(40)]
    quality = {t: k % 2 == 0 for k, t in enumerate(texts)}
    for u in range(honest):
        for t in rng.choice(texts, n, replace=False):
            ok = quality[t] if rng.random() > 0.1 else not quality[t]
            ev.append(_ev(i, "thumbs", {"up": bool(ok)}, t, user=f"h{u}"))
            i += 1
    for name, rule in (("down", lambda t: False), ("rand", lambda t: bool(rng.random() < 0.5)),
                       ("inv", lambda t: not quality[t])):
        for t in rng.choice(texts, n, replace=False):
            ev.append(_ev(i, "thumbs", {"up": rule(t)}, t, user=name))
            i += 1
    for member in ("c1", "c2", "c3"):  # the same scripted prompts and verdicts
        for k in range(8):
            ev.append(_ev(i, "thumbs", {"up": True}, f"spam {k}", user=member, prompt=f"script {k}"))
            i += 1
    return ev, quality


def test_user_quality_flags_and_weights():
    rng = np.random.default_rng(0)
    ev, quality = _population(rng)

    def score(prompts, texts):  # the hidden quality, distinct values (no response at the median)
        return [float(quality[t]) + 1e-3 * int(t.split()[1]) if t in quality else -1.0 for t in texts]

    rep = assess_users(ev, score=score)
    users = rep["users"]
    assert users["down"]["flags"][0] == "always_down" and users["down"]["weight"] == 0.0
    assert "random" in users["rand"]["flags"] and "adversarial" in users["inv"]["flags"]
    assert all("coordinated" in users[c]["flags"] for c in ("c1", "c2", "c3"))
    honest = [users[f"h{u}"] for u in range(30)]
    assert sum(bool(h["flags"]) for h in honest) <= 1
    # 10% label noise over 20 labels: about 0.9 on average, binomial spread around it
    assert np.mean([h["agreement_rm"] for h in honest]) > 0.85 and min(h["agreement_rm"] for h in honest) > 0.6
    assert np.mean([h["agreement_majority"] for h in honest]) > 0.85
    assert users["inv"]["agreement_rm"] < 0.2 and rep["reference"] == "reward model"
    # down-weighting: an honest user's weight is at most 1 and a noisier record gets less
    assert all(0.5 < h["weight"] <= 1.0 for h in honest if not h["flags"])
    # without a reward model the majority is the reference and still catches the inverted user
    rep2 = assess_users(ev, score=None, q=QualityRules())
    assert rep2["reference"] == "majority" and "adversarial" in rep2["users"]["inv"]["flags"]
    assert rep2["summary"]["by_flag"]["coordinated"] == 3


def test_a_harsh_honest_user_is_not_always_down_and_an_uninformative_reference_weights_nobody():
    """Raters differ in scale: a user with 30% thumbs up against a crowd's 60% is significantly
    harsher over 200 labels, but not an always-down user; an RM at chance judges no one."""
    rng = np.random.default_rng(1)
    ev = []
    for u in range(20):
        p = 0.3 if u == 0 else 0.6
        ev += [_ev(1000 * u + i, "thumbs", {"up": bool(rng.random() < p)}, f"t{u}-{i}", user=f"u{u}") for i in range(200)]
    ev += [_ev(99_000 + i, "thumbs", {"up": False}, f"d{i}", user="down") for i in range(20)]
    rep = assess_users(ev, score=lambda prompts, texts: list(rng.normal(size=len(texts))))
    assert rep["users"]["u0"]["flags"] == [] and rep["users"]["down"]["flags"] == ["always_down"]
    assert rep["median_agreement"] < 0.55
    assert all(r["weight"] == 1.0 for k, r in rep["users"].items() if k != "down")


def test_a_pick_between_responses_its_user_labelled_alike_is_left_out():
    def pick(i, user, first_up, second_up):
        ev = [_ev(i, "pairwise", {"chosen": f"o{i}"}, f"left {i}", user=user, other_text=f"right {i}")]
        for rid, up in ((f"r{i}", first_up), (f"o{i}", second_up)):
            if up is not None:
                ev.append(Feedback(100 + len(ev) + 10 * i, "thumbs", user, "p", "x", rid, "m", T0, {"up": up}, False))
        return ev

    ev = [*pick(1, "u", True, True), *pick(2, "u", False, False), *pick(3, "u", False, True),
          *pick(4, "u", None, True), *pick(5, "v", None, None),
          # another user's thumbs on pick 6's responses do not make its own user's pick alike
          _ev(6, "pairwise", {"chosen": "o6"}, "left 6", user="w", other_text="right 6"),
          Feedback(200, "thumbs", "x", "p", "x", "r6", "m", T0, {"up": True}, False),
          Feedback(201, "thumbs", "x", "p", "x", "o6", "m", T0, {"up": True}, False)]
    picks = lambda rules: sorted(r["chosen"] for r in to_records(ev, "pairs", rules)[0] if r["source"] == "pairwise")  # noqa: E731
    assert picks(Rules()) == ["right 3", "right 4", "right 5", "right 6"]
    assert to_records(ev, "pairs")[1]["unused"]["pick between responses labelled alike"] == 2
    assert picks(Rules(alike_picks="keep")) == [f"right {i}" for i in range(1, 7)]
    un, _ = to_records(ev, "unpaired")
    assert not any(r["completion"] in ("left 1", "right 1", "left 2", "right 2") for r in un)
    with pytest.raises(ConfigError, match="alike_picks"):
        Rules(alike_picks="maybe")
