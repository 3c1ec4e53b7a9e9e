"""Streaming decoder for the DATA phase (RFC 5321 §4.1.1.4 and §4.5.2).

Theory of operation
-------------------
The message ends at the first ``<CRLF>.<CRLF>`` and nowhere else.  A bare LF
or bare CR never ends it, whatever surrounds it, so ``<LF>.<LF>``,
``<CR>.<CR>``, ``<LF>.<CRLF>`` and the other smuggling variants are message
content, never a second message.  The message's first line counts as if a
CRLF came before it, so ``.<CRLF>`` right after the 354 reply is an empty
message.

Input is searched with ``bytes.find`` and transformed with ``bytes.replace``
over whole chunks: Python code runs per chunk, not per line, which keeps
large messages cheap.

Each chunk handed on is cut right after a LF (or, for a line longer than the
buffer, after a byte that is neither CR nor LF, or between two CRs), so no
CRLF and no ``<CRLF>.`` is ever split between two chunks.  The decoder keeps the two
bytes before the cut as context for the next search.

Transformations, in this order, per chunk:

1. Transparency (§4.5.2): a period that starts a line after a real CRLF is
   removed.
2. Line endings: a bare CR or bare LF is written as CRLF (the "normalise"
   policy; bare line endings are a protocol violation, §2.3.8, that old
   clients commit, and rejecting them would lose their mail).  The stored
   message therefore has CRLF line endings only, as on the wire.
"""

from __future__ import annotations

import re

_END = b"\r\n.\r\n"
_ANY_EOL = re.compile(rb"\r\n|\r|\n")
# Keep at most this many bytes while waiting for a line to end; past it, the
# line is handed on in pieces (long lines are allowed in content).
_MAX_PENDING = 64 * 1024


class DataDecoder:
    """Feed raw DATA bytes; collect decoded message chunks until the end."""

    __slots__ = ("_buf", "_scanned", "done", "rest", "bare_eol")

    def __init__(self) -> None:
        # Two bytes of context before the first byte: the message starts at
        # the beginning of a line.
        self._buf = bytearray(b"\r\n")
        # Bytes of _buf already searched for the end mark and for a LF
        # without success: a line that arrives a byte at a time costs O(1)
        # per byte, not a rescan of everything buffered.
        self._scanned = 0
        self.done = False
        self.rest = b""  # input that followed the end mark
        self.bare_eol = False  # a bare CR or LF was seen (and normalised)

    def feed(self, data: bytes) -> list[bytes]:
        """Consume ``data``; return decoded chunks (possibly none).

        After the end mark, ``done`` is True and ``rest`` holds the bytes
        that followed it (pipelined commands).
        """
        buf = self._buf
        buf += data
        # An end mark not found before may end in the new bytes: search from
        # four bytes before them.
        end = buf.find(_END, max(0, self._scanned - 4))
        if end >= 0:
            self.done = True
            self.rest = bytes(buf[end + 5:])
            piece = bytes(buf[: end + 2])
            self._buf = bytearray()
            # Content up to and including the CRLF that precedes the dot.
            return self._decode(piece) if end + 2 > 2 else []
        # No end yet.  An end mark not yet complete starts at len-4 or later;
        # the next search starts two bytes before the cut, so a cut at
        # len-2 or earlier cannot hide one.
        limit = len(buf) - 2
        cut = buf.rfind(b"\n", max(2, self._scanned - 2), limit) + 1
        if cut <= 0:
            if limit <= _MAX_PENDING:
                self._scanned = len(buf)
                return []
            cut = limit
            # Do not cut after a CR that may be half of a CRLF; a CR followed
            # by another CR is bare, so a long run of CRs is cut inside
            # (else it would be kept whole, and rescanned, forever).
            while cut > 2 and buf[cut - 1] in (10, 13) and buf[cut - 1:cut + 1] != b"\r\r":
                cut -= 1
            if cut <= 2:
                self._scanned = len(buf)
                return []
        piece = bytes(buf[:cut])
        del buf[: cut - 2]
        self._scanned = 0
        return self._decode(piece)

    def _decode(self, piece: bytes) -> list[bytes]:
        # ``piece`` starts with two bytes of context that are not output.
        if b"\r\n." in piece:
            piece = piece.replace(b"\r\n.", b"\r\n")
        out = piece[2:]
        n_lf = out.count(b"\n")
        if n_lf != out.count(b"\r") or n_lf != out.count(b"\r\n"):
            self.bare_eol = True
            # A chunk ends in a CR only when another CR follows it (so it is
            # bare), and a LF at its start follows the LF that ended the
            # previous chunk, so it is bare too: local work is right.
            out = _ANY_EOL.sub(b"\r\n", out)
        return [out] if out else []


def stuff(message: bytes) -> bytes:
    """Dot-stuff ``message`` and add the end mark: what a client sends.

    For tests and tools; ``message`` must use CRLF line endings.
    """
    if message and not message.endswith(b"\r\n"):
        message += b"\r\n"
    if message.startswith(b"."):
        message = b"." + message
    return message.replace(b"\r\n.", b"\r\n..") + b".\r\n"
