"""A tiny HTTP endpoint for ``/metrics`` and ``/healthz``.

It runs on the SMTP server's event loop (no thread per request): one
connection, one ``GET``, one response, then close (HTTP/1.0 style, which
is all a Prometheus scraper or a health probe needs).  Requests are bounded
in size and time, and anything but ``GET``/``HEAD`` of the two paths gets a
short error response.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

log = logging.getLogger("simplesmtp.httpd")

MAX_REQUEST_HEAD = 8192  # bytes of request line and headers we read
REQUEST_TIMEOUT = 10.0  # seconds a client has to send its request head

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found",
            405: "Method Not Allowed", 408: "Request Timeout"}


class MetricsHTTPServer:
    """Serves ``render()`` at ``/metrics`` and ``health()`` at ``/healthz``."""

    def __init__(self, render: Callable[[], tuple[bytes, str]],
                 health: Callable[[], bool]) -> None:
        self._render = render
        self._health = health
        self._server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int) -> list[tuple[str, int]]:
        self._server = await asyncio.start_server(self._handle, host, port,
                                                  reuse_address=True,
                                                  limit=MAX_REQUEST_HEAD)
        addrs = [s.getsockname()[:2] for s in self._server.sockets]
        for h, p in addrs:
            log.info("event=metrics_listening host=%s port=%d", h, p)
        return addrs

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(
                    reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            except TimeoutError:
                await self._respond(writer, 408, b"timeout\n", "text/plain")
                return
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                await self._respond(writer, 400, b"bad request\n", "text/plain")
                return
            if len(head) > MAX_REQUEST_HEAD:
                await self._respond(writer, 400, b"bad request\n", "text/plain")
                return
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = line.split()
            if len(parts) != 3:
                await self._respond(writer, 400, b"bad request\n", "text/plain")
                return
            method, target = parts[0], parts[1]
            path = target.split("?", 1)[0]
            if method not in ("GET", "HEAD"):
                await self._respond(writer, 405, b"method not allowed\n", "text/plain")
                return
            head_only = method == "HEAD"
            if path == "/metrics":
                body, ctype = self._render()
                await self._respond(writer, 200, body, ctype, head_only)
            elif path == "/healthz":
                ok = self._health()
                await self._respond(writer, 200 if ok else 503,
                                    b"ok\n" if ok else b"stopping\n", "text/plain",
                                    head_only)
            else:
                await self._respond(writer, 404, b"not found\n", "text/plain", head_only)
        except (ConnectionError, OSError):
            pass  # the scraper went away
        except Exception:
            log.exception("event=internal_error area=metrics_http")
        finally:
            writer.close()

    async def _respond(self, writer: asyncio.StreamWriter, status: int, body: bytes,
                       ctype: str, head_only: bool = False) -> None:
        reason = _REASONS.get(status, "Service Unavailable" if status == 503 else "Error")
        header = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                  f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
        writer.write(header.encode("latin-1") + (b"" if head_only else body))
        await writer.drain()
