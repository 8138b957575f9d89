"""
The policy's shared state in the database (mailgate/store/policy.py), on
both backends through C{databaseURL}: failures counted within the window,
the ban at the Nth, bans added, listed and lifted, the cheap refresh read,
expiry keeping the tables bounded; then several stores on one PostgreSQL
(two nodes) seeing each other's failures and bans, the Nth failure counted
exactly when nodes fail at once, and two policies on PostgreSQL where node B
enforces node A's ban after one refresh.  The in-memory store is held to
the same behaviour.
"""

import threading

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from iterated import IteratedReactor
from mailgate.interfaces import IPolicyStore
from mailgate.policy.connection import BANNED, ConnectionPolicy
from mailgate.policy.memory import MemoryPolicyStore
from mailgate.policy.refresh import REFRESH_INTERVAL
from mailgate.policy.settings import PolicySettings
from mailgate.store import openStore, openSynchronousStore
from mailgate.store import policy as sqlpolicy
from mailgate.store.policy import SQLPolicyStore
from mailgate.records import AuthFailure, Forgotten, recipientsAddress
from mailgate.testing import resultOf

NOW = 1_700_000_000
ADDRESS = "192.0.2.66"
OTHER = "198.51.100.7"


class Stores:
    """
    An SQL policy store on the test's database, and a way to look at its
    tables.
    """

    def __init__(self, url):
        self.url = url
        self.opened = []

    def open(self):
        store = openSynchronousStore(self.url)
        self.opened.append(store)
        return SQLPolicyStore(store.database)

    def rows(self, sql):
        store = self.opened[0]
        return store.database.run(lambda c: c.execute(sql).fetchall())

    def close(self):
        for store in self.opened:
            store.close()


@pytest.fixture
def stores(databaseURL):
    s = Stores(databaseURL)
    yield s
    s.close()


@pytest.fixture(params=["sql", "memory"])
def anyPolicyStore(request, tmp_path):
    """
    Each implementation of IPolicyStore in turn (the SQL one on SQLite).
    """
    if request.param == "memory":
        yield MemoryPolicyStore()
        return
    s = Stores(f"sqlite:///{tmp_path / 'mail.sqlite3'}")
    yield s.open()
    s.close()


_ids = iter(range(10**9))


def failure(address=ADDRESS, at=NOW, login="alice@example.org"):
    return AuthFailure(f"f{next(_ids)}", address, login, at)


def record(store, f, banAfter=3, banWindow=600, banTime=3600, ban=False):
    return resultOf(store.recordFailure(f, banAfter, banWindow, banTime, ban=ban))


# -- one store ------------------------------------------------------------------


def test_providesIPolicyStore(anyPolicyStore):
    assert verifyObject(IPolicyStore, anyPolicyStore)


def test_theNthFailureWithinTheWindowBans(anyPolicyStore):
    store = anyPolicyStore
    first = record(store, failure(at=NOW))
    second = record(store, failure(at=NOW + 10))
    assert (first.failures, first.banned, first.ban) == (1, False, None)
    assert (second.failures, second.banned, second.ban) == (2, False, None)
    third = record(store, failure(at=NOW + 20))
    assert third.failures == 3 and third.banned
    assert (third.ban.address, third.ban.reason, third.ban.failures) == (ADDRESS, "auth-failures", 3)
    assert third.ban.expires == NOW + 20 + 3600
    assert third.version > second.version
    [ban] = resultOf(store.listBans(NOW + 30))
    assert ban == third.ban
    # Nobody else is banned.
    assert record(store, failure(address=OTHER, at=NOW + 30)).banned is False


def test_failuresOutsideTheWindowDoNotCount(anyPolicyStore):
    store = anyPolicyStore
    record(store, failure(at=NOW))
    record(store, failure(at=NOW + 1))
    outcome = record(store, failure(at=NOW + 700))
    assert (outcome.failures, outcome.banned) == (1, False)


def test_failuresOfABannedAddressAreNotRecorded(anyPolicyStore):
    store = anyPolicyStore
    for n in range(3):
        record(store, failure(at=NOW + n))
    version = resultOf(store.changes(None, NOW, NOW)).version
    later = record(store, failure(at=NOW + 5))
    assert later.banned and later.ban is None
    assert later.version == version
    assert len(resultOf(store.changes(version, NOW - 1, NOW + 5)).failures) == 3


