# -*- test-case-name: tests.test_locks,tests.test_store -*-
"""
The PostgreSQL engine: several mailgate nodes, one database.

Connections come from psycopg 3: synchronous ones on the store's worker
threads, and for the locks a few driven by the reactor (see
L{mailgate.store.pgreactor}).  The RFC 1939 maildrop lock is a PostgreSQL
session-level advisory lock, taken on a dedicated connection per node: it
holds across nodes, and it dies with the connection, so a node killed
outright releases its locks as soon as its connection closes (at once
when the process dies and the kernel closes its socket; within about 30
seconds, by TCP keepalive, if its whole machine vanishes).
"""

import hashlib
import math
import os
import secrets
import weakref
from urllib.parse import parse_qsl, urlsplit

import psycopg
from psycopg import errors as pgerrors
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgate.errors import ConfigurationError, DatabaseRefused, MaildropInUse, TemporaryFailure
from mailgate.interfaces import IEngine, IMaildropLocks, IMessageReads
from mailgate.store import pgreactor, pgrefusal, pgresolve, reads
from mailgate.store.pgurl import parameterProblem, shownWhere
from mailgate.urls import shownURL, withoutPassword
from mailgate.store.database import WorkerThreads
from mailgate.store.pghosts import hostOrderOf
from mailgate.store.pgdeadline import ANSWER_DEADLINE, DeadlineConnection
from mailgate.store.pgreactor import (
    INT4,
    INT8,
    INT8_ARRAY,
    TEXT,
    BlockingConnection,
    ReactorConnection,
    Statement,
    oneLine,
)
from mailgate.store.snapshot import snapshotQuery, unpackSnapshot
from mailgate.timers import elapsedClock

CONNECT_TIMEOUT = 10
#: times each of two connections asks for its backend's pid at start, to
#: tell a pooler that shares backends between connections
#: (L{PostgresEngine.sharedBackends})
SHARING_ROUNDS = 10
STATEMENT_TIMEOUT_MS = 60000

#: How long a schema migration's statement waits for a table's lock
#: before the upgrade rolls back and tries again (see lockSchema): what
#: the statements of nodes still serving may wait behind it, at most.
SCHEMA_LOCK_TIMEOUT_MS = 1000
# Server-side keepalive: a backend whose client machine vanished is dropped
# after idle + interval * count seconds, releasing that node's locks.
KEEPALIVE = {"tcp_keepalives_idle": 10, "tcp_keepalives_interval": 5, "tcp_keepalives_count": 3}
LOCK_RELEASE_BOUND = 10 + 5 * 3
# Client-side (libpq's), the same bound the other way: a node whose
# database server vanished (its machine off, a partition, a failover that
# moved the address) with a statement unanswered hears nothing more, and
# without these waits for the kernel's keepalive, two hours by default, its
# worker threads and logins with it.  Probes after 10 s of silence, the
# connection dropped after three unanswered (or data unacknowledged for
# 25 s), and the node reconnects.  A URL giving any of them keeps its own.
CLIENT_KEEPALIVE = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": LOCK_RELEASE_BOUND * 1000,
}


def sessionSettings(serverVersion):
    """
    The C{SET} statements each connection starts with, for a server of
    C{serverVersion} (libpq's number: 150004 for 15.4).

    C{idle_session_timeout} (PostgreSQL 14 on) is turned off whatever the
    role or the database sets: a node's connections are meant to wait, a
    lock connection holding the maildrop locks of POP3 sessions whose
    clients take their time, and one ended while idle took those locks
    with it, so that every QUIT of those sessions with deletions answered
    -ERR [SYS/TEMP] and removed nothing.  Nothing of mailgate's waits idle
    in a transaction: C{idle_in_transaction_session_timeout} is left as
    the administrator set it.
    """
    settings = [f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}"]
    settings += [f"SET {name} = {value}" for name, value in KEEPALIVE.items()]
    if serverVersion >= 140000:
        settings.append("SET idle_session_timeout = 0")
    return settings


_RETRYABLE = (pgerrors.SerializationFailure, pgerrors.DeadlockDetected)
# psycopg's own time-out of a connection attempt (psycopg >= 3.1.?).
_CONNECTION_TIMEOUT = getattr(pgerrors, "ConnectionTimeout", ())


class _NotConnected(Exception):
    """
    No server took a worker thread's connection: C{reason}, what each
    attempt met, and C{error}, the last psycopg error (C{None} where no
    name resolved and no server was tried).
    """

    def __init__(self, reason, error):
        super().__init__(reason)
        self.reason = reason
        self.error = error


class _Cursor:
    """
    A psycopg cursor that takes mailgate's C{?} placeholders, and names
    its L{engine} (see L{IEngine.begin}).
    """

    __slots__ = ("_cursor", "engine")

    def __init__(self, cursor, engine):
        self._cursor = cursor
        self.engine = engine

    @staticmethod
    def _convert(sql):
        return sql.replace("%", "%%").replace("?", "%s")

    def execute(self, sql, params=()):
        if params:
            self._cursor.execute(self._convert(sql), params)
        else:
            self._cursor.execute(sql)
        return self

    def executemany(self, sql, seq):
        self._cursor.executemany(self._convert(sql), seq)
        return self

    def fetchone(self):
        return self._cursor.fetchone()

    def fetchall(self):
        return self._cursor.fetchall()

    def fetchmany(self, size):
        return self._cursor.fetchmany(size)

    @property
    def rowcount(self):
        return self._cursor.rowcount

    @property
    def connection(self):
        return self._cursor.connection


def _boundAnswers(conn):
    """
    The answer deadline back on C{conn} once a transaction that ran
    without it (L{PostgresEngine.lockSchema}) has ended.
    """
    if isinstance(conn, DeadlineConnection):
        conn.answerDeadline = DeadlineConnection.answerDeadline


def _conninfo(url):
    """
    A libpq connection string from a C{postgresql://} URL.  Query
    parameters pass through (C{sslmode}, C{options}, ...).
    """
    parts = urlsplit(url)
    if not parts.path.strip("/") and not dict(parse_qsl(parts.query)).get("dbname"):
        raise ConfigurationError(f"PostgreSQL URL without a database name: {shownURL(url)!r}")
    return url


def _clientKeepalive(conninfo):
    """
    The L{CLIENT_KEEPALIVE} parameters C{conninfo} does not give itself.
    """
    try:
        given = psycopg.conninfo.conninfo_to_dict(conninfo)
    except psycopg.Error:
        # Unreadable: connecting says why (without the password).
        return {}
    return {name: value for name, value in CLIENT_KEEPALIVE.items() if name not in given}


