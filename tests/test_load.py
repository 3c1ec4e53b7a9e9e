"""1000 concurrent sessions (issue 6): all complete, memory stays bounded.

The server runs as a child process (``python -m simplesmtp serve``, Maildir
in ``tmp_path``) so that its memory can be read from ``/proc``.  1000
clients connect, all wait until every one of them has its greeting (so the
sessions really are open at the same time), then each delivers one message
and quits.  The server's peak resident memory (``VmHWM``) is recorded in
``load-peak.txt`` under the pytest base temp directory and printed with
``-s``; docs/security.md quotes the figure.

A second test sends rounds of abusive sessions and checks that the server's
memory does not grow from round to round (a leak would).
"""

from __future__ import annotations

import asyncio
import resource
import time
from pathlib import Path

import pytest
from conftest import all_delivered, split_trace

SESSIONS = 1000
WALL_LIMIT = 60.0  # the whole exchange, seconds
# Bounds for the server's memory: a session costs a few KiB (engine, buffers,
# transport); a leak or an unbounded buffer shows as far more.
PEAK_LIMIT_MB = 150
PER_SESSION_LIMIT_KB = 64


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{key} not in /proc/{pid}/status")


def _raise_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"file descriptor limit {hard} is below {need}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


async def _session(port: int, n: int, all_open: asyncio.Event, opened: list[int],
                   results: list[str]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        async def reply() -> bytes:
            while True:
                line = await reader.readline()
                if not line:
                    raise ConnectionError("closed")
                if line[3:4] != b"-":
                    return line

        assert (await reply()).startswith(b"220 ")
        opened[0] += 1
        if opened[0] == SESSIONS:
            all_open.set()
        await all_open.wait()
        for cmd, code in ((b"EHLO load.client", b"250"), (b"MAIL FROM:<load@client.example>", b"250"),
                          (f"RCPT TO:<user{n % 50}@load.example>".encode(), b"250"),
                          (b"DATA", b"354")):
            writer.write(cmd + b"\r\n")
            line = await reply()
            assert line.startswith(code), (cmd, line)
        writer.write(b"Subject: load %d\r\nX-Load-Id: %d\r\n\r\n" % (n, n)
                     + b"some text for the body\r\n" * 40 + b".\r\n")
        line = await reply()
        assert line.startswith(b"250 "), line
        writer.write(b"QUIT\r\n")
        assert (await reply()).startswith(b"221 ")
        results.append("ok")
    except Exception as exc:  # recorded, so one failure names itself
        results.append(f"session {n}: {exc!r}")
    finally:
        writer.close()


async def _run_all(port: int, pid: int) -> tuple[list[str], int]:
    all_open = asyncio.Event()
    opened = [0]
    results: list[str] = []
    peak_open_rss = 0

    async def sample() -> None:
        nonlocal peak_open_rss
        await all_open.wait()
        peak_open_rss = _status_kb(pid, "VmRSS")

    sampler = asyncio.create_task(sample())
    sessions = [asyncio.create_task(_session(port, n, all_open, opened, results))
                for n in range(SESSIONS)]
    await asyncio.wait_for(asyncio.gather(*sessions, return_exceptions=True), WALL_LIMIT)
    sampler.cancel()
    return results, peak_open_rss


def test_1000_concurrent_sessions(spawn_server, tmp_path, tmp_path_factory):
    _raise_fd_limit(4 * SESSIONS)
    proc = spawn_server("--max-connections", str(SESSIONS), "--max-connections-per-ip", "0")
    port = proc.port
    baseline = _status_kb(proc.proc.pid, "VmRSS")
    start = time.monotonic()
    results, open_rss = asyncio.run(_run_all(port, proc.proc.pid))
    took = time.monotonic() - start
    peak = _status_kb(proc.proc.pid, "VmHWM")
    failures = [r for r in results if r != "ok"]
    assert not failures, failures[:5]
    assert len(results) == SESSIONS
    stored = all_delivered(tmp_path / "mail")
    assert len(stored) == SESSIONS
    ids = {int(split_trace(p.read_bytes())[1].split(b"X-Load-Id: ")[1].split(b"\r\n")[0])
           for p in stored}
    assert ids == set(range(SESSIONS))
    assert proc.proc.poll() is None  # still serving
    report = (f"sessions={SESSIONS} seconds={took:.1f} baseline_rss_mb={baseline / 1024:.1f}"
              f" rss_all_open_mb={open_rss / 1024:.1f} peak_rss_mb={peak / 1024:.1f}")
    print("\n" + report)
    (tmp_path_factory.getbasetemp() / "load-peak.txt").write_text(report + "\n")
    assert peak < PEAK_LIMIT_MB * 1024, report
    assert (peak - baseline) / SESSIONS < PER_SESSION_LIMIT_KB, report


HOSTILE_ROUNDS = 5
HOSTILE_SESSIONS = 250
HOSTILE_GROWTH_LIMIT_MB = 8  # last two rounds over the 2nd and 3rd (the first warms up)


async def _hostile(port: int, n: int) -> None:
    """One abusive session: a kind of garbage chosen by ``n``, then gone."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return
    kind = n % 5
    if kind == 0:
        data = bytes(range(256)) * 256  # every byte value, NULs included
    elif kind == 1:
        data = b"x" * 200_000  # a line that never ends
    elif kind == 2:
        data = b"EHLO h\r\n" + b"MAIL FROM:<a@b.example>\r\nRSET\r\n" * 3000  # burst
    elif kind == 3:  # a message cut off in the middle
        data = (b"EHLO h\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n"
                + b"half a message\r\n" * 20_000)
    else:
        data = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    try:
        writer.write(data)
        await asyncio.wait_for(writer.drain(), 10)
        await asyncio.wait_for(reader.read(4096), 0.2)
    except (TimeoutError, OSError):
        pass
    finally:
        writer.transport.abort()  # no QUIT, a reset


def test_hostile_sessions_do_not_leak_memory(spawn_server):
    """Rounds of abusive sessions: memory after the last round is about what
    it was after the second (allocator noise aside); a leak grows each round."""
    _raise_fd_limit(4 * HOSTILE_SESSIONS)
    proc = spawn_server("--max-connections-per-ip", "0", "--max-errors", "0")
    port = proc.port
    after: list[int] = []
    for _ in range(HOSTILE_ROUNDS):
        async def round_() -> None:
            await asyncio.gather(*(_hostile(port, n) for n in range(HOSTILE_SESSIONS)))
        asyncio.run(asyncio.wait_for(round_(), WALL_LIMIT))
        time.sleep(0.3)  # let the server finish closing
        after.append(_status_kb(proc.proc.pid, "VmRSS"))
    assert proc.proc.poll() is None
    # A session's buffers are up to a few hundred KiB here: a leak of them
    # grows tens of MB per round, so the last two rounds end far above the
    # second and third.  Single rounds are noisy (the allocator keeps or
    # gives back a peak's worth of memory, over 10 MB, in some rounds and
    # not others): rounds are compared in pairs, which halves such a spike
    # and still shows any leak of a few MB per round.
    growth = ((after[-1] + after[-2]) - (after[1] + after[2])) / 2 / 1024
    assert growth < HOSTILE_GROWTH_LIMIT_MB, [a // 1024 for a in after]
    assert after[-1] < PEAK_LIMIT_MB * 1024, [a // 1024 for a in after]