def test_forcedBan(anyPolicyStore):
    outcome = record(anyPolicyStore, failure(), banAfter=10, ban=True)
    assert outcome.banned and outcome.ban.failures == 1


def test_banAfterZeroNeverBans(anyPolicyStore):
    for n in range(20):
        outcome = record(anyPolicyStore, failure(at=NOW + n), banAfter=0)
    assert outcome.failures == 20 and not outcome.banned
    assert resultOf(anyPolicyStore.listBans(NOW)) == []


def test_addListAndRemoveBans(anyPolicyStore):
    store = anyPolicyStore
    ban = resultOf(store.addBan("2001:db8::1", NOW, 60))
    assert (ban.address, ban.reason, ban.failures, ban.expires) == ("2001:db8::1", "admin", 0, NOW + 60)
    resultOf(store.addBan(OTHER, NOW, 600))
    assert [b.address for b in resultOf(store.listBans(NOW))] == ["198.51.100.7", "2001:db8::1"]
    # Ended bans are not listed.
    assert [b.address for b in resultOf(store.listBans(NOW + 60))] == ["198.51.100.7"]
    assert resultOf(store.removeBan(OTHER, NOW)) is True
    assert resultOf(store.removeBan(OTHER, NOW)) is False
    assert [b.address for b in resultOf(store.listBans(NOW))] == ["2001:db8::1"]


def test_addingABanReplacesTheOldOne(anyPolicyStore):
    store = anyPolicyStore
    for n in range(3):
        record(store, failure(at=NOW + n))
    resultOf(store.addBan(ADDRESS, NOW + 10, 60))
    [ban] = resultOf(store.listBans(NOW + 10))
    assert (ban.reason, ban.expires) == ("admin", NOW + 70)


def test_liftingABanForgetsTheAddressFailures(anyPolicyStore):
    store = anyPolicyStore
    for n in range(3):
        record(store, failure(at=NOW + n))
    record(store, failure(address=OTHER, at=NOW))
    assert resultOf(store.removeBan(ADDRESS, NOW + 4.5))
    changes = resultOf(store.changes(None, NOW - 10, NOW + 5))
    # The nodes are told to forget them, up to the second after the lift.
    assert sorted((f.address, f.at) for f in changes.failures) == [(OTHER, NOW), ("forget:" + ADDRESS, NOW + 5)]
    # A fresh start: the next failure is the first again.
    assert record(store, failure(at=NOW + 6)).failures == 1


def test_removingABanThatIsNotThereChangesNothing(anyPolicyStore):
    """
    Lifting a ban an address does not have lifts nothing and forgets
    nothing (C{forgetFailures} is the way to forget failures without a ban).
    """
    store = anyPolicyStore
    record(store, failure(at=NOW), banAfter=0)
    before = resultOf(store.changes(None, NOW - 10, NOW + 5))
    assert resultOf(store.removeBan(ADDRESS, NOW + 5)) is False
    after = resultOf(store.changes(before.version, NOW - 10, NOW + 5))
    assert after.bans is None
    assert [f.address for f in after.failures] == [ADDRESS]
    assert record(store, failure(at=NOW + 6), banAfter=0).failures == 2


def _slowed(store):
    """
    Two failed logins and three unknown recipients from ADDRESS, one
    failed login from OTHER, none making a ban.
    """
    for n in range(2):
        record(store, failure(at=NOW + n), banAfter=0)
    for n in range(3):
        record(store, failure(address=recipientsAddress(ADDRESS), at=NOW + n, login=None), banAfter=0)
    record(store, failure(address=OTHER, at=NOW), banAfter=0)


def test_forgettingTheFailuresOfAnAddressWithoutABan(anyPolicyStore):
    """
    C{ban del} of an address slowed but not banned: its failed logins and
    unknown recipients are forgotten, and a marker among the failures
    (C{forget:ADDRESS} at the second it was done, rounded up) tells every
    node's next read to forget theirs; no ban appears.
    """
    store = anyPolicyStore
    _slowed(store)
    before = resultOf(store.changes(None, NOW - 10, NOW + 5))
    assert resultOf(store.forgetFailures(ADDRESS, NOW + 5.5)) == Forgotten(2, 3)
    after = resultOf(store.changes(before.version, NOW - 10, NOW + 6))
    assert after.bans is None
    assert sorted((f.address, f.at) for f in after.failures) == [(OTHER, NOW), ("forget:" + ADDRESS, NOW + 6)]
    assert resultOf(store.listBans(NOW + 6)) == []
    # Not a ban: there is none to lift, and its next failure is its first.
    assert resultOf(store.removeBan(ADDRESS, NOW + 7)) is False
    assert record(store, failure(at=NOW + 7), banAfter=3).failures == 1
    # Nothing left to forget: nothing changes.
    assert resultOf(store.forgetFailures(OTHER + "0", NOW + 8)) == Forgotten(0, 0)
    unchanged = resultOf(store.changes(None, NOW + 7, NOW + 8))
    assert [f.address for f in unchanged.failures] == [ADDRESS]


