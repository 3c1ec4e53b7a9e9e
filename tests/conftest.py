"""Shared fixtures: configurations, real servers on port 0, Maildir readers.

Fixtures (see each docstring):

* ``config_factory``  - ``config_factory(**overrides) -> Config`` in ``tmp_path``
  (the plain function ``make_config(tmp_path, **overrides)`` does the same).
* ``server_factory``  - start ``Server(config)`` in-process in a background
  thread with its own event loop; returns a ``RunningServer``.
* ``smtp_server``     - one such server with the test defaults.
* ``spawn_server``    - run ``python -m simplesmtp serve --port 0 ...`` as a
  subprocess and wait for its ``event=listening ... port=N`` log line.
* ``run_cli``         - run ``python -m simplesmtp ...`` to completion.

Module-level helpers for Maildir contents: ``mailbox_dir``, ``delivered``,
``all_delivered``, ``tmp_files``, ``read_message``, ``split_trace``.

Every wait here is bounded; servers are stopped at teardown even when the
test failed.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from simplesmtp.config import Config
from simplesmtp.server import Server

TEST_HOSTNAME = "mx.test.example"

# --- configuration --------------------------------------------------------


def make_config(tmp_path: Path, **overrides: Any) -> Config:
    """A ``Config`` for tests: port 0 on 127.0.0.1, mail dir ``tmp_path/mail``,
    hostname ``mx.test.example``, a short shutdown grace; ``overrides`` are
    ``Config`` field names (e.g. ``timeout=0.3, max_message_size=4096``)."""
    values: dict[str, Any] = dict(
        host="127.0.0.1",
        port=0,
        hostname=TEST_HOSTNAME,
        mail_dir=str(tmp_path / "mail"),
        timeout=30.0,
        shutdown_grace=2.0,
    )
    values.update(overrides)
    return Config().replace(**values)


@pytest.fixture
def config_factory(tmp_path: Path) -> Callable[..., Config]:
    """``config_factory(**overrides) -> Config``: ``make_config`` bound to
    this test's ``tmp_path``."""
    return lambda **overrides: make_config(tmp_path, **overrides)


# --- in-process server ------------------------------------------------------


def new_event_loop(kind: str = "default") -> asyncio.AbstractEventLoop:
    """uvloop's loop when installed (as in production), else asyncio's;
    ``kind="asyncio"`` forces asyncio's own loop."""
    if kind == "asyncio":
        return asyncio.new_event_loop()
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class RunningServer:
    """A ``Server`` listening on 127.0.0.1, run by an event loop in a thread.

    Attributes: ``host``, ``port``, ``mail_dir`` (a ``Path``), ``config``,
    ``server`` (the ``Server``), ``loop``.  ``call(fn, *args)`` runs ``fn``
    on the loop thread and returns its result (to inspect sessions safely);
    ``stop()`` runs ``Server.stop()`` (grace period included) and ends the
    thread; it is idempotent.
    """

    def __init__(self, config: Config, storage: Any = None,
                 event_loop: str = "default") -> None:
        self.config = config
        self.host = config.host
        self.port = 0
        self.mail_dir = Path(config.mail_dir)
        self._storage = storage
        self.server: Server | None = None
        self.loop = new_event_loop(event_loop)
        self._thread = threading.Thread(target=self._run, name="smtp-server", daemon=True)
        self._stopped = False

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    async def _start(self) -> None:
        self.server = Server(self.config, self._storage)
        addrs = await self.server.start()
        self.host, self.port = addrs[0][0], addrs[0][1]

    def start(self, timeout: float = 10.0) -> RunningServer:
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout)
        except BaseException:
            self._end_loop(timeout)
            raise
        return self

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 5.0) -> Any:
        async def run() -> Any:
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    @property
    def session_count(self) -> int:
        assert self.server is not None
        return int(self.call(lambda: len(self.server.sessions)))

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait (bounded) until no session is open; True if reached."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.session_count == 0:
                return True
            time.sleep(0.01)
        return False

    def stop(self, timeout: float = 15.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        try:
            if self.server is not None:
                asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(timeout)
        finally:
            self._end_loop(timeout)

    def _end_loop(self, timeout: float) -> None:
        async def drain() -> None:
            await self.loop.shutdown_default_executor()
        try:
            asyncio.run_coroutine_threadsafe(drain(), self.loop).result(timeout)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)
            if not self._thread.is_alive():
                self.loop.close()


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., RunningServer]]:
    """``server_factory(storage=None, **config_overrides) -> RunningServer``.

    Starts ``Server(make_config(tmp_path, **overrides))`` on port 0 in a
    background thread (uvloop if installed; ``event_loop="asyncio"`` for
    asyncio's own loop); every server started is stopped at teardown.  Pass
    ``config=`` to use a ready ``Config`` instead, ``storage=`` for a storage
    back end object of your own.
    """
    started: list[RunningServer] = []

    def start(storage: Any = None, config: Config | None = None,
              event_loop: str = "default", **overrides: Any) -> RunningServer:
        cfg = config if config is not None else make_config(tmp_path, **overrides)
        srv = RunningServer(cfg, storage, event_loop).start()
        started.append(srv)
        return srv

    yield start
    for srv in reversed(started):
        srv.stop()


