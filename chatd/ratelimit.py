"""Token buckets for per-user rates. Time is passed in: no clock inside."""

from __future__ import annotations

__all__ = ["TokenBucket"]


class TokenBucket:
    __slots__ = ("_burst", "_rate", "_stamp", "_tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self._rate = rate
        self._burst = burst
        self._tokens = burst
        self._stamp = now

    def take(self, now: float) -> float:
        """Take one token: 0.0 if allowed, else the seconds until one is available."""
        tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        if tokens >= 1.0:
            self._tokens = tokens - 1.0
            return 0.0
        self._tokens = tokens
        return (1.0 - tokens) / self._rate

    def wait(self, now: float) -> float:
        """Seconds until a token is available (0.0: one is), taking none."""
        tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self._rate

    def spend(self, amount: float, now: float) -> float:
        """Take `amount` tokens, into debt if need be: the seconds until the balance is
        back at zero (0.0: there were enough). For pacing work by its size."""
        tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate) - amount
        self._stamp = now
        self._tokens = tokens
        return 0.0 if tokens >= 0.0 else -tokens / self._rate

    def refund(self) -> None:
        """Give back a token taken for something that turned out to cost nothing."""
        self._tokens = min(self._burst, self._tokens + 1.0)
