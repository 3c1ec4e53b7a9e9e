"""Configuration: flag > environment > .env > default, old simpleSMTP keys,
validation before listening, and ``serve --help``.

``load`` is tested directly for the whole matrix; the ``simplesmtp`` command
is run as a subprocess to prove the same end to end (greeting, EHLO and
Maildir show which value won).
"""

from __future__ import annotations

import logging
import re
import socket
from pathlib import Path

import pytest
from clients import RawSMTP
from conftest import delivered

from simplesmtp.config import SETTINGS, ConfigError, load

LEGACY_FILE = """\
# written for the original simpleSMTP
PORT=0
TIMEOUT=0.5
MAIL_DIRECTORY=legacy-mail
MAX_MAIL_SIZE=5000
MAX_RECIPIENTS=2
MAX_LENGTH_LINE=600
MEASURE_PERFORMANCE=true
"""

LEGACY_FIELDS = {
    "PORT": ("port", 0), "TIMEOUT": ("timeout", 0.5),
    "MAIL_DIRECTORY": ("mail_dir", "legacy-mail"), "MAX_MAIL_SIZE": ("max_message_size", 5000),
    "MAX_RECIPIENTS": ("max_recipients", 2), "MAX_LENGTH_LINE": ("max_line_length", 600),
    "MEASURE_PERFORMANCE": ("measure_performance", True),
}


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """``load`` creates the mail dir: keep it (and any .env) in tmp_path."""
    monkeypatch.chdir(tmp_path)


def _env_file(tmp_path: Path, text: str, name: str = ".env") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# --- load(): precedence ------------------------------------------------------

def test_defaults():
    cfg = load({}, {}, None)
    assert (cfg.host, cfg.port, cfg.mail_dir, cfg.storage) == ("127.0.0.1", 2525, "./mail",
                                                                "maildir")
    assert cfg.max_recipients >= 100  # RFC 5321 §4.5.3.1.8
    assert cfg.max_line_length == 512  # §4.5.3.1.4
    assert cfg.timeout >= 300  # §4.5.3.2.7
    assert cfg.hostname == socket.gethostname()


def test_precedence_flag_env_dotenv_default(tmp_path):
    env_file = _env_file(tmp_path, "SIMPLESMTP_PORT=1111\nSIMPLESMTP_TIMEOUT=11\n"
                                   "SIMPLESMTP_MAX_RECIPIENTS=111\n")
    environ = {"SIMPLESMTP_PORT": "2222", "SIMPLESMTP_TIMEOUT": "22"}
    cfg = load({"port": "3333"}, environ, env_file)
    assert cfg.port == 3333  # flag beats environment and .env
    assert cfg.timeout == 22  # environment beats .env
    assert cfg.max_recipients == 111  # .env beats the default
    assert cfg.max_line_length == 512  # default
    assert load({}, {}, env_file).port == 1111
    assert load({}, environ, env_file).port == 2222


def test_missing_env_file_is_fine_unless_required(tmp_path):
    assert load({}, {}, str(tmp_path / "none.env")).port == 2525
    with pytest.raises(ConfigError, match="--env-file"):
        load({}, {}, str(tmp_path / "none.env"), env_file_required=True)


# --- load(): the original simpleSMTP's keys --------------------------------------

def test_legacy_keys_from_file_with_warnings(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="simplesmtp.config")
    cfg = load({}, {}, _env_file(tmp_path, LEGACY_FILE))
    for key, (field, value) in LEGACY_FIELDS.items():
        assert getattr(cfg, field) == value, key
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for key, (field, _) in LEGACY_FIELDS.items():
        new_key = "SIMPLESMTP_" + field.upper()
        assert any(f"key={key} " in w and new_key in w for w in warnings), (key, warnings)


def test_new_keys_win_over_legacy_keys(tmp_path, caplog):
    env_file = _env_file(tmp_path, "PORT=1000\nSIMPLESMTP_PORT=2000\nTIMEOUT=5\n")
    assert load({}, {}, env_file).port == 2000
    cfg = load({}, {"SIMPLESMTP_TIMEOUT": "7"}, env_file)
    assert cfg.timeout == 7


