"""Regression tests from a review that tried to break the server (issues 2
and 3), each named after what it guards.

The review sent hostile and odd input to a real server: whole sessions in
one write and a byte at a time, NUL bytes and invalid UTF-8 in every field,
overlong lines, huge BDAT sizes, STARTTLS in odd places, foreign protocols,
address edge cases, size limits, many sessions at once, and trace header
injection through HELO.  Most of it was already handled (and is covered by
test_integration, test_hardening and test_tls); the tests here guard what
was not.  Servers run on port 0; every wait is bounded.
"""

from __future__ import annotations

import logging
import re
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from typing import Any

import pytest
from clients import RawSMTP, wait_until
from conftest import delivered, split_trace
from test_tls import Certs, certs, tls_port  # noqa: F401  (certs is a fixture)

from simplesmtp.address import is_domain
from simplesmtp.trace import trace_headers

ALICE = "alice@example.com"


# --- Trace headers: the HELO argument cannot shape the Received field --------
#
# The engine accepts any printable HELO text (real clients send names with
# underscores or several words).  RFC 5321 §4.4 wants the "from" clause to be
# a Domain or an address literal, followed by the TCP-info we saw ourselves.
# Copied verbatim, a HELO such as ``good.example ([192.0.2.1])`` put a forged
# client address first in the trace, where trace parsers (and humans) look
# for the real one, and ``x) (y`` left the comment nesting unbalanced.

FORGING_HELOS = [
    "good.example ([192.0.2.1])",
    "evil Received: from x",
    "x) (y",
    "a\\",
    "trusted.example (trusted.example [192.0.2.7]) by mx.example (Postfix) with ESMTP id X",
    "(",
    "client_1.example",  # an underscore: not a Domain, but harmless
    # General address literals (RFC 5321 §4.1.3) whose content carries a
    # space or parentheses: is_domain's literal check looks at the tag only.
    "[x:y] ([192.0.2.1])",
    "[x:y])([192.0.2.1])(z]",
]


def _received(helo: str | None, peer_ip: str = "127.0.0.1") -> str:
    """The Received field ``trace_headers`` writes, unfolded."""
    raw = trace_headers(mail_from=_addr("a@b.example"), recipients=[_addr(ALICE)],
                        helo=helo, peer_ip=peer_ip, hostname="mx.test.example",
                        protocol="ESMTP", queue_id="Q1", now=0.0)
    text = raw.decode("utf-8")
    received = text[text.index("Received:"):]
    return re.sub(r"\r\n[ \t]+", " ", received).rstrip("\r\n")


def _addr(text: str) -> Any:
    from simplesmtp.address import parse_path
    return parse_path(f"<{text}>")[0]


def _comments_balanced(text: str) -> bool:
    """RFC 5322 §3.2.2: parentheses nest; a backslash quotes the next char."""
    depth = 0
    escaped = False
    for ch in text:
        if escaped:
            escaped = False
        elif ch == "\\" and depth:
            escaped = True
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                return False
    return depth == 0 and not escaped


def _check_trace_shape(received: str, peer_literal: str) -> None:
    m = re.match(r"Received: from (\S+) \((\[[^\]]+\])", received)
    assert m, received
    # The from clause is a Domain or an address literal (RFC 5321 §4.4) ...
    assert is_domain(m.group(1)), received
    # ... and the first TCP-info is the address the connection came from.
    assert m.group(2) == peer_literal, received
    assert _comments_balanced(received), received
    # The by clause is still ours and still where parsers expect it.
    assert received.count(" by mx.test.example (simplesmtp) with ESMTP") == 1, received


@pytest.mark.parametrize("helo", FORGING_HELOS)
def test_helo_cannot_forge_received_structure(helo: str) -> None:
    received = _received(helo)
    _check_trace_shape(received, "[127.0.0.1]")
    assert "192.0.2.1]) ([" not in received


def test_helo_that_is_a_domain_or_literal_is_kept_as_said() -> None:
    assert _received("client.example").startswith(
        "Received: from client.example ([127.0.0.1]) by ")
    assert _received("[192.0.2.9]").startswith("Received: from [192.0.2.9] ([127.0.0.1]) by ")
    assert _received(None).startswith("Received: from unknown ([127.0.0.1]) by ")
    received = _received("[IPv6:2001:db8::1]", peer_ip="::1")
    assert received.startswith("Received: from [IPv6:2001:db8::1] ([IPv6:::1]) by ")


