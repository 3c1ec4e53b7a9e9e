"""End to end: the real server on 127.0.0.1, real clients, real Maildir.

Stored convention under test: a delivered file is ``Return-Path`` and
``Received`` followed by the client's message exactly as on the wire after
dot-unstuffing, with CRLF line endings (DATA: bare CR/LF normalised to
CRLF; BDAT: byte-exact, whatever the bytes).
"""

from __future__ import annotations

import email
import email.policy
import logging
import mailbox
import os
import re
import shutil
import smtplib
import socket
import subprocess
import time
from pathlib import Path

import pytest
from clients import ConnectionClosed, RawSMTP, corpus_files, queue_id_of, to_crlf, wait_until
from conftest import (
    TEST_HOSTNAME,
    all_delivered,
    delivered,
    mailbox_dir,
    read_message,
    split_trace,
    tmp_files,
)

SENDER = "sender@client.example"
ALICE = "alice@example.com"

CORPUS = corpus_files()


def _expected_after_smtplib(raw: bytes) -> bytes:
    """What smtplib puts on the wire for bytes (before stuffing): the
    message as given, plus CRLF if it does not end with one."""
    msg = to_crlf(raw)
    if not msg.endswith(b"\r\n"):
        msg += b"\r\n"
    return msg


def _only_message(mail_dir: Path, address: str) -> bytes:
    files = delivered(mail_dir, address)
    assert len(files) == 1, files
    return read_message(files[0])


# --- corpus -------------------------------------------------------------------

def test_corpus_is_present():
    assert len(CORPUS) > 100, "the shared corpus is missing"


@pytest.mark.parametrize("path", CORPUS, ids=[p.name for p in CORPUS])
def test_corpus_message_arrives_byte_exact(smtp_server, path):
    raw = path.read_bytes()
    wire = to_crlf(raw)
    with smtplib.SMTP(smtp_server.host, smtp_server.port, timeout=10) as client:
        client.ehlo("client.test")
        code, _ = client.mail(SENDER)
        assert code == 250
        code, _ = client.rcpt(ALICE)
        assert code == 250
        code, resp = client.data(wire)
        assert code == 250, resp
    qid = queue_id_of(resp.decode())

    files = delivered(smtp_server.mail_dir, ALICE)
    assert len(files) == 1
    assert qid in files[0].name
    stored = read_message(files[0])
    trace, content = split_trace(stored)
    assert content == _expected_after_smtplib(raw)
    assert trace["return-path"] == f"<{SENDER}>"
    assert f"id {qid}" in trace["received"]
    assert f"for <{ALICE}>" in trace["received"]
    assert f"by {TEST_HOSTNAME}" in trace["received"]
    assert "from client.test ([127.0.0.1])" in trace["received"]
    assert "with ESMTP" in trace["received"]

    box = mailbox.Maildir(mailbox_dir(smtp_server.mail_dir, ALICE), create=False)
    keys = box.keys()
    assert len(keys) == 1
    assert box.get_bytes(keys[0]) == stored
    msg = box[keys[0]]
    assert msg["Return-Path"] == f"<{SENDER}>"
    assert msg.get_subdir() == "new"
    assert not (tmp_files(smtp_server.mail_dir))


def test_corpus_in_one_session_with_helo(smtp_server):
    """The whole corpus over one plain-SMTP (HELO) session: one file each."""
    with smtplib.SMTP(smtp_server.host, smtp_server.port, timeout=10) as client:
        client.helo("old.client.test")
        for path in CORPUS:
            client.sendmail(SENDER, [ALICE], to_crlf(path.read_bytes()))
    files = delivered(smtp_server.mail_dir, ALICE)
    assert len(files) == len(CORPUS)
    contents = sorted(split_trace(read_message(f))[1] for f in files)
    assert contents == sorted(_expected_after_smtplib(p.read_bytes()) for p in CORPUS)
    trace, _ = split_trace(read_message(files[0]))
    assert "with SMTP" in trace["received"]


# --- BDAT ---------------------------------------------------------------------

BINARY = (b"\x00\x01\xff\xfe binary \r lone CR \n lone LF \r\n.\r\n not the end\r\n"
          b"..leading dots stay\r\n" + bytes(range(256)) + b"\x00" * 10 + b"\r")


@pytest.mark.parametrize("pipelined", [False, True], ids=["lockstep", "pipelined"])
def test_bdat_binary_chunks_stored_byte_exact(smtp_server, pipelined):
    chunks = [BINARY[:7], BINARY[7:100], b"", BINARY[100:], b"\r\n.\r\n", b"\x00"]
    with RawSMTP(smtp_server.host, smtp_server.port) as c:
        ehlo = c.ehlo()
        assert "CHUNKING" in ehlo.lines
        c.envelope(SENDER, ALICE, mail_params="BODY=8BITMIME")
        replies = c.bdat(chunks, pipelined=pipelined)
        assert [r.code for r in replies] == [250] * len(chunks), replies
        assert "queued as" in replies[-1].text
        assert c.cmd("QUIT").code == 221
    _, content = split_trace(_only_message(smtp_server.mail_dir, ALICE))
    assert content == b"".join(chunks)


def test_bdat_zero_last_and_data_after_bdat(smtp_server):
    with RawSMTP(smtp_server.host, smtp_server.port) as c:
        c.ehlo()
        c.envelope(SENDER, ALICE)
        c.send(b"BDAT 10\r\npart one\r\n")
        assert c.reply().code == 250
        assert c.cmd("DATA").code == 503  # RFC 3030 §3: no DATA after BDAT
        c.send(b"BDAT 0 LAST\r\n")
        r = c.reply()
        assert r.code == 250 and "queued as" in r.text
    _, content = split_trace(_only_message(smtp_server.mail_dir, ALICE))
    assert content == b"part one\r\n"


