"""Kill the server (SIGKILL) in the middle of a small load: no acknowledged label is lost or doubled."""

from __future__ import annotations

import pytest

from rlhfkit.feedback.testing import postgres_unavailable_reason


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_sigkill_mid_load_loses_nothing(backend):
    if backend == "postgres" and (reason := postgres_unavailable_reason()):
        pytest.skip(reason)
    from benchmarks.feedback_load import _one

    res = _one(backend, annotators=8, target=160, seed=3)
    assert res["kills"] and res["kills"][0]["after_acked_labels"] >= 0.4 * 160
    assert res["labels"] >= 160
    assert res["lost"] == 0 and res["duplicated"] == 0 and res["ack_id_mismatch"] == 0
    assert res["over_assigned"] == 0
    assert res["resends_not_replayed"] == 0 and res["errors"] == 0
    # every stored label was either acknowledged or in flight when the server died
    assert res["rows_in_db"] - res["labels"] == res["stored_but_unacknowledged"] >= 0
    cpu = res["cpu_ms_per_label"]  # where the CPU went, per label: every part did some work
    assert cpu["server"] > 0 and cpu["load_generator"] > 0
    assert cpu["server_side"] == pytest.approx(cpu["server"] + cpu["database"], abs=0.011)
    if backend == "postgres":
        assert cpu["database"] > 0


def test_cpu_seconds_read_from_proc_match_the_process_clock():
    import os
    import time

    from benchmarks._feedback_server import _cpu_s

    if not os.path.exists("/proc/self/stat"):
        pytest.skip("no /proc on this system")
    t0 = time.process_time()
    while time.process_time() - t0 < 0.3:  # burn some CPU so the two clocks have moved
        sum(i * i for i in range(1000))
    a, b = _cpu_s("/proc/self/stat"), time.process_time()
    tick = 1 / os.sysconf("SC_CLK_TCK")
    assert b - 2 * tick <= a + tick and a <= b + tick  # /proc counts whole clock ticks
    assert _cpu_s("/proc/0/stat") is None
