# -*- test-case-name: tests.test_pgreactor -*-
"""
PostgreSQL connections for short statements, driven by the reactor through
libpq's non-blocking API (C{psycopg.pq}).

A POP3 session makes three trips to its node's maildrop lock connection:
lock and snapshot at login, unlock at QUIT.  Made from a worker thread,
each job also costs two hand-overs between threads, which on loopback take
as long as the trip itself.  Here a statement is a write to the socket
from the reactor thread and its answer is read there when it arrives, so
the reactor never waits.  These connections are meant for statements
whose answers are cheap to decode: a few values, or a packed array
decoded in C whatever its length.

Statements are prepared when the connection is made and run one at a time,
in the order they were issued.  That order is what the lock connections
rely on: an unlock queued ahead of a new login's lock runs first.

The connection itself is made on a worker thread: libpq negotiates TLS
with blocking calls (host names are looked up before, by
L{mailgate.store.pgresolve}).
"""

import os
import select
import time
from collections import deque

import psycopg
from psycopg import pq
from twisted.internet import defer
from twisted.internet.interfaces import IReadDescriptor, IWriteDescriptor
from twisted.logger import Logger
from zope.interface import implementer

from mailgate.errors import DatabaseRefused, TemporaryFailure
from mailgate.store import pgrefusal
from mailgate.store.pgresolve import addressedAttempts
from mailgate.store.pgdeadline import ANSWER_DEADLINE
from mailgate.timers import cancelled, elapsedClock
from mailgate.plural import counted

#: parameter type OIDs, for L{Statement.types}
INT4 = 23
INT8 = 20
TEXT = 25
OID = 26
INT8_ARRAY = 1016


def oneLine(error):
    return " ".join(str(error).split())


class Statement:
    """
    A statement prepared on every connection made.

    @ivar name: its prepared statement name (C{bytes}).
    @ivar sql: its text, with C{$1}, C{$2}, ... placeholders.
    @ivar types: the parameters' type OIDs.
    @ivar binary: whether its results come in binary format (C{bytea}
        as it is) rather than text.
    """

    def __init__(self, name, sql, types=(), binary=False):
        self.name = name.encode("ascii")
        self.sql = sql.encode("utf-8")
        self.types = list(types)
        self.binary = binary

    def __repr__(self):
        return f"<Statement {self.name.decode()}>"


def _ignoreNotice(result):
    """
    libpq's default notice processor writes to stderr; the statements
    prepared here raise none worth keeping (C{pg_advisory_unlock} warns when
    the lock was already gone with a previous connection).
    """


def connect(conninfo, setup, statements, connectTimeout, where="the database URL's server", parameters=None):
    """
    Make a connection, in blocking mode: run on a worker thread.

    @param setup: statements run first (C{SET ...}), as C{str}, or a
        callable that gives them for the server's version number.
    @param statements: the L{Statement}s to prepare.
    @param where: the server, as an error names it (without the password).
    @param parameters: libpq parameters added to C{conninfo}'s.
    @return: the C{pq.PGconn}, in blocking mode.
    @raise TemporaryFailure: if PostgreSQL cannot be reached or refuses
        (a L{mailgate.errors.DatabaseRefused} if its configuration is at
        fault: see L{mailgate.store.pgrefusal}).
    """
    try:
        info = psycopg.conninfo.make_conninfo(conninfo, connect_timeout=connectTimeout, **(parameters or {}))
    except psycopg.Error as e:
        from mailgate.urls import withoutPassword

        # Its words may quote the URL, or the password in it.
        raise DatabaseRefused(
            f"cannot connect to PostgreSQL at {where}: {withoutPassword(oneLine(e), conninfo)}"
        ) from None
    failed = []
    for attempt in _addressedAttempts(info, connectTimeout, failed):
        pg, timedOut = _connected(attempt.encode("utf-8"), connectTimeout)
        if timedOut is None and pg.status == pq.ConnStatus.OK:
            break
        failed.append((pg, timedOut or oneLine(pg.get_error_message()), timedOut is not None))
    else:
        try:
            reason = "; ".join(why for _, why, _ in failed)
            refused = [pg for pg, _, timedOut in failed if not timedOut]
            if not refused:
                raise pgrefusal.connectionFailure(where, conninfo, reason, timedOut=True, timeout=connectTimeout)
            raise pgrefusal.connectionFailure(where, conninfo, reason, pgconn=refused[-1], timeout=connectTimeout)
        finally:
            for pg, _, _ in failed:
                if pg is not None:
                    pg.finish()
    for other, _, _ in failed:
        if other is not None:
            other.finish()
    try:
        pg.notice_handler = _ignoreNotice
        if callable(setup):
            setup = setup(pg.server_version)
        for sql in setup:
            resultRows(execute(pg, sql.encode("utf-8")))
        for statement in statements:
            pg.send_prepare(statement.name, statement.sql, statement.types)
            resultRows(answerOf(pg))
    except BaseException:
        pg.finish()
        raise
    return pg


