"""The DATA decoder on its own: end mark, transparency, bare CR/LF policy.

RFC 5321 §4.1.1.4: the data ends with <CRLF>.<CRLF> and nothing else.
§4.5.2: a leading period added by the client is removed.  The bare CR/LF
policy is the one documented in dataread.py: a bare CR or LF is content,
never a line end for the end mark or for dot-unstuffing, and is stored as
CRLF.

The property tests compare the decoder with ``reference_decode``, a
deliberately naive implementation written from those rules alone (split on
CRLF, look for a line that is exactly "."), fed in arbitrary chunkings.
"""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simplesmtp.dataread import DataDecoder, stuff

# --- A reference implementation, written from the rules ----------------------


def _normalise_line(line: bytes) -> bytes:
    # Inside a CRLF-delimited line every CR and every LF is bare.
    return line.replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def reference_decode(data: bytes) -> tuple[bool, bytes, bytes, bool]:
    """(ended, message, rest, bare_eol) for the DATA bytes ``data``.

    The stream is a list of lines separated by real CRLFs; the first line
    starts right after the 354 reply.  The message ends at the first line
    that is exactly "." and is followed by a CRLF.
    """
    lines = data.split(b"\r\n")
    for k, line in enumerate(lines[:-1]):  # the last piece has no CRLF after it
        if line == b".":
            body = lines[:k]
            msg = b"".join(
                _normalise_line(ln[1:] if ln.startswith(b".") else ln) + b"\r\n"
                for ln in body
            )
            bare = any(b"\r" in ln or b"\n" in ln for ln in body)
            return True, msg, b"\r\n".join(lines[k + 1:]), bare
    return False, b"", b"", False


def decode(data: bytes, sizes: list[int] | None = None) -> tuple[DataDecoder, bytes]:
    """Feed ``data`` in pieces (cycling ``sizes``); stop feeding once done."""
    dec = DataDecoder()
    out = []
    pieces = [data] if sizes is None else list(_cut(data, sizes))
    for i, piece in enumerate(pieces):
        out += dec.feed(piece)
        if dec.done:
            # What is left after the end mark belongs to the command phase.
            dec.rest += b"".join(pieces[i + 1:])
            break
    return dec, b"".join(out)


def _cut(data: bytes, sizes: list[int]) -> list[bytes]:
    out, i, k = [], 0, 0
    while i < len(data):
        n = sizes[k % len(sizes)]
        out.append(data[i:i + n])
        i, k = i + n, k + 1
    return out


CHUNKINGS = [None, [1], [2], [3], [5, 1, 2], [4096], [1, 70000]]

# --- Plain examples ------------------------------------------------------------


@pytest.mark.parametrize("sizes", CHUNKINGS)
@pytest.mark.parametrize("wire, message", [
    (b".\r\n", b""),  # empty message: the first line counts as after CRLF
    (b"hello\r\n.\r\n", b"hello\r\n"),
    (b"a\r\nb\r\n\r\n.\r\n", b"a\r\nb\r\n\r\n"),
    (b"..\r\n.\r\n", b".\r\n"),  # a stuffed lone period
    (b"...x\r\n.\r\n", b"..x\r\n"),  # only one period is removed
    (b"a\r\n..b\r\n.\r\n", b"a\r\n.b\r\n"),
    (b"a\r\n.b\r\n.\r\n", b"a\r\nb\r\n"),  # unstuffed even if not stuffed (§4.5.2)
    (b"a.\r\nb. .\r\n.\r\n", b"a.\r\nb. .\r\n"),  # periods not at a line start
    (b"\x00\xff\x80 8bit\r\n.\r\n", b"\x00\xff\x80 8bit\r\n"),
])
def test_decode_examples(wire: bytes, message: bytes, sizes: list[int] | None) -> None:
    dec, out = decode(wire + b"NEXT\r\n", sizes)
    assert dec.done
    assert out == message
    assert dec.rest == b"NEXT\r\n"
    assert not dec.bare_eol


