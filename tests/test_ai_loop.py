"""`rlhfkit loop --source judge:SPEC | feedback:URL`: an AI judge, and people labelling through the
feedback service on 127.0.0.1 (a scripted annotator client), as the loop's preference source."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from rlhfkit.recipes import loop


@pytest.fixture(scope="module")
def start_model(tmp_path_factory):
    from rlhfkit.models import load_tokenizer, save_model, tiny_llama

    root = tmp_path_factory.mktemp("ailoop")
    tok = load_tokenizer("kindly:tokenizer")
    save_model(tiny_llama(len(tok), hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64, tokenizer=tok,
                          seed=0), tok, root / "sft")
    return root / "sft"


def _cfg(start_model, out, **kw):
    fields = dict(model=str(start_model), rounds=1, algorithm="dpo", prompts_per_round=16, max_new_tokens=6,
                  reward_steps=2, policy_steps=2, batch_size=4, num_eval_prompts=8, n_boot=20, output_dir=str(out))
    return loop.Config(**{**fields, **kw})


def test_loop_with_an_ai_judge_source(start_model, tmp_path):
    torch.set_num_threads(1)
    res = loop.main(_cfg(start_model, tmp_path / "loop", source="judge:textblob"))
    rows = [json.loads(x) for x in (tmp_path / "loop" / "round-1" / "preferences.jsonl").read_text().splitlines()]
    assert rows and all(r["annotator_id"] == "textblob" for r in rows)
    from rlhfkit.judges import load_judge

    judge = load_judge("textblob")
    assert all(v.label == 1.0 for v in judge.compare([r["prompt"] for r in rows], [r["chosen"] for r in rows],
                                                      [r["rejected"] for r in rows]))
    ag = json.loads((tmp_path / "loop" / "round-1" / "agreement.json").read_text())
    assert ag["a"] == "textblob" and 0.0 <= ag["agreement"] <= 1.0
    assert "Label agreement" in (tmp_path / "loop" / "report.html").read_text()
    assert res["rounds"][1]["pairs"] == len(rows)


def test_loop_rejects_unknown_sources(start_model, tmp_path):
    from rlhfkit.errors import ConfigError

    with pytest.raises(ConfigError, match="judge:SPEC, feedback:URL"):
        _cfg(start_model, tmp_path, source="oracle")


@pytest.fixture
def service(tmp_path):
    from rlhfkit.feedback.app import create_app
    from rlhfkit.feedback.db import Database, upgrade
    from rlhfkit.feedback.security import create_api_token, use_test_hasher
    from rlhfkit.feedback.service.accounts import create_user
    from rlhfkit.feedback.testing import ServerThread

    use_test_hasher()
    url = f"sqlite:///{tmp_path}/fb.db"
    upgrade(url)
    db = Database(url, pool_size=4)
    with db.session() as s:
        admin = create_user(s, "boss", "correct horse battery", "admin")
        ann = create_user(s, "ann", "correct horse battery")
        tokens = {"admin": create_api_token(s, admin), "ann": create_api_token(s, ann)}
    with ServerThread(create_app(db)) as server:
        yield server.url, tokens, url
    db.dispose()


class ScriptedAnnotator(threading.Thread):
    """Labels every pairwise item through the API, preferring the kinder response (AFINN; ties: left),
    stopping after `limit` labels."""

    def __init__(self, url: str, token: str, limit: int = 10_000):
        super().__init__(daemon=True)
        self.url, self.headers, self.limit = url, {"Authorization": f"Bearer {token}"}, limit
        self.stop, self.done = threading.Event(), 0
        from rlhfkit.judges import load_judge

        self.judge = load_judge("afinn")

    def run(self):
        import httpx

        with httpx.Client(base_url=self.url, headers=self.headers, timeout=10) as c:
            while not self.stop.is_set() and self.done < self.limit:
                worked = False
                for task in c.get("/api/tasks").json():
                    r = c.get(f"/api/tasks/{task['id']}/next")
                    if r.status_code != 200:  # nothing to label, or the task closed since the listing
                        continue
                    item = r.json()
                    left, right = item["responses"]
                    [v] = self.judge.compare([item["prompt"]], [left], [right])
                    choice = "right" if v.label == 0.0 else "left"
                    c.post(f"/api/tasks/{task['id']}/labels", json={
                        "item_id": item["item_id"], "value": {"choice": choice},
                        "idempotency_key": item["idempotency_key"]}).raise_for_status()
                    self.done += 1
                    worked = True
                    if self.done >= self.limit:
                        break
                if not worked:
                    time.sleep(0.05)


def test_loop_with_people_through_the_feedback_service(start_model, tmp_path, service, monkeypatch):
    url, tokens, _ = service
    monkeypatch.setenv("RLHFKIT_FEEDBACK_TOKEN", tokens["admin"])
    annotator = ScriptedAnnotator(url, tokens["ann"])
    annotator.start()
    try:
        res = loop.main(_cfg(start_model, tmp_path / "loop", source=f"feedback:{url}", feedback_poll=0.1,
                             feedback_deadline=60))
    finally:
        annotator.stop.set()
        annotator.join(5)
    rows = [json.loads(x) for x in (tmp_path / "loop" / "round-1" / "preferences.jsonl").read_text().splitlines()]
    assert annotator.done == 16  # every pair of the round was posted and labelled through the API
    assert rows and all(r["annotator_id"].startswith("feedback:loop-") for r in rows)
    from rlhfkit.judges import load_judge

    afinn = load_judge("afinn")
    for r in rows:  # the exported labels are the annotator's choices
        assert afinn.compare([r["prompt"]], [r["chosen"]], [r["rejected"]])[0].label in (1.0, 0.5)
    assert res["rounds"][1]["unlabelled"] == 0


def test_feedback_deadline_trains_on_what_it_has(tmp_path, service, monkeypatch, capsys):
    from rlhfkit.judges.sources import FeedbackServiceSource

    url, tokens, _ = service
    monkeypatch.setenv("RLHFKIT_FEEDBACK_TOKEN", tokens["admin"])
    annotator = ScriptedAnnotator(url, tokens["ann"], limit=3)
    annotator.start()
    src = FeedbackServiceSource(url, deadline=6, poll=0.1)  # the annotator's 3 labels take well under 1 s
    labels = src.compare(["p"] * 6, [f"good {i}" for i in range(6)], [f"bad {i}" for i in range(6)])
    annotator.stop.set()
    annotator.join(5)
    assert sum(x["label"] is not None for x in labels) == 3
    assert all(x["label"] == 1.0 for x in labels if x["label"] is not None)
    assert "deadline of 6s reached with 3 of 6 pairs labelled" in capsys.readouterr().out


def test_feedback_source_needs_a_token(monkeypatch):
    from rlhfkit.errors import ConfigError
    from rlhfkit.judges.sources import FeedbackServiceSource

    monkeypatch.delenv("RLHFKIT_FEEDBACK_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="RLHFKIT_FEEDBACK_TOKEN"):
        FeedbackServiceSource("http://127.0.0.1:1")


def test_feedback_source_on_the_service_database(service, capsys):
    """feedback:DB_URL: the round's task is created in the database; people label through the server."""
    from rlhfkit.judges.sources import FeedbackServiceSource

    url, tokens, db_url = service
    annotator = ScriptedAnnotator(url, tokens["ann"])
    annotator.start()
    src = FeedbackServiceSource(db_url, deadline=30, poll=0.05)
    labels = src.compare(["p"] * 4, ["bad 1", "good 2", "bad 3", "good 4"], ["good 1", "bad 2", "good 3", "bad 4"])
    annotator.stop.set()
    annotator.join(5)
    assert [x["label"] for x in labels] == [0.0, 1.0, 0.0, 1.0]
    assert src.rounds[0]["labelled"] == 4 and "4 of 4 pairs labelled" in capsys.readouterr().out


