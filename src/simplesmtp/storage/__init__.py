"""Durable delivery: the contract every storage back end keeps.

A back end hands out one ``MessageWriter`` per message.  The session writes
the trace headers and the content into it as they arrive, then either
commits it or aborts it.

``commit`` returns only when the message is durable for every recipient:
after that, a crash of the process or the machine cannot lose it.  It runs
in a worker thread (it blocks on the disk), so it must not touch the event
loop.  If it raises ``OSError``, nothing of the message may be visible as
delivered, and the session answers with a 4xx reply (the client keeps the
message and tries again).

``write`` is called on the event loop thread and must be cheap: a back end
buffers in memory and, once the buffer passes ``spill_threshold``, reports
``needs_flush``; the session then runs ``flush`` in a worker thread with
reading paused, which keeps memory per session bounded.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Protocol

from ..address import Address


@dataclass(frozen=True, slots=True)
class Envelope:
    queue_id: str
    mail_from: Address
    recipients: tuple[Address, ...]


class MessageWriter(Protocol):
    @property
    def needs_flush(self) -> bool: ...

    def write(self, data: bytes) -> None: ...

    def flush(self) -> None: ...

    def commit(self) -> None: ...

    def abort(self) -> None: ...


class Storage(Protocol):
    name: str
    # True when commit does no blocking I/O and may run on the event loop.
    commit_inline: bool

    def open(self, envelope: Envelope) -> MessageWriter: ...

    def close(self) -> None: ...


def create_storage(kind: str, *, mail_dir: str, hostname: str) -> Storage:
    """The back end for ``--storage``; raises ValueError for an unknown kind."""
    if kind == "maildir":
        from .maildir import MaildirStorage
        return MaildirStorage(mail_dir, hostname=hostname)
    if kind == "null":
        from .null import NullStorage
        return NullStorage()
    raise ValueError(f"unknown storage back end {kind!r}")


STORAGE_KINDS = ("maildir", "null")


def is_storage_full(exc: BaseException) -> bool:
    """Out of space or quota: RFC 3463 X.3.1, "mail system full"."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
