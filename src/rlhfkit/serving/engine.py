"""Batched generation for the policy server: one background loop per served model.

Requests (:class:`Job`) wait in a queue; a thread takes whatever has arrived and generates it
together with the rows already decoding (continuous batching, as in Orca, Yu et al. OSDI 2022):

- the `hf` engine keeps one DynamicCache for all rows. New requests are prefilled on their own,
  their cache is left-padded (or the running one is) to a common length and concatenated along
  the batch; finished rows are dropped from the cache at once and leading columns no row needs
  are trimmed. So a short request never waits for a long one, and a new one joins at the next
  step. Models whose cache layers are not plain (sliding-window, recurrent) join only an empty
  batch.
- the `static` engine decodes into the rollout engine's preallocated StaticCache with its
  (on CUDA, compiled) decoding step (rollout/static.py). Its shapes are fixed, so requests join
  only an empty batch and a batch runs until its last row ends (dynamic batching).

Every row keeps its own request's settings inside a shared batch: temperature, top-p, max
tokens, stop strings, logprobs, and a seed (its own torch.Generator). Sampling is the rollout
engines' inverse-CDF draw (rollout/generate.py `sample_next_token`: one uniform per row, nucleus
filter `top_p_filter`), done with per-row temperatures and uniforms; for one row it picks the
token `sample_next_token` picks from the same generator state (tests/test_serving_engine.py).

Results go back as events through the job's `emit` callback, called on the engine thread:
``{"type": "delta", "index", "text", "logprobs"}``, ``{"type": "finish", "index", "reason",
"completion_tokens"}`` and ``{"type": "error", "message"}``.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import DynamicLayer

from rlhfkit.logprobs import position_ids_from_mask
from rlhfkit.models.io import max_positions
from rlhfkit.rollout import static as static_engine
from rlhfkit.rollout.generate import _stop_ids, cache_keyword, top_p_filter


@dataclass
class Sampling:
    """One request's generation settings (validated by the server's schema)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # None: none; k >= 0: the sampled token's and the k most likely


class Job:
    """One request: prompt token ids, settings, and the callback that receives its events."""

    def __init__(self, prompt_ids: Sequence[int], sampling: Sampling, emit: Callable[[dict], None]):
        self.prompt_ids, self.sampling, self.emit = list(prompt_ids), sampling, emit
        self.cancelled = False
        self.arrived = time.perf_counter()

    def cancel(self) -> None:
        """Stop generating (the client went away); rows of this job leave the batch at the next step."""
        self.cancelled = True


def choice_generator(seed: int, index: int, device) -> torch.Generator:
    """The generator of choice `index` of a seeded request: n > 1 choices differ, the same seed
    gives the same choices (an odd multiplier keeps seeds s and s + 1 from sharing choices)."""
    return torch.Generator(device=device).manual_seed((int(seed) * 1_000_003 + index) % (1 << 63))


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_p: Sequence[float],
                uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row of `logits` (B, V) with per-row `temperature` (B,) (<= 0: greedy),
    `top_p` and `uniforms` (B,) in [0, 1): `sample_next_token`'s draw, row by row."""
    greedy = temperature <= 0
    best = logits.argmax(-1)
    if bool(greedy.all()):
        return best
    scaled = logits.float() / torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
    for p in sorted(set(top_p)):
        if p < 1.0:
            rows = torch.tensor([i for i, q in enumerate(top_p) if q == p], device=logits.device)
            scaled[rows] = top_p_filter(scaled[rows], p)
    cdf = scaled.softmax(-1).cumsum(-1)
    u = uniforms.to(cdf.dtype)[:, None] * cdf[:, -1:]
    tok = torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=cdf.shape[-1] - 1)
    return torch.where(greedy, best, tok)


# ---------------------------------------------------------------------------------------------
# KV-cache batches: rows join (prefill) and leave; `join` appends rows after the existing ones


