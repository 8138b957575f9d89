"""
The connection policy (mailgate/policy/) in memory, with a
L{twisted.internet.task.Clock} for time and the refresh timer: connection
limits, the authentication penalty (Dovecot's doubling, its cap, the
login-name slowdown), bans after N failures within the window, their
end, exempt networks, and several nodes sharing one store.

The store here is L{MemoryPolicyStore}; the SQL one, on both backends, is
tested in test_policy_store.py, and the two-node PostgreSQL case there too.
"""

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent
from zope.interface.verify import verifyObject

from mailgate.interfaces import IConnectionPolicy, IPolicyStore
from mailgate.metrics import Metrics
from mailgate.policy.addresses import ExemptNetworks, addressText, clientKey, parseNetworks
from mailgate.policy.connection import _KEYS_KEPT, BANNED, TOO_MANY, ConnectionPolicy, loginKey
from mailgate.policy.failures import FailureLog
from mailgate.policy.memory import MemoryPolicyStore
from mailgate.policy.penalty import penaltyDelay
from mailgate.policy.refresh import EXPIRE_INTERVAL, REFRESH_INTERVAL
from mailgate.policy.service import PolicyService
from mailgate.policy.settings import PolicySettings
from mailgate.records import AuthFailure
from mailgate.session import OpenPolicy
from mailgate.testing import resultOf

START = 1_700_000_000.0
NO_EXEMPTIONS = ("none",)


def tcp(host, port=40000):
    if ":" in host:
        return IPv6Address("TCP", host, port)
    return IPv4Address("TCP", host, port)


ATTACKER = tcp("192.0.2.66")
OTHER = tcp("198.51.100.7")


class RecordingMetrics(Metrics):
    def __init__(self):
        self.banCounts = []

    def bans(self, count):
        self.banCounts.append(count)


def makeClock():
    clock = Clock()
    clock.advance(START)
    return clock


def makePolicy(store=None, clock=None, metrics=None, defaultRealm=None, **settings):
    settings.setdefault("exemptNetworks", NO_EXEMPTIONS)
    store = MemoryPolicyStore() if store is None else store
    clock = makeClock() if clock is None else clock
    policy = ConnectionPolicy(store, clock, PolicySettings(**settings), metrics=metrics, defaultRealm=defaultRealm)
    return policy, store, clock


def fail(policy, address=ATTACKER, login="alice@example.org", times=1):
    for _ in range(times):
        policy.authenticationFailed(address, login)


def events(logs, name):
    return [e for e in logs if e.get("event") == name]


# -- contracts -------------------------------------------------------------


def test_providesTheInterfaces():
    policy, store, _ = makePolicy()
    assert verifyObject(IConnectionPolicy, policy)
    assert verifyObject(IConnectionPolicy, OpenPolicy())
    assert verifyObject(IPolicyStore, store)


# -- addresses and exempt networks -----------------------------------------


def test_clientKeys():
    assert clientKey(tcp("192.0.2.1")) == "192.0.2.1"
    # An IPv4 client on a dual-stack listener is the same client.
    assert clientKey(tcp("::ffff:192.0.2.1")) == "192.0.2.1"
    # An IPv6 client is its /64 network.
    assert clientKey(tcp("2001:DB8:0:0::1")) == "2001:db8::/64"
    assert clientKey(tcp("2001:db8:1:2:aaaa:bbbb:cccc:dddd")) == "2001:db8:1:2::/64"
    assert clientKey(tcp("fe80::1%eth0")) == "fe80::/64"
    assert clientKey(UNIXAddress(b"/run/mailgate/lmtp")) is None
    assert clientKey(UNIXAddress(None)) is None
    assert clientKey(None) is None
    assert addressText(" [2001:db8::1] ") == "2001:db8::/64"
    assert addressText("2001:db8:0:0:ffff::/64") == "2001:db8::/64"
    # In brackets with its prefix, as in brackets alone (ban add/del).
    assert addressText("[2001:db8::1]/64") == addressText(" [2001:db8::]/64 ") == "2001:db8::/64"
    assert addressText("192.0.2.1") == "192.0.2.1"
    for text in ("mail.example.org", "2001:db8::/48", "2001:db8::/96", "192.0.2.0/24", "[192.0.2.0]/24", "[::1/64]"):
        with pytest.raises(ValueError):
            addressText(text)


def test_anIPv6AttackerCannotEscapeTheBanByChangingAddressesInItsNetwork():
    policy, store, _ = makePolicy(banAfter=3)
    for n in range(3):
        fail(policy, tcp(f"2001:db8:1:2::{n + 1:x}"), f"user{n}@example.org")
    # Every address of the /64 is banned; a neighbouring /64 is not.
    assert policy.admit("pop3", tcp("2001:db8:1:2:ffff::99")) == BANNED
    assert policy.isBanned(tcp("2001:db8:1:2::1"))
    assert policy.admit("pop3", tcp("2001:db8:1:3::1")) is None
    assert list(store.bans) == ["2001:db8:1:2::/64"]


def test_anIPv6NetworkSharesOneConnectionLimitAndOnePenalty():
    policy, _, _ = makePolicy(maxConnectionsPerAddress=2)
    assert policy.admit("pop3", tcp("2001:db8::1")) is None
    assert policy.admit("pop3", tcp("2001:db8::2")) is None
    assert policy.admit("pop3", tcp("2001:db8::3")) == TOO_MANY
    assert policy.admit("pop3", tcp("2001:db8:0:1::3")) is None
    fail(policy, tcp("2001:db8::1"), "alice@example.org")
    assert policy.authenticationDelay(tcp("2001:db8::7"), "bob@example.org") > 0


