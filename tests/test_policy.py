"""Recipient, sender and VRFY policy (policy.py) and its settings."""

from __future__ import annotations

from pathlib import Path

import pytest
from argon2 import PasswordHasher

from simplesmtp.address import Address
from simplesmtp.config import ConfigError, load
from simplesmtp.policy import RecipientPolicy
from simplesmtp.users import UserStore

FAST = PasswordHasher(time_cost=1, memory_cost=64, parallelism=1)


@pytest.fixture
def store(tmp_path: Path) -> UserStore:
    s = UserStore(str(tmp_path / "users"), hasher=FAST)
    s.add("alice@example.com", "pw")
    s.add("bob@example.com", "pw")
    s.add("admin@ops.example.net", "pw")
    return s


def addr(text: str) -> Address:
    local, _, domain = text.rpartition("@")
    return Address(local, domain) if local else Address(text, "")


def code(reply: object) -> str | None:
    return None if reply is None else f"{reply.code} {reply.enhanced}"  # type: ignore[attr-defined]


def test_without_local_domains_everything_is_accepted(store: UserStore) -> None:
    for users in (None, store):
        p = RecipientPolicy(users=users)
        assert not p.checks_recipients
        for a in ("x@anything.org", "alice@example.com", "nobody@example.com"):
            assert p.recipient_reply(addr(a), authenticated=False) is None


def test_local_domain_with_accounts(store: UserStore) -> None:
    p = RecipientPolicy(local_domains=("example.com", "catchall.test"), users=store)
    assert p.recipient_reply(addr("alice@example.com"), authenticated=False) is None
    assert p.recipient_reply(addr("ALICE@Example.COM"), authenticated=False) is None
    assert p.recipient_reply(addr('"alice"@example.com'), authenticated=False) is None
    assert code(p.recipient_reply(addr("carol@example.com"), authenticated=False)) \
        == "550 5.1.1"
    # Unknown stays unknown for an authenticated sender too.
    assert code(p.recipient_reply(addr("carol@example.com"), authenticated=True)) \
        == "550 5.1.1"
    # A local domain without accounts is a catch-all.
    assert p.recipient_reply(addr("anyone@catchall.test"), authenticated=False) is None


def test_other_domains_need_authentication(store: UserStore) -> None:
    p = RecipientPolicy(local_domains=("example.com",), users=store)
    # ops.example.net has an account but is not a local domain: relaying.
    for a in ("x@elsewhere.org", "admin@ops.example.net", "x@[192.0.2.1]"):
        assert code(p.recipient_reply(addr(a), authenticated=False)) == "550 5.7.1"
        assert p.recipient_reply(addr(a), authenticated=True) is None


def test_postmaster_always_accepted_and_redirected(store: UserStore) -> None:
    p = RecipientPolicy(local_domains=("example.com",), users=store,
                        postmaster="alice@example.com")
    for a in ("postmaster", "PostMaster", "postmaster@example.com", "POSTMASTER@EXAMPLE.COM"):
        assert p.recipient_reply(addr(a), authenticated=False) is None
        assert p.delivery_address(addr(a)) == Address("alice", "example.com")
    # postmaster of somebody else's domain is relaying like any address.
    assert code(p.recipient_reply(addr("postmaster@other.org"), authenticated=False)) \
        == "550 5.7.1"
    assert p.delivery_address(addr("bob@example.com")) == Address("bob", "example.com")


def test_postmaster_default_is_the_first_local_domain(store: UserStore) -> None:
    p = RecipientPolicy(local_domains=("zeta.test", "example.com"), users=store)
    assert p.delivery_address(addr("postmaster")) == Address("postmaster", "example.com")
    assert RecipientPolicy().delivery_address(addr("postmaster")) == addr("postmaster")
    with pytest.raises(ValueError):
        RecipientPolicy(postmaster="not an address")


def test_sender_ownership(store: UserStore) -> None:
    p = RecipientPolicy(users=store, sender_must_match=True)
    assert p.check_sender(addr("alice@example.com"), "alice@example.com") is None
    assert p.check_sender(addr("Alice@EXAMPLE.com"), "alice@example.com") is None
    assert code(p.check_sender(addr("bob@example.com"), "alice@example.com")) == "553 5.7.1"
    assert p.check_sender(Address("", ""), "alice@example.com") is None  # <>
    loose = RecipientPolicy(users=store)
    assert loose.check_sender(addr("bob@example.com"), "alice@example.com") is None


@pytest.mark.parametrize("mode, user, target, expected", [
    ("off", "alice@example.com", "alice@example.com", "252 2.5.0"),
    ("authenticated", None, "alice@example.com", "252 2.5.0"),
    ("authenticated", "bob@example.com", "alice@example.com", "250 2.1.5"),
    ("on", None, "alice@example.com", "250 2.1.5"),
    ("on", None, "<Alice@Example.com>", "250 2.1.5"),
    ("on", None, "nobody@example.com", "550 5.1.1"),
    ("on", None, "x@catchall.test", "252 2.5.0"),  # catch-all: cannot say
    ("on", None, "x@elsewhere.org", "252 2.5.0"),
    ("on", None, "alice", "252 2.5.0"),
])
def test_vrfy(store: UserStore, mode: str, user: str | None, target: str,
              expected: str) -> None:
    p = RecipientPolicy(local_domains=("example.com", "catchall.test"), users=store,
                        vrfy=mode)
    reply = p.vrfy(target, user)
    assert code(reply) == expected
    if reply.code == 250:
        assert "<alice@example.com>" in reply.text


def test_bad_vrfy_mode() -> None:
    with pytest.raises(ValueError):
        RecipientPolicy(vrfy="sometimes")


# --- Settings -----------------------------------------------------------------


def test_local_domain_repeatable_flag_and_comma_lists(tmp_path: Path) -> None:
    base = {"mail_dir": str(tmp_path / "mail")}
    c = load({**base, "local_domain": ["Example.com", "b.org,c.net", "example.com"]}, {},
             None)
    assert c.local_domain == ("example.com", "b.org", "c.net")
    c = load(base, {"SIMPLESMTP_LOCAL_DOMAIN": "a.test, b.test"}, None)
    assert c.local_domain == ("a.test", "b.test")
    env_file = tmp_path / ".env"
    env_file.write_text("SIMPLESMTP_LOCAL_DOMAIN=x.test,y.test\nSIMPLESMTP_VRFY=on\n")
    c = load(base, {}, str(env_file))
    assert c.local_domain == ("x.test", "y.test") and c.vrfy == "on"
    with pytest.raises(ConfigError, match="--local-domain"):
        load({**base, "local_domain": ["not a domain"]}, {}, None)
    with pytest.raises(ConfigError, match="--vrfy"):
        load({**base, "vrfy": "maybe"}, {}, None)
    with pytest.raises(ConfigError, match="--postmaster"):
        load({**base, "postmaster": "nobody"}, {}, None)


def test_auth_settings_defaults(tmp_path: Path) -> None:
    c = load({"mail_dir": str(tmp_path / "mail")}, {}, None)
    assert c.users_file is None and c.local_domain == () and not c.allow_insecure_auth
    assert c.submission_port is None and c.vrfy == "off"
    assert (c.auth_max_failures, c.auth_failure_window, c.auth_lockout) == (5, 600.0, 900.0)