def _left_pad(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    extra = width - x.shape[dim]
    if extra <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def _left_padded(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    p = max(len(x) for x in prompts)
    query = torch.full((len(prompts), p), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), p), dtype=torch.long)
    for i, ids in enumerate(prompts):
        query[i, p - len(ids):] = torch.tensor(ids, dtype=torch.long)
        mask[i, p - len(ids):] = 1
    return query.to(device), mask.to(device)


class DynamicBatch:
    """Rows decoding over one DynamicCache (the `hf` rollout engine's cache), joining and leaving at any step."""

    def __init__(self, model, pad_id: int):
        self.model, self.pad_id = model, pad_id
        self.device = next(model.parameters()).device
        self.key = cache_keyword(model)
        self.cache: DynamicCache | None = None
        self.mask = self.next_pos = None
        self.plain = True  # every cache layer a DynamicLayer, which may be padded and concatenated

    def can_join(self) -> bool:
        return self.cache is None or self.plain

    def join(self, prompts: Sequence[Sequence[int]], repeats: Sequence[int], max_new: int) -> torch.Tensor:
        """Prefill `prompts` once each, add `repeats[i]` rows for prompt i; their next-token logits."""
        query, mask = _left_padded(prompts, self.pad_id, self.device)
        positions = position_ids_from_mask(mask)
        out = self.model(input_ids=query, attention_mask=mask, position_ids=positions,
                         **{self.key: DynamicCache()}, use_cache=True, logits_to_keep=1)
        new = getattr(out, self.key)
        index = torch.repeat_interleave(torch.arange(len(prompts), device=self.device),
                                        torch.tensor(list(repeats), device=self.device))
        logits = out.logits[index, -1, :]
        mask, next_pos = mask[index], positions[index, -1] + 1
        if self.cache is None:
            new.batch_select_indices(index)
            self.cache, self.mask, self.next_pos = new, mask, next_pos
            self.plain = all(type(layer) is DynamicLayer for layer in new.layers)
            return logits
        width = max(self.mask.shape[1], mask.shape[1])
        for old, fresh in zip(self.cache.layers, new.layers):
            old.keys = torch.cat([_left_pad(old.keys, width, 2), _left_pad(fresh.keys[index], width, 2)])
            old.values = torch.cat([_left_pad(old.values, width, 2), _left_pad(fresh.values[index], width, 2)])
        self.mask = torch.cat([_left_pad(self.mask, width, 1), _left_pad(mask, width, 1)])
        self.next_pos = torch.cat([self.next_pos, next_pos])
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=1)
        out = self.model(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.next_pos[:, None],
                         **{self.key: self.cache}, use_cache=True)
        self.next_pos = self.next_pos + 1
        return out.logits[:, -1, :]

    def keep(self, alive: list[int]) -> list[int]:
        """Drop every row not in `alive`; returns the rows kept (their old indices, in order)."""
        if not alive:
            self.cache = self.mask = self.next_pos = None
            return []
        index = torch.tensor(alive, device=self.device)
        self.mask, self.next_pos = self.mask[index], self.next_pos[index]
        lead = int((self.mask.cumsum(1) == 0).sum(1).min())  # columns that are padding in every row
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[index, :, lead:], layer.values[index, :, lead:]
        self.mask = self.mask[:, lead:]
        return alive


