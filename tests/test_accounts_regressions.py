"""Regression tests for user accounts and AUTH (issue 4), each named after
what it guards.

They come from a review that tried to break the accounts code: password
guessing spread over parallel connections, timing and SCRAM salts that
tell unknown users from known ones, users files edited by hand (BOM, bad
lines, mode and owner), concurrent ``user`` commands, relay attempts and
postmaster mail, and the doc's own walkthrough.  Servers run on port 0
with short timings; every loop is bounded.
"""

from __future__ import annotations

import base64
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher
from clients import RawSMTP
from conftest import delivered
from test_auth import (  # noqa: F401  (users_file is a fixture)
    ALICE,
    FAST,
    PASSWORDS,
    WRONG,
    plain,
    start,
    users_file,
)

from simplesmtp.ratelimit import AuthThrottle
from simplesmtp.sasl import ScramClient
from simplesmtp.users import UserStore, UserStoreError

# --- Password guessing over parallel connections -----------------------------
#
# The lockout must bound the guesses an address gets, however many
# connections it opens: attempts in flight count against the budget, so
# once failures plus attempts in flight reach --auth-max-failures, further
# attempts get 454 4.7.0 without being evaluated.

PARALLEL = 12  # connections from one address, well over the budget of 3


def _parallel_clients(srv: Any) -> list[RawSMTP]:
    clients = [RawSMTP(srv.host, srv.port) for _ in range(PARALLEL)]
    for c in clients:
        c.ehlo()
    return clients


def test_lockout_bounds_plain_guesses_over_parallel_connections(
        server_factory: Any, users_file: Path) -> None:  # noqa: F811
    srv = start(server_factory, users_file, allow_insecure_auth=True, auth_max_failures=3,
                auth_failure_window=60.0, auth_lockout=60.0, auth_failure_delay=0.0)
    clients = _parallel_clients(srv)
    try:
        # Every guess is on the wire before the first answer comes back.
        for c in clients:
            c.send(f"AUTH PLAIN {plain(ALICE, WRONG)}\r\n".encode())
        codes = [c.reply().code for c in clients]
    finally:
        for c in clients:
            c.close()
    assert 1 <= codes.count(535) <= 3, codes
    assert set(codes) <= {535, 454}, codes
    assert srv.call(lambda: srv.server.metrics.auth_failures) <= 3


def test_lockout_bounds_scram_guesses_over_parallel_connections(
        server_factory: Any, users_file: Path) -> None:  # noqa: F811
    # SCRAM evaluates the proof in the engine, after a round trip: the
    # attempt must be counted from the key lookup to the outcome.
    srv = start(server_factory, users_file, allow_insecure_auth=True, auth_max_failures=3,
                auth_failure_window=60.0, auth_lockout=60.0, auth_failure_delay=0.0)
    clients = _parallel_clients(srv)
    codes = []
    try:
        scrams = [ScramClient(ALICE, WRONG) for _ in clients]
        for c, s in zip(clients, scrams, strict=True):
            c.send(f"AUTH SCRAM-SHA-256 {base64.b64encode(s.first()).decode()}\r\n".encode())
        firsts = [c.reply() for c in clients]
        for c, s, r in zip(clients, scrams, firsts, strict=True):
            if r.code == 334:
                final = s.final(base64.b64decode(r.lines[0]))
                c.send(base64.b64encode(final) + b"\r\n")
        for c, r in zip(clients, firsts, strict=True):
            codes.append(c.reply().code if r.code == 334 else r.code)
    finally:
        for c in clients:
            c.close()
    assert 1 <= codes.count(535) <= 3, codes
    assert set(codes) <= {535, 454}, codes


def test_throttle_counts_attempts_in_flight() -> None:
    now = [0.0]
    t = AuthThrottle(max_failures=3, window=60.0, lockout=60.0, clock=lambda: now[0])
    a, b = "192.0.2.1", "192.0.2.2"
    assert t.begin(a) and t.begin(a) and t.begin(a)
    assert not t.begin(a)  # three in flight: the budget is spoken for
    assert t.begin(b)  # other addresses are not affected
    t.end(a)
    t.failure(a)  # one of them failed: 1 failure + 2 in flight
    assert not t.begin(a)
    t.end(a)  # one ended without a verdict (cancelled): 1 + 1
    assert t.begin(a)
    for address in (a, a, b):
        t.end(address)
    assert t._pending == {}  # nothing leaks
    assert t.begin(a)
    t.end(a)
    t.failure(a)
    t.failure(a)  # three failures: locked out, whatever is in flight
    assert not t.begin(a)
    now[0] += 61.0
    assert t.begin(a)


