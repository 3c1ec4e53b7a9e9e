"""Latency measurement, the service level objective, and server counters.

Theory of operation
-------------------
The transport (``server.py``) takes ``time.perf_counter_ns()`` when a read
arrives and again when the replies it produced are handed to the socket.
Every reply in between is one *observation*: a kind (the command's verb, or
``DATA-END`` for the end of message content, which includes the durable
write) and a latency in nanoseconds.  Observations go to three places:

* ``KindStats``: one histogram per kind with fine fixed buckets (a 1-1.5-2-
  3-5-7 series per decade, from 2 µs to 10 s).  Recording is a table
  lookup (a ``bisect`` past 10 ms) and a few integer additions, no lock:
  everything runs on the event loop thread, and the replies of one write
  are recorded in one call (``Metrics.record_batch``).  ``prometheus_client`` reads these at scrape time through a
  custom collector, so the hot path never touches its locks.
* ``SloWindow``: the share of valid commands answered within the threshold
  (default 1 ms) over fixed one-minute windows, plus a rolling view of the
  last minute in one-second slots.  When a window ends below the target
  (default 99 %), one warning line is logged with the figures.  The clock is
  the caller's: observations carry their own timestamp, and ``tick(now)``
  closes windows when no traffic arrives, so tests drive time by hand.
  ``Metrics`` does not feed it reply by reply: each histogram also counts
  its latencies over the threshold, and when a one-second slot ends (or
  before anyone reads the window) the commands and over-threshold counts
  recorded since the last feed go into the slot they were written in.
* ``SessionStats`` (only with ``--measure-performance``): exact per-session
  samples for the report logged at disconnect: count, mean, p50, p99 and
  max per kind.  Percentiles use the nearest-rank method on the samples.
  Past ``SAMPLE_CAP`` samples of one kind, reservoir sampling keeps a
  uniform sample (count, mean and max stay exact).

Commands that arrived while the session waited for the disk (pipelined
behind an end of data) are timed from when the session resumes: the wait
is already counted once, in ``DATA-END``.

"Valid commands" for the SLO are those with a known verb, whatever their
reply; unrecognised lines, the end of message content (disk time, not
command handling) and AUTH (a deliberately slow password hash) are measured
but not counted against the objective.
"""

from __future__ import annotations

import bisect
import logging
import math
import random
import time
from bisect import bisect_left as _bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger("simplesmtp.metrics")

NS_PER_SECOND = 1_000_000_000

# Kinds that are not commands of their own.
DATA_END = "DATA-END"  # end of content (DATA end mark or BDAT LAST) to reply
UNKNOWN = "UNKNOWN"  # unrecognised or over-long command lines
# AUTH waits for a deliberately slow password hash (and for the failure
# throttle): measured, but like the end of content not a command-handling
# figure.
NOT_SLO_KINDS = frozenset({DATA_END, UNKNOWN, "AUTH"})

# The original simpleSMTP's objective: 99 % of valid commands within 1 ms
# over one-minute windows.
DEFAULT_SLO_THRESHOLD = 0.001  # seconds
DEFAULT_SLO_TARGET = 0.99
SLO_WINDOW_SECONDS = 60
SLO_SLOTS = 60  # one-second slots of the rolling view


def _bucket_bounds_ns() -> tuple[int, ...]:
    steps = (1.0, 1.5, 2.0, 3.0, 5.0, 7.0)
    bounds = []
    for exp in range(-6, 2):  # 1 µs .. 70 s
        for step in steps:
            value = step * 10.0 ** exp
            if 2e-6 <= value <= 10.0 + 1e-9:
                bounds.append(round(value * NS_PER_SECOND))
    return tuple(bounds)


# Upper bounds (inclusive, as Prometheus ``le``) of the histogram buckets in
# nanoseconds; a last implicit bucket is +Inf.  100 µs and 1 ms are bounds,
# so the targets can be read off the histograms exactly.
BUCKETS_NS: tuple[int, ...] = _bucket_bounds_ns()

