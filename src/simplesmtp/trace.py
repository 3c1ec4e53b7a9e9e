"""Trace headers (RFC 5321 §4.4) and queue ids."""

from __future__ import annotations

import email.utils
import functools
import itertools
import re
import time

from .address import MAX_DOMAIN, Address, is_domain

_counter = itertools.count()
# The counter part of queue ids (3 hex digits) this process may use: all of
# it, or with --workers N one Nth each, so that forked workers, which start
# with the same counter, never make the same id in the same microsecond.
_suffix_first, _suffix_span = 0, 0x1000
# A HELO name fit to stand as it is in the from clause: no space, comment
# or quoting character, brackets only around an address literal.  (A general
# address literal, RFC 5321 §4.1.3, may hold parentheses.)
_PLAIN_NAME = re.compile(r"[^\s()\\\[\]]+|\[[^\s()\\\[\]]+\]")


def new_queue_id() -> str:
    """A short id, unique within this host: microseconds and a counter.

    It names the message in the 250 reply, the log, the Received header
    and the Maildir file name, so one grep finds all four.
    """
    suffix = _suffix_first + next(_counter) % _suffix_span
    return f"{time.time_ns() // 1000:013X}{suffix:03X}"


def set_worker(index: int, count: int) -> None:
    """Give worker ``index`` of ``count`` its own share of queue id suffixes."""
    global _suffix_first, _suffix_span
    _suffix_span = 0x1000 // count
    _suffix_first = index * _suffix_span


def _address_literal(ip: str) -> str:
    return f"[IPv6:{ip}]" if ":" in ip else f"[{ip}]"


def protocol_name(*, esmtp: bool, tls: bool, auth: bool, utf8: bool) -> str:
    """The ``with`` keyword: RFC 3848 (ESMTP, ESMTPS, ESMTPA, ESMTPSA) and
    RFC 6531 §3.7.3 (UTF8SMTP, UTF8SMTPS, ...)."""
    if not esmtp:
        return "SMTP"
    name = "UTF8SMTP" if utf8 else "ESMTP"
    if tls:
        name += "S"
    if auth:
        name += "A"
    return name


def path_text(address: Address) -> str:
    return f"<{address}>"


@functools.lru_cache(maxsize=1024)
def _from_clause(helo: str | None, peer_ip: str) -> str:
    """``Extended-Domain`` of RFC 5321 §4.4: the name the client gave, then
    the address we saw in the TCP-info comment.

    The engine takes any printable HELO text (as Postfix does), but only a
    Domain or an address literal may stand here.  Anything else, copied
    verbatim, could shape the trace: ``good.example ([192.0.2.1])`` would
    put a forged client address first, ``x) (y`` would unbalance the
    comments.  Such a client is named by its address, and what it said is
    kept inside the comment, quoted (RFC 5322 §3.2.2) and bounded.
    """
    literal = _address_literal(peer_ip)
    if helo is None:
        return f"unknown ({literal})"
    if is_domain(helo) and _PLAIN_NAME.fullmatch(helo):
        return f"{helo} ({literal})"
    said = helo[:MAX_DOMAIN]
    said = "".join(ch if " " <= ch <= "~" else "?" for ch in said)
    said = said.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
    return f"{literal} ({literal} helo={said})"


# The date of the Received field changes once a second; formatting it takes
# longer than the rest of the trace headers, so it is made once per second.
_date_second = -1
_date_text = ""


def received_date(now: float | None = None) -> str:
    """RFC 5322 date-time of ``now`` (default: this second) in local time."""
    global _date_second, _date_text
    if now is not None:
        return email.utils.formatdate(now, localtime=True)
    second = int(time.time())
    if second != _date_second:
        _date_text = email.utils.formatdate(second, localtime=True)
        _date_second = second
    return _date_text


def trace_headers(*, mail_from: Address, recipients: list[Address], helo: str | None,
                  peer_ip: str, hostname: str, protocol: str, queue_id: str,
                  tls_info: str | None = None, now: float | None = None) -> bytes:
    """``Return-Path`` and ``Received`` for the top of a stored message."""
    received = f"Received: from {_from_clause(helo, peer_ip)}\r\n" \
               f"\tby {hostname} (simplesmtp) with {protocol}"
    if tls_info:
        received += f"\r\n\t({tls_info})"
    received += f"\r\n\tid {queue_id}"
    if len(recipients) == 1:
        received += f"\r\n\tfor {path_text(recipients[0])}"
    received += f";\r\n\t{received_date(now)}\r\n"
    return f"Return-Path: {path_text(mail_from)}\r\n{received}".encode()
