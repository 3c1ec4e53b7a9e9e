"""Command line: ``simplesmtp serve`` and friends.

The CLI is the only place that exits the process; library code raises.
A configuration error prints one line naming the setting and exits 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from . import __version__
from .config import SETTINGS, ConfigError, load

EXIT_CONFIG = 2


def _default_text(setting: Any) -> str:
    if callable(setting.default):
        return "this machine's name"
    if setting.is_flag or setting.default is None:
        return "off"
    if setting.default == ():
        return "none"
    return str(setting.default)


def _add_settings(parser: argparse.ArgumentParser) -> None:
    for s in SETTINGS:
        help_text = f"{s.help} [default: {_default_text(s)}; env {s.env}]"
        if s.is_flag:
            parser.add_argument(s.flag, dest=s.name, action="store_const", const="true",
                                default=None, help=help_text)
        elif s.repeatable:
            parser.add_argument(s.flag, dest=s.name, action="append", default=None,
                                help=help_text, metavar=s.metavar or s.name.upper())
        else:
            parser.add_argument(s.flag, dest=s.name, default=None, help=help_text,
                                metavar=s.metavar or s.name.upper())
    parser.add_argument("--env-file", default=None, metavar="PATH",
                        help="settings file [default: .env in the working directory;"
                             " env SIMPLESMTP_ENV_FILE]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="simplesmtp", description="An SMTP receiving server with durable Maildir delivery.")
    parser.add_argument("--version", action="version", version=f"simplesmtp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = sub.add_parser(
        "serve", help="run the SMTP server",
        description="Run the SMTP server. Every option can also be set in the"
                    " environment (SIMPLESMTP_<OPTION>) or in a .env file;"
                    " precedence: flag > environment > .env > default.")
    _add_settings(serve)
    gencert = sub.add_parser(
        "gencert", help="write a self-signed TLS key and certificate (development)",
        description="Write server.key (readable by its owner only) and server.crt"
                    " (PEM, self-signed) for --tls-key and --tls-cert.")
    gencert.add_argument("--out-dir", required=True, metavar="DIR",
                         help="directory for server.key and server.crt (created if missing)")
    gencert.add_argument("--hostname", default=None, metavar="NAME",
                         help="name in the certificate, besides localhost, 127.0.0.1"
                              " and ::1 [default: this machine's name]")
    gencert.add_argument("--days", type=int, default=None, metavar="N",
                         help="days of validity [default: 825]")
    gencert.add_argument("--key-type", choices=("ec", "rsa"), default="ec",
                         help="ec (P-384) or rsa (3072 bits) [default: ec]")
    gencert.add_argument("--force", action="store_true",
                         help="replace existing files")
    user = sub.add_parser(
        "user", help="manage the accounts of the users file",
        description="Add, change, remove, list and check accounts of the users file"
                    " (the same file as 'serve --users-file'). Passwords are asked"
                    " twice on the terminal, or read from standard input with"
                    " --password-stdin.")
    user.add_argument("action", choices=("add", "passwd", "remove", "list", "check"))
    user.add_argument("name", nargs="?", help="account name, e.g. alice@example.com")
    user.add_argument("--users-file", default=None, metavar="FILE",
                      help="[env SIMPLESMTP_USERS_FILE]")
    user.add_argument("--password-stdin", action="store_true",
                      help="read the password from the first line of standard input")
    user.add_argument("--env-file", default=None, metavar="PATH",
                      help="settings file [default: .env; env SIMPLESMTP_ENV_FILE]")
    stats = sub.add_parser(
        "stats", help="print the SLO and latency picture of a running server",
        description="Read /metrics from a running server (started with"
                    " --metrics-port) and print the SLO window and per-command"
                    " latencies as a table.")
    stats.add_argument("--url", default=None,
                       help="metrics URL [default: http://METRICS_HOST:METRICS_PORT/metrics]")
    stats.add_argument("--metrics-host", default=None, metavar="ADDR",
                       help="[default: 127.0.0.1; env SIMPLESMTP_METRICS_HOST]")
    stats.add_argument("--metrics-port", default=None, metavar="PORT",
                       help="[env SIMPLESMTP_METRICS_PORT]")
    stats.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                       help="seconds to wait for the server [default: 5]")
    return parser


def stats_command(args: argparse.Namespace, environ: Any = None) -> int:
    """``simplesmtp stats``: fetch /metrics and print the table."""
    import http.client
    import urllib.error
    import urllib.request

    from .metrics import format_stats

    environ = os.environ if environ is None else environ
    url = args.url
    if url is None:
        port = args.metrics_port or environ.get("SIMPLESMTP_METRICS_PORT")
        host = args.metrics_host or environ.get("SIMPLESMTP_METRICS_HOST") or "127.0.0.1"
        if not port:
            print("simplesmtp: error: stats needs --url or --metrics-port", file=sys.stderr)
            return EXIT_CONFIG
        # Checked as serve checks it: urllib would take 99999 as another port.
        from .config import BY_NAME
        try:
            port = BY_NAME["metrics_port"].parse(port)
        except ValueError as exc:
            where = "--metrics-port" if args.metrics_port else "SIMPLESMTP_METRICS_PORT"
            print(f"simplesmtp: error: {where}: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        url = f"http://[{host}]:{port}/metrics" if ":" in host else \
            f"http://{host}:{port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as response:
            text = response.read().decode("utf-8")
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
        # HTTPException: something answered that is not an HTTP server.
        print(f"simplesmtp: error: cannot read {url}: {exc!r}", file=sys.stderr)
        return 1
    try:
        table = format_stats(text)
    except ValueError as exc:
        # It answered, but not in the Prometheus text format (a wrong URL).
        print(f"simplesmtp: error: {url} is not a /metrics page: {exc}", file=sys.stderr)
        return 1
    print(table)
    return 0


def gencert_command(args: argparse.Namespace) -> int:
    """``simplesmtp gencert``: a development key and certificate."""
    import socket

    from .tls import DEFAULT_DAYS, generate_self_signed

    hostname = args.hostname or socket.gethostname() or "localhost"
    try:
        key, cert = generate_self_signed(
            args.out_dir, hostname=hostname,
            days=DEFAULT_DAYS if args.days is None else args.days,
            key_type=args.key_type, overwrite=args.force)
    except ValueError as exc:
        print(f"simplesmtp: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        detail = f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else exc
        print(f"simplesmtp: error: {detail}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"wrote {key} and {cert} for {hostname}, localhost, 127.0.0.1, ::1;"
          f" use: simplesmtp serve --tls-cert {cert} --tls-key {key}")
    return 0


def _read_password(args: argparse.Namespace, *, confirm: bool = True) -> str:
    """From stdin (one line) or asked (twice) on the terminal; never echoed."""
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        import getpass
        password = getpass.getpass("Password: ")
        if confirm and getpass.getpass("Password again: ") != password:
            raise ValueError("the passwords do not match")
    if not password:
        raise ValueError("the password must not be empty")
    return password


def user_command(args: argparse.Namespace, environ: Any = None) -> int:
    """``simplesmtp user add|passwd|remove|list|check``.

    Exit codes: 0 done, 1 the account or password is wrong (check) or the
    change was refused, 2 usage or configuration error.
    """
    from .config import setting_value
    from .users import UserStore, UserStoreError

    environ = os.environ if environ is None else environ
    env_file = args.env_file or environ.get("SIMPLESMTP_ENV_FILE") or ".env"
    try:
        path = setting_value("users_file", args.users_file, environ, env_file)
    except ConfigError as exc:
        print(f"simplesmtp: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if not path:
        print("simplesmtp: error: no users file: use --users-file or"
              " SIMPLESMTP_USERS_FILE", file=sys.stderr)
        return EXIT_CONFIG
    if args.action != "list" and not args.name:
        print(f"simplesmtp: error: 'user {args.action}' needs an account name",
              file=sys.stderr)
        return EXIT_CONFIG
    try:
        store = UserStore(path)
        if args.action == "list":
            for account in store.accounts():
                print(account.name)
            return 0
        if args.action == "remove":
            store.remove(args.name)
            print(f"removed {args.name}")
            return 0
        if args.action == "check":
            if store.get(args.name) is None:
                print(f"no account {args.name}", file=sys.stderr)
                return 1
            ok = store.verify_password(args.name, _read_password(args, confirm=False)) is not None
            print("password ok" if ok else "wrong password")
            return 0 if ok else 1
        password = _read_password(args)
        if args.action == "add":
            store.add(args.name, password)
            print(f"added {args.name}")
        else:
            store.set_password(args.name, password)
            print(f"changed the password of {args.name}")
        return 0
    except (UserStoreError, ValueError) as exc:
        print(f"simplesmtp: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"simplesmtp: error: {path}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_CONFIG


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )


def resolve_config(args: argparse.Namespace, environ: Any = None) -> Any:
    environ = os.environ if environ is None else environ
    flags = {s.name: getattr(args, s.name, None) for s in SETTINGS}
    env_file = args.env_file or environ.get("SIMPLESMTP_ENV_FILE")
    required = env_file is not None
    return load(flags, environ, env_file or ".env", env_file_required=required)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_CONFIG
    # Log early so that warnings about old .env keys are seen.
    setup_logging((getattr(args, "log_level", None) or os.environ.get(
        "SIMPLESMTP_LOG_LEVEL") or "INFO").upper())
    if args.command == "gencert":
        return gencert_command(args)
    if args.command == "stats":
        return stats_command(args)
    if args.command == "user":
        return user_command(args)
    if args.command == "serve":
        try:
            config = resolve_config(args)
        except ConfigError as exc:
            print(f"simplesmtp: error: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        logging.getLogger().setLevel(config.log_level)
        from .server import run
        try:
            if config.workers > 1:
                from .workers import run_workers
                return run_workers(config, run)
            run(config)
        except ConfigError as exc:
            # A certificate changed between the check and the start.
            print(f"simplesmtp: error: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        except OSError as exc:
            # Typically a port is taken or not ours to bind.  There may be
            # several listeners (--tls-port, --submission-port, metrics):
            # asyncio's message names the address that failed, so do not
            # put --port in front of it.
            detail = exc.strerror or str(exc)
            where = "" if "bind on address" in detail else f" on {config.host}:{config.port}"
            print(f"simplesmtp: error: cannot listen{where}: {detail}", file=sys.stderr)
            return EXIT_CONFIG
        return 0
    parser.print_help()
    return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
