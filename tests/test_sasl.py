"""SASL mechanisms as state machines, without a server (sasl.py)."""

from __future__ import annotations

import base64

import pytest

from simplesmtp import sasl
from simplesmtp.sasl import (
    Challenge,
    CheckPassword,
    Failure,
    LookupScram,
    ScramClient,
    ScramSha256,
    Success,
    new_mechanism,
    saslprep,
    scram_credentials,
)

# --- PLAIN ------------------------------------------------------------------


def test_plain_initial_response_asks_for_a_password_check() -> None:
    mech = sasl.Plain()
    step = mech.start(b"\0alice@example.com\0s3cret")
    assert step == CheckPassword("alice@example.com", "s3cret")
    assert mech.resolve("alice@example.com") == Success("alice@example.com")


def test_plain_password_is_not_in_the_repr() -> None:
    step = sasl.Plain().start(b"\0alice\0hunter2-secret")
    assert "hunter2-secret" not in repr(step)


def test_plain_without_initial_response_sends_empty_challenge() -> None:
    mech = sasl.Plain()
    assert mech.start(None) == Challenge(b"")
    assert mech.respond(b"\0bob\0pw") == CheckPassword("bob", "pw")


def test_plain_wrong_credentials_fail_not_malformed() -> None:
    mech = sasl.Plain()
    mech.start(b"\0bob\0pw")
    step = mech.resolve(None)
    assert isinstance(step, Failure) and not step.malformed and step.username == "bob"


@pytest.mark.parametrize("payload", [b"", b"bob", b"bob\0pw", b"a\0b\0c\0d", b"\0\0pw",
                                     b"\0bob\0", b"\0\xff\xfe\0pw"])
def test_plain_malformed(payload: bytes) -> None:
    step = sasl.Plain().start(payload)
    assert isinstance(step, Failure) and step.malformed


def test_plain_authzid_same_user_ok_other_user_refused() -> None:
    assert sasl.Plain().start(b"Bob\0bob\0pw") == CheckPassword("bob", "pw")
    step = sasl.Plain().start(b"carol\0bob\0pw")
    assert isinstance(step, Failure) and not step.malformed


# --- LOGIN ------------------------------------------------------------------


def test_login_two_challenges() -> None:
    mech = sasl.Login()
    assert mech.start(None) == Challenge(b"Username:")
    assert mech.respond(b"alice") == Challenge(b"Password:")
    assert mech.respond(b"pw") == CheckPassword("alice", "pw")
    assert mech.resolve(None) == Failure("bad credentials", username="alice")


def test_login_initial_response_is_the_user_name() -> None:
    mech = sasl.Login()
    assert mech.start(b"alice") == Challenge(b"Password:")
    assert mech.respond(b"pw") == CheckPassword("alice", "pw")
    assert mech.resolve("alice") == Success("alice")


def test_login_empty_fields_are_malformed() -> None:
    assert sasl.Login().start(b"").malformed  # type: ignore[union-attr]
    mech = sasl.Login()
    mech.start(b"alice")
    step = mech.respond(b"")
    assert isinstance(step, Failure) and step.malformed


# --- SCRAM-SHA-256: the RFC 7677 §3 example, as a known answer --------------

RFC_USER, RFC_PASSWORD = "user", "pencil"
RFC_CLIENT_NONCE = "rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC_CLIENT_FINAL = (b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def rfc_creds(username: str | None = "user") -> sasl.ScramCredentials:
    return scram_credentials(RFC_PASSWORD, salt=RFC_SALT, iterations=4096,
                             username=username)


def test_scram_rfc7677_example_server_side() -> None:
    mech = ScramSha256(nonce=lambda: RFC_SERVER_NONCE)
    step = mech.start(f"n,,n=user,r={RFC_CLIENT_NONCE}".encode())
    assert step == LookupScram("user")
    step = mech.resolve(rfc_creds())
    assert step == Challenge(
        b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
        b"s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")
    assert mech.respond(RFC_CLIENT_FINAL) == Success("user", RFC_SERVER_FINAL)


