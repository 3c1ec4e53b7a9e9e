"""Run every fuzz target for a bounded time, all at once; fail on a crash.

    python fuzz/run.py [--seconds 60] [--work DIR]

Each target starts from its seeds (``fuzz/seeds/<target>``) plus what earlier
runs in the same ``--work`` directory found, and stops by itself after
``--seconds`` (libFuzzer's ``-max_total_time``).  A crashing input is saved
as ``<work>/crash-<target>-*``; copy it into ``fuzz/regressions/<target>/``
(the test suite replays every file there) before fixing the bug.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGETS = {"engine": HERE / "fuzz_engine.py", "address": HERE / "fuzz_address.py"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=60, help="per target (bounded)")
    parser.add_argument("--work", type=Path, default=None, help="corpus and crash directory")
    parser.add_argument("targets", nargs="*", metavar="TARGET",
                        help=f"some of {', '.join(sorted(TARGETS))} (default: all)")
    args = parser.parse_args()
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown target(s): {', '.join(sorted(unknown))}")
    args.targets = args.targets or sorted(TARGETS)
    work = args.work or Path(tempfile.mkdtemp(prefix="simplesmtp-fuzz-"))
    procs = {}
    for name in args.targets:
        corpus = work / f"corpus-{name}"
        corpus.mkdir(parents=True, exist_ok=True)
        for seed in (HERE / "seeds" / name).glob("*"):
            shutil.copy(seed, corpus / seed.name)
        cmd = [sys.executable, str(TARGETS[name]), str(corpus),
               f"-max_total_time={args.seconds}", "-timeout=10", "-rss_limit_mb=1024",
               "-max_len=4096", f"-artifact_prefix={work}/crash-{name}-",
               "-print_final_stats=1"]
        log = open(work / f"{name}.log", "w")
        procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log)
    failed = []
    for name, (proc, log) in procs.items():
        try:
            rc = proc.wait(args.seconds + 120)  # libFuzzer stops itself; this is a backstop
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        log.close()
        text = (work / f"{name}.log").read_text(errors="replace")
        runs = [line for line in text.splitlines() if line.startswith("stat::number_of_executed_units")]
        print(f"{name}: exit={rc} {runs[-1] if runs else ''}")
        if rc != 0:
            failed.append(name)
            print(text[-4000:])
    crashes = sorted(work.glob("crash-*"))
    for c in crashes:
        print(f"crash input: {c}")
    return 1 if failed or crashes else 0


if __name__ == "__main__":
    sys.exit(main())
