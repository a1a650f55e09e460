"""`rlhfkit eval --human feedback:...`: a blind pairwise task with random sides, overlap and gold
items in the feedback service; win rate with intervals and agreement from scripted annotators."""

from __future__ import annotations

import json
import threading
import time

import httpx
import numpy as np
import pytest

from rlhfkit.errors import ConfigError
from rlhfkit.eval.human import HumanSettings, build_items, run_human_eval, win_rate


def _rows(n=12, losses=3):
    """The policy says something kind on all prompts but the last `losses`, where the reference does."""
    rows = []
    for i in range(n):
        kind, rude = f"was kind and warm {i}", f"was rude {i}"
        pol, ref = (kind, rude) if i < n - losses else (rude, kind)
        rows.append({"prompt": f"The day {i}", "response": pol, "reference": ref,
                     "gold": 1.0 if pol == kind else 0.0, "gold_reference": 1.0 if ref == kind else 0.0})
    return rows


def test_items_are_blind_with_random_sides_and_gold_copies():
    rows = _rows(40, 10) + [{"prompt": "same", "response": "x y", "reference": "x y", "gold": 0.0, "gold_reference": 0.0}]
    items, key, counts = build_items(rows, HumanSettings("feedback:sqlite:///x.db", gold=5), seed=0)
    assert counts == {"posted": 40, "gold": 5, "identical": 1, "prompts": 41}
    sides = [k["policy_side"] for k in key]
    assert 10 <= sides.count("a") <= 30  # drawn per item
    for it, k in zip(items, key):
        assert it["responses"]["ab".index(k["policy_side"])] == k["policy"] and "meta" not in it
    for g in items[40:]:
        assert "kind" in g["responses"]["ab".index(g["gold"]["choice"])]
    with pytest.raises(ConfigError, match="feedback:"):
        HumanSettings("http://x")


def test_win_rate_counts_labels_ties_half_and_resamples_items():
    key = [{"prompt": "p", "policy": "A", "reference": "B"}, {"prompt": "q", "policy": "C", "reference": "D"}]
    labels = [{"prompt": "p", "chosen": "A", "rejected": "B"}, {"prompt": "p", "chosen": "B", "rejected": "A"},
              {"prompt": "q", "chosen": "C", "rejected": "D"}, {"prompt": "q", "chosen": "C", "rejected": "D", "tie": True},
              {"prompt": "g", "chosen": "x", "rejected": "y"}]
    r = win_rate(labels, key, identical=1, n_boot=200, seed=0)
    assert r["mean"] == pytest.approx((1 + 0 + 1 + 0.5 + 0.5) / 5) and r["labels"] == 4 and r["items"] == 2
    assert r["ties"] == 1 and r["lo"] <= r["mean"] <= r["hi"]


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
        tokens = {"admin": create_api_token(s, create_user(s, "boss", "correct horse battery", "admin"))}
        for name in ("ann", "bob", "cat"):
            tokens[name] = create_api_token(s, create_user(s, name, "correct horse battery"))
    with ServerThread(create_app(db)) as server:
        yield server.url, tokens, url
    db.dispose()


class Annotator(threading.Thread):
    """Labels every item it is served: picks the response with 'kind' in it, or at random."""

    def __init__(self, url, token, random_picks=False, seed=0):
        super().__init__(daemon=True)
        self.url, self.headers, self.random = url, {"Authorization": f"Bearer {token}"}, random_picks
        self.rng, self.stop, self.done = np.random.default_rng(seed), threading.Event(), 0

    def run(self):
        with httpx.Client(base_url=self.url, headers=self.headers, timeout=10) as c:
            while not self.stop.is_set():
                worked = False
                for task in c.get("/api/tasks").json():
                    r = c.get(f"/api/tasks/{task['id']}/next")
                    if r.status_code != 200:  # nothing to label, or the task closed since the listing
                        continue
                    item = r.json()
                    left, _ = item["responses"]
                    pick_left = self.rng.random() < 0.5 if self.random else "kind" in left
                    c.post(f"/api/tasks/{task['id']}/labels", json={
                        "item_id": item["item_id"], "value": {"choice": "left" if pick_left else "right"},
                        "idempotency_key": item["idempotency_key"]}).raise_for_status()
                    self.done, worked = self.done + 1, True
                if not worked:
                    time.sleep(0.05)