def test_anExemptIPv6AddressStaysExemptWhenItsNetworkIsBanned():
    webmail, neighbour = tcp("2001:db8::10"), tcp("2001:db8::11")
    policy, _, _ = makePolicy(banAfter=2, exemptNetworks=["2001:db8::10/128"])
    fail(policy, webmail, "alice@example.org", times=5)
    assert policy.authenticationDelay(webmail, "alice@example.org") == 0
    fail(policy, neighbour, "bob@example.org", times=2)
    assert policy.admit("pop3", neighbour) == BANNED
    assert policy.admit("pop3", webmail) is None
    assert not policy.isBanned(webmail)


def test_theKeysOfHostsAreKeptBoundedAndAnswerAsWorkedOut():
    """
    The policy keeps each host's key (asked several times in every
    login), a bounded number of them: kept or worked out afresh, an
    exempt host has none, another its network's, a Unix peer none.
    """
    policy, _, _ = makePolicy(exemptNetworks=["192.0.2.0/24"])
    for _ in range(2):
        assert policy._key(tcp("192.0.2.10")) is None
        assert policy._key(tcp("2001:db8::1")) == clientKey(tcp("2001:db8::1"))
        assert policy._key(OTHER) == "198.51.100.7"
        assert policy._key(UNIXAddress(None)) is None
    for n in range(_KEYS_KEPT + 10):
        policy._key(tcp(f"10.{n >> 16}.{(n >> 8) & 255}.{n & 255}"))
    assert 0 < len(policy._keys) <= _KEYS_KEPT
    assert policy._key(tcp("192.0.2.10")) is None
    assert policy._key(OTHER) == "198.51.100.7"


def test_aBanOfOneIPv6AddressStoredByAnEarlierVersionCoversItsNetwork():
    policy, store, clock = makePolicy()
    store.addBan("2001:db8::1", clock.seconds(), 3600)
    policy.sync.refresh()
    assert policy.admit("pop3", tcp("2001:db8::1")) == BANNED
    assert policy.admit("pop3", tcp("2001:db8::2")) == BANNED
    assert policy.admit("pop3", tcp("2001:db8:0:1::1")) is None


def test_exemptNetworksDefaultToLoopback():
    exempt = ExemptNetworks()
    assert "127.0.0.1" in exempt
    assert "127.0.0.3" in exempt
    assert "::1" in exempt
    assert "192.0.2.1" not in exempt
    assert None not in exempt


def test_exemptNetworksNone():
    assert parseNetworks(["none"]) == []
    assert "127.0.0.1" not in ExemptNetworks(["none"])
    with pytest.raises(ValueError):
        parseNetworks(["none", "10.0.0.0/8"])
    with pytest.raises(ValueError):
        parseNetworks(["10.0.0.0/33"])


def test_exemptNetworksReplaceTheDefault():
    exempt = ExemptNetworks(["10.0.0.0/8"])
    assert "10.1.2.3" in exempt
    assert "127.0.0.1" not in exempt


def test_loginKeys():
    assert loginKey("  Alice@Example.ORG ") == "alice@example.org"
    assert loginKey(b"bob") == "bob"
    assert loginKey(None) is None
    assert loginKey("") is None
    assert len(loginKey("x" * 5000)) == 255


@pytest.mark.parametrize(
    "spellings, realm",
    [
        (["alice@example.org", "alice@example.org.", "Alice@Example.Org.", "alice", "ALICE"], "example.org"),
        (
            [
                "alice@xn--bcher-kva.example",
                "alice@b\u00fccher.example",
                "alice@bu\u0308cher.example",
                "alice@\uff42\u00fccher.example",
                "alice@xn--bcher-kva.example.",
            ],
            None,
        ),
    ],
    ids=["trailing-dot-and-realm", "unicode-domain"],
)
def test_everySpellingOfAUsersLoginCountsAgainstTheOneName(spellings, realm):
    """
    The per-name penalty counts the addresses failing against a user
    whatever spelling of her login they use: every spelling that logs in
    as her (a trailing dot, the default realm's bare name, her domain in
    Unicode, composed or not, in full-width letters) was a name of its
    own, so guessers from many addresses, each with another spelling,
    never slowed her account.
    """
    policy, _, _ = makePolicy(defaultRealm=realm)
    for number, spelling in enumerate(spellings, 1):
        policy.authenticationFailed(tcp(f"198.51.100.{number}"), spelling)
    assert policy.authenticationDelay(tcp("203.0.113.9"), spellings[0]) > 0


# -- connection limits -----------------------------------------------------


def test_totalLimit():
    policy, _, _ = makePolicy(maxConnections=3)
    clients = [tcp(f"192.0.2.{n}") for n in range(1, 4)]
    for client in clients:
        assert policy.admit("pop3", client) is None
    assert policy.admit("smtp", tcp("192.0.2.9")) == TOO_MANY
    # Unix socket peers and exempt networks count towards the total too.
    assert policy.admit("lmtp", UNIXAddress(b"/run/lmtp")) == TOO_MANY
    policy.connectionClosed("pop3", clients[0])
    assert policy.admit("smtp", tcp("192.0.2.9")) is None
    assert policy.admit("pop3", clients[0]) == TOO_MANY


def test_perAddressLimit():
    policy, _, _ = makePolicy(maxConnectionsPerAddress=2)
    assert policy.admit("pop3", tcp("127.0.0.2", 1)) is None
    assert policy.admit("smtp", tcp("127.0.0.2", 2)) is None
    assert policy.admit("pop3", tcp("127.0.0.2", 3)) == TOO_MANY
    # Another address is not held up.
    assert policy.admit("pop3", tcp("127.0.0.3", 1)) is None
    policy.connectionClosed("smtp", tcp("127.0.0.2", 2))
    assert policy.admit("pop3", tcp("127.0.0.2", 4)) is None


def test_perAddressLimitCountsIPv4MappedAsIPv4():
    policy, _, _ = makePolicy(maxConnectionsPerAddress=1)
    assert policy.admit("pop3", tcp("192.0.2.5")) is None
    assert policy.admit("pop3", tcp("::ffff:192.0.2.5")) == TOO_MANY