class StaticBatch:
    """Rows decoding into the static rollout engine's preallocated cache with its decoding step;
    joins only an empty batch, and rows stay in place (fed padding) until the last one ends."""

    def __init__(self, model, pad_id: int, compile: bool | None = None):
        self.model, self.pad_id = model, pad_id
        self.device = next(model.parameters()).device
        self.compile = (self.device.type == "cuda") if compile is None else compile
        self.cache: StaticCache | None = None
        # rows that ended are fed padding until the batch ends: their positions must stay in range
        self.last_pos = (max_positions(model) or (1 << 30)) - 1

    def can_join(self) -> bool:
        return self.cache is None

    def join(self, prompts: Sequence[Sequence[int]], repeats: Sequence[int], max_new: int) -> torch.Tensor:
        rows = [ids for ids, k in zip(prompts, repeats) for _ in range(k)]
        query, mask = _left_padded(rows, self.pad_id, self.device)
        b, p = query.shape
        self.cache = StaticCache(config=self.model.config, max_cache_len=p + max_new)
        self.attn = torch.ones((b, p + max_new), dtype=mask.dtype, device=self.device)
        self.attn[:, :p] = mask
        positions = position_ids_from_mask(mask)
        out = self.model(input_ids=query, attention_mask=mask, position_ids=positions,
                         cache_position=torch.arange(p, device=self.device), use_cache=True, logits_to_keep=1,
                         **{cache_keyword(self.model): self.cache})
        self.next_pos, self.t = positions[:, -1:] + 1, p
        return out.logits[:, -1, :]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        step_fn = static_engine._step_fn(self.model, self.compile)
        logits = step_fn(self.model, tokens[:, None], self.attn, self.next_pos,
                         torch.tensor([self.t], device=self.device), self.cache)
        self.next_pos, self.t = (self.next_pos + 1).clamp(max=self.last_pos), self.t + 1
        return logits.clone() if self.compile else logits  # CUDA-graph outputs are reused by the next replay

    def keep(self, alive: list[int]) -> list[int]:
        if not alive:
            self.cache = None
            return []
        return list(range(self.attn.shape[0]))


BATCHES = {"hf": DynamicBatch, "static": StaticBatch}


# ---------------------------------------------------------------------------------------------
# the loop


class Batcher:
    """The background loop every serving engine shares: a queue of jobs, one thread, counters.

    `batch_wait_s` > 0 holds an idle engine for up to that long after the first request arrives,
    so requests that come together start together (a queue delay, as in Triton's dynamic
    batcher); 0 starts at once and lets later requests join the running batch.
    """

    def __init__(self, name: str, max_rows: int, batch_wait_s: float = 0.0):
        self.max_rows, self.batch_wait_s = max_rows, batch_wait_s
        self.cond = threading.Condition()
        self.waiting: collections.deque[Job] = collections.deque()
        self.closed = False
        self.stats = {"jobs": 0, "prefills": 0, "decode_steps": 0, "tokens": 0, "max_jobs_in_step": 0,
                      "max_rows_in_step": 0}
        self.thread = threading.Thread(target=self._run, name=f"rlhfkit-serve-{name}", daemon=True)

    def submit(self, job: Job) -> None:
        with self.cond:
            if self.closed:
                raise RuntimeError("the engine is shut down")
            self.waiting.append(job)
            self.stats["jobs"] += 1
            self.cond.notify()

    def close(self, timeout: float = 30.0) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def _busy(self) -> bool:
        raise NotImplementedError

    def running(self) -> int:
        """Rows (request choices) being generated now (/health)."""
        raise NotImplementedError

    def _work(self) -> None:
        raise NotImplementedError

    def _fail(self, message: str) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.waiting and not self._busy() and not self.closed:
                    self.cond.wait()
                if self.closed:
                    left, self.waiting = list(self.waiting), collections.deque()
                    break
                if not self._busy() and self.batch_wait_s > 0:
                    deadline = self.waiting[0].arrived + self.batch_wait_s
                    while (time.perf_counter() < deadline and not self.closed
                           and sum(j.sampling.n for j in self.waiting) < self.max_rows):
                        self.cond.wait(max(0.0, deadline - time.perf_counter()))
            try:
                self._work()
            except Exception as e:  # a failing batch answers its requests with an error; the loop goes on
                self._fail(f"generation failed: {type(e).__name__}: {e}")
        self._fail("the server is shutting down")
        for job in left:
            _emit(job, {"type": "error", "message": "the server is shutting down"})

    def _take(self, capacity: int) -> list[Job]:
        """Waiting jobs, oldest first, while their rows fit in `capacity` (at least one job when the batch is empty)."""
        taken: list[Job] = []
        with self.cond:
            while self.waiting:
                job = self.waiting[0]
                if job.cancelled:
                    self.waiting.popleft()
                    continue
                if job.sampling.n > capacity and (taken or capacity < self.max_rows):
                    break
                taken.append(self.waiting.popleft())
                capacity -= job.sampling.n
        return taken


