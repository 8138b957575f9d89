"""
A PostgreSQL server that stops answering while the connections to it stay
open: its processes stopped or stuck on a hung disk, a wedged pooler, a
relay that forwards nothing (here L{pgfaultproxy.FaultProxy} paused).  The
machine's kernel still acknowledges what the node sends and answers its
keepalive probes, so only a deadline on the answers ends the wait
(L{mailgate.store.pgdeadline}).

In one process on a real PostgreSQL, the answer deadline shortened, and
new connections refused while the relay is paused (rather than held for
the connect timeout), so that the tests take a second rather than the
minute and a half a node takes.  Every
wait is bounded: before the deadline existed, a worker thread waited for
as long as the relay was paused, and these tests failed at their bound.
"""

from urllib.parse import urlsplit

import psycopg
import pytest
from twisted.python.failure import Failure

from mailgate.errors import CommitUncertain, TemporaryFailure
from mailgate.message import spoolBytes
from mailgate.store import postgres
from mailgate.store.database import runTransaction
from mailgate.store.pgdeadline import DeadlineConnection
from pgfaultproxy import FaultProxy, RunningFaultProxy
from pumped import PumpedReactor

ALICE = "alice@example.org"
DEADLINE = 0.5
# PumpedReactor.wait's bound: well past what a failure takes here (the
# deadline, then a connect timeout), well short of "for ever".
BOUND = 20


@pytest.fixture
def relay(postgresURL):
    server = urlsplit(postgresURL)
    proxy = FaultProxy((server.hostname, server.port))
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.fixture
def shortened(monkeypatch):
    monkeypatch.setattr(DeadlineConnection, "answerDeadline", DEADLINE)


@pytest.fixture
def store(postgresURL, relay, shortened):
    from mailgate.auth.passwords import makeCredentials
    from mailgate.store import openStore
    from mailgate.testing import TEST_HASH_COST

    reactor = PumpedReactor()
    opened = openStore(relay.url(postgresURL), reactor=reactor)
    opened.reactor = reactor
    try:
        reactor.resultOf(opened.addUser(ALICE, makeCredentials(b"secret", logN=TEST_HASH_COST)))
        yield opened
    finally:
        relay.resume()
        reactor.resultOf(opened.close())


def _message(subject):
    return spoolBytes(b"Subject: " + subject + b"\r\n\r\nbody\r\n")


def test_aReadTheDatabaseLeavesUnansweredFailsTemporarily(store, relay):
    """
    A user's look-up (a login's, a recipient's) on a reader whose
    connection gets no answer fails as temporary, and the reader serves
    again once the database answers.
    """
    reactor = store.reactor
    assert reactor.wait(store.findUser(ALICE)).address == ALICE
    relay.pause(refuse=True)
    failed = reactor.wait(store.findUser(ALICE), timeout=BOUND)
    assert isinstance(failed, Failure) and failed.check(TemporaryFailure), failed
    relay.resume()
    assert reactor.wait(store.findUser(ALICE), timeout=BOUND).address == ALICE


def test_aDeliveryTheDatabaseLeavesUnansweredFailsTemporarilyAndIsNotStored(store, relay):
    """
    The writer's statements go unanswered: the delivery fails as
    temporary (451 to the client, which sends it again), none of it is
    committed, and the writer takes deliveries again once the database
    answers: the writer and every write queued behind it are not held for
    as long as the database is away.
    """
    reactor = store.reactor
    assert list(reactor.wait(store.deliver([ALICE], _message(b"before")))) == [ALICE]
    relay.pause(refuse=True)
    failed = reactor.wait(store.deliver([ALICE], _message(b"while silent")), timeout=BOUND)
    assert isinstance(failed, Failure) and failed.check(TemporaryFailure), failed
    assert not failed.check(CommitUncertain), failed
    relay.resume()
    assert list(reactor.wait(store.deliver([ALICE], _message(b"after")), timeout=BOUND)) == [ALICE]
    assert len(reactor.wait(store.listMessages(ALICE))) == 2


def test_aSchemaMigrationWaitsWithoutTheDeadline(postgresURL, shortened):
    """
    A migration's transaction runs without the statement timeout, on
    purpose (L{postgres.PostgresEngine.lockSchema}): its answers are not
    held to the deadline either, which comes back for the next
    transaction on the same connection.
    """
    engine = postgres.PostgresEngine(postgresURL)
    conn = engine.connect()
    try:
        def migration(cursor):
            engine.lockSchema(cursor)
            cursor.execute("SELECT pg_sleep(?)", (DEADLINE * 1.5,))

        runTransaction(engine, conn, migration, (), {}, True)
        with pytest.raises(psycopg.OperationalError) as given:
            with conn.cursor() as cursor:
                cursor.execute("SELECT pg_sleep(%s)", (DEADLINE * 1.5,))
        assert "no answer from PostgreSQL in 0.5 seconds" in str(given.value)
        assert engine.isDisconnect(given.value) and engine.isBroken(conn)
    finally:
        conn.close()