def _annotated_loop(start_model, tmp_path, service, monkeypatch, limit, **kw):
    url, tokens, _ = service
    monkeypatch.setenv("RLHFKIT_FEEDBACK_TOKEN", tokens["admin"])
    annotator = ScriptedAnnotator(url, tokens["ann"], limit=limit)
    annotator.start()
    try:
        return loop.main(_cfg(start_model, tmp_path / "loop", source=f"feedback:{url}", feedback_poll=0.1,
                              feedback_deadline=6, **kw))
    finally:
        annotator.stop.set()
        annotator.join(5)


def test_loop_trains_on_the_few_labels_it_has_at_the_deadline(start_model, tmp_path, service, monkeypatch, capsys):
    torch.set_num_threads(1)
    res = _annotated_loop(start_model, tmp_path, service, monkeypatch, limit=3)
    # 3 labelled (a pair of identical or empty samples would be left out, counted)
    assert 1 <= res["rounds"][1]["pairs"] <= 3 and res["rounds"][1]["unlabelled"] == 13
    assert (tmp_path / "loop" / "round-1" / "dpo" / "final" / "config.json").is_file()
    out = capsys.readouterr().out
    assert "deadline of 6s reached with 3 of 16 pairs labelled" in out and "fewer than the batch size 4" in out


