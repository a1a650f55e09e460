"""Look-alike user names (Unicode confusables, UTS #39 skeletons, after NFKC and case folding)
are one name: a new account cannot take a name that looks like an existing one. SQLite and
PostgreSQL."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, text

from rlhfkit.feedback.app import create_app
from rlhfkit.feedback.cli import cli
from rlhfkit.feedback.db import Database, upgrade
from rlhfkit.feedback.guard import LoginGuard
from rlhfkit.feedback.models import ApiToken, User
from rlhfkit.feedback.names import lookalike_key
from rlhfkit.feedback.security import create_api_token, use_test_hasher
from rlhfkit.feedback.service.accounts import create_user
from rlhfkit.feedback.service.errors import Conflict

use_test_hasher()
PASSWORD = "correct horse battery"
EXISTING = ["adam", "ann", "adami", "iann", "fix", "kate", "mike", "bill"]
# each a different account from EXISTING under NFKC + case folding alone
LOOKALIKES = {
    "\u0430dam": "adam",        # Cyrillic а
    "\u0391nn": "ann",          # Greek capital Alpha
    "adam\u0131": "adami",      # dotless ı
    "\u0130ann": "iann",        # capital I with dot above
    "\ufb01x": "fix",           # the ligature ﬁ (NFKC already)
    "\u212aate": "kate",        # Kelvin sign (NFKC already)
    "rnike": "mike",            # r + n
    "bi11": "bill",             # digit one
}


@pytest.fixture
def env(db_url):
    upgrade(db_url)
    db = Database(db_url, pool_size=4)
    with db.session() as s:
        token = create_api_token(s, create_user(s, "olga", PASSWORD, "owner"))
        for name in EXISTING:
            create_user(s, name, PASSWORD)
    c = TestClient(create_app(db, login_guard=LoginGuard(per_ip="", per_account="")))
    yield c, {"Authorization": f"Bearer {token}"}, db
    c.close()
    db.dispose()


@pytest.mark.parametrize("name", sorted(LOOKALIKES))
def test_a_lookalike_of_an_existing_name_is_refused_naming_it_to_admins(env, name):
    c, admin, db = env
    assert lookalike_key(name) == lookalike_key(LOOKALIKES[name])
    r = c.post("/api/admin/users", headers=admin, json={"username": name, "password": PASSWORD})
    assert r.status_code == 409, r.text
    assert f"looks like the existing account {LOOKALIKES[name]!r}" in r.json()["detail"]
    with db.read_session() as s:
        assert s.scalar(select(User).where(User.username == name)) is None


def test_other_callers_only_learn_the_name_is_not_available(env):
    _, _, db = env
    with db.session() as s, pytest.raises(Conflict) as e:
        create_user(s, "\u0430dam", PASSWORD)
    assert str(e.value) == "user name '\u0430dam' is not available; choose another"


def test_distinct_names_stay_distinct(env):
    c, admin, _ = env
    for name in ("adama", "anne", "zoe", "Jos\u00e9"):
        assert c.post("/api/admin/users", headers=admin, json={"username": name, "password": PASSWORD}).status_code == 201
    r = c.post("/api/admin/users", headers=admin, json={"username": "Jose", "password": PASSWORD})
    assert r.status_code == 409 and "'Jos\u00e9'" in r.json()["detail"]


def test_the_cli_names_the_lookalike(db_url, monkeypatch, capsys):
    monkeypatch.setenv("PW", PASSWORD)
    assert cli(["create-user", "--db", db_url, "--username", "adam", "--password-env", "PW"]) == 0
    assert cli(["create-user", "--db", db_url, "--username", "\u0430dam", "--password-env", "PW"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "rlhfkit serve create-user: user name '\u0430dam' is not available: it looks like the existing " \
                  "account 'adam'"


def test_migration_0005_keys_existing_accounts_and_keeps_older_lookalikes(db_url):
    upgrade(db_url, "0004")
    db = Database(db_url, pool_size=1)
    with db.engine.begin() as conn:  # look-alikes made before the key existed
        for i, name in ((1, "adam"), (2, "\u0430dam"), (3, "ann")):
            conn.execute(text("INSERT INTO users (id, username, username_key, password_hash, role, active, created_at) "
                              "VALUES (:i, :n, :n, 'x', 'annotator', true, CURRENT_TIMESTAMP)"), {"i": i, "n": name})
            conn.execute(text("INSERT INTO api_tokens (user_id, token_hash, name, revoked, created_at) "
                              "VALUES (:i, :h, 'cli', false, CURRENT_TIMESTAMP)"), {"i": i, "h": f"h{i}"})
    db.dispose()
    upgrade(db_url)
    db = Database(db_url, pool_size=1)
    with db.session() as s:
        keys = dict(s.execute(select(User.username, User.lookalike_key)).all())
        assert keys == {"adam": lookalike_key("adam"), "\u0430dam": None, "ann": lookalike_key("ann")}
        # rows referring to the users survive (a table rebuild on SQLite would cascade-delete them)
        assert s.scalar(select(func.count()).select_from(ApiToken)) == 3
        with pytest.raises(Conflict):
            create_user(s, "\u0391dam", PASSWORD)
    db.dispose()