def _addressedAttempts(info, connectTimeout, failed):
    """
    The connection strings to try for C{info}, in turn, each server's name
    looked up by mailgate (L{addressedAttempts}): libpq's own lookup kept
    every thread of the node waiting.  A name that does not resolve is
    added to C{failed} (without a C{PGconn}, as a failure no server made)
    and the next server is tried.
    """
    return addressedAttempts(info, connectTimeout, lambda e: failed.append((None, str(e), True)))


def _connected(info, connectTimeout):
    """
    Connect with libpq's non-blocking calls, waiting for the socket here,
    C{connectTimeout} seconds at most.  libpq's blocking connect
    (C{PQconnectdb}, C{pq.PGconn.connect}) keeps Python's lock for as long
    as it waits: a server that did not answer froze every thread of the
    node, the reactor's with it (no POP3 or SMTP reply, no timer), for
    up to the whole connect timeout, at each attempt to make a lock or a
    read connection while the database was away.

    @return: the C{PGconn} (its status C{OK}, or C{BAD} with libpq's
        reason) and, if the time ran out, what libpq says of that (the
        connection then closed), else C{None}.
    """
    pg = pq.PGconn.connect_start(info)
    until = time.monotonic() + connectTimeout
    status = pq.PollingStatus.WRITING
    while pg.status != pq.ConnStatus.BAD:
        if status == pq.PollingStatus.OK or status == pq.PollingStatus.FAILED:
            break
        waiting = select.poll()
        waiting.register(pg.socket, select.POLLIN if status == pq.PollingStatus.READING else select.POLLOUT)
        left = until - time.monotonic()
        if left <= 0 or not waiting.poll(left * 1000):
            reason = _timedOutReason(pg)
            pg.finish()
            return pg, reason
        status = pg.connect_poll()
    return pg, None


def _timedOutReason(pg):
    """
    What libpq says of a connection attempt that ran out of time.
    """
    try:
        host, port = pg.host.decode(), pg.port.decode()
    except Exception:
        return "timeout expired"
    if host.startswith("/"):
        return f'connection to server on socket "{host}/.s.PGSQL.{port}" failed: timeout expired'
    return f'connection to server at "{host}", port {port} failed: timeout expired'


def execute(pg, sql):
    """
    Run C{sql} (C{bytes}, no parameters) on C{pg}, a connection in
    blocking mode: its last result, within L{answerOf}'s deadline.
    """
    pg.send_query(sql)
    return answerOf(pg)


def answerOf(pg, deadline=None):
    """
    The last result of the statement just sent on C{pg} (in blocking mode
    the send returns once it is written), waited for L{ANSWER_DEADLINE}
    seconds at most (or C{deadline}): libpq's own C{PQexec} waits as long
    as the socket stays open, and a database that stops answering while
    its machine's kernel still acknowledges (see
    L{mailgate.store.pgdeadline}) held whatever waited, a connection being
    made or a maildrop lock of the C{mailgate} command, for as long as it
    lasted.

    @raise TemporaryFailure: no answer in time; the caller gives the
        connection up.
    """
    if deadline is None:
        deadline = ANSWER_DEADLINE
    until = time.monotonic() + deadline
    readable = select.poll()
    readable.register(pg.socket, select.POLLIN)
    result = None
    while True:
        while not pg.is_busy():
            following = pg.get_result()
            if following is None:
                if result is None:
                    raise psycopg.OperationalError(oneLine(pg.get_error_message()))
                return result
            result = following
        left = until - time.monotonic()
        if left <= 0 or not readable.poll(left * 1000):
            raise TemporaryFailure(
                f"PostgreSQL connection lost: no answer in {counted(deadline, 'second', spec='g')}"
            )
        pg.consume_input()


def resultRows(result):
    """
    The rows of a statement's C{PGresult}, each a tuple of C{bytes} (or
    C{None} for NULL).

    @raise psycopg.Error: the error the statement reported.
    """
    status = result.status
    if status == pq.ExecStatus.TUPLES_OK:
        fields = range(result.nfields)
        return [tuple(result.get_value(row, field) for field in fields) for row in range(result.ntuples)]
    if status == pq.ExecStatus.COMMAND_OK:
        return []
    raise psycopg.errors.error_from_result(result)


