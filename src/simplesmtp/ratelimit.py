"""Failed-AUTH tracking per client address: guessing passwords must not pay.

Each failed authentication (wrong credentials, not a syntax error or a
cancel) is recorded against the client's IP address.  The transport then

* delays the 535 reply by ``delay_for`` the failures so far in the window:
  ``base_delay * 2**(n-1)``, capped at ``max_delay`` (a growing delay, as
  Dovecot's auth_failure_delay does with a fixed one), with reading paused,
  so that one connection cannot try faster than that;
* once ``max_failures`` failures fall inside ``window`` seconds, refuses AUTH
  from that address with 454 4.7.0 for ``lockout`` seconds, whatever the
  credentials (fail2ban's defaults are 5 failures in 10 minutes);
* counts the attempts in flight (``begin``/``end``) against that budget, so
  that an address never gets more than ``max_failures`` guesses evaluated,
  however many connections it opens at once.

A success clears the address's failures.  The clock is injected, so tests
advance time instead of sleeping.  Memory is bounded: at most
``max_tracked`` addresses are kept, the stalest dropped first.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

# Enough for a busy server; an attacker with more addresses than this
# gains nothing, since every address still pays the delay on its own.
MAX_TRACKED = 65536


@dataclass(slots=True)
class _Record:
    failures: list[float] = field(default_factory=list)  # times, oldest first
    locked_until: float = 0.0


class AuthThrottle:
    def __init__(self, *, max_failures: int = 5, window: float = 600.0,
                 lockout: float = 900.0, base_delay: float = 1.0, max_delay: float = 16.0,
                 clock: Callable[[], float] = time.monotonic,
                 max_tracked: int = MAX_TRACKED) -> None:
        if max_failures < 1:
            raise ValueError("max_failures must be at least 1")
        self.max_failures = max_failures
        self.window = window
        self.lockout = lockout
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.clock = clock
        self.max_tracked = max_tracked
        self._records: OrderedDict[str, _Record] = OrderedDict()
        # Exchanges checking credentials right now, per address.  They count
        # against the budget before their outcome is known: otherwise many
        # parallel connections could all guess before the first failure is
        # recorded.  Bounded by the open sessions (one attempt each).
        self._pending: dict[str, int] = {}

    def _prune(self, record: _Record, now: float) -> None:
        horizon = now - self.window
        failures = record.failures
        while failures and failures[0] <= horizon:
            failures.pop(0)

    def locked_for(self, address: str) -> float:
        """Seconds the address stays locked out (0.0: it may try)."""
        record = self._records.get(address)
        if record is None:
            return 0.0
        return max(0.0, record.locked_until - self.clock())

    def begin(self, address: str) -> bool:
        """Reserve one attempt for an exchange about to check credentials.

        False (refuse with 454, do not evaluate) when the address is locked
        out or its failures in the window plus the attempts in flight
        already reach ``max_failures``.  Each True needs one ``end``.
        """
        if self.locked_for(address) > 0:
            return False
        pending = self._pending.get(address, 0)
        if self.failures(address) + pending >= self.max_failures:
            return False
        self._pending[address] = pending + 1
        return True

    def end(self, address: str) -> None:
        """The attempt reserved by ``begin`` is over (call before
        ``failure``/``success``, or alone when it ended without a verdict)."""
        pending = self._pending.get(address, 0) - 1
        if pending > 0:
            self._pending[address] = pending
        else:
            self._pending.pop(address, None)

    def failure(self, address: str) -> float:
        """Record a failure; return how long to delay the reply."""
        now = self.clock()
        record = self._records.pop(address, None) or _Record()
        self._records[address] = record  # most recently used last
        self._prune(record, now)
        record.failures.append(now)
        count = len(record.failures)
        if count >= self.max_failures:
            record.locked_until = now + self.lockout
            record.failures.clear()
        while len(self._records) > self.max_tracked:
            self._records.popitem(last=False)
        return min(self.max_delay, self.base_delay * 2.0 ** (count - 1))

    def failures(self, address: str) -> int:
        record = self._records.get(address)
        if record is None:
            return 0
        self._prune(record, self.clock())
        return len(record.failures)

    def success(self, address: str) -> None:
        record = self._records.get(address)
        if record is not None and record.locked_until <= self.clock():
            del self._records[address]