def _targetSession(conninfo, readsOnly=False):
    """
    C{target_session_attrs=primary} where C{conninfo} (or the environment,
    or a service file) chooses no kind of server, or C{any} for
    C{readsOnly} (see L{PostgresEngine}): libpq then skips a
    standby, and a URL naming every server of a primary and its streaming
    replicas (C{postgresql://db1,db2/mail}) reaches whichever is the
    primary, before a failover and after.  Without it libpq takes the
    first server that answers: a standby (one still in recovery, or the
    old primary started again as one), where every write failed as a
    read-only transaction, and where the maildrop locks, advisory locks
    of the standby's own, excluded no session of the nodes on the
    primary: two POP3 sessions of one maildrop at once.

    C{primary} (libpq 14 on), not C{read-write}: a primary whose
    C{default_transaction_read_only} is set (while room is made on its
    disk) is still the one to read from.

    What only reads (C{mailgate db check}, C{user list}, a monitoring
    host's commands) takes the first server that answers (C{any}): a URL
    naming a standby alone works, and one naming every server reads from
    the primary while it answers (the one named first, or the one that
    took the last connection), so that C{user add} and then C{user list}
    agree, and from a standby while it does not.  Not C{prefer-standby}:
    a standby shows what it has replayed, which a command run just after
    a change would not find there yet.
    """
    try:
        given = psycopg.conninfo.conninfo_to_dict(conninfo)
    except psycopg.Error:
        return {}
    if "target_session_attrs" in given or "service" in given:
        return {}
    if "PGTARGETSESSIONATTRS" in os.environ or "PGSERVICE" in os.environ or psycopg.pq.version() < 140000:
        return {}
    return {"target_session_attrs": "any" if readsOnly else "primary"}


