"""`rlhfkit serve-policy`: an OpenAI-compatible server for policies (docs/serving.md).

    rlhfkit serve-policy --model kindly --port 8000
    rlhfkit serve-policy --model production --model sft=runs/sft/final --engine hf --workers 2
    rlhfkit serve-policy --experiment ab.yaml --db postgresql://host/feedback --monitor gold   (A/B, docs/serving.md)

`--model` takes a model folder, a model of the registry (its id, an alias such as `candidate`
(`rlhfkit models alias candidate ID`), or `production` for the
promoted one), the bundled task's base (`kindly`) or a hub name; `NAME=MODEL` serves it under
NAME. Endpoints: POST /v1/chat/completions and /v1/completions (streaming as server-sent
events), GET /v1/models, /v1/models/{id} and /health. Errors have OpenAI's shape
{"error": {"message", "type", "param", "code"}}: 400 for an invalid request (param names the
field), 404 for an unknown model or path, 500 when generation fails.

Each worker process loads every model once and runs one batching loop per model
(serving/engine.py); concurrent requests are generated together.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import dataclasses
import hashlib
import json
import os
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from transformers import AutoConfig

from rlhfkit.data.chat import apply_chat_template
from rlhfkit.data.collate import encode_prompt
from rlhfkit.errors import ConfigError, RlhfkitError
from rlhfkit.models.io import load_policy, load_tokenizer, max_positions
from rlhfkit.models.paths import resolve_path
from rlhfkit.models.registry import DEFAULT_ROOT, Registry, RegistryError
from rlhfkit.rollout.vllm import import_vllm
from rlhfkit.serving import canary, live
from rlhfkit.serving import openai_schema as api
from rlhfkit.serving.engine import Engine, Job, Sampling
from rlhfkit.serving.monitor import RUN_ENV, new_serve_run
from rlhfkit.serving.openai_schema import ServingError
from rlhfkit.serving.rate_limit import RateLimit
from rlhfkit.serving.vllm_engine import VLLMServingEngine

ENGINES = ("hf", "static", "vllm")
CONFIG_ENV = "RLHFKIT_SERVE_CONFIG"  # the config a worker process reads (uvicorn starts workers by import string)
PROMOTED_ALIASES = ("production", "promoted", "current")


@dataclass
class ServeConfig:
    models: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 8000
    engine: str = "hf"
    workers: int = 1
    registry: str = DEFAULT_ROOT
    dtype: str = "auto"  # float32 on CPU, bfloat16 on CUDA
    device: str = "auto"
    max_batch: int = 64  # rows (request choices) decoded together per model
    batch_wait_ms: float = 0.0  # how long an idle engine waits for more requests before it starts
    max_tokens: int = 256  # completion budget of a request that gives none (capped by the context)
    seed: int | None = None  # the engine's draws for requests without a seed
    log_level: str = "info"
    rate_limit: str | None = None  # per user, e.g. "60/minute;1000/hour" (serving/rate_limit.py)
    rate_limit_storage: str = "memory://"  # redis://HOST:PORT/DB: counters shared by every worker
    experiment: str | None = None  # an experiment file: its arms are served, users assigned, traffic logged
    db: str | None = None  # the feedback database of the traffic log (./feedback.db when only --experiment)
    monitor: str | None = None  # a judge spec scoring served responses (serving/monitor.py)

    def check(self) -> None:
        if not self.models and not self.experiment:
            raise ConfigError("give at least one --model (a folder, a registry id or alias, or 'kindly')")
        if self.engine not in ENGINES:
            raise ConfigError(f"--engine {self.engine!r}: choose from {', '.join(ENGINES)}")
        for name in ("workers", "max_batch", "max_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.engine == "vllm" and self.workers > 1:  # each worker's vLLM would reserve most of the GPU
            raise ConfigError("--engine vllm batches on the GPU itself: run one worker (--workers 1)")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"--port must be in 0..65535, got {self.port}")


@dataclass
class ServedModel:
    name: str
    path: str
    tokenizer: Any  # the server's copy (encoding, token strings); the engine decodes with its own
    engine: Any
    context: int | None
    fingerprint: str
    registry_id: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))


def resolve_model(spec: str, registry_root: str = DEFAULT_ROOT) -> tuple[str, str, str | None]:
    """(served name, model folder or hub name, registry id) of a `--model` value (module docstring)."""
    name, sep, target = spec.partition("=")
    if not sep:
        name, target = spec, spec
    if not name or not target:
        raise ConfigError(f"--model {spec!r}: give MODEL or NAME=MODEL")
    if target in ("kindly", "kindly:base") or Path(target).expanduser().exists():
        return name, resolve_path(target), None
    reg = Registry(registry_root)
    entry = None
    if target in PROMOTED_ALIASES:
        entry = reg.promoted()
        if entry is None:
            raise ConfigError(f"--model {spec!r}: no model is promoted in registry {registry_root}")
    else:
        try:
            entry = reg.resolve(target)  # an alias such as candidate, or a model id
        except RegistryError:
            entry = None  # not a registry id: a hub name, or a folder that does not exist (said below)
    if entry is not None:
        if entry.get("kind", "policy") != "policy":
            raise ConfigError(f"--model {spec!r}: registry model {entry['id']!r} is a {entry['kind']}, not a policy")
        return name, resolve_path(entry["path"]), entry["id"]
    return name, resolve_path(target), None


def _folder_fingerprint(path: str) -> str:
    """A cheap stamp of a model's weights (file names, sizes, times): `system_fingerprint` in responses."""
    h = hashlib.sha256(path.encode())
    folder = Path(path)
    if folder.is_dir():
        for p in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return "fp_" + h.hexdigest()[:12]


