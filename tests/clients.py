"""Client-side helpers for the tests: a raw socket SMTP client and the corpus.

``RawSMTP`` speaks SMTP byte by byte with no help and no checks, so tests
can send what real clients send and what broken or hostile ones send
(pipelined commands, bare line endings, BDAT chunks, half a message).

The corpus (``../shared/corpus`` beside the repository, or
``$SIMPLESMTP_CORPUS``) holds real
messages as opaque bytes; ``to_crlf`` gives the form a client puts on the
wire before dot-stuffing.
"""

from __future__ import annotations

import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

# The corpus sits next to the repository (``../shared/corpus``).
CORPUS_DIR = Path(os.environ.get("SIMPLESMTP_CORPUS")
                  or Path(__file__).resolve().parents[2] / "shared" / "corpus")
# Files in the corpus that are not messages.
_NOT_MESSAGES = {"README.md", "LICENSE.txt"}

_ANY_EOL = re.compile(rb"\r\n|\r|\n")


def corpus_files() -> list[Path]:
    """Every message file of the corpus, sorted (empty if it is missing)."""
    if not CORPUS_DIR.is_dir():
        return []
    return sorted(p for p in CORPUS_DIR.rglob("*")
                  if p.is_file() and p.name not in _NOT_MESSAGES)


def to_crlf(data: bytes) -> bytes:
    """Every line ending (CRLF, bare LF, bare CR) written as CRLF."""
    return _ANY_EOL.sub(b"\r\n", data)


def dot_stuff(message: bytes) -> bytes:
    """What a client sends after DATA for ``message`` (CRLF line endings):
    a final CRLF if missing, leading periods doubled, and the end mark."""
    if message and not message.endswith(b"\r\n"):
        message += b"\r\n"
    if message.startswith(b"."):
        message = b"." + message
    return message.replace(b"\r\n.", b"\r\n..") + b".\r\n"


@dataclass(frozen=True)
class Reply:
    code: int
    lines: list[str]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def last(self) -> str:
        return self.lines[-1] if self.lines else ""

    def __str__(self) -> str:
        return "\n".join(f"{self.code} {line}" for line in self.lines)


class ConnectionClosed(Exception):
    """The server closed the connection while a reply was expected."""


class RawSMTP:
    """A minimal SMTP client over a plain socket.

    ``send`` writes bytes as given; ``reply`` reads one (possibly multi-line)
    reply; ``cmd`` does both for one command line.  Every read is bounded by
    ``timeout`` seconds, so a test fails instead of hanging.
    """

    def __init__(self, host: str, port: int, *, timeout: float = 10.0,
                 read_greeting: bool = True) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = b""
        self.greeting: Reply | None = self.reply() if read_greeting else None

    # --- plumbing -------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_slowly(self, data: bytes, step: int = 1) -> None:
        """Send ``data`` ``step`` bytes per write (each its own segment)."""
        for i in range(0, len(data), step):
            self.sock.sendall(data[i:i + step])

    def _line(self) -> bytes:
        while b"\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionClosed(f"closed; unparsed {self._buf!r}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.rstrip(b"\r")

    def reply(self) -> Reply:
        lines: list[str] = []
        while True:
            raw = self._line()
            text = raw.decode("utf-8", "replace")
            if len(text) < 3 or not text[:3].isdigit():
                raise AssertionError(f"not an SMTP reply line: {raw!r}")
            lines.append(text[4:])
            if len(text) == 3 or text[3] == " ":
                return Reply(int(text[:3]), lines)

    def replies(self, n: int) -> list[Reply]:
        return [self.reply() for _ in range(n)]

    def cmd(self, line: str | bytes) -> Reply:
        data = line.encode("utf-8") if isinstance(line, str) else line
        self.send(data + b"\r\n")
        return self.reply()

    def read_until_closed(self, limit: int = 100) -> list[Reply]:
        """Every remaining reply until the server closes (at most ``limit``)."""
        out: list[Reply] = []
        for _ in range(limit):
            try:
                out.append(self.reply())
            except ConnectionClosed:
                return out
            except ConnectionResetError:
                return out
        raise AssertionError(f"more than {limit} replies: {out}")

    def is_closed(self, wait: float = 5.0) -> bool:
        """True once the server has closed its side (EOF) within ``wait``."""
        if self._buf:
            return False
        old = self.sock.gettimeout()
        self.sock.settimeout(wait)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
        finally:
            self.sock.settimeout(old)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def abort(self) -> None:
        """Close with a TCP RST instead of FIN (a crashed client)."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                             b"\x01\x00\x00\x00\x00\x00\x00\x00")
        self.close()

    def __enter__(self) -> RawSMTP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- conveniences ---------------------------------------------------

    def ehlo(self, name: str = "client.test") -> Reply:
        r = self.cmd(f"EHLO {name}")
        assert r.code == 250, r
        return r

    def envelope(self, mail_from: str, *rcpts: str, mail_params: str = "") -> None:
        """MAIL and RCPT (each must be accepted)."""
        r = self.cmd(f"MAIL FROM:<{mail_from}>{(' ' + mail_params) if mail_params else ''}")
        assert r.code == 250, r
        for rcpt in rcpts:
            r = self.cmd(f"RCPT TO:<{rcpt}>")
            assert r.code == 250, r

    def data(self, message: bytes) -> Reply:
        """DATA with ``message`` (CRLF line endings), dot-stuffed for it."""
        r = self.cmd("DATA")
        assert r.code == 354, r
        self.send(dot_stuff(message))
        return self.reply()

    def bdat(self, chunks: list[bytes], *, pipelined: bool = False) -> list[Reply]:
        """Send ``chunks`` as BDAT commands, the last one with LAST."""
        out: list[Reply] = []
        for i, chunk in enumerate(chunks):
            last = " LAST" if i == len(chunks) - 1 else ""
            self.send(f"BDAT {len(chunk)}{last}\r\n".encode() + chunk)
            if not pipelined:
                out.append(self.reply())
        if pipelined:
            out = self.replies(len(chunks))
        return out


def queue_id_of(reply_text: str) -> str:
    """The queue id in a ``250 ... queued as <id>`` reply."""
    m = re.search(r"queued as (\S+)", reply_text)
    assert m, f"no queue id in {reply_text!r}"
    return m.group(1)


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.01) -> bool:
    """Poll ``predicate`` until true or ``timeout`` seconds passed (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def send_numbered(host: str, port: int, i: int) -> int:
    """Session ``i`` of a parallel batch: one message to one of three
    recipients (by ``i``), then QUIT; returns the code of the end of data."""
    with RawSMTP(host, port) as c:
        c.ehlo()
        c.envelope("a@example.org", f"rcpt{i % 3}@example.net")
        code = c.data(f"Subject: {i}\r\n\r\nbody {i}\r\n".encode()).code
        c.cmd("QUIT")
        return code
