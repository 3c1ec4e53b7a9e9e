"""The asyncio transport: sockets, timers, storage calls and logs.

Each connection gets a ``Session`` (an ``asyncio.Protocol``) that feeds the
bytes it reads into a sans-I/O ``SMTPEngine`` and carries out the events the
engine returns: write a reply, open/fill/commit/abort a message, upgrade to
TLS, close.  Replies produced by one read are written with one call, which
is what pipelining clients expect (RFC 2920 §3.2).

While the engine waits for the transport (a commit or a flush in a worker
thread, a TLS handshake), the session stops reading from the socket: unread
input per session is bounded by one read, whatever the client sends.

Blocking disk work (writes past the spill threshold, fsync, link) runs in a
thread pool; concurrent fsyncs from many sessions are merged by the file
system's journal into shared commits (group commit), which is where the
throughput with many sessions comes from.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from . import replies as R
from .config import Config
from .engine import (NEED_DATA, Close, EngineConfig, MessageAbort, MessageBegin,
                     MessageComplete, MessageData, Send, SMTPEngine, StartTLS,
                     Transaction)
from .storage import Envelope, MessageWriter, Storage, create_storage, is_storage_full
from .trace import new_queue_id, protocol_name, trace_headers

log = logging.getLogger("simplesmtp.session")
server_log = logging.getLogger("simplesmtp.server")

_session_ids = itertools.count(1)


def _clean(text: object, limit: int = 200) -> str:
    """Peer-controlled text made safe for one log line."""
    s = str(text)
    if len(s) > limit:
        s = s[:limit] + "..."
    if s.isprintable() and " " not in s and '"' not in s:
        return s
    return '"' + s.encode("unicode_escape").decode("ascii").replace('"', '\\"') + '"'


class Session(asyncio.Protocol):
    """One SMTP connection."""

    def __init__(self, server: Server, *, implicit_tls: bool = False) -> None:
        self.server = server
        self.config = server.config
        self.engine = SMTPEngine(server.engine_config, tls=implicit_tls)
        self.id = f"{next(_session_ids):06d}"
        self.transport: asyncio.Transport | None = None
        self.peer_ip = "?"
        self.peer = "?"
        self.started = time.monotonic()
        self.last_active = self.started
        self.writer: MessageWriter | None = None
        self.queue_id: str | None = None
        self.write_error: BaseException | None = None
        self.busy: asyncio.Future[Any] | None = None  # flush/commit in a thread
        self.blocked = False  # waiting for the transport; engine not pumped
        self.closing = False
        self.commands = 0
        self.rejected = 0
        self._timer: asyncio.TimerHandle | None = None
        self._paused_writing = False
        self._read_paused = False
        self._out: list[bytes] = []  # replies not yet handed to the transport

    # --- asyncio.Protocol -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer_ip, port = str(peer[0]), peer[1]
            self.peer = f"[{self.peer_ip}]:{port}" if ":" in self.peer_ip else f"{self.peer_ip}:{port}"
        self.server.sessions.add(self)
        log.info("event=connect session=%s peer=%s", self.id, self.peer)
        if self.server.stopping:
            self._send_and_close(R.SHUTTING_DOWN, "shutting down")
            return
        transport.write(self.engine.greeting().data)
        self._arm_timer()

    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        self.engine.receive(data)
        if not self.blocked:
            self._pump()

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for event in self.engine.connection_lost():
            if isinstance(event, MessageAbort):
                self._abort_message(event.reason)
        self.server.sessions.discard(self)
        duration = time.monotonic() - self.started
        log.info("event=disconnect session=%s peer=%s duration=%.3f messages=%d"
                 " commands=%d rejected=%d%s", self.id, self.peer, duration,
                 self.engine.messages, self.commands, self.rejected,
                 f" error={_clean(exc)}" if exc else "")
        self.server.session_closed(self)

    def pause_writing(self) -> None:
        # The client does not read its replies: stop reading its commands.
        self._paused_writing = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._paused_writing = False
        self._update_reading()

    # --- Driving the engine ----------------------------------------------

    def _update_reading(self) -> None:
        want_pause = self.blocked or self._paused_writing
        if self.transport is None or self.transport.is_closing():
            return
        if want_pause and not self._read_paused:
            self.transport.pause_reading()
            self._read_paused = True
        elif not want_pause and self._read_paused:
            self.transport.resume_reading()
            self._read_paused = False

    def _block(self) -> None:
        self.blocked = True
        self._update_reading()

    def _unblock(self) -> None:
        self.blocked = False
        self._update_reading()
        self._pump()

    def _pump(self) -> None:
        """Carry out engine events until it needs input or we must wait."""
        engine = self.engine
        out = self._out
        try:
            while not self.blocked:
                event = engine.next_event()
                if event is NEED_DATA:
                    break
                if isinstance(event, Send):
                    out.append(event.data)
                    self._account(event)
                elif isinstance(event, MessageData):
                    self._write_message(event.data)
                elif isinstance(event, MessageBegin):
                    self._begin_message(event.transaction)
                elif isinstance(event, MessageComplete):
                    self._complete_message(event.transaction)
                elif isinstance(event, MessageAbort):
                    self._abort_message(event.reason)
                elif isinstance(event, StartTLS):
                    self._flush_out()
                    self._start_tls()
                elif isinstance(event, Close):
                    self._flush_out()
                    self._close()
                    return
        except Exception:
            # Our bug, not the peer's: log it whole, tell the client little.
            log.exception("event=internal_error session=%s peer=%s", self.id, self.peer)
            self._send_and_close(R.INTERNAL_ERROR, "internal error")
            return
        self._flush_out()
        if self.server.stopping and self.engine.transaction is None and not self.closing:
            self._send_and_close(R.SHUTTING_DOWN, "shutting down")

    def _flush_out(self) -> None:
        out = self._out
        if out:
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def _account(self, event: Send) -> None:
        if not event.verb:
            if event.reply.is_error:
                self.rejected += 1
                log.info("event=reject session=%s code=%d reply=%s", self.id,
                         event.reply.code, _clean(event.reply.text))
            return
        self.commands += 1
        if event.reply.is_error:
            self.rejected += 1
            log.info("event=reject session=%s verb=%s code=%d reply=%s", self.id,
                     event.verb, event.reply.code, _clean(event.reply.text))

    # --- Message content ---------------------------------------------------

    def _begin_message(self, txn: Transaction) -> None:
        qid = new_queue_id()
        self.queue_id = qid
        self.write_error = None
        engine = self.engine
        envelope = Envelope(qid, txn.mail_from, tuple(txn.recipients))
        self.writer = self.server.storage.open(envelope)
        header = trace_headers(
            mail_from=txn.mail_from, recipients=txn.recipients, helo=engine.helo,
            peer_ip=self.peer_ip, hostname=self.config.hostname,
            protocol=protocol_name(esmtp=engine.esmtp, tls=engine.tls, auth=False,
                                   utf8=txn.smtputf8),
            queue_id=qid, tls_info=self.tls_info())
        self.writer.write(header)

    def tls_info(self) -> str | None:
        return None

    def _write_message(self, data: bytes) -> None:
        writer = self.writer
        if writer is None or self.write_error is not None:
            return
        writer.write(data)
        if writer.needs_flush:
            self._run_io(writer.flush, self._flushed)

    def _flushed(self, fut: asyncio.Future[Any]) -> None:
        exc = fut.exception()
        if exc is not None:
            self.write_error = exc
            log.error("event=storage_error session=%s queue_id=%s stage=write error=%s",
                      self.id, self.queue_id, _clean(exc))
        self._unblock()

    def _complete_message(self, txn: Transaction) -> None:
        writer = self.writer
        assert writer is not None
        if self.write_error is not None:
            self._finish_failed(self.write_error)
            return
        if self.server.storage.commit_inline:
            try:
                writer.commit()
            except OSError as exc:
                self._finish_failed(exc)
                return
            self._finish_ok(txn)
            return
        self._run_io(writer.commit, lambda fut: self._committed(fut, txn))

    def _committed(self, fut: asyncio.Future[Any], txn: Transaction) -> None:
        exc = fut.exception()
        if exc is not None:
            self._finish_failed(exc)
        else:
            self._finish_ok(txn)
        self._unblock()  # pumps: writes the reply, then pipelined commands

    def _finish_ok(self, txn: Transaction) -> None:
        qid = self.queue_id or "?"
        size = txn.size
        self.writer = None
        send = self.engine.delivered(qid)
        self.server.messages_accepted += 1
        log.info("event=accepted session=%s queue_id=%s from=%s rcpts=%d size=%d%s",
                 self.id, qid, _clean(f"<{txn.mail_from}>"), len(txn.recipients), size,
                 " bare_eol=normalised" if txn.bare_eol else "")
        self._write_now(send)

    def _finish_failed(self, exc: BaseException) -> None:
        writer, self.writer = self.writer, None
        if writer is not None:
            self._run_abort(writer)
        full = is_storage_full(exc)
        reply = R.STORAGE_FULL if full else R.STORAGE_FAILED
        if isinstance(exc, OSError):
            log.error("event=storage_error session=%s queue_id=%s stage=commit error=%s",
                      self.id, self.queue_id, _clean(exc))
        else:
            log.error("event=storage_error session=%s queue_id=%s stage=commit",
                      self.id, self.queue_id, exc_info=exc)
        self._write_now(self.engine.delivery_failed(reply))

    def _write_now(self, send: Send) -> None:
        """Queue a reply produced outside the engine loop (after storage)."""
        self._account(send)
        self._out.append(send.data)

    def _abort_message(self, reason: str) -> None:
        writer, self.writer = self.writer, None
        if writer is not None:
            log.info("event=message_aborted session=%s queue_id=%s reason=%s",
                     self.id, self.queue_id, reason)
            self._run_abort(writer)

    def _run_abort(self, writer: MessageWriter) -> None:
        busy = self.busy
        if busy is not None and not busy.done():
            # A flush of this writer is running in a thread: abort after it.
            busy.add_done_callback(lambda _f: writer.abort())
        else:
            writer.abort()

    def _run_io(self, func: Any, done: Any) -> None:
        self._block()
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self.server.executor, func)
        self.busy = fut
        fut.add_done_callback(done)

    # --- TLS, timeouts, closing -------------------------------------------

    def _start_tls(self) -> None:
        # Implemented by the TLS layer; without a certificate the engine
        # never emits StartTLS.
        self._send_and_close(R.INTERNAL_ERROR, "TLS not configured")

    def _arm_timer(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.config.timeout, self._check_timeout)

    def _check_timeout(self) -> None:
        """Fires ``timeout`` after the last activity seen when it was armed."""
        if self.closing:
            return
        idle = time.monotonic() - self.last_active
        if self.blocked and self.busy is not None and not self.busy.done():
            idle = 0.0  # we are the slow one (storage), not the client
        if idle >= self.config.timeout:
            log.info("event=timeout session=%s peer=%s idle=%.1f", self.id, self.peer, idle)
            self._close_engine(R.TIMEOUT, "timeout")
            return
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.config.timeout - idle, self._check_timeout)

    def _close_engine(self, reply: R.Reply | None, reason: str) -> None:
        self._flush_out()
        for event in self.engine.close(reply, reason):
            if isinstance(event, MessageAbort):
                self._abort_message(event.reason)
            elif isinstance(event, Send):
                if self.transport is not None and not self.transport.is_closing():
                    self.transport.write(event.data)
        self._close()

    def _send_and_close(self, reply: R.Reply, reason: str) -> None:
        if self.closing:
            return
        self._close_engine(reply, reason)

    def _close(self) -> None:
        self.closing = True
        if self._timer is not None:
            self._timer.cancel()
        if self.transport is not None:
            self.transport.close()

    def shutdown(self) -> None:
        """Server is stopping: close now unless a transaction is running."""
        if self.closing:
            return
        if self.engine.transaction is None and not self.blocked:
            self._send_and_close(R.SHUTTING_DOWN, "shutting down")

    def force_close(self) -> None:
        if not self.closing:
            self._send_and_close(R.SHUTTING_DOWN, "shutting down")


class Server:
    """Listeners, storage and the set of sessions."""

    def __init__(self, config: Config, storage: Storage | None = None) -> None:
        self.config = config
        self.engine_config = EngineConfig(
            hostname=config.hostname,
            max_message_size=config.max_message_size,
            max_recipients=config.max_recipients,
            max_line_length=config.max_line_length,
        )
        self.storage = storage or create_storage(
            config.storage, mail_dir=config.mail_dir, hostname=config.hostname)
        # fsync-bound work: enough threads for the journal to merge commits.
        self.executor = ThreadPoolExecutor(max_workers=32, thread_name_prefix="storage")
        self.sessions: set[Session] = set()
        self.servers: list[asyncio.AbstractServer] = []
        self.stopping = False
        self.messages_accepted = 0
        self._idle = asyncio.Event()

    async def start(self) -> list[tuple[str, int]]:
        """Listen; return the bound (host, port) pairs."""
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(lambda: Session(self), self.config.host,
                                       self.config.port, reuse_address=True, backlog=1024)
        self.servers.append(srv)
        addrs = [s.getsockname()[:2] for s in srv.sockets]
        for host, port in addrs:
            server_log.info("event=listening host=%s port=%d hostname=%s storage=%s",
                            host, port, self.config.hostname, self.storage.name)
        return addrs

    def session_closed(self, session: Session) -> None:
        if self.stopping and not self.sessions:
            self._idle.set()

    async def stop(self) -> None:
        """Stop accepting, let transactions finish (grace), then close all."""
        if self.stopping:
            return
        self.stopping = True
        server_log.info("event=stopping sessions=%d grace=%.1f", len(self.sessions),
                        self.config.shutdown_grace)
        for srv in self.servers:
            srv.close()
        for session in list(self.sessions):
            session.shutdown()
        if self.sessions:
            try:
                await asyncio.wait_for(self._idle.wait(), self.config.shutdown_grace)
            except asyncio.TimeoutError:
                pass
        for session in list(self.sessions):
            if session.busy is None or session.busy.done():
                session.force_close()
        # Commits already running finish (their messages are durable; the
        # client may not hear the 250 and will retry, never lose it).
        await asyncio.get_running_loop().run_in_executor(None, self.executor.shutdown, True)
        for srv in self.servers:
            await srv.wait_closed()
        self.storage.close()
        server_log.info("event=stopped messages=%d", self.messages_accepted)


async def serve(config: Config) -> None:
    """Run until SIGTERM or SIGINT."""
    server = Server(config)
    clean = getattr(server.storage, "clean_tmp", None)
    if clean is not None:
        removed = await asyncio.get_running_loop().run_in_executor(None, clean)
        if removed:
            server_log.info("event=tmp_cleaned files=%d", removed)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()


def run(config: Config) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(config))
    else:
        server_log.debug("event=uvloop")
        uvloop.run(serve(config))


__all__ = ["Server", "Session", "serve", "run"]
