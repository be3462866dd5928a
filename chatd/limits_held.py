"""What one node holds for the fleet limits: connections per user, and which users are
solo here (all their connections on this node: their rates are checked here alone, see
`limits`). Pure bookkeeping, no I/O and no clock: `limits_redis.RedisLimits` feeds it
the fleet's answers.

A connect's answer may be read after a SPREAD about the same user (Redis runs other
nodes' commands between ours, and the SPREAD comes on another connection): an answer
makes a user solo only if no spread of that user, or of everyone, came since its check
was queued. Epochs (a counter of spreads) tell.
"""

from __future__ import annotations

__all__ = ["Held"]


class Held:
    __slots__ = ("_all_spread_at", "_connecting", "_epoch", "_spread_at", "counts", "solo")

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        """Connections per user this node holds that were not refused."""
        self.solo: set[str] = set()
        """Users held here and nowhere else, as of their last connect or registration."""
        self._epoch = 0
        """Spreads so far."""
        self._spread_at: dict[str, int] = {}
        """The epoch of each user's last spread (users held here or being connected)."""
        self._all_spread_at = 0
        """The epoch of the last spread of everyone (and of the last registration)."""
        self._connecting: dict[str, int] = {}
        """Connect checks asked and not answered, per user."""

    def asking(self, user: str) -> int:
        """A connect check of `user` is asked: the epoch to give `answered`."""
        self._connecting[user] = self._connecting.get(user, 0) + 1
        return self._epoch

    def answered(self, user: str, counted: bool | None, others: int, epoch: int) -> None:
        """The fleet's answer to a connect asked at `epoch`: counted (with `others`
        other nodes holding the user), refused (False), or none (None: counted here)."""
        left = self._connecting.pop(user, 1) - 1
        if left:
            self._connecting[user] = left
        if counted is False:
            if not left and user not in self.counts:
                self._spread_at.pop(user, None)
            return
        self.held(user, counted is True and not others and not self._spread_since(user, epoch))

    def held(self, user: str, solo: bool = False) -> None:
        """One more connection of `user`, counted without asking (or as answered)."""
        self.counts[user] = self.counts.get(user, 0) + 1
        if solo:
            self.solo.add(user)
        else:
            self.solo.discard(user)

    def released(self, user: str) -> None:
        n = self.counts.get(user, 0) - 1
        if n > 0:
            self.counts[user] = n
            return
        self.counts.pop(user, None)
        if user not in self._connecting:
            self._spread_at.pop(user, None)
        self.solo.discard(user)

    def spread(self, user: str | None = None) -> None:
        """`user` (None: everyone) may have connections on other nodes now."""
        self._epoch += 1
        if user is None:
            self._all_spread_at = self._epoch
            self.solo.clear()
            return
        if user in self.counts or user in self._connecting:
            self._spread_at[user] = self._epoch
        self.solo.discard(user)

    def registering(self) -> tuple[list[tuple[str, int]], int]:
        """A registration starts: nobody is solo until it says so. The counts to
        register, and the epoch to give `registered`."""
        self.spread()
        return list(self.counts.items()), self._epoch

    def registered(self, user: str, others: int, epoch: int) -> None:
        """Registration found `others` other nodes holding `user`."""
        if not others and user in self.counts and not self._spread_since(user, epoch):
            self.solo.add(user)

    def _spread_since(self, user: str, epoch: int) -> bool:
        return max(self._all_spread_at, self._spread_at.get(user, 0)) > epoch