@pytest.fixture
def smtp_server(server_factory: Callable[..., RunningServer]) -> RunningServer:
    """A running in-process server with the test defaults (``make_config``)."""
    return server_factory()


# --- subprocess server ----------------------------------------------------

_LISTENING = re.compile(r"event=listening host=(?P<host>\S+) port=(?P<port>\d+)")


class ServerProcess:
    """``python -m simplesmtp serve ...`` running as a child process.

    A reader thread collects stderr lines into ``lines``; ``wait_for(regex)``
    waits (bounded) for a matching line.  ``port``/``host`` come from the
    ``event=listening`` line.  ``signal(sig)``, ``wait(timeout)`` (the exit
    code) and ``stop()`` (SIGTERM, then SIGKILL if it does not exit) control
    it; ``stderr`` is everything read so far.
    """

    def __init__(self, args: list[str], *, cwd: Path, env: dict[str, str]) -> None:
        self.args = args
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "simplesmtp", *args], cwd=cwd, env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines: list[str] = []
        self.host = "127.0.0.1"
        self.port = 0
        self._cond = threading.Condition()
        self._eof = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._out_reader = threading.Thread(target=self._drain_stdout, daemon=True)
        self._out_reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            with self._cond:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def _drain_stdout(self) -> None:
        assert self.proc.stdout is not None
        for _ in self.proc.stdout:
            pass

    @property
    def stderr(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 10.0, start: int = 0) -> re.Match[str]:
        """The first stderr line (from index ``start``) matching ``pattern``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = start
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    m = regex.search(line)
                    if m:
                        return m
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    raise AssertionError(
                        f"no log line matching {pattern!r} within {timeout}s"
                        f" (exit={self.proc.poll()}); stderr:\n" + "\n".join(self.lines))
                self._cond.wait(left)

    def wait_listening(self, timeout: float = 10.0) -> None:
        m = self.wait_for(_LISTENING.pattern, timeout)
        self.host, self.port = m.group("host"), int(m.group("port"))

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 10.0) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(timeout)
        return rc

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(5)


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The test process's environment without any ``SIMPLESMTP_*`` setting
    (nor the old simpleSMTP names), plus ``extra``."""
    legacy = {"PORT", "TIMEOUT", "CERTIFICATE", "KEY", "MAIL_DIRECTORY", "MAX_MAIL_SIZE",
              "MAX_RECIPIENTS", "MAX_LENGTH_LINE", "MEASURE_PERFORMANCE"}
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SIMPLESMTP_") or k == "SIMPLESMTP_CORPUS"}
    for k in legacy:
        env.pop(k, None)
    env["PYTHONUNBUFFERED"] = "1"
    env["COLUMNS"] = "200"  # argparse help on long lines, for matching
    env.update(extra or {})
    return env