# The bucket of a latency under 10 ms by table lookup rather than bisection
# (it runs for every reply).  Every bound is a whole number of microseconds,
# so ``ns <= bound`` holds exactly when ``ceil(ns / 1000) <= bound / 1000``:
# the table maps that ceiling to the first bucket whose bound is not below it.
_TABLE_US = 10_000
_BUCKET_OF_US: list[int] = [bisect.bisect_left(BUCKETS_NS, us * 1000) for us in range(_TABLE_US)]
assert all(b % 1000 == 0 for b in BUCKETS_NS)


def bucket_index(ns: int) -> int:
    """Index in ``KindStats.counts`` of a latency of ``ns`` nanoseconds."""
    us = (ns + 999) // 1000
    return _BUCKET_OF_US[us] if 0 <= us < _TABLE_US else _bisect_left(BUCKETS_NS, ns)


class KindStats:
    """A cumulative histogram of one kind's latencies (event loop thread only)."""

    __slots__ = ("counts", "sum_ns", "by_code", "over")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS_NS) + 1)  # per bucket, not cumulative
        self.sum_ns = 0
        self.over = 0  # latencies above the SLO threshold (Metrics.record_batch)
        # Replies by code, indexed by the code (a list: cheaper than a dict
        # to count into, and reply codes are three digits).
        self.by_code = [0] * 1000

    @property
    def codes(self) -> dict[int, int]:
        """Reply code -> count, for the codes seen."""
        return {code: n for code, n in enumerate(self.by_code) if n}

    @property
    def count(self) -> int:
        return sum(self.counts)

    def observe(self, ns: int) -> None:
        self.counts[bucket_index(ns)] += 1
        self.sum_ns += ns

    def quantile(self, q: float) -> float:
        """Estimated ``q`` quantile in seconds (linear within a bucket)."""
        return histogram_quantile(q, [b / NS_PER_SECOND for b in BUCKETS_NS], self.counts)


def histogram_quantile(q: float, bounds: Sequence[float], counts: Sequence[float]) -> float:
    """Estimate a quantile from per-bucket (not cumulative) counts.

    ``counts`` has one entry per bound plus a last one for +Inf.  Like
    Prometheus' ``histogram_quantile``: linear interpolation inside the
    bucket holding the rank; the +Inf bucket answers its lower bound.
    Returns NaN for an empty histogram.
    """
    total = sum(counts)
    if total <= 0:
        return math.nan
    rank = q * total
    seen = 0.0
    for i, c in enumerate(counts):
        if c and seen + c >= rank:
            if i >= len(bounds):
                return bounds[-1] if bounds else math.nan
            lower = bounds[i - 1] if i > 0 else 0.0
            return lower + (bounds[i] - lower) * max(rank - seen, 0.0) / c
        seen += c
    return bounds[-1] if bounds else math.nan


def nearest_rank(sorted_values: Sequence[int], q: float) -> int:
    """The nearest-rank ``q`` quantile of non-empty sorted values."""
    n = len(sorted_values)
    rank = max(1, math.ceil(q * n))
    return sorted_values[min(rank, n) - 1]


# --- The SLO window ------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Verdict:
    """One closed one-minute window."""

    start_ns: int  # clock value where the window began
    commands: int
    within: int  # commands answered within the threshold
    target: float

    @property
    def ratio(self) -> float:
        return self.within / self.commands if self.commands else 1.0

    @property
    def met(self) -> bool:
        return self.ratio >= self.target