def test_scram_rfc7677_example_client_side() -> None:
    client = ScramClient(RFC_USER, RFC_PASSWORD, nonce=RFC_CLIENT_NONCE)
    assert client.first() == b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
    final = client.final(b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                         b"s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")
    assert final == RFC_CLIENT_FINAL
    assert client.verify(RFC_SERVER_FINAL)
    assert not client.verify(b"v=AAAA")


def run_scram(password: str, creds: sasl.ScramCredentials) -> sasl.Step:
    client = ScramClient("user", password)
    mech = ScramSha256()
    assert isinstance(mech.start(None), Challenge)
    assert isinstance(mech.respond(client.first()), LookupScram)
    challenge = mech.resolve(creds)
    assert isinstance(challenge, Challenge)
    return mech.respond(client.final(challenge.data))


def test_scram_round_trip_and_wrong_password() -> None:
    creds = scram_credentials("correct horse", username="user")
    ok = run_scram("correct horse", creds)
    assert isinstance(ok, Success) and ok.username == "user"
    bad = run_scram("wrong horse", creds)
    assert isinstance(bad, Failure) and not bad.malformed


def test_scram_made_up_credentials_never_succeed() -> None:
    # Even the right password fails when the keys are the ones invented
    # for an unknown user (username None).
    step = run_scram(RFC_PASSWORD, rfc_creds(username=None))
    assert isinstance(step, Failure) and not step.malformed


@pytest.mark.parametrize("first", [
    b"p=tls-unique,,n=user,r=abc",  # channel binding: not offered
    b"x,,n=user,r=abc",
    b"n,,m=ext,n=user,r=abc",  # mandatory extension
    b"n,,r=abc,n=user",
    b"n,,n=,r=abc",
    b"n,,n=us=41er,r=abc",  # bad saslname escape
    b"n,n=user,r=abc",
])
def test_scram_malformed_client_first(first: bytes) -> None:
    step = ScramSha256().start(first)
    assert isinstance(step, Failure) and step.malformed


def test_scram_nonce_must_be_extended() -> None:
    mech = ScramSha256(nonce=lambda: "SERVER")
    mech.start(b"n,,n=user,r=CLIENT")
    mech.resolve(rfc_creds())
    step = mech.respond(b"c=biws,r=CLIENT,p=" + base64.b64encode(b"x" * 32))
    assert isinstance(step, Failure) and not step.malformed


def test_scram_channel_binding_echo_must_match() -> None:
    client = ScramClient("user", RFC_PASSWORD)
    mech = ScramSha256()
    mech.start(client.first().replace(b"n,,", b"y,,", 1))
    challenge = mech.resolve(rfc_creds())
    assert isinstance(challenge, Challenge)
    step = mech.respond(client.final(challenge.data))  # says c=biws ("n,,")
    assert isinstance(step, Failure)


def test_scram_saslname_decoding() -> None:
    mech = ScramSha256()
    assert mech.start(b"n,,n=a=2Cb=3Dc,r=xyz") == LookupScram("a,b=c")


def test_scram_credentials_need_4096_iterations() -> None:
    with pytest.raises(ValueError):
        scram_credentials("pw", iterations=1000)


# --- SASLprep (RFC 4013 §3 examples) ----------------------------------------

@pytest.mark.parametrize("text, prepared", [
    ("I\u00adX", "IX"),  # soft hyphen mapped to nothing
    ("user", "user"),
    ("USER", "USER"),
    ("\u00aa", "a"),  # NFKC
    ("\u2168", "IX"),
    ("a\u00a0b", "a b"),  # non-ASCII space to SPACE
])
def test_saslprep_examples(text: str, prepared: str) -> None:
    assert saslprep(text) == prepared


@pytest.mark.parametrize("text", ["\u0007", "\u0627\u0031"])
def test_saslprep_prohibited(text: str) -> None:
    with pytest.raises(ValueError):
        saslprep(text)


def test_new_mechanism_names() -> None:
    assert isinstance(new_mechanism("plain"), sasl.Plain)
    assert isinstance(new_mechanism("SCRAM-SHA-256"), ScramSha256)
    assert new_mechanism("CRAM-MD5") is None
