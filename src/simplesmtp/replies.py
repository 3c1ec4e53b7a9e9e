"""SMTP replies: one type for every answer the server gives.

A reply is a basic code (RFC 5321 §4.2), an optional enhanced status code
(RFC 3463, advertised by ENHANCEDSTATUSCODES, RFC 2034) and one or more lines
of text.  The engine builds replies; the transport only encodes and writes
them.

RFC 2034 §3: enhanced codes go on every reply of a session that has said
EHLO, except the greeting and the EHLO/HELO reply itself.  ``encode`` takes
that decision from its argument, so one reply object serves both kinds of
session.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    enhanced: str | None
    lines: tuple[str, ...]
    # Encoded forms, computed on first use and kept: most replies are module
    # constants; a reply made for one message is encoded once, in one form.
    _plain: bytes | None = field(default=None, init=False, repr=False, compare=False)
    _extended: bytes | None = field(default=None, init=False, repr=False, compare=False)

    def _encode(self, with_enhanced: bool) -> bytes:
        prefix = f"{self.enhanced} " if with_enhanced and self.enhanced else ""
        if len(self.lines) == 1:
            return f"{self.code} {prefix}{self.lines[0]}\r\n".encode()
        out = []
        last = len(self.lines) - 1
        for i, line in enumerate(self.lines):
            sep = " " if i == last else "-"
            out.append(f"{self.code}{sep}{prefix}{line}\r\n")
        return "".join(out).encode("utf-8")

    def encode(self, with_enhanced: bool) -> bytes:
        if with_enhanced:
            data = self._extended
            if data is None:
                data = self._encode(True)
                object.__setattr__(self, "_extended", data)
            return data
        data = self._plain
        if data is None:
            data = self._encode(False)
            object.__setattr__(self, "_plain", data)
        return data

    @property
    def is_error(self) -> bool:
        return self.code >= 400

    @property
    def text(self) -> str:
        return " ".join(self.lines)

    def __str__(self) -> str:
        return self.encode(True).decode("utf-8", "replace").rstrip("\r\n")


def reply(code: int, enhanced: str | None, *lines: str) -> Reply:
    return Reply(code, enhanced, lines or ("",))


# --- The replies the engine uses, grouped by the RFC 3463 class they report.
# Success
OK = reply(250, "2.0.0", "Ok")
BYE = reply(221, "2.0.0", "Bye")
SENDER_OK = reply(250, "2.1.0", "Sender ok")
RCPT_OK = reply(250, "2.1.5", "Recipient ok")
START_DATA = reply(354, None, "End data with <CR><LF>.<CR><LF>")
START_TLS = reply(220, "2.0.0", "Ready to start TLS")
VRFY_CANNOT = reply(
    252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery"
)

# 5.5.1 invalid command / bad sequence
UNKNOWN_COMMAND = reply(500, "5.5.1", "Command unrecognized")
NOT_IMPLEMENTED = reply(502, "5.5.1", "Command not implemented")
NEED_HELO = reply(503, "5.5.1", "Send HELO/EHLO first")
NESTED_MAIL = reply(503, "5.5.1", "Sender already specified")
NEED_MAIL = reply(503, "5.5.1", "Need MAIL command first")
NEED_RCPT = reply(503, "5.5.1", "Need RCPT command first")
NO_VALID_RCPT = reply(554, "5.5.1", "No valid recipients")
DATA_AFTER_BDAT = reply(503, "5.5.1", "DATA not allowed after BDAT in one transaction")
MAIL_DURING_BDAT = reply(503, "5.5.1", "Command not allowed during a BDAT transfer")
TLS_ALREADY = reply(503, "5.5.1", "TLS already active")
TLS_UNAVAILABLE = reply(502, "5.5.1", "STARTTLS not available")
# RFC 3207 §4: the reply for commands refused until TLS is on.
TLS_REQUIRED = reply(530, "5.7.0", "Must issue a STARTTLS command first")

# 5.5.2 syntax
LINE_TOO_LONG = reply(500, "5.5.2", "Line too long")
EMPTY_COMMAND = reply(500, "5.5.2", "Empty command")
BAD_ENCODING = reply(501, "5.5.2", "Arguments are not valid UTF-8")  # §4.2.2: 501 for arguments
HELO_SYNTAX = reply(501, "5.5.2", "Syntax: HELO/EHLO domain")
MAIL_SYNTAX = reply(501, "5.5.2", "Syntax: MAIL FROM:<address> [parameters]")
RCPT_SYNTAX = reply(501, "5.5.2", "Syntax: RCPT TO:<address> [parameters]")
NO_ARGS = reply(501, "5.5.4", "No arguments allowed")
VRFY_SYNTAX = reply(501, "5.5.2", "Syntax: VRFY address")
EXPN_SYNTAX = reply(501, "5.5.2", "Syntax: EXPN list")
BDAT_SYNTAX = reply(501, "5.5.4", "Syntax: BDAT size [LAST]")
BAD_SENDER = reply(501, "5.1.7", "Bad sender address syntax")
BAD_RCPT = reply(501, "5.1.3", "Bad recipient address syntax")
NULL_RCPT = reply(501, "5.1.3", "Null recipient not allowed")
UTF8_NOT_REQUESTED = reply(
    553, "5.6.7", "Non-ASCII address needs the SMTPUTF8 parameter"
)

# 5.5.4 parameters
BAD_PARAM = reply(501, "5.5.4", "Invalid parameter syntax")
DUPLICATE_PARAM = reply(501, "5.5.4", "Duplicate parameter")
UNKNOWN_PARAM = reply(555, "5.5.4", "Unsupported parameter")
BAD_BODY = reply(501, "5.5.4", "BODY must be 7BIT or 8BITMIME")
BAD_SIZE_PARAM = reply(501, "5.5.4", "SIZE must be a number of octets")

# Size (RFC 1870) and recipients (RFC 5321 §4.5.3.1.8)
TOO_MANY_RCPTS = reply(452, "4.5.3", "Too many recipients")

# Temporary local trouble
STORAGE_FAILED = reply(451, "4.3.0", "Local error in processing, try again later")
STORAGE_FULL = reply(452, "4.3.1", "Insufficient system storage, try again later")
INTERNAL_ERROR = reply(451, "4.3.0", "Internal error, try again later")
TIMEOUT = reply(421, "4.4.2", "Timeout, closing connection")
SHUTTING_DOWN = reply(421, "4.3.2", "Service shutting down, closing connection")

# Policy limits (issue 6, docs/security.md): X.7.0 "other security event".
TOO_MANY_ERRORS = reply(421, "4.7.0", "Too many errors, closing connection")
TOO_MANY_CONNECTIONS = reply(421, "4.7.0", "Too many connections, try again later")
TOO_MANY_FROM_IP = reply(
    421, "4.7.0", "Too many connections from your address, try again later"
)

# AUTH (RFC 4954 §4, §6) and submission (RFC 6409)
AUTH_OK = reply(235, "2.7.0", "Authentication successful")
AUTH_NEED_EHLO = reply(503, "5.5.1", "Send EHLO first")
AUTH_ALREADY = reply(503, "5.5.1", "Already authenticated")
AUTH_IN_TRANSACTION = reply(503, "5.5.1", "AUTH not permitted during a mail transaction")
AUTH_SYNTAX = reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
AUTH_UNKNOWN_MECHANISM = reply(504, "5.5.4", "Unrecognized authentication type")
AUTH_BAD_BASE64 = reply(501, "5.5.2", "Invalid base64 data")
AUTH_MALFORMED = reply(501, "5.5.2", "Malformed authentication response")
AUTH_CANCELLED = reply(501, "5.0.0", "Authentication cancelled")
AUTH_LINE_TOO_LONG = reply(500, "5.5.6", "Authentication exchange line is too long")
AUTH_FAILED = reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_NEEDS_TLS = reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
AUTH_LOCKED = reply(454, "4.7.0", "Temporary authentication failure, try again later")
AUTH_REQUIRED = reply(530, "5.7.0", "Authentication required")
