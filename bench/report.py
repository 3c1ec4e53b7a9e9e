"""Turning the raw figures into a summary, a markdown table and a chart."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .probe import COMMANDS
from .servers import ServerSpec

BASELINE = "smtp-sink"


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def _pct(values: list[int], q: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    return s[min(len(s), max(1, math.ceil(q * len(s)))) - 1] / 1000


def summarise(specs: list[ServerSpec], loads: dict[str, Any], probes: dict[str, Any],
              inside: dict[str, Any], cost_ns: float, info: dict[str, Any]) -> dict[str, Any]:
    servers = []
    for spec in specs:
        scen = {}
        for name, runs in loads[spec.name].items():
            scen[name] = {"rate": _median([r["rate"] for r in runs]),
                          "cpu_us_per_msg": _median([r["cpu_us_per_msg"] for r in runs]),
                          "runs": runs}
        lat = {k: {"n": len(v), "p50_us": _pct(v, 0.5), "p90_us": _pct(v, 0.9),
                   "p99_us": _pct(v, 0.99)} for k, v in probes[spec.name].items() if v}
        servers.append({"name": spec.name, "label": spec.label, "durable": spec.durable,
                        "scenarios": scen, "probe": lat, "inside": inside.get(spec.name, {})})
    base = next((s for s in servers if s["name"] == BASELINE), None)
    for s in servers:
        for name, sc in s["scenarios"].items():
            ref = base["scenarios"].get(name) if base else None
            sc["vs_sink"] = sc["rate"] / ref["rate"] if ref else math.nan
    return {"conditions": info, "servers": servers, "measurement_cost_ns": cost_ns,
            "targets": _targets(servers, cost_ns)}


def _get(servers: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    return next((s for s in servers if s["name"] == name), None)


def _targets(servers: list[dict[str, Any]], cost_ns: float) -> list[dict[str, Any]]:
    """Issue 5's targets, each with the measured figure and a verdict."""
    out: list[dict[str, Any]] = []

    def add(text: str, value: float, goal: float, higher: bool, fmt: str) -> None:
        if math.isnan(value):
            return
        ok = value >= goal if higher else value < goal
        out.append({"target": text, "measured": fmt.format(value), "met": ok})

    ss_md, ai_md = _get(servers, "simplesmtp-maildir"), _get(servers, "aiosmtpd-maildir")
    ss_null = _get(servers, "simplesmtp-null")
    sink = _get(servers, BASELINE)
    if ss_md and ai_md and "20x1KB" in ss_md["scenarios"] and "20x1KB" in ai_md["scenarios"]:
        add("Maildir, 20x1KB: >= 3x aiosmtpd Maildir+fsync",
            ss_md["scenarios"]["20x1KB"]["rate"] / ai_md["scenarios"]["20x1KB"]["rate"],
            3.0, True, "{:.2f}x")
    ss_w2 = _get(servers, "simplesmtp-null-w2")
    if ss_null and sink:
        for scen, goal in (("20x1KB", 0.5), ("20x100KB", 0.8)):
            if scen in ss_null["scenarios"]:
                add(f"null store, {scen}: >= {goal} of smtp-sink",
                    ss_null["scenarios"][scen]["vs_sink"], goal, True, "{:.2f}")
            if ss_w2 and scen in ss_w2["scenarios"]:
                add(f"null store with --workers 2, {scen}: >= {goal} of smtp-sink",
                    ss_w2["scenarios"][scen]["vs_sink"], goal, True, "{:.2f}")
    if ss_null:
        cpus = [sc["cpu_us_per_msg"] for n, sc in ss_null["scenarios"].items()
                if n.endswith("x1KB")]
        if cpus:
            add("null store: server CPU per 1 KB message < 300 us", min(cpus), 300, False,
                "{:.0f} us")
        for kind in ("EHLO", "MAIL", "RCPT", "RSET", "NOOP", "DATA"):
            fig = ss_null["inside"].get(kind)
            if fig:
                add(f"inside-server p99 {kind} < 100 us (idle)", fig["p99_us"], 100, False,
                    "{:.0f} us")
        if cpus:
            # Four timed replies per message: MAIL, RCPT, DATA's 354 and the
            # end of data (smtp-source -d sends HELO and QUIT once per
            # connection of many messages).
            add("measurement overhead < 3% of CPU per message",
                4 * cost_ns / 1000 / min(cpus) * 100, 3.0, False, "{:.2f}%")
    return out


def _latency_table(title: str, servers: list[dict[str, Any]], key: str,
                   order: Sequence[str]) -> list[str]:
    """A "p50 / p99" table of ``server[key]``, one column per kind that any
    server has, in ``order``."""
    kinds = [k for k in order if any(k in s[key] for s in servers)]
    lines = ["", f"## {title}", "", "| server | " + " | ".join(kinds) + " |",
             "| --- | " + " | ".join("---:" for _ in kinds) + " |"]
    for s in servers:
        cells = [f"{s[key][k]['p50_us']:.0f} / {s[key][k]['p99_us']:.0f}"
                 if k in s[key] else "" for k in kinds]
        lines.append(f"| {s['label']} | " + " | ".join(cells) + " |")
    return lines


