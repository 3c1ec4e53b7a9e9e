"""Maildir delivery: ``<mail-dir>/<domain>/<local-part>/{tmp,new,cur}``.

Delivery follows the Maildir protocol with fsync at each step that a crash
could otherwise undo:

1. the message is written to ``tmp/`` of the first recipient's mailbox and
   fsync'ed;
2. it is hard-linked into ``new/`` of every recipient's mailbox (one copy on
   disk, one name per mailbox), and each ``new/`` directory is fsync'ed;
3. the ``tmp/`` name is removed.

Only after step 2 is the message acknowledged.  If any step fails, the
links already made are removed again, so a failed delivery leaves nothing
in any ``new/`` (the client retries the whole message).

Mailbox names are the address's parts, lower-cased, with every character
that is not a letter, digit or one of ``-_.+=`` percent-encoded (``%`` too),
a leading period encoded, and over-long names shortened with a hash: no
address can name a path outside the mail dir, a hidden file, or another
address's mailbox.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Sequence

from ..address import Address, unquote_local
from ..fsutil import fsync_dir as _fsync_dir
from . import Envelope

SPILL_THRESHOLD = 256 * 1024  # bytes buffered in memory before writing out
_MAX_NAME = 200  # bytes of an encoded name; file systems allow 255
_SAFE = frozenset("-_.+=")


def encode_name(name: str) -> str:
    out = []
    for ch in name:
        if (ch.isalnum() and ch.isprintable()) or ch in _SAFE:
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))
    text = "".join(out)
    if not text:
        # An empty name (from ""@domain): a lone "%", which no encoding of
        # a non-empty name produces ("%" always comes with two hex digits).
        return "%"
    if text.startswith("."):
        text = "%2E" + text[1:]
    raw = text.encode("utf-8")
    if len(raw) > _MAX_NAME:
        digest = hashlib.sha256(raw).hexdigest()[:16]
        text = raw[: _MAX_NAME - 17].decode("utf-8", "ignore") + "~" + digest
    return text


def _load_syncfs() -> Callable[[int | None], None] | None:
    """syncfs(2) from the C library (Linux), or None where there is none."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        func = libc.syncfs
    except (OSError, AttributeError):
        return None

    def syncfs(fd: int | None) -> None:
        if fd is None or func(fd) != 0:
            err = ctypes.get_errno() if fd is not None else 9  # EBADF
            raise OSError(err, os.strerror(err))

    return syncfs


_syncfs = _load_syncfs()


class MaildirStorage:
    name = "maildir"
    commit_inline = False

    def __init__(self, root: str, *, hostname: str) -> None:
        self.root = os.path.abspath(root)
        self.default_domain = hostname.lower()
        # Maildir file names must not contain "/" or ":" (the info
        # separator), and "," starts the ",S=" size field readers parse.
        self._host = (hostname.replace("/", "\\057").replace(":", "\\072")
                      .replace(",", "\\054"))
        self._pid = os.getpid()
        self._ready: set[str] = set()  # mailboxes known to exist durably
        self._lock = threading.Lock()
        os.makedirs(self.root, exist_ok=True)

    def mailbox(self, address: Address) -> str:
        domain = (address.domain or self.default_domain).lower()
        local = unquote_local(address.local_part).lower()
        return os.path.join(self.root, encode_name(domain), encode_name(local))

    def ensure_mailbox(self, path: str) -> None:
        """Create ``path`` with tmp/new/cur, durably (directory entries too)."""
        if path in self._ready:
            return
        with self._lock:
            if path in self._ready:
                return
            created = []
            parent = os.path.dirname(path)
            for d in (parent, path):
                try:
                    os.mkdir(d, 0o700)
                    created.append(d)
                except FileExistsError:
                    pass
            for sub in ("tmp", "new", "cur"):
                try:
                    os.mkdir(os.path.join(path, sub), 0o700)
                    created.append(os.path.join(path, sub))
                except FileExistsError:
                    pass
            # A new directory entry is durable once its parent is fsync'ed.
            for d in {os.path.dirname(c) for c in created}:
                _fsync_dir(d)
            self._ready.add(path)

    def forget(self, boxes: list[str]) -> None:
        """A delivery to ``boxes`` failed: check them afresh next time, so a
        mailbox removed or broken while we ran is re-created once it can be."""
        with self._lock:
            self._ready.difference_update(boxes)

    def open(self, envelope: Envelope) -> MaildirWriter:
        return MaildirWriter(self, envelope)

    def unique_name(self, queue_id: str) -> str:
        now = time.time()
        sec = int(now)
        usec = int((now - sec) * 1_000_000)
        return f"{sec}.M{usec}P{self._pid}Q{queue_id}.{self._host}"

    def close(self) -> None:
        pass

    def commit_many(self, writers: Sequence[MaildirWriter]) -> list[BaseException | None]:
        """Commit a batch of messages with shared fsyncs (group commit).

        Each step runs for the whole batch before the next one starts:
        write every file, fsync every file, link every file into its
        ``new/`` directories, fsync each of those directories once.  On a
        journaling file system the first fsync of a step commits the
        journal with the work of the whole batch in it, so the others
        return at once: a batch costs about two disk flushes, not two per
        message.  The guarantee per message is unchanged (its data and its
        ``new/`` entries are on disk before it is reported done).

        Returns one entry per writer: None (durable) or the error that
        failed it (then nothing of it is left in ``new/`` or ``tmp/``).
        """
        errors: list[BaseException | None] = [None] * len(writers)

        def step(i: int, action: Callable[[], object]) -> object:
            try:
                return action()
            except Exception as exc:
                errors[i] = exc
                writers[i]._fail()
                return None

        for i, w in enumerate(writers):
            step(i, w.flush)
        live = [i for i in range(len(writers)) if errors[i] is None]
        synced = False
        if len(live) > 1 and _syncfs is not None:
            # One flush of the file system carries every file of the batch;
            # fsync file by file would commit the journal once per file
            # (delayed allocation puts each file's blocks in a transaction
            # of its own).  syncfs reports write-back errors (Linux 5.8+).
            try:
                _syncfs(writers[live[0]]._fd)
                synced = True
            except OSError as exc:
                for i in live:
                    errors[i] = exc
                    writers[i]._fail()
        for i, w in enumerate(writers):
            if errors[i] is None:
                step(i, w._close_file if synced else w._sync_file)
        users: dict[str, list[int]] = {}  # new/ directory -> writers linked there
        for i, w in enumerate(writers):
            if errors[i] is None:
                dirs = step(i, w._link)
                for d in dirs or ():  # type: ignore[attr-defined]
                    users.setdefault(d, []).append(i)
        for d, linked in users.items():
            try:
                _fsync_dir(d)
            except OSError as exc:
                for i in linked:
                    if errors[i] is None:
                        errors[i] = exc
                        writers[i]._fail()
        for i, w in enumerate(writers):
            if errors[i] is None:
                w._finish()
        return errors

    def clean_tmp(self, max_age: float = 36 * 3600) -> int:
        """Remove files older than ``max_age`` from every ``tmp/``.

        Left by a crash between writing and linking; the Maildir convention
        is that readers and writers remove them after 36 hours.
        """
        removed = 0
        cutoff = time.time() - max_age
        try:
            domains = os.scandir(self.root)
        except OSError:
            return 0
        with domains:
            for dom in domains:
                if not dom.is_dir(follow_symlinks=False):
                    continue
                for box in os.scandir(dom.path):
                    tmp = os.path.join(box.path, "tmp")
                    if not os.path.isdir(tmp):
                        continue
                    for entry in os.scandir(tmp):
                        try:
                            if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                                os.unlink(entry.path)
                                removed += 1
                        except OSError:
                            pass
        return removed


