"""AUTH (RFC 4954), submission (RFC 6409), recipients and VRFY, end to end.

First the engine alone (bytes in, replies out, the password check answered
by a real users file), then real servers on port 0: smtplib ``login()``
for each mechanism over plain (with --allow-insecure-auth), STARTTLS and
implicit TLS; a SCRAM-SHA-256 client written here (smtplib has none);
swaks; every reply code over raw sockets; the lockout with short timings;
reloading the users file; mail for two users in their own Maildirs; and
the captured log searched for the passwords.
"""

from __future__ import annotations

import base64
import logging
import signal
import smtplib
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher
from clients import RawSMTP, wait_until
from conftest import all_delivered, delivered, split_trace
from engine_helpers import EHLO, Driver, config, crlf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_tls import Certs  # the throwaway CA and server pair of the TLS tests

from simplesmtp import replies as R
from simplesmtp.engine import AuthCheck, AuthResult, Event, NeedData
from simplesmtp.policy import RecipientPolicy
from simplesmtp.ratelimit import AuthThrottle
from simplesmtp.sasl import ScramClient
from simplesmtp.users import UserStore

FAST = PasswordHasher(time_cost=1, memory_cost=64, parallelism=1)
MECHS = ("SCRAM-SHA-256", "PLAIN", "LOGIN")
ALICE, BOB = "alice@example.com", "bob@example.com"
PASSWORDS = {ALICE: "Alice-Pa55phrase-7f3c", BOB: "Bob-Secret-Words-91aa"}
WRONG = "Wrong-Guess-Password-x1"
MESSAGE = b"Subject: hello\r\n\r\nbody\r\n"


def b64(data: str | bytes) -> str:
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


def plain(user: str, password: str) -> str:
    return b64(f"\0{user}\0{password}")


@pytest.fixture
def users_file(tmp_path: Path) -> Path:
    path = tmp_path / "users"
    store = UserStore(str(path), hasher=FAST)
    for name, password in PASSWORDS.items():
        store.add(name, password)
    return path


@pytest.fixture
def store(users_file: Path) -> UserStore:
    return UserStore(str(users_file), hasher=FAST)


# --- The engine alone ----------------------------------------------------------


class AuthDriver(Driver):
    """``Driver`` that also answers ``AuthCheck`` from a users file, at once
    (the transport would use a thread), and records ``AuthResult``."""

    def __init__(self, store: UserStore, cfg: Any = None, **kw: Any) -> None:
        super().__init__(cfg, **kw)
        self.checks: list[AuthCheck] = []
        self.results: list[AuthResult] = []
        self.hold = False  # leave checks unanswered (to test auth_abort)
        engine = self.engine
        inner = engine.next_event

        def next_event() -> Event | NeedData:
            while True:
                event = inner()
                if isinstance(event, AuthCheck):
                    self.checks.append(event)
                    if not self.hold:
                        engine.auth_result(store.resolve(event.request))
                    continue
                if isinstance(event, AuthResult):
                    self.results.append(event)
                    continue
                return event

        engine.next_event = next_event  # type: ignore[method-assign]


def auth_config(**kw: Any) -> Any:
    kw.setdefault("auth_mechanisms", MECHS)
    kw.setdefault("allow_insecure_auth", True)
    return config(**kw)


def ehlo_keywords(d: Driver) -> list[str]:
    d.line("EHLO client.test")
    return [line for line in d.sends[-1].reply.lines[1:]]


def test_auth_advertised_only_when_allowed(store: UserStore) -> None:
    assert "AUTH SCRAM-SHA-256 PLAIN LOGIN" in ehlo_keywords(AuthDriver(store, auth_config()))
    plain_no = AuthDriver(store, auth_config(allow_insecure_auth=False))
    assert not any(k.startswith("AUTH") for k in ehlo_keywords(plain_no))
    tls_yes = AuthDriver(store, auth_config(allow_insecure_auth=False), tls=True)
    assert "AUTH SCRAM-SHA-256 PLAIN LOGIN" in ehlo_keywords(tls_yes)
    none = AuthDriver(store, config())
    assert not any(k.startswith("AUTH") for k in ehlo_keywords(none))


