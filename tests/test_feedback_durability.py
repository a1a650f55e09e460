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