@implementer(IEngine)
class PostgresEngine:
    """
    How mailgate talks to PostgreSQL.

    @ivar url: the C{postgresql://} URL.
    @ivar readers: connections (and worker threads) for reads per node;
        writes have one more, batched (group commit).
    """

    name = "postgres"
    readers = 6
    ephemeral = False
    # REINDEX (CONCURRENTLY), or a table restored, while the nodes serve.
    damageRepairedWhileServing = True
    types = {
        "serial_pk": "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
        "bigint": "BIGINT",
        "blob": "BYTEA",
        "without_rowid": "",
        # Big-endian 64-bit pairs, as binary: decoded in C on arrival.
        "uid_size_pairs": "string_agg(int8send(uid) || int8send(size), '' ORDER BY uid)",
        "uidl_list": "string_agg(uidl, ' ' ORDER BY uid)",
    }

    def __init__(self, url, readsOnly=False):
        """
        @param readsOnly: whether everything done through this engine only
            reads (a command such as C{mailgate user list}): its
            connections take a standby too, where the others need the
            primary (L{_targetSession}).
        """
        self.url = url
        self.readsOnly = readsOnly
        self._conninfo = _conninfo(url)
        # Parameters every connection adds to the URL's.
        self._parameters = {**_clientKeepalive(self._conninfo), **_targetSession(self._conninfo, readsOnly)}
        # Several servers: the one that last took a connection first.
        self._hosts = hostOrderOf(self._conninfo)
        self._namespace = None

    def __repr__(self):
        """
        Where the URL connects, without its password (L{shownWhere}).
        """
        return shownWhere(self.url)

    def urlProblem(self):
        return parameterProblem(self._conninfo)

    def connect(self):
        problem = self.urlProblem()
        if problem is not None:
            # libpq would say it only as it tried to connect, as it says an
            # unreachable server: a start that exited 75 and was retried for
            # ever, where nothing but the URL can change.
            raise DatabaseRefused(f"cannot connect to PostgreSQL at {self!r}: {problem}")
        try:
            conn = self._addressedConnection(DeadlineConnection, autocommit=False)
        except psycopg.ProgrammingError as e:
            # psycopg could not read the connection string: nothing to retry.
            # Its words may quote the URL, or the password in it.
            reason = withoutPassword(oneLine(e), self.url)
            raise DatabaseRefused(f"cannot connect to PostgreSQL at {self!r}: {reason}") from None
        except _NotConnected as e:
            # No server tried (no name resolved): asking why would look
            # them up again.
            raise pgrefusal.connectionFailure(
                repr(self), self._conninfo, e.reason, pgconn=getattr(e.error, "pgconn", None),
                timedOut=e.error is None or isinstance(e.error, _CONNECTION_TIMEOUT), timeout=CONNECT_TIMEOUT,
            ) from e.error
        self._hosts.connected(conn.info.host, str(conn.info.port))
        self.onConnect(conn)
        return conn

    def _addressedConnection(self, connection, **kwargs):
        """
        A psycopg C{connection} (the class) to the first server that takes
        it, each server's name looked up by mailgate (as the reactor's
        connections are: L{pgresolve.addressedAttempts}, at most
        L{CONNECT_TIMEOUT} seconds), and psycopg given its address: its own
        lookup waited as long as the system's resolver did, 40 s in a test
        whose DNS server never answered.

        @raise _NotConnected: if no server took it.
        """
        info = psycopg.conninfo.make_conninfo(
            self._conninfo, connect_timeout=CONNECT_TIMEOUT, **self._parameters, **self._hosts.parameters()
        )
        reasons, error = [], None
        for attempt in pgresolve.addressedAttempts(info, CONNECT_TIMEOUT, lambda e: reasons.append(str(e))):
            try:
                return connection.connect(attempt, **kwargs)
            except psycopg.ProgrammingError:
                raise
            except psycopg.Error as e:
                reasons.append(oneLine(e))
                error = e
        raise _NotConnected("; ".join(reasons), error)

    def onConnect(self, conn):
        with conn.cursor() as cursor:
            for statement in sessionSettings(conn.info.server_version):
                cursor.execute(statement)
        conn.commit()

    def begin(self, conn, write):
        """
        Writes run in a transaction (psycopg opens it with the first
        statement).  Reads run in autocommit: under READ COMMITTED a
        transaction would give them no more consistency, only two more
        round trips.
        """
        if conn.autocommit == write:
            conn.autocommit = not write
        # Binary results: message chunks arrive as they are, not as hex text
        # twice their size.
        return _Cursor(conn.cursor(binary=True), self)

    def pipeline(self, conn):
        """
        PostgreSQL's pipeline mode: statements whose answers are not needed
        yet are sent without waiting for them.
        """
        return conn.pipeline()

    def commit(self, conn):
        if not conn.autocommit:
            try:
                conn.commit()
            finally:
                _boundAnswers(conn)

    def rollback(self, conn):
        try:
            if not conn.closed and not conn.autocommit:
                conn.rollback()
        finally:
            _boundAnswers(conn)

    def lockSchema(self, cursor):
        """
        Serialise schema upgrades of nodes starting at the same time.

        Without the statement timeout, for this transaction only: a
        migration rewriting a large table takes as long as it takes, and
        the nodes starting meanwhile wait for it here, rather than each
        giving up after C{STATEMENT_TIMEOUT_MS} (a temporary failure that
        comes back at every start).

        Then with a lock timeout, for the migration's statements: an ALTER
        TABLE waiting for a long transaction that has read the table
        (pg_dump's, a db copy's) would have every later statement on the
        table queue behind it, and the nodes still serving stop until that
        transaction ends.  Timed out (L{isLockTimeout}), the upgrade rolls
        back and tries again, letting the queue through in between.
        """
        cursor.execute("SET LOCAL statement_timeout = 0")
        # Nor a deadline for the answers, until the transaction ends.
        cursor.connection.answerDeadline = None
        cursor.execute("SELECT pg_advisory_xact_lock(?)", (_key("mailgate-schema"),))
        cursor.execute(f"SET LOCAL lock_timeout = {SCHEMA_LOCK_TIMEOUT_MS}")

    def tableNames(self, cursor):
        cursor.execute(
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'"
        )
        return sorted(name for (name,) in cursor.fetchall())

    def isLockTimeout(self, exc):
        """
        Whether C{exc} (or what it was raised from) is a statement giving
        up waiting for a lock (SQLSTATE 55P03, lock_not_available).
        """
        while exc is not None:
            if isinstance(exc, pgerrors.LockNotAvailable):
                return True
            exc = exc.__cause__
        return False

    def missingPrivileges(self, cursor, tables):
        """
        The privileges the current role lacks on mailgate's tables, as the
        search path finds them (as mailgate's statements do): a role that
        may read and write the tables, granted before a migration created
        another, has no privilege on that one until granted again.
        """
        names = sorted(tables)
        cursor.execute(
            "SELECT t.name, p.privilege, quote_ident(n.nspname), quote_ident(current_user) "
            "FROM unnest(?::text[]) WITH ORDINALITY AS t(name, i) "
            "JOIN pg_class c ON c.oid = to_regclass(quote_ident(t.name)) "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "CROSS JOIN unnest(?::text[]) WITH ORDINALITY AS p(privilege, j) "
            "WHERE NOT has_table_privilege(c.oid, p.privilege) "
            "ORDER BY t.i, p.j",
            (names, ["SELECT", "INSERT", "UPDATE", "DELETE"]),
        )
        missing = {}
        for name, privilege, schema, role in cursor.fetchall():
            if privilege in tables[name]:
                missing.setdefault((name, schema, role), []).append(privilege)
        return [(name, tuple(privileges), schema, role) for (name, schema, role), privileges in missing.items()]

    def lockDeliveries(self, cursor, pairs):
        """
        A transaction-level advisory lock per C{(user id, delivery key)}
        pair (L{deliveryLockKeys}), all in one statement, which needs no
        answer: in the delivery's pipeline it travels with the look-up
        that follows, which, a new statement under READ COMMITTED, sees
        the commit of a delivery of the same message it waited for.
        Released by the commit or the rollback.

        A group commit's deliveries run as one call take all their locks
        before any mailbox's counters: two nodes' batches cannot deadlock.
        A transaction that runs its deliveries as several calls (the
        careful pass after one failed, or deliveries with another write
        between them) takes a later call's locks holding the counters the
        earlier ones updated; against another node delivering one of
        those later messages to the same user at the same moment, that is
        a deadlock, which PostgreSQL breaks after C{deadlock_timeout}
        (one second) and the writer runs again (L{isRetryable}).
        """
        keys = deliveryLockKeys(pairs)
        if keys:
            # The array in its text form: psycopg's dumping of a list costs
            # 15 us more a statement than a string's.
            cursor.execute(_LOCK_DELIVERIES, ("{" + ",".join(map(str, keys)) + "}",))

    def lockMailboxes(self, cursor, userIds):
        """
        C{SELECT ... ORDER BY user_id FOR NO KEY UPDATE} (the lock an
        UPDATE that changes no key takes): the rows are locked as the sort
        returns them.  In a pipeline it needs no answer.  One row, or
        none, is left to the writes themselves: a transaction holding one
        row of the table cannot hold it against another it waits for there.
        """
        if len(userIds) > 1:
            cursor.execute(_LOCK_MAILBOXES, ("{" + ",".join(map(str, sorted(userIds))) + "}",))

    def dropBodyReferences(self, cursor, owner, count, bodyIds):
        """
        The UPDATE joined to a C{SELECT ... ORDER BY body_id FOR UPDATE}
        (the lock a DELETE takes, which the release may go on to) of the
        same rows, in one statement (fd7a830 ran the SELECT before, a
        round trip more for every QUIT that released two bodies or more).
        The SELECT's rows are locked as its sort returns them, in code
        point order (C{COLLATE "C"}), the order Python sorted the runs
        in, whatever plan the UPDATE gets: a WITH query that locks rows is
        never inlined (even C{NOT MATERIALIZED}), its rows are locked as
        it is read, in its order, and the UPDATE changes only rows it has
        returned, which this transaction holds already (on PostgreSQL 15:
        the hash join that reads it whole first, the nested loop that
        reads it row by row, the merge join that sorts it whole first).
        """
        cursor.execute(_DROP_BODY_REFERENCES, (owner, list(bodyIds), count))
        return cursor.fetchall()

    def administrativeRead(self, cursor, timeout):
        """
        A transaction of its own, C{READ ONLY}, with its own
        C{statement_timeout} and answer deadline (as far beyond it as a
        node's are beyond theirs, or none), for this transaction only: the
        commit or the rollback gives the connection back its own.  Reads
        otherwise run in autocommit, where C{SET TRANSACTION READ ONLY}
        only warned, each statement a transaction of its own that could
        write, under the node's 60 seconds.
        """
        conn = cursor.connection
        conn.autocommit = False
        cursor.execute("SET TRANSACTION READ ONLY")
        milliseconds = 0 if timeout is None else max(1, math.ceil(timeout * 1000))
        cursor.execute(f"SET LOCAL statement_timeout = {milliseconds}")
        conn.answerDeadline = None if timeout is None else timeout + ANSWER_DEADLINE - STATEMENT_TIMEOUT_MS / 1000

    def isStatementTimeout(self, exc):
        """
        SQLSTATE 57014 (query_canceled): C{statement_timeout}, or a cancel
        by hand (C{pg_cancel_backend}), which shares it; the caller tells
        them apart by the time taken.  An answer not given within the
        connection's deadline is a lost connection, not this.
        """
        return isinstance(exc, psycopg.errors.QueryCanceled)

    def isTransient(self, exc):
        """
        The connection or the server failing, a statement timing out or
        losing a deadlock, and a server that takes no writes for now
        (25006: a standby not yet promoted, or default_transaction_read_only
        set while room is made on its disk).  Class 53 (disk full, out of
        memory, too many connections) is an OperationalError.
        """
        return isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError) + _RETRYABLE) or (
            isinstance(exc, (psycopg.errors.QueryCanceled, pgerrors.ReadOnlySqlTransaction))
        )

    def isStorageFull(self, exc):
        """
        SQLSTATE 53100 (disk_full): the server could not extend a table's
        file or write a temporary one.  The rest of class 53 (out of
        memory, too many connections) is transient but not a full disk.
        """
        return isinstance(exc, pgerrors.DiskFull)

    def damage(self, exc):
        """
        SQLSTATE XX001 (data_corrupted) or XX002 (index_corrupted):
        PostgreSQL found a damaged page of a table or an index, which no
        retry repairs (C{REINDEX} does an index; a table is restored).
        """
        if not isinstance(exc, (pgerrors.DataCorrupted, pgerrors.IndexCorrupted)):
            return None
        said = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, pgerrors.IndexCorrupted):
            what, advice = "an index", "REINDEX it"
        else:
            what, advice = "a table", "restore it from its last backup (pg_amcheck says what else is damaged)"
        return (
            f"the PostgreSQL database {self!r} has a damaged page in {what} (SQLSTATE {exc.sqlstate}: {said}): "
            f"{advice}"
        )

    def isRetryable(self, exc):
        return isinstance(exc, _RETRYABLE)

    def isDisconnect(self, exc):
        """
        The connection itself failed (as opposed to one statement: a
        timeout or a lock wait reports the same error class but leaves the
        connection usable), or is no longer fit for writes: a server that
        took no writes (25006) when the session began.  A session keeps the
        C{default_transaction_read_only} its role and database had when it
        was made (C{ALTER ROLE|DATABASE ... SET}, the first aid while room
        is made on a disk), and lifting the setting changes nothing for it:
        such a write is given a fresh connection, as a lost one is, so the
        node takes writes again as soon as the database does, without a
        restart.  Nothing of a write that failed so took effect.
        """
        if isinstance(exc, (psycopg.InterfaceError, pgerrors.ReadOnlySqlTransaction)):
            return True
        if not isinstance(exc, psycopg.OperationalError) or isinstance(exc, _RETRYABLE):
            return False
        if isinstance(exc, pgerrors.PipelineAborted):
            # An OperationalError without a state, as a lost connection's
            # are, but it says a statement before it in the pipeline failed.
            return False
        state = getattr(exc, "sqlstate", None)
        return state is None or state.startswith("08") or state in ("57P01", "57P02", "57P03")

    def isBroken(self, conn):
        return conn.closed or conn.broken

    def isUniqueViolation(self, exc):
        return isinstance(exc, pgerrors.UniqueViolation)

    def resetIdentity(self, cursor, table, column, past=0):
        """
        After rows were inserted with explicit ids, make the identity
        column continue after the largest, and after C{past}.

        That takes UPDATE on the column's sequence, which a role that may
        only read and write the tables (the nodes' role of README's
        recipe) lacks: refused in one line saying whose URL to use, not
        as an internal error (exit 70) after the whole copy was written.

        @raise ConfigurationError: the role may not set the sequence.
        """
        cursor.execute(
            "SELECT current_user, s, has_sequence_privilege(s, 'UPDATE') "
            "FROM pg_get_serial_sequence(?, ?) AS s",
            (table, column),
        )
        role, sequence, allowed = cursor.fetchone()
        if not allowed:
            raise ConfigurationError(
                f"the database role {role} may not set where the ids of table {table} continue "
                f"(UPDATE on sequence {sequence}), which copying into the database needs: run "
                f"mailgate db copy with a --to URL of the schema's owner"
            )
        cursor.execute(
            f"SELECT setval(pg_get_serial_sequence('{table}', '{column}'), "
            f"greatest(coalesce((SELECT max({column}) FROM {table}), 0), ?) + 1, false)",
            (past,),
        )

    def withoutRowValues(self, exc):
        """
        A NOT NULL or CHECK violation's DETAIL quotes the whole row; the
        message keeps its first line (what failed, on which column).
        """
        diag = getattr(exc, "diag", None)
        detail = getattr(diag, "message_detail", None)
        if detail and detail.startswith("Failing row contains") and exc.args:
            exc.args = (f"{diag.message_primary} (the failing row's values are not shown)",)
        return exc

    def serverClock(self, cursor):
        """
        The server's wall clock as the statement runs (C{clock_timestamp},
        not the transaction's start).
        """
        cursor.execute("SELECT extract(epoch FROM clock_timestamp())")
        return float(cursor.fetchone()[0])

    def refuseReadOnly(self):
        """
        Nothing to do here: a role that may not write a table is found
        by L{missingPrivileges}, and a server that takes no writes (a
        standby) is a temporary failure, as in its documentation.
        """

    def claimServer(self):
        """
        Any number of nodes may share a PostgreSQL database, but each node
        needs connections that are each one database session of their own:
        refuse a pooler that shares its backends between connections
        (PgBouncer's C{pool_mode = transaction} or C{statement}).

        Behind one, the maildrop locks (session-level advisory locks) are
        held by whichever backend ran the statement, which another
        connection, another node's, may run its own on and find the lock
        its own (they are re-entrant): two POP3 sessions on one maildrop.
        The unlock may run on a third, leaving the maildrop locked; and the
        prepared statements of the lock and read connections are missing
        on the backends they did not run on.  Such a pooler gives a
        connection no backend between transactions, and PgBouncer gives
        the backend last let go to the next statement of any connection:
        two connections' statements, one after the other, are answered by
        one pid, or one connection's by two, where each has its own.

        A connection that fails here is left for the schema upgrade that
        follows to report.
        """
        refusal = self.sharedBackends()
        if refusal is not None:
            raise ConfigurationError(refusal)

    def sharedBackends(self):
        """
        Why the URL's connections cannot be mailgate's (a pooler in
        transaction or statement mode, see L{claimServer}), or C{None}.

        Asked in autocommit, without mailgate's settings (a transaction):
        a pooler in statement mode refuses transactions.  A connection
        that fails here says nothing: what connects next reports it.

        Each connection asks L{SHARING_ROUNDS} times, in turn: one round
        tells an idle pooler (it gives the backend last let go, the
        first connection's, to the second), but not a busy one, whose
        other clients take that backend in between often enough that the
        second connection got another and the first its own again (a real
        PgBouncer in transaction mode, six clients busy through it: 2 of
        50 checks passed, and the node served with maildrop locks that
        excluded nothing).  Not prepared (psycopg prepares a statement run
        five times): such a pooler loses prepared statements, an error
        this took for a connection that failed, and passed.
        """
        connections = []
        pids = ([], [])
        try:
            for _ in range(2):
                conn = self._addressedConnection(psycopg.Connection, autocommit=True, prepare_threshold=None)
                connections.append(conn)
                self._hosts.connected(conn.info.host, str(conn.info.port))
            for _ in range(SHARING_ROUNDS):
                for conn, seen in zip(connections, pids):
                    seen.append(conn.execute("SELECT pg_backend_pid()").fetchone()[0])
        except (psycopg.Error, _NotConnected):
            return None
        finally:
            for conn in connections:
                conn.close()
        first, second = (sorted(set(seen)) for seen in pids)
        if len(first) > 1 or len(second) > 1 or first == second:
            return (
                f"PostgreSQL at {self!r}: two connections were answered by one backend, or one connection by "
                f"several (pids {', '.join(map(str, first))}; {', '.join(map(str, second))}): a pooler in "
                "transaction or statement mode (PgBouncer's pool_mode = transaction) is in between. mailgate's "
                "maildrop locks are session-level advisory locks and its statements prepared on each connection, "
                "which need a backend of their own per connection: use pool_mode = session, or connect directly"
            )
        return None

    def releaseServer(self):
        pass

    def connectPrepared(self, statements):
        """
        A connection for the reactor to drive (L{AdvisoryLocks},
        L{ReactorMessageReads}), made in blocking mode (on a worker
        thread), with C{statements} prepared: a C{psycopg.pq.PGconn}.
        """
        pg = pgreactor.connect(
            self._conninfo, sessionSettings, statements, CONNECT_TIMEOUT, where=repr(self),
            parameters={**self._parameters, **self._hosts.parameters()},
        )
        self._hosts.connected(pg.host.decode("utf-8", "replace"), pg.port.decode("ascii", "replace"))
        if self._namespace is None:
            try:
                result = pgreactor.execute(pg, b"SELECT current_database(), current_schema()")
                database, schema = pgreactor.resultRows(result)[0]
            except BaseException:
                pg.finish()
                raise
            self._namespace = f"{database.decode()}:{schema.decode()}"
        return pg

    def namespace(self):
        """
        What distinguishes this mailgate's locks from another's on the same
        server: the database and schema it works in.  Known once a lock
        connection has been made.
        """
        if self._namespace is None:
            raise RuntimeError("the lock namespace is known once a lock connection is made")
        return self._namespace

    def makeMessageReads(self, database):
        """
        Message reads on connections of their own driven by the database's
        reactor, or as read transactions for a database without one.
        """
        if database.reactor is None:
            return reads.ThreadedMessageReads(database)
        return ReactorMessageReads(self, database.reactor, database.metrics)

    def makeLocks(self, database):
        """
        Advisory locks on connections of their own, driven by the
        database's reactor, or in blocking mode for a database without one.
        """
        if database.reactor is None:
            return AdvisoryLocks.blocking(self)
        return AdvisoryLocks(self, database.reactor, database.metrics)


