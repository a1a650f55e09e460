"""`rlhfkit serve`: the human-feedback collection service.

    rlhfkit serve [run] [--db URL] [--host 127.0.0.1] [--port 8000]   start the web app
              [--workers N --rate-limit-storage redis://HOST:PORT/DB]  (several processes: PostgreSQL)
    rlhfkit serve init-db --db URL                                     create/upgrade the schema
    rlhfkit serve create-user --db URL --username NAME [--role admin] [--password-env VAR] [--token]
    rlhfkit serve import --db URL --task NAME --type pairwise [--overlap 3] FILE.jsonl
    rlhfkit serve sample --db URL --task NAME --type ranking --policy PATH --prompts FILE [--num-samples 4]
    rlhfkit serve export --db URL --task NAME --kind preferences [--aggregate majority] --out FILE.jsonl|DIR [--hf]
    rlhfkit serve qc --db URL --task NAME
    rlhfkit serve list-users --db URL
    rlhfkit serve set-role --db URL --username NAME --role owner|admin|annotator
    rlhfkit serve disable-user|enable-user --db URL --username NAME
    rlhfkit serve create-token --db URL --username NAME [--name N] [--expires-days D]
    rlhfkit serve list-tokens --db URL --username NAME
    rlhfkit serve revoke-token --db URL --id ID

--db takes a SQLAlchemy URL (sqlite:///path.db, postgresql://user@host/db) or a file path
(SQLite). The default is ./feedback.db. Every command applies pending migrations first.

`serve run --workers N` starts N server processes on one port (uvicorn's supervisor; each
worker builds the app through `app_from_env` from the settings in RLHFKIT_FEEDBACK_CONFIG). It
needs PostgreSQL (SQLite takes one writer at a time and the server serialises its writes
inside one process) and `--rate-limit-storage redis://...` (login counters kept in each
process would give a guesser N times the budget); both are refused otherwise. What stays per
process: the task-settings cache (a closed task is seen closed by every worker within 5 s,
web.TaskCache), the uncertainty scorer's fits (each worker refits its own: the same result,
N times the CPU), `--pool-size` connections and the password-check pool, whose default bound
(half the cores) is split between the workers, at least one each.
"""

from __future__ import annotations

import argparse
import getpass
import importlib
import json
import os
import sys
from collections.abc import Sequence

import uvicorn

from rlhfkit.errors import ConfigError, RlhfkitError
from rlhfkit.feedback import export as ex
from rlhfkit.feedback.app import create_app
from rlhfkit.feedback.db import Database, current_revision, migrated, normalise_url, upgrade
from rlhfkit.feedback.guard import LoginGuard, check_storage
from rlhfkit.feedback.models import utcnow
from rlhfkit.feedback.online import OnlineScorer
from rlhfkit.feedback.schemas import name_problem
from rlhfkit.feedback.security import create_api_token
from rlhfkit.feedback.service import accounts, items, tasks
from rlhfkit.feedback.service.errors import Conflict