class MaildirWriter:
    """One message being received into Maildir."""

    __slots__ = ("_storage", "_envelope", "_parts", "_buffered", "_fd", "_tmp",
                 "_name", "_size", "_boxes", "_linked")

    def __init__(self, storage: MaildirStorage, envelope: Envelope) -> None:
        self._storage = storage
        self._envelope = envelope
        self._parts: list[bytes] = []
        self._buffered = 0
        self._size = 0
        self._fd: int | None = None
        self._tmp: str | None = None
        self._linked: list[str] = []  # names made in new/ by a running commit
        self._name = storage.unique_name(envelope.queue_id)
        boxes: list[str] = []
        for rcpt in envelope.recipients:
            box = storage.mailbox(rcpt)
            if box not in boxes:
                boxes.append(box)
        self._boxes = boxes

    @property
    def needs_flush(self) -> bool:
        return self._buffered >= SPILL_THRESHOLD

    def write(self, data: bytes) -> None:
        self._parts.append(data)
        self._buffered += len(data)
        self._size += len(data)

    def flush(self) -> None:
        """Write buffered content to the tmp file (worker thread)."""
        try:
            self._flush()
        except OSError:
            self._storage.forget(self._boxes)
            raise

    def _flush(self) -> None:
        if self._fd is None:
            box = self._boxes[0]
            self._storage.ensure_mailbox(box)
            self._tmp = os.path.join(box, "tmp", self._name)
            self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        parts, self._parts, self._buffered = self._parts, [], 0
        data = b"".join(parts)
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]

    def commit(self) -> None:
        """Make the message durable in every mailbox (worker thread)."""
        error = self._storage.commit_many([self])[0]
        if error is not None:
            raise error

    # The steps of a commit, run by MaildirStorage.commit_many for a batch.

    def _sync_file(self) -> None:
        assert self._fd is not None
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None

    def _close_file(self) -> None:
        assert self._fd is not None
        os.close(self._fd)
        self._fd = None

    def _link(self) -> list[str]:
        """Link the file into every ``new/``; return those directories."""
        assert self._tmp is not None
        final = f"{self._name},S={self._size}"
        dirs = []
        for box in self._boxes:
            self._storage.ensure_mailbox(box)
            new_dir = os.path.join(box, "new")
            os.link(self._tmp, os.path.join(new_dir, final))
            self._linked.append(os.path.join(new_dir, final))
            dirs.append(new_dir)
        return dirs

    def _fail(self) -> None:
        """Undo everything: no link in any new/, no file in tmp/."""
        self._storage.forget(self._boxes)
        for target in self._linked:
            try:
                os.unlink(target)
            except OSError:
                pass
        self._linked = []
        self.abort()

    def _finish(self) -> None:
        self._linked = []
        try:
            os.unlink(self._tmp)  # type: ignore[arg-type]
        except OSError:
            pass  # delivered all the same; clean_tmp removes it later
        self._tmp = None

    def abort(self) -> None:
        self._parts = []
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None
        if self._tmp is not None:
            try:
                os.unlink(self._tmp)
            except OSError:
                pass
            self._tmp = None