def test_odd_helo_is_kept_in_the_trace_as_an_escaped_comment() -> None:
    # What the client said stays visible for whoever reads the trace.
    received = _received("x) (y")
    assert "x\\) \\(y" in received, received
    long_helo = "w " * 400
    received = _received(long_helo)
    assert len(received) < 998, "RFC 5322 §2.1.1: lines of at most 998 characters"
    _check_trace_shape(received, "[127.0.0.1]")


@pytest.mark.parametrize("helo", ["good.example ([192.0.2.1])", "x) (y"])
def test_helo_injection_end_to_end(smtp_server: Any, helo: str) -> None:
    with RawSMTP(smtp_server.host, smtp_server.port) as c:
        assert c.cmd(f"EHLO {helo}").code == 250
        c.envelope("a@b.example", ALICE)
        assert c.data(b"Subject: trace\r\n\r\nhello\r\n").code == 250
    files = delivered(smtp_server.mail_dir, ALICE)
    assert len(files) == 1
    trace, body = split_trace(files[0].read_bytes())
    _check_trace_shape("Received: " + trace["received"], "[127.0.0.1]")
    assert body == b"Subject: trace\r\n\r\nhello\r\n"


# --- Start-up errors name the listener that failed ------------------------


def test_bind_error_names_the_port_that_is_taken(tmp_path: Any) -> None:
    # The SMTP port is free; the implicit-TLS port is taken.  The one-line
    # error must not blame the SMTP port.
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    busy_port = taken.getsockname()[1]
    try:
        subprocess.run([sys.executable, "-m", "simplesmtp", "gencert", "--out-dir",
                        str(tmp_path / "certs")], check=True, capture_output=True, timeout=60)
        proc = subprocess.run(
            [sys.executable, "-m", "simplesmtp", "serve", "--port", "0",
             "--mail-dir", str(tmp_path / "mail"),
             "--tls-cert", str(tmp_path / "certs" / "server.crt"),
             "--tls-key", str(tmp_path / "certs" / "server.key"),
             "--tls-port", str(busy_port)],
            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    finally:
        taken.close()
    assert proc.returncode == 2, proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("simplesmtp: error")]
    assert len(error) == 1, proc.stderr
    assert str(busy_port) in error[0], error[0]
    assert "127.0.0.1:0" not in error[0], error[0]


# --- Guards for behaviour the review checked by hand ------------------------