@pytest.mark.parametrize("sizes", CHUNKINGS)
def test_end_mark_is_needed(sizes: list[int] | None) -> None:
    for wire in (b"", b"abc", b"abc\r\n", b"abc\r\n.", b"abc\r\n.\r", b".", b".\r"):
        dec, _ = decode(wire, sizes)
        assert not dec.done, wire


# Every way to write "a line with a period" with at least one bare CR or LF.
SMUGGLING = [
    b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r",
    b"\n.\r", b"\r.\n", b"\r\n.\r\r\n", b"\r\n.\n\r\n", b"\r\r\n.\n",
    b"\n\r\n.\r", b"\r\n. \r\n", b"\r\n.\x00\r\n",
]


@pytest.mark.parametrize("sizes", CHUNKINGS)
@pytest.mark.parametrize("variant", SMUGGLING, ids=repr)
def test_smuggling_variant_never_ends_data(variant: bytes, sizes: list[int] | None) -> None:
    inner = b"MAIL FROM:<evil@x>\r\nRCPT TO:<v@x>\r\nDATA\r\nevil\r\n"
    wire = b"first" + variant + inner + b".\r\nNEXT\r\n"
    dec, out = decode(wire, sizes)
    assert dec.done
    assert dec.rest == b"NEXT\r\n"  # the only end is the real one
    assert b"MAIL FROM:<evil@x>\r\n" in out  # the "second message" is content
    ended, want, _, bare = reference_decode(wire)
    assert ended and out == want
    assert dec.bare_eol == bare


@pytest.mark.parametrize("wire, message", [
    (b"a\nb\r\n.\r\n", b"a\r\nb\r\n"),
    (b"a\rb\r\n.\r\n", b"a\r\nb\r\n"),
    (b"a\r\r\n.\r\n", b"a\r\n\r\n"),
    (b"a\n\r\n.\r\n", b"a\r\n\r\n"),
    (b"\n.\n\r\n.\r\n", b"\r\n.\r\n\r\n"),  # no unstuffing after a bare LF
    (b"x\r\n.\r\r\n.\r\n", b"x\r\n\r\n\r\n"),  # ".<CR>" line: stuffed, then CR
])
def test_bare_line_ends_are_normalised(wire: bytes, message: bytes) -> None:
    for sizes in CHUNKINGS:
        dec, out = decode(wire, sizes)
        assert dec.done and out == message, sizes
        assert dec.bare_eol


def test_output_chunks_never_split_a_crlf() -> None:
    dec = DataDecoder()
    chunks: list[bytes] = []
    for byte in b"a\r\nbb\r\n\r\nccc\r\n.\r\n":
        chunks += dec.feed(bytes([byte]))
    assert dec.done
    assert all(c.endswith(b"\r\n") for c in chunks), chunks


def test_long_line_is_streamed_not_buffered() -> None:
    dec = DataDecoder()
    out = 0
    for _ in range(40):
        out += sum(len(c) for c in dec.feed(b"x" * 10_000))
        assert len(dec._buf) <= 70_000  # bounded, whatever the line length
    assert out > 300_000