def _measure(d, metrics, operation, reactor):
    """
    Tell C{metrics} how long the statement C{d} waits for takes, from now,
    as C{operation}, and whether it failed; C{d}'s result is left as it is.
    Measured on the monotonic clock (L{elapsedClock}): the reactor's is the
    wall clock, and a step of it made a statement take an hour, or less
    than nothing.
    """
    now = elapsedClock(reactor)
    started = now()

    def measured(result):
        if isinstance(result, Failure):
            metrics.databaseError()
        metrics.databaseOperation(operation, now() - started)
        return result

    d.addBoth(measured)


def _key(text):
    """
    A signed 64-bit advisory lock key for C{text}.
    """
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big", signed=True)


# The class of the advisory locks of deliveries (lockDeliveries): the
# two-int4 form, pg_advisory_xact_lock(class, key).  mailgate's other
# advisory locks (the maildrop locks and their write keys, the schema
# lock) take one bigint key (_key), and PostgreSQL keeps the two forms
# apart (pg_locks.objsubid is 1 for a bigint key, 2 for a pair): a
# delivery's lock is never one of those, whatever the values.  "mgdk".
DELIVERY_LOCK_CLASS = 0x6D67646B
# Taken in the array's order, which is the keys' sorted order: two
# transactions locking some of the same keys take them in the same order,
# so neither holds one the other waits for while it waits for one the
# other holds.  count() makes it one row whatever the number of keys.
# Each key is mixed (XOR) with a hash of the database and schema the
# statement runs in, computed once by the server: advisory locks are the
# whole database's, and user ids start at 1 in every schema, so another
# mailgate in another schema of the same database (a second deployment,
# or the test suite's schemas side by side) delivering the same message
# to its user of the same id waited for this one's commit (a suite run
# failed on a lock timeout so).  Every node of one mailgate works in the
# same schema, so its own deliveries of one message still meet here.
_LOCK_DELIVERIES = (
    f"SELECT count(pg_advisory_xact_lock({DELIVERY_LOCK_CLASS}, "
    "k # (SELECT hashtext(current_database() || ':' || current_schema())))) FROM unnest(?::int4[]) AS k"
)