@pytest.fixture
def spawn_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """``spawn_server(*args, env=None, cwd=tmp_path, wait=True) -> ServerProcess``.

    Runs ``python -m simplesmtp serve --host 127.0.0.1 --port 0
    --hostname mx.test.example --mail-dir <tmp_path>/mail <args>`` (later
    flags win, so ``args`` can override these) in ``cwd`` with
    ``clean_env(env)``; with ``wait`` it waits up to 10 s for the
    ``event=listening`` line and sets ``.port``.  Pass ``base=False`` to give
    all arguments yourself (after ``serve``).  Stopped at teardown.
    """
    procs: list[ServerProcess] = []

    def spawn(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
              wait: bool = True, base: bool = True) -> ServerProcess:
        argv = ["serve"]
        if base:
            argv += ["--host", "127.0.0.1", "--port", "0", "--hostname", TEST_HOSTNAME,
                     "--mail-dir", str(tmp_path / "mail")]
        argv += list(args)
        proc = ServerProcess(argv, cwd=cwd or tmp_path, env=clean_env(env))
        procs.append(proc)
        if wait:
            proc.wait_listening()
        return proc

    yield spawn
    for proc in procs:
        proc.stop()


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str
    stderr_lines: list[str] = field(default_factory=list)


@pytest.fixture
def run_cli(tmp_path: Path) -> Callable[..., CliResult]:
    """``run_cli(*args, env=None, cwd=tmp_path, timeout=10) -> CliResult``:
    run ``python -m simplesmtp <args>`` to completion (bounded), with
    ``clean_env(env)``.  Use it for exit codes and ``--help``; a command
    that would serve is killed at the timeout and fails the test."""

    def run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 10.0) -> CliResult:
        p = subprocess.run([sys.executable, "-m", "simplesmtp", *args], cwd=cwd or tmp_path,
                           env=clean_env(env), capture_output=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
        err = p.stderr.decode("utf-8", "replace")
        return CliResult(p.returncode, p.stdout.decode("utf-8", "replace"), err,
                         [line for line in err.splitlines() if line.strip()])

    return run


# --- Maildir contents -------------------------------------------------------


def mailbox_dir(mail_dir: Path | str, address: str) -> Path:
    """Where a plain ASCII ``local@domain`` is delivered: the mail dir, the
    domain and the local part, both lower-cased (no encoding needed for
    letters, digits and ``-_.+=``)."""
    local, _, domain = address.rpartition("@")
    return Path(mail_dir) / domain.lower() / local.lower()


def delivered(mail_dir: Path | str, address: str) -> list[Path]:
    """Files in ``new/`` of ``address``'s mailbox, sorted by name."""
    new = mailbox_dir(mail_dir, address) / "new"
    if not new.is_dir():
        return []
    return sorted(p for p in new.iterdir() if p.is_file())


def _files_in(mail_dir: Path | str, sub: str) -> list[Path]:
    root = Path(mail_dir)
    out: list[Path] = []
    for dirpath, _dirs, files in os.walk(root):
        if os.path.basename(dirpath) == sub:
            out.extend(Path(dirpath) / f for f in files)
    return sorted(out)


def all_delivered(mail_dir: Path | str) -> list[Path]:
    """Every file in any ``new/`` under the mail dir."""
    return _files_in(mail_dir, "new")


def tmp_files(mail_dir: Path | str) -> list[Path]:
    """Every file in any ``tmp/`` under the mail dir."""
    return _files_in(mail_dir, "tmp")


def read_message(path: Path | str) -> bytes:
    return Path(path).read_bytes()


_HEADER_LINE = re.compile(rb"[^\r\n]*\r\n")


def split_trace(stored: bytes) -> tuple[dict[str, str], bytes]:
    """Split a stored message into its trace headers and the client's message.

    The stored form starts with ``Return-Path:`` and one ``Received:`` field
    (with folded continuation lines); returns ``({"return-path": ...,
    "received": ...}, rest)`` with unfolded values.  Fails if the trace
    headers are not there.
    """
    pos = 0
    fields: list[tuple[str, str]] = []
    for expected in (b"Return-Path:", b"Received:"):
        assert stored.startswith(expected, pos), \
            f"expected {expected!r} at {pos}: {stored[pos:pos + 80]!r}"
        m = _HEADER_LINE.match(stored, pos)
        assert m, "unterminated trace header"
        value = m.group()[len(expected):]
        pos = m.end()
        while stored[pos:pos + 1] in (b" ", b"\t"):  # folded continuation
            m = _HEADER_LINE.match(stored, pos)
            assert m
            value += m.group()
            pos = m.end()
        text = re.sub(r"\s+", " ", value.decode("utf-8")).strip()
        fields.append((expected[:-1].decode().lower(), text))
    return dict(fields), stored[pos:]
