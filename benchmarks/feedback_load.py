"""Load and durability of the feedback service (issue 7, item 9).

For SQLite (WAL) and PostgreSQL in turn: start `rlhfkit serve` as a subprocess on 127.0.0.1,
let 50 simulated annotators (asyncio + httpx, each with its own API token) fetch items and
submit pairwise labels as fast as they can until >= 5,000 labels are acknowledged, SIGKILL the
server once 40% are in, restart it, and carry on. Clients retry every unacknowledged submit
with the same idempotency key, and also re-send 5% of acknowledged ones on purpose (a client
that never saw its answer). At the end the database is read directly:

- lost: acknowledged labels missing from the database (must be 0);
- duplicated: labels stored more than once for one (annotator, item) or one idempotency key;
- over_assigned: labels beyond the task's overlap summed over items (must be 0);
- p50_ms / p95_ms: latency of acknowledged submits (POST /labels), retries after the kill
  excluded; the GET /next latencies are reported beside them.

A second flat-out run per database follows in reverse order (ABBA: sqlite, postgres, postgres,
sqlite), reported in `flat_out_repeat`, with both runs' labels/s and their mean per database
(`flat_out_labels_per_s`, `flat_out_labels_per_s_mean`); every run records the machine's load
average (os.getloadavg) when it began and ended.

Then the comparison on the same work (`flat_out_comparison`): COMPARE_ROUNDS rounds of
postgres, sqlite, sqlite, postgres, 3,000 labels each, no kill, with per-run figures, the means
and PostgreSQL's ratio to SQLite in labels/s and in server-side CPU per label.

Each flat-out run also says where the CPU went (`cpu_ms_per_label`, read from /proc): the
server process since it became healthy (summed over the restart), every PostgreSQL process
(backends that exit included, through the postmaster's reaped-children time), the load
generator, and `server_side` = server + database, which compares the two databases on the
same work whatever the load generator costs; `server_side_cpu_ms_per_label_mean` averages it
over both runs. Each annotator has its own HTTP client and connection, as each annotator's
browser has.

Then a paced run per database (JSON `paced`): each of the 50 annotators reads for 2-5 s
(uniform) before submitting, and fetches its next item right after the acknowledgement, while
it reads (the page prefetches it), for PACED_SECONDS. Reported: p50/p95 of the submits (what
an annotator waits for) and of the prefetched /next calls; target p95 <= 200 ms.

Last, `workers`: PostgreSQL flat out with the server run as 1 and as 2 worker processes
(`serve run --workers 2`, login counters in Redis at FEEDBACK_LOAD_REDIS, default
redis://127.0.0.1:6379/15) on the same work, 3,000 labels a run, no kill, in the order 1, 2, 2,
1: labels/s and the load average at the start and end of each run, the mean per worker count
and `two_over_one_labels_per_s`. FEEDBACK_LOAD_ONLY=workers runs that section alone and merges
it into the last full run's benchmarks/results/feedback_load.json (the other keys kept, their
run named in `carried_from`, the section in `sections_run`): the full benchmark takes over
ten minutes.

The load generator and the server share this machine's CPUs, so latencies include contention.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import tempfile
import time
import uuid
from contextlib import AsyncExitStack, ExitStack, asynccontextmanager
from pathlib import Path

import httpx
import numpy as np

from benchmarks._feedback_server import REDIS_URL, Server, _database_cpu_s, redis_unavailable_reason

ANNOTATORS = 50
TARGET_LABELS = 5000
OVERLAP = 3
KILL_AT = 0.4
RESEND_RATE = 0.05
PASSWORD = "load-test-password"
PACED_SECONDS = 75
COMPARE_LABELS = 3000  # labels per run of the alternating comparison (no kill)
COMPARE_ROUNDS = 2  # of postgres, sqlite, sqlite, postgres
PACED_THINK_S = (2.0, 5.0)


def _setup(url: str, annotators: int, items: int) -> tuple[int, list[str]]:
    from rlhfkit.feedback.db import Database, upgrade
    from rlhfkit.feedback.models import User
    from rlhfkit.feedback.security import create_api_token, hash_password
    from rlhfkit.feedback.service.items import import_records
    from rlhfkit.feedback.service.tasks import create_task

    upgrade(url)
    db = Database(url, pool_size=2)
    pw = hash_password(PASSWORD)  # one Argon2 hash shared: hashing 50 times adds nothing here
    with db.session() as s:
        users = [User(username=f"ann{i:03d}", username_key=f"ann{i:03d}", password_hash=pw, role="annotator")
                 for i in range(annotators)]
        s.add_all(users)
        s.flush()
        tokens = [create_api_token(s, u, "load") for u in users]
        task = create_task(s, "load", "pairwise", overlap=OVERLAP, gold_rate=0.0)
        import_records(s, task, [{"prompt": f"prompt {i}", "responses": [f"kind answer {i}", f"curt answer {i}"]}
                                     for i in range(items)])
        task_id = task.id
    db.dispose()
    return task_id, tokens


@asynccontextmanager
async def _clients(n: int):
    """One HTTP client per annotator, each with its own keep-alive connection as each
    annotator's browser has, kept while the annotator reads (httpx's default closes it after
    5 s idle; browsers keep idle connections far longer). One client shared by all 50 made
    httpx scan its whole pool on every request and response: half the load generator's CPU,
    taken from the server it shares the machine with."""
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1, keepalive_expiry=60)
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(httpx.AsyncClient(timeout=60, limits=limits)) for _ in range(n)]


async def _annotator(client: httpx.AsyncClient, base: str, task_id: int, token: str, state: dict, rng: random.Random):
    headers = {"Authorization": f"Bearer {token}"}
    while state["acked_count"] < state["target"]:
        try:
            t0 = time.perf_counter()
            r = await client.get(f"{base}/api/tasks/{task_id}/next", headers=headers)
            state["next_ms"].append((time.perf_counter() - t0) * 1000)
        except httpx.TransportError:
            await asyncio.sleep(0.2)  # server down: try again
            continue
        if r.status_code == 204:
            return
        if r.status_code != 200:
            state["errors"].append(f"next {r.status_code} {r.text[:200]}")
            await asyncio.sleep(0.2)
            continue
        item = r.json()
        body = {"item_id": item["item_id"], "value": {"choice": rng.choice(["left", "right", "left", "tie"])},
                "idempotency_key": uuid.uuid4().hex}
        retried = False
        while True:
            try:
                t0 = time.perf_counter()
                r = await client.post(f"{base}/api/tasks/{task_id}/labels", headers=headers, json=body)
                ms = (time.perf_counter() - t0) * 1000
            except httpx.TransportError:
                retried = True  # no answer: the label may or may not be stored; resend the same key
                await asyncio.sleep(0.2)
                continue
            if r.status_code in (200, 201):
                break
            if r.status_code >= 500:
                retried = True
                await asyncio.sleep(0.2)
                continue
            state["errors"].append(f"submit {r.status_code} {r.text[:200]}")
            break
        if r.status_code not in (200, 201):
            continue
        if not retried:
            state["submit_ms"].append(ms)
        label = r.json()
        state["acked"][(token, body["idempotency_key"])] = label["id"]
        state["acked_count"] += 1
        if r.status_code == 200:
            state["replays_after_kill"] += 1
        if rng.random() < RESEND_RATE:  # the client re-sends an answer it already got an ack for
            try:
                again = await client.post(f"{base}/api/tasks/{task_id}/labels", headers=headers, json=body)
                ok = again.status_code == 200 and again.json()["id"] == label["id"] and again.json()["replayed"]
                state["resends"] += 1
                state["resend_mismatch"] += 0 if ok else 1
            except httpx.TransportError:
                pass


async def _drive(base: str, task_id: int, tokens: list[str], target: int, server: Server, seed: int,
                 kill: bool = True) -> dict:
    state = {"acked": {}, "acked_count": 0, "target": target, "submit_ms": [], "next_ms": [], "errors": [],
             "resends": 0, "resend_mismatch": 0, "replays_after_kill": 0, "kills": []}

    async def killer():
        while state["acked_count"] < KILL_AT * target:
            await asyncio.sleep(0.02)
        t0 = time.perf_counter()
        at = state["acked_count"]
        await asyncio.to_thread(server.kill)
        await asyncio.to_thread(server.start)
        state["kills"].append({"after_acked_labels": at, "downtime_s": round(time.perf_counter() - t0, 2)})

    async with _clients(len(tokens)) as clients:
        t0 = time.perf_counter()
        kill_task = asyncio.create_task(killer()) if kill else None
        await asyncio.gather(*[_annotator(client, base, task_id, tok, state, random.Random(seed + i))
                               for i, (client, tok) in enumerate(zip(clients, tokens))])
        state["seconds"] = time.perf_counter() - t0
        if kill_task is not None and not kill_task.done():
            kill_task.cancel()
    return state


def _audit(url: str, state: dict, tokens: list[str]) -> dict:
    from sqlalchemy import func, select

    from rlhfkit.feedback.db import Database
    from rlhfkit.feedback.models import ApiToken, Label
    from rlhfkit.feedback.security import digest

    db = Database(url, pool_size=1)
    with db.session() as s:
        user_of = {t.token_hash: t.user_id for t in s.scalars(select(ApiToken))}
        stored = {(lab.user_id, lab.idempotency_key): lab.id for lab in s.scalars(select(Label))}
        per_pair = s.execute(select(Label.user_id, Label.item_id, func.count()).group_by(Label.user_id, Label.item_id)
                             .having(func.count() > 1)).all()
        per_key = s.execute(select(Label.user_id, Label.idempotency_key, func.count())
                            .group_by(Label.user_id, Label.idempotency_key).having(func.count() > 1)).all()
        rows = s.scalar(select(func.count()).select_from(Label))
        # labels beyond an item's overlap: each item may go to at most OVERLAP annotators
        per_item = s.execute(select(Label.item_id, func.count()).group_by(Label.item_id)
                             .having(func.count() > OVERLAP)).all()
    db.dispose()
    lost = [k for k in state["acked"] if (user_of[digest(k[0])], k[1]) not in stored]
    wrong_id = [k for k, lid in state["acked"].items() if stored.get((user_of[digest(k[0])], k[1])) not in (None, lid)]
    return {"rows": rows, "lost": len(lost), "id_mismatch": len(wrong_id),
            "over_assigned": sum(n - OVERLAP for _, n in per_item),
            "duplicated": sum(n - 1 for *_, n in per_pair) + sum(n - 1 for *_, n in per_key)}


async def _paced_annotator(client: httpx.AsyncClient, base: str, task_id: int, token: str, state: dict,
                           rng: random.Random, until: float):
    headers = {"Authorization": f"Bearer {token}"}
    await asyncio.sleep(rng.uniform(0, PACED_THINK_S[1]))  # annotators do not all start at once
    r = await client.get(f"{base}/api/tasks/{task_id}/next", headers=headers)
    while r.status_code == 200 and time.perf_counter() < until:
        item = r.json()
        await asyncio.sleep(rng.uniform(*PACED_THINK_S))  # reading and deciding
        body = {"item_id": item["item_id"], "value": {"choice": rng.choice(["left", "right", "tie"])},
                "idempotency_key": uuid.uuid4().hex}
        t0 = time.perf_counter()
        s = await client.post(f"{base}/api/tasks/{task_id}/labels", headers=headers, json=body)
        state["submit_ms"].append((time.perf_counter() - t0) * 1000)
        if s.status_code not in (200, 201):
            state["errors"].append(f"submit {s.status_code} {s.text[:200]}")
        t0 = time.perf_counter()
        r = await client.get(f"{base}/api/tasks/{task_id}/next", headers=headers)  # prefetch the next item
        state["next_ms"].append((time.perf_counter() - t0) * 1000)


def _paced(backend: str, annotators: int, seconds: float, seed: int) -> dict:
    from rlhfkit.feedback.testing import (
        free_port,
        postgres_unavailable_reason,
        temp_postgres_database,
    )

    with ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="rlhfkit-paced-"))
        if backend == "sqlite":
            url = f"sqlite:///{tmp}/paced.db"
        else:
            reason = postgres_unavailable_reason()
            if reason:
                return {"skipped": reason}
            url = stack.enter_context(temp_postgres_database(prefix="rlhfkit_paced"))
        max_labels = int(annotators * seconds / PACED_THINK_S[0]) + annotators
        task_id, tokens = _setup(url, annotators, -(-max_labels // OVERLAP) + annotators)
        log = stack.enter_context(open(os.path.join(tmp, "server.log"), "w"))
        port = free_port()
        server = Server(url, port, log)
        server.start()
        stack.callback(server.stop)
        state = {"submit_ms": [], "next_ms": [], "errors": []}

        async def drive():
            async with _clients(len(tokens)) as each:
                until = time.perf_counter() + seconds
                await asyncio.gather(*[_paced_annotator(client, f"http://127.0.0.1:{port}", task_id, tok, state,
                                                        random.Random(seed + i), until)
                                       for i, (client, tok) in enumerate(zip(each, tokens))])

        load_before = os.getloadavg()
        t0 = time.perf_counter()
        asyncio.run(drive())
        ran = time.perf_counter() - t0
        load_after = os.getloadavg()
        server.stop()
        audit = _audit(url, {"acked": {}}, tokens)
    sub, nxt = np.asarray(state["submit_ms"]), np.asarray(state["next_ms"])
    both = np.concatenate([sub, nxt])
    return {"annotators": annotators, "think_s": list(PACED_THINK_S), "seconds": round(ran, 1),
            "labels": len(sub), "labels_per_s": round(len(sub) / ran, 2),
            "submit_p50_ms": round(float(np.percentile(sub, 50)), 2), "submit_p95_ms": round(float(np.percentile(sub, 95)), 2),
            "next_p50_ms": round(float(np.percentile(nxt, 50)), 2), "next_p95_ms": round(float(np.percentile(nxt, 95)), 2),
            "p50_ms": round(float(np.percentile(both, 50)), 2), "p95_ms": round(float(np.percentile(both, 95)), 2),
            "over_assigned": audit["over_assigned"], "errors": len(state["errors"]), "first_errors": state["errors"][:3],
            # the machine's 1/5/15-minute load averages (os.getloadavg) when the run began and ended
            "load_average_start": [round(x, 2) for x in load_before],
            "load_average_end": [round(x, 2) for x in load_after]}


def _cpu_per_label(before: tuple, after: tuple, labels: int) -> dict:
    """Where the CPU went, in ms per acknowledged label: the server process (with SQLite, the
    database's work too: it runs inside), the PostgreSQL processes (whatever else they did
    meanwhile included), the load generator (this process), and the server side (server +
    database) that the two databases are compared on."""
    spent = {k: None if a is None or b is None else 1000 * (b - a) / max(labels, 1)
             for k, a, b in zip(("server", "database", "load_generator"), before, after)}
    if spent["server"] is not None and spent["database"] is not None:
        spent["server_side"] = spent["server"] + spent["database"]
    return {k: None if v is None else round(v, 2) for k, v in spent.items()}


def _one(backend: str, annotators: int, target: int, seed: int, kill: bool = True, workers: int = 1) -> dict:
    from rlhfkit.feedback.testing import (
        free_port,
        postgres_unavailable_reason,
        temp_postgres_database,
    )

    with ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="rlhfkit-load-"))
        if backend == "sqlite":
            url = f"sqlite:///{tmp}/load.db"
        else:
            reason = postgres_unavailable_reason()
            if reason:
                return {"skipped": reason}
            url = stack.enter_context(temp_postgres_database(prefix="rlhfkit_load"))
        items = -(-target // OVERLAP) + annotators  # enough items that the target is reached
        task_id, tokens = _setup(url, annotators, items)
        log = stack.enter_context(open(os.path.join(tmp, "server.log"), "w"))
        port = free_port()
        server = Server(url, port, log, workers=workers)
        server.start()
        stack.callback(server.stop)
        load_before = os.getloadavg()
        cpu_before = (server.busy_s(), _database_cpu_s(), time.process_time())
        state = asyncio.run(_drive(f"http://127.0.0.1:{port}", task_id, tokens, target, server, seed, kill))
        cpu_after = (server.busy_s(), _database_cpu_s(), time.process_time())
        load_after = os.getloadavg()
        server.stop()
        audit = _audit(url, state, tokens)
        submit, nxt = np.asarray(state["submit_ms"]), np.asarray(state["next_ms"])
        return {
            "labels": len(state["acked"]), "lost": audit["lost"], "duplicated": audit["duplicated"],
            "over_assigned": audit["over_assigned"],
            "p50_ms": round(float(np.percentile(submit, 50)), 2), "p95_ms": round(float(np.percentile(submit, 95)), 2),
            "next_p50_ms": round(float(np.percentile(nxt, 50)), 2), "next_p95_ms": round(float(np.percentile(nxt, 95)), 2),
            "rows_in_db": audit["rows"], "stored_but_unacknowledged": audit["rows"] - len(state["acked"]),
            "ack_id_mismatch": audit["id_mismatch"], "annotators": annotators,
            "deliberate_resends": state["resends"], "resends_not_replayed": state["resend_mismatch"],
            "replayed_after_kill": state["replays_after_kill"], "kills": state["kills"],
            "errors": len(state["errors"]), "first_errors": state["errors"][:3],
            "seconds": round(state["seconds"], 2), "labels_per_s": round(len(state["acked"]) / state["seconds"], 1),
            "cpu_ms_per_label": _cpu_per_label(cpu_before, cpu_after, len(state["acked"])),
            "load_average_start": [round(x, 2) for x in load_before],
            "load_average_end": [round(x, 2) for x in load_after],
            "_submit_ms": submit,
        }


def _compare(annotators: int, target: int, rounds: int) -> dict:
    """The two databases on the same work, without the kill: `rounds` x (postgres, sqlite,
    sqlite, postgres), each run on a fresh database and server; per run labels/s and CPU per
    label, then the means and PostgreSQL's ratio to SQLite. Alternating cancels the machine's
    drift (its speed moves by 10-20 % over minutes), which one pair of runs cannot."""
    runs: dict[str, list] = {"postgres": [], "sqlite": []}
    for i, backend in enumerate(["postgres", "sqlite", "sqlite", "postgres"] * rounds):
        res = _one(backend, annotators, target, seed=100 + i, kill=False)
        if "labels" not in res:
            return {"skipped": res.get("skipped", "a database is unavailable")}
        runs[backend].append({"labels_per_s": res["labels_per_s"], "cpu_ms_per_label": res["cpu_ms_per_label"],
                              "lost": res["lost"], "over_assigned": res["over_assigned"]})
    mean = {b: {"labels_per_s": round(float(np.mean([r["labels_per_s"] for r in v])), 1),
                "server_side_cpu_ms_per_label": round(float(np.mean([r["cpu_ms_per_label"]["server_side"]
                                                                     for r in v])), 2)} for b, v in runs.items()}
    return {"labels_per_run": target, "order": "postgres, sqlite, sqlite, postgres" + f" x {rounds}",
            "runs": runs, "mean": mean,
            "postgres_over_sqlite_labels_per_s": round(mean["postgres"]["labels_per_s"]
                                                       / mean["sqlite"]["labels_per_s"], 3),
            "postgres_over_sqlite_server_side_cpu": round(mean["postgres"]["server_side_cpu_ms_per_label"]
                                                          / mean["sqlite"]["server_side_cpu_ms_per_label"], 3)}


def _workers(annotators: int, target: int) -> dict:
    """PostgreSQL flat out with 1 and 2 server worker processes on the same work (`target`
    labels a run, no kill), in the order 1, 2, 2, 1 so that the machine's drift cancels: per run
    labels/s, server-side CPU per label and the load average at its start and end, then the
    mean per worker count and the ratio of 2 workers to 1."""
    from rlhfkit.feedback.testing import postgres_unavailable_reason

    if reason := postgres_unavailable_reason() or redis_unavailable_reason():
        return {"skipped": reason}
    runs: dict[str, list] = {"1": [], "2": []}
    for i, workers in enumerate((1, 2, 2, 1)):
        res = _one("postgres", annotators, target, seed=300 + i, kill=False, workers=workers)
        runs[str(workers)].append({k: res[k] for k in ("labels_per_s", "cpu_ms_per_label", "lost", "over_assigned",
                                                        "duplicated", "errors", "load_average_start",
                                                        "load_average_end")})
        print(f"feedback_load workers={workers}: {runs[str(workers)][-1]}", file=sys.stderr, flush=True)
    mean = {n: round(float(np.mean([r["labels_per_s"] for r in v])), 1) for n, v in runs.items()}
    return {"backend": "postgres", "labels_per_run": target, "annotators": annotators,
            "order": "1, 2, 2, 1 workers", "rate_limit_storage": REDIS_URL, "runs": runs,
            "labels_per_s_mean": mean, "two_over_one_labels_per_s": round(mean["2"] / mean["1"], 3)}


RESULTS = Path(__file__).resolve().parent / "results" / "feedback_load.json"
SECTIONS = ("workers",)  # what FEEDBACK_LOAD_ONLY may name


def _only(section: str, annotators: int, quick: bool) -> dict:
    """FEEDBACK_LOAD_ONLY=workers: measure that section alone and merge it into the last full
    run's results (the other keys kept as they were, `carried_from` saying which run they are
    from), since the full benchmark takes over ten minutes."""
    if section not in SECTIONS:
        raise SystemExit(f"FEEDBACK_LOAD_ONLY={section!r}: choose from {', '.join(SECTIONS)}")
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    added_by_main = ("benchmark", "wall_seconds", "machine", "env", "quick", "carried_from", "sections_run")
    out = {k: v for k, v in previous.items() if k not in added_by_main}
    if previous:
        out["carried_from"] = previous.get("carried_from") or {
            "git_commit": previous.get("env", {}).get("git_commit"), "wall_seconds": previous.get("wall_seconds"),
            "note": "every key but the sections_run ones is from this earlier full run"}
    out["sections_run"] = [section]
    out[section] = _workers(annotators, COMPARE_LABELS if not quick else 300)
    return out


def run(quick: bool = False) -> dict:
    annotators = 10 if quick else ANNOTATORS
    if os.environ.get("FEEDBACK_LOAD_ONLY"):
        return _only(os.environ["FEEDBACK_LOAD_ONLY"], annotators, quick)
    return _full(quick)


def _full(quick: bool) -> dict:
    annotators, target = (10, 300) if quick else (ANNOTATORS, TARGET_LABELS)
    out: dict = {"annotators": annotators, "target_labels": target, "overlap": OVERLAP,
                 "kill_after_fraction": KILL_AT, "note": "client and server share the machine's CPUs (contended)"}
    out["load_average_start"] = [round(x, 2) for x in os.getloadavg()]
    all_ms = []
    for backend in ("sqlite", "postgres"):
        res = _one(backend, annotators, target, seed=0)
        if "_submit_ms" in res:
            all_ms.append(res.pop("_submit_ms"))
        out[backend] = res
        print(f"feedback_load {backend}: {res}", file=sys.stderr, flush=True)
    ran = [out[b] for b in ("sqlite", "postgres") if "labels" in out[b]]
    out["labels"] = sum(r["labels"] for r in ran)
    out["lost"] = sum(r["lost"] for r in ran)
    out["duplicated"] = sum(r["duplicated"] for r in ran)
    merged = np.concatenate(all_ms) if all_ms else np.zeros(1)
    out["p50_ms"] = round(float(np.percentile(merged, 50)), 2)
    out["p95_ms"] = round(float(np.percentile(merged, 95)), 2)
    # a second flat-out run per database in the reverse order (sqlite, postgres, postgres,
    # sqlite): other work on a shared machine drifts, and ABBA order lets the comparison of the
    # two databases average it out
    repeat = {b: _one(b, annotators, target, seed=2) for b in ("postgres", "sqlite")}
    out["flat_out_repeat"] = {b: {k: r[k] for k in ("labels_per_s", "p50_ms", "p95_ms", "over_assigned", "lost",
                                                    "duplicated", "cpu_ms_per_label", "load_average_start",
                                                    "load_average_end")}
                              for b, r in repeat.items() if "labels" in r}
    out["flat_out_labels_per_s"] = {b: [out[b]["labels_per_s"], out["flat_out_repeat"][b]["labels_per_s"]]
                                    for b in out["flat_out_repeat"] if "labels_per_s" in out[b]}
    out["flat_out_labels_per_s_mean"] = {b: round(float(np.mean(v)), 1) for b, v in out["flat_out_labels_per_s"].items()}
    # the same work measured without the load generator: CPU of the server and the database
    # per label, averaged over both flat-out runs
    out["server_side_cpu_ms_per_label_mean"] = {
        b: round(float(np.mean([out[b]["cpu_ms_per_label"]["server_side"],
                                out["flat_out_repeat"][b]["cpu_ms_per_label"]["server_side"]])), 2)
        for b in out["flat_out_repeat"] if out[b]["cpu_ms_per_label"].get("server_side") is not None}
    print(f"feedback_load flat-out repeat: {out['flat_out_repeat']}", file=sys.stderr, flush=True)
    out["flat_out_comparison"] = _compare(annotators, COMPARE_LABELS if not quick else target, COMPARE_ROUNDS)
    print(f"feedback_load flat-out comparison: {out['flat_out_comparison']}", file=sys.stderr, flush=True)
    seconds = 10 if quick else PACED_SECONDS
    out["paced"] = {b: _paced(b, annotators, seconds, seed=1) for b in ("sqlite", "postgres")}
    print(f"feedback_load paced: {out['paced']}", file=sys.stderr, flush=True)
    out["paced_target_p95_ms"] = 200
    out["workers"] = _workers(annotators, COMPARE_LABELS if not quick else target)
    print(f"feedback_load workers: {out['workers']}", file=sys.stderr, flush=True)
    out["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    return out
