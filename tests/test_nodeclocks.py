"""
Nodes sharing a database whose clocks disagree: each writes its heartbeat
by its own clock, and what one node keeps must still hold back what the
others remove.
"""

from mailgate.testing import addUser, deliver, memoryStore, resultOf
from test_lifecycle import ALICE, Clocked, message, popDelete


def test_aNodeWhoseClockLagsAMinuteStillKeepsItsDeletedMail(databaseURL):
    """
    Node B keeps deleted mail three days, node A none; B's clock is a
    minute behind A's, so its heartbeats, written by its clock, look older
    than STALE_AFTER to A.  A's sessions still keep what they delete, and
    A's retention task does not purge it: before, A took B for dead, and
    the mail B's administrator counted on recovering was gone at A's
    next purge.
    """
    a, b = memoryStore(databaseURL), memoryStore(databaseURL)
    try:
        addUser(a, ALICE, "wonderland")
        _, clockB = Clocked(a), Clocked(b)
        clockB.now -= 60
        a.limits.keepDeletedDays, b.limits.keepDeletedDays = 0, 3
        deliver(a, [ALICE], message(1))
        resultOf(b.sessions.flush())
        resultOf(a.sessions.otherSettings())
        popDelete(a, ALICE, "wonderland", 1)
        assert resultOf(a.purgeDeleted()) == 0
        assert len(resultOf(a.listDeleted(ALICE))) == 1
    finally:
        a.close()
        b.close()


def test_aNodeKilledAMinuteAgoIsNotNamedInTheWarningButStillCounts(databaseURL):
    """
    Node B, killed a minute ago, left its row: its settings still hold
    back A's retention for a while (as those of a node whose clock lags),
    but the comparison that A's warning reports names only the live
    nodes, those C{mailgate nodes} lists: a node restarted in a loop
    would otherwise be named once for each of its dead processes.
    """
    a, b = memoryStore(databaseURL), memoryStore(databaseURL)
    try:
        addUser(a, ALICE, "wonderland")
        clockA, _ = Clocked(a), Clocked(b)
        a.limits.keepDeletedDays, b.limits.keepDeletedDays = 0, 3
        deliver(a, [ALICE], message(1))
        resultOf(b.sessions.flush())
        assert len(resultOf(a.sessions.otherSettings())) == 1
        clockA.now += 60
        assert resultOf(a.sessions.otherSettings()) == []
        assert resultOf(a.listNodes()) == []
        popDelete(a, ALICE, "wonderland", 1)
        assert resultOf(a.purgeDeleted()) == 0
        assert len(resultOf(a.listDeleted(ALICE))) == 1
    finally:
        a.close()
        b.close()


def test_settingsWrittenByHandThatCannotBeReadAreLeftOut(databaseURL):
    """
    A node row whose settings are not what nodes write (an object nested
    past what the JSON reader takes, a list, a word) is left out of the
    comparison, the retention task and mailgate nodes' settings, rather
    than failing them.
    """
    from test_store import query

    a, b = memoryStore(databaseURL), memoryStore(databaseURL)
    try:
        addUser(a, ALICE, "wonderland")
        a.limits.keepDeletedDays = 1
        b.sessions.name = "hand-written"
        resultOf(b.sessions.flush())
        deliver(a, [ALICE], message(1))
        popDelete(a, ALICE, "wonderland", 1)
        for text in ("[" * 100000 + "]" * 100000, "[7]", "seven"):
            query(a, "UPDATE mailgate_nodes SET settings = ?", (text,))
            assert resultOf(a.sessions.otherSettings()) == []
            [node] = resultOf(a.listNodes())
            assert (node.name, node.settings) == ("hand-written", None)
        # The retention task's passes read them, and go on.
        assert resultOf(a.expireMessages()) == (0, 0)
        assert resultOf(a.purgeDeleted()) == 0
        assert len(resultOf(a.listDeleted(ALICE))) == 1
    finally:
        a.close()
        b.close()


