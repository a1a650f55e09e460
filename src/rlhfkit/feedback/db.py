"""Database engines and migrations: SQLite in WAL mode by default, PostgreSQL by URL.

SQLite notes (why the pragmas): WAL lets readers run while one writer commits;
``synchronous=FULL`` fsyncs the WAL at every commit, so an acknowledged label survives a
killed server *and* a power cut; every transaction starts with ``BEGIN IMMEDIATE`` so that
concurrent writers queue on ``busy_timeout`` instead of failing with SQLITE_BUSY when a
read lock would have to be upgraded.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, Engine, create_engine, event, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from rlhfkit.errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_URL = "sqlite:///feedback.db"
POOL_RECYCLE_S = 1800


def normalise_url(url: str) -> str:
    """Accept a bare file path for SQLite and plain ``postgresql://`` for psycopg 3."""
    if "://" not in url:
        return f"sqlite:///{Path(url).expanduser().resolve()}"
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def make_engine(url: str = DEFAULT_URL, pool_size: int = 20, max_overflow: int | None = None) -> Engine:
    """Create an engine for `url` (a SQLAlchemy URL or a path to a SQLite file) with a pool of
    `pool_size` connections plus up to `max_overflow` (default: as many again) opened on demand."""
    max_overflow = pool_size if max_overflow is None else max_overflow
    url = normalise_url(url)
    try:
        parsed = make_url(url)
    except Exception as e:  # sqlalchemy raises ArgumentError with a terse message
        raise ConfigError(f"database URL {url!r} is not valid: {e}") from e
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            raise ConfigError("an in-memory SQLite database cannot be shared between requests; give a file path")
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 60},
                               pool_size=pool_size, max_overflow=max_overflow)
        _sqlite_pragmas(engine)
        return engine
    if backend == "postgresql":
        # No pool_pre_ping: it costs a round trip on every checkout (two per request). Pooled
        # connections are renewed after POOL_RECYCLE_S instead, and a connection found dead
        # (server restarted) makes SQLAlchemy invalidate the whole pool; the request that met
        # it is answered 503 with Retry-After (app.py) and the next one reconnects.
        return create_engine(url, pool_size=pool_size, max_overflow=max_overflow, pool_recycle=POOL_RECYCLE_S)
    raise ConfigError(f"database URL {url!r}: only sqlite and postgresql are supported")


def _sqlite_pragmas(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record):  # noqa: ANN001
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (below)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=60000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn):  # noqa: ANN001
        # read-only sessions (authentication, listings) take no write lock
        conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get("rlhfkit_readonly") else "BEGIN IMMEDIATE")


def alembic_config(url: str):
    cfg = Config()
    cfg.set_main_option("script_location", str(PACKAGE_DIR / "migrations"))
    cfg.set_main_option("sqlalchemy.url", normalise_url(url).replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Create or upgrade the schema by running the shipped Alembic migrations."""
    command.upgrade(alembic_config(url), revision)


def migrated(url: str, pool_size: int = 2) -> Database:
    """A Database for `url` once its schema is at the newest revision (what every CLI command opens)."""
    upgrade(url)
    return Database(url, pool_size=pool_size)


def current_revision(url: str) -> str | None:
    engine = make_engine(url, pool_size=1)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


class Database:
    """An engine plus a session factory; `session()` commits on success, rolls back on error."""

    def __init__(self, url: str = DEFAULT_URL, pool_size: int = 20, max_overflow: int | None = None):
        self.url = normalise_url(url)
        self.engine = make_engine(self.url, pool_size=pool_size, max_overflow=max_overflow)
        self.factory = sessionmaker(self.engine, expire_on_commit=False)
        self._write_lock = threading.Lock()
        self.read_factory = sessionmaker(self.engine.execution_options(rlhfkit_readonly=True), expire_on_commit=False)
        # one-statement lookups (the caller's token or session on every request): on PostgreSQL
        # in autocommit, which saves the BEGIN and ROLLBACK round trips a transaction costs
        self.lookup_engine = self.engine.execution_options(isolation_level="AUTOCOMMIT") \
            if self.backend == "postgresql" else self.engine.execution_options(rlhfkit_readonly=True)
        self.lookup_factory = sessionmaker(self.lookup_engine, expire_on_commit=False)

    @property
    def backend(self) -> str:
        return self.engine.dialect.name

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        # SQLite has one writer at a time. Queueing writers of this process on a lock (FIFO-ish,
        # no polling) instead of on SQLite's busy handler, which sleeps in growing steps of up
        # to 100 ms, keeps tail latency down; other processes still wait on busy_timeout.
        lock = self._write_lock if self.backend == "sqlite" else contextlib.nullcontext()
        with lock:
            s = self.factory()
            try:
                yield s
                s.commit()
            except BaseException:
                s.rollback()
                raise
            finally:
                s.close()

    @contextlib.contextmanager
    def read_session(self) -> Iterator[Session]:
        """A session for reads only: on SQLite it does not queue behind writers."""
        s = self.read_factory()
        try:
            yield s
        finally:
            s.close()  # ends the transaction; loaded objects stay readable (detached, not expired)

    @contextlib.contextmanager
    def lookup_session(self) -> Iterator[Session]:
        """A session for one read statement (no multi-statement snapshot on PostgreSQL)."""
        s = self.lookup_factory()
        try:
            yield s
        finally:
            s.close()

    @contextlib.contextmanager
    def lookup_connection(self) -> Iterator[Connection]:
        """`lookup_session` without the ORM: a Core connection for one read statement."""
        with self.lookup_engine.connect() as conn:
            yield conn

    def ping(self) -> None:
        """One trivial query: raises when the database cannot be reached (the health check)."""
        with self.read_session() as s:
            s.execute(select(1))

    def dispose(self) -> None:
        self.engine.dispose()