class SloWindow:
    """Share of commands within the threshold over one-minute windows.

    Windows are fixed (aligned on multiples of the window length of the
    caller's clock); ``last`` is the verdict of the latest closed window
    that saw traffic.  ``rolling(now)`` is the share over the last minute,
    from one-second slots, for a live view between window ends.

    ``observe`` is on the hot path: a comparison and two additions while
    the current one-second slot lasts; the bookkeeping runs once per slot.
    """

    def __init__(self, threshold_s: float = DEFAULT_SLO_THRESHOLD,
                 target: float = DEFAULT_SLO_TARGET, *,
                 window_s: int = SLO_WINDOW_SECONDS,
                 on_verdict: Callable[[Verdict], None] | None = None) -> None:
        if not 0 < target <= 1:
            raise ValueError("target must be in (0, 1]")
        self.threshold_ns = int(threshold_s * NS_PER_SECOND)
        self.target = target
        self.window_ns = int(window_s * NS_PER_SECOND)
        self.slot_ns = self.window_ns // SLO_SLOTS
        self.on_verdict = on_verdict
        self.last: Verdict | None = None
        self.windows_met = 0
        self.windows_missed = 0
        self._slot: int | None = None  # index of the current slot
        self._slot_end = 0  # clock value where the current slot ends
        self._cur_commands = 0  # counts of the current slot
        self._cur_within = 0
        self._window: int | None = None  # index of the open window
        self._commands = 0  # counts of the open window's finished slots
        self._within = 0
        self._slot_ids = [-1] * SLO_SLOTS  # finished slots, for ``rolling``
        self._slot_commands = [0] * SLO_SLOTS
        self._slot_within = [0] * SLO_SLOTS

    def observe(self, now_ns: int, latency_ns: int) -> None:
        if now_ns >= self._slot_end:
            self._advance(now_ns)
        self._cur_commands += 1
        if latency_ns <= self.threshold_ns:
            self._cur_within += 1

    def tick(self, now_ns: int) -> Verdict | None:
        """Close the open window if ``now_ns`` is past it; return its verdict."""
        if now_ns < self._slot_end or self._slot is None:
            return None
        before = self.last
        self._advance(now_ns)
        return self.last if self.last is not before else None

    def _advance(self, now_ns: int) -> None:
        """The current slot is over: file it, and close its window if over."""
        if self._slot is not None:
            i = self._slot % SLO_SLOTS
            self._slot_ids[i] = self._slot
            self._slot_commands[i] = self._cur_commands
            self._slot_within[i] = self._cur_within
            self._commands += self._cur_commands
            self._within += self._cur_within
        self._cur_commands = self._cur_within = 0
        slot = now_ns // self.slot_ns
        window = slot // SLO_SLOTS
        if window != self._window:
            self._roll(window)
        self._slot = slot
        self._slot_end = (slot + 1) * self.slot_ns

    def _roll(self, window: int) -> None:
        if self._window is not None and self._commands:
            verdict = Verdict(self._window * self.window_ns, self._commands,
                              self._within, self.target)
            self.last = verdict
            if verdict.met:
                self.windows_met += 1
            else:
                self.windows_missed += 1
            if self.on_verdict is not None:
                self.on_verdict(verdict)
        self._window = window
        self._commands = 0
        self._within = 0

    def rolling(self, now_ns: int) -> tuple[int, int]:
        """(commands, within threshold) over the last ``SLO_SLOTS`` slots."""
        newest = now_ns // self.slot_ns
        oldest = newest - SLO_SLOTS + 1
        commands = within = 0
        for i, sid in enumerate(self._slot_ids):
            if oldest <= sid <= newest and sid != self._slot:
                commands += self._slot_commands[i]
                within += self._slot_within[i]
        if self._slot is not None and oldest <= self._slot <= newest:
            commands += self._cur_commands
            within += self._cur_within
        return commands, within


def log_verdict(verdict: Verdict, threshold_ns: int) -> None:
    if not verdict.met:
        log.warning("event=slo_missed commands=%d within=%d ratio=%.4f target=%.4f"
                    " threshold_us=%d window_s=%d", verdict.commands, verdict.within,
                    verdict.ratio, verdict.target, threshold_ns // 1000,
                    SLO_WINDOW_SECONDS)


