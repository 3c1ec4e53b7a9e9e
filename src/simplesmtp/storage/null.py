"""A back end that reads every message whole and keeps nothing (load tests)."""

from __future__ import annotations

from . import Envelope


class NullWriter:
    __slots__ = ("size",)

    needs_flush = False

    def __init__(self) -> None:
        self.size = 0

    def write(self, data: bytes) -> None:
        self.size += len(data)

    def flush(self) -> None:
        pass

    def commit(self) -> None:
        pass

    def abort(self) -> None:
        pass


class NullStorage:
    name = "null"
    # The session may commit on the event loop: there is no I/O to wait for.
    commit_inline = True

    def open(self, envelope: Envelope) -> NullWriter:
        return NullWriter()

    def close(self) -> None:
        pass
