"""A password check (Argon2, slow by design) must not run while SQLite's single write lock is
held: a client guessing old passwords on the password-change route used to stall every
annotator's submit for as long as each check took."""

from __future__ import annotations

import threading
import time
import uuid

import httpx

from rlhfkit.feedback import security
from rlhfkit.feedback.app import create_app
from rlhfkit.feedback.db import Database, upgrade
from rlhfkit.feedback.guard import LoginGuard
from rlhfkit.feedback.security import create_api_token, use_test_hasher
from rlhfkit.feedback.service.accounts import create_user
from rlhfkit.feedback.service.items import import_records
from rlhfkit.feedback.service.tasks import create_task
from rlhfkit.feedback.testing import ServerThread

use_test_hasher()
PASSWORD = "correct horse battery"
CHECK_S = 1.5  # each password check takes this long


class SlowHasher:
    """The test hasher, with a verify that takes CHECK_S seconds (as a costly Argon2id would)."""

    def __init__(self, inner):
        self.inner = inner

    def hash(self, password):
        return self.inner.hash(password)

    def verify(self, stored, password):
        time.sleep(CHECK_S)
        return self.inner.verify(stored, password)


def test_a_slow_old_password_check_does_not_block_submits(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path}/fb.db"
    upgrade(url)
    db = Database(url, pool_size=8)
    with db.session() as s:
        guesser = create_api_token(s, create_user(s, "mallory", PASSWORD))
        worker = create_api_token(s, create_user(s, "ann", PASSWORD))
        task = create_task(s, "t", "pairwise", gold_rate=0.0)
        import_records(s, task, [{"prompt": "p", "responses": ["a", "b"]}])
        task_id = task.id
    monkeypatch.setattr(security, "_hasher", SlowHasher(security._hasher))
    app = create_app(db, login_guard=LoginGuard(per_ip="", per_account=""))
    took = {}

    def guess():
        t0 = time.perf_counter()
        with httpx.Client(base_url=server.url, timeout=30) as c:
            took["status"] = c.post("/api/me/password", headers={"Authorization": f"Bearer {guesser}"},
                                    json={"old_password": "a wrong guess", "new_password": "x"}).status_code
        took["guess"] = time.perf_counter() - t0

    with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=30,
                                                   headers={"Authorization": f"Bearer {worker}"}) as c:
        item = c.get(f"/api/tasks/{task_id}/next").json()
        t = threading.Thread(target=guess)
        t.start()
        time.sleep(0.3)  # the check is running now
        t0 = time.perf_counter()
        r = c.post(f"/api/tasks/{task_id}/labels", json={"item_id": item["item_id"], "value": {"choice": "left"},
                                                         "idempotency_key": uuid.uuid4().hex})
        submit = time.perf_counter() - t0
        t.join()
    db.dispose()
    assert r.status_code == 201, r.text
    assert took["status"] == 403 and took["guess"] >= CHECK_S  # the check overlapped the submit
    # with the write lock held through the check the submit waited about CHECK_S - 0.3 = 1.2 s
    assert submit < 0.5, f"submit took {submit:.2f} s while a password was being checked"
