"""The benchmark driver: ``python -m bench [--quick] [--out DIR]``.

What it does
------------
1. Starts every server under test (``servers.py``) on 127.0.0.1: Postfix's
   ``smtp-sink`` (C, discards: the practical upper limit), aiosmtpd with a
   discarding handler and with a Maildir+fsync handler (``peers.py``), and
   simplesmtp with ``--storage null`` and ``--storage maildir``.
2. Throughput: Postfix's ``smtp-source`` sends messages (``-d``: several
   messages per connection, so the run measures SMTP and storage rather
   than TCP set-up and the ephemeral port range) in each scenario, 1 and 20
   parallel sessions, 1 KB and 100 KB.  Rounds are interleaved (every
   server runs each scenario once per round, in a rotating order), so
   machine drift hits all servers alike; the median of the rounds is
   reported.  Each run is sized by a short pilot to last about
   ``--seconds`` and is bounded by a timeout.  Delivered messages stay on
   disk until the end: deleting them between runs frees inodes, and ext4's
   inode allocator then scans past recently deleted ones, which slows every
   later Maildir delivery (an artifact of the benchmark, not of a server).  CPU time per message is the
   server process's user+system time (``/proc/<pid>/stat``) over the run.
3. Latency: the probe (``probe.py``) times each command of sequential
   sessions against each server, on an otherwise idle set of servers.  For
   simplesmtp, the inside-server figures (line received to reply handed to
   the transport) are read from its ``/metrics`` histograms before and
   after the probe.
4. Writes ``results.md`` (tables, ratios against smtp-sink, the targets of
   issue 5), ``results.json`` (raw figures) and ``chart.png`` into ``--out``.

``--quick`` runs simplesmtp only with a few hundred messages: proof that
the benchmark works, not a measurement (CI runs it through a test).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from .probe import COMMANDS, run_probe
from .servers import ALL_SERVERS, REPO, RunningServer

SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
KB = 1024
SCENARIOS: tuple[tuple[int, int], ...] = ((1, KB), (20, KB), (1, 100 * KB), (20, 100 * KB))
RUN_TIMEOUT = 120.0  # seconds any one smtp-source run may take
MAX_MESSAGES = 200_000  # upper bound of one run, whatever the pilot says
QUICK_SERVERS = ("simplesmtp-null", "simplesmtp-maildir")


def scenario_name(sessions: int, size: int) -> str:
    return f"{sessions}x{size // KB}KB"


class Progress:
    """A one-line progress bar on stderr (a line per step when not a tty)."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.started = time.monotonic()

    def step(self, label: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        width = 30
        filled = int(width * self.done / self.total)
        bar = "#" * filled + "-" * (width - filled)
        elapsed = time.monotonic() - self.started
        line = f"[{bar}] {self.done}/{self.total} {elapsed:5.0f}s {label}"
        if self.tty:
            sys.stderr.write("\r" + line[:120].ljust(120))
            if self.done >= self.total:
                sys.stderr.write("\n")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def run_load(server: RunningServer, sessions: int, size: int, messages: int) -> dict[str, float]:
    """One smtp-source run; messages per second and server CPU per message."""
    cmd = [SMTP_SOURCE, "-d", "-s", str(sessions), "-m", str(messages), "-l", str(size),
           "-M", "source.bench", "-f", "load@source.bench", "-t", "sink@bench.test",
           f"127.0.0.1:{server.port}"]
    cpu0 = server.cpu()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, timeout=RUN_TIMEOUT)
    elapsed = time.perf_counter() - t0
    cpu = server.cpu() - cpu0
    if proc.returncode != 0:
        raise RuntimeError(f"smtp-source against {server.spec.name} failed:"
                           f" {proc.stderr.decode(errors='replace')[-300:]}")
    return {"messages": messages, "seconds": elapsed, "rate": messages / elapsed,
            "cpu_us_per_msg": cpu / messages * 1e6}


def sized_run(server: RunningServer, sessions: int, size: int, seconds: float,
              fixed: int | None) -> dict[str, float]:
    if fixed is not None:
        return run_load(server, sessions, size, fixed)
    pilot = run_load(server, sessions, size, max(sessions * 4, 40))
    n = int(pilot["rate"] * seconds)
    n = max(sessions * 10, min(n, MAX_MESSAGES))
    return run_load(server, sessions, size, n)


