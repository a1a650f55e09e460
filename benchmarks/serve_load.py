"""Load on the policy server (issue 24, item 1): 32 concurrent clients on the bundled SFT model.

`rlhfkit serve-policy` runs as a subprocess (one worker, `--engine hf`) on the bundled task's
SFT policy (benchmarks/common.py `sft_policy`). 32 clients (asyncio + h11, one connection
each, like 32 users' applications) send the task's held-out prompts to /v1/completions with
`stream: true` and `stream_options.include_usage`, temperature 1, at most MAX_TOKENS tokens,
each client its next request on its keep-alive connection as soon as the last one is done,
until REQUESTS have been answered.
Measured per request: time to the first streamed text (TTFT) and to the end (latency); overall:
completion tokens per second of wall time.

The baseline, in the same run on the same model and prompts: rlhfkit's rollout `generate`
called with one prompt at a time (what serving without batching gives), in this process while
the server sits idle. The two alternate for ROUNDS rounds; `throughput_ratio` = server tokens/s
over all rounds / baseline tokens/s over all rounds (target >= 3); `ttft_p95_ms` and
`latency_p95_ms` are the worse round's.
Both sides run torch with THREADS intra-op thread(s): on a shared 2-core machine OpenMP's
barriers collapse whenever another process holds a core (one request took 0.15 s with one thread
and 3 s with two, measured side by side under load 11), which would measure the neighbours rather
than the server. The server's figure includes HTTP, JSON, streaming and the load generator
running on the same CPUs.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time

import h11
import httpx
import numpy as np
import torch

from benchmarks.common import load_average, sft_policy, start_policy_server

CLIENTS = 32
ROUNDS = 2
REQUESTS = 160  # per round
BASELINE_REQUESTS = 32  # per round
MAX_TOKENS = 48
THREADS = 1


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def baseline(path: str, prompts: list[str]) -> dict:
    """One request at a time through the rollout engine: tokens per second."""
    from rlhfkit.models import load_policy, load_tokenizer
    from rlhfkit.rollout.generate import generate

    model, tok = load_policy(str(path), trainable=False).eval(), load_tokenizer(str(path))
    torch.set_num_threads(THREADS)
    generate(model, tok, prompts[:2], MAX_TOKENS, temperature=1.0, seed=0)  # warm-up
    tokens, t0 = 0, time.perf_counter()
    for i, p in enumerate(prompts):
        out = generate(model, tok, [p], MAX_TOKENS, temperature=1.0, seed=i)
        tokens += int(out.response_mask.sum())
    seconds = time.perf_counter() - t0
    return {"requests": len(prompts), "tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1)}


class _Connection:
    """One client's keep-alive HTTP/1.1 connection: asyncio streams and h11 (the parser uvicorn
    uses). httpx was the bottleneck here: with 32 streaming clients in one process its p95 time
    to first token was 4.4 s while the server sent every first token within 0.35 s."""

    def __init__(self, port: int):
        self.port, self.reader, self.writer, self.conn = port, None, None, None

    async def post_lines(self, path: str, body: dict):
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
            self.conn = h11.Connection(h11.CLIENT)
        data = json.dumps(body).encode()
        head = h11.Request(method="POST", target=path, headers=[
            ("Host", "127.0.0.1"), ("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
        self.writer.write(self.conn.send(head) + self.conn.send(h11.Data(data=data)) + self.conn.send(h11.EndOfMessage()))
        await self.writer.drain()
        buf, status = b"", None
        while True:
            ev = self.conn.next_event()
            if ev is h11.NEED_DATA:
                self.conn.receive_data(await self.reader.read(65536))
            elif isinstance(ev, h11.Response):
                status = ev.status_code
            elif isinstance(ev, h11.Data):
                buf += ev.data
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if status != 200:
                        raise RuntimeError(f"HTTP {status}: {line.decode()}")
                    yield line.decode()
            elif isinstance(ev, h11.EndOfMessage):
                break
        self.conn.start_next_cycle()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def _one(client: _Connection, prompt: str, seed: int) -> dict:
    body = {"model": "sft", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 1.0, "seed": seed,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, usage = None, None
    async for line in client.post_lines("/v1/completions", body):
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if "error" in chunk:
            raise RuntimeError(chunk["error"]["message"])
        if ttft is None and chunk["choices"] and chunk["choices"][0]["text"]:
            ttft = time.perf_counter() - t0
        usage = chunk.get("usage") or usage
    end = time.perf_counter() - t0
    return {"ttft": ttft if ttft is not None else end, "latency": end, "tokens": usage["completion_tokens"]}


async def load(port: int, prompts: list[str], clients: int, requests: int) -> dict:
    queue = list(range(requests))
    results: list[dict] = []

    async def user() -> None:
        client = _Connection(port)
        try:
            while queue:
                i = queue.pop()
                results.append(await _one(client, prompts[i % len(prompts)], seed=i))
        finally:
            client.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(user() for _ in range(clients)))
    seconds = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    ms = lambda xs, q: round(float(np.percentile(xs, q)) * 1000, 1)  # noqa: E731
    ttft, lat = [r["ttft"] for r in results], [r["latency"] for r in results]
    return {"requests": len(results), "tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1), "ttft_p50_ms": ms(ttft, 50), "ttft_p95_ms": ms(ttft, 95),
            "latency_p50_ms": ms(lat, 50), "latency_p95_ms": ms(lat, 95)}


def _start_server(path: str, port: int) -> subprocess.Popen:
    return start_policy_server(["--model", f"sft={path}", "--max_batch", "64"], port, threads=THREADS)


def run(quick: bool = False) -> dict:
    from rlhfkit.tasks import kindly

    path = str(sft_policy())
    prompts = kindly.prompts("eval")
    clients, requests, base_n = (8, 32, 8) if quick else (CLIENTS, REQUESTS, BASELINE_REQUESTS)
    load_before = load_average()
    port = _free_port()
    server = _start_server(path, port)
    rounds = []
    try:
        asyncio.run(load(port, prompts, clients, clients))  # warm-up: every client's first request
        for r in range(ROUNDS):  # alternated, so both sides see the machine's load at about the same times
            base = baseline(path, prompts[r * base_n:(r + 1) * base_n])  # the server idles meanwhile
            ours = asyncio.run(load(port, prompts, clients, requests))
            rounds.append({"one_at_a_time": base, "server": ours,
                           "ratio": round(ours["tokens_per_s"] / base["tokens_per_s"], 2)})
        engine = httpx.get(f"http://127.0.0.1:{port}/health").json()["models"]["sft"]
    finally:
        server.terminate()
        server.wait(30)
    base_tps = sum(r["one_at_a_time"]["tokens"] for r in rounds) / sum(r["one_at_a_time"]["seconds"] for r in rounds)
    ours_tps = sum(r["server"]["tokens"] for r in rounds) / sum(r["server"]["seconds"] for r in rounds)
    ms = lambda key: max(r["server"][key] for r in rounds)  # noqa: E731  the worse round
    return {
        "throughput_ratio": round(ours_tps / base_tps, 2), "tokens_per_s": round(ours_tps, 1),
        "one_at_a_time_tokens_per_s": round(base_tps, 1), "ttft_p95_ms": ms("ttft_p95_ms"),
        "latency_p95_ms": ms("latency_p95_ms"), "rounds": rounds, "engine_stats": engine, "clients": clients,
        "max_tokens": MAX_TOKENS, "temperature": 1.0, "engine": "hf", "workers": 1,
        "model": os.path.relpath(path), "torch_threads": THREADS,
        "load_average": {"before": load_before, "after": load_average()},
    }
