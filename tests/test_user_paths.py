"""A mistyped model folder fails at once, and a hub name never waits more than ~2 s for the hub.

The hub is played by a local socket that accepts connections and never answers (a hub behind a
dead proxy or a firewall that drops packets): before, each request waited out a 10 s timeout."""

from __future__ import annotations

import shutil
import socket
import time

import pytest

from rlhfkit.errors import ConfigError
from rlhfkit.models import resolve_path


@pytest.fixture()
def silent_hub(monkeypatch, tmp_path):
    """The hub at a local socket whose connections the kernel accepts and nobody answers; an empty cache."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    from rlhfkit.models import paths

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{s.getsockname()[1]}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    for name in ("HF_HUB_OFFLINE", "HF_HUB_ETAG_TIMEOUT"):  # restored after the test: the code may change them
        monkeypatch.setattr(constants, name, getattr(constants, name))
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(paths, "_HUB_OK", set())
    get_session()  # the HTTP client is built before any clock starts: the waits measured are the network's
    yield tmp_path / "hf-cache"
    s.close()


def _timed(call, name: str) -> tuple[float, str | None]:
    t = time.perf_counter()
    try:
        call(name)
        return time.perf_counter() - t, None
    except ConfigError as e:
        return time.perf_counter() - t, str(e)


def test_local_looking_paths_fail_at_once_and_hub_names_within_2s(tmp_path, monkeypatch, silent_hub):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "qwen-2").mkdir(parents=True)
    (tmp_path / "runs" / "x").mkdir(parents=True)
    for name in ["models/qwen-3", "./foo", "../nowhere-at-all", "/abs/path", "~/no-such-model-folder", "runs/x/final"]:
        seconds, error = _timed(resolve_path, name)
        assert seconds < 0.5, (name, seconds)  # no request at all
        assert error and "does not exist" in error and "\n" not in error, (name, error)
        if name == "models/qwen-3":
            assert "the closest folder there is models/qwen-2" in error
    seconds, error = _timed(resolve_path, "someorg/some-model")
    assert error and "someorg/some-model" in error and "cannot be reached" in error
    assert seconds < 3, seconds  # one request with a 2 s budget (10 s, plus 3 s for a registry, before)


def test_a_cached_hub_model_loads_without_waiting_for_a_silent_hub(silent_hub):
    from rlhfkit.models import load_tokenizer
    from rlhfkit.tasks import kindly

    repo = silent_hub / "models--someorg--cached"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(kindly.tokenizer_path(), snapshot)
    shutil.copy(kindly.base_model_path() / "config.json", snapshot / "config.json")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    seconds, error = _timed(load_tokenizer, "someorg/cached")
    assert error is None, error
    assert seconds < 3, seconds  # one 2 s question to the hub, then the cache (minutes of retries before)


def test_the_closest_existing_folder_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "sft" / "final").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"runs/sft/final") as e:
        resolve_path("runs/sft/finl")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"runs/sft"):
        resolve_path("runs/sfx/final")  # the first missing level is the one named
    with pytest.raises(ConfigError, match="does not exist") as e:
        resolve_path("./zzz")
    assert "closest" not in str(e.value)  # nothing near it
