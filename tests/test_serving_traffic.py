"""The traffic log (every served response in the feedback database), retention, redaction, and
feedback from real use: the HTTP API and the exports the reward, DPO and KTO recipes read."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import uuid

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from rlhfkit.serving.tables import ServedResponse, UseFeedback
from rlhfkit.serving.traffic import TrafficLog, export_traffic, redact
from rlhfkit.serving.use_feedback import export_feedback, mount_experiment_routes

MESSAGES = [{"role": "user", "content": "The weather today"}]


def serve(log: TrafficLog, arm: str = "sft", text: str = "is lovely and calm", endpoint: str = "chat",
          user: str = "u1", n: int = 1) -> str:
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    log.record(response_id=rid, experiment="exp", arm=arm, model_version=f"{arm}-v1", user_key=user,
               endpoint=endpoint, request=MESSAGES if endpoint == "chat" else "The weather today",
               response=[text] + [f"{text} ({i})" for i in range(1, n)],
               sampling={"temperature": 0.7, "top_p": 0.9, "max_tokens": 16, "seed": 3},
               prompt_tokens=5, completion_tokens=4, latency_ms=12.5, ttft_ms=3.0)
    return rid


@pytest.fixture
def env(db_url):
    log = TrafficLog(db_url, retention_days=None)
    app = FastAPI()
    mount_experiment_routes(app, log.db, log)
    with TestClient(app) as client:
        yield {"log": log, "db": log.db, "client": client}
    log.close()


def test_every_field_of_a_served_response_is_logged(env):
    log = env["log"]
    rid = serve(log, n=2)
    log.flush()
    with env["db"].read_session() as s:
        row = s.scalar(select(ServedResponse).where(ServedResponse.response_id == rid))
    assert (row.experiment, row.arm, row.model_version, row.user_key, row.endpoint) == ("exp", "sft", "sft-v1", "u1", "chat")
    assert row.request == MESSAGES and row.response == ["is lovely and calm", "is lovely and calm (1)"]
    assert row.sampling == {"temperature": 0.7, "top_p": 0.9, "max_tokens": 16, "seed": 3}
    assert (row.prompt_tokens, row.completion_tokens, row.latency_ms, row.ttft_ms, row.status) == (5, 4, 12.5, 3.0, 200)
    with pytest.raises(TypeError, match="unknown field"):
        log.record(response_id="x", colour="blue")


def test_feedback_of_every_kind_with_errors_in_openai_shape(env):
    c, log = env["client"], env["log"]
    a, b = serve(log), serve(log, text="is grey")
    # no flush: the API writes out queued traffic when feedback names a response not yet stored
    for body in ({"kind": "thumbs", "thumbs": "up"}, {"kind": "rating", "rating": 4},
                 {"kind": "edit", "text": "is lovely, calm and warm"}, {"kind": "comment", "text": "nice"},
                 {"kind": "pairwise", "other_response_id": b, "chosen": a}):
        r = c.post("/v1/feedback", json={"response_id": a, **body})
        assert r.status_code == 201, r.text
        assert r.json()["kind"] == body["kind"]
    listed = c.get(f"/v1/feedback/{b}").json()["data"]
    assert [f["kind"] for f in listed] == ["pairwise"]
    assert len(c.get(f"/v1/feedback/{a}").json()["data"]) == 5
    bad = [({"kind": "thumbs"}, 400, "thumbs"), ({"kind": "rating", "rating": 6}, 422, None),
           ({"kind": "edit", "text": "  "}, 400, "text"), ({"kind": "thumbs", "thumbs": "up", "choice": 1}, 400, "choice"),
           ({"kind": "pairwise", "other_response_id": b, "chosen": "neither"}, 400, "chosen"),
           ({"kind": "pairwise", "other_response_id": a, "chosen": a}, 400, "other_response_id"),
           ({"kind": "pairwise", "other_response_id": "chatcmpl-none", "chosen": a}, 404, "other_response_id")]
    for body, status, param in bad:
        r = c.post("/v1/feedback", json={"response_id": a, **body})
        assert r.status_code == status, (body, r.text)
        if status != 422:
            assert r.json()["error"]["param"] == param and r.json()["error"]["message"]
    r = c.post("/v1/feedback", json={"response_id": "chatcmpl-unknown", "kind": "thumbs", "thumbs": "up"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_a_retried_post_with_an_idempotency_key_is_recorded_once(env):
    c, log = env["client"], env["log"]
    rid = serve(log)
    body = {"response_id": rid, "kind": "thumbs", "thumbs": "down", "idempotency_key": "k1"}
    first, again = c.post("/v1/feedback", json=body), c.post("/v1/feedback", json=body)
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["id"] == again.json()["id"]
    with env["db"].read_session() as s:
        assert s.scalar(select(func.count()).select_from(UseFeedback)) == 1


def test_exports_are_what_the_reward_dpo_and_kto_recipes_read(env):
    from transformers import AutoTokenizer

    from rlhfkit.data.preference import preference_texts
    from rlhfkit.tasks.kindly import HERE

    c, log = env["client"], env["log"]
    a, b = serve(log, arm="sft", text="is bad"), serve(log, arm="ppo", text="is lovely")
    plain = serve(log, arm="sft", text="is dull", endpoint="completions")
    posts = [{"response_id": a, "kind": "pairwise", "other_response_id": b, "chosen": b},
             {"response_id": a, "kind": "edit", "text": "is bright"},
             {"response_id": a, "kind": "thumbs", "thumbs": "up"}, {"response_id": a, "kind": "thumbs", "thumbs": "down"},
             {"response_id": b, "kind": "thumbs", "thumbs": "up"}, {"response_id": plain, "kind": "rating", "rating": 2}]
    for body in posts:
        assert c.post("/v1/feedback", json=body).status_code == 201
    prefs = export_feedback(env["db"], "preferences", "exp")
    assert [p["source"] for p in prefs] == ["pairwise", "edit"]
    assert prefs[0]["prompt"] == MESSAGES and prefs[0]["chosen"] == [{"role": "assistant", "content": "is lovely"}]
    assert (prefs[0]["chosen_arm"], prefs[0]["chosen_model_version"], prefs[0]["rejected_arm"]) == ("ppo", "ppo-v1", "sft")
    assert prefs[1]["chosen"][0]["content"] == "is bright" and prefs[1]["rejected_model_version"] == "sft-v1"
    kto = export_feedback(env["db"], "kto", "exp")
    # the latest thumbs on a response wins: the user changed their mind on `a`
    assert [(k["arm"], k["label"]) for k in kto] == [("sft", False), ("ppo", True)]
    ratings = export_feedback(env["db"], "ratings", "exp")
    assert ratings == [{"prompt": "The weather today", "completion": "is dull", "rating": 2, "experiment": "exp",
                        "arm": "sft", "model_version": "sft-v1", "response_id": plain}]
    assert export_feedback(env["db"], "sft", "exp")[0]["completion"][0]["content"] == "is bright"
    tok = AutoTokenizer.from_pretrained(HERE / "tokenizer")
    pairs, labels = preference_texts(prefs, unpaired=False, tokenizer=tok, log=lambda m: None)[:2]
    assert len(pairs) == 2 and labels is None and pairs[0][1].strip().startswith("is lovely")
    texts, labels = preference_texts(kto, unpaired=True, tokenizer=tok, log=lambda m: None)[:2]
    assert labels == [False, True] and texts[1][1].strip().startswith("is lovely")


def test_retention_deletes_old_traffic_and_its_feedback(env):
    c, log, db = env["client"], env["log"], env["db"]
    old, new = serve(log), serve(log)
    log.flush()
    for rid in (old, new):
        assert c.post("/v1/feedback", json={"response_id": rid, "kind": "thumbs", "thumbs": "up"}).status_code == 201
    with db.session() as s:
        s.execute(update(ServedResponse).where(ServedResponse.response_id == old)
                  .values(created_at=dt.datetime(2020, 1, 1)))
    assert log.purge(30) == 1
    with db.read_session() as s:
        assert s.scalars(select(ServedResponse.response_id)).all() == [new]
        assert s.scalars(select(UseFeedback.response_id)).all() == [new]


def test_the_writer_thread_purges_by_the_retention_setting(db_url):
    with TrafficLog(db_url) as log:
        serve(log)
        log.flush()
        with log.db.session() as s:
            s.execute(update(ServedResponse).values(created_at=dt.datetime(2020, 1, 1)))
    with TrafficLog(db_url, retention_days=7) as log:
        serve(log)
        log.flush()
        with log.db.read_session() as s:
            assert s.scalar(select(func.count()).select_from(ServedResponse)) == 1


@pytest.mark.parametrize("text, expected", [
    ("write to jane.doe+ab@mail.example.co.uk today", "write to [EMAIL] today"),
    ("call (415) 555-2671 or 415.555.2671", "call [PHONE] or [PHONE]"),
    ("abroad: +44 20 7946 0958, or 0049 30 1234567.", "abroad: [PHONE], or [PHONE]."),
    ("US +1-202-555-0143", "US [PHONE]"),
    ("on 2026-12-07 at 12:30, 320,000 people; pi is 3.14159265", "on 2026-12-07 at 12:30, 320,000 people; pi is 3.14159265"),
    ("order 1234567890123456789 shipped", "order 1234567890123456789 shipped"),
    ("id chatcmpl-1ee191c9c7a54bff84ffb0168796d4a9", "id chatcmpl-1ee191c9c7a54bff84ffb0168796d4a9"),
])
def test_redaction_of_addresses_and_phone_numbers(text, expected):
    assert redact(text) == expected


def test_exports_are_redacted_unless_asked(env):
    log = env["log"]
    rid = serve(log, text="mail me at a.b@example.org or ring +1 202 555 0143")
    assert env["client"].post("/v1/feedback", json={"response_id": rid, "kind": "comment",
                                                    "text": "I am (415) 555-2671"}).status_code == 201
    (comment,) = export_feedback(env["db"], "comments", "exp")
    assert comment["comment"] == "I am [PHONE]" and comment["completion"] == [
        {"role": "assistant", "content": "mail me at [EMAIL] or ring [PHONE]"}] and comment["response_id"] == rid
    assert "415" in export_feedback(env["db"], "comments", "exp", redacted=False)[0]["comment"]
    log.flush()
    (row,) = list(export_traffic(env["db"], "exp"))
    assert row["response"] == ["mail me at [EMAIL] or ring [PHONE]"] and row["arm"] == "sft"
    (raw,) = list(export_traffic(env["db"], "exp", redacted=False))
    assert "a.b@example.org" in raw["response"][0]


# ---------------------------------------------------------------------------------------------
# a server with an experiment: assignment, the log of every request, cookies, streams


def fake_server(texts=None) -> FastAPI:
    """An OpenAI-shaped app that answers with the model it was asked for (the arm); `texts`, an
    iterator, gives the answers instead."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = await request.json()
        if req["model"] not in ("a", "b", "plain"):
            return JSONResponse({"error": {"message": f"no model {req['model']}", "type": "invalid_request_error",
                                           "param": "model", "code": "model_not_found"}}, 404)
        rid, text = f"chatcmpl-{uuid.uuid4().hex}", next(texts) if texts else f"answer from {req['model']}"
        if req.get("stream"):
            def events():
                for piece in (text[:6], text[6:]):
                    yield "data: " + json.dumps({"id": rid, "model": req["model"], "choices": [
                        {"index": 0, "delta": {"content": piece}, "finish_reason": None}]}) + "\n\n"
                yield "data: " + json.dumps({"id": rid, "choices": [], "usage": {"prompt_tokens": 7,
                                                                                   "completion_tokens": 3}}) + "\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        return {"id": rid, "object": "chat.completion", "model": req["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 7, "completion_tokens": 3}}

    return app


