"""TLS: STARTTLS (RFC 3207), implicit TLS (RFC 8314), certificates.

Real peers with real certificates: smtplib, gnutls-cli, openssl s_client and
swaks, each verifying the server against a throwaway CA (trustme) or the
self-signed output of ``simplesmtp gencert``; never with verification off.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import smtplib
import socket
import ssl
import stat
import subprocess
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import trustme
from conftest import TEST_HOSTNAME, all_delivered, split_trace

from simplesmtp import tls
from simplesmtp.config import ConfigError, load

MESSAGE = b"From: a@example.org\r\nTo: alice@example.com\r\nSubject: tls\r\n\r\nhello over TLS\r\n"
RECEIVED_TLS = re.compile(r"with (ESMTPS|UTF8SMTPS) \(using (TLSv1\.[23]) with cipher (\S+) "
                          r"\((\d+)/\d+ bits\)\)")


# --- certificates ---------------------------------------------------------------

class Certs:
    """A CA, and a server pair issued by it, as PEM files."""

    def __init__(self, directory: Path) -> None:
        self.ca = trustme.CA()
        leaf = self.ca.issue_cert("localhost", "127.0.0.1", "::1", TEST_HOSTNAME)
        directory.mkdir(parents=True, exist_ok=True)
        self.ca_file = directory / "ca.pem"
        self.cert = directory / "server.crt"
        self.key = directory / "server.key"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        leaf.cert_chain_pems[0].write_to_path(str(self.cert))
        for extra in leaf.cert_chain_pems[1:]:
            extra.write_to_path(str(self.cert), append=True)
        leaf.private_key_pem.write_to_path(str(self.key))

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        return ctx


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def tls_server(server_factory: Any, certs: Certs) -> Any:
    """A server with STARTTLS on its port and implicit TLS on another."""
    return server_factory(tls_cert=str(certs.cert), tls_key=str(certs.key), tls_port=0)


def tls_port(running: Any) -> int:
    return int(running.server.tls_addresses[0][1])


def stored(running: Any, count: int = 1, timeout: float = 5.0) -> list[bytes]:
    """The messages in the Maildir, waiting (bounded) for ``count``."""
    deadline = time.monotonic() + timeout
    while True:
        files = all_delivered(running.mail_dir)
        if len(files) >= count or time.monotonic() > deadline:
            return [f.read_bytes() for f in files]
        time.sleep(0.02)


def received_of(message: bytes) -> str:
    trace, _rest = split_trace(message)
    return trace["received"]


# --- gencert ----------------------------------------------------------------------

def test_gencert_writes_a_private_key_and_a_self_signed_certificate(run_cli: Any,
                                                                     tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    out = tmp_path / "certs"
    r = run_cli("gencert", "--out-dir", str(out), "--hostname", "mx.example.net",
                "--days", "30")
    assert r.returncode == 0, r.stderr
    key, crt = out / "server.key", out / "server.crt"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(crt.read_bytes())
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.curve.name == "secp384r1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"mx.example.net", "localhost"}
    assert {str(a) for a in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    days = (cert.not_valid_after_utc - cert.not_valid_before_utc).total_seconds() / 86400
    assert 30 <= days <= 31
    assert cert.issuer == cert.subject  # self-signed
    tls.build_context(str(crt), str(key))  # a usable pair

    # Existing files are kept unless --force.
    before = key.read_bytes()
    r = run_cli("gencert", "--out-dir", str(out))
    assert r.returncode == 2 and "--force" in r.stderr
    assert key.read_bytes() == before
    r = run_cli("gencert", "--out-dir", str(out), "--force", "--key-type", "rsa")
    assert r.returncode == 0, r.stderr
    assert key.read_bytes() != before
    assert "RSA" in type(x509.load_pem_x509_certificate(crt.read_bytes()).public_key()).__name__
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_smtp_ssl_verifies_against_the_gencert_certificate(server_factory: Any,
                                                            tmp_path: Path) -> None:
    key, crt = tls.generate_self_signed(str(tmp_path / "gc"), hostname="mx.example.net")
    running = server_factory(tls_cert=crt, tls_key=key, tls_port=0)
    ctx = ssl.create_default_context(cafile=crt)  # the certificate is its own anchor
    for host in ("localhost", "127.0.0.1"):
        with smtplib.SMTP_SSL(host, tls_port(running), context=ctx, timeout=10,
                              local_hostname="client.example") as s:
            s.sendmail("a@example.org", ["alice@example.com"], MESSAGE)
    messages = stored(running, 2)
    assert len(messages) == 2
    for m in messages:
        assert RECEIVED_TLS.search(received_of(m)), received_of(m)


# --- smtplib --------------------------------------------------------------------

def test_starttls_with_smtplib_and_a_verified_certificate(tls_server: Any,
                                                           certs: Certs) -> None:
    with smtplib.SMTP(tls_server.host, tls_server.port, timeout=10,
                      local_hostname="client.example") as s:
        s.ehlo()
        assert s.has_extn("starttls")
        code, _ = s.starttls(context=certs.client_context())
        assert code == 220
        s.ehlo()
        # RFC 3207 §4.2: not offered again once TLS is on.
        assert not s.has_extn("starttls")
        assert s.has_extn("pipelining")
        ssl_sock = s.sock
        assert isinstance(ssl_sock, ssl.SSLSocket)
        version, cipher = ssl_sock.version(), ssl_sock.cipher()
        s.sendmail("a@example.org", ["alice@example.com"], MESSAGE)
    [message] = stored(tls_server)
    received = received_of(message)
    m = RECEIVED_TLS.search(received)
    assert m, received
    assert m.group(1) == "ESMTPS"
    assert m.group(2) == version and m.group(3) == cipher[0]
    assert message.endswith(b"hello over TLS\r\n")


def test_implicit_tls_with_smtp_ssl(tls_server: Any, certs: Certs) -> None:
    with smtplib.SMTP_SSL("localhost", tls_port(tls_server), context=certs.client_context(),
                          timeout=10, local_hostname="client.example") as s:
        code, _ = s.ehlo()
        assert code == 250
        assert not s.has_extn("starttls")  # already encrypted
        s.sendmail("a@example.org", ["alice@example.com"], MESSAGE)
    [message] = stored(tls_server)
    assert "with ESMTPS" in received_of(message)


def test_starttls_not_offered_without_a_certificate(smtp_server: Any) -> None:
    with smtplib.SMTP(smtp_server.host, smtp_server.port, timeout=10) as s:
        s.ehlo()
        assert not s.has_extn("starttls")
        code, _ = s.docmd("STARTTLS")
        assert code == 502


def test_starttls_with_an_argument_gets_501(tls_server: Any) -> None:
    with smtplib.SMTP(tls_server.host, tls_server.port, timeout=10) as s:
        s.ehlo()
        code, _ = s.docmd("STARTTLS", "now")
        assert code == 501
        code, _ = s.noop()  # still in plaintext and usable
        assert code == 250


def test_require_tls_refuses_mail_before_starttls(server_factory: Any, certs: Certs) -> None:
    running = server_factory(tls_cert=str(certs.cert), tls_key=str(certs.key), tls_port=0,
                             require_tls=True)
    with smtplib.SMTP(running.host, running.port, timeout=10) as s:
        s.ehlo()
        code, text = s.docmd("MAIL", "FROM:<a@example.org>")
        assert code == 530 and text.startswith(b"5.7.0"), (code, text)
        s.starttls(context=certs.client_context())
        s.ehlo()
        code, _ = s.docmd("MAIL", "FROM:<a@example.org>")
        assert code == 250
    # The implicit-TLS port is encrypted from the start: no refusal there.
    with smtplib.SMTP_SSL("localhost", tls_port(running), context=certs.client_context(),
                          timeout=10) as s:
        s.sendmail("a@example.org", ["alice@example.com"], MESSAGE)
    assert len(stored(running)) == 1


# --- the STARTTLS command injection class of flaws -------------------------------

def _read_replies(sock: socket.socket | ssl.SSLSocket, count: int,
                  timeout: float = 5.0) -> list[bytes]:
    """Read exactly ``count`` complete reply lines' final lines (bounded)."""
    sock.settimeout(timeout)
    buf = b""
    finals: list[bytes] = []
    while len(finals) < count:
        chunk = sock.recv(4096)
        if not chunk:
            break
        buf += chunk
        while b"\r\n" in buf:
            line, buf = buf.split(b"\r\n", 1)
            if len(line) >= 4 and line[3:4] == b" ":
                finals.append(line)
    assert not buf, f"partial reply left over: {buf!r}"
    return finals


