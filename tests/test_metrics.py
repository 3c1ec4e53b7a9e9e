"""Latency statistics, the SLO window, /metrics and ``simplesmtp stats``.

Unit tests drive time by hand (observations carry their own timestamps);
the integration tests run a port-0 server with ``--metrics-port 0`` and
scrape it after real sessions.
"""

from __future__ import annotations

import logging
import math
import re
import socket
import struct
import urllib.error
import urllib.request

import pytest
from clients import RawSMTP
from conftest import delivered

from simplesmtp.config import ConfigError, load
from simplesmtp.metrics import (
    BUCKETS_NS,
    DATA_END,
    NS_PER_SECOND,
    SAMPLE_CAP,
    UNKNOWN,
    KindStats,
    Metrics,
    SessionStats,
    SloWindow,
    format_stats,
    histogram_quantile,
    nearest_rank,
)

US = 1_000
MS = 1_000_000
MINUTE = 60 * NS_PER_SECOND


# --- statistics ------------------------------------------------------------------

def test_nearest_rank_percentiles() -> None:
    values = list(range(1, 101))  # 1..100
    assert nearest_rank(values, 0.50) == 50
    assert nearest_rank(values, 0.99) == 99
    assert nearest_rank(values, 1.0) == 100
    assert nearest_rank([7], 0.99) == 7
    assert nearest_rank([1, 2, 3], 0.0) == 1


def test_buckets_are_fine_and_contain_the_targets() -> None:
    assert BUCKETS_NS[0] <= 2 * US
    assert BUCKETS_NS[-1] >= 10 * NS_PER_SECOND
    assert list(BUCKETS_NS) == sorted(set(BUCKETS_NS))
    assert 100 * US in BUCKETS_NS and 1 * MS in BUCKETS_NS
    # At most a factor of two between neighbours: fine enough for p99 < 100 µs.
    assert all(b / a <= 2.0 for a, b in zip(BUCKETS_NS, BUCKETS_NS[1:], strict=False))


def test_histogram_bucket_edges_are_inclusive() -> None:
    k = KindStats()
    k.observe(100 * US)  # exactly on a bound: counted in that bucket (le)
    k.observe(100 * US + 1)
    i = BUCKETS_NS.index(100 * US)
    assert k.counts[i] == 1 and k.counts[i + 1] == 1
    k.observe(100 * NS_PER_SECOND)  # past the last bound: +Inf
    assert k.counts[-1] == 1
    assert k.count == 3 and k.sum_ns == 200 * US + 1 + 100 * NS_PER_SECOND


def test_histogram_quantile_interpolates_within_a_bucket() -> None:
    bounds = [1.0, 2.0, 4.0]
    assert histogram_quantile(0.5, bounds, [0, 10, 0, 0]) == pytest.approx(1.5)
    assert histogram_quantile(0.99, bounds, [90, 0, 10, 0]) == pytest.approx(3.8)
    assert histogram_quantile(0.5, bounds, [0, 0, 0, 5]) == 4.0  # +Inf: lower bound
    assert math.isnan(histogram_quantile(0.5, bounds, [0, 0, 0, 0]))


def test_kind_quantile_close_to_the_truth() -> None:
    k = KindStats()
    for ns in range(10 * US, 50 * US, 40):  # uniform 10..50 µs
        k.observe(ns)
    assert k.quantile(0.5) == pytest.approx(30e-6, rel=0.1)
    assert k.quantile(0.99) == pytest.approx(49.6e-6, rel=0.1)


def test_session_report_is_correct_statistics() -> None:
    s = SessionStats()
    for us in (10, 20, 30, 40, 1000):
        s.observe("MAIL", us * US)
    s.observe("RCPT", 5 * US)
    rows = {r.kind: r for r in s.report()}
    mail = rows["MAIL"]
    assert mail.count == 5
    assert mail.mean_us == pytest.approx(220.0)  # a mean, not a sum
    assert mail.p50_us == 30.0
    assert mail.p99_us == 1000.0
    assert mail.max_us == 1000.0
    assert rows["RCPT"].count == 1 and rows["RCPT"].p99_us == 5.0


