"""The PostgreSQL single-statement path of /next and submit against the transactional one.

`rlhfkit.feedback.service.fastpath` is a second copy of /next and submit that runs on
PostgreSQL in autocommit as statements that are each atomic (docs/feedback.md, "Durability and
load"); the transactional path in `service.assign` / `service.labels` covers every case. This
benchmark says whether the copy earns its keep: the same work through each, with the session
handling of the routes (`Database.lookup_session` in autocommit against `Database.session`,
committed before the reply), authentication and HTTP left out since they are the same for both.

One cycle = one annotator's /next and the submit of that item (pairwise, overlap 1, no gold).
Sequential: one annotator, blocks of CYCLES cycles alternating fast, transactional,
transactional, fast (ABBA, ROUNDS times), because the machine's speed drifts over minutes;
reported per path: p50/p95 milliseconds of /next and of submit, and process CPU per cycle.
Concurrent: THREADS annotators at once, each on its own connection, flat out for
CONCURRENT_SECONDS per block, in the same ABBA order; reported: cycles per second.
Every block records the load average (os.getloadavg) when it began and ended.

Needs the PostgreSQL server of the tests (RLHFKIT_PG_URL); it creates and drops its own database.
"""

from __future__ import annotations

import os
import random
import statistics
import threading
import time
import uuid

ROUNDS = 3
CYCLES = 300
THREADS = 8
CONCURRENT_SECONDS = 8.0


def _setup(url: str, annotators: int, items: int):
    from rlhfkit.feedback.db import Database, upgrade
    from rlhfkit.feedback.models import User
    from rlhfkit.feedback.service import items as item_service
    from rlhfkit.feedback.service import tasks

    upgrade(url)
    db = Database(url, pool_size=annotators + 2)
    with db.session() as s:
        users = [User(username=f"ann{i:03d}", username_key=f"ann{i:03d}", lookalike_key=f"ann{i:03d}",
                      password_hash="-", role="annotator") for i in range(annotators)]
        s.add_all(users)
        task = tasks.create_task(s, "paths", "pairwise", overlap=1, gold_rate=0.0)
        item_service.import_records(s, task, [{"prompt": f"p{i}", "responses": [f"a{i}", f"b{i}"]}
                                              for i in range(items)])
        task_id = task.id
    with db.read_session() as s:  # detached copies, as the routes hold them (task cache, lookup)
        settings = tasks.task_settings(s, task_id)
        people = [s.get(User, u.id) for u in users]
    return db, settings, people


def _fast_cycle(db, task, user, rng) -> tuple[float, float]:
    """As the routes do on PostgreSQL: the single-statement path, and the transactional one for
    whatever it does not cover (NeedsTransaction: a contended task, a concurrent duplicate, ...)."""
    from rlhfkit.feedback.service import accounts, assign, fastpath, labels

    t0 = time.perf_counter()
    try:
        with db.lookup_session() as s:
            item_id = fastpath.next_assignment(s, task, accounts.attach(s, user), rng)[0].id
    except fastpath.NeedsTransaction as e:
        FALLBACKS["next"] += 1
        with db.session() as s:
            item_id = assign.next_assignment(s, task, accounts.attach(s, user), rng, gold=e.gold)[0].id
    t1 = time.perf_counter()
    key = uuid.uuid4().hex
    try:
        with db.lookup_session() as s:
            _, replay = fastpath.submit_label(s, task, accounts.attach(s, user), item_id, {"choice": "left"}, key)
    except fastpath.NeedsTransaction:
        FALLBACKS["submit"] += 1
        with db.session() as s:
            _, replay = labels.submit_label(s, task, accounts.attach(s, user), item_id, {"choice": "left"}, key)
            s.commit()
    assert not replay
    return t1 - t0, time.perf_counter() - t1


def _tx_cycle(db, task, user, rng) -> tuple[float, float]:
    from rlhfkit.feedback.service import accounts, assign, labels

    t0 = time.perf_counter()
    with db.session() as s:
        item_id = assign.next_assignment(s, task, accounts.attach(s, user), rng)[0].id
    t1 = time.perf_counter()
    with db.session() as s:
        _, replay = labels.submit_label(s, task, accounts.attach(s, user), item_id, {"choice": "left"},
                                        uuid.uuid4().hex)
        s.commit()
    assert not replay
    return t1 - t0, time.perf_counter() - t1


