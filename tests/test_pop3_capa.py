"""
CAPA in both states (RFC 2449 section 5): "Capabilities available in the
AUTHORIZATION state MUST be announced in both states."  USER and SASL stay
listed after login (the commands themselves are refused there); STLS is
listed only where it can be used, in the AUTHORIZATION state of a
connection that is not secure yet.  RFC 2595 lets the list change after
STLS, but registers STLS as announced in both states: leaving it out
after a login in the clear departs from that, as Dovecot does too.
"""

from mailgate.config import APOPPolicy
from mailgate.testing import POP3Session, addUser, resultOf

from test_sasl import (  # noqa: F401
    ALICE,
    PASSWORD,
    alice,
    capabilities,
    plain,
    scramLogin,
    tls,
    untrusted,
    withoutImplementation,
)


def test_trustedPeerWithTLSConfigured(store, alice, tls):
    s = POP3Session(store, tls=tls)
    before = capabilities(s)
    assert "STLS" in before and "USER" in before
    assert "SASL SCRAM-SHA-256 CRAM-MD5 PLAIN LOGIN" in before
    assert s.login(ALICE, PASSWORD).startswith("+OK")
    after = withoutImplementation(capabilities(s))
    assert "STLS" not in after
    assert [line for line in before if line != "STLS"] == after
    assert s.command("STLS").startswith("-ERR STLS is not valid in the TRANSACTION state")
    assert s.command("AUTH PLAIN").startswith("-ERR AUTH is not valid in the TRANSACTION state")


def test_untrustedPeerAfterSTLSAndLogin(store, alice, tls):
    s = untrusted(store, tls=tls)
    before = capabilities(s)
    assert "STLS" in before and "USER" not in before
    assert "SASL SCRAM-SHA-256 CRAM-MD5" in before
    assert s.command("STLS").startswith("+OK")
    secure = capabilities(s)
    assert "STLS" not in secure and "USER" in secure and "SASL SCRAM-SHA-256 CRAM-MD5 PLAIN LOGIN" in secure
    assert s.command(f"AUTH PLAIN {plain(ALICE, PASSWORD)}").startswith("+OK")
    assert withoutImplementation(capabilities(s)) == secure


def test_untrustedPeerWithoutTLSAfterSCRAM(store, alice):
    """
    No plaintext allowed before login, so none announced after it either.
    """
    s = untrusted(store)
    before = capabilities(s)
    assert "USER" not in before
    assert scramLogin(s, ALICE, PASSWORD).startswith("+OK")
    assert withoutImplementation(capabilities(s)) == before


def test_withoutSASLNoSASLLineInEitherState(store, alice):
    s = POP3Session(store, sasl=False)
    assert not any(line.startswith("SASL") for line in capabilities(s))
    s.login(ALICE, PASSWORD)
    lines = capabilities(s)
    assert not any(line.startswith("SASL") for line in lines)
    assert "USER" in lines


def test_withTheDefaultPolicyAnAPOPUserAddsNoCramMD5InEitherState(store, alice):
    """
    The sessions above offer APOP always (C{--apop}), hence CRAM-MD5.  By
    default a user with APOP puts a timestamp in the greeting but no
    CRAM-MD5 in the SASL line, before login or after it, for Alice (who
    has no APOP) as for the APOP user himself.
    """
    addUser(store, "bob@example.org", "builder", apop=True)
    advertiser = APOPPolicy.AUTO.advertiser(store)
    resultOf(advertiser.refresh())
    s = POP3Session(store, apop=advertiser)
    assert s.challenge is not None
    before = capabilities(s)
    assert "SASL SCRAM-SHA-256 PLAIN LOGIN" in before
    assert s.login(ALICE, PASSWORD).startswith("+OK")
    assert withoutImplementation(capabilities(s)) == before