def load_model(spec: str, cfg: ServeConfig) -> ServedModel:
    """Resolve, load and start one model's engine."""
    name, path, registry_id = resolve_model(spec, cfg.registry)
    tokenizer = load_tokenizer(path, padding_side="left")
    if cfg.engine == "vllm":
        engine = VLLMServingEngine(path, max_rows=cfg.max_batch, batch_wait_s=cfg.batch_wait_ms / 1000,
                                   seed=cfg.seed or 0, name=name)
        context = max_positions(type("M", (), {"config": AutoConfig.from_pretrained(path)})())
    else:
        device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
        model = load_policy(path, dtype=dtype, trainable=False).to(device)
        engine = Engine(model, copy.deepcopy(tokenizer), engine=cfg.engine, max_rows=cfg.max_batch,
                        batch_wait_s=cfg.batch_wait_ms / 1000, seed=cfg.seed, name=name)
        context = max_positions(model)
    return ServedModel(name, path, tokenizer, engine, context, _folder_fingerprint(path), registry_id)


# ---------------------------------------------------------------------------------------------
# the app


def create_app(cfg: ServeConfig) -> FastAPI:
    """The FastAPI app serving `cfg.models` (loaded when the app starts, closed when it stops)."""
    cfg.check()
    cfg.models = live.served_models(cfg.models, cfg.experiment)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if cfg.device in ("auto", "cpu") and not torch.cuda.is_available() and cfg.workers > 1:
            # workers share the CPU cores: without this each would start one thread per core
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // cfg.workers))
        for spec in cfg.models:
            served = await asyncio.to_thread(load_model, spec, cfg)
            if served.name in app.state.models:
                raise ConfigError(f"two --model values are served as {served.name!r}; name them with NAME=MODEL")
            app.state.models[served.name] = served
        # a canary release rewrites the experiment file; arms it adds are loaded, then routed to
        unfollow = canary.follow_experiment(app, cfg.experiment, lambda a: load_model(f"{a.name}={a.model}", cfg)) \
            if cfg.experiment else None
        try:
            yield
        finally:
            if unfollow is not None:
                unfollow()
            for served in app.state.models.values():
                served.engine.close()

    app = FastAPI(title="rlhfkit policy server", lifespan=lifespan)
    app.state.models = {}
    app.state.config = cfg
    api.add_error_handlers(app)
    _add_routes(app, cfg)
    if cfg.experiment or cfg.db or cfg.monitor:  # arms, the traffic log, the feedback and safety APIs
        live.install(app, cfg.db or "feedback.db", cfg.experiment, monitor=cfg.monitor)
    return app