@pytest.mark.parametrize("sizes", [None, [1], [3, 7, 11]], ids=["whole", "bytewise", "split"])
def test_plain_initial_response_then_mail(store: UserStore, sizes: Any) -> None:
    d = AuthDriver(store, auth_config())
    d.feed(EHLO + crlf(f"AUTH PLAIN {plain(ALICE, PASSWORDS[ALICE])}",
                       f"MAIL FROM:<{ALICE}> AUTH=<>", "RCPT TO:<x@y.test>", "DATA")
           + MESSAGE + b".\r\n", sizes)
    assert d.codes == [250, 235, 250, 250, 354, 250]
    assert d.sends[1].data == b"235 2.7.0 Authentication successful\r\n"
    assert d.engine.authenticated == ALICE
    assert d.results == [AuthResult(True, "PLAIN", ALICE)]
    assert d.messages[0].transaction.auth_user == ALICE
    # The password is in the check request, but not in its repr (logs).
    assert PASSWORDS[ALICE] not in repr(d.checks) + repr(d.events)


def test_plain_without_initial_response(store: UserStore) -> None:
    d = AuthDriver(store, auth_config())
    d.feed(EHLO)
    assert d.line("AUTH PLAIN").data == b"334 \r\n"
    assert d.line(plain(BOB, PASSWORDS[BOB])).reply.code == 235


def test_login_exchange(store: UserStore) -> None:
    d = AuthDriver(store, auth_config())
    d.feed(EHLO)
    assert d.line("AUTH LOGIN").data == b"334 VXNlcm5hbWU6\r\n"  # "Username:"
    assert d.line(b64(ALICE)).data == b"334 UGFzc3dvcmQ6\r\n"  # "Password:"
    assert d.line(b64(PASSWORDS[ALICE])).reply.code == 235


def test_scram_exchange(store: UserStore) -> None:
    d = AuthDriver(store, auth_config())
    d.feed(EHLO)
    client = ScramClient(BOB, PASSWORDS[BOB])
    first = d.line(f"AUTH SCRAM-SHA-256 {b64(client.first())}")
    assert first.reply.code == 334 and first.reply.enhanced is None
    final = d.line(b64(client.final(base64.b64decode(first.reply.lines[0]))))
    assert final.reply.code == 334
    assert client.verify(base64.b64decode(final.reply.lines[0]))
    assert d.line("").reply.code == 235
    assert d.engine.authenticated == BOB


def test_scram_wrong_password_and_bad_ack(store: UserStore) -> None:
    d = AuthDriver(store, auth_config())
    d.feed(EHLO)
    client = ScramClient(BOB, WRONG)
    first = d.line(f"AUTH SCRAM-SHA-256 {b64(client.first())}")
    reply = d.line(b64(client.final(base64.b64decode(first.reply.lines[0])))).reply
    assert (reply.code, reply.enhanced) == (535, "5.7.8")
    assert d.results[-1].credentials_failed
    # Right password, but the final server data is answered with junk.
    client = ScramClient(BOB, PASSWORDS[BOB])
    first = d.line(f"AUTH SCRAM-SHA-256 {b64(client.first())}")
    d.line(b64(client.final(base64.b64decode(first.reply.lines[0]))))
    reply = d.line(b64("junk")).reply
    assert (reply.code, reply.enhanced) == (501, "5.5.2")
    assert d.engine.authenticated is None


@pytest.mark.parametrize("lines, code, enhanced", [
    (["AUTH PLAIN ="], 501, "5.5.2"),  # "=": empty initial response, malformed for PLAIN
    (["AUTH PLAIN", "*"], 501, "5.0.0"),  # cancelled
    (["AUTH LOGIN", "*"], 501, "5.0.0"),
    (["AUTH PLAIN !!notbase64!!"], 501, "5.5.2"),
    (["AUTH PLAIN", "AAA"], 501, "5.5.2"),  # bad padding
    (["AUTH PLAIN", "not base64 at all"], 501, "5.5.2"),
    ([f"AUTH PLAIN {plain(ALICE, WRONG)}"], 535, "5.7.8"),
    ([f"AUTH PLAIN {plain('nobody@example.com', WRONG)}"], 535, "5.7.8"),
    (["AUTH LOGIN", b64(ALICE), b64(WRONG)], 535, "5.7.8"),
    (["AUTH CRAM-MD5"], 504, "5.5.4"),
    (["AUTH"], 501, "5.5.4"),
    (["AUTH PLAIN a b"], 501, "5.5.4"),
])
def test_auth_refusals(store: UserStore, lines: list[str], code: int, enhanced: str) -> None:
    d = AuthDriver(store, auth_config())
    d.feed(EHLO)
    got = d.feed(crlf(*lines))
    assert (got[-1].reply.code, got[-1].reply.enhanced) == (code, enhanced), got
    assert d.engine.authenticated is None
    # The session goes on: the next line is a command again.
    assert d.line("NOOP").reply.code == 250