def test_a_served_experiment_assigns_logs_and_keeps_users_on_their_arm(db_url, tmp_path):
    from rlhfkit.serving.live import install

    exp_file = tmp_path / "exp.yaml"
    exp_file.write_text("name: kindly-ab\nassign_by: [user, 'header:X-User', 'cookie:uid']\n"
                        "arms:\n  a: {model: sft-r0}\n  b: {model: ppo-r1}\n")
    app = fake_server()
    live = install(app, db_url, str(exp_file))
    body = {"model": "kindly-ab", "messages": MESSAGES, "temperature": 0.5, "seed": 1}
    with TestClient(app) as c:
        arms = {}
        for u in ("alice", "bob", "carol", "dave", "erin", "frank"):
            r = c.post("/v1/chat/completions", json={**body, "user": u})
            assert r.status_code == 200
            arms[u] = r.json()["model"]
            again = c.post("/v1/chat/completions", json={**body, "user": u})
            assert again.json()["model"] == arms[u]  # the same user stays on the same arm
        assert set(arms.values()) == {"a", "b"}
        assert arms == {u: live.experiment.assign(u).name for u in arms}
        # no user field or header: a new visitor gets a cookie and keeps their arm with it
        fresh = TestClient(app)
        first = fresh.post("/v1/chat/completions", json=body)
        assert "uid=" in first.headers["set-cookie"]
        assert all(fresh.post("/v1/chat/completions", json=body).json()["model"] == first.json()["model"] for _ in range(3))
        assert "set-cookie" not in fresh.post("/v1/chat/completions", json=body).headers
        by_header = c.post("/v1/chat/completions", json=body, headers={"X-User": "alice"}).json()["model"]
        assert by_header == arms["alice"]
        streamed = c.post("/v1/chat/completions", json={**body, "user": "alice", "stream": True})
        assert "answer" in streamed.text
        assert c.post("/v1/chat/completions", json={**body, "model": "nope"}).status_code == 404
        plain = c.post("/v1/chat/completions", json={**body, "model": "plain"}).json()
        rid = plain["id"]
        # feedback on a logged response through the mounted API
        assert c.post("/v1/feedback", json={"response_id": rid, "kind": "thumbs", "thumbs": "up"}).status_code == 201
    live.log.flush()
    with live.log.db.read_session() as s:
        rows = s.scalars(select(ServedResponse).order_by(ServedResponse.id)).all()
    assert len(rows) == 12 + 5 + 1 + 1 + 1 + 1
    alice = [r for r in rows if r.user_key == live.experiment.user_key("alice")]
    assert len(alice) == 4 and {r.arm for r in alice} == {arms["alice"]}
    assert {r.model_version for r in alice} == {live.experiment.arm(arms["alice"]).model}
    first_row = alice[0]
    assert (first_row.experiment, first_row.endpoint, first_row.request, first_row.status) == ("kindly-ab", "chat", MESSAGES, 200)
    assert first_row.sampling == {"temperature": 0.5, "seed": 1} and first_row.response == [f"answer from {arms['alice']}"]
    assert (first_row.prompt_tokens, first_row.completion_tokens) == (7, 3) and first_row.latency_ms > 0
    stream_row = alice[-1]
    assert stream_row.response == [f"answer from {arms['alice']}"] and stream_row.sampling["stream"] is True
    assert stream_row.ttft_ms is not None and stream_row.completion_tokens == 3
    err = next(r for r in rows if r.status == 404)
    assert err.experiment is None and err.error == "no model nope" and err.response == []
    assert next(r for r in rows if r.response_id == rid).experiment is None
    live.log.close()


