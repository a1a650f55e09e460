"""`rlhfkit serve-policy` over HTTP: the official `openai` client and plain curl against a real
uvicorn server (in a thread here; a `--workers 2` subprocess for curl), a tiny random Llama and
the bundled task's base model."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient

from rl_helpers import save_tiny, tiny_policy, tiny_tokenizer
from rlhfkit.data.chat import apply_chat_template
from rlhfkit.data.collate import encode_prompt
from rlhfkit.errors import ConfigError
from rlhfkit.models import load_tokenizer
from rlhfkit.models.registry import Registry
from rlhfkit.rollout.generate import generate
from rlhfkit.serving.server import ServeConfig, cli, create_app, resolve_model

openai = pytest.importorskip("openai")
HI = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "the cat sat"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    tok = tiny_tokenizer()
    return save_tiny(tmp_path_factory.mktemp("serve") / "tiny", tiny_policy(tok), tok)


@pytest.fixture(scope="module")
def server(tiny_path):
    """(app, base url): tiny and the bundled base, an idle engine waiting 150 ms for company."""
    app = create_app(ServeConfig(models=[f"tiny={tiny_path}", "kindly"], max_tokens=16, batch_wait_ms=150, seed=0))
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not srv.started:
        assert time.time() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield app, f"http://127.0.0.1:{srv.config.port}"
    srv.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key="unused", max_retries=0)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list()] == ["tiny", "kindly"]
    assert client.models.retrieve("kindly").id == "kindly"
    health = httpx.get(server[1] + "/health").json()
    assert health["status"] == "ok" and set(health["models"]) == {"tiny", "kindly"}


def test_chat_applies_the_training_template_and_reports_the_models_logprobs(server, client, tiny_path):
    r = client.chat.completions.create(model="tiny", messages=HI, max_tokens=5, n=2, logprobs=True, top_logprobs=3,
                                       temperature=0.9, user="u-1")
    tok = load_tokenizer(tiny_path)
    prompt = encode_prompt(tok, apply_chat_template(tok, HI, add_generation_prompt=True))[0]
    assert r.object == "chat.completion" and r.usage.prompt_tokens == len(prompt)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.usage.completion_tokens == sum(len(c.logprobs.content) + (c.finish_reason == "stop") for c in r.choices)
    model = server[0].state.models["tiny"].engine.model
    with torch.no_grad():
        first = torch.log_softmax(model(torch.tensor([prompt])).logits[0, -1].double(), -1)
    for c in r.choices:
        assert c.message.role == "assistant" and c.finish_reason in ("stop", "length")
        head = c.logprobs.content[0]
        tops = [t.logprob for t in head.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert tops[0] == pytest.approx(first.max().item(), abs=1e-5)
        assert tops[2] == pytest.approx(first.topk(3).values[2].item(), abs=1e-5)
        assert (first - head.logprob).abs().min().item() < 1e-5  # the sampled token's, under the model


def test_stream_with_usage_gives_the_same_text_as_a_plain_request(client):
    kw = dict(model="tiny", messages=HI, max_tokens=12, seed=11, n=2)
    plain = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    texts = {0: "", 1: ""}
    for ch in chunks[:-1]:
        assert ch.object == "chat.completion.chunk" and ch.usage is None and len(ch.choices) == 1
        texts[ch.choices[0].index] += ch.choices[0].delta.content or ""
    assert [texts[i] for i in (0, 1)] == [c.message.content for c in plain.choices]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == plain.usage.model_dump()
    finishes = {ch.choices[0].index: ch.choices[0].finish_reason for ch in chunks[:-1] if ch.choices[0].finish_reason}
    assert finishes == {c.index: c.finish_reason for c in plain.choices}


def test_seeded_requests_reproduce(client):
    def ask(seed):
        return [c.message.content for c in client.chat.completions.create(
            model="tiny", messages=HI, max_tokens=10, n=2, seed=seed, temperature=1.0).choices]

    assert ask(3) == ask(3) != ask(4)


def test_completions_several_prompts_stop_and_echo(client):
    r = client.completions.create(model="tiny", prompt=["the cat", "a kind word"], n=2, max_tokens=6, logprobs=2,
                                  temperature=0.0)
    assert r.object == "text_completion" and [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text  # greedy: both choices of a prompt agree
    assert all(len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) for c in r.choices)
    text = r.choices[2].text
    assert len(text) > 3  # the precondition of the stop-string check
    cut = client.completions.create(model="tiny", prompt="a kind word", max_tokens=6, temperature=0.0,
                                    stop=[text[2:4]])
    assert cut.choices[0].text == text[:text.index(text[2:4])] and cut.choices[0].finish_reason == "stop"
    echo = client.completions.create(model="tiny", prompt="the cat", max_tokens=6, temperature=0.0, echo=True)
    assert echo.choices[0].text == "the cat" + r.choices[0].text


def test_concurrent_requests_are_generated_in_shared_batches(server, client):
    engine = server[0].state.models["tiny"].engine
    before = dict(engine.stats)
    barrier, results = threading.Barrier(6), []

    def one(i):
        barrier.wait()
        results.append(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"hi {i}"}],
                                                      max_tokens=12, temperature=1.0, seed=i))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 6
    tokens = sum(r.usage.completion_tokens for r in results)
    assert engine.stats["prefills"] - before["prefills"] == 1  # all six prefilled together
    assert engine.stats["max_jobs_in_step"] == 6
    # one decoding step advances every request: steps <= the longest response, not the sum
    assert engine.stats["decode_steps"] - before["decode_steps"] <= 12 < tokens


def test_a_client_that_disconnects_cancels_its_request(server, tiny_path):
    app, url = server
    engine = app.state.models["tiny"].engine
    tok = load_tokenizer(tiny_path)
    text = apply_chat_template(tok, HI, add_generation_prompt=True)
    ref = generate(engine.model, tok, [text], 80, temperature=0.0)
    assert int(ref.response_mask.sum()) == 80  # the precondition: greedy decoding uses the whole budget
    before, seen = engine.stats["tokens"], False
    body = {"model": "tiny", "messages": HI, "max_tokens": 80, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if '"content": "' in line and '"content": ""' not in line:
                seen = True
                break  # the first piece of text: hang up
    assert seen
    deadline = time.time() + 30
    while engine.running() and time.time() < deadline:
        time.sleep(0.05)
    assert engine.running() == 0 and httpx.get(url + "/health").json()["models"]["tiny"]["running"] == 0
    assert 0 < engine.stats["tokens"] - before < 80


def test_errors_have_openais_shape_and_status(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=HI)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    cases = [(dict(temperature=3), "temperature"), (dict(top_p=0), "top_p"), (dict(n=0), "n"),
             (dict(top_logprobs=2), "top_logprobs"), (dict(max_tokens=10_000), "max_tokens"),
             (dict(stream_options={"include_usage": True}), "stream_options"),
             (dict(extra_body={"frobnicate": 1}), "frobnicate"), (dict(stop=["a"] * 5), "stop")]
    for kw, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=HI, **kw)
        body = e.value.body
        assert body["param"] == param and body["type"] == "invalid_request_error" and param in body["message"], (kw, body)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "x"}])
    assert e.value.body["param"] == "messages[0].role"
    raw = httpx.post(server[1] + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert raw.status_code == 400 and raw.json()["error"]["code"] == "json_invalid"
    missing = httpx.get(server[1] + "/v1/nothing")
    assert missing.status_code == 404 and set(missing.json()["error"]) == {"message", "type", "param", "code"}


def test_the_bundled_base_model_is_served(client):
    r = client.chat.completions.create(model="kindly", messages=[{"role": "user", "content": "How was your day?"}],
                                       max_tokens=12, temperature=0.0)
    tok = load_tokenizer("kindly")
    text = apply_chat_template(tok, [{"role": "user", "content": "How was your day?"}], add_generation_prompt=True)
    assert text.endswith("assistant:") and r.usage.prompt_tokens == len(encode_prompt(tok, text)[0])
    assert r.choices[0].message.content.strip()


def test_registry_names_and_aliases_resolve(tmp_path, tiny_path):
    reg = Registry(tmp_path / "reg")
    reg.register(tiny_path, model_id="tiny-v1")
    reg.register(tiny_path, model_id="tiny-v2", metrics={"gold": 1.0})
    reg.promote("tiny-v1")
    root = str(tmp_path / "reg")
    assert resolve_model("tiny-v2", root) == ("tiny-v2", tiny_path, "tiny-v2")
    assert resolve_model("production", root) == ("production", tiny_path, "tiny-v1")
    assert resolve_model("prod=production", root) == ("prod", tiny_path, "tiny-v1")
    assert resolve_model(f"local={tiny_path}", root) == ("local", tiny_path, None)
    with pytest.raises(ConfigError, match="no model is promoted"):
        resolve_model("production", str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_model("./no/such/folder", root)


@pytest.mark.parametrize("storage", ["memory://", "redis://127.0.0.1:6379/15"])
def test_rate_limits_per_user_and_shared_by_workers_through_redis(tiny_path, storage):
    if storage.startswith("redis"):
        redis = pytest.importorskip("redis")
        try:
            redis.Redis.from_url(storage, socket_timeout=2).ping()
        except redis.RedisError as e:
            pytest.skip(f"no Redis at {storage}: {e}")
    cfg = ServeConfig(models=[f"tiny={tiny_path}"], rate_limit="3/minute", rate_limit_storage=storage, max_tokens=2)
    user = f"user-{uuid.uuid4().hex}"
    body = {"model": "tiny", "messages": HI, "user": user}
    # two apps are two workers: with Redis they count one user's requests together
    with TestClient(create_app(cfg)) as a, TestClient(create_app(cfg)) as b:
        second = b if storage.startswith("redis") else a
        assert [a.post("/v1/chat/completions", json=body).status_code,
                second.post("/v1/chat/completions", json=body).status_code,
                a.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "user": user}).status_code] == [200] * 3
        over = second.post("/v1/chat/completions", json=body)
        assert over.status_code == 429 and over.json()["error"]["code"] == "rate_limit_exceeded"
        assert 1 <= int(over.headers["retry-after"]) <= 60 and user in over.json()["error"]["message"]
        assert second.post("/v1/chat/completions", json={**body, "user": "someone-else-" + user}).status_code == 200
    assert cli(["--model", "kindly", "--rate_limit", "lots"]) == 2


def test_cli_help_and_bad_arguments(capsys):
    from rlhfkit.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve-policy", "--help"])
    assert e.value.code == 0 and "--engine {hf,static,vllm}" in capsys.readouterr().out
    assert cli(["--model", "./missing-model-folder"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli(["--model", "kindly", "--workers", "0"]) == 2
    assert cli(["--model", "kindly", "--engine", "vllm", "--workers", "2"]) == 2
    assert "one worker" in capsys.readouterr().err


@pytest.fixture(scope="module")
def workers(tiny_path):
    """`rlhfkit serve-policy --workers 2` as a subprocess (the command line, uvicorn's worker processes)."""
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "rlhfkit.serving.server", "--model", f"tiny={tiny_path}",
                             "--port", str(port), "--workers", "2", "--max_tokens", "8", "--log_level", "warning"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300  # three processes import torch; on a busy 2-core machine that takes a minute
    while True:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "the server did not start"
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    yield proc, url
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_several_worker_processes_serve(workers):
    proc, url = workers
    spawned = [c for c in _children(proc.pid) if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
    assert len(spawned) == 2
    deadline = time.time() + 60  # every worker loads the model; /health answers once its own has
    while True:
        seen = {httpx.get(url + "/health", headers={"connection": "close"}).json()["pid"] for _ in range(8)}
        if seen <= set(spawned) and seen:
            break
        assert time.time() < deadline
    c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    assert c.chat.completions.create(model="tiny", messages=HI).usage.completion_tokens <= 8


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_request_and_stream(workers):
    _, url = workers
    body = json.dumps({"model": "tiny", "messages": HI, "max_tokens": 5})
    out = subprocess.run(["curl", "-sS", "-H", "Content-Type: application/json", "-d", body,
                          url + "/v1/chat/completions"], capture_output=True, text=True, timeout=60, check=True)
    reply = json.loads(out.stdout)
    assert reply["object"] == "chat.completion" and reply["choices"][0]["message"]["role"] == "assistant"
    stream = json.dumps({"model": "tiny", "messages": HI, "max_tokens": 5, "stream": True,
                         "stream_options": {"include_usage": True}})
    out = subprocess.run(["curl", "-sS", "-N", "-H", "Content-Type: application/json", "-d", stream,
                          url + "/v1/chat/completions"], capture_output=True, text=True, timeout=60, check=True)
    events = [line[len("data: "):] for line in out.stdout.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] <= 5
    err = subprocess.run(["curl", "-sS", "-w", "%{http_code}", "-H", "Content-Type: application/json", "-d",
                          json.dumps({"model": "tiny", "messages": HI, "temperature": -1}), url + "/v1/chat/completions"],
                         capture_output=True, text=True, timeout=60, check=True)
    assert err.stdout.endswith("400") and json.loads(err.stdout[:-3])["error"]["param"] == "temperature"
