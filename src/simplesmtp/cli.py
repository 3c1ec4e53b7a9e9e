"""Command line: ``simplesmtp serve`` and friends.

The CLI is the only place that exits the process; library code raises.
A configuration error prints one line naming the setting and exits 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Sequence

from . import __version__
from .config import SETTINGS, ConfigError, load

EXIT_CONFIG = 2


def _default_text(setting: Any) -> str:
    if callable(setting.default):
        return "this machine's name"
    if setting.is_flag:
        return "off"
    return str(setting.default)


def _add_settings(parser: argparse.ArgumentParser) -> None:
    for s in SETTINGS:
        help_text = f"{s.help} [default: {_default_text(s)}; env {s.env}]"
        if s.is_flag:
            parser.add_argument(s.flag, dest=s.name, action="store_const", const="true",
                                default=None, help=help_text)
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
    return parser


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
    if args.command == "serve":
        try:
            config = resolve_config(args)
        except ConfigError as exc:
            print(f"simplesmtp: error: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        logging.getLogger().setLevel(config.log_level)
        from .server import run
        try:
            run(config)
        except OSError as exc:
            # Typically the port is taken or not ours to bind.
            print(f"simplesmtp: error: cannot listen on {config.host}:{config.port}:"
                  f" {exc.strerror or exc}", file=sys.stderr)
            return EXIT_CONFIG
        return 0
    parser.print_help()
    return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