# Rows locked in the order of their ids (lockMailboxes).
_LOCK_MAILBOXES = "SELECT user_id FROM mailboxes WHERE user_id = ANY(?::int8[]) ORDER BY user_id FOR NO KEY UPDATE"
# References dropped, the rows locked in the order of their ids
# (dropBodyReferences).
_DROP_BODY_REFERENCES = (
    "WITH locked AS ("
    "SELECT owner_id, body_id FROM bodies WHERE owner_id = ? AND body_id = ANY(?::text[]) "
    'ORDER BY body_id COLLATE "C" FOR UPDATE) '
    "UPDATE bodies b SET refcount = b.refcount - ? FROM locked l "
    "WHERE b.owner_id = l.owner_id AND b.body_id = l.body_id RETURNING b.body_id, b.refcount"
)


def deliveryLockKeys(pairs):
    """
    The advisory lock keys of C{(user id, delivery key)} pairs: 32 bits
    of a digest of each, distinct, sorted (the order they are taken in;
    the statement mixes in the schema's, L{_LOCK_DELIVERIES}).  Two pairs
    sharing a key (one chance in four billion for two given pairs) only
    make their deliveries wait for one another, as the same message to
    the same user does.
    """
    keys = set()
    for userId, deliveryKey in pairs:
        digest = hashlib.blake2b(digest_size=4)
        digest.update(userId.to_bytes(8, "big", signed=True))
        digest.update(bytes(deliveryKey))
        keys.add(int.from_bytes(digest.digest(), "big", signed=True))
    return sorted(keys)


# The maildrop lock ($1), and once it is taken a wait for any transaction
# that holds the maildrop's write key ($2): a session's deletions whose
# lock was lost while they were being written (see WriteGuard).  The
# snapshot, read by the next statement, then sees them whole.  CASE, whose
# branches are evaluated in order, so a refused lock does not wait.
_LOCK = Statement(
    "mailgate_lock",
    "SELECT CASE WHEN pg_try_advisory_lock($1) THEN pg_advisory_xact_lock_shared($2)::text = '' ELSE false END",
    [INT8, INT8],
)
_UNLOCK = Statement("mailgate_unlock", "SELECT pg_advisory_unlock($1)", [INT8])
# What undoes a L{_LOCK} that failed after it took the lock (its wait ended
# by lock_timeout, statement_timeout or a cancel): a session-level lock
# outlives the error of the statement that took it.  Only if this
# connection holds it, so that nothing else is unlocked and the server
# logs no warning.
_UNDO_LOCK = Statement(
    "mailgate_undo_lock",
    "SELECT CASE WHEN EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() "
    "AND granted AND classid = (($1 >> 32) & 4294967295)::oid AND objid = ($1 & 4294967295)::oid "
    "AND objsubid = 1) THEN pg_advisory_unlock($1) ELSE false END",
    [INT8],
)
# The snapshot (see mailgate.store.snapshot), read on the lock's connection.
_SNAPSHOT = Statement("mailgate_snapshot", snapshotQuery(PostgresEngine), [INT8], binary=True)
_LOCK_STATEMENTS = (_LOCK, _UNDO_LOCK, _UNLOCK, _SNAPSHOT)


class WriteGuard:
    """
    What a session's deletions run first, in their own transaction on a
    worker's connection, so that they commit only while this node holds
    the maildrop's lock (see L{IMaildropLocks.writeGuard}).

    A check made on the lock's connection before the write (what this
    replaced) left a window: the lock connection lost between the check
    and the commit let another node take the lock and read a snapshot
    still listing the messages being removed.  Here the write transaction
    first takes the maildrop's write key, an advisory lock held to its
    end, and then checks that the lock connection's backend still holds
    the lock.  A node that takes the lock afterwards waits for the write
    key before reading its snapshot (L{_LOCK}): it sees the deletions
    committed, or none of them.

    The backend is known by its pid and by its identity lock (see
    L{AdvisoryLocks}), a random pair of keys that only it holds: the
    server hands a dead backend's pid to a new one in time, and a new
    backend of another node's that took this maildrop's lock under that
    pid must not pass for the lock connection that died.

    @ivar writeKey: the maildrop's write key.
    @ivar lockKey: the maildrop's lock key.
    @ivar pid: the backend pid of the connection holding the lock.
    @ivar identity: the two keys of that connection's identity lock.
    """

    def __init__(self, writeKey, lockKey, pid, identity):
        self.writeKey = writeKey
        self.lockKey = lockKey
        self.pid = pid
        self.identity = identity

    def __call__(self, cursor):
        cursor.execute("SELECT pg_advisory_xact_lock(?)", (self.writeKey,))
        first, second = self.identity
        # One look at pg_locks (each reading of it copies the server's lock
        # table): both locks, held by that backend.
        cursor.execute(
            "SELECT count(DISTINCT objsubid) = 2 FROM pg_locks WHERE locktype = 'advisory' AND pid = ? AND granted "
            "AND ((classid = ?::oid AND objid = ?::oid AND objsubid = 1) "
            "OR (classid = ?::oid AND objid = ?::oid AND objsubid = 2))",
            (self.pid, (self.lockKey >> 32) & 0xFFFFFFFF, self.lockKey & 0xFFFFFFFF, first, second),
        )
        return bool(cursor.fetchone()[0])


