"""Envelope addresses and parameters, by the RFC 5321 §4.1.2 grammar.

The regular expressions below are the ABNF of §4.1.2 and §4.1.3 written out
rule by rule (names kept), with the RFC 6531 §3.3 extensions for SMTPUTF8:
UTF-8 characters in atext, qtext and sub-domains.  Whether UTF-8 is allowed
in a given transaction is the caller's decision (``utf8``), because it
depends on the SMTPUTF8 parameter of MAIL.

Source routes (``<@a,@b:user@c>``) are accepted and dropped, as §4.1.1.3 and
appendix C ask.  Length limits are those of §4.5.3.1.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

# §4.5.3.1.1 - 4.5.3.1.3
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256

# RFC 6531 §3.3 UTF8-non-ascii; surrogates (from undecodable bytes) excluded.
_U = "\u0080-\ud7ff\ue000-\U0010ffff"

_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~"
_LET_DIG = "A-Za-z0-9"


def _grammar(utf8: bool) -> tuple[re.Pattern[str], re.Pattern[str]]:
    u = _U if utf8 else ""
    atom = f"[{_ATEXT}{u}]+"
    dot_string = rf"{atom}(?:\.{atom})*"
    # qtextSMTP = %d32-33 / %d35-91 / %d93-126; quoted-pairSMTP = "\" %d32-126
    qcontent = rf'(?:[\x20\x21\x23-\x5b\x5d-\x7e{u}]|\\[\x20-\x7e])'
    quoted_string = f'"{qcontent}*"'
    local_part = f"(?:{dot_string}|{quoted_string})"
    # sub-domain = Let-dig [Ldh-str]; Ldh-str = *( ALPHA / DIGIT / "-" ) Let-dig
    sub_domain = f"[{_LET_DIG}{u}](?:[{_LET_DIG}{u}\\-]*[{_LET_DIG}{u}])?"
    domain = rf"{sub_domain}(?:\.{sub_domain})*"
    # address-literal: IPv4, "IPv6:" + address, or Standardized-tag ":" dcontent
    address_literal = r"\[[\x21-\x5a\x5e-\x7e]+\]"
    at_domain = f"@{domain}"
    adl = f"{at_domain}(?:,{at_domain})*"
    path = (
        f"<(?:{adl}:)?"
        f"(?P<local>{local_part})@(?P<domain>{domain}|{address_literal})>"
    )
    return re.compile(path), re.compile(domain)


_PATH_ASCII, _DOMAIN_ASCII = _grammar(False)
_PATH_UTF8, _DOMAIN_UTF8 = _grammar(True)
_POSTMASTER = re.compile(r"<postmaster>", re.IGNORECASE)
_LDH_TAG = re.compile(f"[{_LET_DIG}](?:[{_LET_DIG}\\-]*[{_LET_DIG}])?")
# esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-")
# esmtp-value = 1*(%d33-60 / %d62-126), widened by RFC 6531 to UTF-8.
_PARAM = re.compile(f"(?P<key>[A-Za-z0-9][A-Za-z0-9\\-]*)(?:=(?P<value>[\\x21-\\x3c\\x3e-\\x7e{_U}]+))?")


class AddressError(ValueError):
    """The text is not a path by the grammar (or breaks a length limit)."""


@dataclass(frozen=True, slots=True)
class Address:
    """A mailbox of the envelope. ``domain`` is empty only for <postmaster>."""

    local_part: str
    domain: str

    def __str__(self) -> str:
        return f"{self.local_part}@{self.domain}" if self.domain else self.local_part

    @property
    def is_ascii(self) -> bool:
        return self.local_part.isascii() and self.domain.isascii()


NULL_PATH = Address("", "")


def _check_literal(literal: str) -> None:
    inner = literal[1:-1]
    if inner[:5].lower() == "ipv6:":
        # ipaddress also takes a "%zone" suffix, which RFC 5321's IPv6-addr
        # does not have.
        if "%" in inner:
            raise AddressError("bad IPv6 address literal")
        try:
            ipaddress.IPv6Address(inner[5:])
        except ValueError:
            raise AddressError("bad IPv6 address literal") from None
        return
    if ":" in inner:
        # General-address-literal = Standardized-tag ":" 1*dcontent
        tag, _, content = inner.partition(":")
        if not _LDH_TAG.fullmatch(tag) or not content:
            raise AddressError("bad general address literal")
        return
    try:
        ipaddress.IPv4Address(inner)
    except ValueError:
        raise AddressError("bad IPv4 address literal") from None


def parse_path(text: str, *, utf8: bool = False, allow_null: bool = False,
               allow_postmaster: bool = False) -> tuple[Address, str]:
    """Parse a path at the start of ``text``; return it and the rest.

    The rest is whatever follows the closing ``>`` (the parameters).
    """
    if allow_null and text.startswith("<>"):
        return NULL_PATH, text[2:]
    if allow_postmaster:
        m = _POSTMASTER.match(text)
        if m:
            return Address(text[1:m.end() - 1], ""), text[m.end():]
    m = (_PATH_UTF8 if utf8 else _PATH_ASCII).match(text)
    if m is None:
        raise AddressError("not a path")
    local, domain = m.group("local", "domain")
    if domain[0] == "[":
        _check_literal(domain)
    # The limits are in octets.
    local_len = len(local) if local.isascii() else len(local.encode())
    domain_len = len(domain) if domain.isascii() else len(domain.encode())
    if local_len > MAX_LOCAL_PART:
        raise AddressError("local part too long")
    if domain_len > MAX_DOMAIN:
        raise AddressError("domain too long")
    # "<" local "@" domain ">" (a source route is not counted).
    if local_len + domain_len + 3 > MAX_PATH:
        raise AddressError("path too long")
    return Address(local, domain), text[m.end():]


def is_domain(text: str, *, utf8: bool = True) -> bool:
    """True for a Domain or an address literal (the argument of EHLO)."""
    if text.startswith("[") and text.endswith("]"):
        try:
            _check_literal(text)
        except AddressError:
            return False
        return True
    pattern = _DOMAIN_UTF8 if utf8 else _DOMAIN_ASCII
    return len(text) <= MAX_DOMAIN and pattern.fullmatch(text) is not None


def parse_params(text: str) -> dict[str, str | None]:
    """Parse ``SP esmtp-param *(SP esmtp-param)``; keywords upper-cased.

    Raises KeyError (carrying the keyword) for a duplicate and ValueError for
    bad syntax, so that the caller can give each its own reply.
    """
    params: dict[str, str | None] = {}
    for word in text.split(" "):
        if not word:
            continue  # extra spaces are tolerated, as by most servers
        m = _PARAM.fullmatch(word)
        if m is None:
            raise ValueError(word)
        key = m.group("key").upper()
        if key in params:
            raise KeyError(key)
        params[key] = m.group("value")
    return params


def unquote_local(local: str) -> str:
    """The local part without quoting: ``"john.doe"`` and ``john.doe`` name
    the same mailbox (RFC 5321 §4.1.2, quoted-pairSMTP undone)."""
    if len(local) >= 2 and local[0] == '"' and local[-1] == '"':
        inner, out, i = local[1:-1], [], 0
        while i < len(inner):
            if inner[i] == "\\" and i + 1 < len(inner):
                i += 1
            out.append(inner[i])
            i += 1
        return "".join(out)
    return local