# --- Per-session statistics (--measure-performance) ----------------------------

SAMPLE_CAP = 10_000  # exact samples kept per kind and session


class _Samples:
    __slots__ = ("values", "count", "total", "max")

    def __init__(self) -> None:
        self.values: list[int] = []
        self.count = 0
        self.total = 0
        self.max = 0


@dataclass(frozen=True, slots=True)
class KindReport:
    kind: str
    count: int
    mean_us: float
    p50_us: float
    p99_us: float
    max_us: float


class SessionStats:
    """Latency samples of one session, for the report at disconnect."""

    __slots__ = ("_kinds", "_rng")

    def __init__(self, seed: int | None = None) -> None:
        self._kinds: dict[str, _Samples] = {}
        self._rng = random.Random(seed)

    def observe(self, kind: str, ns: int) -> None:
        s = self._kinds.get(kind)
        if s is None:
            s = self._kinds[kind] = _Samples()
        s.count += 1
        s.total += ns
        if ns > s.max:
            s.max = ns
        if len(s.values) < SAMPLE_CAP:
            s.values.append(ns)
        else:
            # Reservoir sampling (Algorithm R): each of the ``count`` samples
            # seen so far stays with probability SAMPLE_CAP / count.
            j = self._rng.randrange(s.count)
            if j < SAMPLE_CAP:
                s.values[j] = ns

    def report(self) -> list[KindReport]:
        out = []
        for kind, s in sorted(self._kinds.items()):
            values = sorted(s.values)
            out.append(KindReport(kind, s.count, s.total / s.count / 1000,
                                  nearest_rank(values, 0.50) / 1000,
                                  nearest_rank(values, 0.99) / 1000, s.max / 1000))
        return out

    def __bool__(self) -> bool:
        return bool(self._kinds)


def format_report(rows: Iterable[KindReport]) -> str:
    """One log-line fragment: ``EHLO=n:1,mean:12.3,p50:11.0,p99:20.1,max:20.1``."""
    return " ".join(f"{r.kind}=n:{r.count},mean:{r.mean_us:.1f},p50:{r.p50_us:.1f},"
                    f"p99:{r.p99_us:.1f},max:{r.max_us:.1f}" for r in rows)


# --- Server-wide metrics -------------------------------------------------------

# Enhanced status codes of a refused message, as the ``reason`` label.
_REJECT_REASONS = {
    "5.3.4": "too_big",
    "4.3.0": "storage_error",
    "4.3.1": "storage_full",
}


