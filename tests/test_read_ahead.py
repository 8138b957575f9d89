"""
Reading ahead of the client: a POP3 session fetching in order finds the
next messages, and the next chunks of a long one, already on their way from
the database while the current ones go out, so it waits for a trip to the
database less often.  What is read ahead is only a guess: nothing more is
read than a client fetching in order needs, and a read ahead that fails is
reported only by the read of the message that wants it.

On a real SQLite file through the synchronous store; where a test needs a
trip still under way, the store's reads are held until the test lets them
answer.
"""

import gc
import sqlite3

import pytest
from twisted.internet import defer
from twisted.logger import globalLogPublisher
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailgate.errors import TemporaryFailure
from mailgate.interfaces import IMessageReads
from mailgate.pop3.responses import END, MessageBlocks
from mailgate.store.sql import CHUNK_SIZE
from mailgate.testing import addUser, deliver, resultOf

ALICE = "alice@example.org"
PASSWORD = "wonderland"
LINE = b"z" * 98 + b"\r\n"
#: Seven chunks: its header is the first, then six of the body.
LONG = b"Subject: long\r\n\r\n" + LINE * (CHUNK_SIZE * 6 // len(LINE))


def small(n):
    return b"Subject: %d\r\n\r\nbody %d\r\n" % (n, n)


@implementer(IMessageReads)
class HeldReads:
    """
    A store's reads whose answers wait until the test lets them through.

    @ivar held: the reads asked for and not yet answered, in order, each
        C{(name, answer)}.
    """

    def __init__(self, reads):
        self._reads = reads
        self.held = []

    def openMessages(self, userId, uids, headerOnly, headerBudget):
        return self._hold("openMessages", self._reads.openMessages(userId, uids, headerOnly, headerBudget))

    def readChunks(self, owner, bodyId, seq, count):
        return self._hold("readChunks", self._reads.readChunks(owner, bodyId, seq, count))

    def close(self):
        return self._reads.close()

    def _hold(self, name, answer):
        waiting = defer.Deferred()
        self.held.append((name, answer, waiting))
        return waiting

    def names(self):
        return [name for name, _, _ in self.held]

    def answer(self):
        """
        Let the oldest read held answer, as the database answered it.
        """
        _, answer, waiting = self.held.pop(0)
        answer.chainDeferred(waiting)

    def fail(self, failure):
        """
        Make the oldest read held fail with C{failure} instead.
        """
        _, answer, waiting = self.held.pop(0)
        answer.addErrback(lambda _: None)
        waiting.errback(failure)


@pytest.fixture
def alice(store):
    addUser(store, ALICE, PASSWORD)
    return store


def opened(store):
    return resultOf(store.openMaildrop(resultOf(store.findUser(ALICE))))


def answered(d):
    """
    Whether C{d} has its result (not only fired, still waiting on another).
    """
    box = []
    d.addBoth(lambda result: box.append(result) or result)
    return bool(box)


def blocks(source):
    out = []
    while True:
        block = source.nextBlock()
        if block is END:
            return b"".join(out)
        block = resultOf(block)
        out.extend(block if isinstance(block, list) else [block])


def test_heldReadsProvideIMessageReads(alice):
    assert verifyObject(IMessageReads, HeldReads(alice.reads))


def test_theNextMessagesAreReadWhenTheLastOneReadAheadIsHandedOut(alice, tripsTo):
    for n in range(1, 7):
        deliver(alice, [ALICE], small(n))
    maildrop = opened(alice)
    maildrop.readAhead = 2
    trips = tripsTo(alice)
    seen = []
    try:
        for index in range(6):
            body = resultOf(maildrop.openMessage(index))
            assert body.whole == small(index + 1)
            seen.append(len(trips))
    finally:
        resultOf(maildrop.release())
    # Message 1 is read with 2; handing out 2 reads 3 and 4 before they are
    # asked for, handing out 4 reads 5 and 6; after 6 there is nothing.
    assert seen == [1, 2, 2, 3, 3, 3]
    assert trips == ["_openMessages"] * 3


def test_aMessageAskedForWhileItIsReadAheadWaitsForThatRead(alice, monkeypatch):
    for n in range(1, 5):
        deliver(alice, [ALICE], small(n))
    held = HeldReads(alice.reads)
    monkeypatch.setattr(alice, "reads", held)
    maildrop = opened(alice)
    maildrop.readAhead = 2
    try:
        first = maildrop.openMessage(0)
        held.answer()
        assert resultOf(first).whole == small(1)
        assert resultOf(maildrop.openMessage(1)).whole == small(2)
        # The read of 3 and 4 is under way; asking for 3 does not ask again.
        third = maildrop.openMessage(2)
        assert not answered(third)
        assert held.names() == ["openMessages"]
        held.answer()
        assert resultOf(third).whole == small(3)
        fourth = maildrop.openMessage(3)
        assert resultOf(fourth).whole == small(4)
        assert held.names() == []
    finally:
        resultOf(maildrop.release())


def test_aMessageWhoseReadAheadFailedIsReadAgainWhenAskedFor(alice, monkeypatch):
    for n in range(1, 5):
        deliver(alice, [ALICE], small(n))
    held = HeldReads(alice.reads)
    monkeypatch.setattr(alice, "reads", held)
    maildrop = opened(alice)
    maildrop.readAhead = 2
    try:
        first = maildrop.openMessage(0)
        held.answer()
        resultOf(first)
        resultOf(maildrop.openMessage(1))
        third = maildrop.openMessage(2)
        held.fail(TemporaryFailure("the database went away"))
        # The guess failed, not the client's read: message 3 is asked for
        # again, and comes.
        assert not answered(third)
        assert held.names() == ["openMessages"]
        held.answer()
        assert resultOf(third).whole == small(3)
    finally:
        resultOf(maildrop.release())


def test_aDamagedMessageFailsOnlyWhenAskedForAfterItWasReadAhead(alice, dbpath):
    for n in range(1, 6):
        deliver(alice, [ALICE], small(n))
    with sqlite3.connect(dbpath) as other:
        other.execute(
            "DELETE FROM body_chunks WHERE body_id = "
            "(SELECT body_id FROM maildrop ORDER BY uid LIMIT 1 OFFSET 3)"
        )
    maildrop = opened(alice)
    maildrop.readAhead = 2
    try:
        assert resultOf(maildrop.openMessage(0)).whole == small(1)
        assert resultOf(maildrop.openMessage(1)).whole == small(2)
        # Read ahead: 3, and not the damaged 4.
        assert resultOf(maildrop.openMessage(2)).whole == small(3)
        with pytest.raises(TemporaryFailure):
            resultOf(maildrop.openMessage(3))
        assert resultOf(maildrop.openMessage(4)).whole == small(5)
    finally:
        resultOf(maildrop.release())


def test_retrReadsTheNextChunksWhileTheFirstGoesOut(alice, tripsTo):
    deliver(alice, [ALICE], LONG)
    maildrop = opened(alice)
    trips = tripsTo(alice)
    try:
        body = resultOf(maildrop.openMessage(0))
        assert trips == ["_openMessages"]
        source = MessageBlocks(body, None)
        # Before the first block is asked for.
        assert trips == ["_openMessages", "_readChunks"]
        assert blocks(source) == LONG + b".\r\n"
    finally:
        resultOf(maildrop.release())
    # Six chunks after the first, four per trip.
    assert trips == ["_openMessages", "_readChunks", "_readChunks"]


def test_topWithLinesReadsNoFurtherThanItsLines(alice, tripsTo):
    deliver(alice, [ALICE], LONG)
    maildrop = opened(alice)
    trips = tripsTo(alice)
    try:
        body = resultOf(maildrop.openMessage(0))
        out = blocks(MessageBlocks(body, 3))
    finally:
        resultOf(maildrop.release())
    assert out == b"Subject: long\r\n\r\n" + LINE * 3 + b".\r\n"
    # The header is a chunk of its own; the lines come with the next trip,
    # and nothing is read after them.
    assert trips == ["_openMessages", "_readChunks"]


def test_chunksReadAheadComeInOrderAfterThoseNotYetSent(alice, monkeypatch):
    deliver(alice, [ALICE], LONG)
    held = HeldReads(alice.reads)
    monkeypatch.setattr(alice, "reads", held)
    maildrop = opened(alice)
    try:
        first = maildrop.openMessage(0)
        held.answer()
        body = resultOf(first)
        body.readAhead()
        assert held.names() == ["readChunks"]
        # The first piece goes out while the next chunks are read.
        pieces = [resultOf(body.read())]
        second = body.read()
        assert not answered(second)
        held.answer()
        pieces.append(resultOf(second))
        while True:
            piece = body.read()
            if not answered(piece):
                assert held.names() == ["readChunks"]
                held.answer()
            piece = resultOf(piece)
            if not piece:
                break
            pieces.append(piece)
    finally:
        resultOf(maildrop.release())
    assert b"".join(pieces) == LONG


def test_aChunkReadAheadThatFailsFailsTheReadThatWantsIt(alice, monkeypatch):
    deliver(alice, [ALICE], LONG)
    held = HeldReads(alice.reads)
    monkeypatch.setattr(alice, "reads", held)
    maildrop = opened(alice)
    try:
        first = maildrop.openMessage(0)
        held.answer()
        body = resultOf(first)
        body.readAhead()
        held.fail(TemporaryFailure("the database went away"))
        # What was read before the failure still goes out; the read that
        # wants the chunks that failed fails, and so does any after it.
        assert resultOf(body.read()) == b"Subject: long\r\n\r\n"
        for _ in range(2):
            with pytest.raises(TemporaryFailure, match="went away"):
                resultOf(body.read())
    finally:
        resultOf(maildrop.release())


def nextBlockNow(source):
    """
    The next block of C{source}, which must be ready: a list of the parts
    written together.
    """
    block = source.nextBlock()
    assert answered(block)
    block = resultOf(block)
    return block if isinstance(block, list) else [block]


def test_theChunksAtHandGoOutAsOneBlock(alice, monkeypatch):
    deliver(alice, [ALICE], LONG)
    held = HeldReads(alice.reads)
    monkeypatch.setattr(alice, "reads", held)
    maildrop = opened(alice)
    try:
        first = maildrop.openMessage(0)
        held.answer()
        source = MessageBlocks(resultOf(first), None)
        sent = [nextBlockNow(source)]
        # The header chunk was at hand; the next chunks are on their way.
        assert sent == [[b"Subject: long\r\n\r\n"]]
        waiting = source.nextBlock()
        assert not answered(waiting)
        held.answer()
        sent.append([resultOf(waiting)])
        # The three other chunks of that trip were at hand: one block.
        sent.append(nextBlockNow(source))
        assert [len(part) for part in sent[-1]] == [CHUNK_SIZE] * 3
        while True:
            block = source.nextBlock()
            if block is END:
                break
            if not answered(block):
                held.answer()
            block = resultOf(block)
            sent.append(block if isinstance(block, list) else [block])
    finally:
        resultOf(maildrop.release())
    assert b"".join(b"".join(block) for block in sent) == LONG + b".\r\n"


def test_aReadThatFailsAfterTheChunksAtHandFailsTheNextBlock(alice, monkeypatch):
    deliver(alice, [ALICE], LONG)
    held = HeldReads(alice.reads)
    monkeypatch.setattr(alice, "reads", held)
    maildrop = opened(alice)
    try:
        first = maildrop.openMessage(0)
        held.answer()
        source = MessageBlocks(resultOf(first), None)
        nextBlockNow(source)
        block = source.nextBlock()
        held.answer()
        resultOf(block)
        # Chunks 2 to 4 are at hand, the trip for 5 and 6 under way.
        assert len(nextBlockNow(source)) == 3
        held.fail(TemporaryFailure("the database went away"))
        with pytest.raises(TemporaryFailure, match="went away"):
            resultOf(source.nextBlock())
    finally:
        resultOf(maildrop.release())


def test_aReadNobodyAsksForOnceTheClientLeftFailsUnsaid(alice, monkeypatch):
    deliver(alice, [ALICE], LONG)
    held = HeldReads(alice.reads)
    monkeypatch.setattr(alice, "reads", held)
    maildrop = opened(alice)
    logged = []
    globalLogPublisher.addObserver(logged.append)
    try:
        first = maildrop.openMessage(0)
        held.answer()
        source = MessageBlocks(resultOf(first), None)
        nextBlockNow(source)
        block = source.nextBlock()
        held.answer()
        resultOf(block)
        nextBlockNow(source)
        # The client went away: no block is asked for again, and the read
        # under way fails.
        held.fail(TemporaryFailure("the database went away"))
        del source, block, first
        gc.collect()
    finally:
        globalLogPublisher.removeObserver(logged.append)
        resultOf(maildrop.release())
    assert [event for event in logged if "log_failure" in event] == []
