"""The SMTP server protocol as a sans-I/O state machine (RFC 5321).

Bytes go in with ``receive``; events come out of ``next_event``.  Nothing
here touches a socket, a clock, a file or a logger: the transport
(``server.py``) owns those and tells the engine what happened.

Ground rules
------------
* Every command line produces exactly one reply, in order (RFC 2920 §3.1:
  pipelined replies keep the order of the commands).
* The engine stops producing events while it waits for the transport:
  after ``MessageComplete`` until ``delivered``/``delivery_failed``, and
  after the ``STARTTLS`` 220 reply until ``tls_started``, and after
  ``AuthCheck`` (a password check: slow, so the transport runs it in a
  thread) until ``auth_result``/``auth_abort``.  Input received in
  the meantime stays buffered (and is discarded at the TLS upgrade: bytes
  sent in plaintext after STARTTLS must never be acted on, RFC 3207 §6).
* An AUTH exchange (RFC 4954) is one command with several turns: each 334
  challenge answers the AUTH command or a response line, the lines
  answering challenges are read in the AUTH phase, never as commands, and
  the exchange ends with one 235 or error reply.
* A session (HELO name, ESMTP, TLS, AUTH) outlives transactions; a
  ``Transaction`` lives from MAIL to the end of data, RSET, HELO/EHLO or
  STARTTLS (§4.1.4).

States
------
=============  ==============================================  ===========
phase          what the next input bytes are                   leaves on
=============  ==============================================  ===========
COMMAND        command lines                                   DATA, BDAT
DATA           message text, ended by <CRLF>.<CRLF>            end mark
BDAT           exactly ``_bdat_left`` octets of a chunk        count done
AUTH           SASL responses, base64 lines (RFC 4954 §4)      outcome
WAIT           (nothing is parsed) delivery or TLS pending     transport
CLOSED         (nothing is parsed)                             never
=============  ==============================================  ===========
"""

from __future__ import annotations

import base64
import binascii
import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from . import replies as R
from . import sasl
from .address import Address, AddressError, parse_params, parse_path
from .dataread import DataDecoder
from .replies import Reply


class Phase(enum.Enum):
    COMMAND = "command"
    DATA = "data"
    BDAT = "bdat"
    AUTH = "auth"
    WAIT = "wait"
    CLOSED = "closed"


# --- Events -----------------------------------------------------------------
# Events are read, never changed, once made.  The ones made for every
# message are not ``frozen``: a frozen dataclass's ``__init__`` costs three
# times as much, and seven of them are made per message.

@dataclass(slots=True)
class Send:
    """Write this reply. ``verb`` names the command it answers ("" for none)."""

    reply: Reply
    verb: str
    data: bytes  # the encoded reply


@dataclass(slots=True)
class MessageBegin:
    """A message starts: open somewhere to put it (DATA 354 or first BDAT)."""

    transaction: Transaction


@dataclass(slots=True)
class MessageData:
    data: bytes


@dataclass(slots=True)
class MessageComplete:
    """All content is in; store it durably, then call ``delivered``."""

    transaction: Transaction


@dataclass(frozen=True, slots=True)
class MessageAbort:
    """Throw away what was written since ``MessageBegin``."""

    reason: str