def test_aNodeWhoseClockIsOffWarnsOnceAndSaysWhenItAgreesAgain(databaseURL):
    """
    Every comparison of settings (every 30 s) reads the PostgreSQL
    server's clock: a node whose own is more than 5 s ahead of it or
    behind it warns once (not at every comparison), with the offset, and
    says when they agree again; the offset is a metric for an alert.
    SQLite, one server on one machine, has no clock to compare with.
    """
    import time

    from twisted.logger import formatEvent

    from mailgate.metrics import Metrics
    from test_lifecycle import loggedRegistryService, samples

    store = memoryStore(databaseURL)
    clock = Clocked(store, now=time.time() + 62)
    metrics = Metrics()
    service, reactor, events = loggedRegistryService(store, metrics=metrics)

    def said(event):
        return [e for e in events if e.get("event") == event]

    def compare(offset):
        clock.now = time.time() + offset
        reactor.advance(service.compareInterval)

    try:
        service.startService()
        reactor.run()
        reactor.advance(0)
        offsets = samples(metrics, "mailgate_node_clock_offset_seconds")
        if databaseURL.startswith("sqlite"):
            assert store.sessions.clockOffset is None
            assert offsets == []
            assert said("node.clock_skew") == []
            return
        [warning] = said("node.clock_skew")
        assert 61.5 < warning["offset"] <= 62
        text = formatEvent(warning)
        assert text.startswith("this node's clock is 6") and "s ahead of the database server's" in text
        assert "NTP" in text
        [(labels, value)] = offsets
        assert labels == {} and 61.5 < value <= 62
        compare(62)
        compare(5)  # between the two limits: neither skewed nor agreeing
        assert len(said("node.clock_skew")) == 1
        assert said("node.clock_agrees") == []
        compare(0)
        [agrees] = said("node.clock_agrees")
        assert abs(agrees["offset"]) < 0.5
        [(_, value)] = samples(metrics, "mailgate_node_clock_offset_seconds")
        assert abs(value) < 0.5
        compare(-40)
        [_, behind] = said("node.clock_skew")
        assert -40.5 < behind["offset"] <= -39.5
        assert "s behind the database server's" in formatEvent(behind)
    finally:
        service.stopService()
        reactor.advance(0)
        store.close()


def test_theClockOffsetLeavesOutTheWaitForAThread(postgresURL):
    """
    The offset is measured around the statement that reads the server's
    clock, on the worker thread: an interaction that waited a second and
    more for a thread (reads queued behind others) showed clocks in step
    (the server runs on this machine) half that wait apart, in the metric
    and in mailgate nodes.
    """
    import time

    from twisted.internet import defer

    # PostgreSQL only: SQLite has no clock of its own to compare with.
    store = memoryStore(postgresURL)
    run = store.database.runInteraction

    def queued(*args, **kwargs):
        time.sleep(1.2)
        return run(*args, **kwargs)

    try:
        store.database.runInteraction = queued
        resultOf(defer.maybeDeferred(store.sessions.otherSettings))
        offset = store.sessions.clockOffset
        assert abs(offset.seconds) < 0.3, offset
    finally:
        del store.database.runInteraction
        store.close()


def test_aNodeWhoseClockRunsAheadRemovesNothingAnotherNodeKeeps(postgresURL):
    """
    Node A's clock runs a year ahead (NTP not yet synchronised after a
    boot, an RTC set wrong); B's is right, keeps deleted mail three days,
    and delivered a message today.  A reads the PostgreSQL server's clock
    (every 30 s) and knows its own is ahead: until it agrees again, its
    retention task removes nothing, its sessions keep what they delete,
    and its heartbeat does not forget B.  Before, B's heartbeat looked a
    year old to A: A expired the message as a year old, its QUIT deleted
    for good what B keeps for recovery, its purge removed what B kept, and
    its heartbeat deleted B's row and the sessions B registered.
    """
    import time

    from twisted.internet.testing import MemoryReactorClock
    from twisted.logger import Logger, formatEvent

    from mailgate.store.housekeeping import RetentionService

    a, b = memoryStore(postgresURL), memoryStore(postgresURL)
    try:
        addUser(a, ALICE, "wonderland")
        Clocked(a, now=time.time() + 365 * 86400)
        Clocked(b, now=time.time())
        a.limits.expireDays, a.limits.keepDeletedDays = 30, 0
        b.limits.keepDeletedDays = 3
        deliver(b, [ALICE], message(1))
        deliver(b, [ALICE], message(2))
        resultOf(b.sessions.flush())
        resultOf(a.sessions.otherSettings())
        assert a.sessions.clockAhead
        assert resultOf(a.expireMessages()) == (0, 0)
        resultOf(a.sessions.flush())
        assert len(resultOf(b.listNodes())) == 2  # B still there (A too: its heartbeat is ahead)
        popDelete(a, ALICE, "wonderland", 1)
        assert len(resultOf(a.listDeleted(ALICE))) == 1
        assert resultOf(a.purgeDeleted()) == 0
        assert resultOf(a.forgetDeliveries()) == 0
        assert len(resultOf(a.listDeleted(ALICE))) == 1
        assert len(resultOf(a.listMessages(ALICE))) == 1
        events = []
        service = RetentionService(a, MemoryReactorClock())
        service.log = Logger(observer=events.append)
        assert resultOf(service.runOnce()) == (0, 0)
        [skipped] = [e for e in events if e.get("event") == "retention.clock_ahead"]
        assert formatEvent(skipped).startswith("retention: pass skipped: this node's clock is 3153")
    finally:
        a.close()
        b.close()