def test_attempt_slot_released_after_cancel_and_disconnect(
        server_factory: Any, users_file: Path) -> None:  # noqa: F811
    # A SCRAM exchange cancelled with "*" after the key lookup, or cut off by
    # the client, must not hold on to its place in the budget.
    srv = start(server_factory, users_file, allow_insecure_auth=True, auth_max_failures=2,
                auth_failure_window=60.0, auth_lockout=60.0, auth_failure_delay=0.0)
    first = base64.b64encode(ScramClient(ALICE, WRONG).first()).decode()
    for _ in range(3):
        with RawSMTP(srv.host, srv.port) as raw:
            raw.ehlo()
            assert raw.cmd(f"AUTH SCRAM-SHA-256 {first}").code == 334
            assert raw.cmd("*").code == 501
            assert raw.cmd(f"AUTH SCRAM-SHA-256 {first}").code == 334
            raw.abort()
    pending = srv.call(lambda: dict(srv.server.auth_throttle._pending))
    for _ in range(50):  # the server may see the last disconnect a bit later
        if not pending:
            break
        time.sleep(0.02)
        pending = srv.call(lambda: dict(srv.server.auth_throttle._pending))
    assert pending == {}
    with RawSMTP(srv.host, srv.port) as raw:
        raw.ehlo()
        assert raw.cmd(f"AUTH PLAIN {plain(ALICE, PASSWORDS[ALICE])}").code == 235


# --- Timing: unknown user vs wrong password ----------------------------------


class CountingHasher(PasswordHasher):
    def __init__(self) -> None:
        super().__init__(time_cost=1, memory_cost=64, parallelism=1)
        self.hashes = 0
        self.verifies = 0

    def hash(self, password: str | bytes, *, salt: bytes | None = None) -> str:
        self.hashes += 1
        return super().hash(password, salt=salt)

    def verify(self, hash: str | bytes, password: str | bytes) -> bool:
        self.verifies += 1
        return super().verify(hash, password)


def test_unknown_user_costs_one_verification_like_a_known_one(tmp_path: Path) -> None:
    # The first unknown user used to pay for hashing the dummy password on
    # top of the verification: twice the time, telling it apart once.
    path = str(tmp_path / "users")
    UserStore(path, hasher=FAST).add(ALICE, PASSWORDS[ALICE])
    hasher = CountingHasher()
    store = UserStore(path, hasher=hasher)
    assert store.verify_password("nobody@example.com", WRONG) is None
    assert (hasher.hashes, hasher.verifies) == (0, 1)
    assert store.verify_password(ALICE, WRONG) is None
    assert (hasher.hashes, hasher.verifies) == (0, 2)
    assert store.verify_password(ALICE, PASSWORDS[ALICE]) == ALICE


def test_dummy_hash_uses_the_hasher_parameters(tmp_path: Path) -> None:
    # The dummy must cost what a real hash of this hasher costs: same
    # argon2 type, memory, time and parallelism.
    hasher = PasswordHasher(time_cost=2, memory_cost=128, parallelism=2)
    store = UserStore(str(tmp_path / "users"), hasher=hasher)
    real = hasher.hash("x").split("$")
    dummy = store._dummy_hash().split("$")
    assert dummy[:4] == real[:4]
    assert not hasher.check_needs_rehash(store._dummy_hash())


def _scram_salt(store: UserStore, name: str) -> bytes:
    return store.scram(name).salt