class Metrics:
    """Every counter and histogram of one server (event loop thread only)."""

    def __init__(self, *, slo_threshold: float = DEFAULT_SLO_THRESHOLD,
                 slo_target: float = DEFAULT_SLO_TARGET,
                 clock: Callable[[], int] = time.perf_counter_ns) -> None:
        self.clock = clock
        self.kinds: dict[str, KindStats] = {}
        self.sessions_open = 0
        self.sessions_total = 0
        self.bytes_received = 0
        self.messages_accepted = 0
        self.messages_rejected: dict[str, int] = {}
        self.tls_handshakes: dict[str, int] = {}  # result -> count
        self.auth_failures = 0
        self._slo = SloWindow(slo_threshold, slo_target,
                              on_verdict=lambda v: log_verdict(v, self._slo.threshold_ns))
        # The SLO window is fed from the histograms (commands, and those
        # over the threshold), not per reply: ``_feed_slo`` hands it what
        # was recorded since the last feed, before its slot changes and
        # before anyone reads it.
        self._slo_fed = (0, 0)  # commands and over-threshold counts fed so far

    @property
    def slo(self) -> SloWindow:
        """The SLO window, up to date with every reply recorded."""
        self._feed_slo()
        return self._slo

    def _feed_slo(self) -> None:
        commands = over = 0
        for kind, stats in self.kinds.items():
            if kind not in NOT_SLO_KINDS:
                commands += stats.count
                over += stats.over
        fed_commands, fed_over = self._slo_fed
        if commands != fed_commands:
            slo = self._slo
            new = commands - fed_commands
            slo._cur_commands += new
            slo._cur_within += new - (over - fed_over)
            self._slo_fed = (commands, over)

    def _next_slot(self, now_ns: int) -> None:
        """The window's slot is over: what was recorded in it goes in first."""
        self._feed_slo()
        self._slo._advance(now_ns)

    def kind(self, name: str) -> KindStats:
        stats = self.kinds.get(name)
        if stats is None:
            stats = self.kinds[name] = KindStats()
        return stats

    def record(self, kind: str, code: int, start_ns: int, end_ns: int,
               enhanced: str | None = None) -> int:
        """One reply handed to the transport; returns its latency in ns."""
        self.record_batch([(kind, code, enhanced, start_ns)], end_ns)
        return end_ns - start_ns

    def record_batch(self, timed: Iterable[tuple[str, int, str | None, int]], end_ns: int,
                     session: SessionStats | None = None) -> None:
        """Replies handed to the transport together at ``end_ns``: each is
        (kind, code, enhanced code, start_ns).  ``session`` also gets them
        (``--measure-performance``).

        This runs for every reply, so ``KindStats.observe`` is written out
        here rather than called, and the SLO window is fed from the
        histograms once per second (``_feed_slo``), not per reply.
        """
        slo = self._slo
        if end_ns >= slo._slot_end:
            self._next_slot(end_ns)
        kinds = self.kinds
        threshold = slo.threshold_ns
        for kind, code, enhanced, start_ns in timed:
            ns = end_ns - start_ns
            stats = kinds.get(kind)
            if stats is None:
                stats = kinds[kind] = KindStats()
            us = (ns + 999) // 1000  # bucket_index(ns), written out
            stats.counts[_BUCKET_OF_US[us] if 0 <= us < _TABLE_US
                         else _bisect_left(BUCKETS_NS, ns)] += 1
            stats.sum_ns += ns
            stats.by_code[code] += 1
            if ns > threshold:
                stats.over += 1
            if kind == DATA_END:
                if code < 400:
                    self.messages_accepted += 1
                else:
                    reason = _REJECT_REASONS.get(enhanced or "", f"code_{code}")
                    self.messages_rejected[reason] = self.messages_rejected.get(reason, 0) + 1
            if session is not None:
                session.observe(kind, ns)

    @property
    def commands(self) -> dict[tuple[str, str], int]:
        """Replies by (verb, class): the end of content counts as DATA."""
        out: dict[tuple[str, str], int] = {}
        for kind, stats in self.kinds.items():
            verb = "DATA" if kind == DATA_END else kind
            for code, n in stats.codes.items():
                key = (verb, _CLASSES.get(code // 100, "other"))
                out[key] = out.get(key, 0) + n
        return out

    def tick(self) -> Verdict | None:
        """Close the SLO window if its minute is over (called periodically)."""
        return self.slo.tick(self.clock())  # the property feeds it first

    def tls_handshake(self, result: str) -> None:
        """Count a TLS handshake: ``ok`` or a short failure reason."""
        self.tls_handshakes[result] = self.tls_handshakes.get(result, 0) + 1

    def auth_failure(self) -> None:
        self.auth_failures += 1

    # --- Prometheus exposition ---------------------------------------------

    def registry(self) -> CollectorRegistry:
        """A ``prometheus_client`` registry that reads this object when scraped."""
        from prometheus_client import CollectorRegistry

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self))  # type: ignore[arg-type]
        return registry


_CLASSES = {2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}


