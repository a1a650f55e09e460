"""Per-user request limits of the policy server (`--rate_limit 60/minute;1000/hour`).

Counting is the `limits` library's moving window (as the feedback service's login limits,
feedback/guard.py). The counters live in `--rate_limit_storage`: `memory://` counts in each
worker process on its own, `redis://HOST:PORT/DB` in Redis, shared by every worker and every
server started with the same URL, so N workers still allow a user the configured rate and
not N times it. A user is the request's `user` field, else the client's address.
"""

from __future__ import annotations

import time

from limits import parse_many
from limits.errors import ConfigurationError
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter

from rlhfkit.errors import ConfigError
from rlhfkit.serving.openai_schema import ServingError

NAMESPACE = "rlhfkit-serve-policy"


class RateLimit:
    """The limits a server enforces and where it counts them."""

    def __init__(self, spec: str, storage: str = "memory://"):
        try:
            self.items = parse_many(spec)
        except ValueError as e:
            raise ConfigError(f"--rate_limit {spec!r}: {e}; write e.g. 60/minute or 10/second;1000/hour") from e
        try:
            self.limiter = MovingWindowRateLimiter(storage_from_string(storage))
        except ConfigurationError as e:  # an unknown scheme, or redis:// without the redis package
            raise ConfigError(f"--rate_limit_storage {storage!r}: {e}") from e

    def check(self, user: str) -> None:
        """Count one request of `user`; a 429 in OpenAI's shape (with Retry-After) when over a limit."""
        for item in self.items:
            if not self.limiter.hit(item, NAMESPACE, user):
                reset = self.limiter.get_window_stats(item, NAMESPACE, user).reset_time
                wait = max(1, int(reset - time.time() + 0.999))
                raise ServingError(429, f"Rate limit reached for {user}: {item}; try again in {wait} s",
                                   None, "rate_limit_exceeded", type="requests", headers={"Retry-After": str(wait)})
