"""One configuration object, from flags, the environment and a ``.env`` file.

Every setting is declared once in ``SETTINGS``: its flag, its environment
variable (``SIMPLESMTP_<NAME>``), its default, its bounds and, where the
original simpleSMTP had one, its old ``.env`` key.  Precedence is
flag > environment > ``.env`` > default.

Old simpleSMTP keys (``PORT``, ``TIMEOUT``, ...) are read from the ``.env``
file only: in the environment, names like ``PORT`` usually belong to
something else.  Each use logs a warning naming the new key.

Validation happens here, before anything listens; ``ConfigError`` carries a
one-line message that names the setting.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("simplesmtp.config")

ENV_PREFIX = "SIMPLESMTP_"


class ConfigError(ValueError):
    """A setting has a bad value; the message names it."""


def _system_hostname() -> str:
    # The kernel's node name: no resolver is asked (unlike socket.getfqdn).
    return socket.gethostname() or "localhost"


def _int(lo: int, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text.strip().replace("_", ""))
        except ValueError:
            raise ValueError(f"{text!r} is not a whole number") from None
        if not lo <= value <= hi:
            raise ValueError(f"{value} is outside {lo}..{hi}")
        return value
    return parse


def _float(lo: float, hi: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            raise ValueError(f"{text!r} is not a number") from None
        if not lo <= value <= hi:
            raise ValueError(f"{value:g} is outside {lo:g}..{hi:g}")
        return value
    return parse


def _bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{text!r} is not true or false")


def _choice(*options: str, upper: bool = False) -> Callable[[str], str]:
    def parse(text: str) -> str:
        t = text.strip().upper() if upper else text.strip().lower()
        if t not in options:
            raise ValueError(f"{text!r} is not one of {', '.join(options)}")
        return t
    return parse


def _duration(lo: float, hi: float) -> Callable[[str], float]:
    """Seconds, or a number with ``us``, ``ms`` or ``s``: ``1ms`` is 0.001."""
    def parse(text: str) -> float:
        t = text.strip().lower()
        scale = 1.0
        for suffix, factor in (("us", 1e-6), ("\u00b5s", 1e-6), ("ms", 1e-3), ("s", 1.0)):
            if t.endswith(suffix):
                t, scale = t[: -len(suffix)].strip(), factor
                break
        try:
            value = float(t) * scale
        except ValueError:
            raise ValueError(f"{text!r} is not a duration (like 1ms or 0.001)") from None
        if not lo <= value <= hi:
            raise ValueError(f"{text.strip()} is outside {lo:g}s..{hi:g}s")
        return value
    return parse


def _ratio(text: str) -> float:
    """A share: ``99%`` or ``0.99``."""
    t = text.strip()
    try:
        value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise ValueError(f"{text!r} is not a share (like 99% or 0.99)") from None
    if not 0 < value <= 1:
        # A bare 99 is the classic slip: it means 9900%, not 99%.
        raise ValueError(f"{text.strip()} is out of range: write a share such as"
                         " 99% or 0.99 (above 0, at most 100%)")
    return value


def _domains(text: str) -> tuple[str, ...]:
    """Comma-separated domains (a repeated flag arrives joined by commas)."""
    from .address import is_domain

    out: list[str] = []
    for part in text.split(","):
        d = part.strip().lower().rstrip(".")
        if not d:
            continue
        if not is_domain(d) or d.startswith("["):
            raise ValueError(f"{part.strip()!r} is not a domain")
        if d not in out:
            out.append(d)
    return tuple(out)


def _mailbox(text: str) -> str:
    t = text.strip()
    local, at, domain = t.rpartition("@")
    if not at or not local or not domain or not t.isprintable() or " " in t:
        raise ValueError(f"{text!r} is not an address like user@example.com")
    return t


def _text(text: str) -> str:
    t = text.strip()
    if not t:
        raise ValueError("must not be empty")
    return t


def _hostname(text: str) -> str:
    t = text.strip()
    if not t or not t.isprintable() or " " in t:
        raise ValueError(f"{text!r} is not a host name")
    return t


@dataclass(frozen=True)
class Setting:
    name: str  # attribute of Config; flag is --name-with-dashes
    parse: Callable[[str], Any]
    default: Any  # a value, or a callable giving one
    help: str
    legacy: str | None = None  # key of the original simpleSMTP's .env
    metavar: str | None = None
    is_flag: bool = False  # a switch without value on the command line
    repeatable: bool = False  # the flag may be given again; values joined by ","

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


MIB = 1024 * 1024

SETTINGS: tuple[Setting, ...] = (
    Setting("host", _text, "127.0.0.1", "address to listen on", metavar="ADDR"),
    Setting("port", _int(0, 65535), 2525, "SMTP port (0: any free port)",
            legacy="PORT"),
    Setting("hostname", _hostname, _system_hostname,
            "name in the greeting and Received headers (default: this machine's"
            " name, without asking DNS)", metavar="NAME"),
    Setting("mail_dir", _text, "./mail", "root of the Maildir tree",
            legacy="MAIL_DIRECTORY", metavar="DIR"),
    Setting("storage", _choice("maildir", "null"), "maildir",
            "storage back end: maildir, or null (reads and discards; load tests)"),
    # RFC 1870 SIZE; 25 MiB is what large providers accept.
    Setting("max_message_size", _int(1024, 2**40), 25 * MIB,
            "largest message accepted, in bytes", legacy="MAX_MAIL_SIZE",
            metavar="BYTES"),
    # RFC 5321 §4.5.3.1.8: at least 100 recipients must be accepted.
    Setting("max_recipients", _int(1, 100_000), 100,
            "recipients per message (more get 452 4.5.3)", legacy="MAX_RECIPIENTS",
            metavar="N"),
    # RFC 5321 §4.5.3.1.4: command lines are at most 512 octets with CRLF.
    Setting("max_line_length", _int(512, MIB), 512,
            "longest command line in bytes, with CRLF (longer: 500 5.5.2)",
            legacy="MAX_LENGTH_LINE", metavar="BYTES"),
    # RFC 5321 §4.5.3.2.7: a server waits at least 5 minutes for a command.
    # Counted from our last reply, so a line sent a byte at a time does not
    # extend it (Postfix's smtpd_per_record_deadline).
    Setting("timeout", _float(0.01, 86400), 300.0,
            "seconds a client has to send each command line before 421 4.4.2",
            legacy="TIMEOUT", metavar="SECONDS"),
    # RFC 5321 §4.5.3.2.5: a client gives up on a data block after 3 minutes,
    # so a longer silence in DATA/BDAT means it is gone.
    Setting("data_timeout", _float(0.01, 86400), 180.0,
            "seconds of silence allowed while message content arrives, at most"
            " --timeout (421 4.4.2)",
            metavar="SECONDS"),
    # Postfix's smtpd_min_data_rate (500): the DATA/BDAT deadline is
    # --data-timeout plus one second per this many bytes received, so a
    # trickle cannot hold a session forever.  0 turns it off.
    Setting("min_data_rate", _int(0, 2**30), 500,
            "bytes per second message content must average (421 4.4.2; 0: off)",
            metavar="BYTES"),
    # Sessions are cheap here, file descriptors are not: one per session,
    # one more while a message is written.  Postfix allows 100 processes.
    Setting("max_connections", _int(1, 1_000_000), 1000,
            "concurrent sessions; more are answered 421 4.7.0 and closed", metavar="N"),
    # Postfix's smtpd_client_connection_count_limit (50).  0 turns it off.
    Setting("max_connections_per_ip", _int(0, 1_000_000), 50,
            "concurrent sessions per client address (421 4.7.0; 0: no limit)",
            metavar="N"),
    # Postfix's smtpd_hard_error_limit (20).  0 turns it off.
    Setting("max_errors", _int(0, 100_000), 20,
            "5xx replies a session may get before 421 4.7.0 and close (0: no limit)",
            metavar="N"),
    Setting("shutdown_grace", _float(0, 3600), 30.0,
            "seconds running transactions get to finish on SIGTERM/SIGINT",
            metavar="SECONDS"),
    Setting("measure_performance", _bool, False,
            "log per-command latency statistics when each session closes",
            legacy="MEASURE_PERFORMANCE", is_flag=True),
    # The original simpleSMTP's objective: 99 % of valid commands within
    # 1 ms inside the server, judged over one-minute windows (metrics.py).
    Setting("slo_threshold", _duration(1e-6, 60.0), 0.001,
            "latency objective per command: 1ms, 250us or seconds", metavar="TIME"),
    Setting("slo_target", _ratio, 0.99,
            "share of commands per minute that must meet --slo-threshold: 99%% or 0.99",
            metavar="SHARE"),
    Setting("metrics_host", _text, "127.0.0.1",
            "address of the /metrics and /healthz HTTP endpoint", metavar="ADDR"),
    Setting("metrics_port", _int(0, 65535), None,
            "port of the /metrics and /healthz HTTP endpoint (off unless set;"
            " 0: any free port)", metavar="PORT"),
    # TLS (RFC 3207 STARTTLS, RFC 8314 implicit TLS); see tls.py.
    Setting("tls_cert", _text, None,
            "PEM certificate (chain) for STARTTLS and --tls-port; enables STARTTLS",
            legacy="CERTIFICATE", metavar="FILE"),
    Setting("tls_key", _text, None, "PEM private key of --tls-cert (EC or RSA)",
            legacy="KEY", metavar="FILE"),
    Setting("tls_port", _int(0, 65535), None,
            "implicit-TLS port (RFC 8314; off unless set; 0: any free port)",
            metavar="PORT"),
    Setting("require_tls", _bool, False,
            "refuse MAIL before STARTTLS on the plain port (530 5.7.0)", is_flag=True),
    # RFC 8996 retired TLS 1.0 and 1.1; RFC 8314 §4.1 asks for 1.2 or later.
    Setting("tls_min_version", _choice("1.2", "1.3"), "1.2",
            "lowest TLS version accepted: 1.2 or 1.3", metavar="VERSION"),
    # A handshake is a few round trips; a minute is asyncio's own default and
    # bounds what a client that stalls mid-handshake can hold.
    Setting("tls_handshake_timeout", _float(0.01, 3600), 60.0,
            "seconds a TLS handshake may take", metavar="SECONDS"),
    # Accounts, AUTH and recipient policy (docs/accounts.md).
    Setting("users_file", _text, None,
            "users file of 'simplesmtp user'; enables AUTH and known mailboxes",
            metavar="FILE"),
    Setting("local_domain", _domains, (),
            "domain whose mailboxes are ours (repeatable, or comma-separated);"
            " other domains need AUTH (550 5.7.1)", metavar="DOMAIN", repeatable=True),
    Setting("allow_insecure_auth", _bool, False,
            "offer AUTH without TLS (RFC 4954 §4 and RFC 8314 advise against it)",
            is_flag=True),
    Setting("submission_port", _int(0, 65535), None,
            "submission port (RFC 6409: MAIL needs AUTH first, 530 5.7.0; off unless"
            " set; 0: any free port)", metavar="PORT"),
    Setting("submission_own_sender", _bool, False,
            "on the submission port the sender must be the authenticated account"
            " (553 5.7.1)", is_flag=True),
    Setting("vrfy", _choice("off", "authenticated", "on"), "off",
            "VRFY answers: off (always 252), authenticated or on (250/550 5.1.1)",
            metavar="MODE"),
    Setting("postmaster", _mailbox, None,
            "account that receives mail for postmaster (RFC 5321 §4.5.1); unset:"
            " postmaster@ the first --local-domain", metavar="ADDRESS"),
    # fail2ban's defaults: 5 failures in 10 minutes; Dovecot delays each
    # failed login (auth_failure_delay = 2 s); here the delay doubles.
    Setting("auth_max_failures", _int(1, 100_000), 5,
            "failed AUTH attempts per client address in --auth-failure-window"
            " before a lockout (454 4.7.0)", metavar="N"),
    Setting("auth_failure_window", _float(0.001, 7 * 86400), 600.0,
            "seconds failed AUTH attempts are remembered", metavar="SECONDS"),
    Setting("auth_lockout", _float(0, 7 * 86400), 900.0,
            "seconds AUTH is refused after too many failures", metavar="SECONDS"),
    Setting("auth_failure_delay", _float(0, 60), 1.0,
            "delay before the reply to the first failed AUTH; doubles with each"
            " further failure", metavar="SECONDS"),
    Setting("auth_failure_delay_max", _float(0, 600), 16.0,
            "longest delay before a failed AUTH reply", metavar="SECONDS"),
    # One event loop uses one core; more processes share the ports.
    Setting("workers", _int(1, 256), 1,
            "server processes sharing the ports (SO_REUSEPORT); each has its own"
            " /metrics at --metrics-port plus its index", metavar="N"),
    Setting("log_level", _choice("DEBUG", "INFO", "WARNING", "ERROR", upper=True),
            "INFO", "DEBUG, INFO, WARNING or ERROR"),
)

BY_NAME = {s.name: s for s in SETTINGS}
LEGACY = {s.legacy: s for s in SETTINGS if s.legacy}


@dataclass(frozen=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 2525
    hostname: str = "localhost"
    mail_dir: str = "./mail"
    storage: str = "maildir"
    max_message_size: int = 25 * MIB
    max_recipients: int = 100
    max_line_length: int = 512
    timeout: float = 300.0
    data_timeout: float = 180.0
    min_data_rate: int = 500
    max_connections: int = 1000
    max_connections_per_ip: int = 50
    max_errors: int = 20
    shutdown_grace: float = 30.0
    measure_performance: bool = False
    slo_threshold: float = 0.001
    slo_target: float = 0.99
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_port: int | None = None
    require_tls: bool = False
    tls_min_version: str = "1.2"
    tls_handshake_timeout: float = 60.0
    users_file: str | None = None
    local_domain: tuple[str, ...] = ()
    allow_insecure_auth: bool = False
    submission_port: int | None = None
    submission_own_sender: bool = False
    vrfy: str = "off"
    postmaster: str | None = None
    auth_max_failures: int = 5
    auth_failure_window: float = 600.0
    auth_lockout: float = 900.0
    auth_failure_delay: float = 1.0
    auth_failure_delay_max: float = 16.0
    workers: int = 1
    log_level: str = "INFO"

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


def read_env_file(path: str) -> dict[str, str]:
    from dotenv import dotenv_values

    try:
        values = dotenv_values(path)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"--env-file: {path} is not UTF-8 text"
                          f" (byte {exc.start + 1}): {exc.reason}") from None
    return {k: v for k, v in values.items() if v is not None}


def load(flags: Mapping[str, Any], environ: Mapping[str, str],
         env_file: str | None, *, env_file_required: bool = False) -> Config:
    """Resolve every setting; raise ConfigError naming the first bad one.

    ``flags`` holds only the options given on the command line, already as
    strings or values; ``env_file`` is the ``.env`` path (missing is fine
    unless ``env_file_required``).
    """
    file_values: dict[str, str] = {}
    if env_file:
        if os.path.exists(env_file):
            try:
                file_values = read_env_file(env_file)
            except OSError as exc:
                raise ConfigError(f"--env-file: cannot read {env_file}: {exc.strerror}") from None
        elif env_file_required:
            raise ConfigError(f"--env-file: {env_file} does not exist")
    # A mistyped key would be dropped without a word; other tools' keys
    # may share the file, so only our own prefix is checked.
    known = {s.env for s in SETTINGS} | {ENV_PREFIX + "ENV_FILE"}
    for key in file_values:
        if key.startswith(ENV_PREFIX) and key not in known:
            log.warning("event=config_unknown_key file=%s key=%s", env_file, key)

    values: dict[str, Any] = {}
    for s in SETTINGS:
        source, raw = _lookup(s, flags, environ, file_values, env_file)
        if isinstance(raw, list):  # a repeatable flag given several times
            raw = ",".join(raw)
        if source is None:
            values[s.name] = s.default() if callable(s.default) else s.default
            continue
        if isinstance(raw, str):
            try:
                values[s.name] = s.parse(raw)
            except ValueError as exc:
                where = f" ({source})" if source != "flag" else ""
                raise ConfigError(f"{s.flag}{where}: {exc}") from None
        else:
            values[s.name] = raw
    config = Config(**values)
    _check_mail_dir(config)
    _check_tls(config)
    return config


def _lookup(s: Setting, flags: Mapping[str, Any], environ: Mapping[str, str],
            file_values: Mapping[str, str], env_file: str | None) -> tuple[str | None, Any]:
    if s.name in flags and flags[s.name] is not None:
        return "flag", flags[s.name]
    if s.env in environ:
        return s.env, environ[s.env]
    if s.env in file_values:
        return f"{env_file} {s.env}", file_values[s.env]
    if s.legacy and s.legacy in file_values:
        log.warning("event=config_legacy_key file=%s key=%s use=%s",
                    env_file, s.legacy, s.env)
        return f"{env_file} {s.legacy}", file_values[s.legacy]
    return None, None


def _check_mail_dir(config: Config) -> None:
    if config.storage != "maildir":
        return
    try:
        os.makedirs(config.mail_dir, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"--mail-dir: cannot create {config.mail_dir}: {exc.strerror}") from None
    if not os.access(config.mail_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"--mail-dir: {config.mail_dir} is not writable")


def _check_tls(config: Config) -> None:
    """Both halves of the pair or neither; the pair must load (tls.py)."""
    if (config.tls_cert is None) != (config.tls_key is None):
        given, missing = (("--tls-cert", "--tls-key") if config.tls_key is None
                          else ("--tls-key", "--tls-cert"))
        raise ConfigError(f"{given} needs {missing} too")
    if config.tls_cert is None:
        if config.tls_port is not None:
            raise ConfigError("--tls-port needs --tls-cert and --tls-key")
        if config.require_tls:
            raise ConfigError("--require-tls needs --tls-cert and --tls-key")
        return
    if config.tls_port is not None and config.tls_port == config.port != 0:
        raise ConfigError(f"--tls-port: {config.tls_port} is also --port")
    from . import tls  # imports this module; loaded only when TLS is configured

    try:
        tls.build_context(config.tls_cert, config.tls_key or "", config.tls_min_version)
    except tls.CertificateError as exc:
        raise ConfigError(f"--tls-cert/--tls-key: {exc}") from None


def setting_value(name: str, flag_value: Any, environ: Mapping[str, str],
                  env_file: str | None) -> Any:
    """One setting resolved like ``load`` does (flag > environment > .env >
    default), without validating the others; for commands such as
    ``simplesmtp user`` that need only it."""
    s = BY_NAME[name]
    file_values: dict[str, str] = {}
    if env_file and os.path.exists(env_file):
        try:
            file_values = read_env_file(env_file)
        except OSError as exc:
            raise ConfigError(f"--env-file: cannot read {env_file}: {exc.strerror}") from None
    source, raw = _lookup(s, {name: flag_value}, environ, file_values, env_file)
    if source is None:
        return s.default() if callable(s.default) else s.default
    if isinstance(raw, list):
        raw = ",".join(raw)
    try:
        return s.parse(raw) if isinstance(raw, str) else raw
    except ValueError as exc:
        raise ConfigError(f"{s.flag}: {exc}") from None
