"""The feedback service's layers, read from its source: the HTTP layer (routers, app, request
plumbing, forms) and the CLI build no SQL and run none themselves, every statement sits behind a
function of `rlhfkit.feedback.service`; the service knows nothing of HTTP; and the web app never
imports the training recipes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import rlhfkit.feedback

PACKAGE = Path(rlhfkit.feedback.__file__).resolve().parent
FRONT = ("api.py", "admin_api.py", "pages.py", "app.py", "web.py", "forms.py", "cli.py", "cli_data.py")
# SQLAlchemy a front module may name: exceptions (the app's error handlers) and the Session type
ALLOWED_SQLALCHEMY = {("sqlalchemy", "exc"), ("sqlalchemy.orm", "Session")}
# SQL construction, whatever module it came from
STATEMENT_BUILDERS = {"select", "insert", "update", "delete", "text", "exists", "and_", "or_", "func", "bindparam",
                      "literal", "union", "join", "outerjoin", "aliased"}
# session and connection methods that run statements or load or write rows
SESSION_CALLS = {"execute", "scalar", "scalars", "query", "add", "add_all", "merge", "refresh", "flush",
                 "exec_driver_sql", "bulk_save_objects", "expire", "delete"}
HTTP_MODULES = ("fastapi", "starlette", "uvicorn", "rlhfkit.feedback.web", "rlhfkit.feedback.api",
                "rlhfkit.feedback.admin_api", "rlhfkit.feedback.pages", "rlhfkit.feedback.app",
                "rlhfkit.feedback.forms", "rlhfkit.feedback.cli")


def _imports(tree: ast.AST):
    """(module, name or None) of every import in `tree`, at any depth."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                yield node.module, alias.name


def sql_in_front_module(source: str, name: str = "<source>") -> list[str]:
    """Where `source` builds or runs SQL itself: 'file:line what' for each finding."""
    tree = ast.parse(source)
    found = []
    models = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"{name}:{node.lineno} import {a.name}" for a in node.names if a.name.split(".")[0] == "sqlalchemy"]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] == "sqlalchemy":
                found += [f"{name}:{node.lineno} from {node.module} import {a.name}" for a in node.names
                          if (node.module, a.name) not in ALLOWED_SQLALCHEMY]
            if node.module == "rlhfkit.feedback.models":
                models |= {a.asname or a.name for a in node.names}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Name) and f.id in STATEMENT_BUILDERS:
            found.append(f"{name}:{node.lineno} {f.id}(...)")
        elif isinstance(f, ast.Attribute):
            if isinstance(f.value, ast.Name) and f.value.id == "func":
                found.append(f"{name}:{node.lineno} func.{f.attr}(...)")
            elif f.attr in SESSION_CALLS and not _is_route(f):
                found.append(f"{name}:{node.lineno} .{f.attr}(...)")
            elif f.attr == "get" and node.args and isinstance(node.args[0], ast.Name) and node.args[0].id in models:
                found.append(f"{name}:{node.lineno} .get({node.args[0].id}, ...)")
    return found


def _is_route(f: ast.Attribute) -> bool:
    """`router.delete("/path")` declares a route; it runs no statement."""
    return f.attr == "delete" and isinstance(f.value, ast.Name) and f.value.id in ("router", "app")


@pytest.mark.parametrize("module", FRONT)
def test_front_modules_build_and_run_no_sql(module):
    path = PACKAGE / module
    assert sql_in_front_module(path.read_text(), path.name) == []


def test_the_check_finds_sql_written_in_a_route():
    """The check above is only as good as what it catches: each way a handler used to reach
    the database is reported."""
    source = '''
from sqlalchemy import select
from sqlalchemy.orm import Session
from rlhfkit.feedback.models import Label, User


@router.get("/x")
def handler(request):
    with db.session() as s:
        s.execute(select(User))
        s.scalars(select(Label).where(Label.id == 1))
        label = s.get(Label, 3)
        s.add(label)
        n = s.scalar(func.count())
        request.query_params.get("a")  # not a session: fine
        router.delete("/y")  # a route: fine
'''
    found = sql_in_front_module(source)
    assert {f.split(" ", 1)[1] for f in found} == {
        "from sqlalchemy import select", "select(...)", ".execute(...)", ".scalars(...)", ".get(Label, ...)",
        ".add(...)", "func.count(...)", ".scalar(...)"}


def test_the_service_layer_knows_nothing_of_http():
    for path in sorted((PACKAGE / "service").glob("*.py")):
        bad = [m for m, _ in _imports(ast.parse(path.read_text())) if m.startswith(HTTP_MODULES)]
        assert bad == [], f"{path.name} imports {bad}"


def test_feedback_never_imports_the_recipes():
    modules = [p for p in PACKAGE.rglob("*.py")]
    assert len(modules) > 20
    for path in modules:
        tree = ast.parse(path.read_text())
        bad = [m if n is None else f"{m}.{n}" for m, n in _imports(tree)
               if m.startswith("rlhfkit.recipes") or (m == "rlhfkit" and n == "recipes")]
        assert bad == [], f"{path.relative_to(PACKAGE)} imports {bad}"