def test_bdat_large_message_streamed(smtp_server):
    """Several MiB in 64 KiB chunks: stored whole (spills to tmp/ on the way)."""
    body = bytes(range(256)) * (4 * 4096 + 7)  # ~4 MiB, every byte value
    chunks = [body[i:i + 65536] for i in range(0, len(body), 65536)]
    with RawSMTP(smtp_server.host, smtp_server.port) as c:
        c.ehlo()
        c.envelope(SENDER, ALICE)
        replies = c.bdat(chunks, pipelined=True)
        assert all(r.code == 250 for r in replies)
    _, content = split_trace(_only_message(smtp_server.mail_dir, ALICE))
    assert content == body


# --- swaks and smtp-source -------------------------------------------------------

def _tool(name: str) -> str:
    """Path of a client program; scripts/test.sh installs them all, so a
    missing one fails the test rather than silently skipping it."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if path is None:
        pytest.fail(f"{name} is not installed: run scripts/test.sh (apt: swaks, postfix)")
    return path


@pytest.mark.parametrize("pipeline", [False, True], ids=["plain", "pipeline"])
def test_swaks_attachment(smtp_server, tmp_path, pipeline):
    attachment = tmp_path / "report.bin"
    payload = bytes(range(256)) * 40 + b"\r\n.\r\n" + b"\x00end"
    attachment.write_bytes(payload)
    cmd = [_tool("swaks"), "--server", f"{smtp_server.host}:{smtp_server.port}",
           "--to", ALICE, "--from", SENDER, "--helo", "swaks.test",
           "--header", "Subject: quarterly report",
           "--attach-type", "application/octet-stream", "--attach", f"@{attachment}",
           "--timeout", "10", "--suppress-data"]
    if pipeline:
        cmd.append("--pipeline")
    p = subprocess.run(cmd, capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    out = p.stdout.decode("utf-8", "replace")
    assert p.returncode == 0, out + p.stderr.decode("utf-8", "replace")
    if pipeline:
        assert "PIPELINING" in out
    assert re.search(r"^<\S*\s+250 2\.0\.0 Ok: queued as", out, re.M), out
    stored = _only_message(smtp_server.mail_dir, ALICE)
    _, content = split_trace(stored)
    msg = email.message_from_bytes(content, policy=email.policy.default)
    assert msg["Subject"] == "quarterly report"
    parts = [part for part in msg.walk() if part.get_filename() == "report.bin"]
    assert len(parts) == 1
    assert parts[0].get_payload(decode=True) == payload
    assert b"\r\n" in content and b"\n" not in content.replace(b"\r\n", b"")


def test_smtp_source_1000_messages_10_sessions(smtp_server):
    rcpt = "load@example.com"
    p = subprocess.run(
        [_tool("smtp-source"), "-s", "10", "-m", "1000", "-l", "2000", "-M", "source.test",
         "-f", SENDER, "-t", rcpt, "-S", "load test",
         f"{smtp_server.host}:{smtp_server.port}"],
        capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr.decode("utf-8", "replace")
    files = delivered(smtp_server.mail_dir, rcpt)
    assert len(files) == 1000
    assert len({f.name for f in files}) == 1000
    assert all_delivered(smtp_server.mail_dir) == files
    assert smtp_server.server.messages_accepted == 1000
    _, content = split_trace(read_message(files[0]))
    assert b"Subject: load test\r\n" in content
    assert not tmp_files(smtp_server.mail_dir)


def _has_ipv6_loopback() -> bool:
    import socket
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")
def test_ipv6_listener_and_trace_header(server_factory):
    srv = server_factory(host="::1")
    assert srv.host == "::1"
    with smtplib.SMTP("::1", srv.port, timeout=10) as client:
        client.ehlo("v6.client.test")
        assert client.sendmail(SENDER, [ALICE], b"Subject: v6\r\n\r\nhi\r\n") == {}
    trace, _ = split_trace(_only_message(srv.mail_dir, ALICE))
    assert "from v6.client.test ([IPv6:::1])" in trace["received"]


# --- addresses, recipients ------------------------------------------------------

def test_smtputf8_addresses(smtp_server):
    sender = "jörg@absender.example"
    rcpts = ["ålice@exämple.com", "用户@例子.测试"]
    message = "Subject: Grüße\r\n\r\nÜnïcödé body ✓\r\n".encode()
    with smtplib.SMTP(smtp_server.host, smtp_server.port, timeout=10) as client:
        client.ehlo("client.test")
        assert client.has_extn("smtputf8")
        refused = client.sendmail(sender, rcpts, message, mail_options=["SMTPUTF8"])
        assert refused == {}
    root = smtp_server.mail_dir
    for rcpt in rcpts:
        local, _, domain = rcpt.partition("@")
        files = list((root / domain / local / "new").iterdir())
        assert len(files) == 1
        trace, content = split_trace(read_message(files[0]))
        assert content == message
        assert trace["return-path"] == f"<{sender}>"
        assert "with UTF8SMTP" in trace["received"]
    assert len(all_delivered(root)) == 2


def test_utf8_address_without_smtputf8_refused(smtp_server):
    with RawSMTP(smtp_server.host, smtp_server.port) as c:
        c.ehlo()
        r = c.cmd("MAIL FROM:<jörg@absender.example>")
        assert r.code == 553 and r.lines[0].startswith("5.6.7")
        assert c.cmd("MAIL FROM:<jörg@absender.example> SMTPUTF8").code == 250
        assert c.cmd("QUIT").code == 221
    assert not all_delivered(smtp_server.mail_dir)


def test_multiple_recipients_one_copy_each(smtp_server):
    rcpts = ["a@one.example", "b@one.example", "c@two.example", "Bob@Three.Example",
             "bob@three.example"]  # the last two share a mailbox
    message = b"Subject: many\r\n\r\nhello all\r\n"
    with smtplib.SMTP(smtp_server.host, smtp_server.port, timeout=10) as client:
        assert client.sendmail(SENDER, rcpts, message) == {}
    root = smtp_server.mail_dir
    files = all_delivered(root)
    assert len(files) == 4  # one per mailbox
    for rcpt in ["a@one.example", "b@one.example", "c@two.example", "bob@three.example"]:
        got = delivered(root, rcpt)
        assert len(got) == 1, rcpt
        trace, content = split_trace(read_message(got[0]))
        assert content == message
        assert " for <" not in trace["received"]  # several recipients
    assert len({f.name for f in files}) == 1  # same queue id everywhere


def test_null_sender_and_bare_postmaster(smtp_server):
    """A bounce (MAIL FROM:<>) to <postmaster> (no domain, RFC 5321 §4.5.1)
    lands in our own domain's postmaster mailbox with ``Return-Path: <>``."""
    with RawSMTP(smtp_server.host, smtp_server.port) as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<>").code == 250
        assert c.cmd("RCPT TO:<Postmaster>").code == 250
        assert c.data(b"Subject: bounce\r\n\r\nundeliverable\r\n").code == 250
    [path] = all_delivered(smtp_server.mail_dir)
    assert path.parent.parent == smtp_server.mail_dir / TEST_HOSTNAME / "postmaster"
    trace, content = split_trace(read_message(path))
    assert trace["return-path"] == "<>"
    assert content == b"Subject: bounce\r\n\r\nundeliverable\r\n"