class _Connection:
    """
    What both kinds of connection tell about themselves.

    @ivar connections: connections made so far.
    """

    _pg = None
    connections = 0

    @property
    def connected(self):
        return self._pg is not None

    @property
    def backendPid(self):
        return None if self._pg is None else self._pg.backend_pid

    @property
    def pgconn(self):
        """
        The libpq connection in use (a C{psycopg.pq.PGconn}), or C{None}:
        what the maker of the connection knows it by (the identity lock of
        L{mailgate.store.postgres.AdvisoryLocks}).
        """
        return self._pg


class BlockingConnection(_Connection):
    """
    The same statements on a connection in blocking mode, for synchronous
    stores (the C{mailgate} command, tests): each L{Deferred} has fired
    when L{execute} returns.

    A statement unanswered for L{deadline} seconds gives the connection
    up, as L{ReactorConnection} does: a database that stops answering
    while its machine's kernel still acknowledges (see
    L{mailgate.store.pgdeadline}) held a C{mailgate mailbox expunge} or
    C{user del} for as long as it lasted, its maildrop lock with it.
    """

    deadline = ANSWER_DEADLINE

    def __init__(self, connect):
        self._connect = connect

    def execute(self, statement, params):
        try:
            if self._pg is None:
                self._pg = self._connect()
                self.connections += 1
            values = params() if callable(params) else params
            result = self._exchange(statement, values)
            if self._pg.status != pq.ConnStatus.OK:
                self._lose()
            return defer.succeed(resultRows(result))
        except psycopg.Error as e:
            if self._pg is not None and self._pg.status != pq.ConnStatus.OK:
                self._lose()
            return defer.fail(e)
        except TemporaryFailure:
            return defer.fail()

    def _exchange(self, statement, values):
        """
        Send C{statement} and wait for its answer, L{deadline} seconds at
        most (L{answerOf}).

        @raise TemporaryFailure: no answer in time; the connection is lost.
        """
        self._pg.send_query_prepared(statement.name, values, result_format=1 if statement.binary else 0)
        try:
            return answerOf(self._pg, self.deadline)
        except TemporaryFailure:
            self._lose()
            raise

    def _lose(self):
        pg, self._pg = self._pg, None
        pg.finish()

    def close(self):
        if self._pg is not None:
            self._lose()
        return defer.succeed(None)