def test_aCommandsMaildropLockTheDatabaseLeavesUnansweredFailsTemporarily(postgresURL, monkeypatch):
    """
    The C{mailgate} command's maildrop lock (C{mailbox expunge}, C{user
    del}, C{user rename}) on a connection whose statement gets no answer
    fails as temporary (the command exits 75), rather than hold the
    command, and the lock, for as long as the database is away; the next
    lock, on a fresh connection, is taken once it answers.
    """
    import threading

    from mailgate.store import openSynchronousStore
    from mailgate.store.pgreactor import BlockingConnection

    monkeypatch.setattr(BlockingConnection, "deadline", DEADLINE)
    server = urlsplit(postgresURL)
    # libpq's blocking connect keeps Python's lock: a relay of its own.
    relay = RunningFaultProxy((server.hostname, server.port))
    store = openSynchronousStore(relay.url(postgresURL))
    try:
        locks = store.locks
        locks.acquire(1)
        locks.release(1)
        relay.pause(refuse=True)
        outcome = []
        attempt = threading.Thread(target=lambda: locks.acquire(7).addBoth(outcome.append), daemon=True)
        attempt.start()
        attempt.join(BOUND)
        assert outcome, "the lock statement was never given up"
        assert isinstance(outcome[0], Failure) and outcome[0].check(TemporaryFailure), outcome
        assert "no answer in 0.5 seconds" in str(outcome[0].value), outcome
        relay.resume()
        assert store.locks.acquire(7).result == 7
        store.locks.release(7)
    finally:
        store.close()
        relay.close()


def test_aConnectionWhoseSetUpTheDatabaseLeavesUnansweredIsGivenUp(postgresURL, monkeypatch):
    """
    A lock or read connection of a node is made in blocking mode, then
    set up (its settings, its prepared statements, its identity lock);
    the database falls silent in between (behind PgBouncer, whose own
    answer completes the connection before PostgreSQL is asked anything,
    the likely moment): the set-up fails as temporary, the connection
    closed, rather than hold the one thread that makes these connections,
    and every statement queued for them, for as long as it lasts.
    """
    import threading

    from mailgate.store import pgreactor

    monkeypatch.setattr(pgreactor, "ANSWER_DEADLINE", DEADLINE)
    server = urlsplit(postgresURL)
    relay = RunningFaultProxy((server.hostname, server.port))

    def silencedFirst(serverVersion):
        relay.pause()
        return postgres.sessionSettings(serverVersion)

    outcome = []

    def connect():
        try:
            outcome.append(pgreactor.connect(relay.url(postgresURL), silencedFirst, [], 10))
        except TemporaryFailure as e:
            outcome.append(e)

    try:
        attempt = threading.Thread(target=connect, daemon=True)
        attempt.start()
        attempt.join(BOUND)
        assert outcome, "the set-up was never given up"
        assert isinstance(outcome[0], TemporaryFailure), outcome
        assert "no answer in 0.5 seconds" in str(outcome[0])
    finally:
        relay.close()


def test_makingAConnectionLeavesTheOtherThreadsRunning():
    """
    A lock or read connection is made on a worker thread while the
    reactor serves on: libpq's blocking connect kept Python's lock for as
    long as it waited, so that a server slow to answer (or answering
    nothing: PostgreSQL's processes stopped, a wedged pooler) froze every
    thread of the node, the reactor's with it, up to the connect timeout
    at each attempt.  Here the server is a thread of this process that
    hangs up on the connection: it can only do so while the connection is
    being made if that leaves it running; before, the attempt waited out
    its timeout.
    """
    import socket
    import threading

    from mailgate.store import pgreactor

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def hangUp():
        connection, _ = listener.accept()
        connection.close()
        # Asked again why (L{pgrefusal}), nobody listens.
        listener.close()

    server = threading.Thread(target=hangUp, daemon=True)
    try:
        server.start()
        with pytest.raises(TemporaryFailure) as given:
            pgreactor.connect(f"postgresql://mailgate@127.0.0.1:{port}/mail?sslmode=disable", [], [], 10)
        server.join(BOUND)
        assert "timeout expired" not in str(given.value)
        assert "server closed the connection unexpectedly" in str(given.value)
    finally:
        listener.close()
