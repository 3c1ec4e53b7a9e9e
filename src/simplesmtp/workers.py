"""``--workers N``: N server processes that share the listening ports.

Each worker is a whole server (its own event loop, sessions and storage
threads) forked from this supervisor before any event loop exists.  They
listen on the same ports with ``SO_REUSEPORT``, so the kernel spreads new
connections over them and a machine's cores are all used.  Maildir file
names carry the worker's pid, so workers never collide.

Port 0 is resolved once, here: the supervisor binds a socket (with
``SO_REUSEPORT``, never listening) to learn the port, and every worker binds
that same port.  The supervisor keeps that socket until the end, so the
port cannot go to anyone else in between.

Signals sent to the supervisor (TERM, INT, HUP) are passed to every worker;
if a worker dies on its own, the others are stopped and the exit code says
so.  Per-process state stays per process: each worker has its own
``/metrics`` (``--metrics-port`` P gives worker i the port P+i) and its own
AUTH failure counters.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from collections.abc import Callable

from .config import Config

log = logging.getLogger("simplesmtp.workers")

_PORT_SETTINGS = ("port", "tls_port", "submission_port")
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _reserve(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def run_workers(config: Config, run: Callable[[Config], None]) -> int:
    """Fork ``config.workers`` processes running ``run``; wait for them all.

    Returns 0 when every worker exited cleanly, 1 otherwise.  Raises
    ``OSError`` when a port cannot be bound (before anything is forked).
    """
    reserved: list[socket.socket] = []
    changes: dict[str, int] = {}
    try:
        for name in _PORT_SETTINGS:
            value = getattr(config, name, None)
            if value is None:
                continue
            sock = _reserve(config.host, int(value))
            reserved.append(sock)
            changes[name] = int(sock.getsockname()[1])
    except OSError:
        for sock in reserved:
            sock.close()
        raise
    children: dict[int, int] = {}  # pid -> worker index
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        if signum != signal.SIGHUP:
            stopping = True
        for pid in children:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    previous = {sig: signal.signal(sig, forward) for sig in _FORWARDED}
    try:
        for index in range(config.workers):
            worker_config = config.replace(**changes)
            if config.metrics_port:
                worker_config = worker_config.replace(metrics_port=config.metrics_port + index)
            pid = os.fork()
            if pid == 0:  # the worker
                code = 1
                try:
                    for sig, handler in previous.items():
                        signal.signal(sig, handler)
                    for sock in reserved:
                        sock.close()
                    # One log, one Maildir: ids must not repeat across workers.
                    from .server import number_sessions
                    from .trace import set_worker
                    number_sessions(index + 1, config.workers)
                    set_worker(index, config.workers)
                    log.info("event=worker_started worker=%d pid=%d", index, os.getpid())
                    run(worker_config)
                    code = 0
                except BaseException:
                    log.exception("event=worker_failed worker=%d", index)
                finally:
                    logging.shutdown()
                    os._exit(code)
            children[pid] = index
        failed = False
        while children:
            pid, status = os.waitpid(-1, 0)
            index = children.pop(pid, -1)
            code = os.waitstatus_to_exitcode(status)
            if code != 0:
                failed = True
            if not stopping:
                # A worker ended without being asked: stop the others.
                log.error("event=worker_exited worker=%d pid=%d code=%d", index, pid, code)
                failed = True
                forward(signal.SIGTERM, None)
        return 1 if failed else 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sock in reserved:
            sock.close()
