"""
A user's allowed networks (C{mailgate user networks}, Dovecot's
C{allow_nets}): logins by every mechanism from an allowed and from a
refused address, without sockets, against a real SQLite store (the
store's side on PostgreSQL too), with what the client, the log, the
metrics and the connection policy see.

What a real Dovecot 2.3.19 does with a passwd-file line's
C{allow_nets=127.0.0.2/32} (measured with tests/dovecotserver.py, a
client bound to 127.0.0.2 and to 127.0.0.3, USER/PASS and AUTH PLAIN):
from 127.0.0.2 the right password logs in and a wrong one gets C{-ERR
[AUTH] Authentication failed.}; from 127.0.0.3 the right password gets
that same C{-ERR [AUTH] Authentication failed.} as a wrong one, its log
calls both "auth failed", and it costs the address the auth penalty a
wrong password costs (measured with anvil's penalty on and
C{auth_failure_delay = 0}: three such logins from 127.0.0.3 took 0.5,
4.5 and 4.5 s to be answered, and the next right login there of a user
with no allow_nets 4.0 s, the same as three wrong passwords from
127.0.0.5 and the login after them).  C{allow_nets=local} is taken (no
configuration error) and refuses every TCP client, 127.0.0.2 too: it
names clients with no IP address.  mailgate answers the same: a refused
address is told what a wrong password is told, delayed and counted the
same, so that nothing tells a guesser the password was right.
"""

import pytest
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.task import Clock
from twisted.logger import Logger

from mailgate.auth.passwords import makeCredentials
from mailgate.errors import NetworkRefused, NoSuchUser
from mailgate.networks import parseAllowedNetworks, peerAllowed
from mailgate.testing import TEST_HASH_COST, POP3Session, deliver, memoryStore, pop3Factory, resultOf

from oauthtokens import oauthbearer, xoauth2
from saslclients import b64
from test_admission import RecordingPolicy
from test_observability import RecordingMetrics
from test_user_disable import ALICE, BOB, INVALID, LOGINS, PASSWORD, REASON, refusedWith, userPass, authPlain
from test_user_disable import anyStore, keys, tokens  # noqa: F401 (fixtures)

ALLOWED = IPv4Address("TCP", "127.0.0.2", 40000)
REFUSED = IPv4Address("TCP", "127.0.0.3", 40000)
NETWORKS = "127.0.0.2/32,2001:db8::/32"


@pytest.fixture
def users():
    store = memoryStore()
    resultOf(store.addUser(ALICE, makeCredentials(PASSWORD, apop=True, logN=TEST_HASH_COST)))
    resultOf(store.addUser(BOB, makeCredentials("builder", apop=True, logN=TEST_HASH_COST)))
    deliver(store, [ALICE], b"Subject: hi\r\n\r\nhello\r\n")
    yield store
    store.close()


@pytest.mark.parametrize("mechanism", sorted(LOGINS))
def test_everyMechanismRefusesTheRightPasswordFromElsewhere(users, mechanism):
    """
    From an allowed address the right password logs in; from another it
    gets what a wrong password gets, by every mechanism; the restriction
    lifted, it logs in from there too.
    """
    login = LOGINS[mechanism]
    assert resultOf(users.setAllowedNetworks(ALICE, NETWORKS)) is None
    s = POP3Session(users, peer=ALLOWED)
    assert login(s, ALICE, PASSWORD).startswith(f"+OK {ALICE} has 1 messages")
    assert s.command("QUIT").startswith("+OK")
    assert login(POP3Session(users, peer=REFUSED), ALICE, PASSWORD) == INVALID
    assert login(POP3Session(users, peer=REFUSED), ALICE, "wrong") == INVALID
    assert login(POP3Session(users, peer=ALLOWED), ALICE, "wrong") == INVALID
    # Others are not restricted.
    s = POP3Session(users, peer=REFUSED)
    assert login(s, BOB, "builder").startswith(f"+OK {BOB}")
    assert s.command("QUIT").startswith("+OK")
    assert resultOf(users.setAllowedNetworks(ALICE, None)) == NETWORKS
    s = POP3Session(users, peer=REFUSED)
    assert login(s, ALICE, PASSWORD).startswith(f"+OK {ALICE}")
    # The refusals let go of the maildrop's lock.
    assert s.command("STAT").startswith("+OK 1 ")