def test_scram_salt_of_unknown_user_same_after_restart_and_across_workers(
        tmp_path: Path) -> None:
    # A known user's salt comes from the file, so it never changes.  An
    # unknown user's made-up salt came from a secret drawn at start: a
    # restart, or another --workers process, gave a new one, so asking
    # twice told which accounts exist (RFC 5802 §5.1 wants it stable).
    path = str(tmp_path / "users")
    UserStore(path, hasher=FAST).add(ALICE, PASSWORDS[ALICE])
    first, second = UserStore(path, hasher=FAST), UserStore(path, hasher=FAST)
    for name in (ALICE, "nobody@example.com", "Nobody@Example.com"):
        assert _scram_salt(first, name) == _scram_salt(second, name), name
    # Adding an account does not change the made-up salts either (else
    # watching them across a change would tell known from unknown).
    before = _scram_salt(first, "nobody@example.com")
    UserStore(path, hasher=FAST).add("carol@example.com", "Carol-pw-1")
    assert _scram_salt(first, "nobody@example.com") == before
    assert _scram_salt(UserStore(path, hasher=FAST), "nobody@example.com") == before
    # The key is a secret: not something anybody can compute from the name.
    assert _scram_salt(first, "nobody@example.com") != \
        UserStore(str(tmp_path / "other"), hasher=FAST).scram("nobody@example.com").salt


def test_scram_salt_of_unknown_user_stable_for_hand_written_file(tmp_path: Path) -> None:
    # A file written by hand has no stored key: the made-up salts are still
    # the same in every process that reads the same file.
    path = tmp_path / "users"
    UserStore(str(path), hasher=FAST).add(ALICE, PASSWORDS[ALICE])
    kept = [line for line in path.read_text().splitlines() if line.startswith(ALICE)]
    path.write_text("\n".join(kept) + "\n")
    first, second = UserStore(str(path), hasher=FAST), UserStore(str(path), hasher=FAST)
    before = _scram_salt(first, "nobody@example.com")
    assert _scram_salt(second, "nobody@example.com") == before
    assert first.verify_password(ALICE, PASSWORDS[ALICE]) == ALICE
    # The first "user" command stores the key in use, so nothing changes.
    second.add("carol@example.com", "Carol-pw-1")
    assert "# fake-salt-key " in path.read_text()
    assert _scram_salt(first, "nobody@example.com") == before


def test_dummy_hash_follows_the_parameters_of_the_stored_hashes(tmp_path: Path) -> None:
    # Hashes made with other parameters (another tool, older defaults) cost
    # what their parameters say; a dummy with the hasher's own parameters
    # then made an unknown user much slower, or faster, than a known one.
    path = str(tmp_path / "users")
    UserStore(path, hasher=FAST).add(ALICE, PASSWORDS[ALICE])
    store = UserStore(path)  # the server's hasher: argon2-cffi's defaults
    stored = store.get(ALICE)
    assert stored is not None
    assert store._dummy.split("$")[:4] == stored.password_hash.split("$")[:4]
    hasher = CountingHasher()
    counting = UserStore(path, hasher=hasher)
    assert counting.verify_password("nobody@example.com", WRONG) is None
    assert hasher.hashes == 0


# --- Users files edited by hand, names from the command line ------------------


def test_users_file_with_utf8_bom_is_read(tmp_path: Path) -> None:
    # Some editors (Notepad) save UTF-8 with a byte order mark.
    path = tmp_path / "users"
    UserStore(str(path), hasher=FAST).add(ALICE, PASSWORDS[ALICE])
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    store = UserStore(str(path), hasher=FAST)
    assert store.verify_password(ALICE, PASSWORDS[ALICE]) == ALICE


def test_account_name_not_utf8_gets_a_clear_error(tmp_path: Path) -> None:
    # A name from argv that is not UTF-8 arrives with surrogate escapes.
    store = UserStore(str(tmp_path / "users"), hasher=FAST)
    with pytest.raises(ValueError, match="control characters"):
        store.add("e\udcff@example.com", "pw")


def _add_many(path: str, prefix: str, count: int) -> None:
    store = UserStore(path, hasher=FAST)
    for i in range(count):
        store.add(f"{prefix}{i}@example.com", "pw")