@pytest.mark.parametrize("unit", [b"\r", b"\r\r\n", b"\n\r"])
def test_runs_of_bare_cr_are_streamed_in_bounded_memory(unit: bytes) -> None:
    # Regression: a long run of bare CRs used to be kept whole (no cut point
    # was found), so memory grew without bound and, because the run was
    # scanned again on every feed, time grew with its square.
    dec = DataDecoder()
    out = 0
    start = time.monotonic()
    piece = unit * (65536 // len(unit))
    for _ in range(64):
        out += sum(len(c) for c in dec.feed(piece))
        assert len(dec._buf) <= 70_000
    assert time.monotonic() - start < 5.0
    assert out >= 60 * len(piece)  # bare CRs come out as CRLFs
    rest = dec.feed(b"\r\n.\r\n")
    assert dec.done and b"".join(rest).endswith(b"\r\n")


def test_cr_run_then_crlf_keeps_the_real_line_end() -> None:
    # A cut inside a CR run must not separate the run's last CR from its LF.
    wire = b"\r" * 70_000 + b"\n.\r\n"
    for sizes in ([70_000, 4], [1024], None):
        dec, out = decode(wire, sizes)
        ended, want, _, _ = reference_decode(wire)
        assert dec.done and ended
        assert out == want
        assert out == b"\r\n" * 70_000


def test_stuff() -> None:
    assert stuff(b"") == b".\r\n"
    assert stuff(b"a\r\n") == b"a\r\n.\r\n"
    assert stuff(b"a") == b"a\r\n.\r\n"
    assert stuff(b".a\r\n.\r\n..\r\n") == b"..a\r\n..\r\n...\r\n.\r\n"


# --- Properties -----------------------------------------------------------------

# Lines without CR or LF, rich in periods (the interesting byte).
_line = st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")) | \
    st.sampled_from([b"", b".", b"..", b". ", b".\x00", b"x.", b". .", b"From x"])
_crlf_message = st.lists(_line, max_size=20).map(lambda ls: b"".join(x + b"\r\n" for x in ls))
_sizes = st.one_of(st.none(), st.just([1]),
                   st.lists(st.integers(1, 64), min_size=1, max_size=10))

PROPS = settings(max_examples=300, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow])


@PROPS
@given(message=_crlf_message, sizes=_sizes, trailing=st.binary(max_size=20))
def test_stuff_round_trip(message: bytes, sizes: list[int] | None, trailing: bytes) -> None:
    dec, out = decode(stuff(message) + trailing, sizes)
    assert dec.done
    assert out == message
    assert dec.rest == trailing
    assert not dec.bare_eol


@PROPS
@given(message=st.binary(max_size=200))
def test_stuff_round_trip_unterminated_text(message: bytes) -> None:
    # Messages with arbitrary bytes: stuff() needs CRLF-only text, so only
    # compare with the reference, which knows the normalisation policy.
    wire = stuff(message)
    dec, out = decode(wire, [3])
    ended, want, rest, bare = reference_decode(wire)
    assert dec.done == ended
    if ended:
        assert out == want and dec.rest == rest and dec.bare_eol == bare


# Random bytes over an alphabet where the end mark and its near misses are
# likely to appear.
_noisy = st.lists(st.sampled_from([b"\r", b"\n", b".", b"\r\n", b"\r\n.", b"a", b"\x00",
                                   b"\r\n.\r\n", b".\r", b"\xff"]),
                  max_size=60).map(b"".join)


@PROPS
@given(data=st.one_of(_noisy, st.binary(max_size=200)), sizes=_sizes)
def test_random_bytes_match_reference(data: bytes, sizes: list[int] | None) -> None:
    ended, want, rest, bare = reference_decode(data)
    dec, out = decode(data, sizes)
    # The end is found exactly when the stream has a <CRLF>.<CRLF>.
    assert dec.done == ended
    if ended:
        assert out == want
        assert dec.rest == rest
        assert dec.bare_eol == bare
    else:
        # Finish it, and the whole thing must match too.
        more = dec.feed(b"\r\n.\r\n")
        assert dec.done
        ended2, want2, rest2, _ = reference_decode(data + b"\r\n.\r\n")
        assert ended2 and out + b"".join(more) == want2
        assert dec.rest == rest2


@settings(max_examples=40, deadline=None)
@given(data=_noisy, head=st.integers(60_000, 70_000), cut=st.integers(1, 3))
def test_long_lines_match_reference(data: bytes, head: int, cut: int) -> None:
    # Past the 64 KiB pending limit the decoder cuts lines itself.
    wire = b"y" * head + data + b"\r" * (head % 7) + data
    sizes = [head - cut, cut, 5]
    ended, want, rest, bare = reference_decode(wire)
    dec, out = decode(wire, sizes)
    assert dec.done == ended
    if ended:
        assert out == want and dec.rest == rest and dec.bare_eol == bare
    else:
        out += b"".join(dec.feed(b"\r\n.\r\n"))
        assert out == reference_decode(wire + b"\r\n.\r\n")[1]