def test_session_samples_are_bounded_and_exact_where_it_matters() -> None:
    s = SessionStats(seed=1)
    n = SAMPLE_CAP * 3
    for i in range(n):
        s.observe("NOOP", (i % 100 + 1) * US)
    assert len(s._kinds["NOOP"].values) == SAMPLE_CAP
    (row,) = s.report()
    assert row.count == n
    assert row.mean_us == pytest.approx(50.5)
    assert row.max_us == 100.0
    assert 45 <= row.p50_us <= 56  # a uniform sample of a uniform spread
    assert row.p99_us >= 98


# --- the SLO window --------------------------------------------------------------

def test_slo_window_met_and_missed_verdicts() -> None:
    verdicts = []
    w = SloWindow(0.001, 0.99, on_verdict=verdicts.append)
    t = 10 * MINUTE
    for i in range(100):
        w.observe(t + i * MS, 200 * US)  # all within 1 ms
    assert w.tick(t + 59 * NS_PER_SECOND) is None  # still the same minute
    v = w.tick(t + MINUTE)
    assert v is not None and v.met and v.commands == 100 and v.ratio == 1.0
    # Next minute: 2 of 100 too slow, 98 % < 99 %.
    t += MINUTE
    for i in range(100):
        w.observe(t + i * MS, 2 * MS if i < 2 else 100 * US)
    v = w.tick(t + MINUTE + 1)
    assert v is not None and not v.met and v.within == 98
    assert [x.met for x in verdicts] == [True, False]
    assert (w.windows_met, w.windows_missed) == (1, 1)


def test_slo_threshold_is_inclusive_and_exactly_on_target_meets() -> None:
    w = SloWindow(0.001, 0.99)
    for i in range(99):
        w.observe(i, 1 * MS)  # exactly the threshold counts as within
    w.observe(100, 1 * MS + 1)
    v = w.tick(MINUTE)
    assert v is not None and v.ratio == pytest.approx(0.99) and v.met


def test_slo_window_without_traffic_gives_no_verdict() -> None:
    w = SloWindow()
    assert w.tick(5 * MINUTE) is None
    w.observe(5 * MINUTE, 1)
    assert w.tick(6 * MINUTE) is not None
    assert w.tick(9 * MINUTE) is None  # empty minutes are not judged


def test_slo_rolling_view_forgets_old_slots() -> None:
    w = SloWindow(0.001, 0.99)
    t = 3 * MINUTE + 30 * NS_PER_SECOND
    w.observe(t, 10 * US)
    w.observe(t + 10 * NS_PER_SECOND, 5 * MS)
    assert w.rolling(t + 20 * NS_PER_SECOND) == (2, 1)
    assert w.rolling(t + 65 * NS_PER_SECOND) == (1, 0)  # first one is 65 s old
    assert w.rolling(t + 200 * NS_PER_SECOND) == (0, 0)


def test_missed_window_logs_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    now = [0]
    m = Metrics(slo_threshold=0.001, slo_target=0.99, clock=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="simplesmtp.metrics")
    for i in range(10):
        m.record("RCPT", 250, i * MS, i * MS + (5 * MS if i == 0 else 10 * US))
    now[0] = MINUTE + 1
    assert m.tick() is not None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "event=slo_missed" in warnings[0] and "commands=10" in warnings[0]
    assert "within=9" in warnings[0] and "threshold_us=1000" in warnings[0]
    now[0] = 2 * MINUTE + 1
    assert m.tick() is None
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_replies_count_in_the_slo_window_of_the_moment_they_were_written() -> None:
    # Metrics feeds the window from its histograms when a slot ends, not per
    # reply; each reply must still land in the minute it was written in.
    now = [0]
    m = Metrics(slo_threshold=0.001, slo_target=0.99, clock=lambda: now[0])
    m.record("MAIL", 250, MINUTE - 2 * MS, MINUTE - 1 * MS)  # 1 ms: within
    m.record("RCPT", 250, MINUTE - 5 * MS, MINUTE - 1)  # 5 ms: over
    m.record("RCPT", 250, MINUTE, MINUTE + 10 * US)  # next minute: closes the first
    last = m.slo.last
    assert last is not None and (last.commands, last.within) == (2, 1)
    assert m.slo.rolling(MINUTE + 1) == (3, 2)
    m.record(DATA_END, 250, MINUTE, MINUTE + 50 * MS)  # not a command
    m.record("NOOP", 250, 2 * MINUTE, 2 * MINUTE + 2 * MS)  # closes the second
    last = m.slo.last
    assert last is not None and (last.commands, last.within) == (1, 1)
    now[0] = 3 * MINUTE
    assert m.tick() is not None  # the third minute's NOOP, over the threshold
    last = m.slo.last
    assert last is not None and (last.commands, last.within) == (1, 0)


