"""Maildir storage on its own: layout, durability steps, names, failures."""

from __future__ import annotations

import mailbox
import os
import shutil
import stat
import time
from pathlib import Path

import pytest
from clients import RawSMTP
from conftest import all_delivered, delivered, tmp_files
from hypothesis import given, settings
from hypothesis import strategies as st

from simplesmtp.address import Address
from simplesmtp.storage import Envelope
from simplesmtp.storage.maildir import SPILL_THRESHOLD, MaildirStorage, encode_name

HOST = "mx.test.example"
SENDER = Address("sender", "client.example")


def _deliver(storage: MaildirStorage, rcpts: list[Address], data: bytes,
             qid: str = "Q1", flush_every: int | None = None) -> None:
    writer = storage.open(Envelope(qid, SENDER, tuple(rcpts)))
    step = flush_every or len(data) or 1
    for i in range(0, len(data), step):
        writer.write(data[i:i + step])
        if writer.needs_flush:
            writer.flush()
    writer.commit()


def test_layout_and_content(tmp_path):
    storage = MaildirStorage(str(tmp_path / "mail"), hostname=HOST)
    data = b"Subject: hi\r\n\r\nbody\r\n"
    _deliver(storage, [Address("Alice", "Example.COM")], data, qid="ABC123")
    box = tmp_path / "mail" / "example.com" / "alice"
    assert sorted(p.name for p in box.iterdir()) == ["cur", "new", "tmp"]
    files = list((box / "new").iterdir())
    assert len(files) == 1
    name = files[0].name
    assert "ABC123" in name and name.endswith(f",S={len(data)}")
    assert ":" not in name and "/" not in name
    assert files[0].read_bytes() == data
    assert not list((box / "tmp").iterdir())
    assert stat.S_IMODE(box.stat().st_mode) == 0o700
    md = mailbox.Maildir(str(box), create=False)
    assert [md.get_bytes(k) for k in md.keys()] == [data]


def test_large_message_spills_and_is_whole(tmp_path):
    storage = MaildirStorage(str(tmp_path), hostname=HOST)
    data = os.urandom(3 * SPILL_THRESHOLD + 12345)
    _deliver(storage, [Address("a", "d.example")], data, flush_every=65536)
    files = all_delivered(tmp_path)
    assert len(files) == 1 and files[0].read_bytes() == data


def test_one_copy_per_mailbox_hard_linked(tmp_path):
    storage = MaildirStorage(str(tmp_path), hostname=HOST)
    rcpts = [Address("a", "one.example"), Address("B", "one.example"),
             Address("b", "ONE.example"), Address('"b"', "one.example"),
             Address("c", "two.example")]
    _deliver(storage, rcpts, b"x\r\n")
    files = all_delivered(tmp_path)
    assert len(files) == 3  # b, B and "b" are one mailbox
    assert len({f.stat().st_ino for f in files}) == 1  # one copy on disk
    assert files[0].stat().st_nlink == 3  # the tmp name is gone


def test_postmaster_without_domain_goes_to_our_hostname(tmp_path):
    storage = MaildirStorage(str(tmp_path), hostname="MX.Test.Example")
    _deliver(storage, [Address("Postmaster", "")], b"x\r\n")
    assert len(delivered(tmp_path, "postmaster@mx.test.example")) == 1


def test_abort_after_spill_removes_tmp(tmp_path):
    storage = MaildirStorage(str(tmp_path), hostname=HOST)
    writer = storage.open(Envelope("Q", SENDER, (Address("a", "d.example"),)))
    writer.write(b"y" * (SPILL_THRESHOLD + 1))
    assert writer.needs_flush
    writer.flush()
    assert len(tmp_files(tmp_path)) == 1
    writer.abort()
    assert tmp_files(tmp_path) == [] and all_delivered(tmp_path) == []


def test_failed_link_rolls_back_every_mailbox(tmp_path):
    storage = MaildirStorage(str(tmp_path), hostname=HOST)
    bad = tmp_path / "d.example" / "zz"
    for sub in ("tmp", "cur"):
        (bad / sub).mkdir(parents=True)
    (bad / "new").write_text("not a directory")
    rcpts = [Address("a", "d.example"), Address("b", "d.example"), Address("zz", "d.example")]
    with pytest.raises(OSError):
        _deliver(storage, rcpts, b"z\r\n")
    assert all_delivered(tmp_path) == []
    assert tmp_files(tmp_path) == []
    # Repaired: the next delivery works.
    (bad / "new").unlink()
    (bad / "new").mkdir()
    _deliver(storage, rcpts, b"z\r\n", qid="Q2")
    assert len(all_delivered(tmp_path)) == 3