def test_exemptNetworksAreNotLimitedPerAddress():
    policy, _, _ = makePolicy(maxConnectionsPerAddress=2, maxConnections=10, exemptNetworks=["127.0.0.0/8"])
    for port in range(10):
        assert policy.admit("pop3", tcp("127.0.0.1", port)) is None
    # ... but the process's total still applies to them.
    assert policy.admit("pop3", tcp("127.0.0.1", 99)) == TOO_MANY


def test_anExemptIPv6AddressTakesNoConnectionsFromItsNeighbours():
    """
    An exempt IPv6 host (a webmail) shares its /64 with hosts that are not
    exempt: its connections, unlimited, are not counted against them.
    Counted, its 50 connections had every other host of the /64 refused
    at its first.
    """
    webmail, neighbour = tcp("2001:db8::10"), tcp("2001:db8::11")
    policy, _, _ = makePolicy(maxConnectionsPerAddress=2, exemptNetworks=["2001:db8::10/128"])
    for port in range(5):
        assert policy.admit("pop3", tcp("2001:db8::10", port)) is None
    assert policy.admit("pop3", neighbour) is None
    assert policy.admit("pop3", tcp("2001:db8::12")) is None
    assert policy.admit("pop3", tcp("2001:db8::13")) == TOO_MANY
    # The webmail's connections closing leave the neighbours' count alone.
    for port in range(5):
        policy.connectionClosed("pop3", tcp("2001:db8::10", port))
    assert policy.admit("pop3", tcp("2001:db8::13")) == TOO_MANY
    assert policy.admit("pop3", webmail) is None
    assert policy.limits.total == 3


def test_unixPeersAreNotLimitedPerAddress():
    policy, _, _ = makePolicy(maxConnectionsPerAddress=1)
    for _ in range(5):
        assert policy.admit("lmtp", UNIXAddress(b"/run/lmtp")) is None
    assert policy.limits.total == 5
    for _ in range(5):
        policy.connectionClosed("lmtp", UNIXAddress(b"/run/lmtp"))
    assert policy.limits.total == 0


def test_zeroMeansNoLimit():
    policy, _, _ = makePolicy(maxConnections=0, maxConnectionsPerAddress=0)
    for port in range(200):
        assert policy.admit("pop3", tcp("192.0.2.1", port)) is None


def test_closingMoreThanOpenedDoesNotGoNegative():
    policy, _, _ = makePolicy(maxConnections=1)
    policy.connectionClosed("pop3", ATTACKER)
    assert policy.limits.total == 0
    assert policy.admit("pop3", ATTACKER) is None
    assert policy.admit("pop3", OTHER) == TOO_MANY


# -- the authentication penalty --------------------------------------------


def test_penaltyFormula():
    assert [penaltyDelay(n, 15) for n in range(7)] == [0, 2, 4, 8, 15, 15, 15]
    assert penaltyDelay(3, 0) == 0
    assert penaltyDelay(1, 1) == 1
    assert penaltyDelay(10**6, 15) == 15


def test_penaltyDoublesPerFailureUpToTheCap():
    policy, _, _ = makePolicy(banAfter=0)
    delays = [policy.authenticationDelay(ATTACKER, "alice")]
    for _ in range(6):
        fail(policy)
        delays.append(policy.authenticationDelay(ATTACKER, "alice"))
    assert delays == [0, 2, 4, 8, 15, 15, 15]
    # The login name does not matter for the address's penalty.
    assert policy.authenticationDelay(ATTACKER, None) == 15
    assert policy.authenticationDelay(ATTACKER, "bob") == 15


def test_penaltyCapIsTheOption():
    policy, _, _ = makePolicy(banAfter=0, authPenaltyMax=5)
    fail(policy, times=5)
    assert policy.authenticationDelay(ATTACKER, "alice") == 5


def test_penaltyMaxZeroTurnsTheDelayOff():
    policy, _, _ = makePolicy(banAfter=0, authPenaltyMax=0)
    fail(policy, times=5)
    assert policy.authenticationDelay(ATTACKER, "alice") == 0


def test_penaltyIsPerAddress():
    policy, _, _ = makePolicy(banAfter=0)
    fail(policy, times=3)
    assert policy.authenticationDelay(OTHER, "bob") == 0


def test_penaltyFadesWithTheWindow():
    policy, _, clock = makePolicy(banAfter=0, banWindow=600)
    fail(policy, times=2)
    clock.advance(300)
    fail(policy)
    assert policy.authenticationDelay(ATTACKER, None) == 8
    clock.advance(301)
    assert policy.authenticationDelay(ATTACKER, None) == 2
    clock.advance(300)
    assert policy.authenticationDelay(ATTACKER, None) == 0


def test_successClearsThePenaltyButNotTheBanCount():
    policy, _, _ = makePolicy(banAfter=4)
    fail(policy, times=3)
    assert policy.authenticationDelay(ATTACKER, None) == 8
    policy.authenticationSucceeded(ATTACKER, "alice@example.org")
    assert policy.authenticationDelay(ATTACKER, None) == 0
    fail(policy)
    assert policy.isBanned(ATTACKER)


def test_manyAddressesAgainstOneNameSlowThatName():
    policy, _, _ = makePolicy(banAfter=0)
    victim = "Alice@example.org"
    user = tcp("203.0.113.50")
    delays = []
    for n in range(1, 8):
        fail(policy, tcp(f"192.0.2.{n}"), victim)
        delays.append(policy.authenticationDelay(user, "alice@example.org"))
    # Two addresses are a user mistyping on two devices; from the third
    # on, the name is slowed, doubling, up to the cap.
    assert delays == [0, 0, 2, 4, 8, 15, 15]
    # Only that name: the same address logging in as someone else is not.
    assert policy.authenticationDelay(user, "bob@example.org") == 0
    assert policy.authenticationDelay(user, None) == 0