# ---------------------------------------------------------------------------------------------
# the safety monitor


def rude_scorer(prompts, completions):
    """A stand-in judge: the answers of arm b are 'unsafe'."""
    return [-1.0 if "from b" in c else 1.0 for c in completions]


MONITORED = """\
name: kindly-ab
control: a
arms:
  a: {{model: sft-r0}}
  b: {{model: ppo-r1}}
monitor: {{spec: gold, threshold: 0.0, alarm_rate: 0.2, min_scored: 8, pause: true, block: {block}}}
"""


def test_flagged_responses_are_counted_listed_and_an_alarm_pauses_the_arm(db_url, tmp_path):
    from rlhfkit.feedback.models import AuditEvent
    from rlhfkit.serving.live import install

    (tmp_path / "exp.yaml").write_text(MONITORED.format(block="false"))
    app = fake_server()
    live = install(app, db_url, str(tmp_path / "exp.yaml"), scorer=rude_scorer)
    body = {"model": "kindly-ab", "messages": MESSAGES}
    users = [f"user{i}" for i in range(40)]
    on_b = [u for u in users if live.experiment.assign(u).name == "b"]
    with TestClient(app) as c:
        served = [c.post("/v1/chat/completions", json={**body, "user": u}).json()["model"] for u in users]
        # until the alarm, users see their own arm; the alarm may fire while these requests run
        first_a = next((i for i, (u, m) in enumerate(zip(users, served)) if m != live.experiment.assign(u).name), None)
        assert first_a is None or all(served[i] == "a" for i in range(first_a, len(users)))
        live.log.flush()
        live.monitor.join()
        status = c.get("/v1/safety/status").json()
        assert status["paused"] == ["b"] and status["alarms"]["b"]["paused"] is True
        assert status["arms"]["a"]["flagged"] == 0 and status["arms"]["b"]["flagged"] >= 8
        # b's users now see the control
        assert {c.post("/v1/chat/completions", json={**body, "user": u}).json()["model"] for u in on_b} == {"a"}
        flagged = c.get("/v1/safety/flagged", params={"arm": "b"}).json()["data"]
        assert len(flagged) == served.count("b") >= 8 and all(f["response"] == ["answer from b"] for f in flagged)
    live.log.flush()
    live.monitor.join()
    with live.log.db.read_session() as s:
        rows = s.scalars(select(ServedResponse)).all()
        alarms = s.scalars(select(AuditEvent).where(AuditEvent.action == "safety_alarm")).all()
    assert all(r.safety_flag == (r.arm == "b") and r.safety_judge == "gold" for r in rows)
    assert [a.target for a in alarms] == ["b"]
    live.monitor.close()
    live.log.close()