def scrape(server: RunningServer) -> dict[str, list[tuple[float, float]]]:
    """Cumulative latency buckets per kind from a simplesmtp's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    out: dict[str, list[tuple[float, float]]] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name != "simplesmtp_command_duration_seconds":
            continue
        for s in fam.samples:
            if s.name.endswith("_bucket"):
                out.setdefault(s.labels["kind"], []).append((float(s.labels["le"]), s.value))
    for v in out.values():
        v.sort()
    return out


def inside_percentiles(before: dict[str, list[tuple[float, float]]],
                       after: dict[str, list[tuple[float, float]]]) -> dict[str, dict[str, float]]:
    from simplesmtp.metrics import histogram_quantile

    out = {}
    for kind, buckets in after.items():
        prev = dict(before.get(kind, []))
        cum = [(le, c - prev.get(le, 0.0)) for le, c in buckets]
        per, last = [], 0.0
        for _, c in cum:
            per.append(c - last)
            last = c
        total = cum[-1][1] if cum else 0
        if total <= 0:
            continue
        bounds = [le for le, _ in cum if le != float("inf")]
        out[kind] = {"count": total,
                     "p50_us": histogram_quantile(0.50, bounds, per) * 1e6,
                     "p99_us": histogram_quantile(0.99, bounds, per) * 1e6}
    return out


def percentile(values: list[int], q: float) -> float:
    from simplesmtp.metrics import nearest_rank

    return nearest_rank(sorted(values), q) / 1000 if values else float("nan")


def measurement_cost_ns(n: int = 100_000, repeat: int = 5) -> float:
    """Cost of one latency observation as the session makes it: the entry
    noted with the reply and ``Metrics.record_batch`` when it is written.
    The clock reads are not counted: the session reads the clock once per
    read and once per write for its timeouts, and the latencies reuse those
    readings.  The best of ``repeat`` runs: other work on the machine only
    ever adds to it."""
    from simplesmtp.metrics import Metrics

    m = Metrics(clock=lambda: 0)
    clock = time.perf_counter_ns
    timed: list[tuple[str, int, str | None, int]] = []
    start_ns, end_ns = clock(), clock()
    best = float("inf")
    for _ in range(repeat):
        start = clock()
        for _ in range(n):
            timed.append(("RCPT", 250, "2.1.5", start_ns))
            m.record_batch(timed, end_ns)
            timed.clear()
        best = min(best, (clock() - start) / n)
    return best


def conditions() -> dict[str, Any]:
    model = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                capture_output=True, timeout=10).stdout.decode().strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=REPO,
                               capture_output=True, timeout=10).stdout.strip()
        if commit and dirty:
            commit += " with uncommitted changes in src/"
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "commit": commit or "?",
            "cpus": os.cpu_count(), "cpu_model": model,
            "kernel": platform.release(), "python": platform.python_version(),
            "loadavg_start": os.getloadavg()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="simplesmtp only, a few hundred messages (what CI runs)")
    p.add_argument("--out", default=None, help="directory for results.md, results.json,"
                   " chart.png [default: bench/results, or bench/results/quick]")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds [5; quick 1]")
    p.add_argument("--seconds", type=float, default=3.0, help="target length of a run")
    p.add_argument("--servers", default=None,
                   help="comma-separated subset of: " + ", ".join(s.name for s in ALL_SERVERS))
    p.add_argument("--no-chart", action="store_true", help="skip the PNG chart")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    if args.servers:
        wanted = args.servers.split(",")
        specs = [s for s in ALL_SERVERS if s.name in wanted]
        if len(specs) != len(wanted):
            p.error(f"unknown server in {args.servers}")
    elif args.quick:
        specs = [s for s in ALL_SERVERS if s.name in QUICK_SERVERS]
    else:
        specs = list(ALL_SERVERS)
    rounds = args.rounds or (1 if args.quick else 5)
    scenarios = ((1, KB), (20, KB)) if args.quick else SCENARIOS
    fixed = 200 if args.quick else None
    probe_sessions, probe_txns = (1, 20) if args.quick else (3, 100)
    out = Path(args.out) if args.out else REPO / "bench" / "results" / (
        "quick" if args.quick else "")
    # Maildir runs need a real disk (fsync); the servers work under ``out``,
    # so do not point it at a tmpfs.
    out.mkdir(parents=True, exist_ok=True)

    info = conditions()
    info["mode"] = "quick" if args.quick else "full"
    total = len(specs) + rounds * len(scenarios) * len(specs) + rounds * len(specs)
    progress = Progress(total, enabled=not args.quiet)
    loads: dict[str, dict[str, list[dict[str, float]]]] = {s.name: {} for s in specs}
    probes: dict[str, dict[str, list[int]]] = {s.name: {k: [] for k in COMMANDS} for s in specs}
    inside: dict[str, dict[str, dict[str, float]]] = {}
    running: dict[str, RunningServer] = {}
    with tempfile.TemporaryDirectory(prefix="work-", dir=out) as work:
        try:
            for spec in specs:
                running[spec.name] = RunningServer(spec, Path(work))
                progress.step(f"started {spec.name}")
            # Throughput, interleaved.
            for r in range(rounds):
                for sessions, size in scenarios:
                    k = r % len(specs)
                    for spec in specs[k:] + specs[:k]:
                        srv = running[spec.name]
                        res = sized_run(srv, sessions, size, args.seconds, fixed)
                        loads[spec.name].setdefault(scenario_name(sessions, size), []).append(res)
                        progress.step(f"{spec.name} {scenario_name(sessions, size)}"
                                      f" {res['rate']:.0f} msg/s")
            # Latency, on servers that are otherwise idle now.
            before = {n: scrape(s) for n, s in running.items() if s.metrics_port}
            for r in range(rounds):
                k = r % len(specs)
                for spec in specs[k:] + specs[:k]:
                    res = run_probe(running[spec.name].port, sessions=probe_sessions,
                                    transactions=probe_txns,
                                    deadline=time.monotonic() + RUN_TIMEOUT)
                    for kind, values in res.items():
                        probes[spec.name][kind].extend(values)
                    progress.step(f"probe {spec.name}")
            for n, s in running.items():
                if s.metrics_port:
                    inside[n] = inside_percentiles(before[n], scrape(s))
        finally:
            for srv in running.values():
                srv.stop()
    info["loadavg_end"] = os.getloadavg()
    cost = measurement_cost_ns()

    from .report import summarise, write_chart, write_markdown

    summary = summarise(specs, loads, probes, inside, cost, info)
    (out / "results.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    md = write_markdown(summary)
    (out / "results.md").write_text(md)
    if not args.no_chart:
        write_chart(summary, probes, out / "chart.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