def test_nameSlowdownIsNeverALockout():
    policy, _, clock = makePolicy(banAfter=0, banWindow=600)
    for n in range(1, 200):
        fail(policy, tcp(f"192.0.{n // 250}.{n % 250 + 1}"), "alice")
    user = tcp("203.0.113.50")
    # The real user is admitted, not banned, and waits at most the cap.
    assert policy.admit("pop3", user) is None
    assert not policy.isBanned(user)
    assert policy.authenticationDelay(user, "alice") == 15
    # Once the attack stops, the slowdown fades with the window.
    clock.advance(601)
    assert policy.authenticationDelay(user, "alice") == 0


def test_oneAddressRepeatingANameDoesNotSlowTheName():
    policy, _, _ = makePolicy(banAfter=0)
    fail(policy, ATTACKER, "alice", times=8)
    assert policy.authenticationDelay(OTHER, "alice") == 0


def test_delayAnswersWithoutTheStore():
    """
    The per-command methods answer from memory: with a store that never
    answers, they answer all the same.
    """

    class Silent(MemoryPolicyStore):
        def recordFailure(self, *args, **kwargs):
            return defer.Deferred()

        def changes(self, *args):
            return defer.Deferred()

    policy, _, _ = makePolicy(store=Silent(), banAfter=3)
    policy.start()
    fail(policy, times=2)
    assert policy.authenticationDelay(ATTACKER, None) == 4
    fail(policy)
    assert policy.admit("pop3", ATTACKER) == BANNED
    policy.stop()


# -- bans --------------------------------------------------------------------


def test_banAtTheNthFailureWithinTheWindow():
    metrics = RecordingMetrics()
    policy, store, _ = makePolicy(banAfter=3, metrics=metrics)
    with capturedLogs() as logs:
        fail(policy, times=2)
        assert not policy.isBanned(ATTACKER)
        assert policy.admit("pop3", ATTACKER) is None
        fail(policy)
    assert policy.isBanned(ATTACKER)
    assert policy.admit("pop3", ATTACKER) == BANNED
    assert policy.admit("smtp", ATTACKER) == BANNED
    # Others are not held up.
    assert policy.admit("pop3", OTHER) is None
    assert not policy.isBanned(OTHER)
    # The store has it, for every node.
    assert [(b.address, b.reason, b.failures) for b in store.bans.values()] == [
        ("192.0.2.66", "auth-failures", 3)
    ]
    [added] = events(logs, "ban.added")
    assert added["address"] == "192.0.2.66"
    assert added["failures"] == 3
    assert metrics.banCounts == [1]


def test_failuresOutsideTheWindowDoNotBan():
    policy, _, clock = makePolicy(banAfter=3, banWindow=600)
    fail(policy, times=2)
    clock.advance(601)
    fail(policy, times=2)
    assert not policy.isBanned(ATTACKER)
    fail(policy)
    assert policy.isBanned(ATTACKER)


def test_banEndsAfterBanTime():
    metrics = RecordingMetrics()
    policy, _, clock = makePolicy(banAfter=2, banTime=3600, metrics=metrics)
    policy.start()
    fail(policy, times=2)
    clock.advance(3599)
    assert policy.admit("pop3", ATTACKER) == BANNED
    with capturedLogs() as logs:
        clock.advance(1)
        assert policy.admit("pop3", ATTACKER) is None
        clock.advance(REFRESH_INTERVAL)
    [removed] = events(logs, "ban.removed")
    assert removed["how"] == "ended"
    assert metrics.banCounts == [1, 0]
    # A fresh start: the failures that made the ban are out of the window.
    assert policy.authenticationDelay(ATTACKER, None) == 0
    policy.stop()


def test_banAfterZeroNeverBans():
    policy, store, _ = makePolicy(banAfter=0)
    fail(policy, times=50)
    assert not policy.isBanned(ATTACKER)
    assert store.bans == {}


def test_bannedAddressFailuresAreNotRecorded():
    policy, store, _ = makePolicy(banAfter=2)
    fail(policy, times=2)
    fail(policy, times=20)
    assert len(store.failures) == 2
    assert len(policy.failures) == 2


def test_exemptAddressesAreNeverPenalisedOrBanned():
    policy, store, _ = makePolicy(banAfter=2, exemptNetworks=["127.0.0.0/8", "::1/128"])
    for client in (tcp("127.0.0.1"), tcp("::1"), tcp("::ffff:127.0.0.5")):
        fail(policy, client, "alice", times=10)
        assert policy.authenticationDelay(client, "alice") == 0
        assert not policy.isBanned(client)
        assert policy.admit("pop3", client) is None
    assert store.failures == [] and store.bans == {}


def test_exemptAddressesIgnoreBansInTheStore():
    policy, store, clock = makePolicy(exemptNetworks=["10.0.0.0/8"])
    store.addBan("10.1.1.1", clock.seconds(), 3600)
    store.addBan("127.0.0.1", clock.seconds(), 3600)
    policy.sync.refresh()
    assert policy.admit("pop3", tcp("10.1.1.1")) is None
    assert not policy.isBanned(tcp("10.1.1.1"))
    # The option replaced the default: loopback is no longer exempt.
    assert policy.admit("pop3", tcp("127.0.0.1")) == BANNED


def test_exemptNoneBansLoopback():
    policy, _, _ = makePolicy(banAfter=2, exemptNetworks=["none"])
    fail(policy, tcp("127.0.0.2"), times=2)
    assert policy.admit("pop3", tcp("127.0.0.2")) == BANNED
    assert policy.admit("pop3", tcp("127.0.0.3")) is None


