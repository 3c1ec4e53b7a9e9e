"""Regressions found by a last newcomer's walk through the README.

Each test is named after what it guards: things a user runs into by
following the README or by mistyping a setting.
"""

from __future__ import annotations

import itertools
import re
import signal
from concurrent.futures import ThreadPoolExecutor

import pytest
from clients import send_numbered

from simplesmtp import trace
from simplesmtp.config import ConfigError, load

# --- simplesmtp stats -------------------------------------------------------


def test_stats_of_a_page_that_is_not_metrics_fails_without_a_traceback(
        server_factory, run_cli) -> None:
    # A URL that answers 200 with something other than the Prometheus text
    # format (here our own /healthz) must be a one-line error, exit code 1.
    srv = server_factory(metrics_port=0)
    _, mport = srv.server.metrics_addresses[0]
    res = run_cli("stats", "--url", f"http://127.0.0.1:{mport}/healthz")
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert res.stderr_lines[-1].startswith("simplesmtp: error:")
    assert "/healthz" in res.stderr


def test_stats_checks_the_metrics_port_like_serve_does(run_cli) -> None:
    # 99999 must not be sent to urllib (which wraps it round to another
    # port): a bad port is a usage error, exit code 2, before any traffic.
    for bad in ("99999", "abc", "-1"):
        res = run_cli("stats", "--metrics-port", bad)
        assert res.returncode == 2, (bad, res.stderr)
        assert "--metrics-port" in res.stderr and "cannot read" not in res.stderr
    res = run_cli("stats", env={"SIMPLESMTP_METRICS_PORT": "70000"})
    assert res.returncode == 2, res.stderr
    assert "SIMPLESMTP_METRICS_PORT" in res.stderr


# --- .env files ---------------------------------------------------------------


def test_env_file_that_is_not_utf8_is_a_config_error(tmp_path, run_cli) -> None:
    env = tmp_path / ".env"
    env.write_bytes(b"SIMPLESMTP_HOSTNAME=h\xe9llo\n")
    with pytest.raises(ConfigError, match="UTF-8"):
        load({"storage": "null"}, {}, str(env))
    # The commands that read .env say so in one line, exit code 2.
    res = run_cli("user", "list", "--users-file", str(tmp_path / "users"))
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert ".env" in res.stderr and "UTF-8" in res.stderr
    res = run_cli("serve", "--port", "0", "--storage", "null")
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr


def test_env_file_key_with_a_typo_is_warned_about(tmp_path, caplog) -> None:
    # SIMPLESMTP_MAX_ERROR (no S) would otherwise be dropped without a word.
    env = tmp_path / ".env"
    env.write_text("SIMPLESMTP_MAX_ERROR=5\nSIMPLESMTP_MAX_ERRORS=7\nOTHER_TOOL=1\n")
    with caplog.at_level("WARNING", logger="simplesmtp.config"):
        config = load({"storage": "null"}, {}, str(env))
    assert config.max_errors == 7
    warned = [r.getMessage() for r in caplog.records if "config_unknown_key" in r.getMessage()]
    assert len(warned) == 1, warned
    assert "key=SIMPLESMTP_MAX_ERROR " in warned[0] + " "
    assert "OTHER_TOOL" not in warned[0]


# --- --slo-target -------------------------------------------------------------


def test_slo_target_error_explains_a_bare_number(tmp_path) -> None:
    # "99" is between 0 and 100: the message must not say it is not, and
    # must show the two ways of writing the share.
    with pytest.raises(ConfigError) as info:
        load({"storage": "null", "slo_target": "99"}, {}, None)
    text = str(info.value)
    assert "--slo-target" in text
    assert "not between 0 and 100%" not in text
    assert "99%" in text and "0.99" in text


# --- --workers: ids in the one shared log ---------------------------------------


def test_workers_number_sessions_apart_in_the_shared_log(spawn_server) -> None:
    proc = spawn_server("--workers", "2")
    pids = {proc.wait_for(rf"event=worker_started worker={i} pid=(\d+)").group(1)
            for i in (0, 1)}
    assert len(pids) == 2
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda i: send_numbered(proc.host, proc.port, i), range(30)))
    assert codes == [250] * 30
    proc.signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    connects = [re.search(r"session=(\S+)", line).group(1)
                for line in proc.lines if "event=connect " in line]
    assert len(connects) == 30
    # Both workers log to the same stderr: a session id must name one session.
    assert len(set(connects)) == 30, sorted(connects)
    queue_ids = [re.search(r"queue_id=(\S+)", line).group(1)
                 for line in proc.lines if "event=accepted " in line]
    assert len(queue_ids) == 30 and len(set(queue_ids)) == 30


def test_queue_ids_of_workers_differ_within_one_microsecond(monkeypatch) -> None:
    # Forked workers start with the same counter: two messages in the same
    # microsecond must still get different queue ids.
    monkeypatch.setattr(trace.time, "time_ns", lambda: 1_796_400_000_000_000_000)
    ids = []
    try:
        for index in range(3):
            trace.set_worker(index, 3)
            monkeypatch.setattr(trace, "_counter", itertools.count())
            ids += [trace.new_queue_id() for _ in range(5)]
    finally:
        trace.set_worker(0, 1)
    assert len(set(ids)) == len(ids), ids
    assert all(len(i) == 16 for i in ids)