def test_legacy_names_in_environment_are_ignored(caplog):
    environ = {"PORT": "abc", "TIMEOUT": "nonsense", "MAIL_DIRECTORY": "/proc/nope",
               "MAX_MAIL_SIZE": "-1", "MAX_RECIPIENTS": "0", "MAX_LENGTH_LINE": "1",
               "MEASURE_PERFORMANCE": "maybe"}
    cfg = load({}, environ, None)
    assert cfg.port == 2525 and cfg.timeout == 300 and cfg.mail_dir == "./mail"
    assert not [r for r in caplog.records if "config_legacy_key" in r.getMessage()]


# --- load(): bad values ---------------------------------------------------------

@pytest.mark.parametrize("flags,environ,file_text,names", [
    ({"port": "abc"}, {}, None, ["--port"]),
    ({"port": "70000"}, {}, None, ["--port"]),
    ({}, {"SIMPLESMTP_PORT": "abc"}, None, ["--port", "SIMPLESMTP_PORT"]),
    ({}, {}, "PORT=abc\n", ["--port", "PORT"]),
    ({}, {}, "SIMPLESMTP_TIMEOUT=soon\n", ["--timeout", "SIMPLESMTP_TIMEOUT"]),
    ({"timeout": "-1"}, {}, None, ["--timeout"]),
    ({"max_message_size": "10"}, {}, None, ["--max-message-size"]),
    ({"max_recipients": "0"}, {}, None, ["--max-recipients"]),
    ({"max_line_length": "100"}, {}, None, ["--max-line-length"]),
    ({"storage": "floppy"}, {}, None, ["--storage"]),
    ({"log_level": "LOUD"}, {}, None, ["--log-level"]),
])
def test_bad_values_name_the_setting(tmp_path, flags, environ, file_text, names):
    env_file = _env_file(tmp_path, file_text) if file_text else None
    with pytest.raises(ConfigError) as info:
        load(flags, environ, env_file)
    message = str(info.value)
    assert "\n" not in message
    for name in names:
        assert name in message


def test_uncreatable_mail_dir(tmp_path):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ConfigError, match="--mail-dir"):
        load({"mail_dir": str(tmp_path / "a-file" / "mail")}, {}, None)


# --- the command: precedence end to end -----------------------------------------

def _greeting_name(proc) -> str:
    with RawSMTP(proc.host, proc.port) as c:
        assert c.greeting is not None and c.greeting.code == 220
        return c.greeting.lines[0].split()[0]


def test_cli_precedence_shown_in_greeting(spawn_server, tmp_path):
    base = ["--port", "0", "--mail-dir", str(tmp_path / "mail")]
    assert _greeting_name(spawn_server(*base, base=False)) == socket.gethostname()
    _env_file(tmp_path, "SIMPLESMTP_HOSTNAME=from-dotenv.test\n")
    assert _greeting_name(spawn_server(*base, base=False)) == "from-dotenv.test"
    env = {"SIMPLESMTP_HOSTNAME": "from-env.test"}
    assert _greeting_name(spawn_server(*base, env=env, base=False)) == "from-env.test"
    proc = spawn_server(*base, "--hostname", "from-flag.test", env=env, base=False)
    assert _greeting_name(proc) == "from-flag.test"


def test_cli_env_file_option(spawn_server, tmp_path):
    other = _env_file(tmp_path, "SIMPLESMTP_HOSTNAME=other-file.test\n", "other.env")
    _env_file(tmp_path, "SIMPLESMTP_HOSTNAME=dotenv.test\n")
    proc = spawn_server("--port", "0", "--mail-dir", str(tmp_path / "m"), "--env-file", other,
                        base=False)
    assert _greeting_name(proc) == "other-file.test"


def test_cli_legacy_env_file(spawn_server, tmp_path):
    """A .env of the original simpleSMTP drives the server (PORT=0 included),
    with one warning per key naming the new key; PORT in the environment
    is someone else's and is ignored."""
    _env_file(tmp_path, LEGACY_FILE)
    proc = spawn_server("--hostname", "legacy.test", env={"PORT": "abc", "TIMEOUT": "x"},
                        base=False)
    for key, (field, _) in LEGACY_FIELDS.items():
        line = proc.wait_for(rf"config_legacy_key .*key={key}\b").string
        assert "WARNING" in line and f"SIMPLESMTP_{field.upper()}" in line
    with RawSMTP(proc.host, proc.port) as c:
        ehlo = c.ehlo()
        assert "SIZE 5000" in ehlo.lines
        assert c.cmd("MAIL FROM:<s@example.org>").code == 250
        assert c.cmd("RCPT TO:<alice@example.com>").code == 250
        assert c.cmd("RCPT TO:<bob@example.com>").code == 250
        r = c.cmd("RCPT TO:<carol@example.com>")
        assert r.code == 452 and r.lines[0].startswith("4.5.3")  # MAX_RECIPIENTS=2
        assert c.data(b"Subject: legacy\r\n\r\nhi\r\n").code == 250
        assert c.cmd("NOOP " + "n" * 560).code == 250  # MAX_LENGTH_LINE=600
        assert c.cmd("NOOP " + "n" * 600).code == 500
        r = c.reply()  # TIMEOUT=0.5
        assert r.code == 421 and r.lines[0].startswith("4.4.2")
    assert len(delivered(tmp_path / "legacy-mail", "alice@example.com")) == 1