def test_unixPeersAreNeverPenalisedOrBanned():
    policy, store, _ = makePolicy(banAfter=1)
    peer = UNIXAddress(b"/run/mailgate/pop3")
    fail(policy, peer, times=3)
    assert policy.authenticationDelay(peer, "alice") == 0
    assert not policy.isBanned(peer)
    assert store.failures == []


def test_authenticationFailedNeverRaises():
    class Broken(MemoryPolicyStore):
        def recordFailure(self, *args, **kwargs):
            raise RuntimeError("broken store")

    policy, _, _ = makePolicy(store=Broken())
    with capturedLogs() as logs:
        policy.authenticationFailed(ATTACKER, "alice")
    assert any(e.get("log_failure") is not None for e in logs)


def test_banHoldsWhileTheStoreIsDown():
    """
    A ban this node made is enforced even if the store cannot keep it,
    until it ends; the outage is logged once, and its end once.
    """

    class Down(MemoryPolicyStore):
        down = True

        def recordFailure(self, *args, **kwargs):
            if self.down:
                return defer.fail(ConnectionError("database unavailable"))
            return super().recordFailure(*args, **kwargs)

        def changes(self, *args):
            if self.down:
                return defer.fail(ConnectionError("database unavailable"))
            return super().changes(*args)

    store = Down()
    with capturedLogs() as logs:
        policy, _, clock = makePolicy(store=store, banAfter=3, banTime=100)
        policy.start()
        fail(policy, times=3)
        for _ in range(10):
            clock.advance(REFRESH_INTERVAL)
        assert policy.admit("pop3", ATTACKER) == BANNED
        store.down = False
        clock.advance(REFRESH_INTERVAL)
        # The store's (empty) view does not lift a ban it never stored.
        assert policy.admit("pop3", ATTACKER) == BANNED
        clock.advance(100)
        assert policy.admit("pop3", ATTACKER) is None
        policy.stop()
    warnings = [e for e in logs if "enforcing what this node knows" in e.get("log_format", "")]
    assert len(warnings) == 1
    assert len([e for e in logs if "answers again" in e.get("log_format", "")]) == 1


# -- several nodes, one store ----------------------------------------------


def twoNodes(**settings):
    store = MemoryPolicyStore()
    clock = makeClock()
    a, _, _ = makePolicy(store=store, clock=clock, **settings)
    b, _, _ = makePolicy(store=store, clock=clock, **settings)
    a.start()
    b.start()
    return a, b, store, clock


def test_banMadeByOneNodeIsEnforcedByAnotherWithinOneRefresh():
    a, b, _, clock = twoNodes(banAfter=3)
    fail(a, times=3)
    assert a.admit("pop3", ATTACKER) == BANNED
    # Node B has not refreshed yet...
    assert b.admit("pop3", ATTACKER) is None
    b.connectionClosed("pop3", ATTACKER)
    # ... and enforces it after one refresh interval (half a second).
    clock.advance(REFRESH_INTERVAL)
    assert b.admit("pop3", ATTACKER) == BANNED
    assert b.isBanned(ATTACKER)
    a.stop()
    b.stop()


def test_failuresOnEveryNodeCountTowardsOneBan():
    a, b, store, clock = twoNodes(banAfter=4)
    fail(a, times=2)
    fail(b, times=1)
    clock.advance(REFRESH_INTERVAL)
    # B saw A's failures through the store: the penalty is shared too.
    assert b.authenticationDelay(ATTACKER, None) == 8
    # The fourth, on B, bans, and B enforces it at once.
    fail(b)
    assert b.admit("pop3", ATTACKER) == BANNED
    assert store.bans["192.0.2.66"].failures == 4
    clock.advance(REFRESH_INTERVAL)
    assert a.admit("pop3", ATTACKER) == BANNED
    a.stop()
    b.stop()


def test_storeCountsFailuresThisNodeHasNotSeen():
    """
    The store decides with every node's failures, even those this node
    has not read back yet: the write's answer bans here at once.
    """
    store = MemoryPolicyStore()
    clock = makeClock()
    a, _, _ = makePolicy(store=store, clock=clock, banAfter=3)
    b, _, _ = makePolicy(store=store, clock=clock, banAfter=3)
    fail(a, times=2)
    # B never refreshed: it knows of one failure, the store of three.
    fail(b)
    assert b.admit("pop3", ATTACKER) == BANNED


def test_adminBanAndLiftAreHonouredWithinOneRefresh():
    a, b, store, clock = twoNodes(banAfter=5)
    with capturedLogs() as logs:
        store.addBan("192.0.2.66", clock.seconds(), 600)
        clock.advance(REFRESH_INTERVAL)
        assert a.admit("pop3", ATTACKER) == BANNED
        assert b.admit("smtp", ATTACKER) == BANNED
        store.removeBan("192.0.2.66", clock.seconds())
        clock.advance(REFRESH_INTERVAL)
        assert a.admit("pop3", ATTACKER) is None
        assert b.admit("smtp", ATTACKER) is None
    assert [e["address"] for e in events(logs, "ban.added")] == ["192.0.2.66"] * 2
    assert [e["how"] for e in events(logs, "ban.removed")] == ["lifted"] * 2
    a.stop()
    b.stop()


def test_bansFoundAtStartAreOneLineNotNews():
    """
    A node starting on a store that holds bans logs them as one
    ban.loaded line, not a ban.added each (an alert on new bans would see
    an attack at every restart); a ban made afterwards is news.
    """
    store = MemoryPolicyStore()
    clock = makeClock()
    store.addBan("192.0.2.66", clock.seconds(), 600)
    store.addBan("192.0.2.67", clock.seconds(), 600)
    policy, _, _ = makePolicy(store=store, clock=clock)
    with capturedLogs() as logs:
        policy.start()
        assert policy.admit("pop3", ATTACKER) == BANNED
        store.addBan("192.0.2.68", clock.seconds(), 600)
        clock.advance(REFRESH_INTERVAL)
    assert [formatEvent(e) for e in events(logs, "ban.loaded")] == ["2 bans in force, read from the database"]
    assert [e["address"] for e in events(logs, "ban.added")] == ["192.0.2.68"]
    policy.stop()