def test_loop_with_no_labels_ends_the_round_without_a_model(start_model, tmp_path, service, monkeypatch, capsys):
    torch.set_num_threads(1)
    res = _annotated_loop(start_model, tmp_path, service, monkeypatch, limit=0)
    assert res["promoted"] == "round-0"
    assert res["rounds"][1] == {"round": 1, "id": None, "pairs": 0, "unlabelled": 16, "promoted": False,
                                "skipped": "no labelled pairs", "seconds": res["rounds"][1]["seconds"]}
    assert not (tmp_path / "loop" / "round-1" / "dpo").exists()
    assert json.loads((tmp_path / "loop" / "loop.json").read_text())["rounds"][1]["skipped"] == "no labelled pairs"
    assert "no labelled pairs from feedback:" in capsys.readouterr().out


def test_loop_json_is_written_after_every_round(start_model, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    real = loop.train_policy

    def crash_in_round_2(start, round_file, *args):
        if "round-2" in str(round_file):
            raise RuntimeError("out of memory")
        return real(start, round_file, *args)

    monkeypatch.setattr(loop, "train_policy", crash_in_round_2)
    with pytest.raises(RuntimeError):
        loop.main(_cfg(start_model, tmp_path / "loop", source="judge:afinn", rounds=2))
    done = json.loads((tmp_path / "loop" / "loop.json").read_text())
    assert [r["round"] for r in done["rounds"]] == [0, 1] and done["rounds"][1]["id"] == "round-1"
    assert not list((tmp_path / "loop").glob(".loop.json*"))  # no temporary file left


def _visible_tasks(url, token):
    import httpx

    return [t["name"] for t in httpx.get(f"{url}/api/tasks", headers={"Authorization": f"Bearer {token}"}).json()]


def test_the_rounds_task_is_closed_on_every_exit_path(service, capsys):
    from rlhfkit.judges.sources import FeedbackServiceSource

    url, tokens, db_url = service
    annotator = ScriptedAnnotator(url, tokens["ann"])
    annotator.start()
    src = FeedbackServiceSource(db_url, deadline=30, poll=0.05)
    src.compare(["p"] * 2, ["good 1", "bad 2"], ["bad 1", "good 2"])
    annotator.stop.set()
    annotator.join(5)
    assert src.rounds[0]["labelled"] == 2 and _visible_tasks(url, tokens["ann"]) == []

    def broken_export(tid, aggregate):
        raise ConnectionError("database went away")

    src = FeedbackServiceSource(db_url, deadline=0, poll=0.05)
    src.backend.export = broken_export
    with pytest.raises(ConnectionError):
        src.compare(["p"], ["good"], ["bad"])
    assert _visible_tasks(url, tokens["ann"]) == []  # the crashed round's task is closed too


def test_over_http_the_rounds_task_is_closed(service, monkeypatch, capsys):
    import httpx

    from rlhfkit.judges.sources import FeedbackServiceSource

    url, tokens, _ = service
    monkeypatch.setenv("RLHFKIT_FEEDBACK_TOKEN", tokens["admin"])
    src = FeedbackServiceSource(url, deadline=0, poll=0.05)
    src.compare(["p"], ["good"], ["bad"])
    assert _visible_tasks(url, tokens["ann"]) == []
    assert "stays open" not in capsys.readouterr().out
    # the close endpoint is for admins, and it is in the audit log
    tid = src.rounds[0]["task_id"]
    refused = httpx.post(f"{url}/api/admin/tasks/{tid}/close", headers={"Authorization": f"Bearer {tokens['ann']}"})
    assert refused.status_code == 403
    audit = httpx.get(f"{url}/api/admin/audit", headers={"Authorization": f"Bearer {tokens['admin']}"}).json()
    assert any(e["action"] == "task.close" for e in audit)
