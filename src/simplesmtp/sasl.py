"""SASL mechanisms (RFC 4422) as sans-I/O state machines.

A mechanism is fed the client's decoded responses and answers with one
``Step``: a challenge to send, a request the caller must resolve (checking a
password is slow, argon2; looking up SCRAM keys reads the users file), or
the outcome.  Nothing here touches the network, the users file or a clock,
so the SMTP engine can drive a mechanism without blocking and tests can
drive one without a server.

Theory of operation
-------------------
* ``start(initial)`` begins the exchange; ``initial`` is the initial
  response of ``AUTH <mech> <ir>`` (RFC 4954 §4), ``None`` when absent and
  ``b""`` for ``=``.
* ``respond(data)`` takes the next decoded client response.
* After a ``CheckPassword`` or ``LookupScram`` step the caller runs the
  request (in a thread) and passes the result to ``resolve``.
* ``Success`` may carry final server data (SCRAM's ``v=``); SMTP has no
  "success with data" reply, so the engine sends it as a 334 challenge and
  waits for an empty response before 235 (RFC 4954 §4).

Mechanisms: PLAIN (RFC 4616), LOGIN (draft-murchison-sasl-login) and
SCRAM-SHA-256 (RFC 5802, RFC 7677), without channel binding (the -PLUS
variant is not offered).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import stringprep
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

# RFC 7677 §4: "the hash iteration-count ... SHOULD be at least 4096".
SCRAM_MIN_ITERATIONS = 4096
# RFC 4954 §4 only bounds the line; 1 KiB of credentials is plenty and keeps
# a peer from making us hash megabytes.
MAX_FIELD = 1024


# --- Steps -------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Challenge:
    """Send ``data`` to the client (base64-encoded by the caller)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class CheckPassword:
    """Verify this password for ``username``; resolve with the canonical
    account name, or None when the credentials are wrong."""

    username: str
    password: str = field(repr=False)  # never in a repr, so never in a log


@dataclass(frozen=True, slots=True)
class LookupScram:
    """Fetch the SCRAM keys of ``username``; resolve with ``ScramCredentials``
    (made-up ones for an unknown user, so that the exchange does not reveal
    which accounts exist; RFC 5802 §5.1)."""

    username: str


@dataclass(frozen=True, slots=True)
class Success:
    username: str
    data: bytes | None = None  # additional data to send before 235


@dataclass(frozen=True, slots=True)
class Failure:
    """``malformed``: the client broke the mechanism's syntax (501);
    otherwise the credentials were wrong (535)."""

    reason: str
    malformed: bool = False
    username: str | None = None


Request = CheckPassword | LookupScram
Step = Challenge | CheckPassword | LookupScram | Success | Failure


@dataclass(frozen=True, slots=True)
class ScramCredentials:
    """What the server stores for SCRAM (RFC 5802 §3): never the password."""

    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes
    username: str | None = None  # canonical account name; None: made up


class Mechanism(Protocol):
    name: str

    def start(self, initial: bytes | None) -> Step: ...

    def respond(self, data: bytes) -> Step: ...

    def resolve(self, result: object) -> Step: ...


# --- SASLprep (RFC 4013), used on SCRAM passwords --------------------------

def saslprep(text: str) -> str:
    """Prepare a password as RFC 4013 says (profile of stringprep, RFC 3454).

    Raises ValueError for prohibited characters or bad bidirectional text.
    """
    # §2.1 mapping: non-ASCII spaces to SPACE, "commonly mapped to nothing"
    # removed; §2.2 normalisation: NFKC.
    mapped = "".join(
        " " if stringprep.in_table_c12(ch) else ch
        for ch in text if not stringprep.in_table_b1(ch))
    out = unicodedata.normalize("NFKC", mapped)
    if not out:
        return out
    prohibited = (stringprep.in_table_c12, stringprep.in_table_c21_c22,
                  stringprep.in_table_c3, stringprep.in_table_c4, stringprep.in_table_c5,
                  stringprep.in_table_c6, stringprep.in_table_c7, stringprep.in_table_c8,
                  stringprep.in_table_c9)
    for ch in out:
        if any(test(ch) for test in prohibited):
            raise ValueError("prohibited character")
        if stringprep.in_table_a1(ch):
            raise ValueError("unassigned code point")
    # RFC 3454 §6: bidirectional text rules.
    if any(stringprep.in_table_d1(ch) for ch in out):
        if any(stringprep.in_table_d2(ch) for ch in out):
            raise ValueError("mixed bidirectional text")
        if not (stringprep.in_table_d1(out[0]) and stringprep.in_table_d1(out[-1])):
            raise ValueError("bad bidirectional text")
    return out