def test_liftedBanStartsAfresh():
    a, b, store, clock = twoNodes(banAfter=3)
    fail(a, times=3)
    clock.advance(REFRESH_INTERVAL)
    assert b.isBanned(ATTACKER)
    store.removeBan("192.0.2.66", clock.seconds())
    clock.advance(REFRESH_INTERVAL)
    for node in (a, b):
        assert not node.isBanned(ATTACKER)
        # Its failures are forgotten: no penalty, and a new failure does
        # not ban it again at once.
        assert node.authenticationDelay(ATTACKER, None) == 0
    fail(a)
    assert not a.isBanned(ATTACKER)
    a.stop()
    b.stop()


def test_liftingABanThisNodeJustMadeIsHonoured():
    a, _, store, clock = twoNodes(banAfter=2)
    fail(a, times=2)
    store.removeBan("192.0.2.66", clock.seconds())
    clock.advance(REFRESH_INTERVAL)
    assert a.admit("pop3", ATTACKER) is None


def test_aBanLiftedBeforeANodeReadItIsAFreshStartThereToo():
    """
    Node B has A's failures from an address but had not read the ban they
    made when the admin lifted it (within its half-second, or while its
    reads failed): it forgets them all the same.  Before, a node forgot
    only on seeing a ban it enforced go, and B banned the address again
    at its next failure.  Found by tests/test_policy_model.py.
    """
    store = MemoryPolicyStore()
    clock = makeClock()
    a, _, _ = makePolicy(store=store, clock=clock, banAfter=3)
    b, _, _ = makePolicy(store=store, clock=clock, banAfter=3)
    a.start()
    b.start()
    fail(a, times=2)
    clock.advance(REFRESH_INTERVAL)
    assert b.authenticationDelay(ATTACKER, None) == 4
    fail(a)
    assert a.isBanned(ATTACKER) and not b.isBanned(ATTACKER)
    store.removeBan("192.0.2.66", clock.seconds())
    b.sync.refresh()
    assert not b.isBanned(ATTACKER)
    assert b.authenticationDelay(ATTACKER, None) == 0
    fail(b)
    assert not b.isBanned(ATTACKER)
    a.stop()
    b.stop()


def test_aBanMadeBeforeTheNodesReadAForgettingLeavesItToThem():
    """
    C{ban del} of an address slowed and not banned, then C{ban add} of it
    before the nodes' next read: once the admin's ban ends, the failures
    forgotten slow it no more.  Before, the ban replaced the record of the
    forgetting, and the nodes never forgot.  Found by
    tests/test_policy_model.py.
    """
    a, b, store, clock = twoNodes(banAfter=5, banTime=3600)
    fail(a, times=2)
    clock.advance(REFRESH_INTERVAL)
    assert b.authenticationDelay(ATTACKER, None) == 4
    resultOf(store.forgetFailures("192.0.2.66", clock.seconds()))
    resultOf(store.addBan("192.0.2.66", clock.seconds(), 30))
    clock.advance(REFRESH_INTERVAL)
    for node in (a, b):
        assert node.isBanned(ATTACKER)
    clock.advance(30)
    for node in (a, b):
        assert not node.isBanned(ATTACKER)
        assert node.authenticationDelay(ATTACKER, None) == 0
    a.stop()
    b.stop()


def test_aForgettingReadLateKeepsTheFailuresAfterIt():
    """
    A node reads the record of a C{ban del} after the address failed on
    it again (its read came late): the failures up to the forgetting are
    forgotten, the later one still counts.
    """
    # Not started: its reads are this test's (no timer).
    policy, store, clock = makePolicy(banAfter=10)
    fail(policy, times=3)
    resultOf(store.forgetFailures("192.0.2.66", clock.seconds()))
    clock.advance(2)
    # The read is held up (the store was slow): a new failure first.
    policy.authenticationFailed(ATTACKER, "bob@example.org")
    assert policy.authenticationDelay(ATTACKER, None) == 15
    policy.sync.refresh()
    assert policy.authenticationDelay(ATTACKER, None) == 2


def test_restartKeepsBans():
    policy, store, clock = makePolicy(banAfter=2)
    fail(policy, times=2)
    policy.stop()
    again, _, _ = makePolicy(store=store, clock=clock)
    again.start()
    assert again.admit("pop3", ATTACKER) == BANNED
    # And the failures within the window: the penalty too.
    assert again.penalty.delay("192.0.2.66", None) == 4
    again.stop()


# -- the refresh timer and expiry ----------------------------------------------


class Counting(MemoryPolicyStore):
    def __init__(self):
        super().__init__()
        self.reads = 0
        self.expiries = 0

    def changes(self, *args):
        self.reads += 1
        return super().changes(*args)

    def expire(self, *args):
        self.expiries += 1
        return super().expire(*args)


def test_refreshRunsOnTheGivenReactor():
    store = Counting()
    clock = MemoryReactorClock()
    clock.advance(START)
    policy, _, _ = makePolicy(store=store, clock=clock)
    service = PolicyService(policy, clock)
    service.startService()
    # Not before the reactor runs (twistd starts services first).
    assert store.reads == 0
    clock.run()
    assert store.reads == 1
    clock.advance(REFRESH_INTERVAL)
    clock.advance(REFRESH_INTERVAL)
    assert store.reads == 3
    service.stopService()
    clock.advance(10)
    assert store.reads == 3
    assert clock.getDelayedCalls() == []