def _emit(job: Job, event: dict) -> None:
    try:
        job.emit(event)
    except Exception:  # the client's event loop is gone: nobody is listening any more
        job.cancel()


class _Row:
    """One choice being generated: its job, choice index, generator and output so far."""

    __slots__ = ("job", "index", "generator", "tokens", "count", "text", "sent", "pending")

    def __init__(self, job: Job, index: int, generator: torch.Generator | None):
        self.job, self.index, self.generator = job, index, generator
        self.tokens: list[int] = []  # sampled tokens, stop tokens excluded
        self.count = 0  # tokens sampled, a final stop token included (usage)
        self.text, self.sent = "", 0  # decoded text; characters already sent
        self.pending: list[dict] = []  # logprob entries not sent yet


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> int | None:
    """Where the first stop string in `text` begins, looking from `start` on; None if none."""
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None


def safe_end(text: str, stops: Sequence[str]) -> int:
    """How much of `text` may be sent now: not a trailing partial character (U+FFFD of an
    incomplete UTF-8 sequence) nor a tail that may yet become a stop string."""
    end = len(text) - 1 if text.endswith("\ufffd") else len(text)
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, end), hold, -1):
            if text[:end].endswith(s[:k]):
                hold = k
                break
    return end - hold


class Engine(Batcher):
    """Continuous (`hf`) or dynamic (`static`) batching of one causal LM (module docstring)."""

    def __init__(self, model, tokenizer, engine: str = "hf", max_rows: int = 64, batch_wait_s: float = 0.0,
                 seed: int | None = None, name: str = "model"):
        super().__init__(name, max_rows, batch_wait_s)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.device = next(model.parameters()).device
        self.batch = BATCHES[engine](model, tokenizer.pad_token_id)
        self.stop_ids = set(_stop_ids(model, tokenizer, None))
        self.rows: list[_Row | None] = []
        seed = int.from_bytes(os.urandom(8), "little") >> 1 if seed is None else seed
        self.rng = torch.Generator(device=self.device).manual_seed(seed)  # draws of unseeded requests
        self.thread.start()

    def _busy(self) -> bool:
        return any(r is not None for r in self.rows)

    def running(self) -> int:
        return sum(r is not None for r in list(self.rows))

    @torch.inference_mode()
    def _work(self) -> None:
        if self.batch.can_join() and len(self.rows) < self.max_rows:
            jobs = self._take(self.max_rows - len(self.rows))
            if jobs:
                logits = self.batch.join([j.prompt_ids for j in jobs], [j.sampling.n for j in jobs],
                                         max(j.sampling.max_tokens for j in jobs))
                first = len(self.rows)
                self.rows += [_Row(j, k, None if j.sampling.seed is None else
                                   choice_generator(j.sampling.seed, k, self.device))
                              for j in jobs for k in range(j.sampling.n)]  # join appends after existing rows
                self.stats["prefills"] += 1
                self._advance(list(range(first, len(self.rows))), logits)
                self._evict()
        for i, row in enumerate(self.rows):
            if row is not None and row.job.cancelled:
                self.rows[i] = None
        self._evict()
        if not self._busy():
            return
        tokens = torch.tensor([r.tokens[-1] if r is not None else self.tokenizer.pad_token_id for r in self.rows],
                              device=self.device)
        live = [r for r in self.rows if r is not None]
        self.stats["decode_steps"] += 1
        self.stats["max_rows_in_step"] = max(self.stats["max_rows_in_step"], len(live))
        self.stats["max_jobs_in_step"] = max(self.stats["max_jobs_in_step"], len({id(r.job) for r in live}))
        logits = self.batch.step(tokens)
        self._advance(list(range(len(self.rows))), logits)
        self._evict()

    def _evict(self) -> None:
        alive = [i for i, r in enumerate(self.rows) if r is not None]
        if len(alive) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in self.batch.keep(alive)]

    def _fail(self, message: str) -> None:
        for job in {id(r.job): r.job for r in self.rows if r is not None}.values():
            _emit(job, {"type": "error", "message": message})
        self.rows = []
        self.batch.keep([])

    def _uniforms(self, rows: list[_Row]) -> torch.Tensor:
        """One uniform per row, as `sample_next_token` draws it: from the row's own generator when
        its request is seeded, else from the engine's; greedy rows draw nothing."""
        u = torch.zeros(len(rows), device=self.device)
        free = [k for k, r in enumerate(rows) if r.job.sampling.temperature > 0 and r.generator is None]
        if free:
            u[free] = torch.rand(len(free), generator=self.rng, device=self.device)
        for k, r in enumerate(rows):
            if r.job.sampling.temperature > 0 and r.generator is not None:
                u[k] = torch.rand((1, 1), generator=r.generator, device=self.device)[0, 0]
        return u

    def _advance(self, index: list[int], logits: torch.Tensor) -> None:
        """Sample the next token of rows `index` (logits aligned with them) and hand out what they produced."""
        pick = [k for k, i in enumerate(index) if self.rows[i] is not None]
        if not pick:
            return
        rows = [self.rows[index[k]] for k in pick]
        logits = logits[torch.tensor(pick, device=logits.device)] if len(pick) < len(index) else logits
        temps = torch.tensor([r.job.sampling.temperature for r in rows], device=self.device)
        toks = sample_rows(logits, temps, [r.job.sampling.top_p for r in rows], self._uniforms(rows))
        entries = self._logprobs(logits, toks, rows)
        self.stats["tokens"] += len(rows)
        for k, tok, entry in zip(pick, toks.tolist(), entries):
            if self._append(self.rows[index[k]], tok, entry):
                self.rows[index[k]] = None

    def _logprobs(self, logits: torch.Tensor, toks: torch.Tensor, rows: list[_Row]) -> list[dict | None]:
        need = [k for k, r in enumerate(rows) if r.job.sampling.logprobs is not None]
        out: list[dict | None] = [None] * len(rows)
        if not need:
            return out
        at = torch.tensor(need, device=logits.device)
        logp = torch.log_softmax(logits[at].to(torch.promote_types(logits.dtype, torch.float32)), -1)
        chosen = logp.gather(1, toks[at][:, None]).squeeze(1).tolist()
        k_max = max(rows[k].job.sampling.logprobs for k in need)
        top_v, top_i = (logp.topk(k_max) if k_max else (logp[:, :0], logp[:, :0].long()))
        top_v, top_i = top_v.tolist(), top_i.tolist()
        for j, k in enumerate(need):
            width = rows[k].job.sampling.logprobs
            out[k] = {"id": int(toks[k]), "logprob": chosen[j], "top": list(zip(top_i[j][:width], top_v[j][:width]))}
        return out

    def _append(self, row: _Row, tok: int, entry: dict | None) -> bool:
        """Add one sampled token to `row`; send the text that is final; True when the row has ended."""
        s = row.job.sampling
        row.count += 1
        if tok in self.stop_ids:
            return self._finish(row, "stop")
        row.tokens.append(tok)
        if entry is not None:
            row.pending.append(entry)
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        cut = find_stop(text, s.stop, max(0, row.sent - max(map(len, s.stop)))) if s.stop else None
        row.text = text if cut is None else text[:cut]
        if cut is not None:
            return self._finish(row, "stop")
        if row.count >= s.max_tokens:
            return self._finish(row, "length")
        end = safe_end(text, s.stop)
        if end > row.sent:
            _emit(row.job, {"type": "delta", "index": row.index, "text": text[row.sent:end], "logprobs": row.pending})
            row.sent, row.pending = end, []
        return False

    def _finish(self, row: _Row, reason: str) -> bool:
        if len(row.text) > row.sent or row.pending:
            _emit(row.job, {"type": "delta", "index": row.index, "text": row.text[row.sent:], "logprobs": row.pending})
            row.sent, row.pending = len(row.text), []
        _emit(row.job, {"type": "finish", "index": row.index, "reason": reason, "completion_tokens": row.count})
        return True
