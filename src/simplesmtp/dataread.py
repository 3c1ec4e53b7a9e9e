"""Streaming decoder for the DATA phase (RFC 5321 §4.1.1.4 and §4.5.2).

Theory of operation
-------------------
The message ends at the first ``<CRLF>.<CRLF>`` and nowhere else.  A bare LF
or bare CR never ends it, whatever surrounds it, so ``<LF>.<LF>``,
``<CR>.<CR>``, ``<LF>.<CRLF>`` and the other smuggling variants are message
content, never a second message.  The message's first line counts as if a
CRLF came before it, so ``.<CRLF>`` right after the 354 reply is an empty
message.

Input is searched with compiled regular expressions and ``bytes.rfind``, and
transformed with ``bytes.replace``, over whole chunks: Python code runs per
chunk, not per line, which keeps large messages cheap.  Per chunk there is
one search for lines that start with a period (the end mark or a stuffed
dot), one each for a bare CR and a bare LF, and one copy; the rewriting
passes run only when the searches found something to rewrite.

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

_ANY_EOL = re.compile(rb"\r\n|\r|\n")
# A line that starts with a period: the end mark or a stuffed dot.  (The
# regular expression engine scans for its first byte with memchr, which is
# several times faster here than bytes.find on the three-byte string.)
_DOT_LINE = re.compile(rb"\r\n\.")
# Bare line endings, each found from its own first byte (the same reason).
_BARE_CR = re.compile(rb"\r(?!\n)")
_BARE_LF = re.compile(rb"\n(?<!\r\n)")
# Keep at most this many bytes while waiting for a line to end; past it, the
# line is handed on in pieces (long lines are allowed in content).
_MAX_PENDING = 64 * 1024


class DataDecoder:
    """Feed raw DATA bytes; collect decoded message chunks until the end."""

    __slots__ = ("_buf", "_scanned", "_dots", "done", "rest", "bare_eol")

    def __init__(self) -> None:
        # Two bytes of context before the first byte: the message starts at
        # the beginning of a line.
        self._buf = bytearray(b"\r\n")
        # Bytes of _buf already searched for the end mark and for a LF
        # without success: a line that arrives a byte at a time costs O(1)
        # per byte, not a rescan of everything buffered.
        self._scanned = 0
        self._dots = False  # a dot-stuffed line lies in _buf before the cut
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
        # One search finds both the end mark and dot-stuffed lines: every
        # line that starts with a period.  Matches not seen before may start
        # four bytes before the new ones (an undecided "<CRLF>.<CR>").
        end = -1
        size = len(buf)
        match = _DOT_LINE.search(buf, max(0, self._scanned - 4))
        while match is not None:
            at = match.start()
            if buf[at + 3:at + 5] == b"\r\n":
                end = at
                break
            if at + 5 > size:
                break  # may yet become the end mark: never cut past it
            self._dots = True
            match = _DOT_LINE.search(buf, at + 3)
        if end >= 0:
            self.done = True
            self.rest = bytes(buf[end + 5:])
            # Content up to and including the CRLF that precedes the dot.
            out = self._take(end + 2)
            self._buf = bytearray()
            return self._normalise_eol(out)
        # No end yet.  An end mark not yet complete starts at len-4 or later;
        # the next search starts two bytes before the cut, so a cut at
        # len-2 or earlier cannot hide one.
        limit = size - 2
        cut = buf.rfind(b"\n", max(2, self._scanned - 2), limit) + 1
        if cut <= 0:
            if limit <= _MAX_PENDING:
                self._scanned = size
                return []
            cut = limit
            # Do not cut after a CR that may be half of a CRLF; a CR followed
            # by another CR is bare, so a long run of CRs is cut inside
            # (else it would be kept whole, and rescanned, forever).
            while cut > 2 and buf[cut - 1] in (10, 13) and buf[cut - 1:cut + 1] != b"\r\r":
                cut -= 1
            if cut <= 2:
                self._scanned = size
                return []
        out = self._take(cut)
        del buf[: cut - 2]
        self._scanned = 0
        return self._normalise_eol(out)

    def _take(self, cut: int) -> bytes:
        """The content before ``cut``, without the two bytes of context and
        with stuffed dots removed (one copy when there are none)."""
        with memoryview(self._buf) as view:
            if not self._dots:
                return bytes(view[2:cut])
            # Every "<CRLF>." before the cut is a stuffed dot (the end mark
            # is never inside one); after the cut the next search finds the
            # rest.  The context bytes count: "<CRLF>." may start in them.
            self._dots = False
            return bytes(view[:cut]).replace(b"\r\n.", b"\r\n")[2:]

    def _normalise_eol(self, out: bytes) -> list[bytes]:
        if _BARE_CR.search(out) or _BARE_LF.search(out):
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
