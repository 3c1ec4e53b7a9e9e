"""Properties of the per-command path that the benchmark depends on.

These are not timings (those belong to ``python -m bench``): they pin down
the structural facts that keep the hot path cheap and its latency steady,
so that a later change cannot lose them without a test failing.
"""

from __future__ import annotations

import asyncio
import gc
import smtplib
import time
import weakref
from typing import Any

import pytest
from clients import RawSMTP

from simplesmtp.config import Config
from simplesmtp.server import Server, Session

ALICE = "alice@example.com"
SENDER = "bob@client.example"
MESSAGE = b"Subject: hot path\r\n\r\nbody\r\n"


@pytest.mark.parametrize("event_loop", ["default", "asyncio"])
def test_a_finished_session_is_freed_by_reference_counting(server_factory, event_loop):
    # A reference cycle through a session would leave it to the cyclic
    # garbage collector, whose pauses land inside some later command's
    # handling (they showed as EHLO p99 spikes in the benchmark).
    srv = server_factory(event_loop=event_loop)
    gc.collect()
    gc.disable()
    try:
        with smtplib.SMTP(srv.host, srv.port, timeout=10) as c:
            c.ehlo("client.example")
            c.sendmail(SENDER, [ALICE], MESSAGE)
            refs = srv.call(lambda: [weakref.ref(s) for s in srv.server.sessions])
        assert len(refs) == 1
        assert srv.wait_idle()
        deadline = time.monotonic() + 5
        while refs[0]() is not None and time.monotonic() < deadline:
            time.sleep(0.01)  # the loop thread drops its last references
        assert refs[0]() is None, gc.get_referrers(refs[0]())
    finally:
        gc.enable()


class _Transport(asyncio.Transport):
    """Just enough transport to drive a Session by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []

    def write(self, data: Any) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def get_write_buffer_size(self) -> int:
        return 0


def test_messages_make_no_cyclic_garbage_and_arm_no_timers(tmp_path):
    config = Config().replace(storage="null", mail_dir=str(tmp_path / "mail"),
                              hostname="mx.example")

    async def run() -> tuple[int, int, list[bytes]]:
        server = Server(config)
        session = Session(server)
        transport = _Transport()
        session.connection_made(transport)
        session.data_received(b"EHLO client.example\r\n")
        loop = asyncio.get_running_loop()
        timers = []
        real_call_later = loop.call_later

        def counting_call_later(*args: Any, **kwargs: Any) -> asyncio.TimerHandle:
            timers.append(args)
            return real_call_later(*args, **kwargs)

        loop.call_later = counting_call_later  # type: ignore[method-assign]
        gc.collect()
        gc.disable()
        try:
            for _ in range(50):
                for line in (b"MAIL FROM:<bob@client.example>\r\n",
                             b"RCPT TO:<alice@example.com>\r\n", b"DATA\r\n",
                             MESSAGE + b".\r\n"):
                    session.data_received(line)
            garbage = gc.collect()
        finally:
            gc.enable()
            loop.call_later = real_call_later  # type: ignore[method-assign]
        session.connection_lost(None)
        return garbage, len(timers), transport.written

    garbage, timers, written = asyncio.run(run())
    assert sum(w.startswith(b"250 2.0.0 Ok: queued as") for w in written) == 50
    assert garbage == 0
    # The session's timer never sleeps past the shortest timeout, so
    # entering and leaving DATA need not re-arm it.
    assert timers == 0


def test_shorter_data_timeout_still_applies_after_a_long_command_phase(server_factory):
    # The timer is armed for at most the shortest silence allowed; a DATA
    # phase that starts just before it fires must still end at its own
    # deadline, not a full command timeout later.
    srv = server_factory(timeout=1.5, data_timeout=0.5)
    with RawSMTP(srv.host, srv.port) as c:
        c.ehlo()
        time.sleep(0.4)  # most of a timer period spent in the command phase
        c.envelope(SENDER, ALICE)
        assert c.cmd("DATA").code == 354
        start = time.monotonic()
        reply = c.reply()
        elapsed = time.monotonic() - start
    assert reply.code == 421
    assert 0.4 <= elapsed < 1.2, elapsed


def _second_content_phase_gets_its_own_clock(srv: Any, first: bytes, pipelined: bytes,
                                             replies: int) -> float:
    """Start a content phase, spend most of its time limit, then end it and
    start the next in one write; return how long the second phase lasts
    before the server's 421."""
    with RawSMTP(srv.host, srv.port) as c:
        c.ehlo()
        c.envelope(SENDER, ALICE)
        c.send(first)
        if first.startswith(b"DATA"):
            assert c.reply().code == 354
        time.sleep(0.9)  # of a 1 s data timeout
        c.send(pipelined)
        codes = [c.reply().code for _ in range(replies)]
        assert codes[0] == 250 and codes[-1] in (250, 354), codes
        start = time.monotonic()
        reply = c.reply()
        elapsed = time.monotonic() - start
    assert reply.code == 421
    return elapsed


def test_pipelined_second_data_gets_the_whole_data_timeout(server_factory):
    # Found in review: the second message inherited the first one's content
    # clock (the phase went DATA, WAIT, DATA without a COMMAND in between)
    # and was cut after about 0.1 s.
    srv = server_factory(timeout=3, data_timeout=1)
    elapsed = _second_content_phase_gets_its_own_clock(
        srv, b"DATA\r\n",
        b"hi\r\n.\r\nMAIL FROM:<a@client.example>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n",
        4)
    assert 0.8 <= elapsed < 2.5, elapsed


def test_pipelined_second_bdat_gets_the_whole_data_timeout(server_factory):
    srv = server_factory(timeout=3, data_timeout=1)
    elapsed = _second_content_phase_gets_its_own_clock(
        srv, b"BDAT 10 LAST\r\n",
        b"0123456789MAIL FROM:<a@client.example>\r\nRCPT TO:<alice@example.com>\r\n"
        b"BDAT 10 LAST\r\n",
        3)
    assert 0.8 <= elapsed < 2.5, elapsed
