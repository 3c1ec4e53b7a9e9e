"""aiosmtpd peers for the benchmark: a discarding handler and a Maildir one.

Run as ``python bench/peers.py --mode discard|maildir --port N [--dir D]``.
It prints ``listening port=N`` on stdout when ready and runs until SIGTERM.

The Maildir handler does what a careful aiosmtpd user would write: the
message goes to ``tmp/``, is fsync'ed, linked into ``new/``, ``new/`` is
fsync'ed, and only then is 250 returned.  The blocking part runs in the
default thread pool (``asyncio.to_thread``) so the event loop keeps serving
other sessions, which is the fair comparison with simplesmtp's design.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
import socket
import sys
import time

from aiosmtpd.smtp import SMTP

_counter = itertools.count()


class DiscardHandler:
    async def handle_DATA(self, server, session, envelope):  # noqa: ANN001, ANN201
        return "250 2.0.0 Ok: discarded"


class MaildirHandler:
    def __init__(self, root: str) -> None:
        self.root = root
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(root, sub), exist_ok=True)
        self.host = socket.gethostname()

    def _deliver(self, data: bytes) -> str:
        name = f"{time.time():.6f}.P{os.getpid()}Q{next(_counter)}.{self.host}"
        tmp = os.path.join(self.root, "tmp", name)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, os.path.join(self.root, "new", name))
        dfd = os.open(os.path.join(self.root, "new"), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        os.unlink(tmp)
        return name

    async def handle_DATA(self, server, session, envelope):  # noqa: ANN001, ANN201
        content = envelope.original_content or envelope.content
        await asyncio.to_thread(self._deliver, content)
        return "250 2.0.0 Ok: queued"


async def serve(mode: str, port: int, root: str | None) -> None:
    handler = DiscardHandler() if mode == "discard" else MaildirHandler(root or "./maildir")
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(handler, hostname="aiosmtpd.bench"),
                                      "127.0.0.1", port, backlog=1024)
    bound = server.sockets[0].getsockname()[1]
    print(f"listening port={bound}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=("discard", "maildir"), required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--dir", default=None)
    args = p.parse_args()
    asyncio.run(serve(args.mode, args.port, args.dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