def test_auth_sequence_errors(store: UserStore) -> None:
    d = AuthDriver(store, auth_config())
    assert d.line(f"AUTH PLAIN {plain(ALICE, PASSWORDS[ALICE])}").reply.code == 503
    d.line("HELO client.test")
    assert d.line(f"AUTH PLAIN {plain(ALICE, PASSWORDS[ALICE])}").reply.code == 503
    d.feed(EHLO)
    d.line("MAIL FROM:<a@b.test>")
    r = d.line(f"AUTH PLAIN {plain(ALICE, PASSWORDS[ALICE])}").reply
    assert (r.code, r.enhanced) == (503, "5.5.1")  # during a transaction
    d.line("RSET")
    assert d.line(f"AUTH PLAIN {plain(ALICE, PASSWORDS[ALICE])}").reply.code == 235
    r = d.line(f"AUTH PLAIN {plain(BOB, PASSWORDS[BOB])}").reply
    assert (r.code, r.enhanced) == (503, "5.5.1")  # twice
    assert d.engine.authenticated == ALICE


def test_auth_needs_tls_unless_allowed(store: UserStore) -> None:
    d = AuthDriver(store, auth_config(allow_insecure_auth=False))
    d.feed(EHLO)
    r = d.line(f"AUTH PLAIN {plain(ALICE, PASSWORDS[ALICE])}").reply
    assert (r.code, r.enhanced) == (538, "5.7.11")
    assert not d.checks  # the password was never even checked
    off = AuthDriver(store, config())
    off.feed(EHLO)
    assert off.line("AUTH PLAIN =").reply.code == 502


def test_starttls_forgets_authentication(store: UserStore) -> None:
    d = AuthDriver(store, auth_config(tls_available=True))
    d.feed(EHLO + crlf(f"AUTH PLAIN {plain(ALICE, PASSWORDS[ALICE])}"))
    assert d.engine.authenticated == ALICE
    d.line("STARTTLS")
    d.handshake()
    assert d.engine.authenticated is None  # RFC 3207 §4.2


def test_auth_param_of_mail(store: UserStore) -> None:
    d = AuthDriver(store, auth_config())
    d.feed(EHLO)
    assert d.line(f"MAIL FROM:<a@b.test> AUTH={ALICE}").reply.code == 250
    d.line("RSET")
    assert d.line("MAIL FROM:<a@b.test> AUTH").reply.code == 501
    none = AuthDriver(store, config())
    none.feed(EHLO)
    assert none.line("MAIL FROM:<a@b.test> AUTH=<>").reply.code == 555


@pytest.mark.parametrize("sizes", [None, [1000]], ids=["whole", "pieces"])
def test_long_sasl_response_lines(store: UserStore, sizes: Any) -> None:
    d = AuthDriver(store, auth_config())
    d.feed(EHLO)
    d.line("AUTH PLAIN")
    # Longer than a command line may be (512), within RFC 4954's 12288.
    r = d.line(b64(b"\0" + b"u" * 700 + b"\0" + b"p" * 300)).reply
    assert r.code == 535
    d.line("AUTH PLAIN")
    got = d.feed(b"A" * 13000 + b"\r\n", sizes)
    assert [(s.reply.code, s.reply.enhanced) for s in got] == [(500, "5.5.6")]
    assert d.line("NOOP").reply.code == 250


def test_auth_abort_gives_454(store: UserStore) -> None:
    d = AuthDriver(store, auth_config())
    d.feed(EHLO)
    d.hold = True
    assert d.feed(crlf(f"AUTH PLAIN {plain(ALICE, PASSWORDS[ALICE])}")) == []
    d.engine.auth_abort(R.AUTH_LOCKED)
    d.pump()
    r = d.sends[-1].reply
    assert (r.code, r.enhanced) == (454, "4.7.0")
    assert d.engine.authenticated is None


def test_auth_gate_refuses_before_the_exchange(store: UserStore) -> None:
    d = AuthDriver(store, auth_config())
    d.engine.auth_gate = lambda: R.AUTH_LOCKED
    d.feed(EHLO)
    r = d.line("AUTH LOGIN").reply  # no Username: prompt first
    assert (r.code, r.enhanced) == (454, "4.7.0")
    assert d.line("NOOP").reply.code == 250


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mechanism=st.sampled_from(MECHS),
       responses=st.lists(st.one_of(st.binary(max_size=80).map(base64.b64encode),
                                    st.binary(max_size=80).filter(lambda b: b"\n" not in b)),
                          max_size=4))