@implementer(IReadDescriptor, IWriteDescriptor)
class ReactorConnection(_Connection):
    """
    One PostgreSQL connection driven by the reactor.

    A statement that fails reports its error (a C{psycopg.Error}) and
    leaves the connection usable.  When the connection is lost (the server
    went away, or a statement went unanswered for L{deadline} seconds) the
    statement under way fails with L{TemporaryFailure}, and those queued
    behind it go to a new connection.  The reactor reads the socket
    whenever it is open, so a connection the server closes while idle is
    noticed at once, not at the next statement.

    @ivar deadline: seconds a statement may go unanswered before the
        connection is given up as lost (the server's own
        C{statement_timeout} should end a slow statement well before).
    @ivar onLost: called with the count of connections made (L{connections},
        which names the one lost) when a connection is lost, not closed
        by L{close}: what the connection's session held on the server (a
        maildrop's advisory lock) went with it.  C{None}: nobody asks.
    """

    deadline = ANSWER_DEADLINE
    onLost = None
    log = Logger()

    def __init__(self, reactor, connect, name):
        """
        @param connect: makes a connection on a worker thread: returns a
            L{Deferred} of a C{pq.PGconn} in blocking mode, its statements
            prepared (see L{connect}).
        @param name: what log lines call it.
        """
        self._reactor = reactor
        # The deadline is measured on the monotonic clock: the reactor's
        # timers run on the wall clock, and a step of it forward made the
        # statement under way look unanswered for the step's length.
        self._elapsed = elapsedClock(reactor)
        self._connect = connect
        self._name = name
        self._fd = -1
        self._connecting = False
        self._writing = False
        # Statements waiting: (statement, params, deferred); the one under
        # way: [deferred, results] and when it was sent.
        self._queue = deque()
        self._current = None
        self._sentAt = 0.0
        self._timer = None
        self._closed = False

    def __repr__(self):
        return f"<ReactorConnection {self._name}>"

    def execute(self, statement, params):
        """
        Run a prepared statement once those issued before it have run.

        @param statement: a L{Statement} the connection was made with.
        @param params: its parameters, as C{bytes} in text format, or a
            callable returning them, called when the statement is sent
            (after the connection is made).
        @return: a L{Deferred} of its rows, each a tuple of C{bytes} or
            C{None}.
        """
        if self._closed:
            return defer.fail(TemporaryFailure(f"{self._name}: connection closed"))
        d = defer.Deferred()
        self._queue.append((statement, params, d))
        if self._current is None:
            self._sendNext()
        return d

    def close(self):
        """
        Close the connection; statements not yet answered fail.
        """
        self._closed = True
        if self._pg is not None:
            self._lose("closed", log=False)
        self._failQueued(TemporaryFailure(f"{self._name}: connection closed"))
        self._timer = cancelled(self._timer)
        return defer.succeed(None)

    # Sending

    def _sendNext(self):
        if not self._queue or self._closed:
            return
        if self._pg is None:
            if not self._connecting:
                self._startConnecting()
            return
        statement, params, d = self._queue.popleft()
        pg = self._pg
        try:
            values = params() if callable(params) else params
            pg.send_query_prepared(statement.name, values, result_format=1 if statement.binary else 0)
        except psycopg.Error as e:
            # The connection broke since its last answer: the statement
            # goes to the next one.
            self._queue.appendleft((statement, params, d))
            self._lose(oneLine(e))
            return
        self._current = (d, [])
        self._sentAt = self._elapsed()
        if self._timer is None:
            self._timer = self._reactor.callLater(self.deadline, self._checkDeadline)
        self._flush()

    def _flush(self):
        try:
            pending = self._pg.flush()
        except psycopg.Error as e:
            self._lose(oneLine(e))
            return
        if pending and not self._writing:
            self._writing = True
            self._reactor.addWriter(self)
        elif not pending and self._writing:
            self._writing = False
            self._reactor.removeWriter(self)

    def _checkDeadline(self):
        self._timer = None
        if self._current is None or self._pg is None:
            return
        left = self._sentAt + self.deadline - self._elapsed()
        if left <= 0:
            self._lose(f"no answer in {counted(self.deadline, 'second', spec='g')}")
        else:
            self._timer = self._reactor.callLater(left, self._checkDeadline)

    # Connecting

    def _startConnecting(self):
        self._connecting = True
        d = defer.maybeDeferred(self._connect)
        d.addCallbacks(self._connected, self._notConnected)

    def _connected(self, pg):
        self._connecting = False
        if self._closed:
            pg.finish()
            return
        pg.nonblocking = 1
        self._pg = pg
        # The reactor watches a duplicate of the socket: libpq closes its
        # own descriptor as soon as it sees the connection end, and the
        # reactor must still be able to stop watching this one.
        self._fd = os.dup(pg.socket)
        self.connections += 1
        self._reactor.addReader(self)
        self._sendNext()

    def _notConnected(self, failure):
        self._connecting = False
        # Everything queued would wait for the same unreachable server.
        error = failure.value
        if not isinstance(error, TemporaryFailure):
            error = TemporaryFailure(f"{self._name}: cannot connect: {oneLine(error)}")
        self._failQueued(error)

    def _failQueued(self, error):
        queued, self._queue = self._queue, deque()
        for _, _, d in queued:
            d.errback(error)

    # Losing

    def _lose(self, why, log=True):
        pg = self._pg
        if pg is None:
            return
        self._pg = None
        self._reactor.removeReader(self)
        if self._writing:
            self._writing = False
            self._reactor.removeWriter(self)
        os.close(self._fd)
        self._fd = -1
        pg.finish()
        if log:
            self.log.warn(
                "{name}: PostgreSQL connection lost: {why}", name=self._name, why=why, event="database.connection_lost"
            )
        if self.onLost is not None and not self._closed:
            # Before the statement under way is failed and the next one
            # connects again: those who held something on this connection
            # learn it is gone while L{connections} still names it.
            try:
                self.onLost(self.connections)
            except Exception:
                self.log.failure(
                    "{name}: telling of the lost connection", name=self._name, event="database.connection_lost"
                )
        current, self._current = self._current, None
        if current is not None:
            current[0].errback(TemporaryFailure(f"{self._name}: connection lost: {why}"))
        self._sendNext()

    # IReadDescriptor, IWriteDescriptor

    def fileno(self):
        return self._fd

    def logPrefix(self):
        return self._name

    def connectionLost(self, reason):
        self._lose(oneLine(reason.value))

    def doWrite(self):
        if self._pg is not None:
            self._flush()

    def doRead(self):
        pg = self._pg
        if pg is None:
            return
        try:
            pg.consume_input()
        except psycopg.Error as e:
            self._lose(oneLine(e))
            return
        current = self._current
        if current is None:
            # Nothing asked: a notice, or the server closing the connection.
            if pg.status != pq.ConnStatus.OK:
                self._lose("closed by the server")
            return
        d, results = current
        while not pg.is_busy():
            result = pg.get_result()
            if result is None:
                self._current = None
                self._answer(d, results)
                if self._current is None:
                    self._sendNext()
                return
            results.append(result)
        if pg.status != pq.ConnStatus.OK:
            self._lose("closed by the server")

    @staticmethod
    def _answer(d, results):
        try:
            rows = resultRows(results[-1]) if results else []
        except psycopg.Error:
            d.errback()
        else:
            d.callback(rows)
