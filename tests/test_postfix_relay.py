"""A real MTA relays to us over STARTTLS.

Postfix runs as a relay client only: its own configuration directory and
queue under a temporary directory, no network listener of its own (master.cf
has no inet service), ``relayhost = [127.0.0.1]:<our port>`` and
``smtp_tls_security_level = encrypt``, so it must either do STARTTLS with us
or not deliver at all.  A message handed to its ``sendmail`` must land in
our Maildir with an ``ESMTPS`` Received line.

Postfix wants to be started by root (its daemons then drop to the
``postfix`` user), so the test is skipped elsewhere.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from conftest import TEST_HOSTNAME, delivered, split_trace

POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
SENDMAIL = shutil.which("sendmail") or "/usr/sbin/sendmail"

pytestmark = [
    pytest.mark.skipif(not os.path.exists(POSTFIX), reason="postfix not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="postfix must be started as root"),
]

# Only what a relay client needs; chroot off ("n"): the queue is in tmp.
MASTER_CF = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class Postfix:
    def __init__(self, base: Path, relay_port: int, ca_file: Path) -> None:
        self.base = base
        self.conf = base / "conf"
        self.queue = base / "queue"
        self.log = base / "maillog"
        self.conf.mkdir()
        self.queue.mkdir()
        data = base / "data"
        data.mkdir()
        shutil.chown(data, "postfix")
        ca = base / "ca.pem"
        shutil.copyfile(ca_file, ca)
        os.chmod(ca, 0o644)
        (self.conf / "master.cf").write_text(MASTER_CF)
        (self.conf / "main.cf").write_text(f"""\
compatibility_level = 3.6
queue_directory = {self.queue}
data_directory = {data}
mail_owner = postfix
setgid_group = postdrop
myhostname = relay.test.example
mydomain = test.example
myorigin = $myhostname
inet_interfaces = loopback-only
inet_protocols = ipv4
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
biff = no
smtp_dns_support_level = disabled
relayhost = [127.0.0.1]:{relay_port}
smtp_tls_security_level = encrypt
smtp_tls_CAfile = {ca}
smtp_tls_loglevel = 1
maillog_file = {self.log}
maillog_file_prefixes = {base}
""")

    def run(self, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(list(args), input=stdin, capture_output=True, timeout=60)

    def start(self) -> None:
        r = self.run(POSTFIX, "-c", str(self.conf), "start")
        assert r.returncode == 0, (r.stdout + r.stderr).decode("utf-8", "replace") \
            + self.log_text()

    def sendmail(self, sender: str, rcpt: str, message: bytes) -> None:
        r = self.run(SENDMAIL, "-C", str(self.conf), "-f", sender, rcpt, stdin=message)
        assert r.returncode == 0, (r.stdout + r.stderr).decode("utf-8", "replace")

    def stop(self) -> None:
        pid = _read_pid(self.queue / "pid" / "master.pid")
        self.run(POSTFIX, "-c", str(self.conf), "stop")
        deadline = time.monotonic() + 10
        while pid is not None and _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid is not None and _alive(pid):
            os.kill(pid, signal.SIGKILL)  # the master we started did not stop

    def log_text(self) -> str:
        try:
            return "\nmaillog:\n" + self.log.read_text(errors="replace")
        except OSError:
            return "\n(no maillog)"


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


@pytest.fixture
def postfix_base() -> Iterator[Path]:
    # Not under pytest's tmp_path: Postfix's daemons run as the postfix user
    # and must reach their queue, and pytest's directories are 0700 root.
    base = Path(tempfile.mkdtemp(prefix="simplesmtp-postfix-"))
    os.chmod(base, 0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_postfix_relays_to_us_over_starttls(server_factory: Any, tmp_path: Path,
                                           postfix_base: Path) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    ca_file, cert, key = tmp_path / "ca.pem", tmp_path / "server.crt", tmp_path / "server.key"
    ca.cert_pem.write_to_path(str(ca_file))
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    running = server_factory(tls_cert=str(cert), tls_key=str(key))

    postfix = Postfix(postfix_base, running.port, ca_file)
    postfix.start()
    try:
        postfix.sendmail("sender@example.org", "alice@example.com",
                         b"Subject: relayed by Postfix\n\nover TLS, or not at all\n")
        deadline = time.monotonic() + 30
        files: list[Path] = []
        while time.monotonic() < deadline:
            files = delivered(running.mail_dir, "alice@example.com")
            if files:
                break
            time.sleep(0.1)
        assert files, "Postfix did not deliver within 30 s" + postfix.log_text()
        log = postfix.log_text()
    finally:
        postfix.stop()

    message = files[0].read_bytes()
    trace, rest = split_trace(message)
    received = trace["received"]
    assert received.startswith("from relay.test.example ([127.0.0.1])"), received
    assert f"by {TEST_HOSTNAME} (simplesmtp) with ESMTPS" in received, received
    assert re.search(r"\(using TLSv1\.[23] with cipher \S+ \(\d+/\d+ bits\)\)", received)
    assert trace["return-path"] == "<sender@example.org>"
    assert b"Subject: relayed by Postfix" in rest
    # Postfix's own account agrees: a verified TLS connection to us.
    assert re.search(r"Trusted TLS connection established to 127\.0\.0\.1", log), log
    assert "status=sent" in log