def test_starttls_injection_pipelined_plaintext_is_discarded(tls_server: Any,
                                                             certs: Certs) -> None:
    raw = socket.create_connection((tls_server.host, tls_server.port), timeout=5)
    try:
        assert _read_replies(raw, 1)[0].startswith(b"220 ")
        raw.sendall(b"EHLO client.example\r\n")
        assert _read_replies(raw, 1)[0].startswith(b"250 ")
        # One write: STARTTLS and commands an attacker in the path appended.
        raw.sendall(b"STARTTLS\r\nRSET\r\nMAIL FROM:<evil@example.net>\r\n")
        replies = _read_replies(raw, 1)
        assert len(replies) == 1 and replies[0].startswith(b"220 ")
        # Nothing more comes in plaintext: the next bytes must be TLS, so a
        # plaintext "250" here would make the handshake below fail.
        tls_sock = certs.client_context().wrap_socket(raw, server_hostname="localhost")
        raw = tls_sock
        tls_sock.sendall(b"EHLO client.example\r\n")
        first = _read_replies(tls_sock, 1)
        assert first[0].startswith(b"250 "), first
        # The injected MAIL was never executed: RCPT has no transaction.
        tls_sock.sendall(b"RCPT TO:<alice@example.com>\r\n")
        assert _read_replies(tls_sock, 1)[0].startswith(b"503 "), "injected MAIL ran"
        tls_sock.sendall(b"QUIT\r\n")
        assert _read_replies(tls_sock, 1)[0].startswith(b"221 ")
    finally:
        raw.close()