def test_anAddressForgottenIsBannedAgainByItsNextFailures(anyPolicyStore):
    store = anyPolicyStore
    _slowed(store)
    resultOf(store.forgetFailures(ADDRESS, NOW + 5))
    for n in range(2):
        assert not record(store, failure(at=NOW + 6 + n)).banned
    outcome = record(store, failure(at=NOW + 8))
    assert outcome.banned and outcome.ban.failures == 3
    assert [b.address for b in resultOf(store.listBans(NOW + 9))] == [ADDRESS]
    # The ban leaves the marker to the nodes that have not read it yet:
    # it was a row of the bans table, which the ban replaced, and those
    # nodes kept counting the failures ban del forgot.
    changes = resultOf(store.changes(None, NOW + 5, NOW + 9))
    assert ("forget:" + ADDRESS, NOW + 5) in {(f.address, f.at) for f in changes.failures}
    assert resultOf(store.removeBan(ADDRESS, NOW + 9)) is True


def test_aForgettingIsReadForTheWindow(stores):
    """
    On SQLite and PostgreSQL: the marker of a forgetting is no ban to any
    reader of the bans, is read with the failures as long as they would
    have been, and expires with them.
    """
    store = stores.open()
    _slowed(store)
    assert resultOf(store.forgetFailures(ADDRESS, NOW + 5)) == Forgotten(2, 3)
    assert stores.rows("SELECT count(*) FROM auth_failures WHERE address LIKE '%192.0.2.66'") == [(1,)]
    assert stores.rows("SELECT count(*) FROM bans") == [(0,)]
    assert resultOf(store.listBans(NOW + 5)) == []
    resultOf(store.expire(NOW + 60, NOW + 60 - 600))
    assert "forget:" + ADDRESS in {f.address for f in resultOf(store.changes(None, NOW, NOW + 60)).failures}
    resultOf(store.expire(NOW + 606, NOW + 6))
    assert stores.rows("SELECT count(*) FROM auth_failures WHERE address LIKE '%192.0.2.66'") == [(0,)]


def test_anEarlierMailgatesMarkerIsNoBan(stores):
    """
    On SQLite and PostgreSQL: the marker an earlier mailgate's C{ban del}
    left in the bans table (reason C{forgotten}, ended as it was written)
    is no ban to a node whose clock lags the host that wrote it, is
    listed to no one, keeps no failure out of the store, and expires
    after the window.
    """
    store = stores.open()
    stores.opened[0].database.runWrite(
        lambda c: c.execute(
            "INSERT INTO bans (address, reason, failures, created_at, expires_at) VALUES (?, 'forgotten', 0, ?, ?)",
            (ADDRESS, NOW + 5, NOW + 5),
        )
    )
    assert resultOf(store.listBans(NOW + 2)) == []
    assert resultOf(store.changes(None, NOW, NOW + 2)).bans == ()
    assert not record(store, failure(at=NOW + 2)).banned
    assert resultOf(store.removeBan(ADDRESS, NOW + 3)) is False
    resultOf(store.expire(NOW + 606, NOW + 6))
    assert stores.rows("SELECT count(*) FROM bans") == [(0,)]


def test_changesReadTheBansOnlyWhenTheVersionMoved(anyPolicyStore):
    store = anyPolicyStore
    first = resultOf(store.changes(None, NOW, NOW))
    assert first.bans == () and first.failures == ()
    same = resultOf(store.changes(first.version, NOW, NOW))
    assert same.bans is None and same.version == first.version
    resultOf(store.addBan(ADDRESS, NOW, 60))
    moved = resultOf(store.changes(first.version, NOW, NOW))
    assert moved.version > first.version
    assert [b.address for b in moved.bans] == [ADDRESS]
    resultOf(store.removeBan(ADDRESS, NOW))
    lifted = resultOf(store.changes(moved.version, NOW, NOW))
    assert lifted.version > moved.version and lifted.bans == ()