class _Collector:
    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[object]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        m = self.m
        yield GaugeMetricFamily("simplesmtp_sessions_open", "SMTP sessions now open",
                                value=m.sessions_open)
        yield CounterMetricFamily("simplesmtp_sessions", "SMTP sessions accepted",
                                  value=m.sessions_total)
        yield CounterMetricFamily("simplesmtp_received_bytes", "bytes read from clients",
                                  value=m.bytes_received)
        commands = CounterMetricFamily("simplesmtp_commands", "replies by verb and class",
                                       labels=["verb", "class"])
        for (verb, cls), n in sorted(m.commands.items()):
            commands.add_metric([verb, cls], n)
        yield commands
        yield CounterMetricFamily("simplesmtp_messages_accepted",
                                  "messages stored durably and acknowledged",
                                  value=m.messages_accepted)
        rejected = CounterMetricFamily("simplesmtp_messages_rejected",
                                       "messages refused at the end of content",
                                       labels=["reason"])
        for reason, n in sorted(m.messages_rejected.items()):
            rejected.add_metric([reason], n)
        yield rejected
        tls = CounterMetricFamily("simplesmtp_tls_handshakes", "TLS handshakes by result",
                                  labels=["result"])
        for result, n in sorted(m.tls_handshakes.items()):
            tls.add_metric([result], n)
        yield tls
        yield CounterMetricFamily("simplesmtp_auth_failures", "failed AUTH attempts",
                                  value=m.auth_failures)

        hist = HistogramMetricFamily(
            "simplesmtp_command_duration_seconds",
            "inside-server latency: complete command line (or end of content) received"
            " to reply handed to the transport", labels=["kind"])
        bounds = [_le(b) for b in BUCKETS_NS] + ["+Inf"]
        for kind, stats in sorted(m.kinds.items()):
            cumulative, running = [], 0
            for le, c in zip(bounds, stats.counts, strict=True):
                running += c
                cumulative.append((le, running))
            hist.add_metric([kind], cumulative, sum_value=stats.sum_ns / NS_PER_SECOND)
        yield hist

        slo = m.slo
        yield GaugeMetricFamily("simplesmtp_slo_threshold_seconds",
                                "a command within this latency meets the objective",
                                value=slo.threshold_ns / NS_PER_SECOND)
        yield GaugeMetricFamily("simplesmtp_slo_target_ratio",
                                "share of commands that must meet the threshold",
                                value=slo.target)
        last = slo.last
        yield GaugeMetricFamily("simplesmtp_slo_window_ratio",
                                "share within the threshold in the last closed window"
                                " (NaN before the first)",
                                value=last.ratio if last else math.nan)
        yield GaugeMetricFamily("simplesmtp_slo_window_commands",
                                "commands in the last closed window",
                                value=last.commands if last else 0)
        commands_1m, within_1m = slo.rolling(m.clock())
        yield GaugeMetricFamily("simplesmtp_slo_rolling_commands",
                                "commands in the last 60 seconds", value=commands_1m)
        yield GaugeMetricFamily("simplesmtp_slo_rolling_within",
                                "of those, answered within the threshold", value=within_1m)
        windows = CounterMetricFamily("simplesmtp_slo_windows", "closed windows by verdict",
                                      labels=["verdict"])
        windows.add_metric(["met"], slo.windows_met)
        windows.add_metric(["missed"], slo.windows_missed)
        yield windows


def _le(ns: int) -> str:
    return repr(ns / NS_PER_SECOND)


# --- Reading the exposition back (``simplesmtp stats``) ------------------------

def _cdf_at(bounds: Sequence[float], counts: Sequence[float], x: float) -> float:
    """Share of observations at or below ``x`` (linear within a bucket)."""
    total = sum(counts)
    if total <= 0:
        return math.nan
    below = 0.0
    lower = 0.0
    for i, c in enumerate(counts):
        upper = bounds[i] if i < len(bounds) else math.inf
        if x >= upper:
            below += c
        else:
            if upper != math.inf and x > lower:
                below += c * (x - lower) / (upper - lower)
            break
        lower = upper
    return below / total


