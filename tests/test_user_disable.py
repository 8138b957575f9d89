"""
Disabled users (C{mailgate user disable}, Dovecot's C{nologin}): logins
refused by every mechanism, without sockets, against a real SQLite store
(the store's side on PostgreSQL too), with what the client, the log, the
metrics and the connection policy see.

What a real Dovecot 2.3.19 does with a passwd-file line's C{nologin=y}
(measured with tests/dovecotserver.py, USER/PASS, AUTH PLAIN and APOP):
the right password gets C{-ERR [AUTH] REASON} with the line's C{reason=}
(C{-ERR [AUTH] Login disabled for this user} without one), a wrong
password the usual C{-ERR [AUTH] Authentication failed.} (but for APOP,
whose wrong digest is told the reason too), so only who has the password
learns that the account is disabled; C{fail=y} gets C{Authentication
failed.} for the right password too; its LMTP still delivers to both.
The passwd-file's extra fields are split at spaces: C{reason=Account(backslash)
(space)disabled} tells C{Account} and the backslash.  mailgate answers the same, with its own
words for a wrong password, by every mechanism (APOP too).
"""

import hashlib

import pytest
from twisted.internet.task import Clock
from twisted.logger import Logger

from mailgate.auth.passwords import makeCredentials
from mailgate.errors import NoSuchUser, UserDisabled
from mailgate.records import UserRecord
from mailgate.testing import TEST_HASH_COST, POP3Session, addUser, deliver, memoryStore, pop3Factory, resultOf

from oauthtokens import AUDIENCE, ISSUER, Keys, oauthbearer, xoauth2
from saslclients import ScramClient, b64, cramMD5Response
from test_admission import RecordingPolicy
from test_observability import RecordingMetrics
from test_sasl import challenge

ALICE = "alice@example.org"
BOB = "bob@example.org"
PASSWORD = "wonderland"
INVALID = "-ERR [AUTH] invalid user name or password\r\n"
DISABLED = "-ERR [AUTH] Login disabled for this user\r\n"
REASON = "Account suspended: call 555-0100"


def refusedWith(reason):
    return f"-ERR [AUTH] {reason}\r\n"


@pytest.fixture
def users():
    store = memoryStore()
    resultOf(store.addUser(ALICE, makeCredentials(PASSWORD, apop=True, logN=TEST_HASH_COST)))
    addUser(store, BOB, "builder")
    deliver(store, [ALICE], b"Subject: hi\r\n\r\nhello\r\n")
    yield store
    store.close()


@pytest.fixture(scope="module")
def keys():
    return Keys()


@pytest.fixture
def tokens(keys, tmp_path):
    from mailgate.auth.oauth import TokenValidator

    return TokenValidator([str(path) for path in keys.write(tmp_path)], [ISSUER], [AUDIENCE], leeway=60)


# Each login: (session, address, password) -> the reply that ends it.


def userPass(s, address, password):
    s.command(f"USER {address}")
    return s.command(f"PASS {password}")


def apop(s, address, password):
    digest = hashlib.md5((s.challenge + password).encode()).hexdigest()
    return s.command(f"APOP {address} {digest}")


def authPlain(s, address, password):
    return s.command(f"AUTH PLAIN {b64(chr(0) + address + chr(0) + password)}")


def authLogin(s, address, password):
    assert challenge(s.command(f"AUTH LOGIN {b64(address)}")) == b"Password:"
    return s.command(b64(password))


def cramMD5(s, address, password):
    data = challenge(s.command("AUTH CRAM-MD5"))
    return s.command(b64(cramMD5Response(address, password, data)))


def scram(s, address, password):
    client = ScramClient(address, password)
    serverFirst = challenge(s.command(f"AUTH SCRAM-SHA-256 {b64(client.first())}"))
    reply = s.command(b64(client.final(serverFirst)))
    if not reply.startswith("+ "):
        return reply
    # The server's proof, then +OK once the client has taken it.
    assert client.verify(challenge(reply))
    return s.command("")


LOGINS = {
    "user": userPass,
    "apop": apop,
    "plain": authPlain,
    "login": authLogin,
    "cram-md5": cramMD5,
    "scram-sha-256": scram,
}


def session(store, **options):
    return POP3Session(store, **options)


