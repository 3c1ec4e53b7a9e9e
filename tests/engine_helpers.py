"""A small test driver for the sans-I/O engine: bytes in, replies out.

``Driver`` plays the part of the transport (``server.py``) without any I/O:
it feeds bytes to ``SMTPEngine``, collects every event, keeps the content of
the message in flight, and answers ``MessageComplete`` by calling
``delivered`` (or ``delivery_failed``) straight away.  A STARTTLS upgrade is
left to the test (``Driver.handshake``), because what the client sends
between the 220 reply and the handshake is exactly what some tests probe.

The driver also checks the event protocol on the way: data only inside a
message, an abort only for a message that was begun, nothing after Close.
A broken rule fails the test with an AssertionError that says which.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from simplesmtp import replies as R
from simplesmtp.address import Address
from simplesmtp.engine import (
    NEED_DATA,
    Close,
    EngineConfig,
    Event,
    MessageAbort,
    MessageBegin,
    MessageComplete,
    MessageData,
    Send,
    SMTPEngine,
    StartTLS,
    Transaction,
)

HOST = "mx.test"


def config(**kw: object) -> EngineConfig:
    """An EngineConfig with a fixed host name (so transcripts are stable)."""
    kw.setdefault("hostname", HOST)
    return EngineConfig(**kw)  # type: ignore[arg-type]


@dataclass
class Delivered:
    """One message the engine completed (and the driver acknowledged)."""

    mail_from: Address
    recipients: list[Address]
    content: bytes
    verb: str  # "DATA" or "BDAT": the command whose reply carried the 250
    transaction: Transaction


class Driver:
    """Run one engine session; inspect ``sends``, ``messages``, ``events``."""

    def __init__(self, cfg: EngineConfig | None = None, *, tls: bool = False,
                 fail_delivery: R.Reply | None = None) -> None:
        self.engine = SMTPEngine(cfg or config(), tls=tls)
        self.fail_delivery = fail_delivery  # answer deliveries with this reply
        self.events: list[Event] = []
        self.sends: list[Send] = []  # every reply but the greeting, in order
        self.messages: list[Delivered] = []
        self.aborts: list[str] = []
        self.begins = 0
        self.closed = False
        self.tls_pending = False  # StartTLS seen, handshake not yet done
        self._content: bytearray | None = None  # message in flight
        self.greeting = self.engine.greeting()
        self._queue = 0

    # --- Feeding ------------------------------------------------------------

    def feed(self, data: bytes, sizes: Iterable[int] | None = None) -> list[Send]:
        """Give ``data`` to the engine (in pieces of ``sizes``, if given).

        Returns the replies it produced.  ``sizes`` is cycled; the engine is
        pumped after every piece, as the transport would.
        """
        before = len(self.sends)
        for piece in split(data, sizes):
            self.engine.receive(piece)
            self.pump()
        return self.sends[before:]

    def line(self, text: str | bytes) -> Send:
        """Send one command line; return its (single) reply."""
        raw = text.encode("utf-8") if isinstance(text, str) else text
        got = self.feed(raw + b"\r\n")
        assert len(got) == 1, f"{raw!r} gave {len(got)} replies: {got}"
        return got[0]

    def handshake(self) -> None:
        """Complete the TLS upgrade the engine asked for."""
        assert self.tls_pending, "no STARTTLS pending"
        self.tls_pending = False
        self.engine.tls_started()
        self.pump()

    def pump(self) -> None:
        engine = self.engine
        while True:
            event = engine.next_event()
            if event is NEED_DATA:
                return
            assert not self.closed, f"event after Close: {event}"
            self.events.append(event)
            if isinstance(event, Send):
                self.sends.append(event)
            elif isinstance(event, MessageBegin):
                assert self._content is None, "MessageBegin inside a message"
                self._content = bytearray()
                self.begins += 1
            elif isinstance(event, MessageData):
                assert self._content is not None, "MessageData outside a message"
                assert event.data, "empty MessageData"
                self._content += event.data
            elif isinstance(event, MessageAbort):
                assert self._content is not None, "MessageAbort without a message"
                self._content = None
                self.aborts.append(event.reason)
            elif isinstance(event, MessageComplete):
                self._complete(event.transaction)
            elif isinstance(event, StartTLS):
                assert self._content is None, "STARTTLS inside a message"
                self.tls_pending = True
            elif isinstance(event, Close):
                self.closed = True
            else:  # pragma: no cover - a new event type the driver misses
                raise AssertionError(f"unknown event {event!r}")

    def _complete(self, txn: Transaction) -> None:
        assert self._content is not None, "MessageComplete without a message"
        content, self._content = bytes(self._content), None
        verb = "BDAT" if txn.via_bdat else "DATA"
        if self.fail_delivery is not None:
            self.sends.append(self.engine.delivery_failed(self.fail_delivery))
            return
        self._queue += 1
        self.messages.append(Delivered(txn.mail_from, list(txn.recipients), content,
                                       verb, txn))
        self.sends.append(self.engine.delivered(f"Q{self._queue}"))

    # --- Looking at the results -------------------------------------------

    @property
    def codes(self) -> list[int]:
        return [s.reply.code for s in self.sends]

    @property
    def wire(self) -> bytes:
        """Every byte the server wrote, greeting included."""
        return self.greeting.data + b"".join(s.data for s in self.sends)

    @property
    def message_open(self) -> bool:
        return self._content is not None


def split(data: bytes, sizes: Iterable[int] | None) -> Iterator[bytes]:
    """Cut ``data`` into pieces of the given sizes (cycled); whole if None."""
    if sizes is None:
        if data:
            yield data
        return
    sizes = list(sizes)
    assert sizes and all(n > 0 for n in sizes)
    i = k = 0
    while i < len(data):
        n = sizes[k % len(sizes)]
        yield data[i:i + n]
        i += n
        k += 1


def random_sizes(seed: int, n: int = 64, top: int = 17) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(1, top) for _ in range(n)]


# Ways to feed a transcript: whole, a byte at a time, and a few fixed random
# splits (seeded, so a failure is reproducible).
CHUNKINGS: dict[str, list[int] | None] = {
    "whole": None,
    "bytewise": [1],
    "split7": random_sizes(7),
    "split42": random_sizes(42, top=300),
}


def run(transcript: bytes, cfg: EngineConfig | None = None, *,
        sizes: Iterable[int] | None = None, tls: bool = False) -> Driver:
    d = Driver(cfg, tls=tls)
    d.feed(transcript, sizes)
    return d


def crlf(*lines: str) -> bytes:
    """Join command lines with CRLF (and end with one)."""
    return "".join(line + "\r\n" for line in lines).encode("utf-8")


EHLO = crlf("EHLO client.test")
