"""
When storage fails: what POP3, SMTP and LMTP clients see, and what the SQL
store does underneath.

The protocol tests put a L{FaultInjectingStore} (from L{mailgate.testing})
in front of a real SQLite store and name the operation that fails, as a
database failing would fail it; they never reach into the database.  What
the protocols asked of the store is read from its record of calls.

The store tests below them break a real database (rows deleted, writes
refused) and check that the SQL store answers with
L{mailgate.errors.TemporaryFailure} and changes nothing.
"""

import sqlite3

import pytest
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from e2e import postgresOnly
from mailgate.errors import CommitUncertain, TemporaryFailure
from mailgate.interfaces import IMaildrop, IMailStore, IMessageBody
from mailgate.pop3.protocol import POP3Server
from mailgate.store.sql import CHUNK_SIZE
from mailgate.testing import (
    FaultInjectingStore,
    POP3Session,
    SMTPSession,
    addUser,
    deliver,
    memoryStore,
    readWhole,
    resultOf,
)

ALICE = "alice@example.org"
BOB = "bob@example.org"
PASSWORD = "wonderland"
SENDER = "sender@remote.test"


@pytest.fixture
def faulty(store):
    """
    A fault-injecting store over a real SQLite file, with Alice and Bob.
    """
    addUser(store, ALICE, PASSWORD)
    addUser(store, BOB, PASSWORD)
    return FaultInjectingStore(store)


def loggedIn(store):
    session = POP3Session(store)
    reply = session.login(ALICE, PASSWORD)
    assert reply.startswith("+OK "), reply
    return session


def stored(store, address):
    return [m.size for m in resultOf(store.listMessages(address))]


def mail(session, recipients, message, lmtp=False):
    """
    One transaction up to the end of DATA: the replies to the envelope, and
    the reply (or replies) to the final dot.
    """
    out = session.command("LHLO client.test" if lmtp else "EHLO client.test")
    out += session.command(f"MAIL FROM:<{SENDER}>")
    for recipient in recipients:
        out += session.command(f"RCPT TO:<{recipient}>")
    out += session.command("DATA")
    return out, session.send(message + b".\r\n").decode()


# -- the fault-injecting store -------------------------------------------------


def test_theFaultInjectingStoreProvidesTheInterfaces(faulty):
    assert verifyObject(IMailStore, faulty)
    deliver(faulty, [ALICE], b"Subject: x\r\n\r\ny\r\n")
    user = resultOf(faulty.findUser(ALICE))
    maildrop = resultOf(faulty.openMaildrop(user))
    assert verifyObject(IMaildrop, maildrop)
    body = resultOf(maildrop.openMessage(0))
    assert verifyObject(IMessageBody, body)
    resultOf(maildrop.release())
    assert [name for name, _ in faulty.calls] == ["deliver", "findUser", "openMaildrop", "openMessage", "release"]


def test_theFaultInjectingStoreRefusesUnknownOperations(faulty):
    with pytest.raises(ValueError):
        faulty.fail("delivr")


# -- POP3 ----------------------------------------------------------------------


def test_twistedDefect_unreadableMessageGetsAnAnswer(faulty):
    """
    Twisted sent nothing at all when a message could not be read, and the
    client hung.  Here the store cannot open message 1: the client gets
    -ERR, without the store's own words, and the session goes on.
    """
    deliver(faulty, [ALICE], b"Subject: doomed\r\n\r\nbody\r\n")
    deliver(faulty, [ALICE], b"Subject: fine\r\n\r\nbody\r\n")
    faulty.fail(
        "openMessage",
        TemporaryFailure("message body 5f3a chunk 0 is missing"),
        when=lambda index, headerOnly: index == 0,
    )
    s = loggedIn(faulty)
    reply = s.command("RETR 1")
    assert reply == "-ERR [SYS/TEMP] cannot read the message now; try again later\r\n"
    assert "chunk" not in reply  # internal detail stays in the log
    assert s.command("RETR 2").startswith("+OK")


