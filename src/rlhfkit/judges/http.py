"""A judge behind an OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp, TGI ...).

    http:MODEL?base_url=http://127.0.0.1:8000/v1&api_key_env=OPENAI_API_KEY&concurrency=8

* The API key is read from the environment variable ``api_key_env`` (never from the spec, so
  it is not written to configs or logs); no key is sent when the variable is unset. A server's
  error text is shown with the key and any ``Bearer`` token replaced by ``***``.
* At most ``concurrency`` requests are in flight (httpx's async client, one semaphore).
* Each request has a ``timeout`` (seconds). Timeouts, dropped connections, HTTP 429 and 5xx and
  malformed JSON are retried up to ``max_retries`` times with exponential backoff and jitter
  (``backoff * 2**attempt`` seconds; a Retry-After header, in seconds or as an HTTP-date, is
  honoured when longer, up to 60 s), then the item
  is recorded as abstaining. An answer that cannot be read is retried only when sampling is
  stochastic (``temperature > 0``): at temperature 0 the same request gets the same answer, so a
  retry would pay for it twice and abstain anyway. Each cause is counted in ``stats`` -- never a
  crash mid-run, never a coin flip.
* Verdicts are cached persistently (``cache=FILE``, SQLite) keyed by the SHA-256 of the full
  request (base URL, model, messages, sampling parameters), so a re-run or a resumed run asks
  only what it has not asked before. Only readable answers are cached.
* Tokens (``usage`` of each response) and cost (``price_prompt`` / ``price_completion`` in
  currency units per million tokens) are accounted in ``stats``; cache hits cost nothing.

Pairwise verdicts are asked in both orders (as the local LLM judge does) and, when the
server returns ``top_logprobs``, read from the probabilities of the answer tokens "A"/"B";
otherwise from the answer text by the grammar of :mod:`rlhfkit.judges.verdicts` ("A",
"Response B", "Answer: A", "I prefer B.", ``{"choice": "A"}``, ``[[B]]``, ...; confidence 1 per
order). A text that calls the two equal is a tie (``allow_tie=false``: unreadable instead).
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import hashlib
import json
import math
import os
import random
import re
import sqlite3
import threading
from collections.abc import Sequence

from tqdm.auto import tqdm

from rlhfkit.errors import ConfigError
from rlhfkit.judges.judge import (
    DEFAULT_TIE_MARGIN,
    INCONSISTENT,
    Preference,
    aligned,
    attach_rationales,
    combine_orders,
    new_stats,
    rubric_compare,
)
from rlhfkit.judges.llm import (
    DEFAULT_QUESTION,
    PAIRWISE_TEMPLATE,
    POINTWISE_TEMPLATE,
    _read_template,
)
from rlhfkit.judges.verdicts import Unreadable, read_verdict

COT_INSTRUCTION = ("\nThink step by step about the question first, then end with a last line "
                   "'Answer: A' or 'Answer: B'.")
# a pointwise answer: "4", "4.5", "**4**", "Score: 4", "Rating: 4/5", "4 out of 5" (the forms chat models
# write when asked for a number from 1 to 5); anything else, or a number outside the scale, is unreadable
_NUMBER = re.compile(r"^\W*(?:(?:score|rating|grade)\s*[:=]?\s*)?(\d+(?:\.\d+)?)\s*(?:(?:/|out\s+of)\s*5)?\W*$",
                     re.IGNORECASE)


def parse_score(text: str, low: float = 1.0, high: float = 5.0) -> float:
    """The score in a pointwise answer (see _NUMBER); raises Unreadable otherwise."""
    m = _NUMBER.match(text.strip())
    if not m:
        raise Unreadable("the score is not a number")
    value = float(m.group(1))
    if not low <= value <= high:
        raise Unreadable(f"the score {value:g} is outside {low:g}..{high:g}")
    return value


_BEARER = re.compile(r"(Bearer\s+)[^\s\"',;]+", re.IGNORECASE)


def redact(text: str, *secrets: str | None) -> str:
    """`text` with each secret (an API key; ignored when shorter than 4 characters) and any
    ``Bearer <token>`` replaced by ``***``: a server's error body may echo the key it refused."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return _BEARER.sub(r"\1***", text)