def test_recipient_limit_452_and_accepted_ones_get_it(smtp_server):
    rcpts = [f"user{i}@many.example" for i in range(101)]
    with smtplib.SMTP(smtp_server.host, smtp_server.port, timeout=10) as client:
        refused = client.sendmail(SENDER, rcpts, b"Subject: crowd\r\n\r\nhi\r\n")
    assert list(refused) == [rcpts[100]]
    assert refused[rcpts[100]][0] == 452
    files = all_delivered(smtp_server.mail_dir)
    assert len(files) == 100
    assert len({f.stat().st_ino for f in files}) == 1  # hard links, one copy
    assert delivered(smtp_server.mail_dir, rcpts[100]) == []


ESCAPES = [
    '"../x"@d.example', '"a/b"@d.example', '"a%2Fb"@d.example', '".."@d.example',
    '"."@d.example', '"x/../../y"@d.example', '"\\\\server\\\\share"@d.example',
    '"a b"@d.example', '"a:b"@d.example', '"~root"@d.example',
    "ab@d.example", "AB@d.example",  # same mailbox by design (lower-cased)
    "x" * 64 + "@d.example",
    "x" * 63 + "y@d.example",  # long names differing only at the end
    '"' + "/" * 62 + '"@d.example',
    "user@[127.0.0.1]", "user@[IPv6:::1]", "user@D.Example",
]


def test_hostile_recipient_addresses_stay_inside_and_do_not_collide(smtp_server):
    root = smtp_server.mail_dir.resolve()
    with RawSMTP(smtp_server.host, smtp_server.port) as c:
        c.ehlo()
        for i, rcpt in enumerate(ESCAPES):
            r = c.cmd(f"MAIL FROM:<{SENDER}>")
            assert r.code == 250
            r = c.cmd(f"RCPT TO:<{rcpt}>")
            assert r.code == 250, (rcpt, r)
            r = c.data(f"Subject: {i}\r\n\r\nfor {rcpt}\r\n".encode())
            assert r.code == 250, (rcpt, r)
    # Everything is inside the mail dir, in a mailbox two levels down.
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            real = Path(os.path.realpath(os.path.join(dirpath, name)))
            assert real.is_relative_to(root), real
            assert "/" not in name and "\x00" not in name
            assert len(name.encode()) <= 255
    files = all_delivered(root)
    assert all(f.parent.parent.parent.parent == root for f in files)
    # Each address's message is in its own mailbox; equal only when the
    # addresses differ just by case.
    by_box: dict[Path, list[str]] = {}
    for f in files:
        trace, _ = split_trace(read_message(f))
        m = re.search(r"for <(.*)>;", trace["received"])
        assert m
        by_box.setdefault(f.parent.parent, []).append(m.group(1))
    groups = sorted(sorted(v) for v in by_box.values())
    expected_shared = sorted(["ab@d.example", "AB@d.example"])
    assert expected_shared in groups
    assert sorted(g for g in groups if len(g) > 1) == [expected_shared], groups
    assert len(files) == len(ESCAPES)
    # Domains: lower-cased; "user@D.Example" shares no box with anything.
    assert (root / "d.example").is_dir()
    assert not (root / "D.Example").exists()


# --- size limit ---------------------------------------------------------------------

