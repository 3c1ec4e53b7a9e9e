"""SIGTERM/SIGINT on the real ``simplesmtp serve`` process.

Promise under test: stop accepting, let running transactions finish within
the grace period, then ``421 4.3.2`` and close; exit 0.  A message whose 250
the client saw is in ``new/``; a message never finished is never delivered.
"""

from __future__ import annotations

import signal
import socket
import threading
import time

import pytest
from clients import RawSMTP, queue_id_of, wait_until
from conftest import all_delivered, delivered, read_message, split_trace, tmp_files

SENDER = "sender@client.example"


def _accepts(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError:
        return False
    return True

ALICE = "alice@example.com"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_signal_idle_session_gets_421_and_exit_0(spawn_server, sig):
    proc = spawn_server()
    with RawSMTP(proc.host, proc.port) as c:
        c.ehlo()
        proc.signal(sig)
        r = c.reply()
        assert r.code == 421 and r.lines[0].startswith("4.3.2"), r
        assert c.is_closed()
    assert proc.wait(10) == 0
    proc.wait_for(r"event=stopped")
    assert "Traceback" not in proc.stderr


def test_sigterm_without_sessions_exits_0(spawn_server):
    proc = spawn_server()
    proc.signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    proc.wait_for(r"event=stopping sessions=0")


def test_sigterm_stops_accepting(spawn_server):
    proc = spawn_server("--shutdown-grace", "5")
    with RawSMTP(proc.host, proc.port) as c:
        c.ehlo()
        c.envelope(SENDER, ALICE)  # a transaction keeps the server in its grace
        proc.signal(signal.SIGTERM)
        proc.wait_for(r"event=stopping")
        # The listener closes right after the log line is written.
        assert wait_until(lambda: not _accepts(proc.host, proc.port), timeout=3)
        assert c.cmd("RSET").code == 250
        r = c.reply()  # no transaction left: told to go
        assert r.code == 421, r
    assert proc.wait(10) == 0


def test_sigterm_during_data_transaction_finishes(spawn_server, tmp_path):
    proc = spawn_server("--shutdown-grace", "10")
    message = b"Subject: in flight\r\n\r\n" + b"first half\r\n" * 100
    with RawSMTP(proc.host, proc.port) as c:
        c.ehlo()
        c.envelope(SENDER, ALICE)
        assert c.cmd("DATA").code == 354
        c.send(message)
        proc.signal(signal.SIGTERM)
        proc.wait_for(r"event=stopping sessions=1")
        c.send(b"second half\r\n.\r\n")
        r = c.reply()
        assert r.code == 250, r
        qid = queue_id_of(r.text)
        # The 250 means durable: the file is in new/ right now.
        files = delivered(tmp_path / "mail", ALICE)
        assert len(files) == 1 and qid in files[0].name
        _, content = split_trace(read_message(files[0]))
        assert content == message + b"second half\r\n"
        r = c.reply()
        assert r.code == 421 and r.lines[0].startswith("4.3.2"), r
        assert c.is_closed()
    assert proc.wait(10) == 0


def test_sigterm_during_bdat_transaction_finishes(spawn_server, tmp_path):
    proc = spawn_server("--shutdown-grace", "10")
    with RawSMTP(proc.host, proc.port) as c:
        c.ehlo()
        c.envelope(SENDER, ALICE)
        c.send(b"BDAT 6\r\nfirst\n")
        assert c.reply().code == 250
        proc.signal(signal.SIGTERM)
        proc.wait_for(r"event=stopping sessions=1")
        c.send(b"BDAT 7 LAST\r\nsecond\n")
        r = c.reply()
        assert r.code == 250, r
        assert len(delivered(tmp_path / "mail", ALICE)) == 1
        assert c.reply().code == 421
    assert proc.wait(10) == 0


@pytest.mark.parametrize("size", [1000, 700_000], ids=["small", "spilled"])
def test_sigterm_unfinished_data_never_delivered(spawn_server, tmp_path, size):
    proc = spawn_server("--shutdown-grace", "0.5")
    with RawSMTP(proc.host, proc.port) as c:
        c.ehlo()
        c.envelope(SENDER, ALICE)
        assert c.cmd("DATA").code == 354
        c.send(b"Subject: never finished\r\n\r\n" + b"u" * size + b"\r\n")
        proc.signal(signal.SIGTERM)
        r = c.reply()  # after the grace period
        assert r.code == 421 and r.lines[0].startswith("4.3.2"), r
        assert c.is_closed()
        # Too late: the end of the message is not acted upon.
        try:
            c.send(b".\r\n")
        except OSError:
            pass
    assert proc.wait(10) == 0
    assert all_delivered(tmp_path / "mail") == []
    assert tmp_files(tmp_path / "mail") == []
    assert "event=accepted" not in proc.stderr


def test_in_process_stop_aborts_open_message(server_factory):
    """``Server.stop()`` (what the fixtures use) keeps the same promise."""
    srv = server_factory(shutdown_grace=0.2)
    c = RawSMTP(srv.host, srv.port)
    try:
        c.ehlo()
        c.envelope(SENDER, ALICE)
        assert c.cmd("DATA").code == 354
        c.send(b"Subject: x\r\n\r\n" + b"v" * 400_000)
        srv.stop()
        r = c.reply()
        assert r.code == 421, r
    finally:
        c.close()
    assert all_delivered(srv.mail_dir) == []
    assert tmp_files(srv.mail_dir) == []


class _SlowFlushStorage:
    """Maildir whose spill writes take ``delay`` seconds: a shutdown's grace
    period can end while one is running in the worker thread."""

    def __init__(self, root: str, delay: float) -> None:
        from simplesmtp.storage.maildir import MaildirStorage
        self._inner = MaildirStorage(root, hostname="mx.test.example")
        self.name = self._inner.name
        self.commit_inline = False
        self.delay = delay
        self.flush_started = threading.Event()

    def open(self, envelope):
        writer = self._inner.open(envelope)
        storage = self

        class Slow:
            @property
            def needs_flush(self) -> bool:
                return writer.needs_flush

            def write(self, data: bytes) -> None:
                writer.write(data)

            def flush(self) -> None:
                storage.flush_started.set()
                time.sleep(storage.delay)
                writer.flush()

            def commit(self) -> None:
                writer.commit()

            def abort(self) -> None:
                writer.abort()

        return Slow()

    def close(self) -> None:
        self._inner.close()


def test_stop_while_a_flush_runs_still_closes_with_421(server_factory, tmp_path):
    storage = _SlowFlushStorage(str(tmp_path / "mail"), delay=0.8)
    srv = server_factory(storage=storage, shutdown_grace=0.1)
    c = RawSMTP(srv.host, srv.port)
    try:
        c.ehlo()
        c.envelope(SENDER, ALICE)
        assert c.cmd("DATA").code == 354
        c.send(b"Subject: x\r\n\r\n" + b"f" * 600_000)
        assert storage.flush_started.wait(5)
        srv.stop()
        r = c.reply()
        assert r.code == 421 and r.lines[0].startswith("4.3.2"), r
        assert c.is_closed()
    finally:
        c.close()
    assert all_delivered(tmp_path / "mail") == []
    assert tmp_files(tmp_path / "mail") == []