@pytest.mark.parametrize("mechanism", sorted(LOGINS))
def test_everyMechanismRefusesADisabledUsersRightPassword(users, mechanism):
    """
    The right password of a disabled user: C{-ERR [AUTH]} and the reason
    (Dovecot's words without one), by every mechanism; a wrong one gets
    what any wrong password gets; enabled again, the same password logs
    in.  (SCRAM's server proof is not sent: the login fails before.)
    """
    login = LOGINS[mechanism]
    assert login(session(users), ALICE, "wrong") == INVALID
    resultOf(users.disableUser(ALICE))
    assert login(session(users), ALICE, PASSWORD) == DISABLED
    assert login(session(users), ALICE, "wrong") == INVALID
    resultOf(users.disableUser(ALICE, REASON))
    assert login(session(users), ALICE, PASSWORD) == refusedWith(REASON)
    assert resultOf(users.enableUser(ALICE)) is True
    s = session(users)
    assert login(s, ALICE, PASSWORD).startswith(f"+OK {ALICE} has 1 messages")
    assert s.command("QUIT").startswith("+OK")


@pytest.mark.parametrize("mechanism", ["oauthbearer", "xoauth2"])
def test_bearerTokensOfADisabledUserAreRefused(users, tokens, keys, mechanism):
    """
    A valid bearer token names a disabled user: refused as a password
    is, with the reason, and without the error challenge a bad token
    gets (the token was good).
    """
    message = oauthbearer(keys.token()) if mechanism == "oauthbearer" else xoauth2(ALICE, keys.token())
    resultOf(users.disableUser(ALICE, REASON))
    s = session(users, tokens=tokens)
    assert s.command(f"AUTH {mechanism.upper()}") == "+ \r\n"
    assert s.command(b64(message)) == refusedWith(REASON)
    resultOf(users.enableUser(ALICE))
    s = session(users, tokens=tokens)
    assert s.command(f"AUTH {mechanism.upper()}") == "+ \r\n"
    assert s.command(b64(message)).startswith(f"+OK {ALICE}")


def test_aRememberedPasswordIsRefusedWithoutAnotherTrip(users, tripsTo):
    """
    A password verified by an earlier login is remembered (no hash, no
    look-up): the snapshot read at every login says the user is disabled,
    in the one trip an enabled user's login makes, on this node and
    every other at once.
    """
    clock = Clock()
    factory = pop3Factory(users, clock)
    s = POP3Session(users, factory=factory)
    assert userPass(s, ALICE, PASSWORD).startswith("+OK")
    s.command("QUIT")
    trips = tripsTo(users)
    s = POP3Session(users, factory=factory)
    assert userPass(s, ALICE, PASSWORD).startswith("+OK")
    s.command("QUIT")
    enabled = list(trips)
    assert enabled == ["readSnapshot"]
    resultOf(users.disableUser(ALICE, REASON))
    del trips[:]
    assert userPass(POP3Session(users, factory=factory), ALICE, PASSWORD) == refusedWith(REASON)
    assert trips == enabled
    resultOf(users.enableUser(ALICE))
    s = POP3Session(users, factory=factory)
    assert userPass(s, ALICE, PASSWORD).startswith("+OK")
    # The refusal let go of the maildrop's lock.
    assert s.command("STAT").startswith("+OK 1 ")


def test_theRefusalIsLoggedAndCountedButNotTowardsABan(users):
    """
    One C{auth.failed} line with reason C{disabled}, the login metric's
    result C{disabled}; the connection policy is told neither a failure
    (the user's own client, polling, would get its address banned) nor
    a success (which would forgive the address its guesses at others).
    A wrong password for the disabled user is a failure as any other.
    """
    resultOf(users.disableUser(ALICE, REASON))
    policy = RecordingPolicy()
    s = session(users, policy=policy)
    s.factory.metrics = metrics = RecordingMetrics()
    events = []
    s.protocol.log = Logger(observer=events.append)
    assert authPlain(s, ALICE, PASSWORD) == refusedWith(REASON)
    [event] = [e for e in events if e.get("event") == "auth.failed"]
    assert (event["user"], event["mechanism"], event["reason"]) == (ALICE, "plain", "disabled")
    assert metrics.named("login") == [("pop3", "plain", "disabled")]
    assert [c[0] for c in policy.calls if c[0].startswith("authentication")] == ["authenticationDelay"]
    assert PASSWORD not in repr(event)
    assert userPass(s, ALICE, "wrong") == INVALID
    assert [c[0] for c in policy.calls if c[0].startswith("authentication")] == [
        "authenticationDelay", "authenticationDelay", "authenticationFailed",
    ]


def test_theReasonIsToldPrintableAndBounded(users):
    """
    A reason is kept as the administrator's command made it (printable,
    200 characters); one written otherwise (by an embedder, by hand) is
    told printable and cut all the same, on one line.
    """
    resultOf(users.disableUser(ALICE, "line one\r\n-ERR two\x1b[31m " + "x" * 300))
    reply = userPass(session(users), ALICE, PASSWORD)
    assert reply.count("\r\n") == 1 and reply.endswith("\r\n")
    assert reply.startswith("-ERR [AUTH] line one -ERR two?[31m xxx")
    assert len(reply) == len("-ERR [AUTH] \r\n") + UserDisabled.REASON_MAX


