"""The benchmark's ``--quick`` mode works end to end (not a measurement).

It starts simplesmtp twice (null and Maildir storage) on free 127.0.0.1
ports, drives a few hundred messages through Postfix's smtp-source, runs
the latency probe, and must leave a table, raw figures and a chart.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent



def test_bench_quick_writes_table_json_and_chart(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--quiet", "--out",
                           str(out)], cwd=REPO, capture_output=True, timeout=180,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]

    md = (out / "results.md").read_text()
    for label in ("simplesmtp (--storage null)", "simplesmtp (--storage maildir)"):
        row = next(line for line in md.splitlines()
                   if line.startswith(f"| {label} |") and "/" not in line)
        rates = [float(x) for x in re.findall(r"\|\s*(\d+(?:\.\d+)?)\s*(?=\|)", row)]
        assert len(rates) == 2 and all(r > 0 for r in rates), row

    summary = json.loads((out / "results.json").read_text())
    by_name = {s["name"]: s for s in summary["servers"]}
    assert set(by_name) == {"simplesmtp-null", "simplesmtp-maildir"}
    for s in by_name.values():
        for scen in ("1x1KB", "20x1KB"):
            run = s["scenarios"][scen]["runs"][0]
            assert run["messages"] == 200 and run["rate"] > 0
            assert s["scenarios"][scen]["cpu_us_per_msg"] >= 0
        assert s["probe"]["MAIL"]["n"] == 20 and s["probe"]["DATA-END"]["p99_us"] > 0
        # Inside-server figures come from the server's own /metrics.
        assert s["inside"]["RCPT"]["count"] == 20
    # Durable delivery costs a disk flush; the null store does not.
    assert by_name["simplesmtp-maildir"]["inside"]["DATA-END"]["p50_us"] > \
        by_name["simplesmtp-null"]["inside"]["DATA-END"]["p50_us"]

    png = (out / "chart.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    # The servers' scratch directories are gone.
    assert not list(out.glob("work-*"))


def test_tls_cost_benchmark_runs_and_reports_every_kind(tmp_path):
    out = tmp_path / "tls"
    proc = subprocess.run([sys.executable, "-m", "bench.tls_cost", "--sessions", "3",
                           "--out", str(out)], capture_output=True, text=True, timeout=180,
                          cwd=str(Path(__file__).resolve().parent.parent))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = (out / "tls.md").read_text()
    for kind in ("| plain |", "| STARTTLS |", "| implicit TLS |"):
        assert kind in report
