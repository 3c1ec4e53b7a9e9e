"""Nothing acknowledged is lost, even by SIGKILL (issue 6).

Many clients deliver concurrently to a server running as a child process;
the server is killed with SIGKILL while they do.  Afterwards:

* every message whose 250 reached its client is in ``new/`` of each of its
  recipients' mailboxes, byte for byte (after the trace headers);
* every file in any ``new/`` is a complete message (killed between the link
  and the reply is allowed: delivered, the client just did not hear it);
* a restarted server removes leftovers in ``tmp/`` older than a day and
  keeps everything else.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import socket
import threading
import time
from dataclasses import dataclass, field

from clients import dot_stuff
from conftest import all_delivered, mailbox_dir, split_trace, tmp_files

SENDER = "crash@client.example"
MAILBOXES = [f"box{i}@crash.example" for i in range(6)]
CLIENTS = 16
KILL_AFTER_ACKS = 150  # kill once this many messages are acknowledged...
KILL_AFTER_SECONDS = 8.0  # ...or after this long, whichever is first
_ID = re.compile(rb"^X-Crash-Id: (\S+)\r\n", re.MULTILINE)


@dataclass
class Ledger:
    """What clients sent and what they were told, shared by the threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    sent: dict[str, bytes] = field(default_factory=dict)  # id -> message
    acked: dict[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)  # id -> qid, rcpts
    errors: list[str] = field(default_factory=list)


def _message(rng: random.Random, ident: str) -> bytes:
    # Mostly small, some over the 256 KiB spill threshold, so both the
    # in-memory and the written-as-it-arrives paths are killed mid-way.
    size = rng.choice([200, 2_000, 20_000, 300_000, 700_000])
    line = hashlib.sha256(ident.encode()).hexdigest().encode()  # 64 bytes
    body = (line + b"\r\n") * (size // 66 + 1)
    return (b"From: <" + SENDER.encode() + b">\r\nSubject: crash test\r\n"
            b"X-Crash-Id: " + ident.encode() + b"\r\n\r\n" + body)


class _Client:
    """A minimal pipelining-free SMTP client over a socket."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""

    def reply(self) -> tuple[int, str]:
        while True:
            while b"\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("closed")
                self.buf += chunk
            line, _, self.buf = self.buf.partition(b"\n")
            if line[3:4] != b"-":
                return int(line[:3]), line[4:].decode("utf-8", "replace").strip()

    def cmd(self, text: str) -> tuple[int, str]:
        self.sock.sendall(text.encode() + b"\r\n")
        return self.reply()


def _deliver_until_dead(port: int, n: int, ledger: Ledger, stop: threading.Event) -> None:
    rng = random.Random(n)
    seq = 0
    try:
        c = _Client(port)
        assert c.reply()[0] == 220
        assert c.cmd("EHLO crash.client")[0] == 250
        while not stop.is_set() and seq < 10_000:  # bounded; the kill ends it sooner
            seq += 1
            ident = f"c{n}-m{seq}"
            message = _message(rng, ident)
            rcpts = tuple(rng.sample(MAILBOXES, rng.randint(1, 3)))
            with ledger.lock:
                ledger.sent[ident] = message
            assert c.cmd(f"MAIL FROM:<{SENDER}>")[0] == 250
            for r in rcpts:
                assert c.cmd(f"RCPT TO:<{r}>")[0] == 250
            assert c.cmd("DATA")[0] == 354
            c.sock.sendall(dot_stuff(message))
            code, text = c.reply()
            if code != 250:
                with ledger.lock:
                    ledger.errors.append(f"{ident}: {code} {text}")
                return
            qid = re.search(r"queued as (\S+)", text)
            assert qid, text
            with ledger.lock:
                ledger.acked[ident] = (qid.group(1), rcpts)
    except (OSError, ConnectionError):
        return  # the server died under us: expected


def test_sigkill_loses_no_acknowledged_message(spawn_server, tmp_path):
    mail = tmp_path / "mail"
    proc = spawn_server("--max-connections-per-ip", "0")
    port = proc.port
    ledger = Ledger()
    stop = threading.Event()
    threads = [threading.Thread(target=_deliver_until_dead, args=(port, n, ledger, stop),
                                daemon=True) for n in range(CLIENTS)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + KILL_AFTER_SECONDS
    while time.monotonic() < deadline:
        with ledger.lock:
            if len(ledger.acked) >= KILL_AFTER_ACKS:
                break
        time.sleep(0.01)
    proc.proc.kill()  # SIGKILL: no cleanup, no flush, no goodbye
    proc.proc.wait(10)
    stop.set()
    for t in threads:
        t.join(15)
    assert not any(t.is_alive() for t in threads)

    assert not ledger.errors, ledger.errors
    acked = dict(ledger.acked)
    assert len(acked) >= 20, f"only {len(acked)} messages acknowledged before the kill"

    # 1. Every acknowledged message is complete in every recipient's new/.
    for ident, (qid, rcpts) in acked.items():
        for rcpt in rcpts:
            new = mailbox_dir(mail, rcpt) / "new"
            matches = [p for p in new.iterdir() if f"Q{qid}." in p.name]
            assert len(matches) == 1, (ident, rcpt, qid)
            _, content = split_trace(matches[0].read_bytes())
            assert content == ledger.sent[ident], f"{ident} differs in {rcpt}"

    # 2. Nothing partial is visible: every file in new/ is a whole message.
    visible = all_delivered(mail)
    assert visible
    for path in visible:
        _, content = split_trace(path.read_bytes())
        m = _ID.search(content)
        assert m, f"{path.name}: no id, a partial message?"
        assert content == ledger.sent[m.group(1).decode()], f"{path.name} is partial"

    # 3. A restart removes tmp/ leftovers older than a day, and only those.
    leftovers = tmp_files(mail)
    old_tmp = mailbox_dir(mail, MAILBOXES[0]) / "tmp" / "1.M1P1Qold.crash"
    old_tmp.write_bytes(b"half a message from long ago")
    fresh_tmp = mailbox_dir(mail, MAILBOXES[1]) / "tmp" / "2.M2P2Qfresh.crash"
    fresh_tmp.write_bytes(b"a message being written right now")
    two_days_ago = time.time() - 2 * 86400
    for p in [*leftovers, old_tmp]:
        os.utime(p, (two_days_ago, two_days_ago))
    restarted = spawn_server("--max-connections-per-ip", "0")
    c = _Client(restarted.port)
    assert c.reply()[0] == 220
    c.sock.close()
    assert not old_tmp.exists()
    assert not any(p.exists() for p in leftovers)
    assert fresh_tmp.exists()
    assert sorted(all_delivered(mail)) == sorted(visible)