@pytest.mark.parametrize("mechanism", ["oauthbearer", "xoauth2"])
def test_bearerTokensFromElsewhereAreRefusedAsABadToken(users, tokens, keys, mechanism):
    """
    A valid bearer token from a refused address: refused as a bad token
    is, error challenge and all (nothing says the token was good).
    """
    message = oauthbearer(keys.token()) if mechanism == "oauthbearer" else xoauth2(ALICE, keys.token())
    resultOf(users.setAllowedNetworks(ALICE, NETWORKS))
    s = POP3Session(users, peer=REFUSED, tokens=tokens)
    assert s.command(f"AUTH {mechanism.upper()}") == "+ \r\n"
    assert s.command(b64(message)).startswith("+ ")
    assert s.command("").startswith("-ERR [AUTH]")
    s = POP3Session(users, peer=ALLOWED, tokens=tokens)
    assert s.command(f"AUTH {mechanism.upper()}") == "+ \r\n"
    assert s.command(b64(message)).startswith(f"+OK {ALICE}")


def test_aRememberedPasswordIsRefusedWithoutAnotherTrip(users, tripsTo):
    """
    A password verified by an earlier login is remembered: the snapshot
    read at every login carries the networks, in the one trip every
    login makes, so a restriction holds at once, for it too.
    """
    clock = Clock()
    factory = pop3Factory(users, clock)
    s = POP3Session(users, clock, factory=factory, peer=REFUSED)
    assert userPass(s, ALICE, PASSWORD).startswith("+OK")
    s.command("QUIT")
    trips = tripsTo(users)
    s = POP3Session(users, clock, factory=factory, peer=REFUSED)
    assert userPass(s, ALICE, PASSWORD).startswith("+OK")
    s.command("QUIT")
    unrestricted = list(trips)
    assert unrestricted == ["readSnapshot"]
    resultOf(users.setAllowedNetworks(ALICE, NETWORKS))
    del trips[:]
    assert userPass(POP3Session(users, clock, factory=factory, peer=REFUSED), ALICE, PASSWORD) == INVALID
    assert trips[:1] == unrestricted
    s = POP3Session(users, clock, factory=factory, peer=ALLOWED)
    assert userPass(s, ALICE, PASSWORD).startswith("+OK")
    assert s.command("STAT").startswith("+OK 1 ")


def test_theRefusalIsLoggedCountedAndPenalisedAsAWrongPassword(users):
    """
    One C{auth.failed} line with reason C{network}, the login metric's
    result C{network}; the connection policy is told a failure, as for a
    wrong password (as Dovecot's penalty counts it): told nothing, the
    address's delays would say which password was right.
    """
    resultOf(users.setAllowedNetworks(ALICE, NETWORKS))
    policy = RecordingPolicy()
    s = POP3Session(users, peer=REFUSED, policy=policy)
    s.factory.metrics = metrics = RecordingMetrics()
    events = []
    s.protocol.log = Logger(observer=events.append)
    assert authPlain(s, ALICE, PASSWORD) == INVALID
    [event] = [e for e in events if e.get("event") == "auth.failed"]
    assert (event["user"], event["mechanism"], event["reason"]) == (ALICE, "plain", "network")
    assert metrics.named("login") == [("pop3", "plain", "network")]
    assert [c[0] for c in policy.calls if c[0].startswith("authentication")] == [
        "authenticationDelay", "authenticationFailed",
    ]
    assert PASSWORD not in repr(event)


def test_theNetworkIsCheckedBeforeTheDisabledState(users):
    """
    A disabled user's right password from a refused address is not told
    the administrator's reason: a wrong password's answer.
    """
    resultOf(users.setAllowedNetworks(ALICE, NETWORKS))
    resultOf(users.disableUser(ALICE, REASON))
    assert userPass(POP3Session(users, peer=REFUSED), ALICE, PASSWORD) == INVALID
    assert userPass(POP3Session(users, peer=ALLOWED), ALICE, PASSWORD) == refusedWith(REASON)