def test_client_data_right_after_the_handshake_is_not_lost(tls_server: Any,
                                                           certs: Certs) -> None:
    """EHLO sent in the same flight as the end of the handshake is served."""
    raw = socket.create_connection((tls_server.host, tls_server.port), timeout=5)
    with raw:
        _read_replies(raw, 1)
        raw.sendall(b"EHLO c\r\nSTARTTLS\r\n")
        assert [r[:3] for r in _read_replies(raw, 2)] == [b"250", b"220"]
        s = certs.client_context().wrap_socket(raw, server_hostname="localhost")
        s.sendall(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<alice@example.com>\r\n"
                  b"DATA\r\n")
        codes = [r[:3] for r in _read_replies(s, 4)]
        assert codes == [b"250", b"250", b"250", b"354"]
        s.sendall(MESSAGE + b".\r\nQUIT\r\n")
        assert [r[:3] for r in _read_replies(s, 2)] == [b"250", b"221"]
        s.close()
    assert len(stored(tls_server)) == 1


# --- versions, bad clients, timeouts -------------------------------------------------

def _old_tls_client(certs: Certs, version: ssl.TLSVersion) -> ssl.SSLContext:
    ctx = certs.client_context()
    # Let the client offer old versions at all (OpenSSL 3 refuses them at
    # its default security level), so that the refusal is the server's.
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():  # deprecated: which is the point here
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = version
    return ctx


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_tls_1_0_and_1_1_are_refused(tls_server: Any, certs: Certs,
                                     version: ssl.TLSVersion) -> None:
    with pytest.raises(ssl.SSLError) as info:
        with socket.create_connection(("127.0.0.1", tls_port(tls_server)), timeout=5) as raw:
            with _old_tls_client(certs, version).wrap_socket(raw, server_hostname="localhost"):
                pass
    assert "NO_PROTOCOLS_AVAILABLE" not in str(info.value)  # the client did offer it
    # The same client code with 1.2 allowed gets in: the refusal was the version.
    ctx = _old_tls_client(certs, ssl.TLSVersion.TLSv1_2)
    with socket.create_connection(("127.0.0.1", tls_port(tls_server)), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            assert s.version() == "TLSv1.2"
            assert _read_replies(s, 1)[0].startswith(b"220 ")


def test_tls_min_version_1_3_refuses_1_2(server_factory: Any, certs: Certs) -> None:
    running = server_factory(tls_cert=str(certs.cert), tls_key=str(certs.key), tls_port=0,
                             tls_min_version="1.3")
    ctx = certs.client_context()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError):
        with socket.create_connection(("127.0.0.1", tls_port(running)), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost"):
                pass
    with smtplib.SMTP(running.host, running.port, timeout=10) as s:
        s.ehlo()
        with pytest.raises(ssl.SSLError):
            s.starttls(context=ctx)


def test_plaintext_client_on_the_tls_port_is_dropped_without_hurting_others(
        tls_server: Any, certs: Certs) -> None:
    good = smtplib.SMTP_SSL("localhost", tls_port(tls_server), context=certs.client_context(),
                            timeout=10)
    try:
        good.ehlo()
        good.mail("a@example.org")
        bad = socket.create_connection(("127.0.0.1", tls_port(tls_server)), timeout=5)
        with bad:
            bad.sendall(b"EHLO plaintext.example\r\nMAIL FROM:<x@example.org>\r\n")
            got = b""
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                try:
                    chunk = bad.recv(4096)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                got += chunk
            else:
                pytest.fail("plaintext client was not dropped")
            assert b"220" not in got and b"250" not in got  # no SMTP in plaintext
        good.rcpt("alice@example.com")
        code, _ = good.data(MESSAGE)
        assert code == 250
    finally:
        good.quit()
    assert len(stored(tls_server)) == 1
    assert tls_server.wait_idle()


def test_failed_starttls_handshake_closes_and_is_logged(tls_server: Any,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="simplesmtp")
    with socket.create_connection((tls_server.host, tls_server.port), timeout=5) as raw:
        _read_replies(raw, 1)
        raw.sendall(b"EHLO c\r\n")
        _read_replies(raw, 1)
        raw.sendall(b"STARTTLS\r\n")
        _read_replies(raw, 1)
        raw.sendall(b"this is not a ClientHello\r\n" * 4)
        raw.settimeout(5)
        try:
            rest = raw.recv(4096)
        except ConnectionResetError:
            rest = b""
        assert not rest.startswith(b"2") and not rest.startswith(b"5")  # no SMTP reply
    assert tls_server.wait_idle()
    lines = [r.getMessage() for r in caplog.records if "event=tls_failed" in r.getMessage()]
    assert lines and "mode=starttls" in lines[0], caplog.text


def test_stalled_handshakes_do_not_stall_others_and_time_out(
        server_factory: Any, certs: Certs, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="simplesmtp")
    limit = 1.5
    running = server_factory(tls_cert=str(certs.cert), tls_key=str(certs.key), tls_port=0,
                             tls_handshake_timeout=limit)
    started = time.monotonic()
    # One client stalls after STARTTLS, one says nothing on the TLS port.
    stalled_starttls = socket.create_connection((running.host, running.port), timeout=5)
    _read_replies(stalled_starttls, 1)
    stalled_starttls.sendall(b"STARTTLS\r\n")
    _read_replies(stalled_starttls, 1)
    stalled_implicit = socket.create_connection(("127.0.0.1", tls_port(running)), timeout=5)
    with stalled_starttls, stalled_implicit:
        # Meanwhile other clients are served at once, both ways.
        with smtplib.SMTP(running.host, running.port, timeout=10) as s:
            s.starttls(context=certs.client_context())
            s.sendmail("a@example.org", ["alice@example.com"], MESSAGE)
        with smtplib.SMTP_SSL("localhost", tls_port(running), context=certs.client_context(),
                              timeout=10) as s:
            s.sendmail("a@example.org", ["alice@example.com"], MESSAGE)
        assert time.monotonic() - started < limit, "a stalled handshake held up others"
        assert len(stored(running, 2)) == 2
        for stalled in (stalled_starttls, stalled_implicit):
            stalled.settimeout(limit + 5)
            try:
                assert stalled.recv(4096) == b""  # closed, not answered
            except ConnectionResetError:
                pass
    assert time.monotonic() - started < limit + 5
    assert running.wait_idle()
    assert "event=tls_failed session=" in caplog.text


# --- real command-line peers ---------------------------------------------------------

class Interactive:
    """A command-line TLS client driven line by line (gnutls-cli, s_client)."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.transcript: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put(raw.decode("utf-8", "replace").rstrip("\r\n"))
        self.lines.put(None)

    def expect(self, code: str, timeout: float = 10.0) -> str:
        """Skip the tool's own output up to the final line of a reply."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {code} reply; transcript:\n"
                                     + "\n".join(self.transcript)) from None
            if line is None:
                raise AssertionError(f"client ended before {code}; transcript:\n"
                                     + "\n".join(self.transcript))
            self.transcript.append(line)
            if re.match(r"\d{3} ", line):
                assert line.startswith(code), "\n".join(self.transcript)
                return line

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


    def sync(self, eol: str, timeout: float = 10.0) -> None:
        """After a tool's own STARTTLS dialogue (whose last reply line some
        tools echo): NOOP, and skip everything up to its reply."""
        self.send(f"NOOP{eol}")
        deadline = time.monotonic() + timeout
        while True:
            line = self.expect("", max(0.0, deadline - time.monotonic()))
            if re.fullmatch(r"250 (2\.0\.0 )?Ok", line):
                return


