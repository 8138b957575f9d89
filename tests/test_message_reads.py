"""
Where POP3 sessions read messages (L{mailgate.interfaces.IMessageReads}):
read transactions on worker threads (SQLite), and PostgreSQL's connections
driven by the reactor.  Both run the statements of L{mailgate.store.reads};
here the running gateway's reads, on a real reactor and a real database,
give what the same statements give run inline, and fail as they should.
"""

import psycopg
import pytest
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from mailgate.errors import TemporaryFailure
from mailgate.interfaces import IMessageReads
from mailgate.store import openStore
from mailgate.store.reads import CHUNK_SIZE, ThreadedMessageReads
from mailgate.testing import addUser, deliver, memoryStore
from iterated import IteratedReactor

ALICE = "alice@example.com"

LINE = b"w" * 70 + b"\r\n"
MESSAGES = [
    b"Subject: small\r\n\r\nhello\r\n",
    b"Subject: dots\r\n\r\n.one\r\ntwo\r\n..three\r\n",
    # Longer than a chunk: the header is a chunk of its own, then the body.
    b"Subject: large\r\nX-Pad: " + b"h" * 300 + b"\r\n\r\n" + LINE * (CHUNK_SIZE * 6 // len(LINE)),
    b"Subject: empty body\r\n\r\n",
    b"Subject: last\r\n\r\n" + LINE * 40,
]


@pytest.fixture
def running(databaseURL):
    """
    The test user's maildrop with L{MESSAGES}, the running gateway's store
    on a reactor of the test's own, and the same database's inline store.
    """
    inline = memoryStore(databaseURL)
    addUser(inline, ALICE, "pw")
    for message in MESSAGES:
        deliver(inline, [ALICE], message)
    reactor = IteratedReactor()
    store = openStore(databaseURL, reactor, server=False)
    try:
        yield store, reactor, inline, databaseURL
    finally:
        reactor.resultOf(store.close())
        reactor.close()
        inline.close()


def snapshot(inline):
    user = inline.findUser(ALICE).result
    return user.userId, [uid for uid, _ in inline.database.runInteraction(_uidsOf, user.userId).result]


def _uidsOf(cursor, userId):
    cursor.execute("SELECT uid, size FROM maildrop WHERE user_id = ? ORDER BY uid", (userId,))
    return cursor.fetchall()


def readAll(reactor, reads, opened):
    """
    Every octet of an opened message: its first piece, then its chunks.
    """
    owner, bodyId, size, headerSize, first, needsStuffing, offsets, _prefix = opened
    pieces, seq = [first], 1
    while sum(map(len, pieces)) < size:
        chunks = reactor.wait(reads.readChunks(owner, bodyId, seq, 4))
        assert not isinstance(chunks, Failure), chunks
        pieces += chunks
        seq += len(chunks)
    return b"".join(pieces)


def test_theGatewaysReadsProvideIMessageReads(running):
    store, _, inline, url = running
    assert verifyObject(IMessageReads, store.reads)
    assert verifyObject(IMessageReads, inline.reads)
    # PostgreSQL's run on the reactor; SQLite's on the reader threads.
    assert isinstance(store.reads, ThreadedMessageReads) == url.startswith("sqlite")


def test_openingAndReadingGiveWhatTheStatementsGiveInline(running):
    """
    Opening with read-ahead (whole messages, and headers within a budget)
    and reading a large body's chunks: the same answers as the same
    statements run inline, and every octet of every message.
    """
    store, reactor, inline, _ = running
    userId, uids = snapshot(inline)
    for headerOnly, budget in [(False, 0), (False, 1 << 20), (False, 300), (True, 1 << 20), (True, 30)]:
        for start in range(len(uids)):
            # Forward, and from the newest back (a client fetching the
            # newest first).
            for asked in (uids[start:], uids[start::-1]):
                got = reactor.wait(store.reads.openMessages(userId, asked, headerOnly, budget))
                assert not isinstance(got, Failure), got
                assert got == inline.reads.openMessages(userId, asked, headerOnly, budget).result
                assert got[0][0] == asked[0]
    # Going back, the header budget counts from the first asked for: the
    # last two headers fit in it, the large one before them does not.
    lastTwo = sum(len(m[: m.index(b"\r\n\r\n") + 4]) for m in MESSAGES[3:])
    back = reactor.wait(store.reads.openMessages(userId, uids[::-1], True, lastTwo))
    assert [(uid, row[4]) for uid, row in back] == [(uids[4], b"Subject: last\r\n\r\n"), (uids[3], MESSAGES[3])]
    # Whole messages, forward: the budget counts the first chunks read (a
    # long message's is its header), from the first asked for.
    firstTwo = len(MESSAGES[0]) + len(MESSAGES[1])
    forward = reactor.wait(store.reads.openMessages(userId, uids, False, firstTwo))
    assert [row[4] for _, row in forward] == MESSAGES[:2]
    withLong = firstTwo + len(MESSAGES[2][: MESSAGES[2].index(b"\r\n\r\n") + 4])
    forward = reactor.wait(store.reads.openMessages(userId, uids, False, withLong))
    assert [uid for uid, _ in forward] == uids[:3]
    opened = dict(reactor.wait(store.reads.openMessages(userId, uids, False, 1 << 30)))
    assert list(opened) == uids
    stored = [readAll(reactor, store.reads, opened[uid]) for uid in uids]
    assert stored == [m for m in MESSAGES]
    # The large message's header is what TOP n 0 is given.
    (uid, headerOnly), *_ = reactor.wait(store.reads.openMessages(userId, uids[2:], True, 0))
    assert headerOnly[4] == MESSAGES[2][: MESSAGES[2].index(b"\r\n\r\n") + 4]
    # The dot-stuffing offsets come along: one message has lines to stuff.
    assert [opened[uid][5] for uid in uids] == [False, True, False, False, False]
    assert list(opened[uids[1]][6]) == [len(b"Subject: dots\r\n\r\n"), len(b"Subject: dots\r\n\r\n.one\r\ntwo\r\n")]


def test_aMissingChunkFailsTemporarilyAtThatChunk(running):
    store, reactor, inline, _ = running
    userId, uids = snapshot(inline)
    owner, bodyId = reactor.wait(store.reads.openMessages(userId, uids[2:3], False, 0))[0][1][:2]
    inline.database.runWrite(_dropChunk, owner, bodyId, 3)
    chunks = reactor.wait(store.reads.readChunks(owner, bodyId, 1, 4))
    assert len(chunks) == 2
    failure = reactor.wait(store.reads.readChunks(owner, bodyId, 3, 4))
    assert isinstance(failure, Failure) and failure.check(TemporaryFailure)
    assert "chunk 3 is missing" in str(failure.value)
    # A message gone entirely: nothing opens, the request fails alone.
    assert reactor.wait(store.reads.openMessages(userId, [10**9], False, 0)) == []


def _dropChunk(cursor, owner, bodyId, seq):
    cursor.execute("DELETE FROM body_chunks WHERE owner_id = ? AND body_id = ? AND seq = ?", (owner, bodyId, seq))


@pytest.mark.parametrize("databaseURL", ["postgres"], indirect=True)
def test_aReadWhoseConnectionIsLostIsAskedAgainOnce(running):
    """
    PostgreSQL: a read under way when its connection is lost is asked once
    more, of a new connection, and answers as if nothing happened.  The
    read is held back by a lock on the chunks so that it is surely under
    way when its backend is terminated.
    """
    store, reactor, inline, url = running
    userId, uids = snapshot(inline)
    owner, bodyId = reactor.wait(store.reads.openMessages(userId, uids[2:3], False, 0))[0][1][:2]
    # Activity is watched from a connection of its own: a transaction sees
    # pg_stat_activity as it was when it first looked.
    with psycopg.connect(url) as admin, psycopg.connect(url, autocommit=True) as watcher:
        admin.execute("LOCK TABLE body_chunks IN ACCESS EXCLUSIVE MODE")
        pending = store.reads.readChunks(owner, bodyId, 1, 4)
        results = []
        pending.addBoth(results.append)

        def waiting():
            return [
                pid
                for (pid,) in watcher.execute(
                    "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND query LIKE '%%FROM body_chunks%%' AND %s = ANY(pg_blocking_pids(pid))",
                    (admin.info.backend_pid,),
                )
            ]

        reactor.turnUntil(waiting, timeout=20)
        (pid,) = waiting()
        watcher.execute("SELECT pg_terminate_backend(%s)", (pid,))
        # Asked again, of a new connection, which waits for the lock too
        # (preparing its statements needs it).
        gone = "SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = %s)"
        reactor.turnUntil(lambda: watcher.execute(gone, (pid,)).fetchone()[0], timeout=20)
        for _ in range(10):
            reactor.iterate(0.02)
        # Not failed: asked again.
        assert results == []
    # The lock is gone with the admin's transaction.
    reactor.turnUntil(lambda: results, timeout=20)
    assert not isinstance(results[0], Failure), results[0]
    assert results[0] == inline.reads.readChunks(owner, bodyId, 1, 4).result
    assert len(results[0]) == 4


def test_anUnreachableServerFailsAReadOnceWithoutAskingAgain():
    """
    PostgreSQL cannot be reached: a read fails with TemporaryFailure after
    one attempt to connect, not two (each may take the connect timeout).
    """
    from mailgate.store import engineFromURL
    from mailgate.store.postgres import ReactorMessageReads

    reactor = IteratedReactor()
    # Port 1 on loopback: nothing listens there.
    engine = engineFromURL("postgresql://nobody@127.0.0.1:1/nothing")
    attempts = []
    realConnect = engine.connectPrepared

    def counted(statements):
        attempts.append(statements)
        return realConnect(statements)

    engine.connectPrepared = counted
    reads = ReactorMessageReads(engine, reactor)
    try:
        failure = reactor.wait(reads.readChunks(1, "0" * 32, 1, 4))
        assert isinstance(failure, Failure) and failure.check(TemporaryFailure)
        assert "cannot connect" in str(failure.value)
        assert len(attempts) == 1
    finally:
        reactor.resultOf(reads.close())
        reactor.close()