def test_oversize_data_552_then_session_continues(server_factory):
    srv = server_factory(max_message_size=10_000)
    big = b"Subject: big\r\n\r\n" + b"x" * 78 + b"\r\n"
    big = big * 200  # ~16 KB
    small = b"Subject: small\r\n\r\nok\r\n"
    with smtplib.SMTP(srv.host, srv.port, timeout=10) as client:
        assert client.has_extn("size") or client.ehlo()[0] == 250
        assert client.esmtp_features["size"] == "10000"
        # SIZE= declared at MAIL (smtplib adds it): refused up front.
        with pytest.raises(smtplib.SMTPSenderRefused) as info:
            client.sendmail(SENDER, [ALICE], big)
        assert info.value.smtp_code == 552
        assert info.value.smtp_error.startswith(b"5.3.4")
        # Not declared: the limit is enforced while the data arrives.
        assert client.mail(SENDER)[0] == 250
        assert client.rcpt(ALICE)[0] == 250
        code, resp = client.data(big)
        assert code == 552 and resp.startswith(b"5.3.4"), resp
        assert client.noop()[0] == 250
        assert client.sendmail(SENDER, [ALICE], small) == {}
    _, content = split_trace(_only_message(srv.mail_dir, ALICE))
    assert content == small
    assert not tmp_files(srv.mail_dir)


def test_oversize_bdat_552_then_session_continues(server_factory):
    srv = server_factory(max_message_size=4096)
    with RawSMTP(srv.host, srv.port) as c:
        c.ehlo()
        c.envelope(SENDER, ALICE)
        replies = c.bdat([b"a" * 3000, b"b" * 3000, b"c" * 10], pipelined=True)
        assert replies[0].code == 250
        assert replies[1].code == 552 and replies[1].lines[0].startswith("5.3.4")
        assert replies[2].code in (503, 554)  # the transaction is gone
        c.envelope(SENDER, ALICE)
        r = c.bdat([b"fits\r\n"])[0]
        assert r.code == 250 and "queued as" in r.text
    _, content = split_trace(_only_message(srv.mail_dir, ALICE))
    assert content == b"fits\r\n"


@pytest.mark.parametrize("how", ["data", "bdat"])
def test_size_limit_boundary(server_factory, how):
    """Exactly the limit is accepted, one octet more is not (RFC 1870)."""
    limit = 2000
    srv = server_factory(max_message_size=limit)
    fits = b"Subject: edge\r\n\r\n" + b"e" * (limit - 19) + b"\r\n"
    assert len(fits) == limit
    over = fits[:-2] + b"e\r\n"
    with RawSMTP(srv.host, srv.port) as c:
        c.ehlo()
        assert c.cmd(f"MAIL FROM:<{SENDER}> SIZE={limit + 1}").code == 552
        for message, code in [(fits, 250), (over, 552)]:
            c.envelope(SENDER, ALICE, mail_params=f"SIZE={limit}")
            if how == "data":
                r = c.data(message)
            else:
                r = c.bdat([message])[0]
            assert r.code == code, (len(message), r)
            if code != 250:
                c.cmd("RSET")
    _, content = split_trace(_only_message(srv.mail_dir, ALICE))
    assert content == fits


def test_oversize_spilled_data_leaves_no_tmp_file(server_factory):
    """Big enough to be written to tmp/ before the limit hits."""
    srv = server_factory(max_message_size=1_000_000)
    line = b"y" * 998 + b"\r\n"
    with RawSMTP(srv.host, srv.port) as c:
        c.ehlo()
        c.envelope(SENDER, ALICE)
        r = c.data(line * 1500)
        assert r.code == 552
        assert c.cmd("RSET").code == 250
        c.envelope(SENDER, ALICE)
        assert c.data(line * 500).code == 250
    assert len(delivered(srv.mail_dir, ALICE)) == 1
    assert not tmp_files(srv.mail_dir)


# --- DATA smuggling -------------------------------------------------------------

SMUGGLE_ENDS = [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r",
                b"\n.\r", b"\r.\n", b"\n..\n", b"\r\n\n.\n"]

_ANY_EOL = re.compile(rb"\r\n|\r|\n")


def _stored_form(wire_body: bytes) -> bytes:
    """The documented DATA convention, independently: periods after a real
    CRLF are unstuffed, then bare CR and bare LF become CRLF."""
    unstuffed = (b"\r\n" + wire_body).replace(b"\r\n.", b"\r\n")[2:]
    return _ANY_EOL.sub(b"\r\n", unstuffed)


@pytest.mark.parametrize("mode", ["whole", "bytewise"])
@pytest.mark.parametrize("fake_end", SMUGGLE_ENDS, ids=[repr(e)[2:-1] for e in SMUGGLE_ENDS])
def test_data_smuggling_is_content(smtp_server, fake_end, mode):
    victim = "victim@example.com"
    body = (b"Subject: smuggle\r\n\r\nbefore" + fake_end +
            b"MAIL FROM:<evil@attacker.example>\r\nRCPT TO:<" + victim.encode() + b">\r\n"
            b"DATA\r\nSubject: smuggled\r\n\r\nsmuggled text\r\n")
    wire = body + b".\r\n"  # the one real end: <CRLF>.<CRLF>
    with RawSMTP(smtp_server.host, smtp_server.port) as c:
        c.ehlo()
        c.envelope(SENDER, ALICE)
        assert c.cmd("DATA").code == 354
        if mode == "whole":
            c.send(wire + b"QUIT\r\n")
        else:
            c.send_slowly(wire + b"QUIT\r\n")
        replies = c.read_until_closed()
    assert [r.code for r in replies] == [250, 221], replies
    assert delivered(smtp_server.mail_dir, victim) == []
    assert len(all_delivered(smtp_server.mail_dir)) == 1
    _, content = split_trace(_only_message(smtp_server.mail_dir, ALICE))
    assert b"MAIL FROM:<evil@attacker.example>\r\n" in content
    assert b"smuggled text\r\n" in content
    assert content == _stored_form(body)


