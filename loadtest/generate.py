"""Synthetic traces: who talks to whom (Zipf over a small friend list), log-normal sizes,
read delays, typing before sending, users going offline and back, reconnect storms.

Deterministic for a given seed.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from dataclasses import asdict, dataclass, field
from typing import Any

from .trace import Trace, TraceEvent

__all__ = ["GenParams", "generate"]


@dataclass(slots=True)
class GenParams:
    users: int = 200
    rate: float = 1000.0
    """Messages per second, all users together (Poisson arrivals)."""
    duration: float = 30.0
    seed: int = 1
    friends: int = 5
    """Size of each user's friend list (ignored with `pairs`)."""
    zipf: float = 1.2
    """Exponent of the Zipf choice over the friend list (rank 1 gets most messages)."""
    activity_sigma: float = 0.8
    """Log-normal spread of how much each user talks (0: all alike)."""
    pairs: bool = False
    """User 2i only talks with 2i+1 (the issue-2 benchmark shape)."""
    size_median: float = 60.0
    size_sigma: float = 1.0
    size_max: int = 16384
    read_prob: float = 0.7
    read_delay_median: float = 2.0
    read_delay_sigma: float = 1.0
    typing_prob: float = 0.3
    typing_lead: float = 1.5
    """Mean seconds of typing before a send (exponential)."""
    history_prob: float = 0.2
    """Chance that a (re)connect fetches history with the top friend."""
    connect_spread: float = 1.0
    """Initial connects are spread uniformly over this many seconds."""
    start: float = 0.0
    """Seconds after the connects before the first message."""
    offline_per_min: float = 0.0
    """Times per minute a user goes offline (Poisson), then resumes with `since`."""
    offline_median: float = 3.0
    storms: list[tuple[float, float, float]] = field(default_factory=list)
    """(at seconds, fraction of users, spread seconds): they all drop and come back."""
    bursts: list[tuple[float, float, float]] = field(default_factory=list)
    """(at seconds, length seconds, rate multiplier)."""
    prefix: str = "u"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _name(p: GenParams, i: int, width: int) -> str:
    return f"{p.prefix}{i:0{width}d}"


def _rate_at(p: GenParams, t: float) -> float:
    r = p.rate
    for at, length, mult in p.bursts:
        if at <= t < at + length:
            r *= mult
    return r


def generate(p: GenParams) -> Trace:
    rng = random.Random(p.seed)
    n = p.users
    if n < 2:
        raise ValueError("a trace needs at least 2 users")
    width = max(4, len(str(n - 1)))
    names = [_name(p, i, width) for i in range(n)]
    t_start = p.connect_spread + p.start
    t_end = t_start + p.duration

    # friend lists and Zipf weights over rank
    friends: list[list[int]] = []
    for i in range(n):
        if p.pairs:
            friends.append([i ^ 1] if (i ^ 1) < n else [i - 1])
        else:
            k = min(p.friends, n - 1)
            others = rng.sample(range(n - 1), k)
            friends.append([o if o < i else o + 1 for o in others])
    zipf_cum: list[list[float]] = []
    for fl in friends:
        w = [1.0 / (r + 1) ** p.zipf for r in range(len(fl))]
        zipf_cum.append(list(itertools.accumulate(w)))
    if p.pairs:
        activity = [1.0] * n
    else:
        activity = [rng.lognormvariate(0.0, p.activity_sigma) for _ in range(n)]
    act_cum = list(itertools.accumulate(activity))

    # offline windows per user: list of (down, up)
    offline: list[list[tuple[float, float]]] = [[] for _ in range(n)]
    if p.offline_per_min > 0:
        lam = p.offline_per_min / 60.0
        for i in range(n):
            t = t_start + rng.expovariate(lam)
            while t < t_end:
                up = t + rng.lognormvariate(math.log(p.offline_median), 0.7)
                offline[i].append((t, up))
                t = up + rng.expovariate(lam)
    for at, frac, spread in p.storms:
        who = rng.sample(range(n), max(1, int(n * frac)))
        for i in who:
            down = t_start + at + rng.uniform(0, 0.05)
            offline[i].append((down, down + 0.05 + rng.uniform(0, spread)))
    for wins in offline:  # merge overlaps
        wins.sort()
        merged: list[tuple[float, float]] = []
        for d, u in wins:
            if merged and d <= merged[-1][1] + 0.01:
                merged[-1] = (merged[-1][0], max(merged[-1][1], u))
            else:
                merged.append((d, u))
        wins[:] = merged

    def is_offline(i: int, t: float) -> bool:
        return any(d <= t < u for d, u in offline[i])

    ev: list[TraceEvent] = []
    for i in range(n):
        ev.append(TraceEvent(rng.uniform(0, p.connect_spread), names[i], "connect"))
        for d, u in offline[i]:
            ev.append(TraceEvent(d, names[i], "disconnect"))
            if u < t_end:
                ev.append(TraceEvent(u, names[i], "connect"))
                if rng.random() < p.history_prob:
                    ev.append(TraceEvent(u + 0.2, names[i], "history", names[friends[i][0]], 20))

    last_typing = [-1.0] * n
    max_rate = max([p.rate] + [p.rate * m for _, _, m in p.bursts])
    t = t_start
    mu = math.log(p.size_median)
    rmu = math.log(p.read_delay_median)
    while True:  # thinning: Poisson process with a time-varying rate
        t += rng.expovariate(max_rate)
        if t >= t_end:
            break
        if rng.random() * max_rate > _rate_at(p, t - t_start):
            continue
        s = bisect.bisect(act_cum, rng.random() * act_cum[-1])
        s = min(s, n - 1)
        fl = friends[s]
        cum = zipf_cum[s]
        r = fl[min(bisect.bisect(cum, rng.random() * cum[-1]), len(fl) - 1)]
        size = max(1, min(p.size_max, int(rng.lognormvariate(mu, p.size_sigma))))
        read_draw = rng.random()
        delay = rng.lognormvariate(rmu, p.read_delay_sigma)
        typing_draw = rng.random()
        lead = rng.expovariate(1.0 / p.typing_lead) if p.typing_lead > 0 else 0.0
        if is_offline(s, t):
            continue  # nobody sends from a phone that is offline
        ev.append(TraceEvent(t, names[s], "send", names[r], size))
        if typing_draw < p.typing_prob and t - lead > t_start and t - last_typing[s] > 1.0:
            tt = t - lead
            if not is_offline(s, tt):
                ev.append(TraceEvent(tt, names[s], "typing", names[r], 1))
                last_typing[s] = t
        if read_draw < p.read_prob and t + delay < t_end and not is_offline(r, t + delay):
            ev.append(TraceEvent(t + delay, names[r], "read", names[s]))
    ev.sort(key=lambda e: e.t)
    meta = {"generator": "loadtest.generate", "params": p.to_json()}
    return Trace(ev, names, t_end, meta)