def scram_credentials(password: str, *, salt: bytes | None = None,
                      iterations: int = SCRAM_MIN_ITERATIONS,
                      username: str | None = None) -> ScramCredentials:
    """Derive the stored SCRAM-SHA-256 keys from a password (RFC 5802 §3)."""
    if iterations < SCRAM_MIN_ITERATIONS:
        raise ValueError(f"SCRAM iterations must be at least {SCRAM_MIN_ITERATIONS}")
    salt = os.urandom(16) if salt is None else salt
    salted = hashlib.pbkdf2_hmac("sha256", saslprep(password).encode("utf-8"), salt,
                                 iterations)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    server_key = hmac.digest(salted, b"Server Key", "sha256")
    return ScramCredentials(salt, iterations, hashlib.sha256(client_key).digest(),
                            server_key, username)


# --- PLAIN (RFC 4616) --------------------------------------------------------

def _utf8(data: bytes) -> str | None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if len(data) <= MAX_FIELD else None


class Plain:
    """One message: ``[authzid] NUL authcid NUL passwd``."""

    name = "PLAIN"

    def __init__(self) -> None:
        self._username: str | None = None

    def start(self, initial: bytes | None) -> Step:
        if initial is None:
            return Challenge(b"")  # RFC 4616 §2: the server asks with an empty challenge
        return self.respond(initial)

    def respond(self, data: bytes) -> Step:
        if self._username is not None:
            return Failure("unexpected response", malformed=True)
        parts = data.split(b"\0")
        if len(parts) != 3:
            return Failure("not authzid NUL authcid NUL passwd", malformed=True)
        authzid, authcid, passwd = (_utf8(p) for p in parts)
        if authzid is None or authcid is None or passwd is None:
            return Failure("not UTF-8 or too long", malformed=True)
        if not authcid or not passwd:
            return Failure("empty user name or password", malformed=True)
        self._username = authcid
        # Acting for another identity (proxy authorisation) is not
        # supported; an authzid equal to the user is harmless.
        if authzid and authzid.lower() != authcid.lower():
            return Failure("authorization identity refused", username=authcid)
        return CheckPassword(authcid, passwd)

    def resolve(self, result: object) -> Step:
        if isinstance(result, str):
            return Success(result)
        return Failure("bad credentials", username=self._username)


# --- LOGIN (draft-murchison-sasl-login-00) ----------------------------------

class Login:
    """Two challenges, ``Username:`` and ``Password:``.  An initial response
    is the user name (what smtplib and most clients send)."""

    name = "LOGIN"

    def __init__(self) -> None:
        self._username: str | None = None
        self._done = False

    def start(self, initial: bytes | None) -> Step:
        if initial is None:
            return Challenge(b"Username:")
        return self.respond(initial)

    def respond(self, data: bytes) -> Step:
        text = _utf8(data)
        if self._done:
            return Failure("unexpected response", malformed=True)
        if text is None:
            return Failure("not UTF-8 or too long", malformed=True)
        if self._username is None:
            if not text:
                return Failure("empty user name", malformed=True)
            self._username = text
            return Challenge(b"Password:")
        self._done = True
        if not text:
            return Failure("empty password", malformed=True, username=self._username)
        return CheckPassword(self._username, text)

    def resolve(self, result: object) -> Step:
        if isinstance(result, str):
            return Success(result)
        return Failure("bad credentials", username=self._username)


# --- SCRAM-SHA-256 (RFC 5802, RFC 7677) --------------------------------------