_PIECES = [b".", b"..", b"\r\n", b"\n", b"\r", b"\r\n.", b"\n.", b"\r.", b"text ",
           b"\x00", b"\xff\xfe", b"x" * 1000, b"y" * 70_000, b"\r\r\r\r", b"\n\n"]


def _random_body(rng, size: int) -> bytes:
    out, n = [], 0
    while n < size:
        piece = rng.choice(_PIECES)
        out.append(piece)
        n += len(piece)
    return b"".join(out)


def _send_in_random_pieces(c, rng, data: bytes) -> None:
    i = 0
    while i < len(data):
        step = rng.choice([1, 2, 3, 5, 100, 1500, 65536, 300_000])
        c.send(data[i:i + step])
        i += step


def test_data_stream_random_bodies_and_splits(smtp_server):
    """Bounded fuzz over a real socket: bodies full of periods and bare
    line endings, sent in random pieces, are stored by the convention
    (unstuffed after real CRLFs, then bare CR/LF as CRLF)."""
    import random
    rng = random.Random(int(os.environ.get("FUZZ_SEED", "5321")))
    expected = []
    with RawSMTP(smtp_server.host, smtp_server.port, timeout=30) as c:
        c.ehlo()
        for _ in range(12):
            body = _random_body(rng, rng.choice([10, 3000, 70_000, 600_000]))
            wire = (b"\r\n" + body).replace(b"\r\n.", b"\r\n..")[2:]
            if not wire.endswith(b"\r\n"):
                wire += b"\r\n"
            c.envelope(SENDER, ALICE)
            assert c.cmd("DATA").code == 354
            _send_in_random_pieces(c, rng, wire + b".\r\n")
            r = c.reply()
            assert r.code == 250, r
            expected.append((queue_id_of(r.text), _stored_form(wire)))
    for qid, stored in expected:
        [path] = [f for f in delivered(smtp_server.mail_dir, ALICE) if qid in f.name]
        _, content = split_trace(read_message(path))
        assert content == stored, qid


def test_bdat_random_binary_and_splits(smtp_server):
    import random
    rng = random.Random(int(os.environ.get("FUZZ_SEED", "3030")))
    with RawSMTP(smtp_server.host, smtp_server.port, timeout=30) as c:
        c.ehlo()
        for _ in range(6):
            body = _random_body(rng, rng.choice([10, 70_000, 600_000]))
            cuts = sorted(rng.sample(range(len(body)), min(5, len(body))))
            chunks = [body[a:b] for a, b in zip([0] + cuts, cuts + [len(body)], strict=True)]
            c.envelope(SENDER, ALICE)
            wire = b"".join(b"BDAT %d%s\r\n" % (len(ch), b" LAST" if i == len(chunks) - 1
                                                   else b"") + ch
                            for i, ch in enumerate(chunks))
            _send_in_random_pieces(c, rng, wire)
            replies = c.replies(len(chunks))
            assert all(r.code == 250 for r in replies), replies
            [path] = [f for f in delivered(smtp_server.mail_dir, ALICE)
                      if queue_id_of(replies[-1].text) in f.name]
            assert split_trace(read_message(path))[1] == body


def test_dot_stuffing_undone(smtp_server):
    message = b".leading\r\n..two\r\n.\r\n \r\nend .\r\n."
    with RawSMTP(smtp_server.host, smtp_server.port) as c:
        c.ehlo()
        c.envelope(SENDER, ALICE)
        assert c.data(message).code == 250
    _, content = split_trace(_only_message(smtp_server.mail_dir, ALICE))
    assert content == message + b"\r\n"


# --- disconnects ---------------------------------------------------------------------

@pytest.mark.parametrize("size", [100, 700_000], ids=["small", "spilled"])
@pytest.mark.parametrize("how", ["close", "reset"])
def test_disconnect_mid_data_delivers_nothing(smtp_server, size, how):
    with RawSMTP(smtp_server.host, smtp_server.port) as c:
        c.ehlo()
        c.envelope(SENDER, ALICE)
        assert c.cmd("DATA").code == 354
        c.send(b"Subject: half\r\n\r\n" + b"z" * size + b"\r\n.")  # no final CRLF
        c.close() if how == "close" else c.abort()
    assert smtp_server.wait_idle()
    assert wait_until(lambda: not tmp_files(smtp_server.mail_dir), timeout=5)
    assert all_delivered(smtp_server.mail_dir) == []
    assert smtp_server.server.messages_accepted == 0


@pytest.mark.parametrize("size", [100, 700_000], ids=["small", "spilled"])
def test_disconnect_mid_bdat_delivers_nothing(smtp_server, size):
    with RawSMTP(smtp_server.host, smtp_server.port) as c:
        c.ehlo()
        c.envelope(SENDER, ALICE)
        c.send(b"BDAT 13\r\nfirst chunk\r\n")
        assert c.reply().code == 250
        c.send(b"BDAT %d LAST\r\n" % (size * 2) + b"q" * size)  # half the chunk
        c.close()
    assert smtp_server.wait_idle()
    assert wait_until(lambda: not tmp_files(smtp_server.mail_dir), timeout=5)
    assert all_delivered(smtp_server.mail_dir) == []