@pytest.mark.parametrize(
    "peer, allowed",
    [
        (IPv6Address("TCP", "::ffff:127.0.0.2", 40000), True),
        (IPv6Address("TCP", "::ffff:127.0.0.3", 40000), False),
        (IPv6Address("TCP", "2001:db8:5::1", 40000), True),
        (IPv6Address("TCP", "2001:db9::1", 40000), False),
        (UNIXAddress(None), False),
    ],
)
def test_ipv6AndMappedAddresses(users, peer, allowed):
    """
    An IPv4 client reaching a dual-stack listener (C{::ffff:127.0.0.2})
    is its IPv4 address; IPv6 clients are matched against IPv6 networks;
    a Unix socket's client only against C{local}.
    """
    resultOf(users.setAllowedNetworks(ALICE, NETWORKS))
    # Plaintext passwords taken from anywhere here: the networks alone refuse.
    s = POP3Session(users, peer=peer, trustedNetworks=("0.0.0.0/0", "::/0"))
    reply = userPass(s, ALICE, PASSWORD)
    assert reply.startswith("+OK") if allowed else reply == INVALID


@pytest.mark.parametrize(
    "networks, client, allowed",
    [
        ("203.0.113.0/24", "203.0.113.9", True),
        ("203.0.113.0/24", "198.51.100.7", False),
        # The balancer's own address (127.0.0.1) is not the client's.
        ("127.0.0.0/8", "198.51.100.7", False),
    ],
)
def test_theProxyToldAddressIsTheOneChecked(users, networks, client, allowed):
    """
    Behind a trusted balancer the address checked is the one its PROXY
    header names, not the balancer's.
    """
    from test_proxy import v1, wrapped

    resultOf(users.setAllowedNetworks(ALICE, networks))
    clock = Clock()
    factory = pop3Factory(users, clock, trustedNetworks=["0.0.0.0/0"])
    protocol, transport = wrapped(factory, clock)
    protocol.dataReceived(v1(client) + f"USER {ALICE}\r\nPASS {PASSWORD}\r\n".encode())
    clock.advance(0)
    reply = transport.value().decode().splitlines()[-1] + "\r\n"
    assert reply.startswith(f"+OK {ALICE}") if allowed else reply == INVALID


def test_storedNetworksThatCannotBeReadLetNoOneIn():
    """
    Networks written by hand that are not networks match no client (the
    user is refused, not let in from anywhere, nor answered with an
    internal error); the readable ones still match.
    """
    assert not peerAllowed(IPv4Address("TCP", "192.0.2.1", 1), "bogus")
    assert peerAllowed(IPv4Address("TCP", "192.0.2.1", 1), "bogus,192.0.2.0/24")
    assert peerAllowed(IPv4Address("TCP", "192.0.2.1", 1), None)


def test_networksAreParsedToOneCanonicalForm():
    assert parseAllowedNetworks(" 192.0.2.7, 192.0.2.0/24,::ffff:10.0.0.0/104,LOCAL,192.0.2.7/32") == (
        "192.0.2.7/32,192.0.2.0/24,10.0.0.0/8,local"
    )
    assert parseAllowedNetworks("any") is None
    assert parseAllowedNetworks("") is None
    for bad in ("192.0.2.300", "example.org", "10.0.0.0/33", "any,10.0.0.0/8"):
        with pytest.raises(ValueError):
            parseAllowedNetworks(bad)


# -- the store, on both engines ---------------------------------------------------


