"""Shared test settings: one intra-op thread per test worker (2 cores, 2 xdist workers)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)


import pytest  # noqa: E402

_PG_REASON: dict[str, str | None] = {}


@pytest.fixture(autouse=True)
def _one_thread_per_test():
    """A test that raises torch's thread count (the demo uses 2) must not leak it into the tests that
    follow in the same worker: GRPO's exact first-step checks depend on the matmul partitioning."""
    yield
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):
    """A feedback-service database URL: a fresh SQLite file, or a temporary PostgreSQL database."""
    from rlhfkit.feedback.testing import postgres_unavailable_reason, temp_postgres_database

    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/fb.db"
        return
    if "pg" not in _PG_REASON:  # asked once per worker
        _PG_REASON["pg"] = postgres_unavailable_reason()
    if reason := _PG_REASON["pg"]:
        pytest.skip(reason)
    with temp_postgres_database() as url:
        yield url
