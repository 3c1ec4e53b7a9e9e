"""What a TLS session costs, and whether handshakes stall other sessions.

    python -m bench.tls_cost [--sessions N] [--key-type ec|rsa] [--out DIR]

One simplesmtp (``--storage null``) with a certificate from ``gencert``,
on 127.0.0.1.  Three kinds of session, each N times in a row: plain,
STARTTLS and implicit TLS (``--tls-port``); each session is connect,
EHLO, MAIL, RCPT, DATA with a 1 KB message, QUIT.  Reported per kind: wall
time per session as the client sees it, and server CPU per session (from
/proc), so the TLS share is the difference to plain.

Then the stall check: a plain client times NOOPs on an idle server, while
four client processes run plain sessions back to back, and while they run
implicit-TLS sessions.  What TLS adds over the plain load is the stall that
handshakes cause to other sessions.

Writes ``tls.md`` into ``--out`` (default bench/results).
"""

from __future__ import annotations

import argparse
import multiprocessing
import smtplib
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .servers import cpu_seconds, free_port, wait_greeting

MESSAGE = b"Subject: tls cost\r\n\r\n" + (b"x" * 76 + b"\r\n") * 13


def _session(kind: str, port: int, tls_port: int, ctx: ssl.SSLContext) -> None:
    if kind == "implicit TLS":
        client: smtplib.SMTP = smtplib.SMTP_SSL("127.0.0.1", tls_port, context=ctx,
                                                timeout=10)
    else:
        client = smtplib.SMTP("127.0.0.1", port, timeout=10)
    with client:
        client.ehlo("bench.test")
        if kind == "STARTTLS":
            client.starttls(context=ctx)
            client.ehlo("bench.test")
        client.sendmail("a@bench.test", ["b@bench.test"], MESSAGE)


def _noop_p99(port: int, n: int) -> float:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
        c.ehlo("probe.test")
        times = []
        for _ in range(n):
            t0 = time.perf_counter_ns()
            c.noop()
            times.append(time.perf_counter_ns() - t0)
    times.sort()
    return times[int(0.99 * (len(times) - 1))] / 1000


def _storm(kind: str, port: int, tls_port: int, cafile: str, seconds: float) -> None:
    ctx = ssl.create_default_context(cafile=cafile)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        _session(kind, port, tls_port, ctx)


def _noop_under_storm(kind: str, port: int, tls_port: int, work: Path) -> float:
    """NOOP p99 while 4 client processes run ``kind`` sessions back to back.

    Processes, not threads: client-side TLS in this process would hold the
    GIL and slow the probe itself."""
    cafile = str(work / "certs/server.crt")
    procs = [multiprocessing.Process(target=_storm, args=(kind, port, tls_port, cafile, 8.0))
             for _ in range(4)]
    for p in procs:
        p.start()
    try:
        time.sleep(0.5)
        return _noop_p99(port, 2000)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tls_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=200, help="sessions per kind [200]")
    parser.add_argument("--key-type", choices=("ec", "rsa"), default="ec")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    n = max(1, min(args.sessions, 5000))

    with tempfile.TemporaryDirectory(prefix="tls-bench-") as tmp:
        work = Path(tmp)
        subprocess.run([sys.executable, "-m", "simplesmtp", "gencert", "--out-dir",
                        str(work / "certs"), "--hostname", "localhost", "--key-type",
                        args.key_type], check=True, capture_output=True)
        port, tls_port = free_port(), free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "simplesmtp", "serve", "--host", "127.0.0.1",
             "--port", str(port), "--tls-port", str(tls_port), "--storage", "null",
             "--hostname", "localhost", "--max-connections-per-ip", "0",
             "--tls-cert", str(work / "certs/server.crt"),
             "--tls-key", str(work / "certs/server.key"), "--log-level", "WARNING"],
            cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_greeting(port)
            ctx = ssl.create_default_context(cafile=str(work / "certs/server.crt"))
            rows = []
            for kind in ("plain", "STARTTLS", "implicit TLS"):
                _session(kind, port, tls_port, ctx)  # warm up
                cpu0, t0 = cpu_seconds(proc.pid), time.perf_counter()
                for _ in range(n):
                    _session(kind, port, tls_port, ctx)
                wall = (time.perf_counter() - t0) / n * 1000
                cpu = (cpu_seconds(proc.pid) - cpu0) / n * 1000
                rows.append((kind, wall, cpu))
                print(f"{kind:13} {wall:6.2f} ms/session wall, {cpu:6.2f} ms server CPU",
                      flush=True)
            idle = _noop_p99(port, 2000)
            loaded = {kind: _noop_under_storm(kind, port, tls_port, work)
                      for kind in ("plain", "implicit TLS")}
            print(f"NOOP p99 round trip: idle {idle:.0f} us, during plain sessions"
                  f" {loaded['plain']:.0f} us, during TLS sessions"
                  f" {loaded['implicit TLS']:.0f} us")
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    plain_cpu = rows[0][2]
    lines = [
        "# What a TLS session costs",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with"
        f" `python -m bench.tls_cost --sessions {n} --key-type {args.key_type}`:"
        " sequential sessions (EHLO, one 1 KB message, QUIT), simplesmtp"
        " `--storage null`, certificate from `simplesmtp gencert`.",
        "",
        "| session | wall time per session (ms) | server CPU per session (ms) |"
        " TLS share of server CPU (ms) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for kind, wall, cpu in rows:
        extra = "" if kind == "plain" else f"{cpu - plain_cpu:.2f}"
        lines.append(f"| {kind} | {wall:.2f} | {cpu:.2f} | {extra} |")
    lines += [
        "",
        "NOOP round trip p99 of another, plain session (microseconds): the"
        " difference between the last two columns is what handshakes add"
        " beyond the load of the sessions themselves.",
        "",
        "| idle server | during plain sessions | during implicit-TLS sessions |",
        "| ---: | ---: | ---: |",
        f"| {idle:.0f} | {loaded['plain']:.0f} | {loaded['implicit TLS']:.0f} |",
        "",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tls.md").write_text("\n".join(lines))
    print(f"wrote {args.out / 'tls.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