# --- storage failure -------------------------------------------------------------

def _break_mailbox(root: Path, address: str, sub: str) -> Path:
    """Make ``sub`` (tmp or new) of a mailbox a regular file: writes fail
    even for root, who ignores permissions."""
    box = mailbox_dir(root, address)
    for d in ("tmp", "new", "cur"):
        (box / d).mkdir(parents=True, exist_ok=True)
    (box / sub).rmdir()
    (box / sub).write_bytes(b"not a directory")
    return box


def test_storage_failure_451_and_session_survives(smtp_server, caplog):
    caplog.set_level(logging.INFO, logger="simplesmtp")
    root = smtp_server.mail_dir
    good, broken = "good@example.com", "broken@example.com"
    _break_mailbox(root, broken, "new")
    with smtplib.SMTP(smtp_server.host, smtp_server.port, timeout=10) as client:
        client.ehlo("client.test")
        assert client.mail(SENDER)[0] == 250
        assert client.rcpt(good)[0] == 250
        assert client.rcpt(broken)[0] == 250
        code, resp = client.data(b"Subject: fails\r\n\r\nbody\r\n")
        assert (code, resp[:5]) == (451, b"4.3.0"), resp
        # The session goes on; the good mailbox got nothing from the failure.
        assert delivered(root, good) == []
        assert client.sendmail(SENDER, [good], b"Subject: works\r\n\r\nbody\r\n") == {}
    assert len(delivered(root, good)) == 1
    assert len(all_delivered(root)) == 1
    assert not tmp_files(root)
    assert any("event=storage_error" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("size", [10, 600_000], ids=["small", "spilled"])
def test_storage_failure_writing_tmp(smtp_server, size):
    root = smtp_server.mail_dir
    _break_mailbox(root, ALICE, "tmp")
    with RawSMTP(smtp_server.host, smtp_server.port) as c:
        c.ehlo()
        c.envelope(SENDER, ALICE)
        r = c.data(b"Subject: x\r\n\r\n" + b"w" * size + b"\r\n")
        assert r.code == 451 and r.lines[0].startswith("4.3.0"), r
        assert c.cmd("NOOP").code == 250
        c.envelope(SENDER, "other@example.com")
        assert c.data(b"Subject: y\r\n\r\nfine\r\n").code == 250
    assert all_delivered(root) == delivered(root, "other@example.com")
    assert len(all_delivered(root)) == 1


def test_storage_failure_bdat(smtp_server):
    _break_mailbox(smtp_server.mail_dir, ALICE, "new")
    with RawSMTP(smtp_server.host, smtp_server.port) as c:
        c.ehlo()
        c.envelope(SENDER, ALICE)
        r = c.bdat([b"one\r\n", b"two\r\n"])[-1]
        assert r.code == 451 and r.lines[0].startswith("4.3.0")
        assert c.cmd("RSET").code == 250
    assert all_delivered(smtp_server.mail_dir) == []
    assert not tmp_files(smtp_server.mail_dir)


def test_storage_failure_spilled_bdat(smtp_server):
    _break_mailbox(smtp_server.mail_dir, ALICE, "tmp")
    with RawSMTP(smtp_server.host, smtp_server.port) as c:
        c.ehlo()
        c.envelope(SENDER, ALICE)
        replies = c.bdat([b"a" * 300_000, b"b" * 300_000, b"c" * 10], pipelined=True)
        assert replies[-1].code == 451 and replies[-1].lines[0].startswith("4.3.0")
        c.envelope(SENDER, "other@example.com")
        assert c.bdat([b"fine\r\n"])[0].code == 250
    assert all_delivered(smtp_server.mail_dir) == delivered(smtp_server.mail_dir,
                                                            "other@example.com")
    assert not tmp_files(smtp_server.mail_dir)


@pytest.mark.parametrize("how", ["data", "bdat"])
def test_rset_and_quit_abort_spilled_messages(smtp_server, how):
    with RawSMTP(smtp_server.host, smtp_server.port) as c:
        c.ehlo()
        c.envelope(SENDER, ALICE)
        if how == "bdat":
            c.send(b"BDAT 600000\r\n" + b"r" * 600_000)
            assert c.reply().code == 250
            assert c.cmd("RSET").code == 250
        else:
            assert c.cmd("DATA").code == 354
            c.send(b"r" * 600_000)
        assert smtp_server.call(lambda: 1) == 1
        if how == "bdat":
            c.envelope(SENDER, ALICE)
            assert c.bdat([b"second\r\n"])[0].code == 250
            assert c.cmd("QUIT").code == 221
    assert smtp_server.wait_idle()
    assert wait_until(lambda: not tmp_files(smtp_server.mail_dir))
    contents = [split_trace(read_message(f))[1] for f in all_delivered(smtp_server.mail_dir)]
    assert contents == ([b"second\r\n"] if how == "bdat" else [])


def test_empty_message(smtp_server):
    with RawSMTP(smtp_server.host, smtp_server.port) as c:
        c.ehlo()
        c.envelope(SENDER, ALICE)
        assert c.cmd("DATA").code == 354
        c.send(b".\r\n")
        assert c.reply().code == 250
        c.envelope(SENDER, ALICE)
        assert c.cmd("BDAT 0 LAST").code == 250
    files = delivered(smtp_server.mail_dir, ALICE)
    assert [split_trace(read_message(f))[1] for f in files] == [b"", b""]


# --- timeout -----------------------------------------------------------------------

def test_silent_client_timeout_421(server_factory):
    srv = server_factory(timeout=0.3)
    with RawSMTP(srv.host, srv.port) as c:
        c.ehlo()
        r = c.reply()  # sent by the server on its own after ~0.3 s
        assert r.code == 421 and r.lines[0].startswith("4.4.2"), r
        assert c.is_closed()


def test_timeout_mid_data_delivers_nothing(server_factory):
    srv = server_factory(timeout=0.3, data_timeout=0.3)
    with RawSMTP(srv.host, srv.port) as c:
        c.ehlo()
        c.envelope(SENDER, ALICE)
        assert c.cmd("DATA").code == 354
        c.send(b"Subject: slow\r\n\r\n" + b"s" * 400_000)
        r = c.reply()
        assert r.code == 421 and r.lines[0].startswith("4.4.2"), r
        assert c.is_closed()
    assert srv.wait_idle()
    assert wait_until(lambda: not tmp_files(srv.mail_dir))
    assert all_delivered(srv.mail_dir) == []


@pytest.mark.parametrize("event_loop", ["default", "asyncio"])
def test_client_that_never_reads_is_dropped(server_factory, event_loop):
    """A client that pipelines commands and never reads the replies: once it
    times out, the session must end even though our replies (and the 421)
    cannot be written, instead of waiting forever for the client to read."""
    srv = server_factory(timeout=0.3, data_timeout=0.3, event_loop=event_loop)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect
    sock.settimeout(0.2)
    try:
        sock.connect((srv.host, srv.port))
        assert sock.recv(100).startswith(b"220 ")
        assert srv.session_count == 1
        # Each EHLO line brings ~20 times its size in reply: megabytes that
        # no kernel buffer absorbs.  Bounded: at most 40k commands, 3 s.
        burst = b"EHLO flood.test\r\n" * 1000
        deadline = time.monotonic() + 3
        for _ in range(40):
            if time.monotonic() > deadline:
                break
            try:
                sock.sendall(burst)
            except OSError:  # TimeoutError included: the server stopped reading
                break
        assert srv.wait_idle(timeout=5), "the session is still open"
    finally:
        sock.close()


def test_active_client_is_not_timed_out(server_factory):
    srv = server_factory(timeout=0.5)
    with RawSMTP(srv.host, srv.port) as c:
        c.ehlo()
        for _ in range(6):
            time.sleep(0.1)
            assert c.cmd("NOOP").code == 250


def test_trickled_command_line_still_times_out(server_factory):
    """The timeout runs from our last reply: a command sent one byte at a
    time cannot hold the session open forever."""
    srv = server_factory(timeout=0.3)
    with RawSMTP(srv.host, srv.port) as c:
        c.ehlo()
        start = time.monotonic()
        closed = False
        for byte in b"NOOP " + b"x" * 100:
            try:
                c.send(bytes([byte]))
            except OSError:
                closed = True
                break
            time.sleep(0.05)
            if time.monotonic() - start > 3:
                break
        assert time.monotonic() - start < 3, "still open after 3 s of trickling"
        try:
            r = c.reply()
        except (ConnectionClosed, ConnectionResetError):
            assert closed  # our late bytes met a closed socket: the 421 may be lost
        else:
            assert r.code == 421 and r.lines[0].startswith("4.4.2"), r


def test_overlong_command_line_500_then_continues(smtp_server):
    with RawSMTP(smtp_server.host, smtp_server.port) as c:
        c.ehlo()
        r = c.cmd("MAIL FROM:<" + "x" * 600 + "@example.com>")
        assert r.code == 500 and r.lines[0].startswith("5.5.2"), r
        c.envelope(SENDER, ALICE)
        assert c.data(b"after a long line\r\n").code == 250
    assert len(delivered(smtp_server.mail_dir, ALICE)) == 1


# --- logs -------------------------------------------------------------------------

def test_log_lines(smtp_server, caplog):
    caplog.set_level(logging.INFO, logger="simplesmtp")
    with RawSMTP(smtp_server.host, smtp_server.port) as c:
        c.ehlo()
        assert c.cmd("FROB").code == 500
        assert c.cmd("RCPT TO:<x@example.com>").code == 503
        c.envelope(SENDER, ALICE)
        r = c.data(b"Subject: logged\r\n\r\nhi\r\n")
        qid = queue_id_of(r.text)
        assert c.cmd("QUIT").code == 221
    assert smtp_server.wait_idle()

    def messages() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name.startswith("simplesmtp")]

    assert wait_until(lambda: any("event=disconnect" in m for m in messages()))
    lines = messages()
    connect = [m for m in lines if "event=connect " in m]
    assert len(connect) == 1
    sid = re.search(r"session=(\S+)", connect[0]).group(1)
    assert "peer=127.0.0.1:" in connect[0]
    mine = [m for m in lines if f"session={sid} " in m or m.endswith(f"session={sid}")]
    disconnect = [m for m in mine if "event=disconnect" in m]
    assert len(disconnect) == 1
    assert re.search(r"duration=\d+\.\d+", disconnect[0])
    assert "messages=1" in disconnect[0]
    accepted = [m for m in mine if "event=accepted" in m]
    assert len(accepted) == 1
    assert f"queue_id={qid}" in accepted[0]
    assert f"from=<{SENDER}>" in accepted[0] and "rcpts=1" in accepted[0]
    assert re.search(r"size=\d+", accepted[0])
    rejects = [m for m in mine if "event=reject" in m]
    assert any("code=500" in m for m in rejects), rejects
    assert any("code=503" in m and "verb=RCPT" in m for m in rejects), rejects
    # One event per line, never the peer's raw bytes unescaped.
    assert all("\n" not in m and "\r" not in m for m in lines)


