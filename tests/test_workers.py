"""``--workers N``: processes sharing the port, stopped together."""

from __future__ import annotations

import re
import signal
from concurrent.futures import ThreadPoolExecutor

from clients import send_numbered
from conftest import all_delivered


def test_two_workers_share_the_port_and_stop_together(spawn_server, tmp_path) -> None:
    proc = spawn_server("--workers", "2")
    started = [proc.wait_for(r"event=worker_started worker=0 pid=(\d+)"),
               proc.wait_for(r"event=worker_started worker=1 pid=(\d+)")]
    pids = {int(m.group(1)) for m in started}
    assert len(pids) == 2
    proc.wait_for(rf"event=listening host=127.0.0.1 port={proc.port} ", start=0)
    # Both workers listen on the one port the supervisor resolved from 0.
    listening = [line for line in proc.lines if "event=listening" in line]
    assert len({re.search(r"port=(\d+)", line).group(1) for line in listening}) == 1

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda i: send_numbered(proc.host, proc.port, i), range(40)))
    assert codes == [250] * 40
    files = all_delivered(tmp_path / "mail")
    assert len(files) == 40
    # Maildir names carry the pid: the kernel spread the sessions over both.
    served = {int(re.search(r"P(\d+)Q", f.name).group(1)) for f in files}
    assert served == pids

    proc.signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    assert len([line for line in proc.lines if "event=stopped" in line]) == 2


def test_a_worker_that_dies_stops_the_others(spawn_server) -> None:
    import os

    proc = spawn_server("--workers", "2")
    m = proc.wait_for(r"event=worker_started worker=1 pid=(\d+)")
    os.kill(int(m.group(1)), signal.SIGKILL)
    assert proc.wait(15) == 1
    proc.wait_for(r"event=worker_exited worker=1 .*code=-9")