def takeIdentityLock(pg):
    """
    Have the new connection C{pg} take a session-level advisory lock on a
    random pair of keys, which it holds until it ends: its identity, told
    apart from any other backend's, now or later under the same pid.  The
    two-key form lives apart from the one-key locks mailgate keys by
    maildrop (C{objsubid} 2 in C{pg_locks}, against 1).

    The backend's pid is asked of the backend (C{pg_backend_pid()}), not
    taken from libpq (C{PQbackendPID}): that is the pid of the key the
    server sent at connection, and a pooler in between (PgBouncer) sends
    its clients a key of its own, so the guard of every session's
    deletions looked for the lock under a pid no backend has and every
    QUIT that deleted answered -ERR [SYS/TEMP], removing nothing.

    @return: the pair of keys (each below 2**31, the same as an C{int4}
        and as the C{oid} C{pg_locks} shows it) and the backend's pid.
    """
    for _ in range(8):
        identity = (secrets.randbelow(2**31), secrets.randbelow(2**31))
        result = pgreactor.execute(pg, b"SELECT pg_try_advisory_lock(%d, %d), pg_backend_pid()" % identity)
        [(taken, pid)] = pgreactor.resultRows(result)
        if taken == b"t":
            return identity, int(pid)
    raise TemporaryFailure("cannot take an identity lock for a maildrop lock connection")


class _Connector:
    """
    Makes the connections the reactor drives, on a worker thread of its own
    started at the first (libpq resolves names and negotiates TLS with
    blocking calls).  Called by a L{ReactorConnection} whenever it needs a
    connection: a L{Deferred} of a C{pq.PGconn}.
    """

    def __init__(self, reactor, name, connect):
        self._threads = WorkerThreads(reactor, 1, name)
        self._connect = connect
        self._started = False

    def __call__(self):
        if not self._started:
            self._started = True
            self._threads.start()
        return self._threads.submit(self._connect)

    def stop(self):
        if self._started:
            self._started = False
            self._threads.stop()


class _Slot:
    """
    One reactor-driven connection, and how many operations are queued on
    it or under way (counted on the reactor thread), so that work goes to
    the least busy.  A maildrop's lock is taken, checked and released
    through the same slot (chosen when it is taken, see L{AdvisoryLocks}),
    because an advisory lock belongs to a database session; a message read
    (L{ReactorMessageReads}) goes to whichever is least busy then.
    """

    def __init__(self, connection):
        self.connection = connection
        self.busy = 0