def test_blocking_mode_replaces_a_flagged_response_before_it_is_sent(db_url, tmp_path):
    from rlhfkit.serving.live import install

    (tmp_path / "exp.yaml").write_text(MONITORED.format(block="true"))
    app = fake_server()
    live = install(app, db_url, str(tmp_path / "exp.yaml"), scorer=rude_scorer)
    user_b = next(u for u in map(str, range(100)) if live.experiment.assign(u).name == "b")
    user_a = next(u for u in map(str, range(100)) if live.experiment.assign(u).name == "a")
    refusal = live.monitor.cfg.refusal
    with TestClient(app) as c:
        r = c.post("/v1/chat/completions", json={"model": "kindly-ab", "messages": MESSAGES, "user": user_b}).json()
        assert r["choices"][0]["message"]["content"] == refusal and r["choices"][0]["finish_reason"] == "content_filter"
        s = c.post("/v1/chat/completions", json={"model": "kindly-ab", "messages": MESSAGES, "user": user_b,
                                                 "stream": True})
        events = [json.loads(line[6:]) for line in s.text.splitlines() if line.startswith("data: {")]
        assert "".join(ch["delta"].get("content", "") for e in events for ch in e["choices"]) == refusal
        assert s.text.rstrip().endswith("data: [DONE]")
        ok = c.post("/v1/chat/completions", json={"model": "kindly-ab", "messages": MESSAGES, "user": user_a}).json()
        assert ok["choices"][0]["message"]["content"] == "answer from a"
    live.log.flush()
    live.monitor.join()
    with live.log.db.read_session() as s:
        rows = s.scalars(select(ServedResponse).order_by(ServedResponse.id)).all()
    # the log keeps what the model generated, flagged, for review
    assert [(r.response, r.safety_flag) for r in rows] == [(["answer from b"], True), (["answer from b"], True),
                                                           (["answer from a"], False)]
    live.monitor.close()
    live.log.close()