def _whole_session(client: Interactive, eol: str, greeting: bool = True) -> None:
    if greeting:
        client.expect("220")
    else:
        client.sync(eol)
    client.send(f"EHLO client.example{eol}")
    client.expect("250")
    client.send(f"MAIL FROM:<a@example.org>{eol}")
    client.expect("250")
    client.send(f"RCPT TO:<alice@example.com>{eol}")
    client.expect("250")
    client.send(f"DATA{eol}")
    client.expect("354")
    client.send(f"Subject: cli{eol}{eol}sent by a command-line client{eol}.{eol}")
    client.expect("250")
    client.send(f"QUIT{eol}")
    client.expect("221")


def test_gnutls_cli_implicit_tls_whole_session(tls_server: Any, certs: Certs) -> None:
    client = Interactive(["gnutls-cli", "127.0.0.1", "-p", str(tls_port(tls_server)),
                          "--x509cafile", str(certs.ca_file)])
    try:
        # Without --crlf: gnutls-cli 3.7's conversion mangles multi-line writes.
        _whole_session(client, "\r\n")
    finally:
        client.close()
    [message] = stored(tls_server)
    assert RECEIVED_TLS.search(received_of(message))
    assert b"sent by a command-line client" in message


def test_gnutls_cli_starttls(tls_server: Any, certs: Certs) -> None:
    client = Interactive(["gnutls-cli", "127.0.0.1", "-p", str(tls_server.port),
                          "--x509cafile", str(certs.ca_file), "--starttls-proto=smtp"])
    try:
        # gnutls-cli says EHLO and STARTTLS itself, then hands over.
        _whole_session(client, "\r\n", greeting=False)
    finally:
        client.close()
    [message] = stored(tls_server)
    assert "with ESMTPS" in received_of(message)


