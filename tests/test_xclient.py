"""
POP3 XCLIENT (Dovecot's POP3 proxy names the client it relays) over the
protocol without sockets: offered in the greeting to proxies on
--xclient-network only, refused from elsewhere, after a login began and
a second time; the client's address then stands for the proxy's in the
login's checks (bans, the user's and a master user's networks) and the
log, while the connection stays counted against the proxy and the
proxy's link decides whether a password may come in the clear; each
XCLIENT counted by how it ended (mailgate_xclient_commands_total).  With
a real Dovecot in front: test_dovecot_pop3_proxy.py.
"""

import pytest
from twisted.internet.address import IPv4Address

from mailgate.auth.passwords import makeCredentials
from mailgate.session import OpenPolicy
from mailgate.testing import POP3Session, TEST_HASH_COST, addUser, deliver, memoryStore, resultOf

ALICE = "alice@example.org"
PASSWORD = "wonder land"
PROXY = IPv4Address("TCP", "127.0.0.1", 40000)
ELSEWHERE = IPv4Address("TCP", "127.0.0.9", 40000)
XCLIENT = "XCLIENT ADDR=192.0.2.7 PORT=4711 SESSION=abcDEF/123 TTL=4"


@pytest.fixture
def store():
    store = memoryStore()
    addUser(store, ALICE, PASSWORD)
    deliver(store, [ALICE], b"Subject: hi\r\n\r\nhello\r\n")
    return store


class RecordingPolicy(OpenPolicy):
    """
    Admits everyone, bans the addresses in C{banned}, and records what
    it is told of connections, failed logins and unknown recipients (the
    SMTP and LMTP XCLIENT tests use it too).
    """

    def __init__(self, banned=()):
        self.banned = set(banned)
        self.calls = []

    def admit(self, protocol, address):
        self.calls.append(("admit", address.host))

    def connectionClosed(self, protocol, address):
        self.calls.append(("closed", address.host))

    def isBanned(self, address):
        return address.host in self.banned

    def authenticationFailed(self, address, login, password=None):
        self.calls.append(("failed", address.host))

    def unknownRecipient(self, address):
        self.calls.append(("unknown", address.host))


def _session(store, peer=PROXY, **options):
    options.setdefault("apop", False)
    options.setdefault("xclientNetworks", ["127.0.0.1/32"])
    return POP3Session(store, peer=peer, **options)


def test_theGreetingOffersItToTheProxiesOnly(store):
    assert _session(store).greeting.startswith("+OK [XCLIENT] ")
    assert not _session(store, peer=ELSEWHERE).greeting.startswith("+OK [XCLIENT]")
    assert not POP3Session(store, peer=PROXY, apop=False).greeting.startswith("+OK [XCLIENT]")


def test_theClientsAddressStandsForTheProxysInTheLoginAndTheLog(store, logEvents):
    resultOf(store.setAllowedNetworks(ALICE, "192.0.2.0/24"))
    session = _session(store)
    assert session.command(XCLIENT) == "+OK the client's address is taken\r\n"
    # Alice may log in from 192.0.2.0/24 only: the relayed client is there.
    assert session.login(ALICE, PASSWORD).startswith(f"+OK {ALICE} has 1 message")
    session.command("QUIT")
    [xclient] = [e for e in logEvents if e.get("event") == "pop3.xclient"]
    assert xclient["line"] == "pop3 xclient peer=192.0.2.7:4711 proxy=127.0.0.1:40000 proxy_session=abcDEF/123"
    [login] = [e for e in logEvents if e.get("event") == "pop3.login"]
    assert login["peer"] == "192.0.2.7:4711"
    assert login["line"].startswith(f"pop3 login user={ALICE} peer=192.0.2.7:4711 ")
    # Without it, the proxy's own address is on none of her networks.
    assert _session(store).login(ALICE, PASSWORD) == "-ERR [AUTH] invalid user name or password\r\n"


def test_aBannedClientIsRefusedThroughTheProxy(store):
    policy = RecordingPolicy(banned={"192.0.2.7"})
    session = _session(store, policy=policy)
    assert session.command(XCLIENT).startswith("+OK")
    assert session.login(ALICE, PASSWORD).startswith("-ERR [SYS/TEMP] banned")
    # Another client through the same proxy logs in.
    other = _session(store, policy=policy)
    assert other.command("XCLIENT ADDR=198.51.100.1 PORT=1").startswith("+OK")
    assert other.login(ALICE, PASSWORD).startswith("+OK")


def test_failuresCountAgainstTheClientAndTheConnectionAgainstTheProxy(store):
    policy = RecordingPolicy()
    session = _session(store, policy=policy)
    session.command(XCLIENT)
    assert session.login(ALICE, "wrong").startswith("-ERR [AUTH]")
    session.protocol.transport.loseConnection()
    session.protocol.connectionLost(None)
    assert policy.calls == [("admit", "127.0.0.1"), ("failed", "192.0.2.7"), ("closed", "127.0.0.1")]