PATHS = {"fast": _fast_cycle, "transactional": _tx_cycle}
FALLBACKS = {"next": 0, "submit": 0}  # fast-path requests that ran the transactional path


def _sequential_block(db, task, user, path: str, cycles: int, rng) -> dict:
    load0, cpu0 = os.getloadavg()[0], time.process_time()
    nexts, submits = [], []
    for _ in range(cycles):
        n, s = PATHS[path](db, task, user, rng)
        nexts.append(n)
        submits.append(s)
    return {"path": path, "next_ms": [1000 * x for x in nexts], "submit_ms": [1000 * x for x in submits],
            "cpu_ms_per_cycle": 1000 * (time.process_time() - cpu0) / cycles,
            "load_average": [round(load0, 2), round(os.getloadavg()[0], 2)]}


def _concurrent_block(db, task, users, path: str, seconds: float) -> dict:
    load0 = os.getloadavg()[0]
    stop, done = time.perf_counter() + seconds, [0] * len(users)

    def annotator(k: int) -> None:
        rng = random.Random(k)
        while time.perf_counter() < stop:
            PATHS[path](db, task, users[k], rng)
            done[k] += 1

    threads = [threading.Thread(target=annotator, args=(k,)) for k in range(len(users))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"path": path, "cycles": sum(done), "cycles_per_s": sum(done) / wall,
            "load_average": [round(load0, 2), round(os.getloadavg()[0], 2)]}


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _summary(blocks: list[dict]) -> dict:
    out = {}
    for path in PATHS:
        mine = [b for b in blocks if b["path"] == path]
        nexts = [x for b in mine for x in b["next_ms"]]
        submits = [x for b in mine for x in b["submit_ms"]]
        out[path] = {"next_p50_ms": round(statistics.median(nexts), 3), "next_p95_ms": round(_pct(nexts, 0.95), 3),
                     "submit_p50_ms": round(statistics.median(submits), 3),
                     "submit_p95_ms": round(_pct(submits, 0.95), 3),
                     "cycle_p50_ms_per_block": [round(statistics.median([a + b for a, b in zip(x["next_ms"],
                                                                                             x["submit_ms"])]), 3)
                                                for x in mine],
                     "cpu_ms_per_cycle": round(statistics.mean(b["cpu_ms_per_cycle"] for b in mine), 3)}
    return out


def run(quick: bool = False) -> dict | None:
    from rlhfkit.feedback.testing import postgres_unavailable_reason, temp_postgres_database

    reason = postgres_unavailable_reason()
    if reason is not None:
        print(f"feedback_paths: {reason}; nothing measured")
        return None
    rounds, cycles, seconds = (1, 30, 2.0) if quick else (ROUNDS, CYCLES, CONCURRENT_SECONDS)
    order = ["fast", "transactional", "transactional", "fast"] * rounds
    with temp_postgres_database(prefix="rlhfkit_paths") as url:
        db, task, users = _setup(url, THREADS, items=cycles * len(order) + 20_000)
        try:
            rng = random.Random(0)
            for path in PATHS:  # warm up: connections opened, statements built and cached
                _sequential_block(db, task, users[0], path, 10, rng)
            sequential = [_sequential_block(db, task, users[0], path, cycles, rng) for path in order]
            concurrent = [_concurrent_block(db, task, users, path, seconds) for path in order]
        finally:
            db.dispose()
    rates = {p: [b["cycles_per_s"] for b in concurrent if b["path"] == p] for p in PATHS}
    summary = _summary(sequential)
    return {
        "sequential": summary,
        # > 1: a cycle takes longer on the transactional path (medians of the blocks' medians)
        "sequential_cycle_ratio": round(statistics.median(summary["transactional"]["cycle_p50_ms_per_block"])
                                        / statistics.median(summary["fast"]["cycle_p50_ms_per_block"]), 3),
        "concurrent_cycles_per_s": {p: [round(r, 1) for r in v] for p, v in rates.items()},
        "fast_path_fallbacks": dict(FALLBACKS),
        "concurrent_ratio": round(statistics.mean(rates["fast"]) / statistics.mean(rates["transactional"]), 3),
        "load_average": {"sequential": [b["load_average"] for b in sequential],
                         "concurrent": [b["load_average"] for b in concurrent]},
        "settings": {"rounds": rounds, "cycles": cycles, "threads": THREADS, "concurrent_seconds": seconds},
    }
