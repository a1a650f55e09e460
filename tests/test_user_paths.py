"""A mistyped model folder fails at once, and a hub name never waits more than ~2 s for the hub.

The hub is played by a local socket that accepts connections and never answers (a hub behind a
dead proxy or a firewall that drops packets): before, each request waited out a 10 s timeout."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from rlhfkit.errors import ConfigError
from rlhfkit.models import resolve_path


@pytest.fixture()
def silent_hub():
    """An HF_ENDPOINT whose connections are accepted by the kernel and never answered."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    yield f"http://127.0.0.1:{s.getsockname()[1]}"
    s.close()


def _timed(names: list[str], cwd, endpoint: str, call: str = "resolve_path") -> list[dict]:
    """`call` (resolve_path or load_tokenizer) of each name in a fresh process with the hub at `endpoint`:
    seconds and error."""
    code = textwrap.dedent(f"""
        import json, time
        from huggingface_hub.utils import get_session
        get_session()  # the HTTP client is built before the clock starts: the wait measured is the network's
        from rlhfkit.models import {call}
        out = []
        for name in {names!r}:
            t = time.perf_counter()
            try:
                {call}(name)
                err = None
            except Exception as e:
                err = f"{{type(e).__name__}}: {{e}}"
            out.append({{"name": name, "seconds": time.perf_counter() - t, "error": err}})
        print(json.dumps(out))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_HUB_")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(cwd / "hf-home"))
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_local_looking_paths_fail_at_once_and_hub_names_within_2s(tmp_path, silent_hub):
    (tmp_path / "models" / "qwen-2").mkdir(parents=True)
    (tmp_path / "runs" / "x").mkdir(parents=True)
    local = ["models/qwen-3", "./foo", "../nowhere-at-all", "/abs/path", "~/no-such-model-folder", "runs/x/final"]
    results = _timed([*local, "someorg/some-model"], tmp_path, silent_hub)
    for r in results[:-1]:
        assert r["seconds"] < 0.5, r  # no request at all
        assert r["error"].startswith("ConfigError") and "does not exist" in r["error"], r
    assert "models/qwen-2" in results[0]["error"]  # the closest folder beside it
    hub = results[-1]
    assert hub["error"].startswith("ConfigError") and "someorg/some-model" in hub["error"], hub
    assert hub["seconds"] < 6, hub  # one request with a 2 s budget (10 s before: 13 s in all), slack for a busy CPU


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


def test_a_cached_hub_model_loads_without_waiting_for_a_silent_hub(tmp_path, silent_hub):
    import shutil

    from rlhfkit.tasks import kindly

    repo = tmp_path / "hf-home" / "hub" / "models--someorg--cached"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(kindly.tokenizer_path(), snapshot)
    shutil.copy(kindly.base_model_path() / "config.json", snapshot / "config.json")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    [r] = _timed(["someorg/cached"], tmp_path, silent_hub, call="load_tokenizer")
    assert r["error"] is None, r
    assert r["seconds"] < 6, r  # one 2 s question to the hub, then the cache (10 s per file before)
