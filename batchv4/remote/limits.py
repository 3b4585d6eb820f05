"""How fast a remote backend may send: an adaptive in-flight limit, requests- and tokens-per-minute
windows, and retry delays.

Owns: the arithmetic of pacing (additive increase, halving on 429; a sliding 60-second window;
exponential backoff with full jitter, `Retry-After` taking precedence). Does not own: HTTP, the
order of requests, or what counts as retryable (`remote.client`). Plain Python and asyncio.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from email.utils import parsedate_to_datetime


class AdaptiveLimit:
    """Requests allowed in flight: starts at `maximum`, halves on every 429 (never below 1) and
    grows back by one request per `current` successes (additive increase)."""

    def __init__(self, maximum: int) -> None:
        if maximum < 1:
            raise ValueError("concurrency must be >= 1")
        self.maximum = maximum
        self._value = float(maximum)

    @property
    def current(self) -> int:
        return max(1, int(self._value))

    def throttled(self) -> None:
        self._value = max(1.0, self._value / 2)

    def succeeded(self) -> None:
        self._value = min(float(self.maximum), self._value + 1.0 / max(1.0, self._value))


class MinuteWindow:
    """At most `rpm` requests and `tpm` tokens started in any 60 seconds (either may be None)."""

    def __init__(self, rpm: int | None, tpm: int | None, now=time.monotonic) -> None:
        self.rpm, self.tpm, self.now = rpm, tpm, now
        self._starts: deque[tuple[float, int]] = deque()
        self._tokens = 0

    def delay(self, tokens: int) -> float:
        """Seconds to wait before a request of `tokens` may start (0 = now)."""
        t = self.now()
        while self._starts and self._starts[0][0] <= t - 60.0:
            self._tokens -= self._starts.popleft()[1]
        if not self._starts:
            return 0.0
        over_r = self.rpm is not None and len(self._starts) >= self.rpm
        # a request bigger than the whole budget still runs, alone in its window
        over_t = self.tpm is not None and self._tokens + tokens > self.tpm
        if not (over_r or over_t):
            return 0.0
        return max(0.0, self._starts[0][0] + 60.0 - t) + 1e-3

    def take(self, tokens: int) -> None:
        self._starts.append((self.now(), tokens))
        self._tokens += tokens

    async def acquire(self, tokens: int) -> None:
        while (d := self.delay(tokens)) > 0:
            await asyncio.sleep(d)
        self.take(tokens)


def backoff(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
    return rng.uniform(0.0, min(cap, base * (2 ** attempt)))


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a `Retry-After` header (delta-seconds or an HTTP date); None if absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