def retry_after(value: str | None) -> float:
    """Seconds a Retry-After header asks for: delay-seconds or an HTTP-date (RFC 9110 sec. 10.2.3);
    0 when absent, unreadable or past."""
    if not value:
        return 0.0
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return 0.0
    if when.tzinfo is None:  # an HTTP-date is GMT
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, (when - datetime.datetime.now(datetime.UTC)).total_seconds())


class VerdictCache:
    """SQLite table key -> response JSON; safe to share between threads of one process."""

    def __init__(self, path: str):
        self.path = path
        self.lock = threading.Lock()
        self.db = sqlite3.connect(path, check_same_thread=False)
        self.db.execute("CREATE TABLE IF NOT EXISTS verdicts (key TEXT PRIMARY KEY, response TEXT NOT NULL)")
        self.db.commit()

    def get(self, key: str) -> dict | None:
        with self.lock:
            row = self.db.execute("SELECT response FROM verdicts WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def __len__(self) -> int:
        with self.lock:
            return int(self.db.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0])

    def put(self, key: str, response: dict) -> None:
        with self.lock:
            self.db.execute("INSERT OR REPLACE INTO verdicts VALUES (?, ?)", (key, json.dumps(response)))
            self.db.commit()


class HTTPJudge:
    """OpenAI-compatible endpoint as a judge and a generator (see the module docstring)."""

    def __init__(self, model: str, base_url: str = "http://127.0.0.1:8000/v1", api_key_env: str = "OPENAI_API_KEY",
                 concurrency: int = 4, timeout: float = 30.0, max_retries: int = 4, backoff: float = 0.5,
                 cache: str = "", temperature: float = 0.0, max_tokens: int = 16, cot_max_tokens: int = 512,
                 logprobs: bool = True, both_orders: bool = True, mode: str = "pairwise", question: str = DEFAULT_QUESTION,
                 pairwise_template: str = "", pointwise_template: str = "", price_prompt: float = 0.0,
                 price_completion: float = 0.0, tie_margin: float = DEFAULT_TIE_MARGIN, inconsistent: str = "tie",
                 allow_tie: bool = True, name: str = ""):
        if concurrency < 1 or max_retries < 0 or timeout <= 0:
            raise ConfigError("http judge: concurrency >= 1, max_retries >= 0 and timeout > 0 are required")
        if mode not in ("pairwise", "pointwise"):
            raise ConfigError(f"http judge: mode must be pairwise or pointwise, got {mode!r}")
        if inconsistent not in INCONSISTENT:
            raise ConfigError(f"http judge: inconsistent must be one of {', '.join(INCONSISTENT)}, got {inconsistent!r}")
        self.model, self.base_url = model, base_url.rstrip("/")
        self.api_key_env = api_key_env
        self.concurrency, self.timeout, self.max_retries, self.backoff = int(concurrency), float(timeout), int(max_retries), float(backoff)
        self.cache = VerdictCache(cache) if cache else None
        self.temperature, self.max_tokens, self.cot_max_tokens = float(temperature), int(max_tokens), int(cot_max_tokens)
        self.logprobs, self.both_orders, self.mode, self.question = bool(logprobs), bool(both_orders), mode, question
        self.pairwise_template = _read_template(pairwise_template, PAIRWISE_TEMPLATE)
        self.pointwise_template = _read_template(pointwise_template, POINTWISE_TEMPLATE)
        self.price_prompt, self.price_completion = float(price_prompt), float(price_completion)
        self.tie_margin, self.allow_tie, self.inconsistent = float(tie_margin), bool(allow_tie), inconsistent
        self.name = name or f"http:{model}"
        self.stats = new_stats() | {"requests": 0, "retries": 0, "timeouts": 0, "connection_errors": 0,
                                    "rate_limited": 0, "server_errors": 0, "malformed": 0, "unreadable": 0,
                                    "failed": 0, "cache_hits": 0, "prompt_tokens": 0, "completion_tokens": 0,
                                    "cost": 0.0, "order_consistent": 0, "order_pairs": 0}

    # -- one request, with retries -----------------------------------------------------------

    def _body(self, content: str, max_tokens: int, logprobs: bool) -> dict:
        body = {"model": self.model, "messages": [{"role": "user", "content": content}],
                "temperature": self.temperature, "max_tokens": max_tokens}
        if logprobs:
            body.update(logprobs=True, top_logprobs=5)
        return body

    def _key(self, body: dict) -> str:
        return hashlib.sha256(json.dumps({"url": self.base_url, **body}, sort_keys=True).encode()).hexdigest()

    async def _request(self, client, sem: asyncio.Semaphore, body: dict, parse):
        """parse(response JSON) -> value, or raise Unreadable; returns the value or None (abstain)."""
        key = self._key(body)
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                try:
                    value = parse(hit)
                    self.stats["cache_hits"] += 1
                    return value
                except Unreadable:
                    pass
        import httpx  # the judges extra

        headers = {}
        if os.environ.get(self.api_key_env):
            headers["Authorization"] = f"Bearer {os.environ[self.api_key_env]}"
        for attempt in range(self.max_retries + 1):
            wait = self.backoff * (2 ** attempt) * (0.5 + random.random())
            async with sem:
                self.stats["requests"] += 1
                try:
                    r = await client.post(f"{self.base_url}/chat/completions", json=body, headers=headers,
                                          timeout=self.timeout)
                except httpx.TimeoutException:
                    self.stats["timeouts"] += 1
                    r = None
                except httpx.TransportError:  # refused, reset, dropped mid-response
                    self.stats["connection_errors"] += 1
                    r = None
            if r is not None:
                if r.status_code == 429 or r.status_code >= 500 or r.status_code in (408, 409, 425):  # transient
                    self.stats["rate_limited" if r.status_code == 429 else "server_errors"] += 1
                    wait = max(wait, retry_after(r.headers.get("retry-after")))
                elif r.status_code >= 400:  # the request itself is wrong: retrying will not help
                    raise ConfigError(redact(f"http judge: {self.base_url} answered {r.status_code}: {r.text[:200]}",
                                             os.environ.get(self.api_key_env)))
                else:
                    try:
                        data = r.json()
                    except ValueError:
                        self.stats["malformed"] += 1
                        data = None
                    if data is not None:
                        self._account(data)
                        try:
                            value = parse(data)
                        except Unreadable:
                            self.stats["unreadable"] += 1
                            if self.temperature == 0.0:  # greedy: the same request reads the same answer
                                break
                        else:
                            if self.cache is not None:
                                self.cache.put(key, data)
                            return value
            if attempt < self.max_retries:
                self.stats["retries"] += 1
                await asyncio.sleep(min(wait, 60.0))
        self.stats["failed"] += 1
        return None

    def _account(self, data: dict) -> None:
        usage = data.get("usage") if isinstance(data, dict) else None
        if isinstance(usage, dict):
            p, c = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
            self.stats["prompt_tokens"] += p
            self.stats["completion_tokens"] += c
            self.stats["cost"] += (p * self.price_prompt + c * self.price_completion) / 1e6

    def _run(self, bodies: Sequence[dict], parse) -> list:
        import httpx  # the judges extra

        async def main():
            sem = asyncio.Semaphore(self.concurrency)
            limits = httpx.Limits(max_connections=self.concurrency)
            # disable=None: a bar on a terminal only, none in logs and tests
            with tqdm(total=len(bodies), desc=f"{self.name}", unit="req", disable=None, leave=False) as bar:
                async def one(b):
                    value = await self._request(client, sem, b, parse)
                    bar.update(1)
                    return value

                async with httpx.AsyncClient(limits=limits) as client:
                    return await asyncio.gather(*(one(b) for b in bodies))

        return list(asyncio.run(main())) if bodies else []

    # -- reading answers -------------------------------------------------------------------------

    @staticmethod
    def _choice(data: dict) -> dict:
        try:
            choice = data["choices"][0]
            text = choice["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise Unreadable("no choices[0].message.content") from None
        if not isinstance(text, str):
            raise Unreadable("content is not text")
        return choice

    @staticmethod
    def _top_logprobs(choice: dict, tokens: Sequence[str]) -> list[float] | None:
        """log-probs of the given answer tokens at the first content position, if the server sent them."""
        try:
            first = choice["logprobs"]["content"][0]["top_logprobs"]
        except (KeyError, IndexError, TypeError):
            return None
        found = {}
        for entry in first:
            t = str(entry.get("token", "")).strip()
            if t in tokens and t not in found:
                found[t] = float(entry["logprob"])
        return [found[t] for t in tokens] if len(found) == len(tokens) else None

    def _parse_pair(self, cot: bool):
        def parse(data: dict) -> float:
            choice = self._choice(data)
            text = choice["message"]["content"]
            if cot:  # the reasoning may weigh both responses: its last verdict counts; the text is kept
                return read_verdict(text, self.allow_tie, last=True), text
            lp = self._top_logprobs(choice, ("A", "B")) if self.logprobs else None
            if lp is not None:
                m = max(lp)
                ea, eb = math.exp(lp[0] - m), math.exp(lp[1] - m)
                return ea / (ea + eb)
            return read_verdict(text, self.allow_tie)
        return parse

    # -- the judge interface ---------------------------------------------------------------------

    def _pair_bodies(self, prompts, first, second, question, cot):
        bodies = []
        for p, x, y in zip(prompts, first, second):
            content = self.pairwise_template.format(prompt=p or "", response_a=x, response_b=y, question=question)
            if cot:
                content = content.rsplit("Answer:", 1)[0].rstrip() + COT_INSTRUCTION
            bodies.append(self._body(content, self.cot_max_tokens if cot else self.max_tokens, self.logprobs and not cot))
        return bodies

    def compare_with_question(self, prompts, a, b, question: str, chain_of_thought: bool = False) -> list[Preference]:
        prompts = aligned(prompts, a, b)
        parse = self._parse_pair(chain_of_thought)
        n = len(a)
        bodies = self._pair_bodies(prompts, a, b, question, chain_of_thought)
        if self.both_orders:
            bodies += self._pair_bodies(prompts, b, a, question, chain_of_thought)
        got = self._run(bodies, parse)
        texts = [g[1] if g is not None else "" for g in got] if chain_of_thought else None
        if chain_of_thought:
            got = [g[0] if g is not None else None for g in got]
        out = combine_orders(got[:n], got[n:] if self.both_orders else None, self.both_orders, self.tie_margin,
                             self.stats, "no readable answer after retries", self.inconsistent)
        if texts is not None:
            attach_rationales(out, texts[:n], texts[n:] if self.both_orders else None)
        return out

    def compare(self, prompts, a, b) -> list[Preference]:
        return rubric_compare(self, prompts, a, b)

    def score(self, prompts, responses) -> list[float | None]:
        prompts = aligned(prompts, responses)
        points = ("1", "2", "3", "4", "5")

        def parse(data: dict) -> float:
            choice = self._choice(data)
            lp = self._top_logprobs(choice, points) if self.logprobs else None
            if lp is not None:
                m = max(lp)
                w = [math.exp(v - m) for v in lp]
                return sum(wi * (k + 1) for k, wi in enumerate(w)) / sum(w)
            return parse_score(choice["message"]["content"])

        bodies = [self._body(self.pointwise_template.format(prompt=p or "", response=r, question=self.question),
                             self.max_tokens, self.logprobs) for p, r in zip(prompts, responses)]
        out = self._run(bodies, parse)
        self.stats["scored"] += len(out)
        self.stats["abstained"] += sum(x is None for x in out)
        return out

    def generate(self, instructions: Sequence[str], max_new_tokens: int = 256) -> list[str | None]:
        """The endpoint's answer to each instruction (None where it failed after the retries)."""
        def parse(data: dict) -> str:
            text = self._choice(data)["message"]["content"].strip()
            if not text:
                raise Unreadable("empty answer")
            return text

        return self._run([self._body(i, max_new_tokens, False) for i in instructions], parse)