def write_markdown(summary: dict[str, Any]) -> str:
    servers = summary["servers"]
    scen_names = [n for n in ("1x1KB", "20x1KB", "1x100KB", "20x100KB")
                  if any(n in s["scenarios"] for s in servers)]
    c = summary["conditions"]
    lines = [
        f"# simplesmtp benchmark ({c.get('mode')})",
        "",
        f"Measured {c['date']} on {c['cpus']} CPUs ({c['cpu_model']}), Linux {c['kernel']},"
        f" Python {c['python']}, simplesmtp {c.get('commit', '?')}; load average {c['loadavg_start'][0]:.2f} at start,"
        f" {c['loadavg_end'][0]:.2f} at end.",
        "",
        "## Throughput: messages per second (ratio to smtp-sink)",
        "",
        "| server | " + " | ".join(scen_names) + " |",
        "| --- | " + " | ".join("---:" for _ in scen_names) + " |",
    ]
    for s in servers:
        cells = []
        for n in scen_names:
            sc = s["scenarios"].get(n)
            if sc is None:
                cells.append("")
            elif math.isnan(sc["vs_sink"]):
                cells.append(f"{sc['rate']:.0f}")
            else:
                cells.append(f"{sc['rate']:.0f} ({sc['vs_sink']:.2f})")
        lines.append(f"| {s['label']} | " + " | ".join(cells) + " |")
    lines += ["", "## Server CPU time per message (microseconds)", "",
              "| server | " + " | ".join(scen_names) + " |",
              "| --- | " + " | ".join("---:" for _ in scen_names) + " |"]
    for s in servers:
        cells = [f"{s['scenarios'][n]['cpu_us_per_msg']:.0f}" if n in s["scenarios"] else ""
                 for n in scen_names]
        lines.append(f"| {s['label']} | " + " | ".join(cells) + " |")
    lines += _latency_table("Round-trip latency seen by the probe: p50 / p99 (microseconds)",
                            servers, "probe", COMMANDS)
    inside = [s for s in servers if s["inside"]]
    if inside:
        lines += _latency_table("simplesmtp inside-server latency during the probe: p50 / p99"
                                " (microseconds, from /metrics histograms)", inside, "inside",
                                ("EHLO", "MAIL", "RCPT", "DATA", "DATA-END", "NOOP", "RSET",
                                 "QUIT"))
    one, two = _get(servers, "simplesmtp-null"), _get(servers, "simplesmtp-null-w2")
    if one and two:
        parts = [f"{n} {two['scenarios'][n]['rate'] / one['scenarios'][n]['rate']:.2f}x"
                 for n in scen_names if n in one["scenarios"] and n in two["scenarios"]]
        lines += ["", "Scaling, null store, `--workers 2` against one process: "
                  + ", ".join(parts) + f" (on {c['cpus']} CPUs shared with smtp-source)."]
    if summary["targets"]:
        lines += ["", "## Targets (issue 5)", "", "| target | measured | met |",
                  "| --- | ---: | :---: |"]
        for t in summary["targets"]:
            lines.append(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |")
    lines += ["", f"One latency observation costs {summary['measurement_cost_ns']:.0f} ns"
              " (noting the reply and Metrics.record_batch, measured in process; the two"
              " clock reads per command also drive the session's timeouts).", ""]
    return "\n".join(lines)


def write_chart(summary: dict[str, Any], probes: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    servers = summary["servers"]
    scen_names = [n for n in ("1x1KB", "20x1KB", "1x100KB", "20x100KB")
                  if any(n in s["scenarios"] for s in servers)]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(17, 5.2))
    width = 0.8 / max(len(servers), 1)
    for i, s in enumerate(servers):
        xs = [j + (i - (len(servers) - 1) / 2) * width for j in range(len(scen_names))]
        ys = [s["scenarios"].get(n, {}).get("rate", 0) for n in scen_names]
        ax1.bar(xs, ys, width, label=s["label"], hatch="//" if s["durable"] else None)
    ax1.set_xticks(range(len(scen_names)), scen_names)
    ax1.set_yscale("log")
    ax1.set_ylabel("messages per second (log)")
    ax1.set_title("Throughput (smtp-source; hatched: fsync before 250)")
    ax1.legend(fontsize=7)
    ax1.grid(axis="y", alpha=0.3)
    for ax, kinds, title in ((ax2, ("MAIL", "RCPT", "DATA", "NOOP", "RSET"),
                              "Command round trip (probe)"),
                             (ax3, ("DATA-END",), "End of data to reply (probe)")):
        for s in servers:
            values = sorted(v / 1000 for k in kinds for v in probes[s["name"]].get(k, []))
            if not values:
                continue
            ys = [(i + 1) / len(values) for i in range(len(values))]
            ax.plot(values, ys, label=s["label"], drawstyle="steps-post")
        ax.set_xscale("log")
        ax.set_xlabel("microseconds (log)")
        ax.set_ylabel("share of commands at or below")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    c = summary["conditions"]
    fig.suptitle(f"simplesmtp benchmark, {c['date']}, {c['cpus']} CPUs ({c['cpu_model']})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
