"""The fuzz targets' checks, importable without atheris.

``fuzz_engine.py`` and ``fuzz_address.py`` hand libFuzzer's inputs to these
functions; the test suite replays ``fuzz/seeds`` and ``fuzz/regressions``
through them directly, so every crash once found stays fixed.
"""

from __future__ import annotations

import re

from simplesmtp.address import MAX_DOMAIN, MAX_LOCAL_PART, AddressError, parse_params, parse_path
from simplesmtp.engine import (
    NEED_DATA,
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
)
from simplesmtp.replies import Reply
from simplesmtp.storage.maildir import encode_name, unquote_local

LEGAL_CODES = frozenset({211, 214, 220, 221, 235, 250, 251, 252, 334, 354, 421, 432, 450,
                         451, 452, 454, 455, 500, 501, 502, 503, 504, 530, 534, 535, 538,
                         550, 551, 552, 553, 554, 555})
_REPLY = re.compile(rb"(?:(\d{3})-[^\r\n]*\r\n)*(\d{3}) [^\r\n]*\r\n")
CONFIGS = [
    EngineConfig(max_message_size=300, max_recipients=2, max_errors=0, tls_available=True),
    EngineConfig(max_message_size=100_000, max_errors=3),
    EngineConfig(max_line_length=600, max_errors=20, tls_available=True),
]
FAILED = Reply(452, "4.3.1", ("Insufficient system storage",))


def check(send: Send) -> None:
    if send.reply.code not in LEGAL_CODES:
        raise AssertionError(f"illegal code {send.reply}")
    m = _REPLY.fullmatch(send.data)
    if m is None or int(m.group(2)) != send.reply.code:
        raise AssertionError(f"malformed reply {send.data!r}")


def engine_input(data: bytes) -> None:
    """The engine fed ``data`` in pieces; see fuzz_engine.py."""
    if not data:
        return
    config = CONFIGS[data[0] % len(CONFIGS)]
    engine = SMTPEngine(config, tls=bool(data[0] & 0x80))
    pos = 1
    open_message = closed = False
    n = 0
    while pos < len(data):
        size = data[pos] + 1
        engine.receive(data[pos + 1:pos + 1 + size])
        pos += 1 + size
        while (event := engine.next_event()) is not NEED_DATA:
            if closed:
                raise AssertionError(f"{event!r} after Close")
            if isinstance(event, Send):
                check(event)
            elif isinstance(event, MessageBegin):
                assert not open_message, "MessageBegin twice"
                open_message = True
            elif isinstance(event, MessageData):
                assert open_message and event.data, "MessageData outside a message"
            elif isinstance(event, (MessageAbort, MessageComplete)):
                assert open_message, f"{event!r} outside a message"
                open_message = False
                if isinstance(event, MessageComplete):
                    n += 1
                    check(engine.delivered("Q") if n % 2 else engine.delivery_failed(FAILED))
            elif isinstance(event, StartTLS):
                engine.tls_started()
            elif isinstance(event, Close):
                assert not open_message, "Close with a message open"
                closed = True
        if engine.phase is Phase.COMMAND and engine.pending_input > config.max_line_length:
            raise AssertionError(f"{engine.pending_input} bytes unparsed")
    for event in engine.connection_lost():
        assert isinstance(event, MessageAbort) and open_message


def _safe_component(name: str) -> None:
    if not name or "/" in name or "\0" in name or name.startswith(".") or len(name) > 255:
        raise AssertionError(f"unsafe mailbox name {name!r}")


def address_input(data: bytes) -> None:
    """The address and parameter parsers on ``data``; see fuzz_address.py."""
    if not data:
        return
    flags = data[0] & 7
    # The engine hands the parsers text decoded strictly as UTF-8; decoding
    # with "replace" keeps every input usable and yields no surrogates.
    text = data[1:].decode("utf-8", "replace")
    try:
        address, rest = parse_path(text, utf8=bool(flags & 1), allow_null=bool(flags & 2),
                                   allow_postmaster=bool(flags & 4))
    except AddressError:
        pass
    else:
        assert text.endswith(rest)
        assert len(address.local_part.encode()) <= MAX_LOCAL_PART
        assert len(address.domain.encode()) <= MAX_DOMAIN
        if not flags & 1:
            assert address.is_ascii, address
        _safe_component(encode_name(address.domain.lower() or "localhost"))
        _safe_component(encode_name(unquote_local(address.local_part).lower()))
    try:
        params = parse_params(text)
    except (KeyError, ValueError):
        pass
    else:
        for key, value in params.items():
            assert key and key == key.upper() and " " not in key
            assert value is None or (value and " " not in value and "=" not in value)
