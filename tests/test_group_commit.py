"""Group commit: a batch shares its flushes, and one bad message fails alone."""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor

from simplesmtp.address import Address
from simplesmtp.committer import BatchCommitter
from simplesmtp.storage import Envelope
from simplesmtp.storage.maildir import MaildirStorage


def _writer(storage: MaildirStorage, qid: str, rcpt: str, body: bytes):
    local, domain = rcpt.split("@")
    w = storage.open(Envelope(qid, Address("s", "x.example"), (Address(local, domain),)))
    w.write(body)
    return w


def _new_files(root, rcpt: str) -> list[bytes]:
    local, domain = rcpt.split("@")
    new = root / domain / local / "new"
    return sorted(p.read_bytes() for p in new.iterdir()) if new.is_dir() else []


def _tmp_files(root) -> list[str]:
    return [str(p) for p in root.glob("*/*/tmp/*")]


def test_batch_commits_every_message_durably(tmp_path):
    storage = MaildirStorage(str(tmp_path), hostname="h.test")
    writers = [_writer(storage, f"Q{i}", f"u{i % 3}@d.test", b"msg %d\r\n" % i)
               for i in range(12)]
    errors = storage.commit_many(writers)
    assert errors == [None] * 12
    got = sum((_new_files(tmp_path, f"u{k}@d.test") for k in range(3)), [])
    assert sorted(got) == sorted(b"msg %d\r\n" % i for i in range(12))
    assert _tmp_files(tmp_path) == []


def test_one_failing_message_leaves_the_rest_of_its_batch_delivered(tmp_path):
    storage = MaildirStorage(str(tmp_path), hostname="h.test")
    # A mailbox whose new/ is a regular file cannot take a link.
    bad = tmp_path / "d.test" / "bad"
    (bad / "tmp").mkdir(parents=True)
    (bad / "cur").mkdir()
    (bad / "new").write_text("not a directory")
    writers = [
        _writer(storage, "Q1", "good@d.test", b"one\r\n"),
        _writer(storage, "Q2", "bad@d.test", b"two\r\n"),
        _writer(storage, "Q3", "good@d.test", b"three\r\n"),
    ]
    errors = storage.commit_many(writers)
    assert errors[0] is None and errors[2] is None
    assert isinstance(errors[1], OSError)
    assert _new_files(tmp_path, "good@d.test") == [b"one\r\n", b"three\r\n"]
    assert _tmp_files(tmp_path) == []  # the failed one left nothing behind


def test_committer_groups_concurrent_messages_into_fewer_batches(tmp_path):
    storage = MaildirStorage(str(tmp_path), hostname="h.test")
    executor = ThreadPoolExecutor(max_workers=4)

    async def main() -> int:
        committer = BatchCommitter(storage, executor)
        futs = [committer.submit(_writer(storage, f"Q{i}", "a@d.test", b"%d\r\n" % i))
                for i in range(40)]
        await asyncio.gather(*futs)
        await committer.drain()
        return committer.batches

    try:
        batches = asyncio.run(main())
    finally:
        executor.shutdown()
    # All 40 were handed over before the first batch could finish: the
    # first goes alone, the other 39 share the next one.
    assert batches == 2
    assert len(_new_files(tmp_path, "a@d.test")) == 40


def test_committer_reports_a_failure_to_its_message_only(tmp_path):
    storage = MaildirStorage(str(tmp_path), hostname="h.test")
    bad = tmp_path / "d.test" / "bad"
    (bad / "tmp").mkdir(parents=True)
    (bad / "cur").mkdir()
    (bad / "new").write_text("x")
    executor = ThreadPoolExecutor(max_workers=2)

    async def main() -> list[object]:
        committer = BatchCommitter(storage, executor)
        futs = [committer.submit(_writer(storage, "Q1", "ok@d.test", b"a\r\n")),
                committer.submit(_writer(storage, "Q2", "bad@d.test", b"b\r\n")),
                committer.submit(_writer(storage, "Q3", "ok@d.test", b"c\r\n"))]
        return await asyncio.gather(*futs, return_exceptions=True)

    try:
        results = asyncio.run(main())
    finally:
        executor.shutdown()
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], OSError)
    assert os.listdir(bad / "tmp") == []
