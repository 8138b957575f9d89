"""
A POP3 login counts (for LOGIN-DELAY, the last login, the metrics of
successful logins, the C{pop3.login} line) only once it completes, with
the +OK that puts the session in the TRANSACTION state.  A login whose
credentials were verified but that is then refused or given up (SCRAM's
client turning the server's proof down, an address banned while the
credentials were checked, a client gone meanwhile) did not log in: the
maildrop it opened is released before the -ERR (RFC 1939 section 4),
and the user's next login is not held back for LOGIN-DELAY (RFC 2449
section 6.5) by a login that never was.  Every way of logging in alike.
"""

import pytest
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from mailgate.testing import POP3Session, addUser

from saslclients import cramMD5Response
from test_pop3_policy import ALICE, CLIENT, LOGINS, PASSWORD, HeldPortal, PenaltyPolicy, session
from test_sasl import b64, challenge, scramExchange
from test_store import query

DELAY = 3600


@pytest.fixture
def alice(store):
    addUser(store, ALICE, PASSWORD, apop=True)
    return ALICE


def cramMD5(s, password=PASSWORD):
    data = challenge(s.command("AUTH CRAM-MD5"))
    return s.command(b64(cramMD5Response(ALICE, password, data)))


def authLogin(s, password=PASSWORD):
    s.command("AUTH LOGIN")
    s.command(b64(ALICE))
    return s.command(b64(password))


MECHANISMS = dict(LOGINS, **{"cram-md5": cramMD5, "login": authLogin})


def lastLogin(store):
    return query(store, "SELECT last_login FROM mailboxes")[0][0]


def logsInAgain(store):
    """
    Whether ALICE, logging in now under the same LOGIN-DELAY, gets in.
    """
    s = POP3Session(store, loginDelay=DELAY)
    reply = s.login(ALICE, PASSWORD)
    assert reply.startswith(("+OK", "-ERR [LOGIN-DELAY]")), reply
    s.command("QUIT")
    return reply.startswith("+OK")


def test_aCompletedLoginHoldsTheNextBack(store, alice):
    """
    What the others are measured against: a login that completed (SCRAM
    included, once its client took the server's proof) starts the
    LOGIN-DELAY.
    """
    for login in MECHANISMS:
        query(store, "UPDATE mailboxes SET last_login = NULL")
        s = session(store, PenaltyPolicy(), loginDelay=DELAY)
        reply = MECHANISMS[login](s)
        if login == "scram":
            challenge(reply)
            reply = s.command("")
        assert reply.startswith(f"+OK {ALICE}"), (login, reply)
        s.command("QUIT")
        assert lastLogin(store) is not None
        assert not logsInAgain(store), login


@pytest.mark.parametrize("answer", ["*", "A" * 5000, None], ids=["cancelled", "too-long", "gone"])
def test_aScramLoginGivenUpAtItsLastStepDoesNotStartTheLoginDelay(store, alice, answer):
    """
    The server has verified SCRAM's client proof and sent its own; the
    client answers C{*} (it may find the server's proof wrong), a line
    too long, or goes.  No login: the last login stays as it was, the
    user's next login is let in, and nothing counts it as successful.
    """
    from twisted.logger import Logger

    s = session(store, PenaltyPolicy(), loginDelay=DELAY)
    events = []
    s.protocol.log = Logger(observer=events.append)
    _, _, reply = scramExchange(s, ALICE, PASSWORD)
    challenge(reply)
    if answer is None:
        s.transport.loseConnection()
        s.protocol.connectionLost(Failure(ConnectionDone()))
    else:
        assert s.command(answer).startswith("-ERR [AUTH] ")
    # A client that went has its session's end line too: not a logout.
    ending = ["pop3.disconnect"] if answer is None else []
    assert [e["event"] for e in events] == ["auth.abandoned", *ending]
    assert lastLogin(store) is None
    assert logsInAgain(store)


@pytest.mark.parametrize("login", MECHANISMS)
def test_aLoginRefusedAsTheBanLandedDuringItsCheckDoesNotStartTheLoginDelay(store, alice, login):
    """
    The right password, checked while the address got banned: answered
    banned, and no login, so no LOGIN-DELAY for the user either (it is
    the address that is refused, and the user may log in from another).
    """
    policy = PenaltyPolicy()
    s = session(store, policy, loginDelay=DELAY)
    held = s.factory.portal = HeldPortal(s.factory.portal)
    assert MECHANISMS[login](s) == ""
    policy.banned.add(CLIENT.host)
    held.answer(0)
    assert s.advance(0) == b"-ERR [SYS/TEMP] banned\r\n"
    assert lastLogin(store) is None
    assert logsInAgain(store)


@pytest.mark.parametrize("login", MECHANISMS)
def test_aLoginWhoseClientWentDuringItsCheckDoesNotStartTheLoginDelay(store, alice, login):
    """
    The client went while its (right) credentials were being checked: it
    never read a +OK, and did not log in.
    """
    s = session(store, PenaltyPolicy(), loginDelay=DELAY)
    held = s.factory.portal = HeldPortal(s.factory.portal)
    assert MECHANISMS[login](s) == ""
    s.transport.loseConnection()
    s.protocol.connectionLost(Failure(ConnectionDone()))
    held.answer(0)
    assert lastLogin(store) is None
    assert logsInAgain(store)