def test_any_response_bytes_end_in_one_reply(store: UserStore, mechanism: str,
                                             responses: list[bytes]) -> None:
    """Fuzz invariant: whatever a client answers to the challenges, each line
    gets one reply (334 to go on, or the end of the exchange), nobody is
    authenticated by accident, and the session is back to commands."""
    d = AuthDriver(store, auth_config())
    d.feed(EHLO)
    reply = d.line(f"AUTH {mechanism}").reply
    for raw in responses:
        if reply.code != 334:
            break
        reply = d.line(raw).reply
        assert reply.code in (334, 235, 500, 501, 535), reply
    if reply.code == 334:
        reply = d.line("*").reply
    assert reply.code in (235, 500, 501, 535)
    assert d.engine.authenticated is None
    assert d.line("NOOP").reply.code == 250


def test_submission_mode(store: UserStore) -> None:
    policy = RecipientPolicy(users=store, sender_must_match=True)
    cfg = auth_config(submission=True, check_sender=policy.check_sender)
    d = AuthDriver(store, cfg)
    d.feed(EHLO)
    r = d.line(f"MAIL FROM:<{ALICE}>").reply
    assert (r.code, r.enhanced) == (530, "5.7.0")
    d.line(f"AUTH PLAIN {plain(ALICE, PASSWORDS[ALICE])}")
    r = d.line(f"MAIL FROM:<{BOB}>").reply
    assert (r.code, r.enhanced) == (553, "5.7.1")
    assert d.line(f"MAIL FROM:<{ALICE}>").reply.code == 250


def test_help_lists_what_this_session_can_use(store: UserStore) -> None:
    d = AuthDriver(store, auth_config(allow_insecure_auth=False, tls_available=True))
    d.feed(EHLO)
    text = d.line("HELP").reply.text
    assert "STARTTLS" in text and "AUTH" not in text and "EXPN" not in text
    d.line("STARTTLS")
    d.handshake()
    d.feed(EHLO)
    text = d.line("HELP").reply.text
    assert "AUTH" in text and "STARTTLS" not in text
    d.line(f"AUTH PLAIN {plain(ALICE, PASSWORDS[ALICE])}")
    assert "Commands:" in d.line("HELP").reply.text
    assert " AUTH" not in d.sends[-1].reply.lines[0]
    assert d.line("HELP AUTH").reply.code == 214


def test_vrfy_and_recipients_through_the_engine(store: UserStore) -> None:
    policy = RecipientPolicy(local_domains=("example.com",), users=store, vrfy="authenticated")
    d = AuthDriver(store, auth_config(check_recipient=policy.check_recipient,
                                      vrfy=policy.vrfy))
    d.feed(EHLO)
    assert d.line(f"VRFY {ALICE}").reply.code == 252
    d.line("MAIL FROM:<x@remote.test>")
    assert d.line(f"RCPT TO:<{ALICE}>").reply.code == 250
    assert d.line("RCPT TO:<carol@example.com>").reply.enhanced == "5.1.1"
    assert d.line("RCPT TO:<x@remote.test>").reply.enhanced == "5.7.1"
    assert d.line("RCPT TO:<Postmaster>").reply.code == 250
    d.line("RSET")
    d.line(f"AUTH PLAIN {plain(BOB, PASSWORDS[BOB])}")
    assert d.line(f"VRFY {ALICE}").reply.code == 250
    assert d.line("VRFY carol@example.com").reply.code == 550
    d.line(f"MAIL FROM:<{BOB}>")
    assert d.line("RCPT TO:<x@remote.test>").reply.code == 250


# --- The throttle alone ------------------------------------------------------


def test_throttle_growing_delay_lockout_and_window() -> None:
    now = [1000.0]
    t = AuthThrottle(max_failures=3, window=60, lockout=300, base_delay=1, max_delay=3,
                     clock=lambda: now[0])
    assert t.locked_for("192.0.2.1") == 0
    assert [t.failure("192.0.2.1") for _ in range(2)] == [1, 2]
    assert t.locked_for("192.0.2.1") == 0
    assert t.failure("192.0.2.1") == 3  # capped, and now locked
    assert t.locked_for("192.0.2.1") == 300
    assert t.locked_for("192.0.2.2") == 0  # per address
    now[0] += 299
    assert t.locked_for("192.0.2.1") == pytest.approx(1)
    now[0] += 2
    assert t.locked_for("192.0.2.1") == 0
    # Failures older than the window are forgotten.
    t.failure("192.0.2.3")
    t.failure("192.0.2.3")
    now[0] += 61
    assert t.failures("192.0.2.3") == 0
    assert t.failure("192.0.2.3") == 1
    t.success("192.0.2.3")
    assert t.failures("192.0.2.3") == 0


