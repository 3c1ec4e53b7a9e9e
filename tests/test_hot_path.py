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
        self.closing = False

    def write(self, data: Any) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def get_write_buffer_size(self) -> int:
        return 0


def _null_config(tmp_path: Any) -> Config:
    return Config().replace(storage="null", mail_dir=str(tmp_path / "mail"),
                            hostname="mx.example")


def test_replies_of_one_loop_pass_are_written_together_after_it(tmp_path):
    # Input of many sessions is parsed in one pass of the loop, and their
    # replies are written after it (Server.flush_later): written between
    # the sessions, each reply would wake a busy client on its own.
    async def run() -> None:
        server = Server(_null_config(tmp_path))
        sessions = [Session(server) for _ in range(3)]
        transports = [_Transport() for _ in sessions]
        for session, transport in zip(sessions, transports, strict=True):
            session.connection_made(transport)
            session.data_received(b"EHLO client.example\r\n")
        await asyncio.sleep(0)
        for transport in transports:
            transport.written.clear()
        for session in sessions:
            session.data_received(b"NOOP\r\n")
        assert [t.written for t in transports] == [[], [], []]
        assert "NOOP" not in server.metrics.kinds  # not timed before it is written
        await asyncio.sleep(0)
        for transport in transports:
            assert transport.written == [b"250 2.0.0 Ok\r\n"]
        assert server.metrics.kinds["NOOP"].count == 3
        for session in sessions:
            session.connection_lost(None)

    asyncio.run(run())


def test_a_write_that_fails_ends_its_session_and_spares_the_others(tmp_path, caplog):
    # The replies are written outside the engine loop's error handling: a
    # failure there (our bug) must not leave the other sessions' replies
    # unwritten until their clients time out.
    class Failing(_Transport):
        aborted = False

        def write(self, data: Any) -> None:
            raise RuntimeError("broken transport")

        def abort(self) -> None:
            self.aborted = True

    async def run() -> tuple[list[_Transport], Failing]:
        server = Server(_null_config(tmp_path))
        sessions = [Session(server) for _ in range(3)]
        transports = [_Transport(), _Transport(), _Transport()]
        for session, transport in zip(sessions, transports, strict=True):
            session.connection_made(transport)
        failing = Failing()
        sessions[0].transport = failing  # after its greeting
        for session in sessions:
            session.data_received(b"EHLO client.example\r\n")
        await asyncio.sleep(0)
        for session in sessions:
            session.connection_lost(None)
        return transports, failing

    transports, failing = asyncio.run(run())
    assert failing.aborted
    for transport in transports[1:]:
        assert transport.written[-1].startswith(b"250-mx.example")
    assert "event=internal_error" in caplog.text and "stage=write" in caplog.text


def test_a_deadline_check_before_the_queued_reply_is_written_is_not_a_timeout(tmp_path):
    # The command arrived in time; its reply waits for the end of the loop's
    # pass.  A timer firing in between must not count that wait against
    # the client (the command clock runs from our last reply written).
    async def run() -> list[bytes]:
        session = Session(Server(_null_config(tmp_path).replace(timeout=5.0)))
        transport = _Transport()
        session.connection_made(transport)
        session.data_received(b"EHLO client.example\r\n")
        await asyncio.sleep(0)
        session.data_received(b"NOOP\r\n")
        session._turn_ns -= 10 * 10**9  # as if the reply to EHLO were 10 s old
        session._check_timeout()
        await asyncio.sleep(0)
        written = list(transport.written)
        session.connection_lost(None)
        return written

    written = asyncio.run(run())
    assert written[-1] == b"250 2.0.0 Ok\r\n"
    assert not any(w.startswith(b"421") for w in written)


def test_a_queued_reply_goes_out_before_the_client_half_closes(tmp_path):
    # ``printf 'EHLO a\r\nNOOP\r\n' | nc -N``: the end of input may come
    # in the same pass as the last command; its reply must not be lost
    # when the transport closes after eof_received.
    async def run() -> list[bytes]:
        session = Session(Server(_null_config(tmp_path)))
        transport = _Transport()
        session.connection_made(transport)
        session.data_received(b"EHLO client.example\r\nNOOP\r\n")
        assert session.eof_received() is None  # close our side too
        written = list(transport.written)
        session.connection_lost(None)
        return written

    written = asyncio.run(run())
    assert written[-1].endswith(b"250 2.0.0 Ok\r\n")


def test_a_reply_queued_for_a_peer_that_is_gone_is_not_written_but_counted(tmp_path):
    async def run() -> tuple[list[bytes], Any]:
        server = Server(_null_config(tmp_path))
        session = Session(server)
        transport = _Transport()
        session.connection_made(transport)
        session.data_received(b"EHLO client.example\r\n")
        await asyncio.sleep(0)
        session.data_received(b"NOOP\r\n")
        transport.closing = True  # reset by the peer before the loop's turn
        session.connection_lost(ConnectionResetError())
        await asyncio.sleep(0)
        return transport.written, server.metrics.kinds

    written, kinds = asyncio.run(run())
    assert not any(b"Ok\r\n" in w for w in written)
    assert kinds["NOOP"].codes == {250: 1}


def test_messages_make_no_cyclic_garbage_and_arm_no_timers(tmp_path):
    config = Config().replace(storage="null", mail_dir=str(tmp_path / "mail"),
                              hostname="mx.example")

    async def run() -> tuple[int, int, list[bytes]]:
        server = Server(config)
        session = Session(server)
        transport = _Transport()
        session.connection_made(transport)
        session.data_received(b"EHLO client.example\r\n")
        await asyncio.sleep(0)
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
                    await asyncio.sleep(0)  # the replies are written
            garbage = gc.collect()
        finally:
            gc.enable()
            loop.call_later = real_call_later  # type: ignore[method-assign]
        session.connection_lost(None)
        return garbage, len(timers), transport.written

    garbage, timers, written = asyncio.run(run())
    assert b"".join(written).count(b"250 2.0.0 Ok: queued as") == 50
    assert len(written) == 1 + 1 + 50 * 4  # greeting, EHLO, then 4 per message
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
