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
from dataclasses import dataclass
from typing import Any, Callable, Mapping

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
    Setting("timeout", _float(0.01, 86400), 300.0,
            "seconds a client may stay silent before 421 4.4.2", legacy="TIMEOUT",
            metavar="SECONDS"),
    Setting("shutdown_grace", _float(0, 3600), 30.0,
            "seconds running transactions get to finish on SIGTERM/SIGINT",
            metavar="SECONDS"),
    Setting("measure_performance", _bool, False,
            "log per-command latency statistics when each session closes",
            legacy="MEASURE_PERFORMANCE", is_flag=True),
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
    shutdown_grace: float = 30.0
    measure_performance: bool = False
    log_level: str = "INFO"

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


def read_env_file(path: str) -> dict[str, str]:
    from dotenv import dotenv_values

    values = dotenv_values(path)
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

    values: dict[str, Any] = {}
    for s in SETTINGS:
        source, raw = _lookup(s, flags, environ, file_values, env_file)
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
