"""
A PostgreSQL connection driven by the reactor (L{mailgate.store.pgreactor}),
against the real server and a real epoll reactor: order of answers, failed
statements, and connections lost to the server, to silence and to closing.
"""

import os

import psycopg
import pytest
from twisted.python.failure import Failure

from mailgate.errors import TemporaryFailure
from mailgate.store import engineFromURL
from mailgate.store.database import WorkerThreads
from mailgate.store.pgreactor import INT8, ReactorConnection, Statement
from iterated import IteratedReactor

ECHO = Statement("test_echo", "SELECT $1::bigint * 2, pg_backend_pid()", [INT8])
DIVIDE = Statement("test_divide", "SELECT 100 / $1::bigint", [INT8])
SLEEP = Statement("test_sleep", "SELECT pg_sleep($1::float8)")
BLOB = Statement("test_blob", "SELECT decode(repeat('ab', $1::int), 'hex')", binary=True)
LENGTH = Statement("test_length", "SELECT octet_length($1::text)")


@pytest.fixture
def connection(postgresURL):
    """
    A connection with the test statements, its reactor, and the server URL.
    """
    engine = engineFromURL(postgresURL)
    reactor = IteratedReactor()
    threads = WorkerThreads(reactor, 1, "test-connect")
    threads.start()
    conn = ReactorConnection(
        reactor, lambda: threads.submit(engine.connectPrepared, [ECHO, DIVIDE, SLEEP, BLOB, LENGTH]), "test connection"
    )
    yield conn, reactor, postgresURL
    reactor.resultOf(conn.close())
    threads.stop()
    reactor.close()


def echo(conn, n):
    return conn.execute(ECHO, [str(n).encode()])


def terminate(url, pid):
    with psycopg.connect(url, autocommit=True) as admin:
        assert admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0]


def test_statementsIssuedTogetherAreAnsweredInOrder(connection):
    conn, reactor, _ = connection
    pending = [echo(conn, n) for n in range(50)]
    results = [reactor.wait(d) for d in pending]
    assert [int(rows[0][0]) for rows in results] == [2 * n for n in range(50)]
    # One connection, made once, served them all.
    assert {rows[0][1] for rows in results} == {str(conn.backendPid).encode()}
    assert conn.connections == 1


def test_aFailedStatementLeavesTheConnectionUsable(connection):
    conn, reactor, _ = connection
    first = echo(conn, 1)
    failed = conn.execute(DIVIDE, [b"0"])
    after = echo(conn, 2)
    assert reactor.wait(first)[0][0] == b"2"
    failure = reactor.wait(failed)
    assert isinstance(failure, Failure)
    assert failure.check(psycopg.errors.DivisionByZero)
    assert reactor.wait(after)[0][0] == b"4"
    assert reactor.wait(conn.execute(DIVIDE, [b"4"])) == [(b"25",)]
    assert conn.connections == 1


def test_aLargeBinaryAnswerArrivesWhole(connection):
    conn, reactor, _ = connection
    rows = reactor.wait(conn.execute(BLOB, [b"3000000"]))
    assert rows == [(b"\xab" * 3000000,)]


def test_aStatementLargerThanTheSocketBufferIsSentWhole(connection):
    """
    libpq cannot hand 20 MB to the kernel at once: the rest goes out as
    the socket becomes writable, and the statements behind it follow.
    """
    conn, reactor, _ = connection
    large = conn.execute(LENGTH, [b"x" * 20_000_000])
    after = echo(conn, 21)
    assert reactor.wait(large) == [(b"20000000",)]
    assert reactor.wait(after)[0][0] == b"42"


def test_aConnectionTheServerClosesIsNoticedWhileIdle(connection):
    """
    The reactor watches the socket even with nothing asked, so the loss is
    known at once; the next statement gets a new connection.
    """
    conn, reactor, url = connection
    reactor.resultOf(echo(conn, 1))
    pid = conn.backendPid
    terminate(url, pid)
    reactor.turnUntil(lambda: not conn.connected, timeout=10)
    rows = reactor.wait(echo(conn, 3))
    assert rows[0][0] == b"6" and rows[0][1] != str(pid).encode()
    assert conn.connections == 2