def test_the_gold_panel_as_a_monitor_flags_an_unkind_response():
    from rlhfkit.serving.monitor import load_scorer

    scores = load_scorer("gold")(["The weather today"] * 2, ["is lovely and warm", "is awful, I hate it"])
    assert scores[0] > 0.3 and scores[1] < -0.3


def test_the_policy_server_runs_an_experiment_on_the_bundled_model(tmp_path):
    """rlhfkit serve-policy --experiment: arms served by name, users assigned, every request logged
    with the served model's version, feedback through the same server."""
    from rlhfkit.serving.server import ServeConfig, create_app

    (tmp_path / "exp.yaml").write_text("name: kindly-ab\narms:\n  a: {model: kindly}\n  b: {model: kindly}\n")
    db = f"sqlite:///{tmp_path}/fb.db"
    app = create_app(ServeConfig(experiment=str(tmp_path / "exp.yaml"), db=db, max_tokens=6, seed=0))
    live = app.state.live
    with TestClient(app) as c:
        assert sorted(m["id"] for m in c.get("/v1/models").json()["data"]) == ["a", "b"]
        users = ["ann", "ben", "cat", "dan"]
        got = {u: c.post("/v1/chat/completions", json={"model": "kindly-ab", "user": u, "max_tokens": 6,
                                                       "messages": MESSAGES}).json() for u in users}
        assert {u: r["model"] for u, r in got.items()} == {u: live.experiment.assign(u).name for u in users}
        rid = got["ann"]["id"]
        assert c.post("/v1/feedback", json={"response_id": rid, "kind": "rating", "rating": 5}).status_code == 201
    live.log.flush()
    with live.log.db.read_session() as s:
        rows = s.scalars(select(ServedResponse).order_by(ServedResponse.id)).all()
    assert [r.arm for r in rows] == [live.experiment.assign(u).name for u in users]
    row = rows[0]
    assert row.response == [got["ann"]["choices"][0]["message"]["content"]]
    assert row.completion_tokens == got["ann"]["usage"]["completion_tokens"] and row.sampling == {"max_tokens": 6}
    assert row.model_version.endswith(got["ann"]["system_fingerprint"]) and "kindly" in row.model_version
    live.log.close()