def test_changesReadFailuresSinceATime(anyPolicyStore):
    store = anyPolicyStore
    early = failure(at=NOW)
    late = failure(address=OTHER, at=NOW + 5, login=None)
    record(store, early, banAfter=0)
    record(store, late, banAfter=0)
    changes = resultOf(store.changes(None, NOW + 3, NOW + 5))
    assert [(f.failureId, f.address, f.login, f.at) for f in changes.failures] == [
        (late.failureId, OTHER, None, NOW + 5)
    ]


def test_expiryKeepsTheTablesBounded(stores):
    """
    An attack from many addresses leaves rows behind only for the window:
    expiry removes the older failures, and bans once they end.
    """
    store = stores.open()
    for n in range(200):
        record(store, failure(address=f"10.0.{n // 100}.{n % 100}", at=NOW + n), banAfter=2, banTime=300)
    for n in range(3):
        record(store, failure(at=NOW + n), banAfter=3, banTime=3600)
    assert stores.rows("SELECT count(*) FROM auth_failures") == [(203,)]
    assert stores.rows("SELECT count(*) FROM failing_addresses") == [(201,)]
    removed = resultOf(store.expire(NOW + 700, NOW + 100))
    assert stores.rows("SELECT count(*) FROM auth_failures") == [(100,)]
    assert stores.rows("SELECT count(*) FROM failing_addresses") == [(100,)]
    assert removed == 103 + 101
    # Later: every failure is out of the window and the short bans ended.
    resultOf(store.expire(NOW + 1000, NOW + 1000))
    assert stores.rows("SELECT count(*) FROM auth_failures") == [(0,)]
    assert stores.rows("SELECT count(*) FROM failing_addresses") == [(0,)]
    assert stores.rows("SELECT address FROM bans") == [(ADDRESS,)]
    resultOf(store.expire(NOW + 3602, NOW + 3602))
    assert stores.rows("SELECT count(*) FROM bans") == [(0,)]


def test_aBannedAttackerAddsNoRows(stores):
    store = stores.open()
    for n in range(100):
        record(store, failure(at=NOW + n), banAfter=3)
    assert stores.rows("SELECT count(*) FROM auth_failures") == [(3,)]


def test_bansSurviveReopening(stores):
    """
    On SQLite the bans are in the database file: a restarted server has
    them.
    """
    store = stores.open()
    for n in range(3):
        record(store, failure(at=NOW + n))
    stores.close()
    again = stores.open()
    assert [b.address for b in resultOf(again.listBans(NOW + 10))] == [ADDRESS]


def test_workRunsOffTheReactorThread(databaseURL, monkeypatch):
    """
    Through the server's L{Database}, every interaction runs on one of the
    store's worker threads, never on the reactor's.
    """
    threads = []
    real = sqlpolicy._changes

    def spy(cursor, *args):
        threads.append(threading.current_thread().name)
        return real(cursor, *args)

    monkeypatch.setattr(sqlpolicy, "_changes", spy)
    reactor = IteratedReactor()
    mail = openStore(databaseURL, reactor, server=False)
    try:
        store = SQLPolicyStore(mail.database)
        for n in range(3):
            outcome = reactor.wait(store.recordFailure(failure(at=NOW + n), 3, 600, 3600))
        assert outcome.banned
        changes = reactor.wait(store.changes(None, NOW, NOW + 5))
        assert [b.address for b in changes.bans] == [ADDRESS]
        assert threads and all(name.startswith("mailgate-db-") for name in threads), threads
    finally:
        reactor.resultOf(mail.close())
        reactor.close()


# -- several nodes on one PostgreSQL ------------------------------------------------


@pytest.fixture
def pgStores(postgresURL):
    s = Stores(postgresURL)
    yield s
    s.close()


def test_twoStoresSeeEachOthersBans(pgStores):
    a, b = pgStores.open(), pgStores.open()
    for n in range(2):
        record(a, failure(at=NOW + n))
    # B's failure is the third from that address: B's write bans it.
    outcome = record(b, failure(at=NOW + 2))
    assert outcome.banned and outcome.ban.failures == 3
    seen = resultOf(a.changes(None, NOW, NOW + 3))
    assert [b.address for b in seen.bans] == [ADDRESS]
    assert len(seen.failures) == 3
    # An admin ban through one is in the other's next read; so is lifting.
    resultOf(b.addBan(OTHER, NOW, 600))
    later = resultOf(a.changes(seen.version, NOW, NOW + 3))
    assert sorted(x.address for x in later.bans) == [ADDRESS, OTHER]
    resultOf(a.removeBan(ADDRESS, NOW + 3))
    last = resultOf(b.changes(later.version, NOW, NOW + 3))
    assert [x.address for x in last.bans] == [OTHER]


