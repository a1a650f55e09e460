"""The traffic log: every request to the policy server and its response, in the feedback database.

Rows go to ``served_responses`` (rlhfkit.serving.tables) with the experiment, arm, model version,
user key, sampling settings, token counts, latency and status. Writing happens off the request
path: `TrafficLog.record` puts the row on a queue and a writer thread inserts queued rows in
batches, one transaction each, so a slow disk or database adds no latency to responses. The same
thread deletes rows older than the retention setting (their feedback goes with them) once an
hour.

Exports redact e-mail addresses and phone numbers (`redact`): addresses by pattern, phone
numbers with Google's libphonenumber (the `phonenumbers` port) for the configured region plus
any number written with an international prefix (``+`` or ``00``).
"""

from __future__ import annotations

import datetime as dt
import logging
import queue
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

from sqlalchemy import delete, insert, select

from rlhfkit.feedback.db import Database, upgrade
from rlhfkit.feedback.models import utcnow
from rlhfkit.serving.tables import ServedResponse, UseFeedback

log = logging.getLogger("rlhfkit.serving.traffic")

PURGE_EVERY_S = 3600.0
BATCH = 256
_COLUMNS = {c.name for c in ServedResponse.__table__.columns} - {"id"}
# RFC 5322's dot-atom local part, a dotted domain with a 2+ letter top level
EMAIL = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
                   r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,}")
# numbers dialled with an international prefix, whatever the country's grouping
INTERNATIONAL = re.compile(r"(?<![\w+])(?:\+|00)\d[\d\s().-]{5,}\d(?!\w)")


def redact(text: str, region: str = "US") -> str:
    """`text` with e-mail addresses replaced by [EMAIL] and phone numbers by [PHONE]."""
    import phonenumbers

    text = EMAIL.sub("[EMAIL]", text)
    text = INTERNATIONAL.sub("[PHONE]", text)
    matches = list(phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.POSSIBLE))
    for m in reversed(matches):
        if (m.start and text[m.start - 1].isalnum()) or (m.end < len(text) and text[m.end].isalnum()):
            continue  # digits inside a word or an id (chatcmpl-0168796...) are not a phone number
        text = text[:m.start] + "[PHONE]" + text[m.end:]
    return text


def redact_value(value: Any, region: str = "US") -> Any:
    """Redact every string inside a JSON-like value (messages, choices)."""
    if isinstance(value, str):
        return redact(value, region)
    if isinstance(value, list):
        return [redact_value(v, region) for v in value]
    if isinstance(value, dict):
        return {k: redact_value(v, region) for k, v in value.items()}
    return value


class TrafficLog:
    """Queue served responses and write them in the background (see the module docstring).

    `db` is a feedback-database URL or an open `Database`; the schema is upgraded on open.
    `retention_days` None keeps everything. Use as a context manager or call `close()`.
    """

    def __init__(self, db: str | Database, retention_days: float | None = None, migrate: bool = True):
        if isinstance(db, str):
            if migrate:
                upgrade(db)
            db = Database(db, pool_size=2)
            self._owns_db = True
        else:
            self._owns_db = False
        self.db = db
        self.retention_days = retention_days
        self.dropped = 0
        self._queue: queue.Queue[dict | None] = queue.Queue()
        self._idle = threading.Condition()
        self._queued = self._done = 0  # rows put on the queue / written (or dropped), in queue order
        self._next_purge = 0.0
        self._thread = threading.Thread(target=self._run, name="traffic-log", daemon=True)
        self._thread.start()

    # -- writing ----------------------------------------------------------------------------

    def record(self, **row: Any) -> None:
        """Queue one served response. Required: response_id, model_version, request, response,
        latency_ms; optional: the other columns of served_responses."""
        unknown = set(row) - _COLUMNS
        if unknown:
            raise TypeError(f"TrafficLog.record: unknown field(s) {sorted(unknown)}; known: {sorted(_COLUMNS)}")
        row.setdefault("created_at", utcnow())
        row.setdefault("sampling", {})
        row.setdefault("endpoint", "chat")
        row.setdefault("status", 200)
        row.setdefault("prompt_tokens", 0)
        row.setdefault("completion_tokens", 0)
        with self._idle:  # counted and queued together, so the counts follow the queue's order
            self._queued += 1
            self._queue.put(row)

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until every row queued before this call is written (or dropped after a database
        error); rows queued meanwhile by other requests are not waited for."""
        deadline = time.monotonic() + timeout
        with self._idle:
            target = self._queued
            while self._done < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"traffic log: {target - self._done} rows still queued after {timeout} s")
                self._idle.wait(left)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)
        if self._owns_db:
            self.db.dispose()

    def __enter__(self) -> TrafficLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self) -> None:
        while True:
            # first thing after start, then hourly: before the rows queued meanwhile are written
            if self.retention_days is not None and time.monotonic() >= self._next_purge:
                self._next_purge = time.monotonic() + PURGE_EVERY_S
                try:
                    self.purge(self.retention_days)
                except Exception:
                    log.exception("traffic log: retention purge failed")
            rows, stop = self._take()
            if rows:
                try:
                    with self.db.session() as s:
                        s.execute(insert(ServedResponse), rows)
                except Exception:  # a logging failure must never take the server down
                    log.exception("traffic log: could not write %d rows; dropped", len(rows))
                    self.dropped += len(rows)
                with self._idle:
                    self._done += len(rows)
                    self._idle.notify_all()
            if stop:
                return

    def _take(self) -> tuple[list[dict], bool]:
        """Block for one row, then take whatever else is queued (up to BATCH)."""
        try:
            first = self._queue.get(timeout=60.0)
        except queue.Empty:
            return [], False
        if first is None:
            return [], True
        rows = [first]
        while len(rows) < BATCH:
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is None:
                self._queue.put(None)  # stop after this batch
                break
            rows.append(nxt)
        return rows, False

    # -- retention and reading --------------------------------------------------------------

    def purge(self, older_than_days: float) -> int:
        """Delete served responses (and the feedback on them) older than `older_than_days`."""
        return purge(self.db, older_than_days)

    def get(self, response_id: str) -> ServedResponse | None:
        with self.db.read_session() as s:
            return s.scalar(select(ServedResponse).where(ServedResponse.response_id == response_id))


def purge(db: Database, older_than_days: float) -> int:
    cutoff = utcnow() - dt.timedelta(days=older_than_days)
    with db.session() as s:
        old = select(ServedResponse.response_id).where(ServedResponse.created_at < cutoff)
        # feedback first: SQLite enforces ON DELETE CASCADE only with foreign keys on
        s.execute(delete(UseFeedback).where(UseFeedback.response_id.in_(old) | UseFeedback.other_response_id.in_(old)))
        return s.execute(delete(ServedResponse).where(ServedResponse.created_at < cutoff)).rowcount or 0


def export_traffic(db: Database, experiment: str | None = None, redacted: bool = True,
                   region: str = "US") -> Iterator[dict]:
    """Served responses as JSON-ready dicts, oldest first; texts redacted unless `redacted` is False."""
    q = select(ServedResponse).order_by(ServedResponse.id)
    if experiment is not None:
        q = q.where(ServedResponse.experiment == experiment)
    with db.read_session() as s:
        for r in s.scalars(q.execution_options(yield_per=1000)):
            row = {c: getattr(r, c) for c in sorted(_COLUMNS)}
            row["created_at"] = r.created_at.isoformat()
            if redacted:
                row["request"], row["response"] = redact_value(r.request, region), redact_value(r.response, region)
                row["error"] = redact(r.error, region) if r.error else r.error
            yield row
