"""The embedded user store: a users file, one account a line.

File format (UTF-8, ``#`` comments and blank lines ignored)::

    # simplesmtp users v1
    alice@example.com:$argon2id$v=19$m=65536,t=3,p=4$...:SCRAM-SHA-256$4096$<salt>$<StoredKey>$<ServerKey>

* field 1, the account name: a login and, when it is an address, a mailbox;
  compared without regard to case (like the Maildir names, which are
  lower-cased);
* field 2, an argon2id hash of the password (argon2-cffi), checked for
  PLAIN and LOGIN;
* field 3, what SCRAM-SHA-256 needs (RFC 5802 §3): salt, iteration count,
  StoredKey and ServerKey, base64.  Neither field lets anyone recover the
  password or log in with what is stored (SCRAM's keys are one-way too:
  StoredKey = H(ClientKey), and the proof needs ClientKey).

The line ``# fake-salt-key <base64>`` after the header holds a random key
(written by the first ``user`` command): SCRAM's made-up salts for unknown
users are derived from it, so they are the same after a restart and in
every ``--workers`` process, as a real user's salt is.  A file written by
hand without that line gets a key derived from its argon2 hashes.

Writes are atomic: the new content goes to a temporary file in the same
directory, is fsync'ed, renamed over the old file, and the directory is
fsync'ed; a crash leaves either the old or the new file, never half of one.
Concurrent writers (two ``simplesmtp user`` commands) are serialised by an
flock on ``<file>.lock``.  The file is created with mode 0600;
a file that exists keeps its owner, group and mode (minus the bits for
others).

Readers (the server) call ``maybe_reload`` when they use the store: one
``stat`` compares size, mtime and inode with what was loaded, so an edit
is picked up without a restart; SIGHUP forces a reload.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import hmac
import logging
import os
import stat
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from argon2 import PasswordHasher, extract_parameters
from argon2.exceptions import InvalidHashError, VerificationError

from .fsutil import fsync_dir as _fsync_dir
from .sasl import (
    SCRAM_MIN_ITERATIONS,
    CheckPassword,
    LookupScram,
    Request,
    ScramCredentials,
    scram_credentials,
)

log = logging.getLogger("simplesmtp.users")

HEADER = "# simplesmtp users v1"
SALT_KEY_PREFIX = "# fake-salt-key "
SCRAM_TAG = "SCRAM-SHA-256"
# RFC 5321 §4.5.3.1.3: a path is at most 256 octets; no account name needs more.
MAX_NAME = 256


class UserStoreError(Exception):
    """The users file cannot be read, parsed or written; message says why."""


@dataclass(frozen=True, slots=True)
class Account:
    name: str
    password_hash: str = ""  # argon2id, for PLAIN and LOGIN
    scram: ScramCredentials | None = None

    @property
    def key(self) -> str:
        return self.name.lower()

    @property
    def domain(self) -> str | None:
        """The domain of an address-shaped account name, lower-cased."""
        local, at, domain = self.name.rpartition("@")
        return domain.lower() if at and local and domain else None


def check_name(name: str) -> str:
    """Validate an account name; return it. Raises ValueError."""
    # Printable first: a name from argv that is not UTF-8 holds surrogate
    # escapes, which are not printable and cannot be encoded.
    if not name.isprintable() or any(ch.isspace() for ch in name) or ":" in name:
        raise ValueError("account name must not contain spaces, ':' or control characters")
    if not name or len(name.encode("utf-8")) > MAX_NAME:
        raise ValueError("account name must be 1 to 256 bytes")
    if name.startswith("#"):
        raise ValueError("account name must not start with '#'")
    return name


def _format_scram(c: ScramCredentials) -> str:
    b = base64.b64encode
    return (f"{SCRAM_TAG}${c.iterations}${b(c.salt).decode()}$"
            f"{b(c.stored_key).decode()}${b(c.server_key).decode()}")


def _parse_scram(text: str, name: str) -> ScramCredentials:
    parts = text.split("$")
    if len(parts) != 5 or parts[0] != SCRAM_TAG:
        raise ValueError("bad SCRAM field")
    try:
        iterations = int(parts[1])
        salt, stored, server = (base64.b64decode(p, validate=True) for p in parts[2:])
    except (ValueError, binascii.Error):
        raise ValueError("bad SCRAM field") from None
    if iterations < SCRAM_MIN_ITERATIONS or len(stored) != 32 or len(server) != 32:
        raise ValueError("bad SCRAM parameters")
    return ScramCredentials(salt, iterations, stored, server, name)


def parse(text: str) -> dict[str, Account]:
    """Accounts by lower-cased name; raises UserStoreError naming the line."""
    accounts: dict[str, Account] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split(":")
        try:
            if len(fields) not in (2, 3):
                raise ValueError("expected name:argon2-hash[:scram]")
            name = check_name(fields[0])
            if not fields[1].startswith("$argon2"):
                raise ValueError("password field is not an argon2 hash")
            scram = _parse_scram(fields[2], name) if len(fields) == 3 and fields[2] else None
        except ValueError as exc:
            # The message names the line, never its content (it holds hashes).
            raise UserStoreError(f"line {number}: {exc}") from None
        account = Account(name, fields[1], scram)
        if account.key in accounts:
            raise UserStoreError(f"line {number}: duplicate account")
        accounts[account.key] = account
    return accounts


def salt_key(text: str, accounts: dict[str, Account]) -> bytes | None:
    """The key for made-up SCRAM salts: the file's ``# fake-salt-key``
    line, else one derived from the argon2 hashes (random salts, so as
    secret as the file), else None (no accounts: nothing to derive from)."""
    for line in text.splitlines():
        if line.startswith(SALT_KEY_PREFIX):
            with contextlib.suppress(ValueError, binascii.Error):
                key = base64.b64decode(line[len(SALT_KEY_PREFIX):].strip(), validate=True)
                if len(key) >= 16:
                    return key
    if not accounts:
        return None
    material = "\n".join(sorted(a.password_hash for a in accounts.values()))
    return hashlib.sha256(b"simplesmtp fake salt key\n" + material.encode()).digest()


def format_accounts(accounts: dict[str, Account], key: bytes | None = None) -> str:
    lines = [HEADER]
    if key is not None:
        lines.append(SALT_KEY_PREFIX + base64.b64encode(key).decode("ascii"))
    for account in sorted(accounts.values(), key=lambda a: a.key):
        fields = [account.name, account.password_hash]
        if account.scram is not None:
            fields.append(_format_scram(account.scram))
        lines.append(":".join(fields))
    return "\n".join(lines) + "\n"


def atomic_write(path: str, data: str, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data``: temp file, fsync, rename, fsync dir.

    A new file gets ``mode``.  A file that exists keeps its owner, group
    and mode (but never readable by others): an admin may have let the
    server's group read it, and ``sudo simplesmtp user ...`` must not
    leave a file the server can no longer read.
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        old: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        old = None
    fd, tmp = tempfile.mkstemp(prefix=".users.", suffix=".tmp", dir=directory)
    try:
        if old is not None:
            mode = stat.S_IMODE(old.st_mode) & ~0o007
            if (old.st_uid, old.st_gid) != (os.geteuid(), os.getegid()):
                with contextlib.suppress(PermissionError):  # only root may
                    os.fchown(fd, old.st_uid, old.st_gid)
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


class UserStore:
    """Accounts of one users file; safe to use from several threads."""

    def __init__(self, path: str, *, hasher: PasswordHasher | None = None,
                 scram_iterations: int = SCRAM_MIN_ITERATIONS) -> None:
        self.path = os.path.abspath(path)
        # argon2-cffi's defaults are RFC 9106's "low memory" profile (argon2id,
        # t=3, m=64 MiB, p=4).  Verification reads the parameters from each
        # hash, so a cheaper hasher (tests) still checks stored hashes right.
        self.hasher = hasher or PasswordHasher()
        self.scram_iterations = scram_iterations
        self._accounts: dict[str, Account] = {}
        self._domains: frozenset[str] = frozenset()
        self._stamp: tuple[int, int, int] | None = None
        self._lock = threading.Lock()
        # Made-up SCRAM salts for unknown users must be stable (a second
        # attempt, a restart or another worker must see the same salt) but
        # unpredictable: keyed by the file's salt key (``salt_key``).
        self._fake_secret = os.urandom(32)
        # An unknown user still costs one argon2 verification, so that the
        # reply time does not tell which accounts exist.
        self._dummy = self._dummy_hash()
        self.reload()

    # --- Reading ------------------------------------------------------------

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_size, st.st_mtime_ns, st.st_ino)

    def reload(self) -> bool:
        """Read the file again; a missing file is an empty store.

        Keeps the accounts loaded before if the file is unreadable or broken
        (a half-edited file must not lock everybody out); raises only when
        nothing was loaded yet.  Returns True when the accounts changed.
        """
        with self._lock:
            stamp = self._stat()
            try:
                text = ""
                if stamp is not None:
                    # utf-8-sig: some editors start the file with a BOM.
                    with open(self.path, encoding="utf-8-sig") as f:
                        text = f.read()
                accounts = parse(text)
            except (OSError, UnicodeDecodeError, UserStoreError) as exc:
                if self._stamp is None and not self._accounts:
                    raise UserStoreError(f"{self.path}: {exc}") from None
                log.error("event=users_reload_failed file=%s error=%s", self.path, exc)
                self._stamp = stamp  # do not retry until it changes again
                return False
            changed = accounts != self._accounts
            self._accounts = accounts
            # No key and no accounts: keep the random one (no one to hide).
            self._fake_secret = salt_key(text, accounts) or self._fake_secret
            if changed:
                self._dummy = self._dummy_hash(accounts)
            self._domains = frozenset(d for a in accounts.values()
                                      if (d := a.domain) is not None)
            if changed and self._stamp is not None:
                log.info("event=users_reloaded file=%s accounts=%d", self.path, len(accounts))
            self._stamp = stamp
            return changed

    def maybe_reload(self) -> None:
        """Reload when the file changed since it was read (one stat)."""
        if self._stat() != self._stamp:
            self.reload()

    def get(self, name: str) -> Account | None:
        self.maybe_reload()
        return self._accounts.get(name.lower())

    def accounts(self) -> list[Account]:
        self.maybe_reload()
        return sorted(self._accounts.values(), key=lambda a: a.key)

    def __len__(self) -> int:
        self.maybe_reload()
        return len(self._accounts)

    def has_domain(self, domain: str) -> bool:
        """True when some account is an address at ``domain``."""
        self.maybe_reload()
        return domain.lower() in self._domains

    # --- Credentials (slow: run in a worker thread) -------------------------

    def verify_password(self, name: str, password: str) -> str | None:
        """The canonical account name if ``password`` is right, else None."""
        account = self.get(name)
        stored = account.password_hash if account is not None else self._dummy
        ok: bool
        try:
            ok = self.hasher.verify(stored, password)
        except (VerificationError, InvalidHashError):
            ok = False
        return account.name if ok and account is not None else None

    def _dummy_hash(self, accounts: dict[str, Account] | None = None) -> str:
        """An argon2 hash string with random salt and digest: verifying it
        costs what verifying a real hash costs, and no password matches it.

        Its parameters are those most stored hashes use (hashes made by
        another tool or older defaults cost what their parameters say),
        else this hasher's.  Written out rather than computed, so that it
        costs nothing to make (hashing it on first use made the first
        unknown user twice as slow as a known one)."""
        h = self.hasher
        seen: dict[tuple[str, int, int, int, int, int, int], int] = {}
        for account in (accounts or {}).values():
            with contextlib.suppress(InvalidHashError, ValueError):
                p = extract_parameters(account.password_hash)
                key = (p.type.name.lower(), p.version, p.salt_len, p.hash_len,
                       p.memory_cost, p.time_cost, p.parallelism)
                seen[key] = seen.get(key, 0) + 1
        if seen:
            kind, version, salt_len, hash_len, memory, time_cost, parallelism = \
                max(seen, key=lambda k: seen[k])
        else:
            kind, version, salt_len, hash_len = h.type.name.lower(), 19, h.salt_len, h.hash_len
            memory, time_cost, parallelism = h.memory_cost, h.time_cost, h.parallelism

        def b64(n: int) -> str:  # argon2's encoding: base64 without padding
            return base64.b64encode(os.urandom(n)).decode("ascii").rstrip("=")

        return (f"$argon2{kind}$v={version}$m={memory},t={time_cost},"
                f"p={parallelism}${b64(salt_len)}${b64(hash_len)}")

    def scram(self, name: str) -> ScramCredentials:
        """Stored SCRAM keys, or made-up ones (unknown user, no SCRAM keys)."""
        account = self.get(name)
        if account is not None and account.scram is not None:
            return account.scram
        digest = hmac.digest(self._fake_secret, name.lower().encode("utf-8"), "sha256")
        return ScramCredentials(digest[:16], self.scram_iterations,
                                os.urandom(32), os.urandom(32), None)

    def resolve(self, request: Request) -> object:
        """Answer a SASL mechanism's request (see ``sasl``)."""
        if isinstance(request, CheckPassword):
            return self.verify_password(request.username, request.password)
        if isinstance(request, LookupScram):
            return self.scram(request.username)
        raise TypeError(f"unknown request {type(request).__name__}")

    # --- Changing the file ----------------------------------------------------

    @contextlib.contextmanager
    def _locked_file(self) -> Iterator[dict[str, Account]]:
        """Load fresh under an exclusive flock; write back on success."""
        directory = os.path.dirname(self.path)
        os.makedirs(directory, exist_ok=True)
        lock_fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            try:
                with open(self.path, encoding="utf-8-sig") as f:
                    text = f.read()
            except FileNotFoundError:
                text = ""
            accounts = parse(text)
            # Keep the key the server uses now (stored, or derived from the
            # hashes of a hand-written file); a new file gets a random one.
            key = salt_key(text, accounts) or os.urandom(32)
            yield accounts
            atomic_write(self.path, format_accounts(accounts, key))
        finally:
            os.close(lock_fd)  # releases the flock
        # Read back our own write without logging it as a reload (the
        # ``user`` commands would print that line on every change).
        self._stamp = None
        self.reload()

    def _account(self, name: str, password: str) -> Account:
        if not password:
            raise ValueError("the password must not be empty")
        try:
            scram = scram_credentials(password, iterations=self.scram_iterations,
                                      username=name)
        except ValueError as exc:
            # SASLprep (RFC 4013) refuses control characters and the like;
            # say where the rule comes from, not just "prohibited character".
            raise ValueError(f"the password is not allowed by SASLprep (RFC 4013): {exc}"
                             " (control characters, for example)") from None
        return Account(name, self.hasher.hash(password), scram)

    def add(self, name: str, password: str) -> None:
        check_name(name)
        account = self._account(name, password)
        with self._locked_file() as accounts:
            if account.key in accounts:
                raise UserStoreError(f"account {name} already exists")
            accounts[account.key] = account

    def set_password(self, name: str, password: str) -> None:
        with self._locked_file() as accounts:
            old = accounts.get(name.lower())
            if old is None:
                raise UserStoreError(f"no account {name}")
            accounts[old.key] = self._account(old.name, password)

    def remove(self, name: str) -> None:
        with self._locked_file() as accounts:
            if accounts.pop(name.lower(), None) is None:
                raise UserStoreError(f"no account {name}")