def test_theNthFailureIsExactWhenNodesFailAtOnce(pgStores):
    """
    Four nodes record failures from one address at the same time: exactly
    one of them makes the ban, at the tenth failure, and the rest find the
    address banned.
    """
    nodes = [pgStores.open() for _ in range(4)]
    outcomes = []
    lock = threading.Lock()
    start = threading.Barrier(len(nodes))

    def attack(node, offset):
        start.wait(timeout=20)
        for n in range(5):
            outcome = record(node, failure(at=NOW + offset), banAfter=10)
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=attack, args=(node, i)) for i, node in enumerate(nodes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    bans = [o.ban for o in outcomes if o.ban is not None]
    assert len(bans) == 1 and bans[0].failures == 10
    counted = sorted(o.failures for o in outcomes if not o.banned)
    assert counted == list(range(1, 10))
    assert pgStores.rows("SELECT count(*) FROM auth_failures") == [(10,)]


def test_nodeBEnforcesNodeABanAfterOneRefresh(pgStores):
    """
    Two policies (two nodes) on one PostgreSQL, each with its own store
    connection and its own clock: the ban node A makes is enforced by node
    B at B's next refresh, half a second later.
    """
    settings = PolicySettings(banAfter=3, exemptNetworks=["none"])
    clockA, clockB = Clock(), Clock()
    clockA.advance(NOW)
    clockB.advance(NOW)
    nodeA = ConnectionPolicy(pgStores.open(), clockA, settings)
    nodeB = ConnectionPolicy(pgStores.open(), clockB, settings)
    nodeA.start()
    nodeB.start()
    attacker = IPv4Address("TCP", "127.0.0.2", 50000)
    user = IPv4Address("TCP", "127.0.0.3", 50000)
    try:
        for _ in range(3):
            nodeA.authenticationFailed(attacker, "alice@example.org")
        assert nodeA.admit("pop3", attacker) == BANNED
        assert not nodeB.isBanned(attacker)
        clockB.advance(REFRESH_INTERVAL)
        assert nodeB.isBanned(attacker)
        assert nodeB.admit("pop3", attacker) == BANNED
        assert nodeB.admit("pop3", user) is None
        # B also has A's failures: the penalty is shared.
        assert nodeB.authenticationDelay(attacker, None) == 8
    finally:
        nodeA.stop()
        nodeB.stop()


def test_nodeBSeesTheFailuresOfANodeWhoseClockLags(pgStores):
    """
    Node A's clock is 4 seconds behind node B's: less than the 5 seconds
    the nodes' clock check lets pass without a warning (two nodes may so be
    up to 10 s apart).  The failures A records carry A's times, and B's
    next refresh still reads them: B holds the address's next login as A
    does.  Before, B read only the failures stamped from 2 s before its
    previous refresh on, and never saw A's (measured with real twistd
    nodes, one started with its clock 3 s behind: a failed login on B just
    after one on A took 0.26 s, not the 2.2 s it takes with clocks in step).
    """
    settings = PolicySettings(exemptNetworks=["none"])
    clockA, clockB = Clock(), Clock()
    clockA.advance(NOW - 4)
    clockB.advance(NOW)
    nodeA = ConnectionPolicy(pgStores.open(), clockA, settings)
    nodeB = ConnectionPolicy(pgStores.open(), clockB, settings)
    nodeA.start()
    nodeB.start()
    attacker = IPv4Address("TCP", "127.0.0.2", 50000)
    try:
        clockA.advance(REFRESH_INTERVAL)
        clockB.advance(REFRESH_INTERVAL)
        nodeA.authenticationFailed(attacker, "alice@example.org")
        assert nodeA.authenticationDelay(attacker, None) == 2
        assert nodeB.authenticationDelay(attacker, None) == 0
        clockB.advance(REFRESH_INTERVAL)
        assert nodeB.authenticationDelay(attacker, None) == 2
    finally:
        nodeA.stop()
        nodeB.stop()