def test_concurrent_user_add_from_two_processes_loses_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "users")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_add_many, args=(path, p, 8)) for p in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    names = {a.name for a in UserStore(path, hasher=FAST).accounts()}
    assert names == {f"{p}{i}@example.com" for p in ("a", "b") for i in range(8)}
    assert os.stat(path).st_mode & 0o777 == 0o600
    leftovers = [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    assert leftovers == []


def test_hand_edited_bad_line_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "users"
    UserStore(str(path), hasher=FAST).add(ALICE, PASSWORDS[ALICE])
    bad_line = len(path.read_text().splitlines()) + 1
    with open(path, "a", encoding="utf-8") as f:
        f.write("bob@example.com:plaintext-password\n")
    with pytest.raises(UserStoreError, match=f"line {bad_line}:") as info:
        UserStore(str(path), hasher=FAST)
    assert "plaintext-password" not in str(info.value)


def test_user_commands_do_not_log_their_own_write_as_a_reload(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # "simplesmtp user add" printed "event=users_reloaded" after each change.
    caplog.set_level("INFO", logger="simplesmtp.users")
    store = UserStore(str(tmp_path / "users"), hasher=FAST)
    store.add(ALICE, PASSWORDS[ALICE])
    store.set_password(ALICE, WRONG)
    store.remove(ALICE)
    assert [r.getMessage() for r in caplog.records] == []
    assert store.accounts() == []


def test_password_refused_by_saslprep_says_why(tmp_path: Path) -> None:
    # "user add" answered a password with a control character with a bare
    # "prohibited character".
    store = UserStore(str(tmp_path / "users"), hasher=FAST)
    with pytest.raises(ValueError, match="SASLprep"):
        store.add(ALICE, "a\x01b")
    assert store.accounts() == []


# --- Relay and postmaster, end to end -----------------------------------------


@pytest.mark.parametrize("rcpt", [
    "<x@remote.test>",
    "<X@Remote.TEST>",
    "<@example.com:x@remote.test>",  # a source route through a local domain
    "<x@[192.0.2.1]>",  # an address literal is never local
    "<postmaster@remote.test>",  # only OUR postmaster is always accepted
    "<\"x@remote.test\"@remote.test>",
])
def test_never_an_open_relay(server_factory: Any, users_file: Path,  # noqa: F811
                             rcpt: str) -> None:
    srv = start(server_factory, users_file, allow_insecure_auth=True)
    with RawSMTP(srv.host, srv.port) as raw:
        raw.ehlo()
        assert raw.cmd("MAIL FROM:<x@remote.test>").code == 250
        r = raw.cmd(f"RCPT TO:{rcpt}")
        assert r.code >= 500, (rcpt, r)
        if r.code == 550:
            assert r.lines[0].startswith("5.7.1"), r


def test_postmaster_mail_lands_in_the_configured_account(
        server_factory: Any, users_file: Path) -> None:  # noqa: F811
    srv = start(server_factory, users_file, postmaster=ALICE)
    with RawSMTP(srv.host, srv.port) as raw:
        raw.ehlo()
        raw.envelope("x@remote.test", "postmaster", "PostMaster@Example.COM")
        assert raw.data(b"Subject: hi\r\n\r\nfor the postmaster\r\n").code == 250
    assert len(delivered(srv.mail_dir, ALICE)) == 1


# --- The file's mode and owner survive a change -------------------------------


def test_user_command_keeps_the_mode_an_admin_gave_the_file(tmp_path: Path) -> None:
    # An admin lets the server's group read the file (0640); "user passwd"
    # used to put it back to 0600, and the server could no longer reload.
    path = tmp_path / "users"
    store = UserStore(str(path), hasher=FAST)
    store.add(ALICE, PASSWORDS[ALICE])
    assert os.stat(path).st_mode & 0o777 == 0o600  # created owner-only
    os.chmod(path, 0o640)
    store.set_password(ALICE, WRONG)
    assert os.stat(path).st_mode & 0o777 == 0o640
    os.chmod(path, 0o644)  # never readable by everybody, whatever it was
    store.remove(ALICE)
    assert os.stat(path).st_mode & 0o777 == 0o640


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_user_command_run_as_root_keeps_the_owner(tmp_path: Path) -> None:
    # "sudo simplesmtp user add" must not leave a root-owned 0600 file that
    # the server's own user cannot read.
    path = tmp_path / "users"
    store = UserStore(str(path), hasher=FAST)
    store.add(ALICE, PASSWORDS[ALICE])
    os.chown(path, 65534, 65534)
    store.add("carol@example.com", "Carol-pw-1")
    st = os.stat(path)
    assert (st.st_uid, st.st_gid) == (65534, 65534)