# ---------------------------------------------------------------------------------------------
# the chat page, in Chromium

CHROMIUM = os.environ.get("RLHFKIT_CHROMIUM", "/usr/bin/chromium")
XSS = '<img src=x onerror="window.__xss = 1">kind words'


@contextlib.contextmanager
def browser_page(app, errors: list[str]):
    """A headless Chromium page (with the app served on a free port) that collects the page's
    errors and console errors into `errors`; yields (page, base url)."""
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no chromium at {CHROMIUM}: run scripts/install_browser_deps.sh")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    from rlhfkit.feedback.testing import ServerThread

    with ServerThread(app) as srv, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.set_default_timeout(15000)
            yield page, srv.url
        finally:
            browser.close()


@pytest.mark.browser
def test_the_chat_page_sends_thumbs_edits_and_picks_from_the_keyboard(tmp_path):
    from rlhfkit.serving.live import install

    (tmp_path / "exp.yaml").write_text("name: kindly-ab\narms:\n  a: {model: sft-r0}\n  b: {model: ppo-r1}\n")
    app = fake_server(texts=iter([XSS, "second answer", "third answer"]))
    live = install(app, f"sqlite:///{tmp_path}/fb.db", str(tmp_path / "exp.yaml"))
    errors: list[str] = []
    with browser_page(app, errors) as (page, url):
        page.goto(f"{url}/chat")
        # selectors only: the page's Content-Security-Policy forbids the eval behind wait_for_function
        page.wait_for_selector('#model:text-is("(kindly-ab)")')
        page.keyboard.type("The weather today")
        page.keyboard.press("Enter")
        page.wait_for_selector(".assistant.latest .text")
        assert page.inner_text(".assistant.latest .text") == XSS  # shown as text, ran nothing
        assert page.query_selector(".assistant.latest img") is None
        page.keyboard.press("Escape")
        page.keyboard.press("+")
        page.wait_for_selector(".assistant.latest button.up.on")
        page.keyboard.press("e")
        page.keyboard.press("Control+a")
        page.keyboard.type("warm and kind words")
        page.keyboard.press("Control+Enter")
        page.wait_for_selector('.assistant.latest .text:text-is("warm and kind words")')
        page.keyboard.press("Escape")
        page.keyboard.press("r")
        page.wait_for_selector("#choose #cand-2")
        assert page.inner_text("#cand-2") == "2. second answer"
        page.keyboard.press("2")
        page.wait_for_selector('.assistant.latest .text:text-is("second answer")')
        page.screenshot(path=str(tmp_path / "chat.png"))
    assert errors == []
    live.log.flush()
    with live.log.db.read_session() as s:
        feedback = s.scalars(select(UseFeedback).order_by(UseFeedback.id)).all()
        served = s.scalars(select(ServedResponse).order_by(ServedResponse.id)).all()
    assert [f.kind for f in feedback] == ["thumbs", "edit", "pairwise"]
    assert feedback[0].value["up"] is True and feedback[1].value["text"] == "warm and kind words"
    first, second = served
    assert feedback[2].response_id == first.response_id and feedback[2].value["chosen"] == second.response_id
    assert first.experiment == second.experiment == "kindly-ab" and first.arm == second.arm  # the cookie kept the arm
    assert second.request == [{"role": "user", "content": "The weather today"}]
    live.log.close()