def test_half_closed_client_still_gets_every_reply(smtp_server: Any) -> None:
    # ``printf ... | nc -N`` style: the whole session, then shutdown(SHUT_WR).
    # The message is stored and the client reads its 250 and 221.
    s = socket.create_connection((smtp_server.host, smtp_server.port), timeout=10)
    try:
        s.sendall(b"EHLO c.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<" + ALICE.encode()
                  + b">\r\nDATA\r\nSubject: hc\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        s.shutdown(socket.SHUT_WR)
        out = b""
        for _ in range(1000):  # bounded: the server closes after QUIT
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
    finally:
        s.close()
    lines = out.decode().splitlines()
    assert lines[-2].startswith("250 2.0.0 Ok: queued as"), lines
    assert lines[-1].startswith("221 2.0.0"), lines
    assert len(delivered(smtp_server.mail_dir, ALICE)) == 1


@pytest.mark.parametrize("line", [
    b"EHLO a\x00b", b"EHLO \xff\xfe", b"MAIL FROM:<a\x00@b.example>", b"MAIL FROM:<\xff@b.example>",
    b"RCPT TO:<\xc3@b.example>", b"NO\x00OP", b"VRFY \xff", b"HELP \x1b[2J", b"BDAT \xff",
])
def test_nul_and_invalid_utf8_get_a_5xx_and_the_session_goes_on(
        smtp_server: Any, line: bytes) -> None:
    with RawSMTP(smtp_server.host, smtp_server.port) as c:
        assert c.cmd("EHLO c.example").code == 250
        if line.startswith(b"RCPT"):
            assert c.cmd("MAIL FROM:<a@b.example>").code == 250
        reply = c.cmd(line)
        assert 500 <= reply.code < 600, reply
        # Nothing the peer sent is echoed raw (no NUL, no escape sequence).
        assert "\x00" not in reply.text and "\x1b" not in reply.text
        assert c.cmd("NOOP").code == 250
        assert c.cmd("QUIT").code == 221


# --- Implicit TLS: the connection limits hold before the handshake -----------
#
# The implicit-TLS listener did the handshake inside the event loop, before a
# Session existed, so connections that never finished a handshake were
# counted by no limit (--max-connections, --max-connections-per-ip) for up to
# --tls-handshake-timeout each.  The port now has an accept loop of its own
# that admits each socket first and releases the slot if the handshake fails.


def _recv_all(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    out = b""
    try:
        for _ in range(100):
            chunk = sock.recv(4096)
            if not chunk:
                break
            out += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return out


def test_implicit_tls_handshakes_count_against_connection_limits(
        server_factory: Any, certs: Certs) -> None:  # noqa: F811
    running = server_factory(tls_cert=str(certs.cert), tls_key=str(certs.key), tls_port=0,
                             max_connections_per_ip=3)
    stalled = [socket.create_connection(("127.0.0.1", tls_port(running)), timeout=5)
               for _ in range(3)]
    try:
        time.sleep(0.2)  # let the server accept them
        # Three connections from one address use up its slots, handshake
        # or not: a fourth on the plain port is refused at once.
        with RawSMTP(running.host, running.port) as c:
            assert c.greeting is not None and c.greeting.code == 421, c.greeting
    finally:
        for s in stalled:
            s.close()


# --- Reply lines fit in 512 octets (RFC 5321 §4.5.3.1.5) -------------------
#
# The EHLO/HELO greeting echoed the client's name whole: a name of 505
# octets (a command line of 512, within the default limit) gave a reply line
# of 526 octets, longer than any client has to accept.


@pytest.mark.parametrize("verb", ["EHLO", "HELO"])
@pytest.mark.parametrize("name", ["a" * 505, "é" * 252, "b" * 400 + "ü" * 50],
                         ids=["ascii", "utf8", "mixed"])
def test_helo_greeting_reply_lines_fit_in_512_octets(
        smtp_server: Any, verb: str, name: str) -> None:
    line = f"{verb} {name}".encode()
    assert len(line) + 2 <= 512  # within the default command line limit
    s = socket.create_connection((smtp_server.host, smtp_server.port), timeout=10)
    try:
        s.sendall(line + b"\r\nQUIT\r\n")
        out = _recv_all(s, 10)
    finally:
        s.close()
    lines = out.split(b"\r\n")
    assert lines[-1] == b"" and lines[-2].startswith(b"221"), lines[-3:]
    assert any(x.startswith(b"250") and b" greets " in x for x in lines), lines
    for reply_line in lines[:-1]:
        assert len(reply_line) + 2 <= 512, reply_line[:60]
        reply_line.decode("utf-8")  # never cut inside a character


def test_failed_implicit_tls_handshake_gives_its_slot_back_and_is_logged(
        server_factory: Any, certs: Certs, caplog: Any) -> None:  # noqa: F811
    running = server_factory(tls_cert=str(certs.cert), tls_key=str(certs.key), tls_port=0,
                             max_connections_per_ip=2)
    caplog.set_level(logging.INFO, logger="simplesmtp")
    for _ in range(4):  # twice the per-address limit, one after the other
        s = socket.create_connection(("127.0.0.1", tls_port(running)), timeout=5)
        s.sendall(b"EHLO plaintext.example\r\n")  # not a ClientHello
        _recv_all(s, 5)  # the server drops it
        s.close()
    assert wait_until(lambda: running.server.admitted == 0, 5), running.server.per_ip
    assert any("event=tls_failed" in r.getMessage() and "mode=implicit" in r.getMessage()
               for r in caplog.records)
    # The slots came back: a real TLS client still gets in.
    ctx = ssl.create_default_context(cafile=str(certs.ca_file))
    with smtplib.SMTP_SSL("127.0.0.1", tls_port(running), context=ctx, timeout=10) as c:
        assert c.noop()[0] == 250
