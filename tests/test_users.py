"""The users file (users.py) and the ``simplesmtp user`` commands."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from conftest import clean_env

from simplesmtp import cli, users
from simplesmtp.sasl import CheckPassword, LookupScram, ScramCredentials
from simplesmtp.users import UserStore, UserStoreError, parse

# argon2id with tiny parameters: stored hashes carry their own parameters,
# so verification works the same as with the production ones, only faster.
FAST = PasswordHasher(time_cost=1, memory_cost=64, parallelism=1)


def store(path: Path) -> UserStore:
    return UserStore(str(path), hasher=FAST)


def test_add_verify_and_file_mode(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "users"
    s = store(path)
    assert len(s) == 0
    s.add("alice@example.com", "alice-pass-1")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert "alice-pass-1" not in text
    assert text.startswith(users.HEADER)
    assert "$argon2id$" in text and "SCRAM-SHA-256$4096$" in text
    assert s.verify_password("alice@example.com", "alice-pass-1") == "alice@example.com"
    assert s.verify_password("ALICE@Example.COM", "alice-pass-1") == "alice@example.com"
    assert s.verify_password("alice@example.com", "wrong") is None
    assert s.verify_password("nobody@example.com", "alice-pass-1") is None
    assert s.has_domain("EXAMPLE.com") and not s.has_domain("other.org")


def test_add_twice_passwd_remove(tmp_path: Path) -> None:
    s = store(tmp_path / "users")
    s.add("bob", "one")
    with pytest.raises(UserStoreError):
        s.add("BOB", "two")
    s.set_password("Bob", "two")
    assert s.verify_password("bob", "one") is None
    assert s.verify_password("bob", "two") == "bob"
    s.remove("bob")
    assert s.get("bob") is None
    with pytest.raises(UserStoreError):
        s.remove("bob")
    with pytest.raises(UserStoreError):
        s.set_password("bob", "x")


@pytest.mark.parametrize("name", ["", "a b", "a:b", "#x", "tab\there", "x" * 300])
def test_bad_names_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError):
        store(tmp_path / "users").add(name, "pw")


def test_empty_password_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        store(tmp_path / "users").add("a", "")


def test_resolve_requests_and_fake_scram_for_unknown(tmp_path: Path) -> None:
    s = store(tmp_path / "users")
    s.add("carol@example.com", "pw")
    assert s.resolve(CheckPassword("carol@example.com", "pw")) == "carol@example.com"
    creds = s.resolve(LookupScram("carol@example.com"))
    assert isinstance(creds, ScramCredentials) and creds.username == "carol@example.com"
    fake1 = s.scram("mallory@example.com")
    fake2 = s.scram("mallory@example.com")
    # The same salt each time (a stable answer), but never a real account.
    assert fake1.username is None and fake1.salt == fake2.salt
    assert fake1.iterations == creds.iterations


def test_write_is_atomic_when_rename_fails(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "users"
    s = store(path)
    s.add("alice", "pw")
    before = path.read_bytes()

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(users.os, "replace", broken_replace)
    with pytest.raises(OSError):
        s.add("bob", "pw")
    assert path.read_bytes() == before  # the old file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["users", "users.lock"]


def test_write_fsyncs_file_then_directory(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "users"
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        target = os.readlink(f"/proc/self/fd/{fd}")
        calls.append("dir" if os.path.isdir(target) else "file")
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        calls.append("rename")
        real_replace(src, dst)

    s = store(path)
    monkeypatch.setattr(users.os, "fsync", fsync)
    monkeypatch.setattr(users.os, "replace", replace)
    s.add("alice", "pw")
    assert calls == ["file", "rename", "dir"]


def test_other_writer_is_seen_without_restart(tmp_path: Path) -> None:
    path = tmp_path / "users"
    reader = store(path)
    writer = store(path)
    writer.add("dave@example.com", "pw1")
    assert reader.verify_password("dave@example.com", "pw1") == "dave@example.com"
    writer.set_password("dave@example.com", "pw2")  # same size, new inode
    assert reader.verify_password("dave@example.com", "pw2") == "dave@example.com"
    writer.remove("dave@example.com")
    assert reader.get("dave@example.com") is None


def test_broken_file_keeps_the_accounts_loaded(tmp_path: Path) -> None:
    path = tmp_path / "users"
    s = store(path)
    s.add("erin", "pw")
    with open(path, "a") as f:
        f.write("this line is garbage\n")
    assert s.get("erin") is not None  # the broken version was not taken
    path.write_text(users.HEADER + "\n")
    assert s.get("erin") is None


def test_broken_file_at_start_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text("x:notahash\n")
    with pytest.raises(UserStoreError, match="line 1"):
        store(path)


def test_parse_errors_name_the_line_not_its_content() -> None:
    text = "# c\n\nbob:$argon2id$v=19$x:SCRAM-SHA-256$10$aa$bb$cc\n"
    with pytest.raises(UserStoreError) as info:
        parse(text)
    assert "line 3" in str(info.value) and "argon2id" not in str(info.value)


# --- The CLI ---------------------------------------------------------------


def run_user(tmp_path: Path, *args: str, stdin: str = "",
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "simplesmtp", "user", *args],
                          input=stdin, capture_output=True, text=True, timeout=30,
                          cwd=tmp_path, env=clean_env(env))


def test_cli_round_trip(tmp_path: Path) -> None:
    f = str(tmp_path / "users")
    r = run_user(tmp_path, "add", "alice@example.com", "--users-file", f,
                 "--password-stdin", stdin="first-pass\n")
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
    # The environment names the same file for every subcommand.
    env = {"SIMPLESMTP_USERS_FILE": f}
    r = run_user(tmp_path, "add", "bob@example.com", "--password-stdin",
                 stdin="bob-pass\n", env=env)
    assert r.returncode == 0, r.stderr
    r = run_user(tmp_path, "list", env=env)
    assert r.stdout.split() == ["alice@example.com", "bob@example.com"]
    r = run_user(tmp_path, "check", "alice@example.com", "--password-stdin",
                 stdin="first-pass\n", env=env)
    assert r.returncode == 0 and "ok" in r.stdout
    r = run_user(tmp_path, "check", "alice@example.com", "--password-stdin",
                 stdin="wrong\n", env=env)
    assert r.returncode == 1
    r = run_user(tmp_path, "passwd", "alice@example.com", "--password-stdin",
                 stdin="second-pass\n", env=env)
    assert r.returncode == 0, r.stderr
    r = run_user(tmp_path, "check", "alice@example.com", "--password-stdin",
                 stdin="second-pass\n", env=env)
    assert r.returncode == 0
    r = run_user(tmp_path, "remove", "alice@example.com", env=env)
    assert r.returncode == 0
    r = run_user(tmp_path, "check", "alice@example.com", "--password-stdin",
                 stdin="second-pass\n", env=env)
    assert r.returncode == 1 and "no account" in r.stderr
    r = run_user(tmp_path, "list", env=env)
    assert r.stdout.split() == ["bob@example.com"]
    text = Path(f).read_text()
    for secret in ("first-pass", "second-pass", "bob-pass"):
        assert secret not in text


def test_cli_errors(tmp_path: Path) -> None:
    r = run_user(tmp_path, "list")
    assert r.returncode == 2 and "users file" in r.stderr
    f = str(tmp_path / "users")
    r = run_user(tmp_path, "add", "--users-file", f)
    assert r.returncode == 2
    r = run_user(tmp_path, "add", "x", "--users-file", f, "--password-stdin", stdin="\n")
    assert r.returncode == 1 and "empty" in r.stderr
    r = run_user(tmp_path, "remove", "ghost", "--users-file", f)
    assert r.returncode == 1


def test_cli_prompts_twice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                           capsys: pytest.CaptureFixture[str]) -> None:
    import getpass
    f = str(tmp_path / "users")
    answers = iter(["typed-pass", "typed-pass", "a", "b"])
    prompts: list[str] = []

    def fake_getpass(prompt: str = "") -> str:
        prompts.append(prompt)
        return next(answers)

    monkeypatch.setattr(getpass, "getpass", fake_getpass)
    monkeypatch.setattr(users, "PasswordHasher", lambda: FAST)
    assert cli.main(["user", "add", "frank", "--users-file", f]) == 0
    assert len(prompts) == 2
    assert cli.main(["user", "passwd", "frank", "--users-file", f]) == 1  # mismatch
    assert "do not match" in capsys.readouterr().err
    assert UserStore(f, hasher=FAST).verify_password("frank", "typed-pass") == "frank"