def test_throttle_memory_is_bounded() -> None:
    t = AuthThrottle(max_tracked=100)
    for i in range(1000):
        t.failure(f"10.0.{i // 256}.{i % 256}")
    assert len(t._records) == 100


# --- Real servers ------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs(tmp_path_factory.mktemp("auth-certs"))


def start(server_factory: Any, users_file: Path, **kw: Any) -> Any:
    kw.setdefault("local_domain", ("example.com",))
    kw.setdefault("auth_failure_delay", 0.0)
    return server_factory(users_file=str(users_file), **kw)


def smtplib_login(client: smtplib.SMTP, mechanism: str, user: str, password: str) -> Any:
    """``login()`` with the server's list cut down to one mechanism, so that
    smtplib uses exactly that one."""
    client.ehlo_or_helo_if_needed()
    assert mechanism in client.esmtp_features["auth"].split()
    client.esmtp_features["auth"] = mechanism
    return client.login(user, password)


def scram_login(raw: RawSMTP, user: str, password: str) -> Any:
    client = ScramClient(user, password)
    r = raw.cmd(f"AUTH SCRAM-SHA-256 {b64(client.first())}")
    assert r.code == 334, r
    r = raw.cmd(b64(client.final(base64.b64decode(r.lines[0]))))
    if r.code != 334:
        return r
    assert client.verify(base64.b64decode(r.lines[0]))
    return raw.cmd("")


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_smtplib_login_insecure_allowed(server_factory: Any, users_file: Path,
                                        mechanism: str) -> None:
    srv = start(server_factory, users_file, allow_insecure_auth=True)
    with smtplib.SMTP(srv.host, srv.port, timeout=10) as c:
        assert smtplib_login(c, mechanism, ALICE, PASSWORDS[ALICE])[0] == 235
        c.sendmail(ALICE, [BOB, "someone@elsewhere.test"], MESSAGE)
    files = all_delivered(srv.mail_dir)
    assert len(files) == 2
    trace, _ = split_trace(files[0].read_bytes())
    assert " with ESMTPA " in trace["received"]


def test_the_failed_auth_delay_does_not_count_against_the_clients_timeout(
        server_factory: Any, users_file: Path) -> None:
    # The 535 waits out the server's own delay; a --timeout shorter than
    # that delay must not turn the wait into a 421 for the client.
    srv = start(server_factory, users_file, allow_insecure_auth=True, timeout=0.6,
                auth_failure_delay=1.2, auth_failure_delay_max=1.2)
    with RawSMTP(srv.host, srv.port) as raw:
        raw.ehlo()
        token = b64(f"\0{ALICE}\0{WRONG}")
        started = time.monotonic()
        r = raw.cmd(f"AUTH PLAIN {token}")
        assert r.code == 535, r
        assert time.monotonic() - started >= 1.1
        r = raw.cmd("NOOP")
        assert r.code == 250, (r, time.monotonic() - started)


def test_scram_login_insecure_allowed(server_factory: Any, users_file: Path) -> None:
    srv = start(server_factory, users_file, allow_insecure_auth=True)
    with RawSMTP(srv.host, srv.port) as raw:
        raw.ehlo()
        r = scram_login(raw, BOB, PASSWORDS[BOB])
        assert (r.code, r.lines[0]) == (235, "2.7.0 Authentication successful")
    with RawSMTP(srv.host, srv.port) as raw:
        raw.ehlo()
        assert scram_login(raw, BOB, WRONG).code == 535


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_smtplib_login_over_starttls_and_implicit_tls(server_factory: Any, users_file: Path,
                                                      certs: Certs, mechanism: str) -> None:
    srv = start(server_factory, users_file, tls_cert=str(certs.cert),
                tls_key=str(certs.key), tls_port=0)
    with smtplib.SMTP(srv.host, srv.port, timeout=10) as c:
        c.ehlo()
        assert not c.has_extn("auth")  # not before TLS
        c.starttls(context=certs.client_context())
        c.ehlo()
        assert smtplib_login(c, mechanism, ALICE, PASSWORDS[ALICE])[0] == 235
        c.sendmail(ALICE, [BOB], MESSAGE)
    tls_port = srv.server.tls_addresses[0][1]
    with smtplib.SMTP_SSL(srv.host, tls_port, timeout=10, context=certs.client_context()) as c:
        assert smtplib_login(c, mechanism, BOB, PASSWORDS[BOB])[0] == 235
        c.sendmail(BOB, [ALICE], MESSAGE)
    for who in (ALICE, BOB):
        files = delivered(srv.mail_dir, who)
        assert len(files) == 1
        trace, _ = split_trace(files[0].read_bytes())
        assert " with ESMTPSA " in trace["received"]