# --- the command: bad values exit 2 before listening ---------------------------------

@pytest.mark.parametrize("args,env,file_text,name", [
    (["--port", "abc"], {}, None, "--port"),
    (["--port", "70000"], {}, None, "--port"),
    ([], {"SIMPLESMTP_PORT": "abc"}, None, "SIMPLESMTP_PORT"),
    ([], {}, "PORT=abc\n", "PORT"),
    (["--port", "0", "--timeout", "never"], {}, None, "--timeout"),
    (["--port", "0", "--max-message-size", "-5"], {}, None, "--max-message-size"),
    (["--port", "0", "--storage", "floppy"], {}, None, "--storage"),
    (["--port", "0", "--mail-dir", "{file}/mail"], {}, None, "--mail-dir"),
    (["--port", "0", "--env-file", "missing.env"], {}, None, "--env-file"),
], ids=["port-abc", "port-range", "env-port", "legacy-port", "timeout", "size", "storage",
        "mail-dir", "env-file"])
def test_cli_bad_value_exits_2_with_one_line(run_cli, tmp_path, args, env, file_text, name):
    (tmp_path / "a-file").write_text("x")
    args = [a.replace("{file}", str(tmp_path / "a-file")) for a in args]
    if file_text:
        _env_file(tmp_path, file_text)
    result = run_cli("serve", "--hostname", "bad.test", *args, env=env)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr_lines if "config_legacy_key" not in line]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith("simplesmtp: error: ")
    assert name in errors[0]
    assert "cannot listen" not in errors[0]
    assert "event=listening" not in result.stderr and "Traceback" not in result.stderr


def test_cli_port_in_use_exits_2(run_cli, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("serve", "--port", str(port), "--hostname", "x.test",
                         "--mail-dir", str(tmp_path / "mail"))
    assert result.returncode == 2, result.stderr
    assert "simplesmtp: error:" in result.stderr and str(port) in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_without_command_exits_2(run_cli):
    assert run_cli().returncode == 2


# --- serve --help --------------------------------------------------------------

def _plain_default(setting) -> str | None:
    """The text --help must show for a plain value; None when the CLI
    words it (off, none, this machine's name)."""
    d = setting.default
    if callable(d) or setting.is_flag or d is None or isinstance(d, (tuple, list, bool)):
        return None
    return str(d)


def _help_entries(help_text: str) -> dict[str, str]:
    """Option flag -> its whole help entry (argparse starts each entry on a
    line indented by two spaces)."""
    entries: dict[str, str] = {}
    current: str | None = None
    for line in help_text.splitlines():
        m = re.match(r"  (--?[\w-]+)", line)
        if m:
            current = m.group(1)
            entries[current] = line
        elif current is not None and line.startswith("   "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return {k: " ".join(v.split()) for k, v in entries.items()}


def test_serve_help_lists_every_option_with_default(run_cli):
    result = run_cli("serve", "--help")
    assert result.returncode == 0
    entries = _help_entries(result.stdout)
    for s in SETTINGS:
        assert s.flag in entries, f"{s.flag} missing from --help"
        m = re.search(r"\[default: ([^;\]]+)", entries[s.flag])
        assert m, f"{s.flag} has no default in --help: {entries[s.flag]}"
        shown = m.group(1).strip()
        if _plain_default(s) is not None:
            assert shown == _plain_default(s), s.flag
        assert s.env in entries[s.flag]
    assert "default:" in entries["--env-file"]
    for flag, default in [("--port", "2525"), ("--host", "127.0.0.1"),
                          ("--mail-dir", "./mail"), ("--storage", "maildir"),
                          ("--hostname", "this machine's name")]:
        assert f"[default: {default}" in entries[flag], entries[flag]
