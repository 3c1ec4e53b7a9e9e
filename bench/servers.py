"""Starting, watching and stopping the servers under test.

Every server listens on 127.0.0.1 on a port picked here (bound to port 0
by the kernel, then released), runs as a child process, and is stopped by
its PID (SIGTERM, then SIGKILL after a bounded wait).  CPU time is read
from ``/proc/<pid>/stat`` (user + system, every thread of the process).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
CLK_TCK = os.sysconf("SC_CLK_TCK")
START_TIMEOUT = 15.0  # seconds a server gets to answer its first greeting


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stat(pid: int) -> list[bytes]:
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    # Fields after the command name, which is in parentheses and may hold spaces.
    return stat[stat.rindex(b")") + 2:].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) and of its live
    child processes (``--workers``) so far."""
    pids = [pid]
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != pid:
            try:
                if int(_stat(int(entry))[1]) == pid:
                    pids.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass  # gone meanwhile, or not readable
    total = 0
    for p in pids:
        try:
            fields = _stat(p)
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK


def wait_greeting(port: int, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                if s.recv(512).startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return
        except OSError as exc:
            last = exc
        time.sleep(0.05)
    raise RuntimeError(f"no SMTP greeting on port {port} within {timeout}s: {last}")


@dataclass
class ServerSpec:
    """One contestant: a name, how to start it, and what kind it is."""

    name: str
    label: str  # for tables and charts
    kind: str  # smtp-sink | aiosmtpd | simplesmtp
    durable: bool  # fsync before 250
    options: dict[str, str] = field(default_factory=dict)

    def command(self, port: int, workdir: Path, metrics_port: int | None) -> list[str]:
        if self.kind == "smtp-sink":
            cmd = [SMTP_SINK]
            if os.geteuid() == 0:
                cmd += ["-u", "nobody"]  # required when started as root
            return cmd + [f"127.0.0.1:{port}", "1024"]
        if self.kind == "aiosmtpd":
            return [sys.executable, str(REPO / "bench" / "peers.py"),
                    "--mode", self.options["mode"], "--port", str(port),
                    "--dir", str(workdir / "maildir")]
        cmd = [sys.executable, "-m", "simplesmtp", "serve", "--host", "127.0.0.1",
               "--port", str(port), "--hostname", "simplesmtp.bench",
               "--mail-dir", str(workdir / "mail"), "--storage", self.options["storage"],
               "--log-level", "WARNING"]
        if metrics_port is not None:
            cmd += ["--metrics-port", str(metrics_port)]
        cmd += self.options.get("extra", "").split()
        return cmd


ALL_SERVERS: tuple[ServerSpec, ...] = (
    ServerSpec("smtp-sink", "Postfix smtp-sink (discard)", "smtp-sink", False),
    ServerSpec("aiosmtpd-null", "aiosmtpd (discard)", "aiosmtpd", False, {"mode": "discard"}),
    ServerSpec("aiosmtpd-maildir", "aiosmtpd (Maildir+fsync)", "aiosmtpd", True,
               {"mode": "maildir"}),
    ServerSpec("simplesmtp-null", "simplesmtp (--storage null)", "simplesmtp", False,
               {"storage": "null"}),
    ServerSpec("simplesmtp-maildir", "simplesmtp (--storage maildir)", "simplesmtp", True,
               {"storage": "maildir"}),
    # Scaling over cores: two processes sharing the port (SO_REUSEPORT).
    ServerSpec("simplesmtp-null-w2", "simplesmtp (null, --workers 2)", "simplesmtp", False,
               {"storage": "null", "extra": "--workers 2"}),
)


class RunningServer:
    def __init__(self, spec: ServerSpec, workdir: Path) -> None:
        self.spec = spec
        self.workdir = workdir / spec.name
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        # One /metrics per process: only single-process servers are scraped.
        self.metrics_port = free_port() if spec.kind == "simplesmtp" and \
            "--workers" not in spec.options.get("extra", "") else None
        env = {k: v for k, v in os.environ.items() if not k.startswith("SIMPLESMTP_")}
        env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
        self.log = open(self.workdir / "server.log", "wb")
        self.proc = subprocess.Popen(
            spec.command(self.port, self.workdir, self.metrics_port), cwd=self.workdir,
            env=env, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_greeting(self.port)
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