def test_scram_over_starttls_and_implicit_tls(server_factory: Any, users_file: Path,
                                              certs: Certs) -> None:
    srv = start(server_factory, users_file, tls_cert=str(certs.cert),
                tls_key=str(certs.key), tls_port=0)
    with RawSMTP(srv.host, srv.port) as raw:
        raw.ehlo()
        assert raw.cmd("AUTH SCRAM-SHA-256").code == 538
        assert raw.cmd("STARTTLS").code == 220
        raw.sock = certs.client_context().wrap_socket(raw.sock, server_hostname="localhost")
        assert "AUTH SCRAM-SHA-256 PLAIN LOGIN" in raw.ehlo().lines
        assert scram_login(raw, ALICE, PASSWORDS[ALICE]).code == 235
    tls_port = srv.server.tls_addresses[0][1]
    with RawSMTP(srv.host, tls_port, read_greeting=False) as raw:
        raw.sock = certs.client_context().wrap_socket(raw.sock, server_hostname="localhost")
        assert raw.reply().code == 220
        raw.ehlo()
        assert scram_login(raw, ALICE, PASSWORDS[ALICE]).code == 235


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_swaks_auth_over_starttls(server_factory: Any, users_file: Path, certs: Certs,
                                  mechanism: str) -> None:
    srv = start(server_factory, users_file, tls_cert=str(certs.cert),
                tls_key=str(certs.key), submission_port=0)
    port = srv.server.submission_addresses[0][1]
    base = ["swaks", "--server", f"127.0.0.1:{port}", "--tls", "--tls-verify",
            "--tls-ca-path", str(certs.ca_file), "--tls-sni", "localhost",
            "--auth", mechanism, "--auth-user", ALICE, "--from", ALICE, "--to", BOB,
            "--helo", "client.test", "--timeout", "10"]
    ok = subprocess.run(base + ["--auth-password", PASSWORDS[ALICE]], capture_output=True,
                        text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "235 2.7.0" in ok.stdout
    bad = subprocess.run(base + ["--auth-password", WRONG], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode != 0 and "535 5.7.8" in bad.stdout
    assert len(delivered(srv.mail_dir, BOB)) == 1


def test_reply_codes_over_raw_sockets(server_factory: Any, users_file: Path) -> None:
    srv = start(server_factory, users_file, allow_insecure_auth=True, vrfy="on",
                submission_port=0, submission_own_sender=True)
    with RawSMTP(srv.host, srv.port) as raw:
        assert raw.cmd(f"AUTH PLAIN {plain(ALICE, PASSWORDS[ALICE])}").code == 503
        raw.ehlo()
        assert raw.cmd("AUTH PLAIN").lines == [""]  # 334 with an empty challenge
        assert raw.cmd("*").lines == ["5.0.0 Authentication cancelled"]
        assert raw.cmd("AUTH PLAIN ???").lines[0].startswith("5.5.2")
        assert raw.cmd("AUTH PLAIN =").code == 501
        r = raw.cmd(f"AUTH PLAIN {plain(ALICE, WRONG)}")
        assert (r.code, r.lines[0][:5]) == (535, "5.7.8")
        assert raw.cmd("AUTH DIGEST-MD5").code == 504
        assert raw.cmd(f"VRFY {ALICE}").lines == [f"2.1.5 <{ALICE}>"]
        assert raw.cmd("VRFY carol@example.com").lines[0].startswith("5.1.1")
        assert raw.cmd("MAIL FROM:<x@remote.test> AUTH=<>").code == 250
        assert raw.cmd(f"AUTH PLAIN {plain(ALICE, PASSWORDS[ALICE])}").code == 503
        assert raw.cmd("RCPT TO:<x@remote.test>").lines[0].startswith("5.7.1")
        assert raw.cmd("RCPT TO:<carol@example.com>").lines[0].startswith("5.1.1")
        assert raw.cmd("RCPT TO:<postmaster>").code == 250
        assert raw.cmd("RSET").code == 250
        assert raw.cmd(f"AUTH PLAIN {plain(ALICE, PASSWORDS[ALICE])}").code == 235
        assert raw.cmd(f"AUTH PLAIN {plain(ALICE, PASSWORDS[ALICE])}").code == 503
    sub_port = srv.server.submission_addresses[0][1]
    with RawSMTP(srv.host, sub_port) as raw:
        raw.ehlo()
        r = raw.cmd(f"MAIL FROM:<{ALICE}>")
        assert (r.code, r.lines[0][:5]) == (530, "5.7.0")
        assert raw.cmd(f"AUTH PLAIN {plain(ALICE, PASSWORDS[ALICE])}").code == 235
        r = raw.cmd(f"MAIL FROM:<{BOB}>")
        assert (r.code, r.lines[0][:5]) == (553, "5.7.1")
        raw.envelope(ALICE, "friend@remote.test")
        assert raw.data(MESSAGE).code == 250
    assert len(delivered(srv.mail_dir, "friend@remote.test")) == 1
    plain_srv = start(server_factory, users_file)
    with RawSMTP(plain_srv.host, plain_srv.port) as raw:
        assert not any(line.startswith("AUTH") for line in raw.ehlo().lines)
        r = raw.cmd(f"AUTH PLAIN {plain(ALICE, PASSWORDS[ALICE])}")
        assert (r.code, r.lines[0][:6]) == (538, "5.7.11")


def test_lockout_and_growing_delay(server_factory: Any, users_file: Path) -> None:
    srv = start(server_factory, users_file, allow_insecure_auth=True, auth_max_failures=3,
                auth_failure_window=60.0, auth_lockout=0.6, auth_failure_delay=0.1,
                auth_failure_delay_max=0.2)
    with RawSMTP(srv.host, srv.port) as raw:
        raw.ehlo()
        took = []
        for _ in range(3):
            t0 = time.monotonic()
            assert raw.cmd(f"AUTH PLAIN {plain(ALICE, WRONG)}").code == 535
            took.append(time.monotonic() - t0)
        # 0.1 s, then 0.2 s, then capped at 0.2 s.
        assert took[0] >= 0.09 and took[1] >= 0.19 and took[2] >= 0.19, took
        t_locked = time.monotonic()
        assert srv.call(lambda: srv.server.metrics.auth_failures) == 3
        r = raw.cmd(f"AUTH PLAIN {plain(ALICE, PASSWORDS[ALICE])}")
        assert (r.code, r.lines[0][:5]) == (454, "4.7.0")
    # Locked per address, across connections, whatever the password; LOGIN
    # is refused at once, before its prompts.
    with RawSMTP(srv.host, srv.port) as raw:
        raw.ehlo()
        assert raw.cmd(f"AUTH PLAIN {plain(ALICE, PASSWORDS[ALICE])}").code == 454
        assert raw.cmd("AUTH LOGIN").code == 454
        remaining = 0.6 - (time.monotonic() - t_locked)
        time.sleep(max(0.0, remaining) + 0.05)  # bounded: under a second
        assert raw.cmd(f"AUTH PLAIN {plain(ALICE, PASSWORDS[ALICE])}").code == 235


def test_passwords_never_logged(server_factory: Any, users_file: Path,
                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    srv = start(server_factory, users_file, allow_insecure_auth=True)
    with RawSMTP(srv.host, srv.port) as raw:
        raw.ehlo()
        assert raw.cmd(f"AUTH PLAIN {plain(ALICE, WRONG)}").code == 535
        assert raw.cmd(f"AUTH PLAIN {plain(ALICE, PASSWORDS[ALICE])}").code == 235
    with RawSMTP(srv.host, srv.port) as raw:
        raw.ehlo()
        raw.cmd("AUTH LOGIN")
        raw.cmd(b64(BOB))
        assert raw.cmd(b64(PASSWORDS[BOB])).code == 235
    with RawSMTP(srv.host, srv.port) as raw:
        raw.ehlo()
        assert scram_login(raw, BOB, PASSWORDS[BOB]).code == 235
    with RawSMTP(srv.host, srv.port) as raw:
        raw.ehlo()
        assert scram_login(raw, BOB, WRONG).code == 535
    srv.stop()
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "event=auth_failed" in text and "event=auth_ok" in text
    assert "peer=127.0.0.1" in text
    for secret in (*PASSWORDS.values(), WRONG):
        assert secret not in text
        assert b64(secret) not in text
    for user, secret in ((ALICE, WRONG), *PASSWORDS.items()):
        assert plain(user, secret) not in text


def test_users_file_reloaded_without_restart(server_factory: Any, users_file: Path) -> None:
    srv = start(server_factory, users_file, allow_insecure_auth=True)
    admin = UserStore(str(users_file), hasher=FAST)
    admin.add("carol@example.com", "Carol-New-Pass-55")
    with RawSMTP(srv.host, srv.port) as raw:
        raw.ehlo()
        assert raw.cmd(f"AUTH PLAIN {plain('carol@example.com', 'Carol-New-Pass-55')}") \
            .code == 235
        raw.envelope("carol@example.com", "carol@example.com")  # a mailbox now
    admin.remove("carol@example.com")
    with RawSMTP(srv.host, srv.port) as raw:
        raw.ehlo()
        assert raw.cmd(f"AUTH PLAIN {plain('carol@example.com', 'Carol-New-Pass-55')}") \
            .code == 535
        raw.cmd("MAIL FROM:<x@remote.test>")
        assert raw.cmd("RCPT TO:<carol@example.com>").code == 550


def test_two_users_get_their_own_maildirs(server_factory: Any, users_file: Path) -> None:
    srv = start(server_factory, users_file, postmaster=BOB)
    with RawSMTP(srv.host, srv.port) as raw:
        raw.ehlo()
        raw.envelope("sender@remote.test", ALICE)
        assert raw.data(b"Subject: for alice\r\n\r\nA\r\n").code == 250
        raw.envelope("sender@remote.test", BOB, "POSTMASTER@example.com")
        assert raw.data(b"Subject: for bob\r\n\r\nB\r\n").code == 250
        raw.envelope("sender@remote.test", "postmaster")
        assert raw.data(b"Subject: for postmaster\r\n\r\nP\r\n").code == 250
    alice = [p.read_bytes() for p in delivered(srv.mail_dir, ALICE)]
    bob = [p.read_bytes() for p in delivered(srv.mail_dir, BOB)]
    assert len(alice) == 1 and b"for alice" in alice[0]
    # Bob's own message once (one link even though postmaster is him too),
    # and the one for <postmaster>.
    assert sorted(b"for bob" in m for m in bob) == [False, True]
    assert any(b"for postmaster" in m for m in bob)
    assert not (srv.mail_dir / "example.com" / "postmaster").exists()
    # The Received header still names the address the client used.
    trace, _ = split_trace(next(m for m in bob if b"for postmaster" in m))
    assert "<postmaster>" in trace["received"]


def test_submission_port_needs_users_file(config_factory: Any) -> None:
    from simplesmtp.config import ConfigError
    from simplesmtp.server import Server
    with pytest.raises(ConfigError, match="--submission-port"):
        Server(config_factory(submission_port=0))


def test_sighup_reloads_users(spawn_server: Any, users_file: Path, tmp_path: Path) -> None:
    proc = spawn_server("--users-file", str(users_file), "--allow-insecure-auth",
                        "--local-domain", "example.com", "--local-domain", "other.test")
    good = UserStore(str(users_file), hasher=FAST)
    good.add("dave@other.test", "Dave-Pass-123")
    proc.signal(signal.SIGHUP)
    proc.wait_for(r"event=users_reloaded .*accounts=3")
    with RawSMTP("127.0.0.1", proc.port) as raw:
        raw.ehlo()
        assert raw.cmd(f"AUTH PLAIN {plain('dave@other.test', 'Dave-Pass-123')}").code == 235
        raw.cmd("MAIL FROM:<dave@other.test>")
        assert raw.cmd("RCPT TO:<nobody@other.test>").code == 550
    assert wait_until(lambda: "event=auth_ok" in proc.stderr, timeout=5)
    assert "Dave-Pass-123" not in proc.stderr


def test_commands_pipelined_after_auth_wait_for_the_check(server_factory: Any,
                                                          users_file: Path) -> None:
    # The password check runs in a thread; what the client sent behind the
    # AUTH line is read only after it, so MAIL already counts as
    # authenticated (the relay to a remote domain is allowed).
    srv = start(server_factory, users_file, allow_insecure_auth=True)
    with RawSMTP(srv.host, srv.port) as raw:
        raw.send(crlf("EHLO client.test", f"AUTH PLAIN {plain(ALICE, PASSWORDS[ALICE])}",
                      f"MAIL FROM:<{ALICE}>", "RCPT TO:<far@remote.test>", "DATA"))
        assert [r.code for r in raw.replies(5)] == [250, 235, 250, 250, 354]
        raw.send(b"Subject: piped\r\n\r\nx\r\n.\r\n")
        assert raw.reply().code == 250
    files = delivered(srv.mail_dir, "far@remote.test")
    trace, _ = split_trace(files[0].read_bytes())
    assert " with ESMTPA " in trace["received"]
