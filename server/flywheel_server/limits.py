"""Per-key request limits: a token bucket per API key (issue 18).

A key configured with `rate_per_s` (and optionally `burst`) may make `burst` requests at once
and `rate_per_s` a second after that. The bucket is checked when the key is, before the
request body is parsed or tokenised, so a key over its limit costs the server almost nothing,
and one greedy key cannot take the admission queue from the others.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Limit:
    """rate_per_s: sustained requests per second; burst: requests allowed at once (the bucket's
    size, at least 1)."""

    rate_per_s: float
    burst: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rate_per_s) and self.rate_per_s > 0):
            raise ValueError(f"rate_per_s must be a positive number, got {self.rate_per_s}")
        if self.burst < 1:
            raise ValueError(f"burst must be at least 1, got {self.burst}")

    @classmethod
    def default_burst(cls, rate_per_s: float) -> Limit:
        """A second's worth of requests at once, and at least one."""
        return cls(rate_per_s, max(1, math.ceil(rate_per_s)))


class TokenBucket:
    """`take(cost)` spends `cost` tokens and returns 0.0, or spends nothing and returns the
    seconds until they are there (inf when `cost` exceeds the bucket). Thread-safe: both
    transports share it."""

    def __init__(self, limit: Limit, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self._clock = clock
        self._tokens = float(limit.burst)
        self._stamp = clock()
        self._lock = threading.Lock()

    def take(self, cost: float = 1.0) -> float:
        if cost > self.limit.burst:
            return math.inf
        with self._lock:
            now = self._clock()
            elapsed = max(0.0, now - self._stamp)
            self._tokens = min(self.limit.burst, self._tokens + elapsed * self.limit.rate_per_s)
            self._stamp = now
            if self._tokens >= cost:
                self._tokens -= cost
                return 0.0
            return (cost - self._tokens) / self.limit.rate_per_s