@dataclass(frozen=True, slots=True)
class StartTLS:
    """The 220 reply has been sent: upgrade, then call ``tls_started``."""


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection after writing every reply sent so far."""

    reason: str


@dataclass(frozen=True, slots=True)
class AuthCheck:
    """A SASL mechanism needs the users file (a password check, slow: argon2,
    or SCRAM keys): resolve ``request`` in a thread, then call
    ``auth_result`` (or ``auth_abort`` to refuse, e.g. a locked-out client).
    The request may hold a password: never log it."""

    request: sasl.Request
    mechanism: str


@dataclass(frozen=True, slots=True)
class AuthResult:
    """An AUTH exchange ended; its reply (235, 501 or 535) follows.

    ``credentials_failed`` marks wrong credentials (what a password guesser
    produces), as opposed to a malformed exchange."""

    ok: bool
    mechanism: str
    username: str | None
    credentials_failed: bool = False


Event = (Send | MessageBegin | MessageData | MessageComplete | MessageAbort | StartTLS
         | Close | AuthCheck | AuthResult)


class NeedData(enum.Enum):
    NEED_DATA = "need data"


NEED_DATA: Final = NeedData.NEED_DATA


# --- Configuration and per-session state -------------------------------------

@dataclass(frozen=True, slots=True)
class EngineConfig:
    hostname: str = "localhost"
    max_message_size: int = 25 * 1024 * 1024
    max_recipients: int = 100  # §4.5.3.1.8: at least 100 must be accepted
    max_line_length: int = 512  # §4.5.3.1.4, with the CRLF
    tls_available: bool = False
    # --require-tls: no mail transaction before STARTTLS (RFC 3207 §4,
    # 530 5.7.0; like Postfix's smtpd_tls_security_level = encrypt).
    require_tls: bool = False
    # A policy hook for recipients: return None to accept or a Reply.
    check_recipient: Callable[[Address, Transaction], Reply | None] | None = None
    # AUTH (RFC 4954): mechanisms in the order advertised; empty: no AUTH.
    auth_mechanisms: tuple[str, ...] = ()
    # RFC 4954 §4 / RFC 8314: AUTH only over TLS unless this is set.
    allow_insecure_auth: bool = False
    # A submission listener (RFC 6409 §4.3): MAIL needs AUTH first.
    submission: bool = False
    # Reverse-path check (reverse-path, authenticated user) -> refusal or None.
    check_sender: Callable[[Address, str | None], Reply | None] | None = None
    # VRFY answer (argument, authenticated user) -> reply; None: always 252.
    vrfy: Callable[[str, str | None], Reply] | None = None
    # Hard error limit, like Postfix's smtpd_hard_error_limit (default 20):
    # after this many 5xx replies to commands the session gets 421 4.7.0
    # and is closed.  0 turns the limit off.
    max_errors: int = 20


@dataclass(slots=True)
class Transaction:
    """MAIL to end of data (or RSET/HELO/EHLO/STARTTLS)."""

    mail_from: Address
    smtputf8: bool = False
    body: str = "7BIT"  # 7BIT or 8BITMIME (RFC 6152)
    declared_size: int | None = None
    recipients: list[Address] = field(default_factory=list)
    via_bdat: bool = False  # content is arriving in BDAT chunks
    size: int = 0  # octets of content received so far
    too_big: bool = False  # content passed the limit; discarding the rest
    bare_eol: bool = False  # bare CR/LF in DATA were normalised
    auth_user: str | None = None  # account that had authenticated at MAIL


# RFC 4954 §4: a server must take SASL response lines of 12288 octets.
AUTH_LINE_MAX: Final = 12288

HELP_TEXT: Final = {
    "HELO": ("HELO <domain>: identify yourself (plain SMTP)",),
    "EHLO": ("EHLO <domain>: identify yourself and list the extensions",),
    "MAIL": ("MAIL FROM:<address> [SIZE=n] [BODY=7BIT|8BITMIME] [SMTPUTF8]:"
             " start a transaction",),
    "RCPT": ("RCPT TO:<address>: add a recipient",),
    "DATA": ("DATA: send the message, ended by a line with a single period",),
    "BDAT": ("BDAT <size> [LAST]: send a chunk of the message (CHUNKING)",),
    "RSET": ("RSET: abort the current transaction",),
    "NOOP": ("NOOP: do nothing",),
    "QUIT": ("QUIT: close the session",),
    "VRFY": ("VRFY <address>: verify an address",),
    "EXPN": ("EXPN <list>: expand a mailing list (not available)",),
    "HELP": ("HELP [command]: this text",),
    "STARTTLS": ("STARTTLS: start TLS on this connection (RFC 3207)",),
    "AUTH": ("AUTH <mechanism> [initial-response]: authenticate (RFC 4954)",),
}


class SMTPEngine:
    """One SMTP session, from greeting to close, without I/O."""

    def __init__(self, config: EngineConfig, *, tls: bool = False,
                 auth_gate: Callable[[], Reply | None] | None = None) -> None:
        self.config = config
        # Asked at each AUTH command: a refusal (454 4.7.0 for a locked-out
        # client address, which only the transport knows) or None.
        self.auth_gate = auth_gate
        self.tls = tls  # True once the connection is encrypted
        self.helo: str | None = None  # reset by STARTTLS (RFC 3207 §4.2)
        self.esmtp = False  # the client said EHLO, not HELO
        self.transaction: Transaction | None = None
        self.phase = Phase.COMMAND
        self.messages = 0  # transactions delivered in this session
        # Times the phase became DATA or BDAT (one per DATA, one per BDAT
        # chunk): a transport that looks at ``phase`` only now and then can
        # tell a new content phase from the one it saw last.
        self.content_phases = 0
        self._in = b""  # unparsed input
        self._events: list[Event] = []
        self._discarding_line = False  # skipping the rest of a too-long line
        self._data: DataDecoder | None = None
        self._bdat_left = 0
        self._bdat_last = False
        self._bdat_discard = False  # chunk is read but thrown away
        self._bdat_verb_reply: Reply | None = None  # refusal owed after the chunk
        self._complete_verb = "DATA"  # the verb whose reply delivery gives
        # AUTH: the account, once authenticated (reset by STARTTLS only);
        # the mechanism of a running exchange; SCRAM's success, held until
        # the client acknowledges the server's final data.
        self.authenticated: str | None = None
        self._sasl: sasl.Mechanism | None = None
        self._sasl_success: sasl.Success | None = None
        self._auth_overlong = False  # skipping a response line over the limit
        self._ehlo_reply = self._build_ehlo_lines()
        self.errors = 0  # 5xx replies to commands (the error budget)
        self._pos = 0  # start of the unparsed input in ``_in`` (COMMAND only)
        # The first bytes of a plain connection are checked for a foreign
        # protocol (HTTP, a TLS ClientHello) before any line is parsed.
        self._sniffing = not tls

    # --- Public surface -------------------------------------------------

    def greeting(self) -> Send:
        return self._send(R.reply(220, None, f"{self.config.hostname} ESMTP simplesmtp"), "")

    def receive(self, data: bytes) -> None:
        """Buffer bytes from the peer; ``next_event`` parses them."""
        if self.phase is not Phase.CLOSED and data:
            self._in += data

    @property
    def pending_input(self) -> int:
        return len(self._in) - self._pos

    def next_event(self) -> Event | NeedData:
        events = self._events
        while not events:
            # ``_step``, written out: this runs for every event.
            # In COMMAND and DATA an empty buffer means more input is needed
            # (consumed input is always cut off, see _step_command).
            phase = self.phase
            if phase is Phase.COMMAND:
                progressed = bool(self._in) and self._step_command()
            elif phase is Phase.DATA:
                progressed = bool(self._in) and self._step_data()
            else:
                progressed = self._step()
            if not progressed:
                return NEED_DATA
        return events.pop(0)

    def delivered(self, queue_id: str) -> Send:
        """The message of ``MessageComplete`` is durable under ``queue_id``."""
        self.messages += 1
        self._end_transaction()
        return self._send(R.reply(250, "2.0.0", f"Ok: queued as {queue_id}"), self._complete_verb)

    def delivery_failed(self, reply: Reply) -> Send:
        """Storage failed; ``reply`` is the 4xx to give (nothing delivered)."""
        self._end_transaction()
        return self._send(reply, self._complete_verb)

    def auth_result(self, result: object) -> None:
        """The ``AuthCheck`` request resolved to ``result``; go on."""
        if self.phase is Phase.WAIT and self._sasl is not None:
            self._auth_step(self._sasl.resolve(result))

    def auth_abort(self, reply: Reply) -> None:
        """Refuse the running AUTH exchange with ``reply`` (454 lockout)."""
        if self.phase is Phase.WAIT and self._sasl is not None:
            self._auth_end()
            self._reply(reply, "AUTH")

    def tls_started(self) -> None:
        """The TLS handshake is done: back to the initial state (RFC 3207 §4.2)."""
        self.tls = True
        self.authenticated = None
        self.helo = None
        self.esmtp = False
        self.transaction = None
        self._in = b""
        self._ehlo_reply = self._build_ehlo_lines()
        self.phase = Phase.COMMAND

    def close(self, reply: Reply | None, reason: str) -> list[Event]:
        """End the session from outside (timeout, shutdown); returns events."""
        events: list[Event] = []
        if self._message_open():
            events.append(MessageAbort(reason))
        if reply is not None:
            events.append(self._send(reply, ""))
        events.append(Close(reason))
        self.phase = Phase.CLOSED
        self._in = b""
        self._pos = 0
        return events

    def connection_lost(self) -> list[Event]:
        """The peer went away; a message in flight must not be delivered."""
        events: list[Event] = []
        if self._message_open():
            events.append(MessageAbort("connection lost"))
        self.phase = Phase.CLOSED
        self._in = b""
        self._pos = 0
        return events

    # --- Internals ------------------------------------------------------

    def _send(self, reply: Reply, verb: str) -> Send:
        return Send(reply, verb, reply.encode(self.esmtp))

    def _reply(self, reply: Reply, verb: str) -> None:
        self._events.append(Send(reply, verb, reply.encode(self.esmtp)))
        if reply.code >= 500:
            self.errors += 1
            if self.errors == self.config.max_errors:
                self._too_many_errors()

    def _too_many_errors(self) -> None:
        # The reply to the command that used up the budget is already
        # queued (one reply per command); the 421 follows it.
        self._reset_transaction("too many errors")
        self._events.append(self._send(R.TOO_MANY_ERRORS, ""))
        self._events.append(Close("too many errors"))
        self.phase = Phase.CLOSED
        self._in = b""

    def _end_transaction(self) -> None:
        self.transaction = None
        self.phase = Phase.COMMAND

    def _message_open(self) -> bool:
        """Content has begun (MessageBegin sent) and is not yet complete."""
        txn = self.transaction
        if txn is None or txn.too_big or self.phase is Phase.WAIT:
            return False
        return self.phase is Phase.DATA or txn.via_bdat

    def _reset_transaction(self, reason: str) -> None:
        """Drop the transaction (RSET, HELO/EHLO, QUIT, STARTTLS)."""
        if self._message_open():
            self._events.append(MessageAbort(reason))
        self.transaction = None

    def _step(self) -> bool:
        """Make progress on buffered input; False when more input is needed."""
        phase = self.phase
        if phase is Phase.COMMAND:
            return self._step_command()
        if phase is Phase.DATA:
            return self._step_data()
        if phase is Phase.BDAT:
            return self._step_bdat()
        if phase is Phase.AUTH:
            return self._step_auth()
        return False

    def _step_command(self) -> bool:
        # Lines are cut at an offset (``_pos``) rather than by slicing the
        # rest of the buffer after each one: a pipelined burst of N short
        # commands costs O(N), not O(N * burst).  Whenever the phase leaves
        # COMMAND or more input is needed, the buffer is compacted, so the
        # other phases always read ``_in`` from its start.
        if self._sniffing:
            foreign = sniff_foreign(self._in)
            if foreign is NEED_DATA:
                return False
            self._sniffing = False
            if foreign is not None:
                # Not SMTP: no reply would be understood; close at once.
                self._events.append(Close(f"foreign protocol {foreign}"))
                self.phase = Phase.CLOSED
                self._in = b""
                return True
        buf, pos = self._in, self._pos
        nl = buf.find(b"\n", pos)
        limit = self.config.max_line_length
        if nl < 0:
            if pos:
                buf = self._in = buf[pos:]
                self._pos = 0
            if len(buf) > limit:
                # §4.5.3.1.4: too long; skip to the end of the line, then 500.
                self._discarding_line = True
                self._in = b""
            return False
        line = buf[pos:nl]
        self._pos = nl + 1
        if self._discarding_line:
            self._discarding_line = False
            self._reply(R.LINE_TOO_LONG, "")
        elif len(line) + 1 > limit:
            self._reply(R.LINE_TOO_LONG, "")
        else:
            if line.endswith(b"\r"):
                line = line[:-1]
            self._command(line)
        if self.phase is not Phase.COMMAND or self._pos == len(self._in):
            self._in = self._in[self._pos:]
            self._pos = 0
        return True

    def _command(self, line: bytes) -> None:
        sp = line.find(b" ")
        if sp < 0:
            verb_b, arg_b = line, b""
        else:
            verb_b, arg_b = line[:sp], line[sp + 1:]
        # The verb is matched as bytes: ASCII case folding only (str.upper
        # would make "MAIL" of some non-ASCII spellings).
        entry = _VERBS.get(verb_b.upper())
        if entry is None:
            self._reply(R.EMPTY_COMMAND if not line.strip() else R.UNKNOWN_COMMAND, "")
            return
        verb, handler = entry
        try:
            arg = arg_b.decode("utf-8")
        except UnicodeDecodeError:
            self._reply(R.BAD_ENCODING, verb)
            return
        handler(self, arg.strip(" "), verb)

    # --- Commands -------------------------------------------------------

    def _build_ehlo_lines(self) -> tuple[str, ...]:
        ext = [
            f"SIZE {self.config.max_message_size}",
            "PIPELINING",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
            "CHUNKING",
        ]
        if self.config.tls_available and not self.tls:
            ext.append("STARTTLS")
        if self._auth_offered():
            ext.append("AUTH " + " ".join(self.config.auth_mechanisms))
        return tuple(ext)

    def _auth_offered(self) -> bool:
        return bool(self.config.auth_mechanisms) and (
            self.tls or self.config.allow_insecure_auth)

    def _cmd_helo(self, arg: str, verb: str) -> None:
        esmtp = verb == "EHLO"
        if not arg or not arg.isprintable():
            return self._reply(R.HELO_SYNTAX, verb)
        # RFC 5321 §4.1.1.1 asks for a domain or an address literal, but
        # real clients send names with underscores or several words; like
        # Postfix, accept any printable text (it only names the client in
        # the Received header, next to the address we saw ourselves).
        self.helo = arg
        self.esmtp = esmtp
        self._reset_transaction(verb)  # §4.1.4: HELO/EHLO resets like RSET
        # The echoed name is a courtesy: cut it so that the line fits.
        greeting = _fit_reply_text(f"{self.config.hostname} greets {arg}")
        if esmtp:
            lines = (greeting,) + self._ehlo_reply
            self._reply(Reply(250, None, lines), verb)
        else:
            self._reply(R.reply(250, None, greeting), verb)

    def _cmd_mail(self, arg: str, verb: str) -> None:
        if self.helo is None:
            return self._reply(R.NEED_HELO, verb)
        if self.config.require_tls and not self.tls:
            return self._reply(R.TLS_REQUIRED, verb)
        if self.config.submission and self.authenticated is None:
            return self._reply(R.AUTH_REQUIRED, verb)  # RFC 6409 §4.3
        if self.transaction is not None:
            return self._reply(R.MAIL_DURING_BDAT if self.transaction.via_bdat
                               else R.NESTED_MAIL, verb)
        if arg[:5].upper() != "FROM:":
            return self._reply(R.MAIL_SYNTAX, verb)
        text = arg[5:].lstrip(" ")
        try:
            path, rest = parse_path(text, utf8=True, allow_null=True)
        except AddressError:
            return self._reply(R.BAD_SENDER if text.startswith("<") else R.MAIL_SYNTAX, verb)
        if rest and not rest.startswith(" "):
            return self._reply(R.MAIL_SYNTAX, verb)
        txn = Transaction(path)
        if rest.strip(" "):
            if not self.esmtp:
                return self._reply(R.UNKNOWN_PARAM, verb)
            err = self._mail_params(txn, rest)
            if err is not None:
                return self._reply(err, verb)
        if not path.is_ascii and not txn.smtputf8:
            return self._reply(R.UTF8_NOT_REQUESTED, verb)
        if self.config.check_sender is not None:
            refusal = self.config.check_sender(path, self.authenticated)
            if refusal is not None:
                return self._reply(refusal, verb)
        txn.auth_user = self.authenticated
        self.transaction = txn
        self._reply(R.SENDER_OK, verb)

    def _mail_params(self, txn: Transaction, text: str) -> Reply | None:
        try:
            params = parse_params(text)
        except KeyError:
            return R.DUPLICATE_PARAM
        except ValueError:
            return R.BAD_PARAM
        for key, value in params.items():
            if key == "SIZE":  # RFC 1870
                if value is None or not value.isdigit() or not value.isascii():
                    return R.BAD_SIZE_PARAM
                txn.declared_size = _octets(value)
                if txn.declared_size > self.config.max_message_size:
                    return R.reply(552, "5.3.4", "Message size exceeds fixed maximum"
                                   f" message size ({self.config.max_message_size})")
            elif key == "BODY":  # RFC 6152
                body = (value or "").upper()
                if body not in ("7BIT", "8BITMIME"):
                    return R.BAD_BODY
                txn.body = body
            elif key == "AUTH" and self.config.auth_mechanisms:
                # RFC 4954 §5: the original submitter, as xtext.  Accepted
                # and not trusted: we record who authenticated ourselves.
                if value is None:
                    return R.BAD_PARAM
            elif key == "SMTPUTF8":  # RFC 6531 §3.4
                if value is not None:
                    return R.BAD_PARAM
                txn.smtputf8 = True
            else:
                return R.UNKNOWN_PARAM
        return None

    def _cmd_rcpt(self, arg: str, verb: str) -> None:
        txn = self.transaction
        if txn is None:
            return self._reply(R.NEED_MAIL if self.helo else R.NEED_HELO, verb)
        if txn.via_bdat:
            return self._reply(R.MAIL_DURING_BDAT, verb)
        if arg[:3].upper() != "TO:":
            return self._reply(R.RCPT_SYNTAX, verb)
        text = arg[3:].lstrip(" ")
        if text.startswith("<>"):
            return self._reply(R.NULL_RCPT, verb)
        try:
            path, rest = parse_path(text, utf8=True, allow_postmaster=True)
        except AddressError:
            return self._reply(R.BAD_RCPT if text.startswith("<") else R.RCPT_SYNTAX, verb)
        if rest and not rest.startswith(" "):
            return self._reply(R.RCPT_SYNTAX, verb)
        if rest.strip(" "):
            # No RCPT parameters are supported (DSN's NOTIFY/ORCPT are not).
            try:
                parse_params(rest)
            except (KeyError, ValueError):
                return self._reply(R.BAD_PARAM, verb)
            return self._reply(R.UNKNOWN_PARAM, verb)
        if not path.is_ascii and not txn.smtputf8:
            return self._reply(R.UTF8_NOT_REQUESTED, verb)
        if len(txn.recipients) >= self.config.max_recipients:
            return self._reply(R.TOO_MANY_RCPTS, verb)
        check = self.config.check_recipient
        if check is not None:
            refusal = check(path, txn)
            if refusal is not None:
                return self._reply(refusal, verb)
        txn.recipients.append(path)
        self._reply(R.RCPT_OK, verb)

    def _cmd_data(self, arg: str, verb: str) -> None:
        if arg:
            return self._reply(R.NO_ARGS, verb)
        txn = self.transaction
        if txn is None:
            return self._reply(R.NEED_MAIL if self.helo else R.NEED_HELO, verb)
        if txn.via_bdat:
            return self._reply(R.DATA_AFTER_BDAT, verb)
        if not txn.recipients:
            return self._reply(R.NO_VALID_RCPT, verb)
        self._reply(R.START_DATA, verb)
        self._events.append(MessageBegin(txn))
        self._data = DataDecoder()
        self.phase = Phase.DATA
        self.content_phases += 1

    def _cmd_bdat(self, arg: str, verb: str) -> None:
        words = arg.split()
        if not 1 <= len(words) <= 2 or not words[0].isdigit() or not words[0].isascii() \
                or (len(words) == 2 and words[1].upper() != "LAST"):
            # The chunk size is unknown, so the chunk cannot be skipped; its
            # bytes will be read as commands and fail as such.
            return self._reply(R.BDAT_SYNTAX, verb)
        size = _octets(words[0])
        last = len(words) == 2
        txn = self.transaction
        refusal: Reply | None = None
        if txn is None:
            refusal = R.NEED_MAIL if self.helo else R.NEED_HELO
        elif not txn.recipients:
            refusal = R.NO_VALID_RCPT
        # RFC 3030 §2: the chunk is read even when the command fails.
        self._bdat_left = size
        self._bdat_last = last
        self._bdat_verb_reply = refusal
        self.phase = Phase.BDAT
        self.content_phases += 1
        if refusal is not None or txn is None:
            self._bdat_discard = True
            return
        self._bdat_discard = txn.too_big
        if not txn.via_bdat:
            txn.via_bdat = True
            self._events.append(MessageBegin(txn))

    def _cmd_rset(self, arg: str, verb: str) -> None:
        if arg:
            return self._reply(R.NO_ARGS, verb)
        self._reset_transaction(verb)
        self._reply(R.OK, verb)

    def _cmd_noop(self, arg: str, verb: str) -> None:
        self._reply(R.OK, verb)  # §4.1.1.9: a parameter may be given

    def _cmd_quit(self, arg: str, verb: str) -> None:
        if arg:
            return self._reply(R.NO_ARGS, verb)
        self._reset_transaction(verb)
        self._reply(R.reply(221, "2.0.0", f"{self.config.hostname} closing connection"), verb)
        self._events.append(Close("QUIT"))
        self.phase = Phase.CLOSED
        self._in = b""

    def _cmd_vrfy(self, arg: str, verb: str) -> None:
        if not arg:
            return self._reply(R.VRFY_SYNTAX, verb)
        if self.config.vrfy is not None:
            return self._reply(self.config.vrfy(arg, self.authenticated), verb)
        self._reply(R.VRFY_CANNOT, verb)  # §3.5.3: 252 without disclosure

    def _cmd_expn(self, arg: str, verb: str) -> None:
        if not arg:
            return self._reply(R.EXPN_SYNTAX, verb)
        self._reply(R.NOT_IMPLEMENTED, verb)

    def _cmd_help(self, arg: str, verb: str) -> None:
        topic = arg.upper()
        text = HELP_TEXT.get(topic) if topic else self._help_summary()
        if text is None:
            # Echo the topic only if harmless: a raw CR or escape sequence
            # from the client must not reach its screen as our reply.
            shown = arg[:32] if arg.isascii() and arg.isprintable() else "?"
            return self._reply(R.reply(504, "5.5.1", f"HELP topic unknown: {shown}"), verb)
        self._reply(Reply(214, "2.0.0", text), verb)

    def _cmd_starttls(self, arg: str, verb: str) -> None:
        if arg:
            return self._reply(R.NO_ARGS, verb)
        if self.tls:
            return self._reply(R.TLS_ALREADY, verb)
        if not self.config.tls_available:
            return self._reply(R.TLS_UNAVAILABLE, verb)
        self._reset_transaction(verb)
        self._reply(R.START_TLS, verb)
        self._events.append(StartTLS())
        # RFC 3207 §6: whatever the client sent after STARTTLS in plaintext
        # is thrown away, never executed.
        self._in = b""
        self.phase = Phase.WAIT

    def _help_summary(self) -> tuple[str, ...]:
        """What this session can use now: commands, then extensions."""
        commands = ["HELO", "EHLO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP",
                    "QUIT", "VRFY", "HELP"]
        if self.config.tls_available and not self.tls:
            commands.append("STARTTLS")
        if self._auth_offered() and self.authenticated is None:
            commands.append("AUTH")
        extensions = " ".join(line.split(" ", 1)[0] for line in self._ehlo_reply)
        return (f"Commands: {' '.join(commands)}", f"Extensions: {extensions}",
                "Use HELP <command> for details")

    def _cmd_auth(self, arg: str, verb: str) -> None:
        if not self.config.auth_mechanisms:
            return self._reply(R.NOT_IMPLEMENTED, verb)
        if self.helo is None or not self.esmtp:
            return self._reply(R.AUTH_NEED_EHLO, verb)  # an ESMTP extension
        if not self._auth_offered():
            return self._reply(R.AUTH_NEEDS_TLS, verb)
        if self.authenticated is not None:
            return self._reply(R.AUTH_ALREADY, verb)  # RFC 4954 §4
        if self.transaction is not None:
            return self._reply(R.AUTH_IN_TRANSACTION, verb)  # RFC 4954 §4
        refusal = self.auth_gate() if self.auth_gate is not None else None
        if refusal is not None:
            return self._reply(refusal, verb)
        words = arg.split(" ")
        if not arg or len(words) > 2:
            return self._reply(R.AUTH_SYNTAX, verb)
        name = words[0].upper()
        mechanism = sasl.new_mechanism(name) if name in self.config.auth_mechanisms else None
        if mechanism is None:
            return self._reply(R.AUTH_UNKNOWN_MECHANISM, verb)
        initial: bytes | None = None
        if len(words) == 2:
            # RFC 4954 §4: "=" is an empty initial response.
            initial = b"" if words[1] == "=" else _b64decode(words[1])
            if initial is None:
                return self._reply(R.AUTH_BAD_BASE64, verb)
        self._sasl = mechanism
        self._auth_step(mechanism.start(initial))

    # --- AUTH exchange (RFC 4954 §4) ------------------------------------

    def _step_auth(self) -> bool:
        buf = self._in
        nl = buf.find(b"\n")
        if nl < 0:
            if len(buf) > AUTH_LINE_MAX:
                # Too long: drop what came, skip to the end of the line.
                self._auth_overlong = True
                self._in = b""
            return False
        line = buf[:nl]
        self._in = buf[nl + 1:]
        if self._auth_overlong or nl + 1 > AUTH_LINE_MAX:
            self._auth_end()
            self._reply(R.AUTH_LINE_TOO_LONG, "AUTH")
            return True
        if line.endswith(b"\r"):
            line = line[:-1]
        if line == b"*":
            self._auth_end()
            self._reply(R.AUTH_CANCELLED, "AUTH")
            return True
        data = _b64decode(line.decode("ascii", "replace"))
        if data is None:
            self._auth_end()
            self._reply(R.AUTH_BAD_BASE64, "AUTH")
            return True
        success = self._sasl_success
        if success is not None:
            # The client acknowledges the server's final data with an
            # empty response (RFC 4954 §4, "additional data").
            if data:
                self._auth_fail(sasl.Failure("non-empty final response", malformed=True,
                                             username=success.username))
            else:
                self._auth_succeed(success)
            return True
        assert self._sasl is not None
        self._auth_step(self._sasl.respond(data))
        return True

    def _auth_step(self, step: sasl.Step) -> None:
        mechanism = self._sasl
        assert mechanism is not None
        if isinstance(step, sasl.Challenge):
            self.phase = Phase.AUTH
            self._reply(_challenge(step.data), "AUTH")
        elif isinstance(step, (sasl.CheckPassword, sasl.LookupScram)):
            self.phase = Phase.WAIT
            self._events.append(AuthCheck(step, mechanism.name))
        elif isinstance(step, sasl.Success):
            if step.data:
                self._sasl_success = step
                self.phase = Phase.AUTH
                self._reply(_challenge(step.data), "AUTH")
            else:
                self._auth_succeed(step)
        else:
            self._auth_fail(step)

    def _auth_succeed(self, step: sasl.Success) -> None:
        name = self._sasl.name if self._sasl is not None else ""
        self._auth_end()
        self.authenticated = step.username
        self._events.append(AuthResult(True, name, step.username))
        self._reply(R.AUTH_OK, "AUTH")

    def _auth_fail(self, step: sasl.Failure) -> None:
        name = self._sasl.name if self._sasl is not None else ""
        self._auth_end()
        self._events.append(AuthResult(False, name, step.username,
                                       credentials_failed=not step.malformed))
        self._reply(R.AUTH_MALFORMED if step.malformed else R.AUTH_FAILED, "AUTH")

    def _auth_end(self) -> None:
        self._sasl = None
        self._sasl_success = None
        self._auth_overlong = False
        self.phase = Phase.COMMAND

    # --- Message content ------------------------------------------------

    def _step_data(self) -> bool:
        decoder = self._data
        assert decoder is not None and self.transaction is not None
        if not self._in:
            return False
        data, self._in = self._in, b""
        txn = self.transaction
        limit = self.config.max_message_size
        for chunk in decoder.feed(data):
            if txn.too_big:
                continue
            txn.size += len(chunk)
            if txn.size > limit:
                txn.too_big = True
                self._events.append(MessageAbort("message too big"))
            else:
                self._events.append(MessageData(chunk))
        if not decoder.done:
            return True
        self._in = decoder.rest
        self._data = None
        txn.bare_eol = decoder.bare_eol
        self._finish_message(txn, "DATA")
        return True

    def _step_bdat(self) -> bool:
        if self._bdat_left and not self._in:
            return False
        take = min(self._bdat_left, len(self._in))
        chunk = self._in[:take]
        self._in = self._in[take:]
        self._bdat_left -= take
        txn = self.transaction
        if chunk and not self._bdat_discard and txn is not None:
            txn.size += len(chunk)
            if txn.size > self.config.max_message_size:
                txn.too_big = True
                self._bdat_discard = True
                self._events.append(MessageAbort("message too big"))
            else:
                self._events.append(MessageData(chunk))
        if self._bdat_left:
            return True
        # The whole chunk has been read: now the BDAT command gets its reply.
        self.phase = Phase.COMMAND
        if self._bdat_verb_reply is not None:
            self._reply(self._bdat_verb_reply, "BDAT")
            return True
        assert txn is not None
        if txn.too_big:
            # RFC 3030 §2: after a failed chunk the transaction is void.
            self.transaction = None
            self._reply(_size_exceeded(self.config.max_message_size), "BDAT")
            return True
        if self._bdat_last:
            self._finish_message(txn, "BDAT")
        else:
            self._reply(R.reply(250, "2.0.0", f"{txn.size} octets received"), "BDAT")
        return True

    def _finish_message(self, txn: Transaction, verb: str) -> None:
        self._complete_verb = verb
        if txn.too_big:
            self.transaction = None
            self.phase = Phase.COMMAND
            self._reply(_size_exceeded(self.config.max_message_size), verb)
            return
        self.phase = Phase.WAIT
        self._events.append(MessageComplete(txn))


def _b64decode(text: str) -> bytes | None:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def _challenge(data: bytes) -> Reply:
    # RFC 4954 §4: "334" SP base64; no enhanced status code on a challenge.
    return Reply(334, None, (base64.b64encode(data).decode("ascii"),))


# §4.5.3.1.5: a reply line is at most 512 octets, with its code, the
# separator after it and the CRLF (replies with no enhanced code).
REPLY_TEXT_MAX: Final = 512 - 4 - 2


def _fit_reply_text(text: str) -> str:
    """``text`` cut to the room of one reply line, never inside a character."""
    raw = text.encode("utf-8")
    if len(raw) <= REPLY_TEXT_MAX:
        return text
    return raw[:REPLY_TEXT_MAX].decode("utf-8", "ignore")


def _octets(digits: str) -> int:
    """The value of a string of ASCII digits (SIZE=, BDAT), capped at 10**20.

    int() refuses more than 4300 digits (a ValueError, our crash, from the
    peer's input); no limit is anywhere near 20 digits.
    """
    digits = digits.lstrip("0")
    if len(digits) > 20:
        return 10**20
    return int(digits or "0")


def _size_exceeded(limit: int) -> Reply:
    return R.reply(552, "5.3.4", f"Message size exceeds fixed maximum message size ({limit})")


# Signatures of other protocols, seen as the first bytes of a connection.
# A TLS record starts with content type 22 (handshake) and major version 3
# (RFC 8446 §5.1); an HTTP request starts with its method and a space
# (RFC 9110 §9).  SMTP commands never start like this.
_FOREIGN: Final = (
    (b"\x16\x03", "TLS"),
    (b"GET ", "HTTP"),
    (b"POST ", "HTTP"),
    (b"HEAD ", "HTTP"),
    (b"PUT ", "HTTP"),
    (b"OPTIONS ", "HTTP"),
    (b"CONNECT ", "HTTP"),
)


def sniff_foreign(data: bytes) -> str | None | NeedData:
    """Name the foreign protocol ``data`` starts with, None for none.

    NEED_DATA while ``data`` is too short to tell (a prefix of a signature).
    """
    if not data:
        return NEED_DATA
    undecided = False
    for signature, name in _FOREIGN:
        if data.startswith(signature):
            return name
        if len(data) < len(signature) and signature.startswith(data):
            undecided = True
    return NEED_DATA if undecided else None


_HANDLERS: Final[dict[str, Callable[[SMTPEngine, str, str], None]]] = {
    "HELO": SMTPEngine._cmd_helo,
    "EHLO": SMTPEngine._cmd_helo,
    "MAIL": SMTPEngine._cmd_mail,
    "RCPT": SMTPEngine._cmd_rcpt,
    "DATA": SMTPEngine._cmd_data,
    "BDAT": SMTPEngine._cmd_bdat,
    "RSET": SMTPEngine._cmd_rset,
    "NOOP": SMTPEngine._cmd_noop,
    "QUIT": SMTPEngine._cmd_quit,
    "VRFY": SMTPEngine._cmd_vrfy,
    "EXPN": SMTPEngine._cmd_expn,
    "HELP": SMTPEngine._cmd_help,
    "STARTTLS": SMTPEngine._cmd_starttls,
    "AUTH": SMTPEngine._cmd_auth,
}
_VERBS: Final = {verb.encode("ascii"): (verb, handler) for verb, handler in _HANDLERS.items()}
VERBS: Final = frozenset(_HANDLERS)  # the commands the engine knows