def test_theStoreKeepsAndTellsTheNetworks(anyStore):
    store = anyStore
    assert resultOf(store.setAllowedNetworks(ALICE, NETWORKS)) is None
    listed = {u.address: u.allowedNetworks for u in resultOf(store.listUsers())}
    assert listed == {ALICE: NETWORKS, BOB: None}
    paged = {u.address: u.allowedNetworks for u in resultOf(store.listUsers(page=1))}
    assert paged == listed
    assert resultOf(store.setAllowedNetworks(ALICE, "local")) == NETWORKS
    assert resultOf(store.setAllowedNetworks(ALICE, None)) == "local"
    assert {u.allowedNetworks for u in resultOf(store.listUsers())} == {None}
    with pytest.raises(NoSuchUser):
        resultOf(store.setAllowedNetworks("nobody@example.org", NETWORKS))


def test_openingFromARefusedAddressFailsAndLeavesItUnlocked(anyStore):
    """
    On both engines (PostgreSQL reads the snapshot as a prepared statement
    on its lock connection, in binary): L{NetworkRefused}, the lock given
    back; no peer (an administrator's command) is not checked; a renamed
    user keeps the networks.
    """
    store = anyStore
    resultOf(store.setAllowedNetworks(ALICE, NETWORKS))
    alice = resultOf(store.findUser(ALICE))
    with pytest.raises(NetworkRefused):
        resultOf(store.openMaildrop(alice, REFUSED))
    resultOf(resultOf(store.openMaildrop(alice, ALLOWED)).release())
    resultOf(resultOf(store.openMaildrop(alice)).release())
    resultOf(store.renameUser(ALICE, "alice2@example.org"))
    renamed = resultOf(store.findUser("alice2@example.org"))
    with pytest.raises(NetworkRefused):
        resultOf(store.openMaildrop(renamed, REFUSED))
    assert {u.address: u.allowedNetworks for u in resultOf(store.listUsers())}["alice2@example.org"] == NETWORKS


def test_usersAddedWithNetworks(anyStore):
    """
    C{addUsers} (C{mailgate user import}) adds a user with their networks
    in the transaction that adds them.
    """
    store = anyStore
    credentials = makeCredentials("carol's", logN=TEST_HASH_COST)
    added = resultOf(store.addUsers([
        ("carol@example.org", credentials, {"networks": "127.0.0.2/32"}),
        ("erin@example.org", credentials, {}),
    ]))
    assert added == [True, True]
    listed = {u.address: u.allowedNetworks for u in resultOf(store.listUsers())}
    assert listed["carol@example.org"] == "127.0.0.2/32" and listed["erin@example.org"] is None


def test_usersOfSchema15MayLogInFromAnywhereAfterTheMigration(databaseURL):
    """
    A database as the mailgate before this one left it (schema 15), with
    a disabled user and one who may log in: migrated, both are as they
    were, from anywhere, and can then be restricted; on both engines.
    """
    from databasefiles import olderSchema, olderUser
    from mailgate.store import openSynchronousStore
    from mailgate.store.schema import LATEST, currentVersion

    olderSchema(databaseURL, version=15)
    credentials = makeCredentials(PASSWORD, logN=TEST_HASH_COST)

    def disabled(cursor, userId):
        cursor.execute("UPDATE users SET disabled_at = 1700000000 WHERE user_id = ?", (userId,))

    olderUser(databaseURL, ALICE, credentials)
    olderUser(databaseURL, BOB, credentials, then=disabled)
    store = openSynchronousStore(databaseURL)
    try:
        assert store.database.run(currentVersion) == LATEST
        listed = {u.address: (u.allowedNetworks, u.disabledAt) for u in resultOf(store.listUsers())}
        assert listed == {ALICE: (None, None), BOB: (None, 1700000000)}
        s = POP3Session(store, peer=REFUSED)
        assert s.login(ALICE, PASSWORD).startswith("+OK")
        s.command("QUIT")
        assert POP3Session(store, peer=REFUSED).login(BOB, PASSWORD) == "-ERR [AUTH] Login disabled for this user\r\n"
        resultOf(store.setAllowedNetworks(ALICE, "127.0.0.2/32"))
        assert POP3Session(store, peer=REFUSED).login(ALICE, PASSWORD) == INVALID
        s = POP3Session(store, peer=ALLOWED)
        assert s.login(ALICE, PASSWORD).startswith("+OK")
        s.command("QUIT")
    finally:
        store.close()