def test_peer_text_in_logs_is_escaped(smtp_server, caplog):
    caplog.set_level(logging.INFO, logger="simplesmtp")
    with RawSMTP(smtp_server.host, smtp_server.port) as c:
        c.ehlo()
        c.envelope('"evil\\ name"@x.example', ALICE)
        assert c.data(b"hi\r\n").code == 250
    assert smtp_server.wait_idle()
    accepted = [r.getMessage() for r in caplog.records if "event=accepted" in r.getMessage()]
    assert len(accepted) == 1
    # A space in the peer's text must not split or forge a key=value field.
    import shlex
    tokens = shlex.split(accepted[0])
    assert all("=" in t for t in tokens), tokens
    fields = dict(t.split("=", 1) for t in tokens)
    assert "name" in fields["from"] and "evil" in fields["from"]
    assert "name" not in fields and fields["rcpts"] == "1"


def test_pipelined_session_replies_in_order(smtp_server):
    with RawSMTP(smtp_server.host, smtp_server.port) as c:
        c.send(b"EHLO p.test\r\nMAIL FROM:<" + SENDER.encode() + b">\r\n"
               b"RCPT TO:<a@example.com>\r\nRCPT TO:<bad>\r\nRCPT TO:<b@example.com>\r\n"
               b"DATA\r\n")
        codes = [r.code for r in c.replies(6)]
        assert codes == [250, 250, 250, 501, 250, 354]
        c.send(b"Subject: p\r\n\r\npipelined\r\n.\r\nNOOP\r\nQUIT\r\n")
        codes = [r.code for r in c.read_until_closed()]
        assert codes == [250, 250, 221]
    for rcpt in ("a@example.com", "b@example.com"):
        assert len(delivered(smtp_server.mail_dir, rcpt)) == 1