def test_openssl_s_client_starttls_whole_session(tls_server: Any, certs: Certs) -> None:
    client = Interactive(["openssl", "s_client", "-starttls", "smtp",
                          "-connect", f"127.0.0.1:{tls_server.port}",
                          "-CAfile", str(certs.ca_file), "-verify_return_error",
                          "-verify_hostname", "localhost", "-quiet", "-crlf"])
    try:
        # s_client reads the greeting and does EHLO/STARTTLS itself.
        _whole_session(client, "\n", greeting=False)
    finally:
        client.close()
    [message] = stored(tls_server)
    assert RECEIVED_TLS.search(received_of(message))


@pytest.mark.parametrize("mode", ["--tls", "--tlsc"])
def test_swaks(tls_server: Any, certs: Certs, mode: str) -> None:
    port = tls_server.port if mode == "--tls" else tls_port(tls_server)
    r = subprocess.run(["swaks", "--server", f"127.0.0.1:{port}", mode,
                        "--tls-verify", "--tls-ca-path", str(certs.ca_file),
                        "--to", "alice@example.com", "--from", "a@example.org",
                        "--helo", "client.example", "--timeout", "10"],
                       capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    out = r.stdout.decode("utf-8", "replace")
    assert r.returncode == 0, out + r.stderr.decode("utf-8", "replace")
    [message] = stored(tls_server)
    assert RECEIVED_TLS.search(received_of(message))


# --- certificate reload (SIGHUP) -------------------------------------------------------

def _served_certificate(port: int, starttls: bool) -> bytes:
    """The DER certificate the server presents (no verification: we compare)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        if starttls:
            _read_replies(raw, 1)
            raw.sendall(b"EHLO c\r\nSTARTTLS\r\n")
            _read_replies(raw, 2)
        with ctx.wrap_socket(raw) as s:  # an IP address: no SNI is sent
            der = s.getpeercert(binary_form=True)
            assert der is not None
            return der


def _der(path: str) -> bytes:
    return ssl.PEM_cert_to_DER_cert(Path(path).read_text())


def test_sighup_reloads_the_certificate(spawn_server: Any, tmp_path: Path) -> None:
    certdir = tmp_path / "certs"
    key, crt = tls.generate_self_signed(str(certdir), hostname="one.example")
    first = _der(crt)
    proc = spawn_server("--tls-cert", crt, "--tls-key", key, "--tls-port", "0")
    tport = int(proc.wait_for(r"port=(\d+) tls=implicit").group(1))
    assert _served_certificate(proc.port, True) == first
    assert _served_certificate(tport, False) == first

    # A session that is up before the reload keeps working after it.
    ctx = ssl.create_default_context(cafile=crt)
    early = smtplib.SMTP("127.0.0.1", proc.port, timeout=10)
    early.starttls(context=ctx)
    early.ehlo()

    tls.generate_self_signed(str(certdir), hostname="two.example", overwrite=True)
    second = _der(crt)
    assert second != first
    mark = len(proc.lines)
    proc.signal(signal.SIGHUP)
    proc.wait_for(r"event=tls_reloaded", start=mark)
    assert _served_certificate(proc.port, True) == second
    assert _served_certificate(tport, False) == second

    early.sendmail("a@example.org", ["alice@example.com"], MESSAGE)
    early.quit()

    # A bad pair (key of another certificate) is logged and ignored.
    other = tmp_path / "other"
    other_key, _ = tls.generate_self_signed(str(other))
    os.replace(other_key, key)
    mark = len(proc.lines)
    proc.signal(signal.SIGHUP)
    proc.wait_for(r"event=tls_reload_failed .*does not belong", start=mark)
    assert _served_certificate(proc.port, True) == second
    assert _served_certificate(tport, False) == second
    assert proc.proc.poll() is None


# --- configuration and start-up errors ------------------------------------------------

def test_legacy_env_keys_name_the_pair(tmp_path: Path, certs: Certs) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(f"CERTIFICATE={certs.cert}\nKEY={certs.key}\n")
    config = load({"mail_dir": str(tmp_path / "mail")}, {}, str(env_file))
    assert config.tls_cert == str(certs.cert) and config.tls_key == str(certs.key)
    assert config.tls_min_version == "1.2" and config.tls_port is None


def test_config_refuses_half_a_pair_and_tls_options_without_one(tmp_path: Path,
                                                                certs: Certs) -> None:
    base = {"mail_dir": str(tmp_path / "mail")}
    with pytest.raises(ConfigError, match="--tls-key"):
        load({**base, "tls_cert": str(certs.cert)}, {}, None)
    with pytest.raises(ConfigError, match="--tls-port"):
        load({**base, "tls_port": "4650"}, {}, None)
    with pytest.raises(ConfigError, match="--require-tls"):
        load({**base, "require_tls": "true"}, {}, None)
    with pytest.raises(ConfigError, match="--tls-min-version"):
        load({**base, "tls_min_version": "1.1"}, {}, None)


def _error_line(result: Any) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr_lines[-1]
    assert last.startswith("simplesmtp: error: ")
    return last


def test_startup_errors_exit_2_with_one_line(run_cli: Any, tmp_path: Path,
                                             certs: Certs) -> None:
    mail = ["--mail-dir", str(tmp_path / "mail"), "--port", "0"]
    other_key, _ = tls.generate_self_signed(str(tmp_path / "other"))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    cases = {
        "does not exist": ["--tls-cert", str(tmp_path / "missing.crt"),
                           "--tls-key", str(certs.key)],
        "does not belong": ["--tls-cert", str(certs.cert), "--tls-key", other_key],
        "no PEM certificate": ["--tls-cert", str(garbage), "--tls-key", str(certs.key)],
        "no PEM private key": ["--tls-cert", str(certs.cert), "--tls-key", str(garbage)],
        "cannot read": ["--tls-cert", str(tmp_path), "--tls-key", str(certs.key)],
        "needs --tls-key": ["--tls-cert", str(certs.cert)],
    }
    for expected, args in cases.items():
        r = run_cli("serve", *mail, *args)
        line = _error_line(r)
        assert expected in line and "--tls" in line, line
    # The same through the environment.
    r = run_cli("serve", *mail, env={"SIMPLESMTP_TLS_CERT": str(certs.cert),
                                     "SIMPLESMTP_TLS_KEY": other_key})
    assert "does not belong" in _error_line(r)


def test_engine_require_tls_and_discarded_pipelining() -> None:
    """The sans-I/O side of --require-tls and of the injection case."""
    from simplesmtp.engine import NEED_DATA, EngineConfig, Send, SMTPEngine, StartTLS

    def drain(engine: SMTPEngine) -> list[Any]:
        events = []
        while (event := engine.next_event()) is not NEED_DATA:
            events.append(event)
        return events

    def codes(events: list[Any]) -> list[int]:
        return [e.reply.code for e in events if isinstance(e, Send)]

    config = EngineConfig(tls_available=True, require_tls=True)
    engine = SMTPEngine(config)
    engine.receive(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\n")
    events = drain(engine)
    assert codes(events) == [250, 530]
    assert b"530 5.7.0 " in events[-1].data
    engine.receive(b"STARTTLS\r\nMAIL FROM:<a@example.org>\r\n")
    events = drain(engine)
    assert codes(events) == [220] and isinstance(events[-1], StartTLS)
    engine.receive(b"RSET\r\n")  # still plaintext: the handshake is not done
    assert drain(engine) == []
    engine.tls_started()
    engine.receive(b"MAIL FROM:<a@example.org>\r\nEHLO c\r\nMAIL FROM:<a@example.org>\r\n")
    events = drain(engine)
    assert codes(events) == [503, 250, 250]  # HELO needed again (RFC 3207 §4.2)
    assert b"STARTTLS" not in events[1].data
    # Implicit TLS sessions are encrypted from the start.
    implicit = SMTPEngine(config, tls=True)
    implicit.receive(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\n")
    assert codes(drain(implicit)) == [250, 250]


def test_describe_names_version_and_cipher() -> None:
    class FakeSSL:
        def version(self) -> str:
            return "TLSv1.3"

        def cipher(self) -> tuple[str, str, int]:
            return ("TLS_AES_256_GCM_SHA384", "TLSv1.3", 256)

    assert tls.describe(FakeSSL()) == \
        "using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)"
    assert tls.describe(None) is None
