"""The arena: two arms answer one message side by side, blind; the vote is pairwise feedback
across arms that the A/B analysis and the online loop read; the arms are named after the vote."""

from __future__ import annotations

import collections

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from rlhfkit.serving.arena import battle_pair, contenders
from rlhfkit.serving.experiments import load_experiment
from rlhfkit.serving.tables import ServedResponse, UseFeedback
from test_serving_traffic import XSS, browser_page, fake_server

THREE = "name: kindly-arena\narms:\n  a: {model: sft-r0}\n  b: {model: ppo-r1}\n  plain: {model: other}\n  spare: {model: x, weight: 0}\n"
MESSAGES = [{"role": "user", "content": "The weather today"}]


def test_a_battle_gets_two_different_live_arms_evenly_and_always_the_same(tmp_path):
    (tmp_path / "exp.yaml").write_text(THREE)
    exp = load_experiment(tmp_path / "exp.yaml")
    assert [a.name for a in contenders(exp)] == ["a", "b", "plain"]  # weight 0 takes no part
    pairs = [battle_pair(exp, f"battle-{i}") for i in range(3000)]
    assert all(x.name != y.name for x, y in pairs)
    assert battle_pair(exp, "battle-7") == pairs[7]
    counts = collections.Counter(frozenset((x.name, y.name)) for x, y in pairs)
    assert len(counts) == 3 and all(abs(c / 3000 - 1 / 3) < 0.04 for c in counts.values()), counts
    sides = collections.Counter(x.name for x, _ in pairs)
    assert all(abs(c / 3000 - 1 / 3) < 0.04 for c in sides.values()), sides  # no arm always on the left
    assert battle_pair(exp, "b1", paused={"a", "b"}) is None


def test_battle_requests_are_routed_logged_voted_and_revealed(tmp_path):
    from rlhfkit.serving.ab import analyse
    from rlhfkit.serving.live import install
    from rlhfkit.serving.online_data import load_feedback, to_records

    (tmp_path / "exp.yaml").write_text(THREE)
    app = fake_server()
    live = install(app, f"sqlite:///{tmp_path}/fb.db", str(tmp_path / "exp.yaml"))
    exp = live.experiment
    with TestClient(app) as c:
        assert c.get("/v1/arena/config").json() == {"model": "kindly-arena", "available": True, "reason": None}
        page = c.get("/arena")
        assert page.status_code == 200 and "script-src 'self' 'sha256-" in page.headers["content-security-policy"]
        js = c.get("/static/pages.js")
        assert js.status_code == 200 and "function streamChat" in js.text and js.headers["x-content-type-options"] == "nosniff"
        ids = []
        for i in range(6):
            battle = f"b{i}"
            a_arm, b_arm = battle_pair(exp, battle)
            got = [c.post("/v1/chat/completions", json={"model": "kindly-arena", "messages": MESSAGES, "user": "u1"},
                          headers={"X-Arena-Battle": battle, "X-Arena-Side": str(side)}).json() for side in (0, 1)]
            assert [g["model"] for g in got] == [a_arm.name, b_arm.name]
            ids.append((got[0]["id"], got[1]["id"]))
        # before the vote nothing is revealed
        assert c.get("/v1/arena/reveal", params={"a": ids[0][0], "b": ids[0][1]}).status_code == 404
        for a, b in ids:
            assert c.post("/v1/feedback", json={"response_id": a, "kind": "pairwise", "other_response_id": b,
                                                "chosen": a}).status_code == 201
        who = c.get("/v1/arena/reveal", params={"a": ids[0][0], "b": ids[0][1]}).json()
        first = battle_pair(exp, "b0")
        assert (who["a"]["arm"], who["b"]["arm"]) == (first[0].name, first[1].name)
        assert who["a"]["model_version"] == first[0].model
        # without the headers the user keeps their assigned arm
        plain = c.post("/v1/chat/completions", json={"model": "kindly-arena", "messages": MESSAGES, "user": "u1"}).json()
        assert plain["model"] == exp.assign("u1").name
    live.log.flush()
    with live.log.db.read_session() as s:
        rows = {r.response_id: r for r in s.scalars(select(ServedResponse))}
    assert all(rows[a].user_key == rows[b].user_key == exp.user_key("u1") for a, b in ids)
    # the votes are pairwise preferences between arms: A/B win rates and training pairs
    report = analyse(exp, live.log.db)
    seen = collections.Counter(rows[x].arm for pair in ids for x in pair)
    assert {n: report["arms"][n]["pairwise"] for n in ("a", "b", "plain")} == {n: seen[n] for n in ("a", "b", "plain")}
    assert all(report["arms"][n]["win_rate"]["mean"] is not None for n in seen)
    pairs, _ = to_records(load_feedback(live.log.db), "pairs")
    assert len(pairs) == len(ids)
    assert {tuple(p["model_versions"]) for p in pairs} == {(rows[a].model_version, rows[b].model_version) for a, b in ids}
    live.log.close()


@pytest.mark.browser
def test_the_arena_page_shows_two_answers_blind_and_names_them_after_the_vote(tmp_path):
    from rlhfkit.serving.live import install

    (tmp_path / "exp.yaml").write_text("name: kindly-ab\narms:\n  a: {model: sft-r0}\n  b: {model: ppo-r1}\n")
    app = fake_server(texts=iter([XSS, "second answer"]))
    live = install(app, f"sqlite:///{tmp_path}/fb.db", str(tmp_path / "exp.yaml"))
    errors: list[str] = []
    with browser_page(app, errors) as (page, url):
        page.goto(f"{url}/arena")
        page.wait_for_selector('#state:text-is("")', state="attached")
        page.keyboard.type("The weather today")
        page.keyboard.press("Enter")
        page.wait_for_selector(".vote button:not([disabled])")
        texts = [page.inner_text("#side-A .text"), page.inner_text("#side-B .text")]
        assert sorted(texts) == sorted([XSS, "second answer"]) and page.query_selector(".side img") is None
        assert page.query_selector(".who") is None  # blind until the vote
        page.keyboard.press("Escape")
        page.keyboard.press("2")
        page.wait_for_selector("#side-B.chosen .who")
        names = [page.inner_text("#side-A .who"), page.inner_text("#side-B .who")]
        page.screenshot(path=str(tmp_path / "arena.png"))
    assert errors == []
    live.log.flush()
    with live.log.db.read_session() as s:
        vote = s.scalars(select(UseFeedback)).one()
        served = {r.response_id: r for r in s.scalars(select(ServedResponse))}
    assert vote.kind == "pairwise" and vote.value["chosen"] == vote.other_response_id
    a, b = served[vote.response_id], served[vote.other_response_id]
    assert {a.arm, b.arm} == {"a", "b"} and names == [f"arm {a.arm} ({a.model_version})", f"arm {b.arm} ({b.model_version})"]
    live.log.close()