def test_aMessageThatFailsHalfWayEndsTheSession(faulty):
    """
    A message longer than one piece whose later piece cannot be read: the
    client has already had +OK and part of the message, so no -ERR can
    follow; the connection is closed without the terminating dot, which
    the client sees as a failed retrieval, and nothing is deleted.
    """
    message = b"Subject: big\r\n\r\n" + (b"x" * 78 + b"\r\n") * (3 * CHUNK_SIZE // 80)
    deliver(faulty, [ALICE], message)
    s = loggedIn(faulty)
    reads = []
    faulty.fail("read", when=lambda: reads.append(None) or len(reads) > 1)
    reply = s.send(b"RETR 1\r\n")
    status, _, sent = reply.partition(b"\r\n")
    assert status == b"+OK %d octets" % len(message)
    assert 0 < len(sent) < len(message) and message.startswith(sent)
    assert s.disconnected
    assert stored(faulty, ALICE) == [len(message)]


@pytest.mark.parametrize(
    "error, level",
    [(TemporaryFailure("connection lost: the database restarted"), "warn"), (RuntimeError("a defect"), "critical")],
)
def test_aMessageThatFailsHalfWayForWantOfTheDatabaseIsAWarning(faulty, logEvents, error, level):
    """
    A message whose later piece cannot be read because the database went
    away (restarted, its connection cut or given up: a temporary failure)
    is a warning naming the reason, in one line, as a read that fails
    before the +OK is: it was logged at critical level with a traceback,
    which the operator of a database restart under load read as a
    defect.  Anything else that breaks a message off is still one.
    """
    message = b"Subject: big\r\n\r\n" + (b"x" * 78 + b"\r\n") * (3 * CHUNK_SIZE // 80)
    deliver(faulty, [ALICE], message)
    s = loggedIn(faulty)
    reads = []
    faulty.fail("read", error, when=lambda: reads.append(None) or len(reads) > 1)
    s.send(b"RETR 1\r\n")
    assert s.disconnected
    [event] = [e for e in logEvents if e.get("event") == "pop3.read_failed"]
    assert event["log_level"].name == level
    assert event["line"].startswith(f"pop3 reading message 1 failed mid-response user={ALICE} peer=")
    if level == "warn":
        assert "log_failure" not in event
        assert event["line"].endswith(": connection lost: the database restarted")
    else:
        assert event["log_failure"].check(RuntimeError)


def test_aUIDLListingThatFailsHalfWayEndsTheSession(faulty, monkeypatch):
    """
    Like a message that fails half way (above): once +OK and part of the
    listing are out, a batch the store cannot read closes the connection
    without the terminating dot, never an -ERR line inside the listing.
    """
    monkeypatch.setattr(POP3Server, "uidlBatch", 3)
    for n in range(8):
        deliver(faulty, [ALICE], b"Subject: %d\r\n\r\nbody\r\n" % n)
    s = loggedIn(faulty)
    s.command("DELE 1")
    faulty.fail("uniqueIds", when=lambda first, count: first == 6)
    reply = s.send(b"UIDL\r\n")
    assert reply.startswith(b"+OK unique-id listing follows\r\n2 ")
    assert b"-ERR" not in reply and not reply.endswith(b"\r\n.\r\n")
    assert s.disconnected
    assert len(stored(faulty, ALICE)) == 8


def test_twistedDefect_quitFailureIsReportedAndRemovesNothing(faulty):
    """
    Twisted answered +OK to QUIT before (and whatever) its deletions did.
    Here the store cannot apply them: QUIT answers -ERR [SYS/TEMP] and
    every message is still there.
    """
    for n in range(3):
        deliver(faulty, [ALICE], b"Subject: %d\r\n\r\nbody\r\n" % n)
    s = loggedIn(faulty)
    s.command("DELE 1")
    faulty.fail("expunge")
    reply = s.command("QUIT")
    assert reply == "-ERR [SYS/TEMP] could not remove the deleted messages; none were removed\r\n"
    assert s.disconnected
    assert len(stored(faulty, ALICE)) == 3
    # And the lock was released.
    faulty.heal()
    assert POP3Session(faulty).login(ALICE, PASSWORD).startswith("+OK")


def test_aQuitWhoseRemovalMayHaveCommittedDoesNotSayNoneWereRemoved(faulty):
    """
    The database connection was lost while the removal's COMMIT was on its
    way: the deleted messages may or may not be gone, and QUIT says so
    (with [SYS/TEMP]) rather than "none were removed", which could be
    false.
    """
    for n in range(3):
        deliver(faulty, [ALICE], b"Subject: %d\r\n\r\nbody\r\n" % n)
    s = loggedIn(faulty)
    s.command("DELE 1")
    faulty.fail("expunge", CommitUncertain("database connection lost while committing"))
    reply = s.command("QUIT")
    assert reply == (
        "-ERR [SYS/TEMP] lost the database while removing the deleted messages; "
        "they may or may not have been removed\r\n"
    )
    assert s.disconnected
    faulty.heal()
    assert POP3Session(faulty).login(ALICE, PASSWORD).startswith("+OK")


def test_aLoginTheStoreCannotAnswerIsATemporaryFailure(faulty):
    """
    The store cannot open the maildrop at login: -ERR [SYS/TEMP], not
    [AUTH] (the password was right), and the client may try again.
    """
    faulty.fail("openMaildrop")
    s = POP3Session(faulty)
    assert s.login(ALICE, PASSWORD) == "-ERR [SYS/TEMP] service temporarily unavailable: the mail store is unavailable; try again later\r\n"
    faulty.heal()
    assert s.login(ALICE, PASSWORD).startswith("+OK ")


def test_topZeroAsksTheStoreForTheHeaderOnly(faulty):
    """
    TOP n 0 opens the message for its header only (the store then reads
    nothing more: see test_aHeaderOnlyOpeningReadsOnlyTheHeader) and sends
    exactly the header.
    """
    header = b"From: a\r\nSubject: big\r\n\r\n"
    deliver(faulty, [ALICE], header + (b"y" * 78 + b"\r\n") * 3000)
    s = loggedIn(faulty)
    del faulty.calls[:]
    reply = s.send(b"TOP 1 0\r\n")
    assert reply == b"+OK top of message follows\r\n" + header + b".\r\n"
    assert faulty.calls == [("openMessage", (0, True))]


# -- SMTP and LMTP ---------------------------------------------------------------


def test_replyComesOnlyAfterCommit(faulty):
    """
    The store cannot commit the message (as with a full or read-only
    disk).  The answer to the final dot is a temporary 451, nothing is
    stored, and once the store works again the client's retry stores
    exactly one copy.
    """
    s = SMTPSession(faulty)
    faulty.fail("deliver")
    message = b"Subject: retry\r\n\r\nbody\r\n"
    _, reply = mail(s, [ALICE, BOB], message)
    assert reply == "451 4.3.0 temporary failure storing the message; try again later\r\n"
    assert stored(faulty, ALICE) == stored(faulty, BOB) == []
    # The client retries in the same session.
    faulty.heal()
    out, reply = mail(s, [ALICE, BOB], message)
    assert reply.startswith("250 2.0.0 "), (out, reply)
    assert len(stored(faulty, ALICE)) == len(stored(faulty, BOB)) == 1


def test_lmtpCommitFailureIsTemporaryForEveryRecipient(faulty):
    s = SMTPSession(faulty, lmtp=True)
    faulty.fail("deliver")
    _, reply = mail(s, [ALICE, BOB], b"x\r\n", lmtp=True)
    lines = reply.split("\r\n")[:-1]
    assert len(lines) == 2 and all(line.startswith("451 4.3.0 ") for line in lines), lines
    assert stored(faulty, ALICE) == stored(faulty, BOB) == []


def test_recipientLookupFailureIsTemporary(faulty):
    """
    The store stops answering under a running session.  Each recipient is
    answered with a temporary 451, never a 5xx, and the session goes on.
    """
    s = SMTPSession(faulty)
    assert s.command("EHLO client.test").startswith("250")
    assert s.command(f"MAIL FROM:<{SENDER}>").startswith("250 ")
    faulty.fail("hasDomain")
    faulty.fail("findUser")
    assert s.command(f"RCPT TO:<{ALICE}>").startswith("451 4.3.0 ")
    assert s.command(f"RCPT TO:<{BOB}>").startswith("451 4.3.0 ")
    assert s.command("DATA") == "554 5.5.1 no valid recipients\r\n"
    assert s.command("QUIT").startswith("221 ")
    assert stored(faulty, ALICE) == []


# -- the SQL store on a broken database ------------------------------------------


def test_aMessageWhoseRowsAreGoneFailsTemporarilyAndAlone(store, dbpath):
    """
    A message whose chunks have gone from the database: opening it fails
    with TemporaryFailure (the protocol's [SYS/TEMP]), and the next one
    still opens.
    """
    addUser(store, ALICE, PASSWORD)
    deliver(store, [ALICE], b"Subject: doomed\r\n\r\nbody\r\n")
    deliver(store, [ALICE], b"Subject: fine\r\n\r\nbody\r\n")
    with sqlite3.connect(dbpath) as other:
        other.execute(
            "DELETE FROM body_chunks WHERE body_id = (SELECT body_id FROM maildrop ORDER BY uid LIMIT 1)"
        )
    maildrop = resultOf(store.openMaildrop(resultOf(store.findUser(ALICE))))
    try:
        with pytest.raises(TemporaryFailure):
            resultOf(maildrop.openMessage(0))
        assert resultOf(maildrop.openMessage(1)).whole.endswith(b"fine\r\n\r\nbody\r\n")
    finally:
        resultOf(maildrop.release())


def test_aLargeMessageMissingAChunkInTheMiddleFailsAtThatChunk(store, dbpath):
    """
    A message of many chunks, one of them gone from the database: reading
    it gives every octet before the gap and then fails with
    TemporaryFailure, never the chunks after the gap in its place (the
    client would get a message with a hole, its size still announced).
    """
    addUser(store, ALICE, PASSWORD)
    line = b"z" * 98 + b"\r\n"
    body = b"Subject: long\r\n\r\n" + line * (CHUNK_SIZE * 7 // len(line))
    deliver(store, [ALICE], body)
    maildrop = resultOf(store.openMaildrop(resultOf(store.findUser(ALICE))))
    try:
        whole = readWhole(resultOf(maildrop.openMessage(0)))
        assert whole == body
        with sqlite3.connect(dbpath) as other:
            other.execute("DELETE FROM body_chunks WHERE seq = 3")
        opened = resultOf(maildrop.openMessage(0))
        pieces = []
        with pytest.raises(TemporaryFailure, match="chunk 3 is missing"):
            while True:
                piece = resultOf(opened.read())
                assert piece, "the message ended without its missing chunk"
                pieces.append(piece)
        got = b"".join(pieces)
        assert body.startswith(got)
        chunkSizes = [
            length for (length,) in sqlite3.connect(dbpath).execute(
                "SELECT length(data) FROM body_chunks ORDER BY seq"
            )
        ]
        assert len(got) == sum(chunkSizes[:3])
    finally:
        resultOf(maildrop.release())



def test_readAheadServesTheNextMessagesInOneTrip(store, dbpath, tripsTo):
    """
    Opening message 1 reads messages 2.. ahead, in one trip to the
    database; a damaged message further on does not fail the ones before
    it, and fails when it is asked for.
    """
    addUser(store, ALICE, PASSWORD)
    for n in range(1, 6):
        deliver(store, [ALICE], b"Subject: %d\r\n\r\nbody %d\r\n" % (n, n))
    with sqlite3.connect(dbpath) as other:
        other.execute(
            "DELETE FROM body_chunks WHERE body_id = "
            "(SELECT body_id FROM maildrop ORDER BY uid LIMIT 1 OFFSET 3)"
        )
    maildrop = resultOf(store.openMaildrop(resultOf(store.findUser(ALICE))))
    trips = tripsTo(store)
    try:
        bodies = [resultOf(maildrop.openMessage(n)) for n in (0, 1, 2)]
        assert [b.whole.endswith(b"body %d\r\n" % n) for n, b in enumerate(bodies, 1)] == [True] * 3
        assert trips == ["_openMessages"]
        with pytest.raises(TemporaryFailure):
            resultOf(maildrop.openMessage(3))
        assert resultOf(maildrop.openMessage(4)).whole.endswith(b"body 5\r\n")
    finally:
        resultOf(maildrop.release())


def test_aHeaderOnlyOpeningReadsOnlyTheHeader(store, dbpath):
    """
    A message longer than one chunk is stored with its header section as a
    chunk of its own, so TOP n 0 reads the header's octets and nothing more
    (a database reads a whole value even to return a part of it): the
    header comes whole, in the one read that opened it.
    """
    addUser(store, ALICE, PASSWORD)
    header = b"From: a\r\nSubject: big\r\n\r\n"
    message = header + b"x" * 70 + b"\r\n" + (b"y" * 78 + b"\r\n") * 3000
    deliver(store, [ALICE], message)
    with sqlite3.connect(dbpath) as db:
        (first,) = db.execute("SELECT length(data) FROM body_chunks WHERE seq = 0").fetchone()
    assert first == len(header)
    maildrop = resultOf(store.openMaildrop(resultOf(store.findUser(ALICE))))
    try:
        top = resultOf(maildrop.openMessage(0, headerOnly=True))
        assert (top.size, top.whole) == (len(header), header)
        assert resultOf(top.read()) == header and resultOf(top.read()) == b""
        # The whole message still comes back byte for byte.
        assert readWhole(resultOf(maildrop.openMessage(0))) == message
    finally:
        resultOf(maildrop.release())


@pytest.mark.parametrize("operation", ["deliver", "expunge"])
def test_aDatabaseRefusingWritesChangesNothing(store, operation):
    """
    The database refuses writes (SQLite's query_only: every statement that
    writes fails, like a read-only disk): a delivery or an expunge fails
    with TemporaryFailure and nothing changes; once writes work again, so
    does the store.
    """
    addUser(store, ALICE, PASSWORD)
    addUser(store, BOB, PASSWORD)
    deliver(store, [ALICE], b"Subject: first\r\n\r\nbody\r\n")
    maildrop = resultOf(store.openMaildrop(resultOf(store.findUser(ALICE))))
    store.database.connection.execute("PRAGMA query_only = 1")
    try:
        with pytest.raises(TemporaryFailure):
            if operation == "deliver":
                deliver(store, [ALICE, BOB], b"Subject: second\r\n\r\nbody\r\n")
            else:
                resultOf(maildrop.expunge([0]))
    finally:
        store.database.connection.execute("PRAGMA query_only = 0")
    assert (len(stored(store, ALICE)), len(stored(store, BOB))) == (1, 0)
    if operation == "deliver":
        deliver(store, [ALICE, BOB], b"Subject: second\r\n\r\nbody\r\n")
        assert (len(stored(store, ALICE)), len(stored(store, BOB))) == (2, 1)
    else:
        assert resultOf(maildrop.expunge([0])) == 1
        assert stored(store, ALICE) == []
    resultOf(maildrop.release())


def test_aStoreWhoseConnectionIsGoneFailsLookups(dbpath):
    """
    The database connection is lost under a running store (SQLite in WAL
    mode offers no quicker real way to lock readers out): lookups fail,
    and nothing was stored.
    """
    store = memoryStore(f"sqlite:///{dbpath}")
    addUser(store, ALICE, PASSWORD)
    store.database.connection.close()
    with pytest.raises(Exception) as failure:
        resultOf(store.findUser(ALICE))
    assert "closed" in str(failure.value)



# -- a connection lost while idle ---------------------------------------------------


def _writerBackend(cursor):
    cursor.execute("SELECT pg_backend_pid()")
    return cursor.fetchone()[0]


@postgresOnly
def test_aWriteWhoseConnectionDiedWhileIdleRunsAgainOnAFreshOne(databaseURL):
    """
    The writer's connection died while idle (PostgreSQL restarted, or an
    administrator ended the backend): the next write finds out with its
    first statement, before any COMMIT, so nothing of it took effect and
    it runs again on a fresh connection.  The client gets its 250, not a
    451 for a database that is back.
    """
    import psycopg

    from mailgate.auth.passwords import makeCredentials
    from mailgate.message import spoolBytes
    from mailgate.store import openStore
    from mailgate.store.postgres import _conninfo
    from mailgate.testing import TEST_HASH_COST
    from pumped import PumpedReactor

    reactor = PumpedReactor()
    store = openStore(databaseURL, reactor=reactor)
    try:
        reactor.resultOf(store.addUser(ALICE, makeCredentials(b"secret", logN=TEST_HASH_COST)))
        backend = reactor.wait(store.database.runWrite(_writerBackend))
        with psycopg.connect(_conninfo(databaseURL), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (backend,))
        delivered = reactor.wait(store.deliver([ALICE], spoolBytes(b"Subject: after\r\n\r\nbody\r\n")))
        assert not isinstance(delivered, Failure), delivered
        assert list(delivered) == [ALICE]
        assert reactor.wait(store.database.runWrite(_writerBackend)) != backend
        assert len(reactor.wait(store.listMessages(ALICE))) == 1
        assert store.database.writeFailure is None
    finally:
        reactor.resultOf(store.close())


# -- one failing write in a group commit ---------------------------------------------


@pytest.mark.parametrize("databaseURL", ["sqlite", "postgres"], indirect=True)
def test_aDeliveryTheDatabaseRefusesFailsAloneInItsGroupCommit(databaseURL):
    """
    Deliveries that wait for the same commit run together (on PostgreSQL
    in one pipeline); the database refuses one of them (here a CHECK
    constraint refuses its size, as a corrupt row or a full table would
    refuse it): that one fails, and the others of the batch are stored
    and reported stored, once each.
    """
    from mailgate.auth.passwords import makeCredentials
    from mailgate.message import spoolBytes
    from mailgate.store import openStore
    from mailgate.testing import TEST_HASH_COST
    from pumped import PumpedReactor

    refused = b"Subject: refused\r\n\r\n" + b"x" * 300 + b"\r\n"
    reactor = PumpedReactor()
    store = openStore(databaseURL, reactor=reactor)
    try:
        reactor.resultOf(store.addUser(ALICE, makeCredentials(b"secret", logN=TEST_HASH_COST)))

        def refuseTheSize(cursor):
            cursor.execute(
                "CREATE TRIGGER refuse_size BEFORE INSERT ON bodies FOR EACH ROW "
                f"WHEN (NEW.size = {len(refused)}) "
                + (
                    "EXECUTE FUNCTION refuse_size()"
                    if "postgres" in databaseURL
                    else "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
                )
            )

        if "postgres" in databaseURL:
            reactor.resultOf(store.database.runWrite(_createRefusingFunction))
        assert not isinstance(reactor.wait(store.database.runWrite(refuseTheSize)), Failure)
        messages = [b"Subject: %d\r\n\r\nbody\r\n" % n for n in range(4)]
        messages.insert(2, refused)
        # All asked for in one turn: the first goes alone, the others wait
        # for the next commit together.
        pending = [store.deliver([ALICE], spoolBytes(m)) for m in messages]
        results = [reactor.wait(d) for d in pending]
        outcomes = [not isinstance(r, Failure) for r in results]
        assert outcomes == [True, True, False, True, True], results
        stored = reactor.wait(store.listMessages(ALICE))
        assert sorted(m.size for m in stored) == sorted(len(m) for m in messages if m is not refused)
    finally:
        reactor.resultOf(store.close())


def _createRefusingFunction(cursor):
    cursor.execute(
        "CREATE FUNCTION refuse_size() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN RAISE EXCEPTION 'refused by the test' USING ERRCODE = 'check_violation'; END $$"
    )


@postgresOnly
def test_aCommandWhoseConnectionWasEndedFailsTemporarily(databaseURL):
    """
    The mailgate command's store (one connection, no reactor) whose
    backend an administrator ended, or a restart closed: its next write
    fails with TemporaryFailure, which the command reports as "temporary
    failure, try again" and exit 75 (an import: "interrupted; run it
    again"), and nothing is stored.  The write used to escape as the
    store's internal _LostBeforeCommit: "internal error", exit 70, which
    an import reported instead of what it had imported.
    """
    import psycopg

    from mailgate.store.postgres import _conninfo

    store = memoryStore(databaseURL)
    try:
        addUser(store, ALICE, PASSWORD)
        backend = store.database.connection.info.backend_pid
        with psycopg.connect(_conninfo(databaseURL), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (backend,))
        with pytest.raises(TemporaryFailure):
            deliver(store, [ALICE], b"Subject: lost\r\n\r\nbody\r\n")
    finally:
        store.close()
    store = memoryStore(databaseURL)
    try:
        assert stored(store, ALICE) == []
    finally:
        store.close()


@postgresOnly
def test_aDeliveryWhoseBackendIsEndedMidTransactionIsStoredOnce(databaseURL):
    """
    The writer's backend is ended while a delivery's transaction is under
    way (it waits for a lock an administrator's transaction holds): its
    COMMIT was never sent, so it runs again on a fresh connection, and
    once the lock is let go the message is stored once and the delivery
    reported stored; the user's storage use counts it once.
    """
    import psycopg

    from mailgate.auth.passwords import makeCredentials
    from mailgate.message import spoolBytes
    from mailgate.store import openStore
    from mailgate.store.postgres import _conninfo
    from mailgate.testing import TEST_HASH_COST
    from pumped import PumpedReactor

    body = b"Subject: once\r\n\r\nbody\r\n"
    reactor = PumpedReactor()
    store = openStore(databaseURL, reactor=reactor)
    try:
        reactor.resultOf(store.addUser(ALICE, makeCredentials(b"secret", logN=TEST_HASH_COST)))
        # Waiting for the administrator's lock, whatever other tests do.
        waiting = (
            "SELECT pid FROM pg_stat_activity WHERE pg_backend_pid() <> pid "
            "AND %s = ANY(pg_blocking_pids(pid))"
        )
        with psycopg.connect(_conninfo(databaseURL)) as admin, psycopg.connect(
            _conninfo(databaseURL), autocommit=True
        ) as watcher:
            admin.execute("LOCK TABLE mailboxes IN ACCESS EXCLUSIVE MODE")
            results = []
            store.deliver([ALICE], spoolBytes(body)).addBoth(results.append)
            blocking = (admin.info.backend_pid,)
            _pumpUntil(reactor, lambda: watcher.execute(waiting, blocking).fetchall())
            [(backend,)] = watcher.execute(waiting, blocking).fetchall()
            watcher.execute("SELECT pg_terminate_backend(%s)", (backend,))
            # Run again on a new connection, which waits for the lock too.
            _pumpUntil(
                reactor,
                lambda: results or [pid for (pid,) in watcher.execute(waiting, blocking).fetchall() if pid != backend],
            )
            assert results == []
            admin.rollback()
        reactor.pump(lambda: results, timeout=20)
        assert not isinstance(results[0], Failure), results[0]
        assert list(results[0]) == [ALICE]
        assert [m.size for m in reactor.wait(store.listMessages(ALICE))] == [len(body)]
        status = reactor.wait(store.quotaOf(ALICE))
        assert (status.usedMessages, status.usedOctets) == (1, len(body))
    finally:
        reactor.resultOf(store.close())


def _pumpUntil(reactor, done, timeout=20):
    """
    Run what the worker threads hand over until C{done()}, which watches
    the database, is true: asked again every few milliseconds, since
    nothing may be handed over meanwhile.
    """
    import queue
    import time

    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "the database never got there"
        try:
            function, args = reactor.calls.get(timeout=0.01)
        except queue.Empty:
            continue
        function(*args)


# -- a connection lost while a COMMIT is on its way ---------------------------------


def _slowCommits(cursor):
    # A deferred constraint trigger runs inside COMMIT: removing a message
    # then makes COMMIT wait, long enough to end its backend meanwhile.
    cursor.execute(
        "CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN PERFORM pg_sleep(20); RETURN NULL; END $$"
    )
    cursor.execute(
        "CREATE CONSTRAINT TRIGGER slow_commit AFTER DELETE ON maildrop "
        "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit()"
    )


def _fastCommits(cursor):
    cursor.execute("DROP TRIGGER slow_commit ON maildrop")
    cursor.execute("DROP FUNCTION slow_commit()")


def _firstMessage(cursor):
    cursor.execute("SELECT user_id, uid FROM maildrop ORDER BY uid LIMIT 1")
    return tuple(cursor.fetchone())


def _endTheCommittingBackend(conninfo, ended):
    """
    End the backend that is inside COMMIT, from another thread (the test's
    reactor is busy waiting for the removal), within a bounded time.
    """
    import time

    import psycopg

    with psycopg.connect(conninfo, autocommit=True) as admin:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            row = admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE query = 'COMMIT' AND state = 'active' "
                "AND wait_event = 'PgSleep'"
            ).fetchone()
            if row is not None:
                admin.execute("SELECT pg_terminate_backend(%s)", (row[0],))
                ended.append(row[0])
                return
            time.sleep(0.05)


@postgresOnly
def test_aRemovalWhoseConnectionIsLostDuringCommitIsUncertain(databaseURL):
    """
    The writer's backend is ended while it runs the COMMIT of a QUIT's
    removal (a database restart or failover at that moment): whether the
    COMMIT took effect is unknown, so it is not run again and the failure
    is CommitUncertain, which POP3 reports as "may or may not have been
    removed".  A write whose connection was lost before its COMMIT is
    still run again (test above); this one is not, as running a removal
    twice, or a delivery, could do it twice.
    """
    import threading

    from mailgate.auth.passwords import makeCredentials
    from mailgate.message import spoolBytes
    from mailgate.store import openStore
    from mailgate.store.postgres import _conninfo
    from mailgate.store.rows import removeMessages
    from mailgate.testing import TEST_HASH_COST
    from pumped import PumpedReactor

    reactor = PumpedReactor()
    store = openStore(databaseURL, reactor=reactor)
    try:
        reactor.resultOf(store.addUser(ALICE, makeCredentials(b"secret", logN=TEST_HASH_COST)))
        for n in range(3):
            reactor.resultOf(store.deliver([ALICE], spoolBytes(b"Subject: %d\r\n\r\nbody\r\n" % n)))
        assert not isinstance(reactor.wait(store.database.runWrite(_slowCommits)), Failure)
        userId, uid = reactor.wait(store.database.runInteraction(_firstMessage))
        ended = []
        ender = threading.Thread(target=_endTheCommittingBackend, args=(_conninfo(databaseURL), ended))
        ender.start()
        try:
            # What a QUIT's removal runs (behind the maildrop lock's check).
            outcome = reactor.wait(store.database.runWrite(removeMessages, userId, [uid]))
        finally:
            ender.join(20)
        assert ended, "no COMMIT was seen waiting in the trigger"
        assert isinstance(outcome, Failure) and outcome.check(CommitUncertain), outcome
        assert not isinstance(reactor.wait(store.database.runWrite(_fastCommits)), Failure)
        # Asked again, the database tells: here the COMMIT had not
        # completed, so the three messages are there; the store works on.
        assert len(reactor.wait(store.listMessages(ALICE))) == 3
        delivered = reactor.wait(store.deliver([ALICE], spoolBytes(b"Subject: after\r\n\r\nbody\r\n")))
        assert not isinstance(delivered, Failure), delivered
    finally:
        reactor.resultOf(store.close())


def test_aFailedStatementNeverQuotesTheRowsValues(databaseURL):
    """
    PostgreSQL's error for a NOT NULL or CHECK violation quotes the whole
    row (DETAIL: Failing row contains (...)): a password hash, a message's
    octets, which a logged failure would then carry.  The store's errors
    say what failed, not the values.
    """
    from mailgate.testing import memoryStore

    store = memoryStore(databaseURL)
    try:

        def insert(cursor):
            cursor.execute(
                "INSERT INTO users (address, domain, password_hash, created_at) VALUES (?, ?, ?, ?)",
                ("alice@example.org", None, "$scrypt$a-password-hash", 0),
            )

        failures = []
        store.database.runWrite(insert).addErrback(failures.append)
        [failure] = failures
        assert "domain" in str(failure.value)
        assert "a-password-hash" not in str(failure.value)
        assert "a-password-hash" not in failure.getTraceback()
    finally:
        store.close()


@pytest.mark.parametrize(
    "operation, error, command",
    [
        ("openMessage", TemporaryFailure, "RETR 1"),
        ("openMessage", RuntimeError, "RETR 1"),
        ("read", TemporaryFailure, "RETR 1"),
        ("expunge", TemporaryFailure, "QUIT"),
        ("expunge", RuntimeError, "QUIT"),
        ("release", RuntimeError, "QUIT"),
        (None, RuntimeError, "NOOP"),
    ],
)
def test_aStoreFailureLineNamesTheUserAndTheClient(faulty, logEvents, monkeypatch, operation, error, command):
    """
    The line the store's failure under a session writes (or a command's
    bug: C{None}) names the user and the client's address, as the
    session's other lines do: the text log's reader sees whose reading or
    QUIT failed without looking for the session's other lines.
    """
    message = b"Subject: big\r\n\r\n" + (b"x" * 78 + b"\r\n") * (3 * CHUNK_SIZE // 80)
    deliver(faulty, [ALICE], message)
    s = loggedIn(faulty)
    if command == "QUIT":
        s.command("DELE 1")
    if operation is None:
        monkeypatch.setattr(POP3Server, "pop3_NOOP", lambda self, argument: 1 / 0)
    else:
        faulty.fail(operation, error)
    s.send(command.encode() + b"\r\n")
    failures = [e for e in logEvents if e.get("event", "").endswith(("_failed", ".error"))]
    assert failures, [e.get("event") for e in logEvents]
    for event in failures:
        assert event["log_format"] == "{line}"
        assert f" user={ALICE} peer={s.protocol.peerText}" in event["line"], event["line"]


def test_aRecipientCheckFailureLineNamesTheEnvelopeAndTheClient(faulty, logEvents):
    s = SMTPSession(faulty)
    assert s.command("EHLO client.test").startswith("250")
    assert s.command(f"MAIL FROM:<{SENDER}>").startswith("250 ")
    faulty.fail("findUser", RuntimeError)
    faulty.fail("hasDomain", RuntimeError)
    assert s.command(f"RCPT TO:<{ALICE}>").startswith("451 4.3.0 ")
    [event] = [e for e in logEvents if e.get("event") == "smtp.recipient_failed"]
    assert event["line"] == f"smtp recipient check failed from=<{SENDER}> to=<{ALICE}> peer={s.protocol.peerText}"


def test_aScramLoginTheStoreCannotAnswerNamesItsUser(faulty, logEvents):
    """
    SCRAM looks its user up at the client's first message: when the store
    cannot answer, the tempfail line names the user the client gave, as
    for USER/PASS, not a placeholder.
    """
    import base64

    faulty.fail("findUser")
    s = POP3Session(faulty)
    first = base64.b64encode(f"n,,n={ALICE},r=abcdefgh".encode()).decode()
    reply = s.command(f"AUTH SCRAM-SHA-256 {first}")
    assert reply == "-ERR [SYS/TEMP] service temporarily unavailable: the mail store is unavailable; try again later\r\n"
    [event] = [e for e in logEvents if e.get("event") == "pop3.login_failed"]
    assert event["user"] == ALICE and event["mechanism"] == "scram-sha-256"
    assert event["line"].startswith(f"pop3 login failed user='{ALICE}' peer=")
