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
import dataclasses
import gc
import itertools
import logging
import signal
import socket
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from time import perf_counter_ns
from typing import Any

from . import replies as R
from .committer import BatchCommitter
from .config import Config, ConfigError
from .engine import (
    NEED_DATA,
    VERBS,
    AuthCheck,
    AuthResult,
    Close,
    EngineConfig,
    MessageAbort,
    MessageBegin,
    MessageComplete,
    MessageData,
    Phase,
    Send,
    SMTPEngine,
    StartTLS,
    Transaction,
)
from .httpd import MetricsHTTPServer
from .metrics import DATA_END, NS_PER_SECOND, UNKNOWN, Metrics, SessionStats, format_report
from .policy import RecipientPolicy
from .ratelimit import AuthThrottle
from .storage import Envelope, MessageWriter, Storage, create_storage, is_storage_full
from .tls import ContextHolder, Pair, describe
from .trace import new_queue_id, protocol_name, trace_headers
from .users import UserStore, UserStoreError

log = logging.getLogger("simplesmtp.session")
server_log = logging.getLogger("simplesmtp.server")

_session_ids = itertools.count(1)


def number_sessions(first: int, step: int) -> None:
    """Session ids ``first, first + step, ...`` from now on.  With
    ``--workers N`` all workers log to one stderr, so worker i numbers from
    i + 1 in steps of N and an id names one session (workers.py)."""
    global _session_ids
    _session_ids = itertools.count(first, step)


# Replies one session may produce before yielding to the event loop: a
# pipelined burst (one read is up to 256 KiB, some 40 000 short commands)
# must not keep every other session waiting for its whole parse.
_PUMP_BATCH = 256

# Verbs whose reply is timed from the arrival of the command line with no
# more ado; DATA, BDAT, AUTH and replies to no command go to _reply_kind.
_TIMED_FROM_LINE = VERBS - {"DATA", "BDAT", "AUTH"}