def test_serviceStoppedBeforeTheReactorRunsNeverRefreshes():
    store = Counting()
    clock = MemoryReactorClock()
    policy, _, _ = makePolicy(store=store, clock=clock)
    service = PolicyService(policy, clock)
    service.startService()
    service.stopService()
    clock.run()
    clock.advance(10)
    assert store.reads == 0


def test_slowStoreRefreshesDoNotPileUp():
    class Slow(Counting):
        def changes(self, *args):
            self.reads += 1
            self.pending = defer.Deferred()
            return self.pending

    store = Slow()
    policy, _, clock = makePolicy(store=store)
    policy.start()
    for _ in range(10):
        clock.advance(REFRESH_INTERVAL)
    assert store.reads == 1
    store.pending.callback(MemoryPolicyStore().changes(None, 0, 0).result)
    clock.advance(REFRESH_INTERVAL)
    assert store.reads == 2
    policy.stop()


def test_versionUnchangedMeansNoBanList():
    store = MemoryPolicyStore()
    store.addBan("192.0.2.1", START, 600)
    first = store.changes(None, START, START).result
    assert [b.address for b in first.bans] == ["192.0.2.1"]
    again = store.changes(first.version, START, START).result
    assert again.bans is None


def test_oldFailuresAndEndedBansExpire():
    store = Counting()
    policy, _, clock = makePolicy(store=store, banAfter=3, banWindow=600, banTime=900)
    policy.start()
    fail(policy, times=3)
    fail(policy, OTHER, times=1)
    assert store.expiries == 1
    assert len(store.failures) == 4
    clock.pump([EXPIRE_INTERVAL / 4] * 44)  # 660 s: past the window
    assert store.expiries >= 11
    assert store.failures == []
    assert "192.0.2.66" in store.bans
    clock.pump([EXPIRE_INTERVAL / 4] * 20)  # 960 s: past the ban
    assert store.bans == {}
    policy.stop()


def test_failureLogIsBounded():
    log = FailureLog(window=600, capacity=100)
    for n in range(1000):
        log.add(AuthFailure(f"id{n}", f"10.0.{n // 250}.{n % 250}", "alice", START + n / 1000))
    assert len(log) == 100
    # The newest are kept.
    assert log.fromAddress("10.0.3.249", START - 1) == 1
    assert log.fromAddress("10.0.0.0", START - 1) == 0


def test_failureReadBackTwiceCountsOnce():
    log = FailureLog(window=600)
    failure = AuthFailure("same", "192.0.2.1", "alice", START)
    assert log.add(failure)
    assert not log.add(failure)
    assert log.fromAddress("192.0.2.1", START - 1) == 1


def test_banMetricCountsBansInForce():
    metrics = RecordingMetrics()
    store = MemoryPolicyStore()
    policy, _, clock = makePolicy(store=store, metrics=metrics)
    store.addBan("192.0.2.1", clock.seconds(), 10)
    store.addBan("192.0.2.2", clock.seconds(), 20)
    policy.start()
    clock.advance(10)
    clock.advance(10)
    assert metrics.banCounts == [2, 1, 0]
    policy.stop()


def test_banTimesAreBounded():
    """
    An embedder's PolicySettings are held to the bounds of --ban-time and
    --ban-window: a ban must end at a time a date can show.
    """
    from mailgate.policy.settings import MAX_BAN_TIME

    assert PolicySettings(banTime=MAX_BAN_TIME, banWindow=MAX_BAN_TIME).banTime == MAX_BAN_TIME
    for name in ("banTime", "banWindow"):
        with pytest.raises(ValueError, match=f"{name} must be at most {MAX_BAN_TIME} seconds"):
            PolicySettings(**{name: MAX_BAN_TIME + 1})
        with pytest.raises(ValueError, match=f"{name} must be positive"):
            PolicySettings(**{name: 0})


# -- the same wrong password again -----------------------------------------


def test_theSameWrongPasswordAgainIsNotCountedAgain():
    policy, store, _ = makePolicy(banAfter=3)
    for _ in range(20):
        policy.authenticationFailed(ATTACKER, "Alice@example.org", b"old password")
        policy.authenticationFailed(ATTACKER, "alice@example.org", b"other old password")
    assert len(store.failures) == 2
    assert not policy.isBanned(ATTACKER)
    # A third password is a guess.
    policy.authenticationFailed(ATTACKER, "alice@example.org", b"guess")
    assert policy.isBanned(ATTACKER)


def test_guessesAreAllCountedAndPasswordsAreNotKept():
    policy, store, _ = makePolicy(banAfter=10)
    for n in range(9):
        policy.authenticationFailed(ATTACKER, "alice@example.org", f"guess {n}".encode())
    # The same password against another name is another guess (spraying).
    policy.authenticationFailed(ATTACKER, "bob@example.org", b"guess 0")
    assert policy.isBanned(ATTACKER)
    assert len(store.failures) == 10
    remembered = b"".join(b"".join(d) for d in policy.repeats._byAddress.values())
    assert b"guess" not in remembered


def test_failuresWithoutThePasswordAreAllCounted():
    policy, store, _ = makePolicy(banAfter=3)
    fail(policy, times=3)
    assert policy.isBanned(ATTACKER)


def test_aRepeatFromAnotherAddressCounts():
    policy, store, _ = makePolicy(banAfter=0)
    policy.authenticationFailed(ATTACKER, "alice@example.org", b"old")
    policy.authenticationFailed(OTHER, "alice@example.org", b"old")
    assert len(store.failures) == 2


