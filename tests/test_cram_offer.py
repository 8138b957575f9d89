"""
When SASL CRAM-MD5 is offered by default (C{apop = auto}): only while some
user has the CRAM-MD5 states of a C{{CRAM-MD5}} hash imported from
Dovecot, not because some user opted into APOP.  Clients that pick
CRAM-MD5 whenever CAPA lists it and never fall back (curl) would then fail
for every user without APOP; Dovecot does not offer CRAM-MD5 because of
APOP either.  Sessions without sockets, over a real SQLite store, with the
L{APOPAdvertiser} the service uses.
"""

import hashlib

from mailgate.auth.md5state import hmacMD5Context
from mailgate.auth.passwords import importedCredentials
from mailgate.config import APOPPolicy
from mailgate.testing import TEST_HASH_COST, POP3Session, addUser, resultOf

from saslclients import b64, cramMD5Response
from test_sasl import INVALID, capabilities, challenge, plain

ALICE = "alice@example.org"  # neither APOP nor CRAM-MD5 states
BOB = "bob@example.org"  # APOP enabled
FAY = "fay@example.org"  # imported from Dovecot with a {CRAM-MD5} hash

WITHOUT_CRAM = "SASL SCRAM-SHA-256 PLAIN LOGIN"
WITH_CRAM = "SASL SCRAM-SHA-256 CRAM-MD5 PLAIN LOGIN"


def advertised(store):
    """
    The default policy's advertiser, after the store's answer.
    """
    advertiser = APOPPolicy.AUTO.advertiser(store)
    resultOf(advertiser.refresh())
    return advertiser


def apopLogin(session, address, password):
    digest = hashlib.md5(session.challenge.encode() + password.encode()).hexdigest()
    return session.command(f"APOP {address} {digest}")


def cramLogin(session, address, password):
    data = challenge(session.command("AUTH CRAM-MD5"))
    return session.command(b64(cramMD5Response(address, password, data)))


def importFay(store):
    # What user import stores for Dovecot's {CRAM-MD5} hash (the states
    # doveadm pw -s CRAM-MD5 writes, as tests/test_imported_cram.py checks).
    hashed = "{CRAM-MD5}" + hmacMD5Context(b"fay's").hex()
    resultOf(store.addUser(FAY, importedCredentials(hashed, logN=TEST_HASH_COST)))


def test_aUserWithAPOPGetsTheTimestampButNoCramMD5ForEveryone(store):
    """
    Bob opted into APOP: the greeting carries a timestamp and Bob logs in
    with APOP; CAPA and AUTH list no CRAM-MD5, so a client picking it
    whenever it is listed uses PLAIN, which works for Alice.
    """
    addUser(store, ALICE, "wonderland")
    addUser(store, BOB, "builder", apop=True)
    advertiser = advertised(store)

    s = POP3Session(store, apop=advertiser)
    assert s.challenge is not None and f"{s.challenge}\r\n" in s.greeting
    assert WITHOUT_CRAM in capabilities(s)
    assert s.command("AUTH") == "+OK\r\nSCRAM-SHA-256\r\nPLAIN\r\nLOGIN\r\n.\r\n"
    assert s.command("AUTH CRAM-MD5").startswith("-ERR unsupported authentication mechanism")
    assert s.command(f"AUTH PLAIN {plain(ALICE, 'wonderland')}") == f"+OK {ALICE} has 0 messages (0 octets)\r\n"

    s = POP3Session(store, apop=advertiser)
    assert apopLogin(s, BOB, "builder") == f"+OK {BOB} has 0 messages (0 octets)\r\n"


def test_importedCramMD5StatesMakeItOfferedForThemAndAPOPUsers(store):
    """
    Fay came from a Dovecot that served her client CRAM-MD5: while she is
    there, CRAM-MD5 is offered, and works for her and for Bob (APOP);
    Alice, with neither, fails like a wrong password (her client must be
    told to use PLAIN).  Without Fay it is no longer offered.
    """
    addUser(store, ALICE, "wonderland")
    addUser(store, BOB, "builder", apop=True)
    importFay(store)
    advertiser = advertised(store)

    s = POP3Session(store, apop=advertiser)
    assert s.challenge is not None
    assert WITH_CRAM in capabilities(s)
    assert cramLogin(s, FAY, "fay's") == f"+OK {FAY} has 0 messages (0 octets)\r\n"
    assert s.command("QUIT").startswith("+OK")
    s = POP3Session(store, apop=advertiser)
    assert cramLogin(s, BOB, "builder") == f"+OK {BOB} has 0 messages (0 octets)\r\n"
    s = POP3Session(store, apop=advertiser)
    assert cramLogin(s, ALICE, "wonderland") == INVALID
    assert s.command(f"AUTH PLAIN {plain(ALICE, 'wonderland')}") == f"+OK {ALICE} has 0 messages (0 octets)\r\n"

    resultOf(store.deleteUser(FAY))
    resultOf(advertiser.refresh())
    s = POP3Session(store, apop=advertiser)
    assert s.challenge is not None and WITHOUT_CRAM in capabilities(s)


def test_importedStatesAloneGiveCramMD5ButNoTimestamp(store):
    """
    Nobody has APOP, Fay has states: CRAM-MD5 without an APOP timestamp
    (APOP needs the password itself).
    """
    addUser(store, ALICE, "wonderland")
    importFay(store)
    s = POP3Session(store, apop=advertised(store))
    assert s.challenge is None and "<" not in s.greeting
    assert WITH_CRAM in capabilities(s)
    assert cramLogin(s, FAY, "fay's") == f"+OK {FAY} has 0 messages (0 octets)\r\n"


def test_alwaysOffersBothAndNeverNeither(store):
    """
    C{--apop} (always) offers the timestamp and CRAM-MD5 whoever the users
    are, and CRAM-MD5 works for a user with APOP; C{--no-apop} (never)
    offers neither, imported states or not.
    """
    addUser(store, BOB, "builder", apop=True)
    s = POP3Session(store, apop=APOPPolicy.ALWAYS.advertiser(store))
    assert s.challenge is not None and WITH_CRAM in capabilities(s)
    assert cramLogin(s, BOB, "builder") == f"+OK {BOB} has 0 messages (0 octets)\r\n"

    importFay(store)
    s = POP3Session(store, apop=APOPPolicy.NEVER.advertiser(store))
    assert s.challenge is None and WITHOUT_CRAM in capabilities(s)
    assert s.command("AUTH CRAM-MD5").startswith("-ERR unsupported authentication mechanism")