def app_from_env() -> FastAPI:
    """The app of a worker process: its config comes from the environment (see `serve`)."""
    raw = os.environ.get(CONFIG_ENV)
    if not raw:
        raise ConfigError(f"{CONFIG_ENV} is not set; start the server with `rlhfkit serve-policy`")
    return create_app(ServeConfig(**json.loads(raw)))


def _served(app: FastAPI, name: str) -> ServedModel:
    models = app.state.models
    if name in models:
        return models[name]
    for served in models.values():  # a registry model may also be asked for by its id
        if served.registry_id == name:
            return served
    raise ServingError(404, f"The model `{name}` does not exist or is not served here (served: "
                            f"{', '.join(models) or 'none'})", "model", "model_not_found")


def _sampling(cfg: ServeConfig, served: ServedModel, req, lengths: list[int], prompt_field: str) -> Sampling:
    """The request's generation settings, checked against the model's context and the batch size."""
    longest, budget, ctx = max(lengths), req.token_budget(), served.context
    if ctx is not None and longest >= ctx:
        raise ServingError(400, f"{prompt_field}: the prompt is {longest} tokens; this model's context is {ctx} "
                                "tokens, which leaves no room for a completion", prompt_field, "context_length_exceeded")
    if budget is None:
        budget = cfg.max_tokens if ctx is None else min(cfg.max_tokens, ctx - longest)
    elif ctx is not None and longest + budget > ctx:
        field_name = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
        raise ServingError(400, f"{field_name}: this model's maximum context length is {ctx} tokens. However, you requested "
                                f"{longest + budget} tokens ({longest} in the {prompt_field}, {budget} in the "
                                f"completion). Please reduce the length of the {prompt_field} or completion.",
                           field_name, "context_length_exceeded")
    if req.n > cfg.max_batch:
        raise ServingError(400, f"n: at most {cfg.max_batch} choices per request on this server", "n")
    return Sampling(max_tokens=budget, temperature=1.0 if req.temperature is None else req.temperature,
                    top_p=1.0 if req.top_p is None else req.top_p, n=req.n, stop=req.stops(), seed=req.seed,
                    logprobs=req.logprobs_k())


async def _events(served: ServedModel, prompts: list[list[int]], sampling: Sampling) -> AsyncIterator[dict]:
    """Submit one job per prompt (choice indices prompt * n + k) and yield their events until every choice ends."""
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()

    def emitter(offset: int):
        def emit(event: dict) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, {**event, "index": event.get("index", 0) + offset})
        return emit

    jobs = [Job(ids, sampling, emitter(p * sampling.n)) for p, ids in enumerate(prompts)]
    try:
        for job in jobs:
            served.engine.submit(job)
        remaining = len(jobs) * sampling.n
        while remaining:
            event = await queue.get()
            if event["type"] == "error":
                raise ServingError(500, event["message"], None, "generation_failed")
            remaining -= event["type"] == "finish"
            yield event
    finally:
        for job in jobs:  # the client left, or every choice ended (then a no-op)
            job.cancel()


async def _collect(served: ServedModel, prompts: list[list[int]], sampling: Sampling):
    texts: dict[int, str] = defaultdict(str)
    entries: dict[int, list] = defaultdict(list)
    reasons: dict[int, str] = {}
    tokens = 0
    async for ev in _events(served, prompts, sampling):
        if ev["type"] == "delta":
            texts[ev["index"]] += ev["text"]
            entries[ev["index"]] += ev["logprobs"]
        else:
            reasons[ev["index"]] = ev["reason"]
            tokens += ev["completion_tokens"]
    return texts, entries, reasons, tokens


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def _stream(served: ServedModel, prompts: list[list[int]], sampling: Sampling, base: dict,
                  include_usage: bool, chat: bool) -> AsyncIterator[str]:
    """Server-sent events: one chunk per text delta and per finished choice, then (with
    `stream_options.include_usage`) a chunk with no choices and the usage, then [DONE]."""
    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        return api.sse({**base, "choices": choices, **({"usage": usage} if include_usage else {})})

    def choice(index: int, text: str | None, entries: list | None, reason: str | None) -> dict:
        if chat:
            delta = {} if text is None else {"content": text}
            return {"index": index, "delta": delta, "finish_reason": reason,
                    "logprobs": api.chat_logprobs(served.tokenizer, entries) if entries else None}
        return {"index": index, "text": text or "", "finish_reason": reason,
                "logprobs": api.completion_logprobs(served.tokenizer, entries) if entries else None}

    if chat:  # the first chunk of each choice names the role, as OpenAI's stream does
        for i in range(len(prompts) * sampling.n):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
    tokens = 0
    try:
        async for ev in _events(served, prompts, sampling):
            if ev["type"] == "delta":
                yield chunk([choice(ev["index"], ev["text"], ev["logprobs"], None)])
            else:
                tokens += ev["completion_tokens"]
                yield chunk([choice(ev["index"], None, None, ev["reason"])])
    except ServingError as e:
        yield api.sse(e.body())
    else:
        if include_usage:
            yield chunk([], api.usage(sum(map(len, prompts)), tokens))
    yield api.sse("[DONE]")


