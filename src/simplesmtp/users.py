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

Writes are atomic: the new content goes to a temporary file in the same
directory, is fsync'ed, renamed over the old file, and the directory is
fsync'ed; a crash leaves either the old or the new file, never half of one.
Concurrent writers (two ``simplesmtp user`` commands) are serialised by an
flock on ``<file>.lock``.  The file is created with mode 0600.

Readers (the server) call ``maybe_reload`` when they use the store: one
``stat`` compares size, mtime and inode with what was loaded, so an edit
is picked up without a restart; SIGHUP forces a reload.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hmac
import logging
import os
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

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
    if not name or len(name.encode("utf-8")) > MAX_NAME:
        raise ValueError("account name must be 1 to 256 bytes")
    if not name.isprintable() or any(ch.isspace() for ch in name) or ":" in name:
        raise ValueError("account name must not contain spaces, ':' or control characters")
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


def format_accounts(accounts: dict[str, Account]) -> str:
    lines = [HEADER]
    for account in sorted(accounts.values(), key=lambda a: a.key):
        fields = [account.name, account.password_hash]
        if account.scram is not None:
            fields.append(_format_scram(account.scram))
        lines.append(":".join(fields))
    return "\n".join(lines) + "\n"


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, data: str, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data``: temp file, fsync, rename, fsync dir."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".users.", suffix=".tmp", dir=directory)
    try:
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
        # attempt must see the same salt) but unpredictable.
        self._fake_secret = os.urandom(32)
        # An unknown user still costs one argon2 verification, so that the
        # reply time does not tell which accounts exist.  Made on first use
        # (hashing is slow; most commands never need it).
        self._dummy: str | None = None
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
                if stamp is None:
                    accounts: dict[str, Account] = {}
                else:
                    with open(self.path, encoding="utf-8") as f:
                        accounts = parse(f.read())
            except (OSError, UnicodeDecodeError, UserStoreError) as exc:
                if self._stamp is None and not self._accounts:
                    raise UserStoreError(f"{self.path}: {exc}") from None
                log.error("event=users_reload_failed file=%s error=%s", self.path, exc)
                self._stamp = stamp  # do not retry until it changes again
                return False
            changed = accounts != self._accounts
            self._accounts = accounts
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
        stored = account.password_hash if account is not None else self._dummy_hash()
        ok: bool
        try:
            ok = self.hasher.verify(stored, password)
        except (VerificationError, InvalidHashError):
            ok = False
        return account.name if ok and account is not None else None

    def _dummy_hash(self) -> str:
        if self._dummy is None:
            self._dummy = self.hasher.hash(base64.b64encode(os.urandom(12)).decode())
        return self._dummy

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
                with open(self.path, encoding="utf-8") as f:
                    accounts = parse(f.read())
            except FileNotFoundError:
                accounts = {}
            yield accounts
            atomic_write(self.path, format_accounts(accounts))
        finally:
            os.close(lock_fd)  # releases the flock
        self.reload()

    def _account(self, name: str, password: str) -> Account:
        if not password:
            raise ValueError("the password must not be empty")
        return Account(name, self.hasher.hash(password),
                       scram_credentials(password, iterations=self.scram_iterations,
                                         username=name))

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
