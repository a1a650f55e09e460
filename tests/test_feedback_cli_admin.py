"""`rlhfkit serve` team administration from the command line: list users, set a role, disable
and enable an account, create, list and revoke API tokens. Each change is audited; each bad
input is a one-line error with exit status 2. SQLite and PostgreSQL."""

from __future__ import annotations

import subprocess
import sys

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from rlhfkit.feedback.app import create_app
from rlhfkit.feedback.cli import cli
from rlhfkit.feedback.db import Database
from rlhfkit.feedback.models import AuditEvent
from rlhfkit.feedback.security import use_test_hasher

use_test_hasher()
PASSWORD = "correct horse battery"


def run(capsys, *argv):
    code = cli(list(argv))
    out, err = capsys.readouterr()
    return code, out.strip(), err.strip()


@pytest.fixture
def url(db_url, capsys, monkeypatch):
    monkeypatch.setenv("PW", PASSWORD)
    for name, role in (("olga", "owner"), ("ann", "annotator")):
        assert run(capsys, "create-user", "--db", db_url, "--username", name, "--role", role, "--password-env", "PW")[0] == 0
    return db_url


def test_roles_tokens_and_disabling_from_the_cli(url, capsys):
    code, out, _ = run(capsys, "list-users", "--db", url)
    assert code == 0 and [line.split("\t")[1:] for line in out.splitlines()] == [
        ["olga", "owner", "active"], ["ann", "annotator", "active"]]

    assert run(capsys, "set-role", "--db", url, "--username", "ANN", "--role", "admin")[:2] == (
        0, "ANN: role annotator -> admin")
    code, token, _ = run(capsys, "create-token", "--db", url, "--username", "ann", "--name", "ci", "--expires-days", "7")
    assert code == 0 and token.startswith("rk_") and "\n" not in token
    db = Database(url, pool_size=2)
    c = TestClient(create_app(db))
    me = c.get("/api/me", headers={"Authorization": f"Bearer {token}"})
    assert me.status_code == 200 and me.json()["role"] == "admin"

    code, out, _ = run(capsys, "list-tokens", "--db", url, "--username", "ann")
    rows = [line.split("\t") for line in out.splitlines()]
    assert code == 0 and len(rows) == 1 and rows[0][1] == "ci" and rows[0][4] == "active" and rows[0][3] != "never"
    token_id = rows[0][0]

    assert run(capsys, "disable-user", "--db", url, "--username", "ann")[0] == 0
    assert c.get("/api/me", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    assert run(capsys, "list-users", "--db", url)[1].splitlines()[1].endswith("\tdisabled")
    code, _, err = run(capsys, "create-token", "--db", url, "--username", "ann")
    assert code == 2 and err == "rlhfkit serve create-token: user 'ann' is disabled; enable-user first"
    assert run(capsys, "enable-user", "--db", url, "--username", "ann")[0] == 0
    # disabling revoked the token for good: enabling the account does not bring it back
    assert c.get("/api/me", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    code, token, _ = run(capsys, "create-token", "--db", url, "--username", "ann", "--name", "ci2")
    assert code == 0 and c.get("/api/me", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    token_id = run(capsys, "list-tokens", "--db", url, "--username", "ann")[1].splitlines()[-1].split("\t")[0]

    assert run(capsys, "revoke-token", "--db", url, "--id", token_id)[:2] == (0, f"token {token_id} of ann: revoked")
    assert c.get("/api/me", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    assert run(capsys, "list-tokens", "--db", url, "--username", "ann")[1].endswith("\trevoked")
    assert run(capsys, "revoke-token", "--db", url, "--id", token_id)[1] == f"token {token_id} of ann: already revoked"
    c.close()

    with db.read_session() as s:
        actions = [(e.action, e.target, e.detail.get("via")) for e in s.scalars(select(AuditEvent).order_by(AuditEvent.id))]
    db.dispose()
    assert [a for a in actions if a[2] == "cli"] == [
        ("user.role", "ann", "cli"), ("token.issue", "ann", "cli"), ("user.disable", "ann", "cli"),
        ("user.enable", "ann", "cli"), ("token.issue", "ann", "cli"), ("token.revoke", "ann", "cli")]


@pytest.mark.parametrize("argv, message", [
    (["set-role", "--username", "nobody", "--role", "admin"], "rlhfkit serve set-role: user 'nobody' not found"),
    (["disable-user", "--username", "nobody"], "rlhfkit serve disable-user: user 'nobody' not found"),
    (["list-tokens", "--username", "nobody"], "rlhfkit serve list-tokens: user 'nobody' not found"),
    (["revoke-token", "--id", "999"], "rlhfkit serve revoke-token: token 999 not found"),
    (["create-token", "--username", "ann", "--name", "a\x07b"], None),
    (["create-token", "--username", "ann", "--name", "x" * 65], "rlhfkit serve create-token: --name: at most 64 characters"),
])
def test_bad_input_is_one_line(url, capsys, argv, message):
    code, out, err = run(capsys, *argv[:1], "--db", url, *argv[1:])
    assert code == 2 and out == "" and len(err.splitlines()) == 1, err
    assert err == message if message else err.startswith("rlhfkit serve create-token: --name: ")


@pytest.mark.parametrize("argv", [
    ["set-role", "--username", "ann", "--role", "king"],
    ["revoke-token", "--id", "x"],
    ["revoke-token", "--id", "99999999999"],
    ["create-token", "--username", "ann", "--expires-days", "-1"],
    ["set-role", "--username", "ann"],
])
def test_bad_arguments_are_one_line(tmp_path, capsys, argv):
    with pytest.raises(SystemExit) as e:
        cli([*argv, "--db", f"sqlite:///{tmp_path}/x.db"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith(f"rlhfkit serve {argv[0]}: "), err


def test_admin_commands_have_help():
    for command in ("list-users", "set-role", "disable-user", "enable-user", "create-token", "list-tokens",
                    "revoke-token"):
        out = subprocess.run([sys.executable, "-m", "rlhfkit.feedback.cli", command, "--help"], capture_output=True,
                             text=True, check=True).stdout
        assert out.startswith(f"usage: rlhfkit serve {command}") and "--db" in out


def test_run_keeps_idle_connections_open_while_annotators_read(url, monkeypatch):
    """uvicorn closes a connection idle for 5 s by default: annotators reading for longer would
    open a new one for most submits. `serve run` keeps them 75 s unless told otherwise."""
    import uvicorn

    seen = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: seen.append(kwargs))
    assert cli(["run", "--db", url, "--uncertainty-scorer", "none"]) == 0
    assert cli(["run", "--db", url, "--uncertainty-scorer", "none", "--keep-alive", "20"]) == 0
    assert [kw["timeout_keep_alive"] for kw in seen] == [75, 20]


def test_the_cli_keeps_an_owner_and_caps_non_owner_tokens(url, capsys):
    code, _, err = run(capsys, "set-role", "--db", url, "--username", "olga", "--role", "admin")
    assert code == 2 and "last active owner" in err
    code, _, err = run(capsys, "disable-user", "--db", url, "--username", "olga")
    assert code == 2 and "last active owner" in err
    code, _, err = run(capsys, "create-token", "--db", url, "--username", "ann", "--expires-days", "400")
    assert code == 2 and "expires_days" in err
    assert run(capsys, "create-token", "--db", url, "--username", "ann")[0] == 0
    rows = [line.split("\t") for line in run(capsys, "list-tokens", "--db", url, "--username", "ann")[1].splitlines()]
    assert rows[-1][3] != "never"
