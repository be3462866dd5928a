"""HdrHistogram helpers: latencies in microseconds, 1 µs to 1 hour, 3 significant digits."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from hdrh.histogram import HdrHistogram

__all__ = ["PCTS", "decode", "encode_ns", "merge", "new_hist", "summary"]

PCTS = (50.0, 90.0, 99.0, 99.9)
_HIGH_US = 3_600_000_000


def new_hist() -> Any:
    return HdrHistogram(1, _HIGH_US, 3)


def encode_ns(values_ns: Iterable[int]) -> bytes:
    h = new_hist()
    rec = h.record_value
    for v in values_ns:
        us = v // 1000
        rec(1 if us < 1 else (us if us < _HIGH_US else _HIGH_US))
    out: bytes = h.encode()
    return out


def decode(data: bytes) -> Any:
    return HdrHistogram.decode(data)


def merge(blobs: Iterable[bytes]) -> Any:
    h = new_hist()
    for b in blobs:
        h.add(decode(b))
    return h


def summary(h: Any) -> dict[str, Any]:
    """Count and percentiles in milliseconds."""
    n = int(h.get_total_count())
    if n == 0:
        return {"count": 0}
    out: dict[str, Any] = {"count": n}
    for p in PCTS:
        out[f"p{p:g}"] = h.get_value_at_percentile(p) / 1000.0
    out["max"] = h.get_max_value() / 1000.0
    out["mean"] = h.get_mean_value() / 1000.0
    return out