class _Parser(argparse.ArgumentParser):
    """Bad arguments are one line on stderr (the command and what is wrong), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 1 <= value <= 2**31 - 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive 32-bit integer")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 36500:
        raise argparse.ArgumentTypeError(f"{value:g} is not between 0 and 36500 days")
    return value


ROLE_CHOICES = ["annotator", "admin", "owner"]
USERNAME = ("--username", {"required": True})
TASK_OPTIONS = (
    ("--task", {"required": True, "help": "task name (created if missing)"}),
    ("--type", {"dest": "question_type", "default": "pairwise",
                "help": "pairwise, ranking, rating, thumbs, critique or edit"}),
    ("--overlap", {"type": int, "default": 1, "help": "annotators per item"}),
    ("--selection", {"default": "random", "choices": ["random", "uncertainty"]}),
    ("--gold-rate", {"type": float, "default": 0.1}),
    ("--instructions", {"default": ""}),
    ("--rubric", {"default": "helpful,harmless,honest", "help": "comma-separated rating dimensions"}),
    ("--no-randomize", {"action": "store_true", "help": "always show responses in file order"}),
)
RUN_OPTIONS = (
    ("--host", {"default": "127.0.0.1"}),
    ("--port", {"type": int, "default": 8000}),
    ("--secure-cookies", {"action": "store_true", "help": "mark cookies Secure (behind HTTPS)"}),
    ("--uncertainty-scorer", {"choices": ["none", "hashed"], "default": "hashed",
                              "help": "scorer for tasks with selection=uncertainty: a bag-of-words ensemble refit on "
                                      "the task's labels ('hashed'), or none (random)"}),
    ("--log-level", {"default": "warning"}),
    ("--pool-size", {"type": _positive_int, "default": max(4, 2 * (os.cpu_count() or 2)),
                     "help": "database connections, and so requests doing database work at once (default: twice "
                             "the cores, at least 4; more concurrent transactions than that only contend for CPU "
                             "and locks)"}),
    ("--keep-alive", {"type": _positive_int, "default": 75, "metavar": "SECONDS",
                      "help": "how long an idle connection stays open (default 75 s, as nginx's keepalive_timeout): "
                              "annotators read for seconds between submits, and with uvicorn's default of 5 s "
                              "most submits would open a new connection"}),
    ("--workers", {"type": _positive_int, "default": 1,
                   "help": "server processes on the port (default 1); more than one needs PostgreSQL and a shared "
                           "--rate-limit-storage"}),
    ("--rate-limit-storage", {"default": "memory://", "metavar": "URL",
                              "help": "where the login limits are counted: memory:// (this process) or "
                                      "redis://HOST:PORT/DB (shared by every worker; needed with --workers > 1)"}),
    ("--forwarded-allow-ips", {"default": None, "metavar": "IPS",
                               "help": "comma-separated addresses or networks of reverse proxies whose X-Forwarded-For "
                                       "header is trusted for the client address ('*' for any peer). Default: none, "
                                       "the peer's own address is the client's"}),
)
EXPORT_OPTIONS = (
    ("--task", {"required": True}),
    ("--kind", {"default": "preferences", "help": "preferences, rankings, sft, kto, ratings, critiques"}),
    ("--aggregate", {"default": "none", "help": "none, majority, weighted or bt"}),
    ("--include-gold", {"action": "store_true"}),
    ("--ties", {"default": "skip", "choices": ("skip", "keep"),
                "help": "pairwise ties: skip and count them, or keep them with label 0.5 and tie=true"}),
    ("--out", {"required": True}),
    ("--hf", {"action": "store_true", "help": "write a datasets.save_to_disk folder instead of JSONL"}),
    ("--force", {"action": "store_true", "help": "overwrite --out if it exists"}),
    ("--status", {"default": "all", "choices": ("all", "accepted"),
                  "help": "all labels, or only those a reviewer accepted"}),
)
# every subcommand: (help, its options beyond --db); the team administration commands write
# each change to the audit log (actor "cli")
COMMANDS: dict[str, tuple[str, tuple]] = {
    "run": ("start the web app", RUN_OPTIONS),
    "serve": ("start the web app", RUN_OPTIONS),
    "init-db": ("create or upgrade the database schema", ()),
    "create-user": ("add an account", (
        USERNAME,
        ("--role", {"default": "annotator", "choices": ROLE_CHOICES,
                    "help": "owner: everything; admin: tasks, annotators, review, export; annotator: labels"}),
        ("--password-env", {"help": "read the password from this environment variable (else prompt)"}),
        ("--token", {"action": "store_true", "help": "also create and print an API token"}))),
    "import": ("import prompts + responses from JSONL", TASK_OPTIONS + (
        ("file", {"help": "JSONL: {prompt, responses: [...]} (or response / chosen+rejected), "
                          "optional id, gold (an answer in file order), meta"}),)),
    "sample": ("sample responses from a policy and import them", TASK_OPTIONS + (
        ("--policy", {"required": True, "help": "model folder or 'kindly'"}),
        ("--prompts", {"required": True, "help": "text file, one prompt a line, or JSONL with 'prompt'"}),
        ("--num-samples", {"type": int, "default": 2}),
        ("--max-new-tokens", {"type": int, "default": 32}),
        ("--temperature", {"type": float, "default": 1.0}),
        ("--seed", {"type": int, "default": 0}))),
    "export": ("export labels as TRL-format JSONL or a datasets folder", EXPORT_OPTIONS),
    "qc": ("print the task's quality-control report as JSON", (("--task", {"required": True}),)),
    "list-users": ("list accounts: id, username, role, active", ()),
    "set-role": ("change an account's role", (USERNAME, ("--role", {"required": True, "choices": ROLE_CHOICES}))),
    "disable-user": ("disable an account: it can no longer log in or use its tokens; its labels stay", (USERNAME,)),
    "enable-user": ("enable a disabled account again", (USERNAME,)),
    "create-token": ("issue an API token for an account and print it (shown once)", (
        USERNAME,
        ("--name", {"default": "cli", "help": "a label for the token (up to 64 characters)"}),
        ("--expires-days", {"type": _positive_float, "default": None,
                            "help": "days until it expires (default: never for owners, else the maximum, 365)"}))),
    "list-tokens": ("list an account's API tokens: id, name, created, expires, state", (USERNAME,)),
    "revoke-token": ("revoke an API token by id (see list-tokens)",
                     (("--id", {"dest": "token_id", "required": True, "type": _positive_int}),)),
}
SUBCOMMANDS = tuple(COMMANDS)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="rlhfkit serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    for name, (help_, options) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--db", default=os.environ.get("RLHFKIT_DB", "sqlite:///feedback.db"),
                        help="database URL or SQLite file (env RLHFKIT_DB)")
        for flag, kwargs in options:
            sp.add_argument(flag, **kwargs)
    return p


def cli(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUBCOMMANDS + ("-h", "--help"):
        argv = ["run", *argv]
    args = _parser().parse_args(argv)
    try:
        return _handler(args.command)(args)
    except RlhfkitError as e:
        print(f"rlhfkit serve {args.command}: {e}", file=sys.stderr)
        return 2
    except (ValueError, LookupError, Conflict) as e:
        print(f"rlhfkit serve {args.command}: {e}", file=sys.stderr)
        return 2


def _handler(command: str):
    """The function running `command`. `sample` (a policy) and `export` (atomic writers of
    rlhfkit.train.runs) load torch: they live in cli_data, imported by name only when one of
    them runs (as rlhfkit.cli loads each command's module), so the server and the other
    commands start without the training stack."""
    if command in ("sample", "export"):
        return getattr(importlib.import_module("rlhfkit.feedback.cli_data"), command)
    return HANDLERS[command]


def open_db(args) -> Database:
    """The database of `--db`, migrated to the newest schema first."""
    return migrated(args.db)


def task_of(s, args):
    """The task `import` and `sample` add items to, created from the arguments if missing."""
    return tasks.get_or_create_task(s, args.task, args.question_type, overlap=args.overlap,
                                    instructions=args.instructions,
                                    rubric=[r.strip() for r in args.rubric.split(",") if r.strip()],
                                    randomize_order=not args.no_randomize, selection=args.selection,
                                    gold_rate=args.gold_rate, via="cli")


CONFIG_ENV = "RLHFKIT_FEEDBACK_CONFIG"  # the settings a worker process builds its app from (see app_from_env)
APP_SETTINGS = ("db", "pool_size", "uncertainty_scorer", "secure_cookies", "forwarded_allow_ips",
                "rate_limit_storage", "workers")


def password_checks(workers: int) -> int:
    """Password checks one worker runs at once: half the cores, split between the workers (at
    least one each), so together they leave the other half to annotators' requests."""
    return max(1, (os.cpu_count() or 2) // 2 // workers)


def build_app(args):
    """The app `serve run` serves, from its parsed arguments (the schema must be migrated)."""
    scorer = OnlineScorer() if args.uncertainty_scorer == "hashed" else None
    guard = LoginGuard(storage=args.rate_limit_storage, max_concurrent=password_checks(args.workers))
    return create_app(Database(args.db, pool_size=args.pool_size, max_overflow=0), scorer=scorer,
                      secure_cookies=args.secure_cookies, forwarded_allow_ips=args.forwarded_allow_ips,
                      login_guard=guard)


def app_from_env():
    """The app of one worker of `serve run --workers N`: its settings come from the environment
    (uvicorn starts each worker from an import string, so nothing else can be handed over)."""
    raw = os.environ.get(CONFIG_ENV)
    if not raw:
        raise ConfigError(f"{CONFIG_ENV} is not set; start the server with `rlhfkit serve run`")
    return build_app(argparse.Namespace(**json.loads(raw)))


def check_workers(args) -> None:
    """Refuse settings several workers would get wrong (module docstring)."""
    if args.workers == 1:
        return
    if normalise_url(args.db).startswith("sqlite"):
        raise ConfigError(f"--workers {args.workers} needs PostgreSQL (--db postgresql://...): SQLite takes one "
                          "writer at a time and the server serialises its writes inside one process")
    if args.rate_limit_storage.startswith("memory://"):
        raise ConfigError(f"--workers {args.workers} needs --rate-limit-storage redis://HOST:PORT/DB: with "
                          "memory:// each worker would count login attempts on its own, "
                          f"{args.workers} times the allowed guesses")


def server_options(args) -> dict:
    """uvicorn's settings for `serve run`. Proxy headers are the app's business (it trusts them
    only from --forwarded-allow-ips): uvicorn's own handling, on by default, trusts
    X-Forwarded-For from 127.0.0.1, so any local client could claim any address."""
    return {"host": args.host, "port": args.port, "log_level": args.log_level, "access_log": False,
            "timeout_keep_alive": args.keep_alive, "proxy_headers": False}


def _run(args) -> int:
    check_workers(args)
    check_storage(args.rate_limit_storage)  # a bad or unreachable URL: one line now, not a 500 per login
    upgrade(args.db)  # once, before any worker starts
    where = normalise_url(args.db).split("@")[-1]
    print(f"rlhfkit serve: http://{args.host}:{args.port}/  (database {where}, {args.workers} worker"
          f"{'s' if args.workers > 1 else ''})", flush=True)
    if args.workers == 1:
        uvicorn.run(build_app(args), **server_options(args))
        return 0
    os.environ[CONFIG_ENV] = json.dumps({k: getattr(args, k) for k in APP_SETTINGS})
    uvicorn.run("rlhfkit.feedback.cli:app_from_env", factory=True, workers=args.workers,
                timeout_graceful_shutdown=5, **server_options(args),
                # a worker still importing on a busy machine answers the supervisor's ping late;
                # uvicorn's 5 s would kill and restart it
                timeout_worker_healthcheck=60)
    return 0


def _init_db(args) -> int:
    upgrade(args.db)
    print(f"database ready at revision {current_revision(args.db)}")
    return 0


def _create_user(args) -> int:
    password = os.environ.get(args.password_env, "") if args.password_env else getpass.getpass("password: ")
    db = open_db(args)
    with db.session() as s:
        user = accounts.create_user(s, args.username, password, args.role, reveal_lookalike=True)
        days = None if user.role == "owner" else accounts.MAX_TOKEN_DAYS
        token = create_api_token(s, user, "cli", days) if args.token else None
    print(f"created {args.role} {args.username!r}")
    if token:
        print(f"API token (shown once): {token}")
    return 0


def _import(args) -> int:
    records = items.read_jsonl(args.file)
    db = open_db(args)
    with db.session() as s:
        task = task_of(s, args)
        n = items.import_records(s, task, records, source=args.file, via="cli")
    print(f"imported {n} items into task {args.task!r}")
    return 0


def named_task(s, name: str):
    task = tasks.task_by_name(s, name)
    if task is None:
        raise LookupError(f"no task named {name!r}")
    return task


def _qc(args) -> int:
    db = open_db(args)
    with db.session() as s:
        print(json.dumps(ex.task_qc(s, named_task(s, args.task)), indent=2))
    return 0


def _list_users(args) -> int:
    db = open_db(args)
    with db.read_session() as s:
        for u in accounts.all_users(s):
            print(f"{u.id}\t{u.username}\t{u.role}\t{'active' if u.active else 'disabled'}")
    return 0


def _set_role(args) -> int:
    db = open_db(args)
    with db.session() as s:
        old = accounts.set_role(s, accounts.named_user(s, args.username), args.role, via="cli")
    print(f"{args.username}: role {old} -> {args.role}")
    return 0


def _set_active(args) -> int:
    active = args.command == "enable-user"
    db = open_db(args)
    with db.session() as s:
        accounts.set_active(s, accounts.named_user(s, args.username), active, via="cli")
    print(f"{args.username}: {'enabled (log in again: old tokens and sessions stay revoked)' if active else 'disabled (labels kept; tokens revoked, sessions ended)'}")
    return 0


def _create_token(args) -> int:
    if len(args.name) > 64 or name_problem(args.name):
        raise ValueError(f"--name: {name_problem(args.name) or 'at most 64 characters'}")
    db = open_db(args)
    with db.session() as s:
        user = accounts.named_user(s, args.username)
        if not user.active:
            raise ValueError(f"user {args.username!r} is disabled; enable-user first")
        days = args.expires_days
        if days is None and user.role != "owner":  # the default: the longest a non-owner's token lives
            days = accounts.MAX_TOKEN_DAYS
        days = accounts.token_days(user, days)
        secret = accounts.issue_token(s, user, args.name, days, expires_days=days, via="cli")
    print(secret)  # alone on stdout, so scripts can capture it; shown once
    return 0


def _list_tokens(args) -> int:
    db = open_db(args)
    with db.read_session() as s:
        user = accounts.named_user(s, args.username)
        now = utcnow()
        for t in accounts.tokens_of(s, user):
            state = "revoked" if t.revoked else "expired" if t.expires_at is not None and t.expires_at <= now \
                else "active"
            expires = "never" if t.expires_at is None else t.expires_at.isoformat(timespec="seconds") + "Z"
            print(f"{t.id}\t{t.name}\t{t.created_at.isoformat(timespec='seconds')}Z\t{expires}\t{state}")
    return 0


def _revoke_token(args) -> int:
    db = open_db(args)
    with db.session() as s:
        tok, already = accounts.revoke_token(s, args.token_id, via="cli")
        owner = tok.user.username
    print(f"token {args.token_id} of {owner}: {'already revoked' if already else 'revoked'}")
    return 0


HANDLERS = {"run": _run, "serve": _run, "init-db": _init_db, "create-user": _create_user, "import": _import, "qc": _qc, "list-users": _list_users, "set-role": _set_role,
            "disable-user": _set_active, "enable-user": _set_active, "create-token": _create_token,
            "list-tokens": _list_tokens, "revoke-token": _revoke_token}


if __name__ == "__main__":
    sys.exit(cli())