# Offered in this order; clients pick the first they support.
AUTH_MECHANISMS = ("SCRAM-SHA-256", "PLAIN", "LOGIN")


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

    def __init__(self, server: Server, *, implicit_tls: bool = False,
                 submission: bool = False, preadmitted: bool = False) -> None:
        self.server = server
        self.config = server.config
        self.metrics = server.metrics
        self.submission = submission  # the RFC 6409 listener: MAIL needs AUTH
        self.engine = SMTPEngine(
            server.submission_engine_config if submission else server.engine_config,
            tls=implicit_tls, auth_gate=self._auth_gate)
        self._auth_delay: asyncio.TimerHandle | None = None  # failed-AUTH delay
        # This session holds one attempt of its address's AUTH budget (from
        # the first credentials check of an exchange to its outcome).
        self._auth_attempt = False
        self.implicit_tls = implicit_tls  # TLS from the first byte (RFC 8314)
        self.id = f"{next(_session_ids):06d}"
        self.transport: asyncio.Transport | None = None
        self.peer_ip = "?"
        self.peer = "?"
        self.started = time.monotonic()
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
        self._flush_queued = False  # in the server's queue of replies to write
        # Timeouts (docs/security.md).  A command line must be complete
        # ``timeout`` after our last reply, however it trickles in; message
        # content must keep arriving (``data_timeout``) at an average of
        # ``min_data_rate`` bytes per second from its start.  These clocks
        # are perf_counter_ns readings, the same ones that time the replies
        # (one clock read per read and one per write serves both).
        self._active_ns = self._turn_ns = perf_counter_ns()  # last input; last reply written
        self._content_ns: int | None = None  # DATA/BDAT phase began
        self._content_bytes = 0  # read since then
        self._phase_seen = Phase.COMMAND  # engine phase at the last _track_phase
        self._content_phases_seen = 0  # and its count of content phases
        # Counted against the connection limits.  The implicit-TLS accept
        # loop counts a connection before its handshake (preadmitted).
        self.admitted = preadmitted
        self._handshaking = False  # a TLS handshake owns the connection
        self._tls_task: asyncio.Task[None] | None = None
        self._tls_early: list[bytes] = []  # decrypted input before the upgrade returned
        self._tls_desc: str | None = None  # protocol and cipher, once encrypted
        self._lost = False  # connection_lost has run
        # Latency measurement (metrics.py): when the current input arrived,
        # and (kind, code, enhanced code, start) of each reply in ``_out``.
        self._t_recv = 0
        self._timed: list[tuple[str, int, str | None, int]] = []  # Metrics.record_batch
        self._content_txn: Transaction | None = None  # content being received
        self._t_content_end = 0  # when the end of content arrived
        self._t_auth: int | None = None  # when the AUTH being checked arrived
        self.perf = SessionStats() if self.config.measure_performance else None

    # --- asyncio.Protocol -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer_ip, port = str(peer[0]), peer[1]
            self.peer = f"[{self.peer_ip}]:{port}" if ":" in self.peer_ip else f"{self.peer_ip}:{port}"
        self.server.sessions.add(self)
        metrics = self.metrics
        metrics.sessions_open += 1
        metrics.sessions_total += 1
        log.info("event=connect session=%s peer=%s", self.id, self.peer)
        refusal = None if self.admitted else self.server.admit(self.peer_ip)
        if refusal is not None:
            log.warning("event=connection_refused session=%s peer=%s reason=%s",
                        self.id, self.peer, _clean(refusal.text))
            self.closing = True
            if self.transport is not None:
                # Before EHLO, but the enhanced code is plain text to any
                # client and tells the human reading a bounce why (as Postfix).
                self.transport.write(refusal.encode(True))
            transport.close()
            return
        self.admitted = True
        if self.implicit_tls:
            # RFC 8314 §3.3: the listener has done the handshake already.
            self._tls_up("implicit")
        if self.server.stopping:
            self._send_and_close(R.SHUTTING_DOWN, "shutting down")
            return
        self.transport.write(self.engine.greeting().data)  # type: ignore[union-attr]
        self._arm_timer()

    def data_received(self, data: bytes) -> None:
        self._t_recv = self._active_ns = perf_counter_ns()
        self.metrics.bytes_received += len(data)
        if self._handshaking:
            # Decrypted bytes the TLS layer delivers before start_tls has
            # returned to us: the client's first command after the upgrade.
            self._tls_early.append(data)
            return
        if self._content_ns is not None:
            self._content_bytes += len(data)
        self.engine.receive(data)
        if not self.blocked:
            self._pump()
        self._track_phase()

    def eof_received(self) -> bool | None:
        # A client that half-closes after its last command still reads the
        # replies: write what is queued before the transport closes.  (Over
        # TLS this is never called for a bare FIN; see README Limitations.)
        self._flush_out()
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        if self._timer is not None:
            self._timer.cancel()
        if self._auth_delay is not None:
            self._auth_delay.cancel()
        self._end_auth_attempt()
        for event in self.engine.connection_lost():
            if isinstance(event, MessageAbort):
                self._abort_message(event.reason)
        # The engine holds a bound method of this session: without the cycle,
        # reference counting frees a session when it ends, and the cyclic
        # garbage collector (a pause in the middle of some command) runs
        # far less often.
        self.engine.auth_gate = None
        self.server.sessions.discard(self)
        if self.admitted:
            self.admitted = False
            self.server.release(self.peer_ip)
        self.metrics.sessions_open -= 1
        if self.perf:
            # Microseconds per kind: count, mean, p50, p99, max.
            log.info("event=session_latency session=%s unit=us %s", self.id,
                     format_report(self.perf.report()))
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
        # Input buffered while we waited is timed from now: the wait belongs
        # to the reply that caused it (DATA-END), not to the next commands.
        self._t_recv = perf_counter_ns()
        self._update_reading()
        self._pump()
        self._track_phase()

    def _pump(self) -> None:
        """Carry out engine events until it needs input or we must wait.

        Replies go out together at the end of the loop's pass (``flush_later``);
        the paths that must write at once (STARTTLS, closing, a check in a
        thread) call ``_flush_out`` themselves."""
        next_event = self.engine.next_event
        out = self._out
        timed = self._timed
        budget = _PUMP_BATCH
        try:
            while not self.blocked:
                event = next_event()
                if event is NEED_DATA:
                    break
                if type(event) is Send:
                    out.append(event.data)
                    reply = event.reply
                    verb = event.verb
                    if verb in _TIMED_FROM_LINE:
                        timed.append((verb, reply.code, reply.enhanced, self._t_recv))
                        if reply.code < 400:
                            self.commands += 1
                        else:
                            self._account(event)
                    else:
                        kind, start = self._reply_kind(event)
                        timed.append((kind, reply.code, reply.enhanced, start))
                        self._account(event)
                    budget -= 1
                    if not budget:
                        # A pipelined burst: let other sessions run, then go on.
                        self._block()
                        asyncio.get_running_loop().call_soon(self._unblock)
                elif isinstance(event, MessageData):
                    self._write_message(event.data)
                elif isinstance(event, MessageBegin):
                    self._content_txn = event.transaction
                    self._begin_message(event.transaction)
                elif isinstance(event, MessageComplete):
                    self._content_txn = None
                    self._t_content_end = self._t_recv
                    self._complete_message(event.transaction)
                elif isinstance(event, MessageAbort):
                    txn = self._content_txn
                    if txn is not None and not txn.too_big:
                        self._content_txn = None  # RSET and the like: no DATA-END
                    self._abort_message(event.reason)
                elif isinstance(event, StartTLS):
                    self._flush_out()
                    self._start_tls()
                elif isinstance(event, AuthCheck):
                    self._auth_check(event)
                elif isinstance(event, AuthResult):
                    self._auth_result(event)
                elif isinstance(event, Close):
                    if event.reason != "QUIT":
                        # A foreign protocol, or the error budget used up.
                        log.warning("event=close session=%s peer=%s reason=%s",
                                    self.id, self.peer, _clean(event.reason))
                    self._flush_out()
                    self._close()
                    return
        except Exception:
            # Our bug, not the peer's: log it whole, tell the client little.
            log.exception("event=internal_error session=%s peer=%s", self.id, self.peer)
            self._send_and_close(R.INTERNAL_ERROR, "internal error")
            return
        if out and not self._flush_queued:
            self._flush_queued = True
            self.server.flush_later(self)
        if self.server.stopping and self.engine.transaction is None and not self.closing:
            self._send_and_close(R.SHUTTING_DOWN, "shutting down")

    def _flush_out(self) -> None:
        """Hand the queued replies to the transport now, and time them."""
        self._flush_queued = False
        out = self._out
        if out:
            timed = self._timed
            self._turn_ns = now = perf_counter_ns()
            if timed:
                # Recorded also when the peer is gone: the command was
                # handled, and the end of data counts the message's outcome
                # (a message stored just before a reset is still accepted).
                self.metrics.record_batch(timed, now, self.perf)
                timed.clear()
            transport = self.transport
            if transport is not None and not transport.is_closing():
                transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def _reply_kind(self, event: Send) -> tuple[str, int]:
        """Latency kind and start of a DATA/BDAT/AUTH reply or one without a verb."""
        verb = event.verb
        if not verb:
            return UNKNOWN, self._t_recv
        if verb == "AUTH":
            # Timed from the command, across the password check in a thread.
            start = self._t_auth if self._t_auth is not None else self._t_recv
            self._t_auth = None
            return verb, start
        txn = self._content_txn
        if txn is None or (verb == "DATA" and event.reply.code == 354):
            return verb, self._t_recv
        if verb == "DATA" or txn.too_big:
            # The end of content refused in the engine (too big).
            self._content_txn = None
            return DATA_END, self._t_recv
        return verb, self._t_recv  # a BDAT chunk's reply

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
        # Mail for postmaster goes to the configured account (policy.py).
        deliver_to = self.server.policy.delivery_address
        envelope = Envelope(qid, txn.mail_from, tuple(map(deliver_to, txn.recipients)))
        self.writer = self.server.storage.open(envelope)
        header = trace_headers(
            mail_from=txn.mail_from, recipients=txn.recipients, helo=engine.helo,
            peer_ip=self.peer_ip, hostname=self.config.hostname,
            protocol=protocol_name(esmtp=engine.esmtp, tls=engine.tls,
                                   auth=txn.auth_user is not None,
                                   utf8=txn.smtputf8),
            queue_id=qid, tls_info=self.tls_info())
        self.writer.write(header)

    def tls_info(self) -> str | None:
        """Protocol and cipher for the Received header, once encrypted."""
        return self._tls_desc

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
        # Group commit (committer.py): the 250 waits for a shared flush.
        self._block()
        fut = self.server.committer.submit(writer)
        self.busy = fut
        fut.add_done_callback(lambda f: self._committed(f, txn))

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
        if log.isEnabledFor(logging.INFO):  # the arguments cost more than the call
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
        reply = send.reply
        self._timed.append((DATA_END, reply.code, reply.enhanced, self._t_content_end))
        if reply.code < 400:
            self.commands += 1
        else:
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

    # --- AUTH (RFC 4954) ---------------------------------------------------

    def _auth_gate(self) -> R.Reply | None:
        """At each AUTH command: refuse a locked-out address at once."""
        self._end_auth_attempt()  # a cancelled exchange ends without a verdict
        locked = self.server.auth_throttle.locked_for(self.peer_ip)
        if locked <= 0:
            return None
        log.warning("event=auth_locked session=%s peer=%s retry_after=%.1f",
                    self.id, self.peer, locked)
        return R.AUTH_LOCKED

    def _auth_check(self, event: AuthCheck) -> None:
        """Resolve a SASL request in the auth threads (argon2 is slow), unless
        this address is locked out.  The request may hold a password: it is
        never logged."""
        server = self.server
        throttle = server.auth_throttle
        if not self._auth_attempt and server.users is not None:
            # Parallel connections must not all guess at once: attempts in
            # flight count against the address's budget (ratelimit.py).
            self._auth_attempt = throttle.begin(self.peer_ip)
        if not self._auth_attempt or server.users is None:
            log.warning("event=auth_locked session=%s peer=%s mechanism=%s retry_after=%.1f",
                        self.id, self.peer, event.mechanism,
                        throttle.locked_for(self.peer_ip))
            self.engine.auth_abort(R.AUTH_LOCKED)
            return
        users = server.users
        self._t_auth = self._t_recv
        self._flush_out()
        self._block()
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(server.auth_executor, users.resolve, event.request)
        self.busy = fut
        fut.add_done_callback(self._auth_checked)

    def _auth_checked(self, fut: asyncio.Future[Any]) -> None:
        exc = None if fut.cancelled() else fut.exception()
        if fut.cancelled() or exc is not None:
            # Our trouble (unreadable users file...), not the client's: 454.
            # Only the type is logged: the request held the password.
            log.error("event=auth_error session=%s peer=%s error=%s", self.id, self.peer,
                      type(exc).__name__ if exc is not None else "cancelled")
            self._end_auth_attempt()
            self.engine.auth_abort(R.AUTH_LOCKED)
        else:
            self.engine.auth_result(fut.result())
        self._unblock()

    def _end_auth_attempt(self) -> None:
        if self._auth_attempt:
            self._auth_attempt = False
            self.server.auth_throttle.end(self.peer_ip)

    def _auth_result(self, event: AuthResult) -> None:
        self._end_auth_attempt()
        throttle = self.server.auth_throttle
        user = _clean(event.username, 64) if event.username else "-"
        if event.ok:
            throttle.success(self.peer_ip)
            log.info("event=auth_ok session=%s peer=%s mechanism=%s user=%s",
                     self.id, self.peer, event.mechanism, user)
            return
        if not event.credentials_failed:
            log.info("event=auth_malformed session=%s peer=%s mechanism=%s",
                     self.id, self.peer, event.mechanism)
            return
        delay = throttle.failure(self.peer_ip)
        self.metrics.auth_failure()
        log.warning("event=auth_failed session=%s peer=%s mechanism=%s user=%s delay=%.2f"
                    " locked=%s", self.id, self.peer, event.mechanism, user, delay,
                    "yes" if throttle.locked_for(self.peer_ip) > 0 else "no")
        if delay > 0:
            # The 535 waits in the engine; reading stays paused meanwhile, so
            # a client cannot try again any sooner on this connection.
            self._flush_out()
            self._block()
            loop = asyncio.get_running_loop()
            self._auth_delay = loop.call_later(delay, self._auth_delay_over)

    def _auth_delay_over(self) -> None:
        self._auth_delay = None
        if not self._lost:
            self._unblock()

    # --- TLS, timeouts, closing -------------------------------------------

    def _start_tls(self) -> None:
        """STARTTLS: the 220 is written; upgrade this connection (RFC 3207)."""
        holder = self.server.tls
        if holder is None or self.transport is None:
            # Cannot happen: the engine offers STARTTLS only with a certificate.
            self._send_and_close(R.INTERNAL_ERROR, "TLS not configured")
            return
        # Stop reading now, inside this callback: the next bytes on the
        # socket are the client's handshake, which the TLS layer must get.
        self._handshaking = True
        self._block()
        loop = asyncio.get_running_loop()
        # The context of the moment: after a SIGHUP reload, the new pair.
        self._tls_task = loop.create_task(self._handshake(holder.context))

    async def _handshake(self, ctx: ssl.SSLContext) -> None:
        raw = self.transport
        assert raw is not None
        loop = asyncio.get_running_loop()
        try:
            transport = await loop.start_tls(
                raw, self, ctx, server_side=True,
                ssl_handshake_timeout=self.config.tls_handshake_timeout)
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            self._handshaking = False
            self._tls_failed(exc)
            return
        except Exception as exc:
            # Our bug, not the peer's (the peer's faults are OSErrors).
            self._handshaking = False
            log.exception("event=internal_error session=%s peer=%s stage=starttls",
                          self.id, self.peer)
            self._tls_failed(exc)
            return
        self._handshaking = False
        if transport is None or self._lost:
            self._tls_failed(ConnectionResetError("connection closed"))
            return
        self.transport = transport
        self._read_paused = False  # the new transport starts reading
        self._tls_up("starttls")
        # The client's turn starts now, not when it sent STARTTLS.
        self._active_ns = self._turn_ns = perf_counter_ns()
        early = b"".join(self._tls_early)
        self._tls_early.clear()
        self.engine.tls_started()  # RFC 3207 §4.2: back to the start
        self.engine.receive(early)
        self._unblock()

    def _tls_up(self, mode: str) -> None:
        assert self.transport is not None
        ssl_object = self.transport.get_extra_info("ssl_object")
        self._tls_desc = describe(ssl_object)
        self.metrics.tls_handshake("ok")
        cipher = ssl_object.cipher() if ssl_object is not None else None
        log.info("event=tls session=%s mode=%s version=%s cipher=%s", self.id, mode,
                 ssl_object.version() if ssl_object is not None else "?",
                 cipher[0] if cipher else "?")

    def _tls_failed(self, exc: BaseException) -> None:
        """A STARTTLS handshake failed: log it and end the session quietly
        (no reply can be sent into a half-made TLS connection).

        Failed handshakes on the implicit-TLS port never reach a Session:
        the listener drops them before ``connection_made``."""
        reason = getattr(exc, "reason", None) or type(exc).__name__
        self.metrics.tls_handshake("failed")
        log.info("event=tls_failed session=%s peer=%s mode=starttls reason=%s error=%s",
                 self.id, self.peer, _clean(reason), _clean(exc))
        self.abort()
        # start_tls gave the socket to the TLS layer, so asyncio will not call
        # our connection_lost: end the session here (it runs once).
        self.connection_lost(None)

    def _arm_timer(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._timer_step, self._check_timeout)

    @property
    def _timer_step(self) -> float:
        """The longest the timer may sleep: the shortest silence any phase
        allows.  Every deadline lies at least this far after the moment its
        phase began, so a phase change never has to re-arm the timer (which
        would cost a timer per message on the hot path)."""
        config = self.config
        return min(config.timeout, config.data_timeout)

    def _track_phase(self) -> None:
        """Start or stop the content clocks as the engine enters or leaves
        DATA/BDAT (the timer, due within ``_timer_step``, sees the change).

        Each DATA and each BDAT chunk gets clocks of its own, also when a
        pipelining client's input ends one and starts the next within a
        single read (the phase then never shows COMMAND in between)."""
        engine = self.engine
        phase = engine.phase
        starts = engine.content_phases
        if phase is self._phase_seen and starts == self._content_phases_seen:
            return
        self._phase_seen = phase
        new_content = starts != self._content_phases_seen
        self._content_phases_seen = starts
        if phase is Phase.DATA or phase is Phase.BDAT:
            if self._content_ns is None or new_content:
                self._content_ns = self._t_recv  # the read that began it
                self._content_bytes = 0
        elif self._content_ns is not None and phase is not Phase.WAIT:
            self._content_ns = None

    def _deadline(self) -> tuple[int, str]:
        """When the client's time runs out (perf_counter_ns), and in which phase."""
        config = self.config
        started = self._content_ns
        if started is None:
            return self._turn_ns + round(config.timeout * NS_PER_SECOND), "command"
        # --timeout bounds silence everywhere; --data-timeout may be shorter.
        silence = round(min(config.timeout, config.data_timeout) * NS_PER_SECOND)
        deadline = self._active_ns + silence
        if config.min_data_rate:
            by_rate = started + silence + round(
                self._content_bytes / config.min_data_rate * NS_PER_SECOND)
            deadline = min(deadline, by_rate)
        return deadline, "data"

    def _check_timeout(self) -> None:
        """Fires at the client's deadline (or earlier, then re-arms)."""
        if self.closing:
            return
        loop = asyncio.get_running_loop()
        now = perf_counter_ns()
        if self._handshaking or self._auth_delay is not None or self._flush_queued or (
                self.blocked and self.busy is not None and not self.busy.done()):
            # Not the client's turn: the TLS handshake has its own limit
            # (--tls-handshake-timeout), the failed-AUTH delay is ours, so
            # are replies waiting for the end of the loop's pass, and slow
            # storage is our fault.  The client's clocks restart when we
            # are done.
            self._active_ns = self._turn_ns = now
            if self._content_ns is not None:
                self._content_ns, self._content_bytes = now, 0
            self._timer = loop.call_later(self._timer_step, self._check_timeout)
            return
        deadline, phase = self._deadline()
        if now >= deadline:
            log.info("event=timeout session=%s peer=%s phase=%s idle=%.1f", self.id,
                     self.peer, phase, (now - self._active_ns) / NS_PER_SECOND)
            self._close_engine(R.TIMEOUT, "timeout")
            return
        self._timer = loop.call_later(min((deadline - now) / NS_PER_SECOND, self._timer_step),
                                      self._check_timeout)

    def _close_engine(self, reply: R.Reply | None, reason: str) -> None:
        if self._handshaking:
            # Mid-handshake there is no channel to reply on: just close.
            self._close()
            return
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
            if self.transport.get_write_buffer_size():
                # close() waits until our replies are written; a peer that
                # does not read would hold the connection (and its buffer)
                # forever.  It gets one more timeout period, then is cut.
                # (connection_lost cancels this through ``_timer``.)
                loop = asyncio.get_running_loop()
                self._timer = loop.call_later(self.config.timeout, self.transport.abort)

    def shutdown(self) -> None:
        """Server is stopping: close now unless a transaction is running."""
        if self.closing:
            return
        if self.engine.transaction is None and not self.blocked:
            self._send_and_close(R.SHUTTING_DOWN, "shutting down")

    def abort(self) -> None:
        """Drop the connection without a reply (nothing can be written)."""
        self.closing = True
        if self._timer is not None:
            self._timer.cancel()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()

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
            tls_available=config.tls_cert is not None,
            require_tls=config.require_tls,
            max_errors=config.max_errors,
        )
        # Accounts, AUTH and recipient policy (docs/accounts.md).
        self.users: UserStore | None = None
        if config.users_file is not None:
            try:
                self.users = UserStore(config.users_file)
            except (UserStoreError, OSError) as exc:
                raise ConfigError(f"--users-file: {exc}") from None
        if config.submission_port is not None and self.users is None:
            raise ConfigError("--submission-port: needs --users-file (MAIL there needs AUTH)")
        try:
            self.policy = RecipientPolicy(
                local_domains=config.local_domain, users=self.users,
                postmaster=config.postmaster, vrfy=config.vrfy,
                sender_must_match=config.submission_own_sender)
        except ValueError as exc:
            raise ConfigError(f"--postmaster: {exc}") from None
        self.auth_throttle = AuthThrottle(
            max_failures=config.auth_max_failures, window=config.auth_failure_window,
            lockout=config.auth_lockout, base_delay=config.auth_failure_delay,
            max_delay=config.auth_failure_delay_max)
        self.engine_config = dataclasses.replace(
            self.engine_config,
            check_recipient=self.policy.check_recipient if self.policy.checks_recipients
            else None,
            vrfy=self.policy.vrfy,
            auth_mechanisms=AUTH_MECHANISMS if self.users is not None else (),
            allow_insecure_auth=config.allow_insecure_auth)
        self.submission_engine_config = dataclasses.replace(
            self.engine_config, submission=True, check_sender=self.policy.check_sender)
        # argon2id takes 64 MiB and tens of milliseconds per check: a few
        # threads of their own bound that memory and keep storage threads free.
        self.auth_executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="auth")
        self.submission_addresses: list[tuple[str, int]] = []
        if self.users is not None:
            server_log.info("event=users_loaded file=%s accounts=%d auth=%s", self.users.path,
                            len(self.users), "tls" if not config.allow_insecure_auth
                            else "tls,plain")
        # The certificate and key; replaced on SIGHUP (reload_tls).
        self.tls: ContextHolder | None = None
        if config.tls_cert is not None and config.tls_key is not None:
            self.tls = ContextHolder(Pair(config.tls_cert, config.tls_key,
                                          config.tls_min_version))
        self.tls_addresses: list[tuple[str, int]] = []  # implicit-TLS listener
        self._tls_socket: socket.socket | None = None
        self._tls_accept: asyncio.Task[None] | None = None
        self._tls_handshakes: set[asyncio.Task[None]] = set()  # not yet sessions
        self.storage = storage or create_storage(
            config.storage, mail_dir=config.mail_dir, hostname=config.hostname)
        # fsync-bound work: enough threads for the journal to merge commits.
        self.executor = ThreadPoolExecutor(max_workers=32, thread_name_prefix="storage")
        self.committer = BatchCommitter(self.storage, self.executor)
        self.sessions: set[Session] = set()
        self.servers: list[asyncio.AbstractServer] = []
        self.stopping = False
        self.messages_accepted = 0
        self._idle = asyncio.Event()
        self.admitted = 0  # sessions within the connection limits
        self.per_ip: dict[str, int] = {}  # of those, per client address
        self.metrics = Metrics(slo_threshold=config.slo_threshold,
                               slo_target=config.slo_target)
        self.metrics_http: MetricsHTTPServer | None = None
        self.metrics_addresses: list[tuple[str, int]] = []
        self._slo_timer: asyncio.TimerHandle | None = None
        self._to_flush: list[Session] = []  # sessions with replies to write

    async def start(self) -> list[tuple[str, int]]:
        """Listen; return the bound (host, port) pairs."""
        loop = asyncio.get_running_loop()
        # --workers: every worker listens on the same ports (workers.py).
        reuse_port = True if self.config.workers > 1 else None
        srv = await loop.create_server(lambda: Session(self), self.config.host,
                                       self.config.port, reuse_address=True, backlog=1024,
                                       reuse_port=reuse_port)
        self.servers.append(srv)
        addrs = [s.getsockname()[:2] for s in srv.sockets]
        for host, port in addrs:
            server_log.info("event=listening host=%s port=%d hostname=%s storage=%s",
                            host, port, self.config.hostname, self.storage.name)
        if self.tls is not None and self.config.tls_port is not None:
            self._start_implicit_tls(loop, bool(reuse_port))
        if self.config.submission_port is not None:
            ssrv = await loop.create_server(
                lambda: Session(self, submission=True), self.config.host,
                self.config.submission_port, reuse_address=True, backlog=1024,
                reuse_port=reuse_port)
            self.servers.append(ssrv)
            self.submission_addresses = [s.getsockname()[:2] for s in ssrv.sockets]
            for host, port in self.submission_addresses:
                server_log.info("event=listening host=%s port=%d mode=submission", host, port)
        if self.config.metrics_port is not None and self.metrics_http is None:
            self.metrics_http = MetricsHTTPServer(self.render_metrics,
                                                  lambda: not self.stopping)
            self.metrics_addresses = await self.metrics_http.start(
                self.config.metrics_host, self.config.metrics_port)
        if self._slo_timer is None:
            self._slo_tick()
        return addrs

    def flush_later(self, session: Session) -> None:
        """Write ``session``'s replies once the loop has run every read that
        is ready now.

        On a busy server many sessions' input arrives in one pass of the
        loop.  Replies written one by one, between the parsing of the next
        session's input, each wake the client anew; written together, they
        wake a client that serves many connections once (measured: about 8%
        less CPU per message under load, in the benchmark).  An idle
        session's reply waits only for the loop's next turn."""
        queue = self._to_flush
        if not queue:
            asyncio.get_running_loop().call_soon(self._flush_sessions)
        queue.append(session)

    def _flush_sessions(self) -> None:
        queue, self._to_flush = self._to_flush, []
        for session in queue:
            if session._flush_queued:
                try:
                    session._flush_out()
                except Exception:
                    # Our bug, not the peer's: that session ends, and the
                    # other sessions' replies still go out.
                    log.exception("event=internal_error session=%s peer=%s stage=write",
                                  session.id, session.peer)
                    session.abort()

    # A closed SLO window is judged within this many seconds of its end even
    # when no command arrives to close it.
    SLO_TICK = 5.0

    def _slo_tick(self) -> None:
        self.metrics.tick()
        loop = asyncio.get_running_loop()
        self._slo_timer = loop.call_later(self.SLO_TICK, self._slo_tick)

    def render_metrics(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of this server's metrics."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        if self._registry is None:
            self._registry = self.metrics.registry()
        return generate_latest(self._registry), CONTENT_TYPE_LATEST

    _registry: Any = None

    async def reload_tls(self) -> bool:
        """SIGHUP: load the certificate and key again (new sessions use the
        new pair; running ones keep theirs); a bad pair is logged and the
        old one kept."""
        if self.tls is None:
            server_log.info("event=tls_reload_skipped reason=no_certificate")
            return False
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self.tls.reload)

    async def reload_users(self) -> bool:
        """SIGHUP: read the users file again (it is also re-read whenever it
        changes, on use)."""
        if self.users is None:
            return False
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self.users.reload)

    # --- The implicit-TLS port (RFC 8314) -----------------------------------
    #
    # Connections are accepted here rather than by loop.create_server, so
    # that each one counts against the connection limits (and is refused
    # over the limit) before its handshake, not after it: otherwise a client
    # could hold any number of half-made handshakes.  The handshake is then
    # done by the loop (connect_accepted_socket), before the Session sees a
    # byte; the context hands each handshake to the current pair (SNI hook),
    # so a reloaded certificate applies here too.

    def _start_implicit_tls(self, loop: asyncio.AbstractEventLoop, reuse_port: bool) -> None:
        infos = socket.getaddrinfo(self.config.host, self.config.tls_port,
                                   type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, address = infos[0]
        sock = socket.create_server(address[:2], family=family, backlog=1024,
                                    reuse_port=reuse_port)
        sock.setblocking(False)
        self._tls_socket = sock
        self.tls_addresses = [sock.getsockname()[:2]]
        self._tls_accept = loop.create_task(self._accept_implicit_tls(sock))
        for host, port in self.tls_addresses:
            server_log.info("event=listening host=%s port=%d tls=implicit", host, port)

    async def _accept_implicit_tls(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, peer = await loop.sock_accept(sock)
            except OSError as exc:  # e.g. out of file descriptors: back off
                server_log.error("event=accept_failed port=tls error=%s", _clean(exc))
                await asyncio.sleep(0.1)
                continue
            ip = str(peer[0])
            refusal = self.admit(ip)
            if refusal is not None:
                # No plaintext reply can reach a client that speaks TLS.
                log.warning("event=connection_refused peer=%s tls=implicit reason=%s",
                            ip, _clean(refusal.text))
                conn.close()
                continue
            task = loop.create_task(self._implicit_tls_handshake(conn, ip))
            self._tls_handshakes.add(task)
            task.add_done_callback(self._tls_handshakes.discard)

    async def _implicit_tls_handshake(self, conn: socket.socket, ip: str) -> None:
        assert self.tls is not None
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(
                lambda: Session(self, implicit_tls=True, preadmitted=True), conn,
                ssl=self.tls.listener_context,
                ssl_handshake_timeout=self.config.tls_handshake_timeout)
        except asyncio.CancelledError:
            self.release(ip)
            conn.close()
            raise
        except Exception as exc:  # TLS, socket and time-out errors alike
            self.release(ip)
            conn.close()
            self.metrics.tls_handshake("failed")
            reason = getattr(exc, "reason", None) or type(exc).__name__
            log.info("event=tls_failed peer=%s mode=implicit reason=%s error=%s",
                     ip, _clean(reason), _clean(exc))

    def admit(self, ip: str) -> R.Reply | None:
        """Count a new session against the limits, or return the refusal."""
        config = self.config
        if self.admitted >= config.max_connections:
            return R.TOO_MANY_CONNECTIONS
        count = self.per_ip.get(ip, 0)
        if config.max_connections_per_ip and count >= config.max_connections_per_ip:
            return R.TOO_MANY_FROM_IP
        self.admitted += 1
        self.per_ip[ip] = count + 1
        return None

    def release(self, ip: str) -> None:
        """An admitted session has ended."""
        self.admitted -= 1
        count = self.per_ip.pop(ip, 1) - 1
        if count:
            self.per_ip[ip] = count

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
        if self._tls_accept is not None:
            self._tls_accept.cancel()
        if self._tls_socket is not None:
            self._tls_socket.close()
        for task in list(self._tls_handshakes):
            task.cancel()
        if self._slo_timer is not None:
            self._slo_timer.cancel()
        for session in list(self.sessions):
            session.shutdown()
        if self.sessions:
            try:
                await asyncio.wait_for(self._idle.wait(), self.config.shutdown_grace)
            except TimeoutError:
                pass
        for session in list(self.sessions):
            # Spare only a session whose finished message is being
            # committed (its 250 is due).  One whose spill write is still
            # running has an unfinished message: close it now; the abort
            # (tmp/ file removed) runs once that write returns.  Left open,
            # it would resume reading after the write and be dropped at
            # exit without a 421 and with its tmp/ file left behind.
            if session.busy is None or session.busy.done() \
                    or session.engine.phase is not Phase.WAIT:
                session.force_close()
        # Commits already running finish (their messages are durable; the
        # client may not hear the 250 and will retry, never lose it).
        await self.committer.drain()
        await asyncio.get_running_loop().run_in_executor(None, self.executor.shutdown, True)
        self.auth_executor.shutdown(wait=False, cancel_futures=True)
        for srv in self.servers:
            await srv.wait_closed()
        self.storage.close()
        if self.metrics_http is not None:
            await self.metrics_http.stop()  # /healthz said "stopping" until now
        server_log.info("event=stopped messages=%d", self.messages_accepted)


async def serve(config: Config) -> None:
    """Run until SIGTERM or SIGINT."""
    server = Server(config)
    clean = getattr(server.storage, "clean_tmp", None)
    if clean is not None:
        removed = await asyncio.get_running_loop().run_in_executor(None, clean)
        if removed:
            server_log.info("event=tmp_cleaned files=%d", removed)
    # Handlers first: the "listening" log line is the readiness signal, and
    # a SIGTERM sent right after it must stop us cleanly (exit 0), not kill
    # us with the default action.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[bool]] = set()  # keeps running reloads referenced

    def on_sighup() -> None:
        for coro in (server.reload_tls(), server.reload_users()):
            task = loop.create_task(coro)
            reloads.add(task)
            task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    await server.start()
    # What exists now (modules, the configuration, the server) lives as long
    # as the process: the cyclic garbage collector need never scan it again,
    # which keeps its rare full passes short.
    gc.collect()
    gc.freeze()
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