def test_theSameTokenWithoutANameAgainIsNotCountedAgain():
    """
    An OAUTHBEARER client that names no authorisation identity (C{n,,}:
    the login is no name) and sends the same expired token at every poll
    is counted once, as one sending the same old password under a name
    is (README, OAuth 2.0 bearer tokens); it was counted each time, and
    its address banned at the third here.  Other tokens are guesses.
    """
    policy, store, _ = makePolicy(banAfter=3)
    for _ in range(4):
        policy.authenticationFailed(ATTACKER, "", b"eyJ.expired.token")
    assert not policy.isBanned(ATTACKER)
    assert len(store.failures) == 1
    policy.authenticationFailed(ATTACKER, "", b"eyJ.another.token")
    policy.authenticationFailed(ATTACKER, None, b"eyJ.a.third")
    assert policy.isBanned(ATTACKER)


def test_onlyTheLastFewFailuresOfAnAddressAreRemembered():
    from mailgate.policy.repeats import REMEMBERED, RepeatedCredentials

    repeats = RepeatedCredentials(capacity=2)
    for n in range(REMEMBERED + 1):
        assert not repeats.repeated("192.0.2.1", "alice", f"p{n}")
    # The first has been forgotten; the last is remembered.
    assert not repeats.repeated("192.0.2.1", "alice", "p0")
    assert repeats.repeated("192.0.2.1", "alice", f"p{REMEMBERED}")
    repeats.repeated("192.0.2.2", "alice", "x")
    repeats.repeated("192.0.2.3", "alice", "x")
    assert len(repeats) == 2
    assert not repeats.repeated("192.0.2.1", "alice", f"p{REMEMBERED}")


def test_eachBanEndsInItsTurnWithoutARefreshThatChangesAnything():
    """
    Refreshes that find the store unchanged do not settle the ban list
    again (a sweep has nothing to do until the next ban's end), yet every
    ban still ends at its time: the store's, in turn, and one this node
    made, each logged once.
    """
    from mailgate.policy.bans import BanList
    from mailgate.records import BanRecord

    clock = Clock()
    clock.advance(1000)
    metrics = RecordingMetrics()
    bans = BanList(clock, metrics)
    stored = (
        BanRecord("192.0.2.1", "admin", 0, 1000, 1100),
        BanRecord("192.0.2.2", "admin", 0, 1000, 1200),
    )
    bans.update(1, stored)
    bans.made(BanRecord("192.0.2.3", "auth-failures", 3, 1000, 1150))
    ended = []
    with capturedLogs() as logs:
        for step in range(250):
            clock.advance(1)
            bans.update(1, None)
            bans.sweep()
            ended += [(e["address"], clock.seconds()) for e in events(logs, "ban.removed")[len(ended):]]
    assert ended == [("192.0.2.1", 1100), ("192.0.2.3", 1150), ("192.0.2.2", 1200)]
    assert len(bans) == 0
    assert metrics.banCounts[-1] == 0


def test_oneBanFoundAtStartIsOneBan():
    """
    The ban.loaded line says "1 ban in force" for one ban (and "2 bans",
    test_bansFoundAtStartAreOneLineNotNews).
    """
    store = MemoryPolicyStore()
    clock = makeClock()
    store.addBan("192.0.2.66", clock.seconds(), 600)
    policy, _, _ = makePolicy(store=store, clock=clock)
    with capturedLogs() as logs:
        policy.start()
    assert [formatEvent(e) for e in events(logs, "ban.loaded")] == ["1 ban in force, read from the database"]
    policy.stop()


class FakePort:
    """
    A listening port that says whether it accepts (reads).
    """

    connected = True
    disconnecting = False

    def __init__(self):
        self.reading = True

    def stopReading(self):
        self.reading = False

    def startReading(self):
        self.reading = True


class FakeListener:
    def __init__(self):
        self.port = FakePort()

    def whenListening(self):
        return defer.succeed(self.port)


class Unanswered(Counting):
    def changes(self, *args):
        self.reads += 1
        self.pending = defer.Deferred()
        return self.pending


def test_theListenersAcceptOnceTheBansAreRead():
    """
    The mail listeners, bound before the reactor runs, accept nothing until
    the first read of the bans has come back: the connections queued
    meanwhile are then admitted knowing the bans.
    """
    store = Unanswered()
    clock = MemoryReactorClock()
    clock.advance(START)
    policy, _, _ = makePolicy(store=store, clock=clock)
    listener = FakeListener()
    service = PolicyService(policy, clock, heldListeners=lambda: [listener])
    service.startService()
    clock.run()
    assert store.reads == 1 and not listener.port.reading
    store.pending.callback(MemoryPolicyStore().changes(None, 0, 0).result)
    assert listener.port.reading
    service.stopService()
    assert clock.getDelayedCalls() == []


def test_aDatabaseThatDoesNotAnswerHoldsTheListenersTenSecondsAtMost():
    from mailgate.policy.service import LOAD_WAIT

    store = Unanswered()
    clock = MemoryReactorClock()
    clock.advance(START)
    policy, _, _ = makePolicy(store=store, clock=clock)
    listener = FakeListener()
    service = PolicyService(policy, clock, heldListeners=lambda: [listener])
    service.startService()
    with capturedLogs() as events:
        clock.run()
        clock.advance(LOAD_WAIT - 0.5)
        assert not listener.port.reading
        clock.advance(0.5)
    assert listener.port.reading
    assert [e["event"] for e in events if e.get("event") == "policy.not_loaded"] == ["policy.not_loaded"]
    # The read that comes back late changes nothing more.
    store.pending.callback(MemoryPolicyStore().changes(None, 0, 0).result)
    assert listener.port.reading
    service.stopService()


def test_aListenerStoppedWhileTheBansAreReadIsNotResumed():
    store = Unanswered()
    clock = MemoryReactorClock()
    clock.advance(START)
    policy, _, _ = makePolicy(store=store, clock=clock)
    listener = FakeListener()
    service = PolicyService(policy, clock, heldListeners=lambda: [listener])
    service.startService()
    clock.run()
    service.stopService()
    store.pending.callback(MemoryPolicyStore().changes(None, 0, 0).result)
    assert not listener.port.reading
    assert clock.getDelayedCalls() == []