def test_clean_tmp_removes_only_old_files(tmp_path):
    storage = MaildirStorage(str(tmp_path), hostname=HOST)
    _deliver(storage, [Address("a", "d.example")], b"x\r\n")
    tmp = tmp_path / "d.example" / "a" / "tmp"
    old, fresh = tmp / "old", tmp / "fresh"
    old.write_bytes(b"left by a crash")
    fresh.write_bytes(b"being written")
    past = time.time() - 40 * 3600
    os.utime(old, (past, past))
    assert storage.clean_tmp() == 1
    assert not old.exists() and fresh.exists()
    assert len(all_delivered(tmp_path)) == 1


def test_unique_names_for_many_messages(tmp_path):
    storage = MaildirStorage(str(tmp_path), hostname="host/with:odd")
    for i in range(200):
        _deliver(storage, [Address("a", "d.example")], b"%d\r\n" % i, qid=f"Q{i}")
    files = all_delivered(tmp_path)
    assert len(files) == 200
    assert all(":" not in f.name for f in files)


# --- names: no escape, no collision --------------------------------------------------

@pytest.mark.parametrize("name", ["..", ".", "../x", "a/b", "", "\x00", "a\x00b", ".hidden",
                                  "x" * 300, "é" * 200, "%2F", "~", "con", "a b"])
def test_encode_name_is_a_safe_single_component(name):
    out = encode_name(name)
    assert out and "/" not in out and "\x00" not in out
    assert out not in (".", "..") and not out.startswith(".")
    assert len(out.encode()) <= 255
    assert out.isprintable()


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300), st.text(max_size=300))
def test_encode_name_is_injective(a, b):
    if a != b:
        assert encode_name(a) != encode_name(b)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_encode_name_is_safe(name):
    out = encode_name(name)
    assert out and "/" not in out and "\x00" not in out and not out.startswith(".")
    assert len(out.encode()) <= 255


def test_mailbox_paths_stay_under_root(tmp_path):
    storage = MaildirStorage(str(tmp_path / "mail"), hostname=HOST)
    root = str(tmp_path / "mail") + os.sep
    seen = {}
    for local, domain in [('"../.."', "d"), ("..", ".."), ('"a/b"', "d"), ('"a%2Fb"', "d"),
                          ("x", "[IPv6:::1]"), ("x", "[127.0.0.1]"), ('"/etc/passwd"', "d"),
                          ('"x\\"y"', "d"), ("x" * 64, "d" * 250)]:
        path = storage.mailbox(Address(local, domain))
        assert os.path.normpath(path) == path and path.startswith(root)
        assert path.count(os.sep) == root.count(os.sep) + 1
        assert path not in seen.values()
        seen[(local, domain)] = path


# --- recovery through the server -------------------------------------------------------

def test_mailbox_removed_while_running_is_recreated(smtp_server):
    """An administrator deletes a mailbox between two deliveries: the server
    must not keep failing (at most the first attempt gets a 4xx)."""
    rcpt = "alice@example.com"
    codes = []
    with RawSMTP(smtp_server.host, smtp_server.port) as c:
        c.ehlo()
        c.envelope("s@client.example", rcpt)
        assert c.data(b"one\r\n").code == 250
        shutil.rmtree(smtp_server.mail_dir / "example.com" / "alice")
        for _ in range(2):
            c.envelope("s@client.example", rcpt)
            codes.append(c.data(b"two\r\n").code)
            if codes[-1] == 250:
                break
    assert codes[-1] == 250, codes
    assert all(code in (250, 451) for code in codes)
    assert len(delivered(smtp_server.mail_dir, rcpt)) == 1
    assert Path(smtp_server.mail_dir / "example.com" / "alice" / "cur").is_dir()


def test_host_part_of_file_names_has_no_separator_characters(tmp_path):
    # "/" would make a path, ":" starts the Maildir info, "," the S= field.
    storage = MaildirStorage(str(tmp_path), hostname="mx,a/b:c.example")
    name = storage.unique_name("QID")
    assert not {",", "/", ":"} & set(name), name
    assert name.endswith(".mx\\054a\\057b\\072c.example")
