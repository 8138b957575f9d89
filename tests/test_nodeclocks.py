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
        clockA, clockB = Clocked(a), Clocked(b)
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