def test_thePlaintextRuleIsTheProxysLinks(store):
    # The proxy is on a trusted network (loopback); the client it relays
    # is not, and its password comes all the same.
    session = _session(store, trustedNetworks=["127.0.0.0/8"])
    session.command(XCLIENT)
    assert session.login(ALICE, PASSWORD).startswith("+OK")
    # A proxy on no trusted network (and no TLS): no plaintext, relayed or not.
    session = _session(store, peer=IPv4Address("TCP", "10.0.0.3", 5), xclientNetworks=["10.0.0.3/32"])
    session.command("XCLIENT ADDR=127.0.0.1 PORT=5")
    assert session.login(ALICE, PASSWORD).startswith("-ERR [AUTH] Plaintext authentication disallowed")


def test_aMasterUsersNetworksSeeTheClient(store):
    resultOf(store.addMasterUser("proxy", makeCredentials("key", logN=TEST_HASH_COST).passwordHash, "192.0.2.0/24"))
    session = _session(store, masterUsers=True, masterUserSeparator="*")
    session.command(XCLIENT)
    assert session.login(f"{ALICE}*proxy", "key").startswith("+OK")


def counted(session):
    """
    The series of C{mailgate_xclient_commands_total} that are not 0 in
    the session's factory's metrics, by C{(protocol, command, result)}
    (the SMTP and LMTP XCLIENT and XFORWARD tests use it too).
    """
    return {
        (sample.labels["protocol"], sample.labels["command"], sample.labels["result"]): sample.value
        for family in session.factory.metrics.registry.collect()
        if family.name == "mailgate_xclient_commands"
        for sample in family.samples
        if sample.name == "mailgate_xclient_commands_total" and sample.value
    }


@pytest.mark.parametrize(
    "peer, before, line, reply, result",
    [
        (ELSEWHERE, (), XCLIENT, "-ERR XCLIENT is not allowed from this address\r\n", "refused_network"),
        (PROXY, (XCLIENT,), XCLIENT, "-ERR XCLIENT comes once, before the login\r\n", "refused_sequence"),
        (PROXY, (f"USER {ALICE}",), XCLIENT, "-ERR XCLIENT comes once, before the login\r\n", "refused_sequence"),
        (PROXY, (), "XCLIENT PORT=5", "-ERR XCLIENT needs ADDR=IP-ADDRESS (and PORT=NUMBER)\r\n", "refused_syntax"),
        (
            PROXY, (), "XCLIENT ADDR=example.org", "-ERR XCLIENT needs ADDR=IP-ADDRESS (and PORT=NUMBER)\r\n",
            "refused_syntax",
        ),
        (
            PROXY, (), "XCLIENT ADDR=192.0.2.7 PORT=x", "-ERR XCLIENT needs ADDR=IP-ADDRESS (and PORT=NUMBER)\r\n",
            "refused_syntax",
        ),
        (
            # A zone: an interface of the proxy's machine, never the client's.
            PROXY, (), "XCLIENT ADDR=fe80::1%eth0 PORT=5",
            "-ERR XCLIENT needs ADDR=IP-ADDRESS (and PORT=NUMBER)\r\n", "refused_syntax",
        ),
        (
            PROXY, (), "XCLIENT ADDR=192.0.2.7 PORT=70000",
            "-ERR XCLIENT needs ADDR=IP-ADDRESS (and PORT=NUMBER)\r\n", "refused_syntax",
        ),
    ],
)
def test_refusals(store, peer, before, line, reply, result):
    """
    Each refusal is answered with its reason and counted in
    mailgate_xclient_commands_total by it (README): a proxy outside
    --xclient-network shows there, not only in the log.
    """
    session = _session(store, peer=peer)
    for command in before:
        session.command(command)
    assert session.command(line) == reply
    taken = {("pop3", "XCLIENT", "accepted"): 1} if before == (XCLIENT,) else {}
    assert counted(session) == {**taken, ("pop3", "XCLIENT", result): 1}
    if not before:
        # A refused XCLIENT changed nothing: the peer is the connection's.
        assert session.protocol.peer is session.protocol.connectedPeer


def test_aTakenXclientIsCounted(store):
    session = _session(store)
    assert counted(session) == {}
    assert session.command(XCLIENT) == "+OK the client's address is taken\r\n"
    assert counted(session) == {("pop3", "XCLIENT", "accepted"): 1}


def test_afterTheLoginItIsNoCommand(store):
    session = _session(store)
    session.login(ALICE, PASSWORD)
    assert session.command(XCLIENT).startswith("-ERR")
    assert session.protocol.peer is session.protocol.connectedPeer
