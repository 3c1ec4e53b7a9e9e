"""Property tests of the sans-I/O engine (issue 6), and the fuzz runner.

``EngineMachine`` is a hypothesis state machine: it plays random sessions
(commands valid and broken, fed whole or in random pieces, message content,
BDAT chunks, delivery successes and failures, STARTTLS) and checks after
every step that

* each command line gets exactly one reply (plus a final 421 when the error
  budget runs out; none only for a foreign protocol on the first line);
* every reply is well formed: legal code, one code on every line, CRLF,
  enhanced code of the same class;
* message events come in a legal order (Begin, Data*, Complete or Abort),
  and nothing is left open when the session closes;
* the state is possible: DATA only with recipients, no transaction without
  HELO, recipients within the limit, nothing after Close.

``test_arbitrary_bytes`` throws unstructured bytes in random pieces at the
engine with weaker invariants.  ``test_atheris_targets`` runs the
coverage-guided fuzzers of ``fuzz/`` for a bounded time when atheris is
installed.

Budgets: examples are bounded (``max_examples``), ``deadline=None`` (CI
machines are slow), and the fuzzers run ``FUZZ_SECONDS`` each (default 60,
both at once).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

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

# Every code this server may send (RFC 5321 §4.2.3, RFC 4954 for AUTH).
LEGAL_CODES = frozenset({
    211, 214, 220, 221, 235, 250, 251, 252, 334, 354,
    421, 432, 450, 451, 452, 454, 455,
    500, 501, 502, 503, 504, 530, 534, 535, 538, 550, 551, 552, 553, 554, 555,
})
_REPLY_LINE = re.compile(rb"(\d{3})([ -])([^\r\n]*)\r\n")
_ENHANCED = re.compile(r"([245])\.\d{1,3}\.\d{1,3}")

COMMANDS = [
    b"HELO client.example", b"EHLO client.example", b"EHLO", b"HELO",
    b"MAIL FROM:<a@b.example>", b"MAIL FROM:<>", b"MAIL FROM:<a@b.example> SIZE=100",
    b"MAIL FROM:<a@b.example> SIZE=99999999", b"MAIL FROM:<a@b.example> BODY=8BITMIME",
    b"MAIL FROM:<\xc3\xa9@b.example> SMTPUTF8", b"MAIL FROM:<\xc3\xa9@b.example>",
    b"MAIL FROM:<a@b.example> FOO=BAR", b"MAIL FROM:a@b.example", b"MAIL TO:<a@b.example>",
    b"RCPT TO:<c@d.example>", b"RCPT TO:<postmaster>", b"RCPT TO:<>", b"RCPT TO:<c@>",
    b"RCPT TO:<@x.example,@y.example:c@d.example>", b"RCPT TO:<\"q u\"@d.example>",
    b"DATA", b"DATA x", b"RSET", b"RSET x", b"NOOP", b"NOOP hello", b"VRFY someone",
    b"VRFY", b"EXPN list", b"HELP", b"HELP MAIL", b"HELP nothing", b"STARTTLS",
    b"AUTH PLAIN", b"AUTH LOGIN", b"*", b"BDAT 0", b"BDAT 0 LAST", b"BDAT 7", b"BDAT 12 LAST",
    b"BDAT x", b"BDAT", b"", b" ", b"FOO", b"mail from:<a@b.example>", b"\x00\xff\xfe",
    b"QUIT", b"QUIT now",
]
# Commands that never change how the following bytes are read.
SIMPLE = [c for c in COMMANDS
          if not c.upper().startswith((b"DATA", b"BDAT", b"QUIT", b"STARTTLS", b"AUTH", b"*"))]
command_lines = st.one_of(
    st.sampled_from(COMMANDS),
    st.binary(max_size=60).filter(lambda b: b"\n" not in b),
    st.builds(lambda c, junk: c + junk, st.sampled_from(COMMANDS), st.binary(max_size=8)
              ).filter(lambda b: b"\n" not in b),
)
content = st.binary(max_size=3000).filter(lambda b: b"\r\n.\r\n" not in b"\r\n" + b)


def check_reply(send: Send) -> None:
    reply, data = send.reply, send.data
    assert reply.code in LEGAL_CODES, reply
    pos, codes, seps = 0, [], []
    while pos < len(data):
        m = _REPLY_LINE.match(data, pos)
        assert m, f"malformed reply {data!r}"
        assert len(m.group()) <= 512, "reply line over 512 octets (RFC 5321 §4.5.3.1.5)"
        codes.append(int(m.group(1)))
        seps.append(m.group(2))
        pos = m.end()
    assert codes and set(codes) == {reply.code}, data
    assert seps[-1] == b" " and all(s == b"-" for s in seps[:-1]), data
    if reply.enhanced is not None:
        m = _ENHANCED.fullmatch(reply.enhanced)
        assert m and m.group(1) == str(reply.code)[0], reply


class EngineMachine(RuleBasedStateMachine):
    """A random session against one engine."""

    @initialize(tls=st.booleans(), max_errors=st.sampled_from([0, 1, 3, 20]),
                max_recipients=st.sampled_from([1, 3, 100]),
                size=st.sampled_from([10, 1000, 100_000]), implicit=st.booleans())
    def start(self, tls: bool, max_errors: int, max_recipients: int, size: int,
              implicit: bool) -> None:
        self.config = EngineConfig(hostname="mx.test", tls_available=tls,
                                   max_errors=max_errors, max_recipients=max_recipients,
                                   max_message_size=size)
        self.engine = SMTPEngine(self.config, tls=implicit)
        check_reply(self.engine.greeting())
        self.first_input = True
        self.closed = False
        self.message_open = False
        self.bdat_declared = 0
        self.queue = 0

    # --- driving ------------------------------------------------------

    def feed(self, data: bytes, cuts: list[int]) -> list[object]:
        """Feed ``data`` in pieces cut at ``cuts``; carry out every event."""
        points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
        events: list[object] = []
        for a, b in zip(points, points[1:], strict=False):
            self.engine.receive(data[a:b])
            events += self.pump()
        self.first_input = False
        return events

    def pump(self) -> list[object]:
        events: list[object] = []
        while True:
            event = self.engine.next_event()
            if event is NEED_DATA:
                return events
            assert not self.closed, f"{event!r} after Close"
            events.append(event)
            if isinstance(event, Send):
                check_reply(event)
            elif isinstance(event, MessageBegin):
                assert not self.message_open
                self.message_open = True
            elif isinstance(event, MessageData):
                assert self.message_open and event.data
            elif isinstance(event, MessageAbort):
                assert self.message_open
                self.message_open = False
            elif isinstance(event, MessageComplete):
                assert self.message_open and event.transaction.recipients
                self.message_open = False
                self.queue += 1
                if self.queue % 3:
                    send = self.engine.delivered(f"Q{self.queue}")
                else:
                    send = self.engine.delivery_failed(
                        Reply(451, "4.3.0", ("Local error in processing",)))
                check_reply(send)
                events.append(send)
            elif isinstance(event, StartTLS):
                assert self.config.tls_available and not self.engine.tls
                self.engine.tls_started()
            elif isinstance(event, Close):
                assert not self.message_open, "closed with a message open"
                self.closed = True
            # Other events (AUTH checks) need services this test has not
            # configured: none is expected without auth mechanisms.
            else:
                raise AssertionError(f"unexpected event {event!r}")

    def expect_one_reply(self, events: list[object], first: bool) -> None:
        sends = [e for e in events if isinstance(e, Send)]
        closes = [e for e in events if isinstance(e, Close)]
        if closes and closes[0].reason.startswith("foreign protocol"):
            assert first and not sends, events
            return
        if closes and closes[0].reason == "too many errors":
            assert len(sends) == 2 and sends[-1].reply.code == 421, events
            assert sends[0].reply.code >= 500
            return
        if self.engine.phase is Phase.BDAT:
            assert sends == [], events  # the reply comes after the chunk
            return
        assert len(sends) == 1, events

    # --- rules --------------------------------------------------------

    @precondition(lambda self: not self.closed and self.engine.phase is Phase.COMMAND)
    @rule(line=command_lines, cuts=st.lists(st.integers(0, 80), max_size=4))
    def command(self, line: bytes, cuts: list[int]) -> None:
        first = self.first_input
        events = self.feed(line + b"\r\n", cuts)
        self.expect_one_reply(events, first)
        if self.engine.phase is Phase.BDAT:
            m = re.match(rb"BDAT (\d+)", line)
            assert m, line
            self.bdat_declared = int(m.group(1))

    @precondition(lambda self: not self.closed and self.engine.phase is Phase.COMMAND)
    @rule(verb=st.sampled_from([b"DATA", b"BDAT 20", b"BDAT 5 LAST", b"BDAT 0 LAST"]))
    def transaction(self, verb: bytes) -> None:
        """A valid envelope, then content: gets the machine to DATA/BDAT often."""
        steps = []
        if self.engine.helo is None:
            steps.append(b"EHLO client.example")
        if self.engine.transaction is None:
            steps.append(b"MAIL FROM:<a@b.example>")
        steps += [b"RCPT TO:<c@d.example>", verb]
        for line in steps:
            if self.closed or self.engine.phase is not Phase.COMMAND:
                break
            self.command(line, [])

    @precondition(lambda self: not self.closed and self.engine.phase is Phase.DATA)
    @rule(body=content, cuts=st.lists(st.integers(0, 4000), max_size=6))
    def message(self, body: bytes, cuts: list[int]) -> None:
        stuffed = (b"\r\n" + body).replace(b"\r\n.", b"\r\n..")[2:]
        end = b"\r\n.\r\n" if not stuffed.endswith(b"\r\n") else b".\r\n"
        events = self.feed(stuffed + end, cuts)
        self.expect_one_reply(events, False)

    @precondition(lambda self: not self.closed and self.engine.phase is Phase.BDAT)
    @rule(data=st.data(), cuts=st.lists(st.integers(0, 100), max_size=4))
    def chunk(self, data: st.DataObject, cuts: list[int]) -> None:
        n = self.bdat_declared
        chunk = data.draw(st.binary(min_size=n, max_size=n))
        events = self.feed(chunk, cuts)
        self.expect_one_reply(events, False)

    @precondition(lambda self: not self.closed and self.engine.phase is Phase.COMMAND)
    @rule(lines=st.lists(st.sampled_from(SIMPLE), min_size=2, max_size=8))
    def pipelined(self, lines: list[bytes]) -> None:
        # No DATA/BDAT/QUIT/STARTTLS here, so each line is one command.
        first = self.first_input
        events = self.feed(b"".join(x + b"\r\n" for x in lines), [])
        sends = [e for e in events if isinstance(e, Send)]
        if any(isinstance(e, Close) for e in events):
            assert len(sends) <= len(lines) + 1
            assert first or sends[-1].reply.code == 421
        else:
            assert len(sends) == len(lines), (lines, events)

    @precondition(lambda self: not self.closed)
    @rule()
    def hang_up(self) -> None:
        events = self.engine.connection_lost()
        for e in events:
            assert isinstance(e, MessageAbort) and self.message_open
            self.message_open = False
        assert not self.message_open
        self.closed = True

    @precondition(lambda self: self.closed)
    @rule(data=st.binary(max_size=50))
    def input_after_close(self, data: bytes) -> None:
        self.engine.receive(data)
        assert self.engine.next_event() is NEED_DATA
        assert self.engine.pending_input == 0

    # --- invariants ----------------------------------------------------

    @invariant()
    def possible_state(self) -> None:
        engine = self.engine
        txn = engine.transaction
        if self.closed:
            assert engine.phase is Phase.CLOSED
            assert engine.next_event() is NEED_DATA
            return
        assert engine.phase in (Phase.COMMAND, Phase.DATA, Phase.BDAT)
        if txn is not None:
            assert engine.helo is not None
            assert len(txn.recipients) <= self.config.max_recipients
        if engine.phase is Phase.DATA:
            assert txn is not None and txn.recipients and not txn.via_bdat
            assert self.message_open
        if self.config.max_errors:
            assert engine.errors < self.config.max_errors
        assert engine.pending_input >= 0
        if engine.phase is Phase.COMMAND:
            # All input was parsed (each rule feeds whole lines).
            assert engine.pending_input == 0


TestEngineMachine = EngineMachine.TestCase
TestEngineMachine.settings = settings(
    max_examples=int(os.environ.get("ENGINE_MACHINE_EXAMPLES", "400")),
    stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pieces=st.lists(st.one_of(st.binary(max_size=200),
                                 st.sampled_from([b"\r\n", b"\r\n.\r\n", b"DATA\r\n",
                                                  b"BDAT 3\r\n", b"EHLO x\r\n",
                                                  b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\n"])),
                       max_size=30),
       max_errors=st.sampled_from([0, 2, 20]), tls=st.booleans())
def test_arbitrary_bytes(pieces: list[bytes], max_errors: int, tls: bool) -> None:
    engine = SMTPEngine(EngineConfig(max_errors=max_errors, tls_available=tls,
                                     max_message_size=500))
    sends = 0
    open_message = False
    closed = False
    for piece in pieces:
        engine.receive(piece)
        while (event := engine.next_event()) is not NEED_DATA:
            assert not closed
            if isinstance(event, Send):
                check_reply(event)
                sends += 1
            elif isinstance(event, MessageBegin):
                assert not open_message
                open_message = True
            elif isinstance(event, (MessageAbort, MessageComplete)):
                assert open_message
                open_message = False
                if isinstance(event, MessageComplete):
                    check_reply(engine.delivered("Q1"))
                    sends += 1
            elif isinstance(event, StartTLS):
                engine.tls_started()
            elif isinstance(event, Close):
                closed = True
        if engine.phase is Phase.COMMAND:
            assert engine.pending_input <= engine.config.max_line_length
    # A reply answers a line (or ends the session): never more replies
    # than line ends, plus the final 421.
    assert sends <= b"".join(pieces).count(b"\n") + 1


# --- the coverage-guided fuzzers (fuzz/) -----------------------------------

FUZZ_DIR = Path(__file__).resolve().parent.parent / "fuzz"


def _replay_inputs() -> list[Path]:
    return sorted(p for kind in ("seeds", "regressions") for target in ("engine", "address")
                  for p in (FUZZ_DIR / kind / target).glob("*") if p.is_file())


@pytest.mark.parametrize("path", _replay_inputs(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_fuzz_inputs_replayed(path: Path) -> None:
    """Seeds and every crash the fuzzers ever found (fuzz/regressions/)."""
    sys.path.insert(0, str(FUZZ_DIR))
    try:
        import fuzz_targets as targets
    finally:
        sys.path.remove(str(FUZZ_DIR))
    check = targets.engine_input if path.parent.name == "engine" else targets.address_input
    check(path.read_bytes())


@pytest.mark.timeout(400)
def test_atheris_targets(tmp_path: Path) -> None:
    """Both coverage-guided fuzzers, at once, for FUZZ_SECONDS (default 60)."""
    pytest.importorskip("atheris")
    seconds = int(os.environ.get("FUZZ_SECONDS", "60"))
    p = subprocess.run([sys.executable, str(FUZZ_DIR / "run.py"), "--seconds", str(seconds),
                        "--work", str(tmp_path)],
                       capture_output=True, text=True, timeout=seconds + 300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "engine: exit=0" in p.stdout and "address: exit=0" in p.stdout, p.stdout