def _chat_prompt(served: ServedModel, req: api.ChatCompletionRequest) -> list[int]:
    """The conversation rendered with the model's chat template and encoded as SFT encodes prompts."""
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
    text = apply_chat_template(served.tokenizer, messages, add_generation_prompt=True)
    return encode_prompt(served.tokenizer, text)[0]


def _completion_prompts(served: ServedModel, req: api.CompletionRequest) -> tuple[list[list[int]], list[str]]:
    ids, texts = [], []
    vocab = len(served.tokenizer)
    for i, p in enumerate(req.prompts()):
        if isinstance(p, str):
            ids.append(encode_prompt(served.tokenizer, p)[0])
            texts.append(p)
        else:
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise ServingError(400, f"prompt[{i}]: token id {bad[0]} is outside the vocabulary (0..{vocab - 1})",
                                   "prompt")
            ids.append(list(p))
            texts.append(served.tokenizer.decode(p, skip_special_tokens=True))
    return ids, texts


def _add_routes(app: FastAPI, cfg: ServeConfig) -> None:
    @app.get("/health")
    async def health():
        return {"status": "ok", "pid": os.getpid(),
                "models": {name: {"waiting": len(m.engine.waiting), "running": m.engine.running(), **m.engine.stats} for name, m in app.state.models.items()}}

    def model_card(m: ServedModel) -> dict:
        return {"id": m.name, "object": "model", "created": m.created, "owned_by": "rlhfkit", "root": m.path,
                "registry_id": m.registry_id, "max_model_len": m.context}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(m) for m in app.state.models.values()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        return model_card(_served(app, model_id))

    limit = RateLimit(cfg.rate_limit, cfg.rate_limit_storage) if cfg.rate_limit else None

    def user_of(req, request: Request) -> str:
        return req.user or (request.client.host if request.client else "unknown")

    @app.post("/v1/chat/completions")
    async def chat(req: api.ChatCompletionRequest, request: Request):
        if limit is not None:
            limit.check(user_of(req, request))
        served = _served(app, req.model)
        ids = _chat_prompt(served, req)
        sampling = _sampling(cfg, served, req, [len(ids)], "messages")
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": req.model,
                "system_fingerprint": served.fingerprint}
        if req.stream:
            include = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_stream(served, [ids], sampling, {**base, "object": "chat.completion.chunk"},
                                             include, chat=True), media_type="text/event-stream", headers=SSE_HEADERS)
        texts, entries, reasons, tokens = await _collect(served, [ids], sampling)
        choices = [{"index": i, "message": {"role": "assistant", "content": texts[i], "refusal": None},
                    "logprobs": api.chat_logprobs(served.tokenizer, entries[i]) if sampling.logprobs is not None else None,
                    "finish_reason": reasons[i]} for i in range(sampling.n)]
        return {**base, "object": "chat.completion", "choices": choices, "usage": api.usage(len(ids), tokens)}

    @app.post("/v1/completions")
    async def completions(req: api.CompletionRequest, request: Request):
        if limit is not None:
            limit.check(user_of(req, request))
        served = _served(app, req.model)
        ids, texts_in = _completion_prompts(served, req)
        sampling = _sampling(cfg, served, req, [len(x) for x in ids], "prompt")
        base = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": req.model,
                "system_fingerprint": served.fingerprint}
        if req.stream:
            include = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_stream(served, ids, sampling, {**base, "object": "text_completion"}, include,
                                             chat=False), media_type="text/event-stream", headers=SSE_HEADERS)
        texts, entries, reasons, tokens = await _collect(served, ids, sampling)
        choices = [{"index": i, "text": (texts_in[i // sampling.n] if req.echo else "") + texts[i],
                    "logprobs": api.completion_logprobs(served.tokenizer, entries[i]) if sampling.logprobs is not None else None,
                    "finish_reason": reasons[i]} for i in range(len(ids) * sampling.n)]
        return {**base, "object": "text_completion", "choices": choices,
                "usage": api.usage(sum(map(len, ids)), tokens)}


# ---------------------------------------------------------------------------------------------
# command line


def parse_args(argv: Sequence[str] | None = None) -> ServeConfig:
    defaults = ServeConfig()
    p = argparse.ArgumentParser(prog="rlhfkit serve-policy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=[], dest="models", metavar="[NAME=]MODEL",
                   help="model folder, registry id, registry alias (production), 'kindly' or hub name; repeatable")
    p.add_argument("--experiment", default=None, help="experiment file (YAML): serve its arms, assign users, log traffic")
    p.add_argument("--db", default=None, help="feedback database for the traffic log (default ./feedback.db)")
    p.add_argument("--monitor", default=None, help="judge spec (gold, rm:PATH, judge:SPEC) scoring served responses")
    p.add_argument("--host", default=defaults.host, help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=int, default=defaults.port, help="port (default %(default)s)")
    p.add_argument("--engine", choices=ENGINES, default=defaults.engine,
                   help="hf: continuous batching over a KV cache; static: static KV cache (compiled on CUDA), "
                        "dynamic batching; vllm: vLLM on a GPU (default %(default)s)")
    p.add_argument("--workers", type=int, default=defaults.workers,
                   help="worker processes, each with its own copy of every model (default %(default)s)")
    p.add_argument("--registry", default=defaults.registry, help="model registry folder (default %(default)s)")
    p.add_argument("--dtype", default=defaults.dtype, help="auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16, float16")
    p.add_argument("--device", default=defaults.device, help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--max_batch", "--max-batch", type=int, default=defaults.max_batch,
                   help="rows decoded together per model and worker (default %(default)s)")
    p.add_argument("--batch_wait_ms", "--batch-wait-ms", type=float, default=defaults.batch_wait_ms,
                   help="how long an idle model waits for more requests before starting a batch (default %(default)s)")
    p.add_argument("--max_tokens", "--max-tokens", type=int, default=defaults.max_tokens,
                   help="completion budget of requests that set none (default %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="seed of the draws of requests without a seed")
    p.add_argument("--rate_limit", "--rate-limit", default=None,
                   help="requests per user (the `user` field, else the client address), e.g. 60/minute;1000/hour")
    p.add_argument("--rate_limit_storage", "--rate-limit-storage", default=defaults.rate_limit_storage,
                   help="where limits are counted: memory:// (per worker) or redis://HOST:PORT/DB (shared)")
    p.add_argument("--log_level", "--log-level", default=defaults.log_level, help="uvicorn's log level")
    return ServeConfig(**vars(p.parse_args(argv)))


def cli(argv: Sequence[str] | None = None) -> int:
    import uvicorn

    try:
        cfg = parse_args(argv)
        cfg.check()
        for spec in cfg.models:  # fail here, in one line, rather than in every worker
            resolve_model(spec, cfg.registry)
        if cfg.rate_limit:
            RateLimit(cfg.rate_limit, cfg.rate_limit_storage)
        if cfg.engine == "vllm":
            import_vllm()
    except RlhfkitError as e:
        print(f"rlhfkit serve-policy: {e}", file=sys.stderr)
        return 2
    os.environ[CONFIG_ENV] = json.dumps(dataclasses.asdict(cfg))
    os.environ[RUN_ENV] = new_serve_run()  # one run for all workers: they share safety alarms (serving/monitor.py)
    uvicorn.run("rlhfkit.serving.server:app_from_env", factory=True, host=cfg.host, port=cfg.port,
                workers=cfg.workers, log_level=cfg.log_level, timeout_graceful_shutdown=5,
                # a worker importing torch and loading its models answers the supervisor's ping late
                # on a busy machine; uvicorn's 5 s would kill and restart it again and again
                timeout_worker_healthcheck=120)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
