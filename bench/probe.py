"""The latency probe: one client, one command at a time, each timed.

Round trip per command as the client sees it (send the line, read the
whole reply) with ``time.perf_counter_ns``, over plain blocking sockets
with TCP_NODELAY.  Each probe session says EHLO, then runs transactions of
MAIL, RCPT, DATA, the message and its end mark (``DATA-END``), NOOP and
RSET, then QUIT.  The same client code runs against every server, so its
own overhead (tens of microseconds of Python) is the same for all.
"""

from __future__ import annotations

import socket
import time

COMMANDS = ("EHLO", "MAIL", "RCPT", "DATA", "DATA-END", "NOOP", "RSET")


class _Client:
    def __init__(self, port: int, timeout: float) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def reply(self) -> int:
        while True:
            while b"\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("server closed the connection")
                self.buf += chunk
            line, _, self.buf = self.buf.partition(b"\n")
            if len(line) < 4 or line[3:4] != b"-":
                return int(line[:3])

    def timed(self, data: bytes) -> tuple[int, int]:
        t0 = time.perf_counter_ns()
        self.sock.sendall(data)
        code = self.reply()
        return code, time.perf_counter_ns() - t0

    def close(self) -> None:
        self.sock.close()


def run_probe(port: int, *, sessions: int = 5, transactions: int = 40,
              size: int = 1024, timeout: float = 10.0,
              deadline: float | None = None) -> dict[str, list[int]]:
    """Round-trip times in nanoseconds per command kind."""
    body = (b"Subject: latency probe\r\n\r\n"
            + (b"x" * 76 + b"\r\n") * max(1, size // 78))
    out: dict[str, list[int]] = {k: [] for k in COMMANDS}
    for _ in range(sessions):
        c = _Client(port, timeout)
        try:
            if c.reply() != 220:
                raise RuntimeError("no greeting")
            code, ns = c.timed(b"EHLO probe.bench\r\n")
            out["EHLO"].append(ns)
            for _ in range(transactions):
                if deadline is not None and time.monotonic() > deadline:
                    break
                for kind, line, want in (("MAIL", b"MAIL FROM:<probe@bench.test>\r\n", 250),
                                         ("RCPT", b"RCPT TO:<sink@bench.test>\r\n", 250),
                                         ("DATA", b"DATA\r\n", 354),
                                         ("DATA-END", body + b".\r\n", 250),
                                         ("NOOP", b"NOOP\r\n", 250),
                                         ("RSET", b"RSET\r\n", 250)):
                    code, ns = c.timed(line)
                    if code != want:
                        raise RuntimeError(f"{kind}: reply {code}, expected {want}")
                    out[kind].append(ns)
            c.timed(b"QUIT\r\n")
        finally:
            c.close()
    return out
