"""TLS for the server: contexts, certificate reload, self-signed certificates.

Theory of operation
-------------------
Both ways into TLS go through ``loop.start_tls`` (the public asyncio API):
STARTTLS (RFC 3207) upgrades a plaintext session after the 220 reply, and
the implicit-TLS port (RFC 8314 §3) upgrades every connection before the
greeting.  Each upgrade asks ``ContextHolder.context`` for the context of the
moment, so replacing the certificate (SIGHUP) changes the pair used by new
handshakes without touching sessions already running.

Everything that can be wrong with a certificate or key (missing, unreadable,
encrypted, not PEM, not matching) is found by building a real
``ssl.SSLContext`` and reported as ``CertificateError``, a ``ConfigError``:
at start-up the CLI turns it into one line and exit code 2; on reload the
server logs it and keeps the pair it has.

``generate_self_signed`` writes the development pair of ``simplesmtp
gencert`` with the ``cryptography`` library.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import ssl
import tempfile
import threading
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm

from .config import ConfigError

log = logging.getLogger("simplesmtp.tls")

# --tls-min-version.  TLS 1.0 and 1.1 are deprecated by RFC 8996 and are not
# offered at all; 1.2 is the floor RFC 8314 §4.1 and RFC 9325 §3.1.1 ask for.
MIN_VERSIONS: dict[str, ssl.TLSVersion] = {
    "1.2": ssl.TLSVersion.TLSv1_2,
    "1.3": ssl.TLSVersion.TLSv1_3,
}
DEFAULT_MIN_VERSION = "1.2"

# gencert defaults.  P-384 is what the original project's openssl recipe
# used; 825 days is the longest validity Apple platforms accept for a
# server certificate, which keeps the file usable by every common client.
DEFAULT_DAYS = 825
KEY_TYPES = ("ec", "rsa")
RSA_BITS = 3072  # RFC 9325 §4.3 / NIST SP 800-57: 128-bit security


class CertificateError(ConfigError):
    """A certificate or key cannot be used; the message is one line."""


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for the
    # passphrase of an encrypted key, blocking start-up (or a SIGHUP).
    raise CertificateError("the key is encrypted; give an unencrypted key")


def build_context(cert: str, key: str, min_version: str = DEFAULT_MIN_VERSION) -> ssl.SSLContext:
    """A server context for ``cert``/``key``; raises ``CertificateError``."""
    for what, path in (("certificate", cert), ("key", key)):
        if not os.path.exists(path):
            raise CertificateError(f"{what} file {path} does not exist")
        if not os.access(path, os.R_OK):
            raise CertificateError(f"{what} file {path} is not readable")
    _check_pair(cert, key)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.minimum_version = MIN_VERSIONS[min_version]
    except KeyError:
        raise CertificateError(f"unknown TLS version {min_version!r}") from None
    # No compression (CRIME), fresh ECDH keys per handshake, our cipher order,
    # and no renegotiation (a client could use it to burn our CPU).
    ctx.options |= (ssl.OP_NO_COMPRESSION | ssl.OP_SINGLE_ECDH_USE
                    | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION)
    try:
        ctx.load_cert_chain(cert, key, password=_no_password)
    except CertificateError:
        raise
    except ssl.SSLError as exc:
        # _check_pair has caught the usual faults; this is what OpenSSL
        # alone objects to (a weak key under its security level, ...).
        raise CertificateError(f"cannot use {cert} and {key}: {exc.reason or exc}") from None
    except OSError as exc:
        raise CertificateError(f"cannot read {exc.filename or cert}:"
                               f" {exc.strerror or exc}") from None
    return ctx


def _read(what: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise CertificateError(f"cannot read {what} file {path}: {exc.strerror or exc}") from None


def _check_pair(cert: str, key: str) -> None:
    """Parse both PEM files and compare public keys, so that each fault gets
    a message naming the file at fault (OpenSSL only says "PEM lib")."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert_pem = _read("certificate", cert)
    key_pem = _read("key", key)
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise CertificateError(f"{cert} holds no PEM certificate") from None
    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:  # "password was not given but private key is encrypted"
        raise CertificateError(f"key {key} is encrypted; give an unencrypted key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise CertificateError(f"{key} holds no PEM private key") from None
    if chain[0].public_key() != private.public_key():
        raise CertificateError(f"key {key} does not belong to certificate {cert}")


def describe(ssl_object: Any) -> str | None:
    """``using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)``.

    The comment of the Received header (RFC 3848 §1 leaves its form open;
    this is the wording Postfix and Sendmail use, which readers of mail
    headers know).
    """
    if ssl_object is None:
        return None
    version = ssl_object.version()
    cipher = ssl_object.cipher()
    if not version or not cipher:
        return None
    name, _proto, bits = cipher
    return f"using {version} with cipher {name} ({bits}/{bits} bits)"


@dataclass(frozen=True)
class Pair:
    cert: str
    key: str
    min_version: str = DEFAULT_MIN_VERSION


class ContextHolder:
    """The context new handshakes use; ``reload`` swaps it atomically."""

    def __init__(self, pair: Pair) -> None:
        self.pair = pair
        self._lock = threading.Lock()
        self._context = build_context(pair.cert, pair.key, pair.min_version)
        self.generation = 1  # bumped on each successful reload
        # The implicit-TLS listener is created once with one context; this
        # hook moves each new handshake to the current context.  OpenSSL
        # calls it for every ClientHello, with or without SNI (server_name
        # is then None), before the certificate is chosen.
        self.listener_context = self._context
        self.listener_context.sni_callback = self._select

    @property
    def context(self) -> ssl.SSLContext:
        """The context for a handshake starting now."""
        return self._context

    def _select(self, ssl_object: Any, server_name: str | None,
                ctx: ssl.SSLContext) -> None:
        current = self._context
        if ctx is not current:
            ssl_object.context = current

    def reload(self) -> bool:
        """Re-read the pair from disk; keep the old context if it is bad.

        Blocking (file reads): call it from a worker thread.
        """
        try:
            ctx = build_context(self.pair.cert, self.pair.key, self.pair.min_version)
        except CertificateError as exc:
            log.error("event=tls_reload_failed cert=%s key=%s error=%s kept=previous",
                      self.pair.cert, self.pair.key, _one_line(exc))
            return False
        with self._lock:
            self._context = ctx
            self.generation += 1
            gen = self.generation
        log.info("event=tls_reloaded cert=%s key=%s generation=%d",
                 self.pair.cert, self.pair.key, gen)
        return True


def _one_line(exc: BaseException) -> str:
    text = str(exc).replace("\n", " ")
    return '"' + text.replace('"', "'") + '"' if " " in text else text


# --- gencert ------------------------------------------------------------------

def generate_self_signed(out_dir: str, *, hostname: str = "localhost",
                         days: int = DEFAULT_DAYS, key_type: str = "ec",
                         overwrite: bool = False) -> tuple[str, str]:
    """Write ``server.key`` (mode 0600) and ``server.crt`` into ``out_dir``.

    The certificate is self-signed, valid for ``days`` from now (back-dated
    an hour for clocks that lag), with subject alternative names for
    ``hostname``, localhost, 127.0.0.1 and ::1.  Returns the two paths;
    raises ``OSError`` (or ``FileExistsError`` unless ``overwrite``).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if key_type not in KEY_TYPES:
        raise ValueError(f"key type must be one of {', '.join(KEY_TYPES)}")
    if not 1 <= days <= 36500:
        raise ValueError("days must be between 1 and 36500")
    key_path = os.path.join(out_dir, "server.key")
    cert_path = os.path.join(out_dir, "server.crt")
    if not overwrite:
        for path in (key_path, cert_path):
            if os.path.exists(path):
                raise FileExistsError(f"{path} exists (use --force to replace it)")

    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    if key_type == "ec":
        key = ec.generate_private_key(ec.SECP384R1())
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)

    names: list[x509.GeneralName] = []
    for name in dict.fromkeys([hostname, "localhost", "127.0.0.1", "::1"]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            names.append(x509.DNSName(name))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64]),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "simplesmtp")])
    now = datetime.datetime.now(datetime.UTC)
    public = key.public_key()
    ski = x509.SubjectKeyIdentifier.from_public_key(public)
    # A self-signed end-entity certificate: clients that are told to trust
    # this file (CAfile) accept it as its own anchor; it cannot sign others.
    usage = x509.KeyUsage(
        digital_signature=True, key_encipherment=key_type == "rsa",
        content_commitment=False, data_encipherment=False, key_agreement=False,
        key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                       critical=False)
        .sign(key, hashes.SHA384() if key_type == "ec" else hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    os.makedirs(out_dir, exist_ok=True)
    _write_atomic(key_path, key_pem, 0o600)
    _write_atomic(cert_path, cert_pem, 0o644)
    return key_path, cert_path


def _write_atomic(path: str, data: bytes, mode: int) -> None:
    """Write via a temporary file so a reader (or a SIGHUP) never sees half
    a file; the key's mode is set before any byte is written."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".gencert-", dir=directory)  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