def test_record_counts_messages_and_keeps_data_end_out_of_the_slo() -> None:
    m = Metrics(clock=lambda: 0)
    m.record(DATA_END, 250, 0, 50 * MS)  # a slow fsync is not a slow command
    m.record(DATA_END, 552, 0, 1 * MS, "5.3.4")
    m.record(DATA_END, 451, 0, 1 * MS, "4.3.0")
    m.record(UNKNOWN, 500, 0, 10 * MS)
    m.record("DATA", 354, 0, 10 * US)
    assert m.messages_accepted == 1
    assert m.messages_rejected == {"too_big": 1, "storage_error": 1}
    assert m.slo.rolling(0) == (1, 1)  # only the DATA command
    assert m.commands[("DATA", "2xx")] == 1 and m.commands[("DATA", "3xx")] == 1
    assert m.commands[("DATA", "5xx")] == 1 and m.commands[("DATA", "4xx")] == 1
    assert m.kinds[DATA_END].count == 3


def test_format_stats_reads_the_exposition() -> None:
    from prometheus_client import generate_latest

    m = Metrics(clock=lambda: 0)
    for i in range(200):
        m.record("MAIL", 250, 0, (10 + i % 20) * US)
    m.record(DATA_END, 250, 0, 3 * MS)
    m.sessions_total = 3
    text = generate_latest(m.registry()).decode()  # type: ignore[arg-type]
    table = format_stats(text)
    assert "objective: 99.00% of commands within 1 ms" in table
    row = next(line for line in table.splitlines() if line.startswith("MAIL "))
    cols = row.split()
    assert cols[1] == "200"
    assert 15 <= float(cols[3]) <= 25  # p50 µs
    assert cols[5] == "100.00%"
    assert "DATA-END" in table and "3 total" in table
    assert "last 60 s: 200 commands, 100.000% within" in table


# --- configuration ---------------------------------------------------------------

@pytest.mark.parametrize("text,value", [("1ms", 0.001), ("250us", 0.00025),
                                        ("0.002", 0.002), ("2 ms", 0.002)])
def test_slo_threshold_setting(text: str, value: float) -> None:
    assert load({"slo_threshold": text, "storage": "null"}, {}, None).slo_threshold \
        == pytest.approx(value)


@pytest.mark.parametrize("text,value", [("99%", 0.99), ("0.999", 0.999), ("100%", 1.0)])
def test_slo_target_setting(text: str, value: float) -> None:
    assert load({"slo_target": text, "storage": "null"}, {}, None).slo_target \
        == pytest.approx(value)


@pytest.mark.parametrize("flag,text", [("slo_target", "99"), ("slo_target", "0%"),
                                       ("slo_threshold", "fast"), ("slo_threshold", "0"),
                                       ("metrics_port", "70000")])
def test_bad_metrics_settings_are_refused(flag: str, text: str) -> None:
    with pytest.raises(ConfigError, match="--" + flag.replace("_", "-")):
        load({flag: text, "storage": "null"}, {}, None)


def test_metrics_settings_from_environment() -> None:
    c = load({"storage": "null"}, {"SIMPLESMTP_METRICS_PORT": "0",
                                   "SIMPLESMTP_SLO_THRESHOLD": "500us"}, None)
    assert c.metrics_port == 0 and c.slo_threshold == pytest.approx(0.0005)
    assert load({"storage": "null"}, {}, None).metrics_port is None  # off by default