def test_aSessionInProgressGoesOnUntilKicked(users):
    """
    Disabling changes no session in progress (the command ends it, as
    C{mailgate kick} does); its QUIT still applies its deletions.
    """
    s = session(users)
    assert userPass(s, ALICE, PASSWORD).startswith("+OK")
    resultOf(users.disableUser(ALICE))
    assert s.command("DELE 1").startswith("+OK")
    assert s.command("QUIT").startswith("+OK")
    assert resultOf(users.listMessages(ALICE)) == []


def test_mailIsStillDelivered(users):
    resultOf(users.disableUser(ALICE))
    assert list(deliver(users, [ALICE], b"Subject: again\r\n\r\nhi\r\n")) == [ALICE]
    assert len(resultOf(users.listMessages(ALICE))) == 2


# -- the store, on both engines ---------------------------------------------------


@pytest.fixture
def anyStore(databaseURL):
    store = memoryStore(databaseURL)
    addUser(store, ALICE, PASSWORD)
    addUser(store, BOB, "builder")
    yield store
    store.close()


def test_theStoreKeepsAndTellsTheDisabledState(anyStore):
    store = anyStore
    clock = [1_700_000_000]
    store._clock = lambda: clock[0]
    assert resultOf(store.disableUser(ALICE, REASON)) is False
    clock[0] += 60
    # Disabled again: the reason replaced, the time kept.
    assert resultOf(store.disableUser(ALICE, "another")) is True
    listed = {u.address: (u.disabledAt, u.disabledReason) for u in resultOf(store.listUsers())}
    assert listed == {ALICE: (1_700_000_000, "another"), BOB: (None, None)}
    paged = {u.address: (u.disabledAt, u.disabledReason) for u in resultOf(store.listUsers(page=1))}
    assert paged == listed
    assert resultOf(store.enableUser(ALICE)) is True
    assert resultOf(store.enableUser(ALICE)) is False
    assert {u.disabledAt for u in resultOf(store.listUsers())} == {None}
    for call in (store.disableUser, store.enableUser):
        with pytest.raises(NoSuchUser):
            resultOf(call("nobody@example.org"))


def test_openingADisabledUsersMaildropFailsAndLeavesItUnlocked(anyStore):
    """
    On both engines (PostgreSQL reads the snapshot as a prepared statement
    on its lock connection, in binary): L{UserDisabled} with the reason,
    the lock given back; a renamed user stays disabled.
    """
    store = anyStore
    alice = resultOf(store.findUser(ALICE))
    resultOf(store.disableUser(ALICE, "Gone fishing \u2013 back in May"))
    with pytest.raises(UserDisabled) as refused:
        resultOf(store.openMaildrop(alice))
    assert refused.value.reason == "Gone fishing \u2013 back in May"
    resultOf(store.disableUser(BOB))
    bob = resultOf(store.findUser(BOB))
    with pytest.raises(UserDisabled) as refused:
        resultOf(store.openMaildrop(bob))
    assert refused.value.reason is None and str(refused.value) == "the account is disabled"
    resultOf(store.renameUser(ALICE, "alice2@example.org"))
    renamed = resultOf(store.findUser("alice2@example.org"))
    with pytest.raises(UserDisabled):
        resultOf(store.openMaildrop(renamed))
    resultOf(store.enableUser("alice2@example.org"))
    maildrop = resultOf(store.openMaildrop(renamed))
    resultOf(maildrop.release())
    # A password no longer the user's is checked again, not told the reason.
    from mailgate.errors import CredentialsChanged

    stale = UserRecord(bob.userId, BOB, "{PLAIN}old")
    with pytest.raises(CredentialsChanged):
        resultOf(store.openMaildrop(stale))


def test_usersAddedDisabledNeverLogIn(anyStore):
    """
    C{addUsers} (C{mailgate user import}) adds a user disabled in the
    transaction that adds them.
    """
    store = anyStore
    credentials = makeCredentials("carol's", logN=TEST_HASH_COST)
    added = resultOf(store.addUsers([
        ("carol@example.org", credentials, {"disabled": "moved away"}),
        ("dave@example.org", credentials, {"disabled": ""}),
        ("erin@example.org", credentials, {}),
    ]))
    assert added == [True, True, True]
    listed = {u.address: u.disabledReason for u in resultOf(store.listUsers()) if u.disabledAt is not None}
    assert listed == {"carol@example.org": "moved away", "dave@example.org": None}