def test_aConnectionLostMidStatementFailsThatStatementOnly(connection):
    conn, reactor, url = connection
    reactor.resultOf(echo(conn, 1))
    pid = conn.backendPid
    sleeping = conn.execute(SLEEP, [b"30"])
    queued = echo(conn, 5)
    # The sleep has reached the server before it is cut off.
    reactor.turnUntil(lambda: _activeQuery(url, pid) == "EXECUTE", timeout=10)
    terminate(url, pid)
    failure = reactor.wait(sleeping)
    assert failure.check(TemporaryFailure)
    assert "connection lost" in str(failure.value)
    assert reactor.wait(queued)[0][0] == b"10"
    assert conn.backendPid != pid


def _activeQuery(url, pid):
    with psycopg.connect(url, autocommit=True) as admin:
        row = admin.execute(
            "SELECT state, query FROM pg_stat_activity WHERE pid = %s", (pid,)
        ).fetchone()
    return "EXECUTE" if row and row[0] == "active" and "pg_sleep" in row[1] else None


def test_aStatementUnansweredPastTheDeadlineGivesTheConnectionUp(connection):
    """
    The short deadline is for the statement that sleeps only (the
    connection's first, so its timer is the short one): the statement
    after it has the default again, so a test process descheduled for
    half a second on a loaded machine does not give its connection up too.
    """
    conn, reactor, _ = connection
    default = conn.deadline
    conn.deadline = 0.5
    failure = reactor.wait(conn.execute(SLEEP, [b"20"]), timeout=10)
    assert failure.check(TemporaryFailure)
    assert "no answer in 0.5 seconds" in str(failure.value)
    assert conn.connections == 1
    conn.deadline = default
    rows = reactor.wait(echo(conn, 7))
    assert rows[0][0] == b"14" and conn.connections == 2


def test_anUnreachableServerFailsEverythingQueued():
    reactor = IteratedReactor()
    threads = WorkerThreads(reactor, 1, "test-connect")
    threads.start()
    try:
        # Port 1 on loopback: nothing listens there.
        engine = engineFromURL("postgresql://nobody@127.0.0.1:1/nothing")
        conn = ReactorConnection(reactor, lambda: threads.submit(engine.connectPrepared, [ECHO]), "test")
        pending = [echo(conn, n) for n in range(3)]
        for d in pending:
            failure = reactor.wait(d)
            assert failure.check(TemporaryFailure)
            assert "cannot connect to PostgreSQL" in str(failure.value)
        assert not conn.connected
    finally:
        threads.stop()
        reactor.close()


def test_losingAndClosingLeaveNoDescriptorBehind(connection):
    conn, reactor, url = connection
    reactor.resultOf(echo(conn, 1))
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        terminate(url, conn.backendPid)
        reactor.turnUntil(lambda: not conn.connected, timeout=10)
        reactor.resultOf(echo(conn, 1))
    assert len(os.listdir("/proc/self/fd")) == before
    reactor.resultOf(conn.close())
    assert len(os.listdir("/proc/self/fd")) == before - 2  # the socket and its duplicate
    failure = reactor.wait(echo(conn, 1))
    assert failure.check(TemporaryFailure)


def _keepaliveOf(fd):
    """
    The TCP keepalive settings the kernel holds for a connection's socket.
    """
    import socket

    sock = socket.socket(fileno=os.dup(fd))
    try:
        return (
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
        )
    finally:
        sock.close()


def test_everyConnectionProbesAServerThatFellSilent(postgresURL):
    """
    A node's connections, worker threads' and reactor-driven ones alike,
    probe a silent server after 10 s and give up on it after three probes
    (or 25 s of data unacknowledged): a database server that vanished
    (machine off, partition, failover) is found out in under a minute,
    not after the kernel's default two hours of keepalive idleness.  A
    URL that gives its own keepalive settings keeps them.
    """
    import socket

    engine = engineFromURL(postgresURL)
    conn = engine.connect()
    with socket.socket(fileno=os.dup(conn.pgconn.socket)) as sock:
        family = sock.family
    if family == socket.AF_UNIX:
        conn.close()
        pytest.skip("keepalive is a TCP setting; this PostgreSQL is reached by a Unix socket")
    try:
        assert _keepaliveOf(conn.pgconn.socket) == (1, 10, 5, 3, 25000)
    finally:
        conn.close()
    pg = engine.connectPrepared([ECHO])
    try:
        assert _keepaliveOf(pg.socket) == (1, 10, 5, 3, 25000)
    finally:
        pg.finish()
    own = engineFromURL(postgresURL + "&keepalives_idle=60&tcp_user_timeout=0")
    conn = own.connect()
    try:
        assert _keepaliveOf(conn.pgconn.socket) == (1, 60, 5, 3, 0)
    finally:
        conn.close()