def _scram_name(text: str) -> str | None:
    """Decode a saslname (RFC 5802 §5.1): ``=2C`` is ",", ``=3D`` is "="."""
    out = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == ",":
            return None
        if ch == "=":
            code = text[i + 1:i + 3]
            if code == "2C":
                out.append(",")
            elif code == "3D":
                out.append("=")
            else:
                return None
            i += 3
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class ScramSha256:
    """Server side of SCRAM-SHA-256 without channel binding."""

    name = "SCRAM-SHA-256"

    def __init__(self, nonce: Callable[[], str] | None = None) -> None:
        self._nonce = nonce or (lambda: base64.b64encode(os.urandom(18)).decode("ascii"))
        self._state = "first"
        self._username: str | None = None
        self._gs2_header = ""
        self._client_first_bare = ""
        self._server_first = ""
        self._nonce_full = ""
        self._creds: ScramCredentials | None = None

    def start(self, initial: bytes | None) -> Step:
        if initial is None or initial == b"":
            return Challenge(b"")  # client-first comes as the next response
        return self.respond(initial)

    def respond(self, data: bytes) -> Step:
        text = _utf8(data)
        if text is None:
            return Failure("not UTF-8 or too long", malformed=True)
        if self._state == "first":
            return self._client_first(text)
        if self._state == "final":
            return self._client_final(text)
        return Failure("unexpected response", malformed=True)

    def _client_first(self, text: str) -> Step:
        # gs2-header = gs2-cbind-flag "," [ authzid ] ","
        parts = text.split(",", 2)
        if len(parts) != 3:
            return Failure("bad client-first-message", malformed=True)
        cbind, authzid, bare = parts
        if cbind.startswith("p="):
            # Channel binding is not offered (no -PLUS mechanism advertised).
            return Failure("channel binding not supported", malformed=True)
        if cbind not in ("n", "y"):
            return Failure("bad gs2 flag", malformed=True)
        attrs = bare.split(",")
        if attrs[0].startswith("m="):
            return Failure("mandatory extension not supported", malformed=True)
        if len(attrs) < 2 or not attrs[0].startswith("n=") or not attrs[1].startswith("r="):
            return Failure("bad client-first-message-bare", malformed=True)
        username = _scram_name(attrs[0][2:])
        nonce = attrs[1][2:]
        if not username or not nonce or not nonce.isprintable() or "," in nonce:
            return Failure("bad user name or nonce", malformed=True)
        if authzid:
            if not authzid.startswith("a=") or _scram_name(authzid[2:]) is None:
                return Failure("bad authzid", malformed=True)
            if (_scram_name(authzid[2:]) or "").lower() != username.lower():
                return Failure("authorization identity refused", username=username)
        self._username = username
        self._gs2_header = f"{cbind},{authzid},"
        self._client_first_bare = bare
        self._nonce_full = nonce + self._nonce()
        self._state = "lookup"
        return LookupScram(username)

    def resolve(self, result: object) -> Step:
        if self._state != "lookup" or not isinstance(result, ScramCredentials):
            return Failure("internal: no credentials")
        self._creds = result
        self._server_first = (f"r={self._nonce_full},s={_b64(result.salt)},"
                              f"i={result.iterations}")
        self._state = "final"
        return Challenge(self._server_first.encode("ascii"))

    def _client_final(self, text: str) -> Step:
        self._state = "done"
        creds = self._creds
        assert creds is not None
        head, sep, proof_b64 = text.rpartition(",p=")
        if not sep:
            return Failure("no proof", malformed=True, username=self._username)
        attrs = head.split(",")
        if len(attrs) < 2 or not attrs[0].startswith("c=") or not attrs[1].startswith("r="):
            return Failure("bad client-final-message", malformed=True, username=self._username)
        try:
            cbind = base64.b64decode(attrs[0][2:], validate=True)
            proof = base64.b64decode(proof_b64, validate=True)
        except ValueError:
            return Failure("bad base64 in client-final", malformed=True,
                           username=self._username)
        if cbind != self._gs2_header.encode("utf-8"):
            return Failure("channel binding mismatch", username=self._username)
        if attrs[1][2:] != self._nonce_full:
            return Failure("nonce mismatch", username=self._username)
        auth_message = ",".join((self._client_first_bare, self._server_first, head))
        signature = hmac.digest(creds.stored_key, auth_message.encode("utf-8"), "sha256")
        if len(proof) != len(signature):
            return Failure("bad proof", username=self._username)
        client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
        valid = hmac.compare_digest(hashlib.sha256(client_key).digest(), creds.stored_key)
        if not valid or creds.username is None:
            return Failure("bad credentials", username=self._username)
        server_sig = hmac.digest(creds.server_key, auth_message.encode("utf-8"), "sha256")
        return Success(creds.username, f"v={_b64(server_sig)}".encode("ascii"))


MECHANISMS: dict[str, Callable[[], Mechanism]] = {
    "SCRAM-SHA-256": ScramSha256,
    "PLAIN": Plain,
    "LOGIN": Login,
}


def new_mechanism(name: str) -> Mechanism | None:
    factory = MECHANISMS.get(name.upper())
    return factory() if factory is not None else None


# --- A client for SCRAM-SHA-256 (tests and the ``user check`` command) ------

class ScramClient:
    """The client side, sans-I/O: ``first()``, ``final(server_first)``,
    ``verify(server_final)``."""

    def __init__(self, username: str, password: str, nonce: str | None = None) -> None:
        self.username = username.replace("=", "=3D").replace(",", "=2C")
        self.password = password
        self.nonce = nonce or base64.b64encode(os.urandom(18)).decode("ascii")
        self._bare = f"n={self.username},r={self.nonce}"
        self._server_sig = b""

    def first(self) -> bytes:
        return f"n,,{self._bare}".encode()

    def final(self, server_first: bytes) -> bytes:
        text = server_first.decode("utf-8")
        attrs = dict(a.split("=", 1) for a in text.split(","))
        if not attrs["r"].startswith(self.nonce):
            raise ValueError("server nonce does not extend ours")
        salted = hashlib.pbkdf2_hmac("sha256", saslprep(self.password).encode("utf-8"),
                                     base64.b64decode(attrs["s"]), int(attrs["i"]))
        client_key = hmac.digest(salted, b"Client Key", "sha256")
        stored_key = hashlib.sha256(client_key).digest()
        head = f"c={_b64(b'n,,')},r={attrs['r']}"
        auth_message = f"{self._bare},{text},{head}".encode()
        signature = hmac.digest(stored_key, auth_message, "sha256")
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        server_key = hmac.digest(salted, b"Server Key", "sha256")
        self._server_sig = hmac.digest(server_key, auth_message, "sha256")
        return f"{head},p={_b64(proof)}".encode("ascii")

    def verify(self, server_final: bytes) -> bool:
        return hmac.compare_digest(server_final, b"v=" + _b64(self._server_sig).encode())
