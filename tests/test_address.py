"""Envelope paths and parameters by the RFC 5321 §4.1.2 / §4.1.3 grammar."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simplesmtp.address import (
    MAX_DOMAIN,
    MAX_LOCAL_PART,
    MAX_PATH,
    NULL_PATH,
    Address,
    AddressError,
    is_domain,
    parse_params,
    parse_path,
)


def parts(text: str, **kw: bool) -> tuple[str, str, str]:
    addr, rest = parse_path(text, **kw)
    return addr.local_part, addr.domain, rest


# --- Valid paths --------------------------------------------------------------


@pytest.mark.parametrize("text, local, domain", [
    ("<a@b>", "a", "b"),
    ("<user@example.com>", "user", "example.com"),
    ("<First.Last@Sub.Example.COM>", "First.Last", "Sub.Example.COM"),  # case kept
    ("<!#$%&'*+-/=?^_`{|}~@x.y>", "!#$%&'*+-/=?^_`{|}~", "x.y"),  # all of atext
    ("<a-b@1-2.x9>", "a-b", "1-2.x9"),
    ("<a@123.example>", "a", "123.example"),  # sub-domains may start with a digit
    # Quoted local parts (§4.1.2 Quoted-string), escapes kept as written.
    ('<"a b"@x>', '"a b"', "x"),
    ('<"a\\"b"@x>', '"a\\"b"', "x"),
    ('<"a\\\\b"@x>', '"a\\\\b"', "x"),
    ('<"a@b"@x>', '"a@b"', "x"),
    ('<""@x>', '""', "x"),
    ('<"<>,;:"@x>', '"<>,;:"', "x"),
    ('<"\\ \\~"@x>', '"\\ \\~"', "x"),
    # Address literals (§4.1.3).
    ("<a@[127.0.0.1]>", "a", "[127.0.0.1]"),
    ("<a@[255.255.255.255]>", "a", "[255.255.255.255]"),
    ("<a@[IPv6:::1]>", "a", "[IPv6:::1]"),
    ("<a@[ipv6:2001:DB8::1]>", "a", "[ipv6:2001:DB8::1]"),
    ("<a@[IPv6:2001:db8:0:0:0:0:0:1]>", "a", "[IPv6:2001:db8:0:0:0:0:0:1]"),
    ("<a@[IPv6:::ffff:192.0.2.1]>", "a", "[IPv6:::ffff:192.0.2.1]"),
    ("<a@[x-tag:any.content!]>", "a", "[x-tag:any.content!]"),
    # Source routes are accepted and dropped (§4.1.1.3, appendix C).
    ("<@relay.example:u@x>", "u", "x"),
    ("<@r1.example,@r2.example:u@x>", "u", "x"),
])
def test_valid_paths(text: str, local: str, domain: str) -> None:
    assert parts(text) == (local, domain, "")
    assert parts(text, utf8=True) == (local, domain, "")


def test_rest_is_returned() -> None:
    assert parts("<a@b> SIZE=10 BODY=7BIT") == ("a", "b", " SIZE=10 BODY=7BIT")
    assert parts("<a@b>x") == ("a", "b", "x")  # the caller checks the rest
    assert parse_path("<> SIZE=1", allow_null=True) == (NULL_PATH, " SIZE=1")


def test_null_path_only_where_allowed() -> None:
    assert parse_path("<>", allow_null=True) == (NULL_PATH, "")
    assert NULL_PATH.local_part == NULL_PATH.domain == ""
    with pytest.raises(AddressError):
        parse_path("<>")


@pytest.mark.parametrize("text", ["<postmaster>", "<Postmaster>", "<POSTMASTER>",
                                  "<pOsTmAsTeR>"])
def test_postmaster_without_domain(text: str) -> None:
    # §4.5.1: <postmaster> (any case) must be accepted as a recipient.
    addr, rest = parse_path(text, allow_postmaster=True)
    assert (addr.local_part.lower(), addr.domain, rest) == ("postmaster", "", "")
    assert str(addr) == text[1:-1]
    with pytest.raises(AddressError):
        parse_path(text)  # not on MAIL: a reverse-path needs a domain


def test_postmaster_with_domain_is_an_ordinary_address() -> None:
    assert parts("<postmaster@x.y>", allow_postmaster=True) == ("postmaster", "x.y", "")
    with pytest.raises(AddressError):
        parse_path("<postmasterx>", allow_postmaster=True)


# --- Invalid paths -------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "", "<", ">", "a@b", "a@b>", "<a@b", "<<a@b>>", " <a@b>",
    "<a>", "<a@>", "<@b>", "<a@@b>", "<a b@c>", "<a@b c>", "<a@b,c>",
    "<a..b@c>", "<.a@c>", "<a.@c>", "<a@.c>", "<a@c.>", "<a@c..d>",
    "<a@-c>", "<a@c->", "<a@c_d>", "<a@c/d>",
    '<"a@c>', '<a"@c>', '<"a"b"@c>', '<"a\\"@c>', '<"a"."b"@c>', '<"a\x01"@c>',
    '<"a\x7f"@c>', '<"\\\x01"@c>', "<a\x00@c>", "<a@c\x00>",
    "<@:a@c>", "<@r:@s:a@c>", "<@[10.0.0.1]:a@c>", "<@r,a@c>", "<@r;@s:a@c>", "<r:a@c>",
])
def test_bad_syntax(text: str) -> None:
    for kw in ({}, {"utf8": True}, {"allow_null": True, "allow_postmaster": True}):
        with pytest.raises(AddressError):
            parse_path(text, **kw)


@pytest.mark.parametrize("literal", [
    "[]", "[1.2.3]", "[1.2.3.4.5]", "[256.1.1.1]", "[01.2.3.4]", "[1.2.3.-4]",
    "[IPv6:]", "[IPv6:1::2::3]", "[IPv6:12345::]", "[IPv6:1:2:3:4:5:6:7:8:9]",
    "[IPv6:1.2.3.4]", "[IPv6:fe80::1%eth0]", "[IPv6:::g]",
    "[tag:]", "[:x]", "[ta_g:x]", "[a b]", "[x[y]", "[x\\y]", "[1.2.3.4]x",
])
def test_bad_address_literals(literal: str) -> None:
    with pytest.raises(AddressError):
        parse_path(f"<a@{literal}>")
    assert not is_domain(literal)


# --- Length limits (§4.5.3.1) ----------------------------------------------------


def test_local_part_limit() -> None:
    assert MAX_LOCAL_PART == 64
    assert parts(f"<{'l' * 64}@x>")[0] == "l" * 64
    with pytest.raises(AddressError):
        parse_path(f"<{'l' * 65}@x>")
    # Octets, not characters: 32 two-octet characters fill the limit.
    assert parts(f"<{'é' * 32}@x>", utf8=True)[0] == "é" * 32
    with pytest.raises(AddressError):
        parse_path(f"<{'é' * 33}@x>", utf8=True)


def _domain(octets: int) -> str:
    """A valid ASCII domain of exactly ``octets`` octets (63-octet labels)."""
    name = "".join("." if i % 64 == 63 else "d" for i in range(octets))
    return name[:-1] + "e" if name.endswith(".") else name


def test_domain_limit() -> None:
    assert MAX_DOMAIN == 255
    assert len(_domain(255)) == 255 and len(_domain(256)) == 256
    assert is_domain(_domain(255))
    assert not is_domain(_domain(256))


def test_path_limit() -> None:
    # §4.5.3.1.3: 256 octets including the angle brackets.
    assert MAX_PATH == 256
    ok = f"<{'l' * 60}@{_domain(256 - 63)}>"
    assert len(ok) == 256
    parse_path(ok)
    bad = f"<{'l' * 61}@{_domain(256 - 63)}>"
    assert len(bad) == 257
    with pytest.raises(AddressError):
        parse_path(bad)


def test_path_limit_counts_octets() -> None:
    # 60 two-octet characters + "@" + 133 + brackets: 196 characters but
    # 256 octets (fits); one more character in the domain: 257 octets.
    local = "é" * 30  # 60 octets
    ok = f"<{local}@{'ü' * 60}.{_domain(256 - 60 - 3 - 121)}>"
    assert len(ok.encode()) == 256
    parse_path(ok, utf8=True)
    bad = f"<{local}@{'ü' * 61}.{_domain(256 - 60 - 3 - 121)}>"
    assert len(bad.encode()) == 258 and len(bad) < 256
    with pytest.raises(AddressError):
        parse_path(bad, utf8=True)


# --- UTF-8 (RFC 6531 §3.3) ----------------------------------------------------------


@pytest.mark.parametrize("text", ["<δοκιμή@παράδειγμα.δοκιμή>", "<用户@例子.广告>",
                                  '<"引用 文字"@x>', "<a@bü.de>", "<ü@[1.2.3.4]>"])
def test_utf8_addresses(text: str) -> None:
    addr, _ = parse_path(text, utf8=True)
    assert not addr.is_ascii
    assert f"<{addr}>" == text
    with pytest.raises(AddressError):
        parse_path(text)  # not without SMTPUTF8


@pytest.mark.parametrize("text", ["<a\udcff@x>", "<a@x\udcff>", '<"\udcff"@x>'])
def test_surrogates_are_not_utf8(text: str) -> None:
    # Lone surrogates come from undecodable bytes; they are not UTF-8 text.
    with pytest.raises(AddressError):
        parse_path(text, utf8=True)


def test_address_str_and_ascii() -> None:
    assert str(Address("a", "b.c")) == "a@b.c"
    assert str(Address("postmaster", "")) == "postmaster"
    assert Address("a", "b").is_ascii and not Address("ä", "b").is_ascii


# --- Parameters (§4.1.2 Mail-parameters) --------------------------------------------


def test_parse_params() -> None:
    assert parse_params("") == {}
    assert parse_params(" SIZE=10 body=8BITMIME  smtputf8") == {
        "SIZE": "10", "BODY": "8BITMIME", "SMTPUTF8": None}
    assert parse_params(" X-Y=a+b/c") == {"X-Y": "a+b/c"}
    assert parse_params(" ENVID=ü") == {"ENVID": "ü"}  # RFC 6531 widens values


@pytest.mark.parametrize("text", [" =x", " SIZE=", " A=b=c", " -A", " A_B", " A\t",
                                  " A=\x01", " A=b\x7f", " ä=1", " A=\udcff"])
def test_parse_params_syntax(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_params(text)
    assert not isinstance(info.value, KeyError)


def test_parse_params_duplicates() -> None:
    with pytest.raises(KeyError):
        parse_params(" SIZE=1 size=2")


def test_is_domain() -> None:
    for ok in ("x", "a.b", "a-b.c9", "[1.2.3.4]", "[IPv6:::1]", "bü.de"):
        assert is_domain(ok), ok
    assert not is_domain("bü.de", utf8=False)
    for bad in ("", ".", "a.", "-a", "a_b", "a b", "[1.2.3.4", "1.2.3.4]"):
        assert not is_domain(bad), bad


# --- Properties -------------------------------------------------------------------------

ATEXT = "abcXYZ019!#$%&'*+-/=?^_`{|}~"
_atom = st.text(ATEXT, min_size=1, max_size=12)
_dot_string = st.lists(_atom, min_size=1, max_size=4).map(".".join)
_qchar = st.sampled_from([chr(c) for c in range(32, 127) if chr(c) not in '"\\'])
_qpair = st.sampled_from([chr(c) for c in range(32, 127)]).map(lambda c: "\\" + c)
_quoted = st.lists(_qchar | _qpair, max_size=12).map(lambda xs: '"' + "".join(xs) + '"')
_local = _dot_string | _quoted

_label = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9-]{0,20}[A-Za-z0-9])?", fullmatch=True)
_name = st.lists(_label, min_size=1, max_size=5).map(".".join)
_v4 = st.ip_addresses(v=4).map(lambda a: f"[{a}]")
_v6 = st.ip_addresses(v=6).flatmap(
    lambda a: st.sampled_from([f"[IPv6:{a.compressed}]", f"[IPv6:{a.exploded}]"]))
_general = st.tuples(_label, st.text(
    [chr(c) for c in range(33, 127) if chr(c) not in "[\\]"], min_size=1, max_size=10)
).filter(lambda t: t[0].lower() != "ipv6").map(lambda t: f"[{t[0]}:{t[1]}]")
_domain_st = _name | _v4 | _v6 | _general
_route = st.lists(_name.map(lambda d: "@" + d), max_size=3).map(
    lambda r: ",".join(r) + ":" if r else "")


@settings(max_examples=500, deadline=None)
@given(local=_local, domain=_domain_st, route=_route,
       rest=st.sampled_from(["", " SIZE=1", " x"]))
def test_generated_paths_parse_back(local: str, domain: str, route: str, rest: str) -> None:
    text = f"<{route}{local}@{domain}>{rest}"
    fits = (len(local) <= MAX_LOCAL_PART and len(domain) <= MAX_DOMAIN
            and len(local) + len(domain) + 3 <= MAX_PATH)
    if fits:
        assert parts(text) == (local, domain, rest)
        assert parts(text, utf8=True) == (local, domain, rest)
    else:
        with pytest.raises(AddressError):
            parse_path(text)


@settings(max_examples=200, deadline=None)
@given(st.ip_addresses())
def test_every_ip_literal_parses(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    literal = f"[{ip}]" if ip.version == 4 else f"[IPv6:{ip}]"
    assert parts(f"<a@{literal}>") == ("a", literal, "")
    assert is_domain(literal)


_path_noise = st.lists(st.sampled_from(list('<>@."\\[]:,; aZ9-é\x00\r') + ["IPv6:", "::"]),
                       max_size=40).map("".join)


@settings(max_examples=500, deadline=None)
@given(text=st.text(max_size=80) | _path_noise, utf8=st.booleans(),
       null=st.booleans(), pm=st.booleans())
def test_random_text_only_raises_address_error(text: str, utf8: bool, null: bool,
                                               pm: bool) -> None:
    try:
        addr, rest = parse_path(text, utf8=utf8, allow_null=null, allow_postmaster=pm)
    except AddressError:
        return
    assert text.endswith(rest) and text.startswith("<")
    if addr != NULL_PATH and addr.domain:
        assert len(addr.local_part.encode()) <= MAX_LOCAL_PART
        assert len(addr.domain.encode()) <= MAX_DOMAIN
    if not utf8:
        assert addr.is_ascii


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=60))
def test_random_params_only_raise_value_errors(text: str) -> None:
    try:
        params = parse_params(text)
    except ValueError:  # KeyError is a LookupError, so check it apart
        return
    except KeyError:
        return
    assert all(k == k.upper() for k in params)
    assert isinstance(is_domain(text), bool)