def test_connection_closed_after_quit(smtp_server):
    c = RawSMTP(smtp_server.host, smtp_server.port)
    try:
        assert c.cmd("QUIT").code == 221
        with pytest.raises(ConnectionClosed):
            c.reply()
    finally:
        c.close()


# --- the same promises on asyncio's own event loop (no uvloop) -----------------------

def test_plain_asyncio_loop_end_to_end(server_factory):
    """Without uvloop: corpus sample, BDAT, a disconnect mid-DATA and a
    timeout behave the same."""
    srv = server_factory(event_loop="asyncio", timeout=0.3, data_timeout=0.3)
    assert "uvloop" not in type(srv.loop).__module__
    sample = CORPUS[::10]
    with smtplib.SMTP(srv.host, srv.port, timeout=10) as client:
        for path in sample:
            client.sendmail(SENDER, [ALICE], to_crlf(path.read_bytes()))
    with RawSMTP(srv.host, srv.port) as c:
        c.ehlo()
        c.envelope(SENDER, ALICE)
        assert c.bdat([BINARY[:50], BINARY[50:]])[-1].code == 250
    with RawSMTP(srv.host, srv.port) as c:
        c.ehlo()
        c.envelope(SENDER, ALICE)
        assert c.cmd("DATA").code == 354
        c.send(b"z" * 600_000)
    with RawSMTP(srv.host, srv.port) as c:
        c.ehlo()
        r = c.reply()
        assert r.code == 421 and r.lines[0].startswith("4.4.2")
    assert srv.wait_idle()
    assert wait_until(lambda: not tmp_files(srv.mail_dir))
    contents = sorted(split_trace(read_message(f))[1]
                      for f in delivered(srv.mail_dir, ALICE))
    expected = sorted([_expected_after_smtplib(p.read_bytes()) for p in sample] + [BINARY])
    assert contents == expected


# --- memory stays bounded while a big message streams to disk -------------------

def _peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
@pytest.mark.parametrize("how", ["data", "bdat"])
def test_big_message_streams_with_bounded_memory(spawn_server, tmp_path, how):
    """80 MiB through one session raises the server's peak RSS by far less
    than the message: content goes to disk as it arrives."""
    proc = spawn_server("--max-message-size", str(200 * 1024 * 1024))
    size = 80 * 1024 * 1024
    line = b"m" * 1022 + b"\r\n"
    block = line * 256  # 256 KiB
    with RawSMTP(proc.host, proc.port, timeout=60) as c:
        c.ehlo()
        c.envelope(SENDER, ALICE)
        before = _peak_rss_kib(proc.proc.pid)
        if how == "data":
            assert c.cmd("DATA").code == 354
            for _ in range(size // len(block)):
                c.send(block)
            c.send(b".\r\n")
        else:
            for _ in range(size // len(block) - 1):
                c.send(b"BDAT %d\r\n" % len(block) + block)
            c.send(b"BDAT %d LAST\r\n" % len(block) + block)
            for _ in range(size // len(block) - 1):
                assert c.reply().code == 250
        r = c.reply()
        assert r.code == 250, r
        growth = _peak_rss_kib(proc.proc.pid) - before
    assert growth < 24 * 1024, f"peak RSS grew by {growth} KiB for an 80 MiB message"
    [path] = delivered(tmp_path / "mail", ALICE)
    assert path.stat().st_size > size