def test_people_label_the_task_through_the_service(service, monkeypatch):
    url, tokens, db_url = service
    monkeypatch.setenv("RLHFKIT_FEEDBACK_TOKEN", tokens["admin"])
    people = [Annotator(url, tokens["ann"]), Annotator(url, tokens["bob"]), Annotator(url, tokens["cat"], True, 1)]
    for p in people:
        p.start()
    try:
        report, key = run_human_eval(_rows(), HumanSettings(f"feedback:{url}", poll=0.1, deadline=60, overlap=3, gold=3,
                                                            gold_rate=0.2), n_boot=200, printer=lambda *a: None)
    finally:
        for p in people:
            p.stop.set()
            p.join(5)
    assert report["complete"] and report["posted"] == 12 and report["gold"] == 3
    wr = report["win_rate"]
    assert wr["labels"] == 36 and wr["items"] == 12
    # two annotators see the truth (9 of 12 wins), one picks at random: (2 * 0.75 + ~0.5) / 3
    assert 0.55 < wr["mean"] < 0.8 and wr["lo"] < wr["mean"] < wr["hi"]
    acc = {a["user"]: a["gold_accuracy"] for a in report["annotators"]}
    assert acc["ann"] == acc["bob"] == 1.0
    ag = report["agreement"]
    assert ag["items_with_overlap"] == 12 and ag["krippendorff_alpha"] is not None and ag["krippendorff_alpha"] < 1.0
    # the task is closed to annotators afterwards
    r = httpx.get(f"{url}/api/tasks", headers={"Authorization": f"Bearer {tokens['ann']}"})
    assert all(t["name"] != report["task"] for t in r.json())


def test_eval_reports_the_human_win_rate_beside_the_judge(tmp_path, capsys, monkeypatch):
    from rlhfkit.eval import run_eval
    from rlhfkit.feedback.db import upgrade
    from rlhfkit.models import load_tokenizer, save_model, tiny_llama

    tok = load_tokenizer("kindly:tokenizer")
    for name, seed in (("pol", 0), ("ref", 1)):
        save_model(tiny_llama(len(tok), hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64, tokenizer=tok,
                              seed=seed), tok, tmp_path / name)
    db_url = f"sqlite:///{tmp_path}/fb.db"
    upgrade(db_url)
    labelled = threading.Event()

    def label_everything():  # one annotator on the service's database, once the task is there
        from rlhfkit.feedback.db import Database
        from rlhfkit.feedback.models import Item, Label, Task
        from rlhfkit.feedback.service.accounts import create_user

        db = Database(db_url, pool_size=1)
        for _ in range(400):
            with db.session() as s:
                task = s.query(Task).first()
                if task is not None:
                    user = create_user(s, "ann", "correct horse battery")
                    for i, it in enumerate(s.query(Item).filter(Item.task_id == task.id)):
                        s.add(Label(item_id=it.id, user_id=user.id, task_id=task.id, idempotency_key=f"k{i}",
                                    value={"choice": "a"}, display_order=[0, 1]))
                    labelled.set()
                    break
            time.sleep(0.05)
        db.dispose()

    worker = threading.Thread(target=label_everything, daemon=True)
    worker.start()
    cfg = run_eval.Config(model=str(tmp_path / "pol"), reference=str(tmp_path / "ref"), prompts="kindly", num_prompts=6,
                          max_new_tokens=5, n_boot=50, corpus="", monitor="", human=f"feedback:{db_url}", human_poll=0.1,
                          human_deadline=30, human_overlap=1, human_gold=0, output_dir=str(tmp_path / "eval"))
    res = run_eval.main(cfg)
    worker.join(5)
    assert labelled.is_set() and res["human"]["complete"]
    assert res["human_win_rate"]["labels"] == res["human"]["posted"] > 0
    key = [json.loads(x) for x in (tmp_path / "eval" / "human_items.jsonl").read_text().splitlines()]
    # the annotator always picked response a: the policy wins exactly where it was put on side a
    expect = (sum(k["policy_side"] == "a" for k in key) + 0.5 * res["human"]["identical"]) / (len(key) + res["human"]["identical"])
    assert res["human_win_rate"]["mean"] == pytest.approx(expect)
    out = capsys.readouterr().out
    assert "win_rate" in out and "human_win_rate" in out and "human_agreement" in out
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["human"]["task_id"] == res["human"]["task_id"]