# --- the running server ----------------------------------------------------------

def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in an exposition (0 if absent)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        m = re.match(r"([a-zA-Z_:]+)(\{[^}]*\})?\s+(\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(m.group(3))
    return 0.0


def _one_session(host: str, port: int, *, big: bytes | None = None) -> None:
    with RawSMTP(host, port) as c:
        c.ehlo()
        c.envelope("a@example.org", "b@example.net")
        assert c.data(b"Subject: t\r\n\r\nhello\r\n").code == 250
        assert c.cmd("NOOP").code == 250
        assert c.cmd("FROB").code == 500
        if big is not None:
            c.envelope("a@example.org", "b@example.net")
            assert c.data(big).code == 552
        assert c.cmd("QUIT").code == 221


ALICE = "alice@example.com"


def test_a_message_stored_after_the_client_reset_is_counted(server_factory) -> None:
    # The client resets the connection right after the end-of-data mark:
    # the message is stored (group commit, in a thread) and its 250 finds
    # the peer gone.  The counters must still agree with the Maildir.
    srv = server_factory()
    for _ in range(3):
        c = RawSMTP(srv.host, srv.port)
        assert c.cmd("EHLO client.example").code == 250
        assert c.cmd("MAIL FROM:<a@b.example>").code == 250
        assert c.cmd(f"RCPT TO:<{ALICE}>").code == 250
        assert c.cmd("DATA").code == 354
        c.send(b"Subject: reset\r\n\r\nhi\r\n.\r\n")
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.sock.close()
    assert srv.wait_idle()
    stored = len(delivered(srv.mail_dir, ALICE))
    assert stored >= 1
    m = srv.server.metrics
    assert srv.call(lambda: m.messages_accepted) == stored
    assert srv.call(lambda: m.kinds[DATA_END].codes) == {250: stored}


def test_metrics_endpoint_moves_after_a_session(server_factory) -> None:
    srv = server_factory(metrics_port=0, max_message_size=4096)
    host, mport = srv.server.metrics_addresses[0]
    base = f"http://{host}:{mport}"
    status, before = _get(base + "/metrics")
    assert status == 200
    assert _sample(before, "simplesmtp_sessions_total") == 0

    _one_session(srv.host, srv.port, big=b"x" * 200 + b"\r\n" + b"y" * 8000 + b"\r\n")
    assert srv.wait_idle()
    status, text = _get(base + "/metrics")
    assert status == 200
    assert _sample(text, "simplesmtp_sessions_total") == 1
    assert _sample(text, "simplesmtp_sessions_open") == 0
    assert _sample(text, "simplesmtp_messages_accepted_total") == 1
    assert _sample(text, "simplesmtp_messages_rejected_total", reason="too_big") == 1
    assert _sample(text, "simplesmtp_commands_total", verb="EHLO", **{"class": "2xx"}) == 1
    assert _sample(text, "simplesmtp_commands_total", verb="MAIL", **{"class": "2xx"}) == 2
    assert _sample(text, "simplesmtp_commands_total", verb="DATA", **{"class": "3xx"}) == 2
    assert _sample(text, "simplesmtp_commands_total", verb="UNKNOWN", **{"class": "5xx"}) == 1
    assert _sample(text, "simplesmtp_received_bytes_total") > 8000
    for kind, n in (("EHLO", 1), ("MAIL", 2), ("RCPT", 2), ("DATA", 2), ("NOOP", 1),
                    ("QUIT", 1), ("DATA-END", 2), ("UNKNOWN", 1)):
        assert _sample(text, "simplesmtp_command_duration_seconds_count", kind=kind) == n, kind
        assert _sample(text, "simplesmtp_command_duration_seconds_bucket",
                       kind=kind, le="+Inf") == n
    assert _sample(text, "simplesmtp_command_duration_seconds_sum", kind="DATA-END") > 0
    # EHLO MAIL RCPT DATA NOOP MAIL RCPT DATA QUIT: nine valid commands.
    assert _sample(text, "simplesmtp_slo_rolling_commands") == 9
    assert _sample(text, "simplesmtp_slo_threshold_seconds") == 0.001

    status, body = _get(base + "/healthz")
    assert (status, body) == (200, "ok\n")
    assert _get(base + "/nothing")[0] == 404


def test_bdat_chunk_replies_and_rset_do_not_count_as_message_ends(server_factory) -> None:
    srv = server_factory(metrics_port=0)
    with RawSMTP(srv.host, srv.port) as c:
        c.ehlo()
        c.envelope("a@example.org", "b@example.net")
        c.send(b"BDAT 5\r\nhello")
        assert c.reply().code == 250
        assert c.cmd("RSET").code == 250  # aborts the BDAT transaction
        c.envelope("a@example.org", "b@example.net")
        assert [r.code for r in c.bdat([b"Subject: x\r\n\r\n", b"body\r\n"])] == [250, 250]
        assert c.cmd("DATA").code == 503  # no transaction: a DATA command, not an end
    assert srv.wait_idle()
    m = srv.server.metrics
    assert srv.call(lambda: m.kinds[DATA_END].count) == 1
    assert srv.call(lambda: m.kinds["BDAT"].count) == 2
    assert srv.call(lambda: m.kinds["DATA"].count) == 1
    assert srv.call(lambda: m.messages_accepted) == 1


def test_per_session_report_only_when_enabled(server_factory, caplog) -> None:
    caplog.set_level(logging.INFO, logger="simplesmtp.session")
    quiet = server_factory(storage=None)
    _one_session(quiet.host, quiet.port)
    assert quiet.wait_idle()
    assert not [r for r in caplog.records if "event=session_latency" in r.getMessage()]

    loud = server_factory(measure_performance=True)
    _one_session(loud.host, loud.port)
    assert loud.wait_idle()
    lines = [r.getMessage() for r in caplog.records
             if "event=session_latency" in r.getMessage()]
    assert len(lines) == 1
    line = lines[0]
    assert re.search(r"session=\d+ unit=us ", line)
    for kind, n in (("EHLO", 1), ("MAIL", 1), ("RCPT", 1), ("DATA", 1), ("DATA-END", 1),
                    ("NOOP", 1), ("QUIT", 1), ("UNKNOWN", 1)):
        m = re.search(rf"(?:^| ){re.escape(kind)}=n:(\d+),mean:([\d.]+),p50:([\d.]+),"
                      rf"p99:([\d.]+),max:([\d.]+)", line)
        assert m, (kind, line)
        count, mean, p50, p99, mx = int(m[1]), *map(float, m.group(2, 3, 4, 5))
        assert count == n
        assert 0 < p50 <= p99 <= mx and mean <= mx


def test_legacy_measure_performance_key(tmp_path) -> None:
    env = tmp_path / ".env"
    env.write_text("MEASURE_PERFORMANCE=true\n")
    assert load({"storage": "null"}, {}, str(env)).measure_performance is True


def test_stats_command_prints_the_table(server_factory, run_cli) -> None:
    srv = server_factory(metrics_port=0)
    _one_session(srv.host, srv.port)
    assert srv.wait_idle()
    _, mport = srv.server.metrics_addresses[0]
    res = run_cli("stats", "--metrics-port", str(mport))
    assert res.returncode == 0, res.stderr
    assert "objective: 99.00% of commands within 1 ms" in res.stdout
    rows = {line.split()[0]: line.split() for line in res.stdout.splitlines()
            if line[:1].isupper() and len(line.split()) == 6}
    assert rows["EHLO"][1] == "1" and rows["DATA-END"][1] == "1"


def test_stats_command_without_a_server_fails_cleanly(run_cli, smtp_server) -> None:
    import socket

    with socket.socket() as s:  # a port that nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    res = run_cli("stats", "--url", f"http://127.0.0.1:{closed}/metrics")
    assert res.returncode == 1
    assert "cannot read" in res.stderr and "Traceback" not in res.stderr
    # Something that is not an HTTP server (our own SMTP port) is no crash either.
    res = run_cli("stats", "--metrics-port", str(smtp_server.port))
    assert res.returncode == 1
    assert "cannot read" in res.stderr and "Traceback" not in res.stderr
    assert run_cli("stats").returncode == 2


def _raw_http(host: str, port: int, request: bytes) -> bytes:
    import socket

    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(request)
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except ConnectionResetError:
            # The server closed with our unread request bytes in its buffer.
            return data or b"RESET"
    return data


def test_metrics_http_refuses_what_it_does_not_serve(server_factory) -> None:
    srv = server_factory(metrics_port=0)
    host, mport = srv.server.metrics_addresses[0]
    assert _raw_http(host, mport, b"POST /metrics HTTP/1.1\r\n\r\n").startswith(
        b"HTTP/1.1 405 ")
    assert _raw_http(host, mport, b"nonsense\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    huge = b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n"
    answer = _raw_http(host, mport, huge)
    assert answer.startswith(b"HTTP/1.1 400 ") or answer == b"RESET", answer[:80]
    head = _raw_http(host, mport, b"HEAD /metrics HTTP/1.1\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")
    # The SMTP side is unaffected.
    with RawSMTP(srv.host, srv.port) as c:
        assert c.cmd("NOOP").code == 250


def test_format_stats_shows_a_missed_window() -> None:
    from prometheus_client import generate_latest

    now = [0]
    m = Metrics(clock=lambda: now[0])
    for i in range(50):
        m.record("NOOP", 250, i * MS, i * MS + (3 * MS if i < 5 else 20 * US))
    now[0] = MINUTE + 1
    m.tick()
    table = format_stats(generate_latest(m.registry()).decode())
    assert "last window: 50 commands, 90.000% within: MISSED" in table
    assert "(windows met 0, missed 1)" in table
    row = next(line for line in table.splitlines() if line.startswith("NOOP "))
    assert row.split()[5] == "90.00%"


def test_auth_is_timed_across_the_password_check_and_kept_out_of_the_slo(
        server_factory, tmp_path) -> None:
    import base64
    import time

    from argon2 import PasswordHasher

    from simplesmtp.users import UserStore

    path = tmp_path / "users"
    UserStore(str(path), hasher=PasswordHasher(time_cost=1, memory_cost=64,
                                               parallelism=1)).add("u@example.com", "Pw-1234-abcd")
    srv = server_factory(users_file=str(path), allow_insecure_auth=True,
                         auth_failure_delay=0.0, local_domain=("example.com",))
    users = srv.server.users
    real = users.resolve

    def slow_resolve(request):  # runs in the auth thread
        time.sleep(0.05)
        return real(request)

    users.resolve = slow_resolve
    token = base64.b64encode(b"\0u@example.com\0Pw-1234-abcd").decode()
    wrong = base64.b64encode(b"\0u@example.com\0nope").decode()
    with RawSMTP(srv.host, srv.port) as c:
        c.ehlo()
        assert c.cmd(f"AUTH PLAIN {wrong}").code == 535
        assert c.cmd(f"AUTH PLAIN {token}").code == 235
        assert c.cmd("NOOP").code == 250
    assert srv.wait_idle()
    m = srv.server.metrics
    auth = srv.call(lambda: m.kinds["AUTH"])
    assert auth.count == 2
    assert auth.sum_ns >= 2 * 50_000_000  # the check's time is in the figure
    assert srv.call(lambda: m.auth_failures) == 1
    assert srv.call(lambda: m.slo.rolling(m.clock())) == (2, 2)  # EHLO and NOOP only


def test_bucket_lookup_table_agrees_with_bisection() -> None:
    # The table lookup must put every latency where bisection over the
    # inclusive bounds would, at the bounds and beside them.
    import bisect

    from simplesmtp.metrics import bucket_index

    probes = {0, 1, 999, 1000, 1001, 10**7 - 1, 10**7, 10**7 + 1, 10**12, -5}
    for bound in BUCKETS_NS:
        probes.update({bound - 1, bound, bound + 1})
    for ns in sorted(probes):
        assert bucket_index(ns) == bisect.bisect_left(BUCKETS_NS, ns), ns