@implementer(IMaildropLocks)
class AdvisoryLocks:
    """
    Maildrop locks that hold across every node sharing the database:
    session-level advisory locks, on a few connections per node dedicated
    to them (L{slots}), driven by the reactor (L{ReactorConnection}).

    Sessions on the same node are told apart in memory first (advisory
    locks are re-entrant within one PostgreSQL session).

    A maildrop's lock is taken on the least busy slot, the first one when
    all are idle: a lightly loaded node keeps using one connection, whose
    PostgreSQL backend is then awake and warm (a session costs three trips to
    it), while under load, or behind the snapshot of a huge maildrop, the
    work spreads over the others.  Every later operation on that lock (the
    unlock) and any acquire of the same maildrop issued before
    the unlock has completed go to the same slot, so that they run in the
    order they were issued, on the connection that holds the lock.

    @cvar slots: lock connections per node.
    @cvar seenByEveryNode: these locks are the whole truth of which
        maildrops a session holds, on every node (a killed node's go with
        its process): the writes made under one need not look for
        sessions in the session registry too, which shows a dead node's
        sessions until its heartbeat is old.
    """

    slots = 4
    seenByEveryNode = True
    log = Logger()

    def __init__(self, engine, reactor, metrics=None):
        """
        @param engine: the L{PostgresEngine}.
        @param reactor: the reactor that drives the lock connections and
            hands back the connections made on a worker thread.
        @param metrics: the L{mailgate.metrics.Metrics} told how long each
            statement took (C{lockMaildrop}, C{readSnapshot},
            C{unlockMaildrop}) or that it failed: a POP3
            login's trips to the database, as those on worker threads are.
        """
        self._connector = _Connector(reactor, "mailgate-lock-connect", self._connectNow)
        self._setUp(
            engine,
            [
                ReactorConnection(reactor, self._connector, f"maildrop lock connection {i}")
                for i in range(self.slots)
            ],
        )
        self._metrics = metrics
        self._reactor = reactor
        for slot in self._slots:
            slot.connection.onLost = lambda generation, slot=slot: self._connectionLost(slot, generation)

    @classmethod
    def blocking(cls, engine):
        """
        The same locks on one connection in blocking mode, for a
        synchronous store (the C{mailgate} command, tests): every
        L{Deferred} has fired on return.
        """
        locks = cls.__new__(cls)
        locks._connector = None
        locks._reactor = None
        locks._setUp(engine, [BlockingConnection(locks._connectNow)])
        return locks

    def _setUp(self, engine, connections):
        self._engine = engine
        self._poolerChecked = False
        self._metrics = None
        self._slots = [_Slot(connection) for connection in connections]
        # Each lock connection's identity lock (WriteGuard) and its
        # backend's pid, by its libpq connection: set on the thread that
        # connects, before the connection is used; forgotten with the
        # connection.
        self._identities = weakref.WeakKeyDictionary()
        # User id to the lock connection's generation (its count of
        # connections made) when the lock was granted, None while asked.
        self._held = {}
        # User id to [slot, operations in flight] while its lock is held or
        # an operation on it is under way.
        self._routes = {}
        # User id to what to call if its lock is lost (whenLost).
        self._watchers = {}

    # Connecting

    def _connectNow(self):
        if self._connector is None and not self._poolerChecked:
            # The mailgate command's locks (a server's are checked at its
            # start, L{PostgresEngine.claimServer}): behind a pooler in
            # transaction mode its lock stayed with a pooled backend after
            # it exited, and the next command failed with "prepared
            # statement mailgate_lock already exists", exit 75.
            refusal = self._engine.sharedBackends()
            if refusal is not None:
                raise DatabaseRefused(refusal)
            self._poolerChecked = True
        pg = self._engine.connectPrepared(_LOCK_STATEMENTS)
        try:
            self._identities[pg] = takeIdentityLock(pg)
        except BaseException:
            pg.finish()
            raise
        return pg

    def _key(self, userId):
        # The namespace is known once a connection has been made, which is
        # before any statement is sent.
        return _key(f"{self._engine.namespace()}:maildrop:{userId}")

    def _writeKey(self, userId):
        return _key(f"{self._engine.namespace()}:maildrop-write:{userId}")

    @staticmethod
    def heldAmong(cursor, userIds):
        """
        Which of C{userIds} have their maildrop's lock held by a backend
        now, read on a worker's C{cursor} (one look at C{pg_locks}): the
        session registry shows a killed node's sessions until its heartbeat
        is old, the lock went with its process (C{mailgate who}, C{kick}).
        The namespace is read here: the C{mailgate} command that asks may
        have made no lock connection.
        """
        userIds = set(userIds)
        if not userIds:
            return set()
        cursor.execute("SELECT current_database(), current_schema()")
        database, schema = cursor.fetchone()
        keys = {_key(f"{database}:{schema}:maildrop:{userId}"): userId for userId in userIds}
        cursor.execute(
            "SELECT classid::int8, objid::int8 FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND objsubid = 1 AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        held = set()
        for classid, objid in cursor.fetchall():
            key = int.from_bytes(((classid << 32) | objid).to_bytes(8, "big"), "big", signed=True)
            if key in keys:
                held.add(keys[key])
        return held

    def _keyParams(self, userId):
        return lambda: [str(self._key(userId)).encode("ascii")]

    def _lockParams(self, userId):
        return lambda: [str(self._key(userId)).encode("ascii"), str(self._writeKey(userId)).encode("ascii")]

    # Routing

    def _route(self, userId):
        route = self._routes.get(userId)
        if route is None:
            # min() keeps the first of equals: the first idle slot.
            route = self._routes[userId] = [min(self._slots, key=lambda slot: slot.busy), 0]
        return route

    def _settle(self, userId):
        """
        Forget which slot a maildrop uses once nothing ties it there.
        """
        route = self._routes.get(userId)
        if route is not None and route[1] == 0 and userId not in self._held:
            del self._routes[userId]

    def _run(self, userId, statement, params, operation):
        """
        Run C{statement} on the connection that C{userId}'s lock uses, and
        tell the metrics how long it took (as C{operation}) or that it
        failed.
        """
        route = self._route(userId)
        slot = route[0]
        route[1] += 1
        slot.busy += 1

        def finished(result):
            slot.busy -= 1
            route[1] -= 1
            return result

        def failed(failure):
            if failure.check(psycopg.Error):
                raise TemporaryFailure(f"maildrop lock: {oneLine(failure.value)}") from failure.value
            return failure

        d = slot.connection.execute(statement, params)
        d.addBoth(finished).addErrback(failed)
        if self._metrics is not None:
            _measure(d, self._metrics, operation, self._reactor)
        return d

    # IMaildropLocks

    def acquire(self, userId):
        """
        Take the lock.

        @return: a L{Deferred} of the user id, failing with
            L{MaildropInUse} if the lock is taken.
        """
        if userId in self._held:
            return defer.fail(MaildropInUse(userId))
        self._held[userId] = None
        d = self._run(userId, _LOCK, self._lockParams(userId), "lockMaildrop")
        connection = self._routes[userId][0].connection

        def done(rows):
            if rows[0][0] != b"t":
                del self._held[userId]
                self._settle(userId)
                raise MaildropInUse(userId)
            self._held[userId] = connection.connections
            return userId

        def failed(failure):
            if not connection.connected:
                # Lost, and the lock with the connection if it was taken.
                forget()
                return failure
            # The statement failed on a live connection, maybe once it had
            # taken the lock, in its wait for a write (see _LOCK): undone,
            # before any later operation on this maildrop (the same slot).
            undo = self._run(userId, _UNDO_LOCK, self._keyParams(userId), "unlockMaildrop")
            forget()

            def notUndone(why):
                self.log.warn("undoing a failed maildrop lock: {reason}", reason=why.value, event="lock.undo_failed")

            undo.addCallbacks(lambda _: None, notUndone).addCallback(lambda _: self._settle(userId))
            return undo.addCallback(lambda _: failure)

        def forget():
            self._held.pop(userId, None)
            self._settle(userId)

        return d.addCallbacks(done, failed)

    def acquireAndSnapshot(self, userId, passwordHash, address=None, peer=None, again=True):
        """
        Take the lock and, with it held, read the maildrop's snapshot on
        the same connection: a POP3 login costs two short trips.  See
        L{IMaildropLocks.acquireAndSnapshot}.

        If the lock connection turns out lost while they run (the server
        ended its backend, or restarted, and the node had not noticed yet),
        they run once more on a fresh connection: the lock, if taken, went
        with the old one, so nothing is held twice.

        @param again: whether to run once more after such a loss.
        """
        # The connection the lock goes to (acquire's own choice: a new
        # maildrop's route is chosen once, here), as it was before.
        connection = self._route(userId)[0].connection
        wasConnected = connection.connected
        generation = connection.connections
        d = self.acquire(userId)

        def snapshot(_):
            read = self._run(userId, _SNAPSHOT, [str(userId).encode("ascii")], "readSnapshot")
            return read.addCallback(unpackSnapshot, userId, passwordHash, address, peer).addErrback(giveBack)

        def giveBack(failure):
            self.release(userId)
            return failure

        def lostConnection(failure):
            failure.trap(TemporaryFailure)
            if not again or connection.connections == generation and not (wasConnected and not connection.connected):
                # Not a connection lost under the login: a statement that
                # failed on a live one, or no connection could be made (the
                # database away, or a standby alone answering), which the
                # lock connection tried afresh already; once more doubled
                # the attempts, and every login while the database was
                # away logged that its connection was "lost".
                return failure
            self.log.info(
                "maildrop lock connection lost during a login ({reason}); trying again on a fresh one",
                reason=failure.value,
                event="lock.retried",
            )
            return self.acquireAndSnapshot(userId, passwordHash, address, peer, again=False)

        return d.addCallback(snapshot).addErrback(lostConnection)

    def whenLost(self, userId, lost):
        """
        Call C{lost()} once, should the lock held on C{userId}'s maildrop
        be lost: its connection ended (the backend terminated, the server
        restarted, the network gone), which the reactor sees at once even
        while the connection is idle.  Another node may take the lock from
        then on and change the maildrop under the session holding it,
        whose deletions its guard refuses for good: that session is to
        end.  Forgotten at L{release}.  A lock known lost already is told
        so at the reactor's next turn.
        """
        if userId not in self._held:
            return
        if self.writeGuard(userId) is None:
            if self._reactor is not None:
                self._reactor.callLater(0, lost)
            return
        self._watchers[userId] = lost

    def _connectionLost(self, slot, generation):
        """
        The connection of C{slot} that was its C{generation}th was lost,
        and with it the locks it held: their watchers are told
        (L{whenLost}).  A lock still being taken on it is left to its
        statement's failure (L{acquireAndSnapshot} takes it again).
        """
        lost = [
            userId for userId, held in self._held.items()
            if held == generation and userId in self._watchers and self._routes[userId][0] is slot
        ]
        for userId in lost:
            self.log.warn(
                "maildrop lock of user {userId} lost with its connection; ending its session",
                userId=userId,
                event="lock.lost",
            )
            watcher = self._watchers.pop(userId)
            try:
                watcher()
            except Exception:
                self.log.failure("ending the session of a lost maildrop lock", event="lock.lost")

    def release(self, userId):
        """
        Unlock; the L{Deferred} fires once the database has released the
        lock, so another node can take it from then on.
        """
        self._watchers.pop(userId, None)
        if userId not in self._held:
            return defer.succeed(None)
        # Forget it here at once: the unlock is queued on the slot's
        # connection ahead of any later acquire of this maildrop on this node.
        del self._held[userId]
        d = self._run(userId, _UNLOCK, self._keyParams(userId), "unlockMaildrop")

        def failed(failure):
            # The connection is gone, and the lock with it.
            self.log.warn("releasing maildrop lock: {reason}", reason=failure.value, event="lock.release_failed")

        def settled(result):
            self._settle(userId)
            return result

        return d.addCallbacks(lambda _: None, failed).addBoth(settled)

    def writeGuard(self, userId):
        """
        A L{WriteGuard} for this node's lock on C{userId}'s maildrop, or
        C{None} if the lock is not held or its connection is known lost
        (another node may have taken the lock since).
        """
        generation = self._held.get(userId)
        if generation is None:
            return None
        connection = self._routes[userId][0].connection
        if not connection.connected or connection.connections != generation:
            return None
        taken = self._identities.get(connection.pgconn)
        if taken is None:
            return None
        identity, pid = taken
        return WriteGuard(self._writeKey(userId), self._key(userId), pid, identity)

    def close(self):
        self._held.clear()
        self._routes.clear()
        self._watchers.clear()
        closing = [slot.connection.close() for slot in self._slots]
        if self._connector is not None:
            self._connector.stop()
        return defer.DeferredList(closing, consumeErrors=True).addBoth(lambda _: None)





# What a POP3 session reads (see mailgate.store.reads), as prepared
# statements whose answers come in binary: the octets as they are stored.
def _openStatement(name, text, order):
    return Statement(
        name,
        text.format(user="$1", inUids="= ANY($2)", budget="$3", first="$4", order=order),
        [INT8, INT8_ARRAY, INT8, INT8],
        binary=True,
    )


# Forward, and from the newest back: the read-ahead's budget is summed in
# the order the messages are read.
_OPEN = _openStatement("mailgate_open", reads.OPEN, "ASC")
_OPEN_BACK = _openStatement("mailgate_open_back", reads.OPEN, "DESC")
_OPEN_HEADERS = _openStatement("mailgate_open_headers", reads.OPEN_HEADERS, "ASC")
_OPEN_HEADERS_BACK = _openStatement("mailgate_open_headers_back", reads.OPEN_HEADERS, "DESC")
_CHUNKS = Statement(
    "mailgate_chunks",
    reads.CHUNKS.format(owner="$1", body="$2", low="$3", high="$4"),
    [INT8, TEXT, INT4, INT4],
    binary=True,
)
_READ_STATEMENTS = (_OPEN, _OPEN_BACK, _OPEN_HEADERS, _OPEN_HEADERS_BACK, _CHUNKS)


def _integer(value):
    return None if value is None else int.from_bytes(value, "big", signed=True)


def _text(value):
    return str(value).encode("ascii")


def _openedRow(row):
    uid, owner, bodyId, size, headerSize, dotLines, dotAt, data, prefix = row
    return (
        _integer(uid),
        _integer(owner),
        bodyId.decode("utf-8"),
        _integer(size),
        _integer(headerSize),
        _integer(dotLines),
        dotAt,
        data,
        prefix,
    )


@implementer(IMessageReads)
class ReactorMessageReads:
    """
    POP3 message reads on a few connections of their own (L{connections}),
    driven by the reactor like the lock connections: a read is a write to a
    socket and an answer decoded by libpq in C when it arrives, without
    the two hand-overs between threads and the driver's Python per
    statement that a read on a worker thread costs.  A fetch of a whole
    maildrop makes a trip per few messages, and per 512 KiB of a large
    one, so this is most of what a session costs the node besides its own
    protocol work.

    A read goes to the least busy connection.  Reads change nothing, so
    one whose connection was lost under it is asked once more (of a new
    connection), as a read transaction on a worker thread would be; one
    that found no connection and could not make one fails at once.

    @cvar connections: read connections per node.
    """

    connections = 4

    def __init__(self, engine, reactor, metrics=None):
        self._engine = engine
        self._metrics = metrics
        self._reactor = reactor
        self._connector = _Connector(
            reactor, "mailgate-read-connect", lambda: engine.connectPrepared(_READ_STATEMENTS)
        )
        self._slots = [
            _Slot(ReactorConnection(reactor, self._connector, f"message read connection {i}"))
            for i in range(self.connections)
        ]

    def _execute(self, statement, params, retry=True):
        slot = min(self._slots, key=lambda slot: slot.busy)
        slot.busy += 1
        # Only a read sent on a live connection is asked again: one that
        # waited for a connection that could not be made would wait for the
        # connect timeout twice.
        live = slot.connection.connected
        d = slot.connection.execute(statement, params)

        def finished(result):
            slot.busy -= 1
            return result

        def failed(failure):
            # Lost: the connection was (the statement's own error may be the
            # first to say so: the server's "terminating connection").
            lost = not slot.connection.connected
            if failure.check(psycopg.Error):
                lost = lost or self._engine.isDisconnect(failure.value)
            elif not failure.check(TemporaryFailure):
                lost = False
            if retry and live and lost:
                return self._execute(statement, params, retry=False)
            if failure.check(psycopg.Error):
                raise TemporaryFailure(f"reading messages: {oneLine(failure.value)}") from failure.value
            return failure

        return d.addBoth(finished).addErrback(failed)

    def _run(self, operation, statement, params, decode):
        """
        Run C{statement}, C{decode} its rows, and tell the metrics how long
        it took (as C{operation}, the name a read on a worker thread has)
        or that it failed.
        """
        metrics = self._metrics
        if metrics is None:
            return self._execute(statement, params).addCallback(decode)
        now = elapsedClock(self._reactor)
        started = now()

        def failed(failure):
            metrics.databaseError()
            return failure

        def measured(result):
            metrics.databaseOperation(operation, now() - started)
            return result

        return self._execute(statement, params).addCallbacks(decode, failed).addBoth(measured)

    def openMessages(self, userId, uids, headerOnly, budget):
        params = [
            _text(userId), ("{" + ",".join(map(str, uids)) + "}").encode("ascii"), _text(budget), _text(uids[0]),
        ]
        back = reads.descending(uids)
        if headerOnly:
            statement = _OPEN_HEADERS_BACK if back else _OPEN_HEADERS
        else:
            statement = _OPEN_BACK if back else _OPEN

        def decode(rows):
            return reads.openedMessages([_openedRow(row) for row in rows], uids, headerOnly)

        return self._run("openMessages", statement, params, decode)

    def readChunks(self, owner, bodyId, seq, count):
        params = [_text(owner), bodyId.encode("utf-8"), _text(seq), _text(seq + count)]

        def decode(rows):
            return reads.chunksInOrder([(_integer(got), data) for got, data in rows], bodyId, seq)

        return self._run("readChunks", _CHUNKS, params, decode)

    def close(self):
        closing = [slot.connection.close() for slot in self._slots]
        self._connector.stop()
        return defer.DeferredList(closing, consumeErrors=True).addBoth(lambda _: None)