def format_stats(exposition: str) -> str:
    """A readable SLO and latency table from ``/metrics`` text."""
    from prometheus_client.parser import text_string_to_metric_families

    scalars: dict[str, float] = {}
    hist: dict[str, dict[str, Any]] = {}
    commands: dict[str, float] = {}
    rejected = 0.0
    for family in text_string_to_metric_families(exposition):
        for s in family.samples:
            name, labels, value = s.name, s.labels, s.value
            if name.startswith("simplesmtp_command_duration_seconds"):
                h = hist.setdefault(labels.get("kind", "?"), {"buckets": [], "sum": 0.0,
                                                              "count": 0.0})
                if name.endswith("_bucket"):
                    h["buckets"].append((float(labels["le"]), value))
                elif name.endswith("_sum"):
                    h["sum"] = value
                elif name.endswith("_count"):
                    h["count"] = value
            elif name == "simplesmtp_commands_total":
                commands[labels["class"]] = commands.get(labels["class"], 0.0) + value
            elif name == "simplesmtp_messages_rejected_total":
                rejected += value
            elif not labels:
                scalars[name] = value
            elif name == "simplesmtp_slo_windows_total":
                scalars[f"windows_{labels.get('verdict')}"] = value
    threshold = scalars.get("simplesmtp_slo_threshold_seconds", DEFAULT_SLO_THRESHOLD)
    target = scalars.get("simplesmtp_slo_target_ratio", DEFAULT_SLO_TARGET)
    lines = [
        f"objective: {target:.2%} of commands within {threshold * 1e3:g} ms, per minute",
    ]
    ratio = scalars.get("simplesmtp_slo_window_ratio", math.nan)
    if math.isnan(ratio):
        lines.append("last window: none closed yet")
    else:
        verdict = "met" if ratio >= target else "MISSED"
        lines.append(f"last window: {int(scalars.get('simplesmtp_slo_window_commands', 0))}"
                     f" commands, {ratio:.3%} within: {verdict}"
                     f" (windows met {int(scalars.get('windows_met', 0))},"
                     f" missed {int(scalars.get('windows_missed', 0))})")
    n1 = scalars.get("simplesmtp_slo_rolling_commands", 0.0)
    w1 = scalars.get("simplesmtp_slo_rolling_within", 0.0)
    lines.append(f"last 60 s: {int(n1)} commands"
                 + (f", {w1 / n1:.3%} within" if n1 else ""))
    lines.append(
        f"sessions: {int(scalars.get('simplesmtp_sessions_open', 0))} open,"
        f" {int(scalars.get('simplesmtp_sessions_total', 0))} total;"
        f" messages: {int(scalars.get('simplesmtp_messages_accepted_total', 0))} accepted,"
        f" {int(rejected)} rejected; received"
        f" {int(scalars.get('simplesmtp_received_bytes_total', 0))} bytes")
    lines.append("")
    header = (f"{'kind':<10} {'count':>10} {'mean_us':>9} {'p50_us':>9} {'p99_us':>9}"
              f" {'within':>8}")
    lines.append(header)
    lines.append("-" * len(header))
    for kind in sorted(hist):
        h = hist[kind]
        buckets = sorted(h["buckets"])
        bounds = [b for b, _ in buckets if b != math.inf]
        per_bucket, prev = [], 0.0
        for _, cum in buckets:
            per_bucket.append(cum - prev)
            prev = cum
        count = h["count"]
        if not count:
            continue
        mean = h["sum"] / count * 1e6
        p50 = histogram_quantile(0.50, bounds, per_bucket) * 1e6
        p99 = histogram_quantile(0.99, bounds, per_bucket) * 1e6
        within = _cdf_at(bounds, per_bucket, threshold)
        lines.append(f"{kind:<10} {int(count):>10} {mean:>9.1f} {p50:>9.1f} {p99:>9.1f}"
                     f" {within:>8.2%}")
    lines.append("(percentiles estimated from histogram buckets)")
    return "\n".join(lines)
