"""Helpers shared by the feedback tests and benchmarks: throwaway PostgreSQL databases and a
server running in a background thread on a free local port."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator

from sqlalchemy.engine import make_url

PG_ADMIN_URL = os.environ.get("RLHFKIT_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


def postgres_unavailable_reason(admin_url: str = PG_ADMIN_URL) -> str | None:
    """None when the server answers, else why not (used as a pytest skip reason)."""
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed"
    try:
        with psycopg.connect(admin_url, connect_timeout=3) as conn:
            conn.execute("select 1")
    except Exception as e:  # any connection failure means: skip, with the reason
        return f"PostgreSQL at {admin_url} is unreachable: {str(e).strip().splitlines()[0]}"
    return None


@contextlib.contextmanager
def temp_postgres_database(admin_url: str = PG_ADMIN_URL, prefix: str = "rlhfkit_fb") -> Iterator[str]:
    """Create a uniquely named database, yield its SQLAlchemy URL, drop it afterwards."""
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(admin_url.replace("postgresql://", "postgresql+psycopg://", 1)).set(database=name)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """Run an ASGI app with uvicorn in a daemon thread on 127.0.0.1 (context manager)."""

    def __init__(self, app, port: int | None = None):
        import uvicorn

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    access_log=False, lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"feedback server did not start on port {self.port}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
