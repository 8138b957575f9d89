# -*- test-case-name: tests.test_store -*-
"""
Running SQL off the reactor thread.

L{Database} owns two bounded thread pools: readers, and a single writer.
Each worker thread keeps its own connection (as C{twisted.enterprise.adbapi}
does) and replaces it when it breaks, so the gateway serves again as soon as
a lost database returns, without a restart.  Reads run as one transaction
each, on the readers, so they never queue behind a commit's fsync.  Writes
go through a group-commit queue on the writer: writes that arrive while a
commit is in flight are run together in one transaction (each in a
savepoint of its own only if one of them fails), and made durable by a
single commit.  Under load this turns N fsyncs into one without weakening
the rule that a write's L{Deferred} fires only once it is durable.  A write
declared as a L{BatchableWrite} goes further: consecutive calls of it in a
batch are made as one call, and it may run in the engine's pipeline.

L{SynchronousDatabase} runs the same interactions inline on one connection.
The admin command uses it (there is no reactor to hand work to), and so do
protocol tests, which then run against a real database without threads.

Failures the engine classifies as transient (the server is down, a lock
timed out, a deadlock) surface as L{TemporaryFailure}; interactions that
failed before changing anything (a read, or a write that deadlocked) are
retried a few times first.
"""

import contextlib
import queue
import threading
from collections import deque
from time import monotonic

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgate.errors import (
    CommitUncertain,
    DatabaseDamaged,
    MaildropLockLost,
    MailgateError,
    StorageFull,
    TemporaryFailure,
    errorKind,
)
from mailgate.interfaces import IBatchableWrite, IDatabase
from mailgate.plural import counted

MAX_BATCH = 256
RETRIES = 3
#: seconds a read may wait for a free reader thread (and its connection)
#: before it fails as a temporary failure
QUEUE_TIMEOUT = 30.0

#: damage reasons a database whose damage is not kept remembers having said
DAMAGE_SAID = 32


def _translate(engine, exc):
    """
    Turn a driver error the engine deems transient into L{TemporaryFailure}
    (L{StorageFull} when it says the database has no room left), and one
    that says the database is damaged into L{DatabaseDamaged}.
    """
    if isinstance(exc, TemporaryFailure):
        return exc
    exc = engine.withoutRowValues(exc)
    damage = engine.damage(exc)
    if damage is not None:
        failure = DatabaseDamaged(damage)
        failure.__cause__ = exc
        return failure
    if engine.isTransient(exc):
        if engine.isStorageFull(exc):
            failure = StorageFull(f"database storage full: {exc}".strip())
        else:
            failure = TemporaryFailure(f"database unavailable: {exc}".strip())
        failure.__cause__ = exc
        return failure
    return exc


def operationName(function):
    """
    The name an interaction is measured under (C{mailgate_database_seconds}):
    its function's name without the leading underscore, from the fixed set
    of interactions the code defines.
    """
    return getattr(function, "__name__", "other").lstrip("_") or "other"


def _isDatabaseError(exc):
    """
    Whether a failed interaction counts as a database error: anything but
    mailgate's own verdicts (an existing user, a maildrop in use), which
    are answers, not failures.  A temporary failure is one.
    """
    if isinstance(exc, MaildropLockLost):
        # Lost on the lock's connection; the write's own was fine.
        return False
    return isinstance(exc, TemporaryFailure) or not isinstance(exc, MailgateError)


def _raiseTranslated(engine, exc):
    translated = _translate(engine, exc)
    if translated is exc:
        raise exc
    raise translated from exc


class _LostBeforeCommit(Exception):
    """
    A write transaction's connection was lost before its COMMIT was sent:
    nothing of it can have taken effect, so it may run again on a fresh
    connection (most often the connection had died while idle, a database
    restarted since: its first statement is what finds out).

    @ivar error: the driver's error.
    """

    def __init__(self, error):
        super().__init__(str(error))
        self.error = error


def _lostBeforeCommit(engine, exc):
    """
    Raise L{_LostBeforeCommit} if C{exc}, raised before a write's COMMIT
    was sent, is the connection's loss.
    """
    if engine.isDisconnect(exc.__cause__ or exc):
        raise _LostBeforeCommit(exc) from exc


def _raiseInterruption(exc):
    """
    Raise the C{KeyboardInterrupt} that C{exc} was raised while handling,
    if any: the driver's clean-up after a Ctrl-C can fail in its own way
    (psycopg's pipeline, left busy in the middle of an C{executemany}:
    "cannot exit pipeline mode while busy"), and that error, taken for
    the database's, had C{mailgate db copy} say "temporary failure, try
    again: database unavailable" (exit 75), and could have had a write
    run again, the interrupt lost.
    """
    seen = set()
    cause = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            raise cause
        seen.add(id(cause))
        cause = cause.__context__


def runTransaction(engine, conn, function, args, kwargs, write):
    """
    Run C{function(cursor, *args, **kwargs)} in one transaction on C{conn}
    and commit it.  Runs on a worker thread.

    @raise _LostBeforeCommit: (a write) the connection was lost before
        the COMMIT was sent.
    """
    try:
        try:
            cursor = engine.begin(conn, write)
            try:
                if write:
                    engine.lockMailboxes(cursor, _mailboxesOf(cursor, [(function, args, kwargs)]))
                result = function(cursor, *args, **kwargs)
            except BaseException:
                _rollbackQuietly(engine, conn)
                raise
        except Exception as e:
            _raiseInterruption(e)
            if write:
                _lostBeforeCommit(engine, e)
            raise
        _commit(engine, conn)
        return result
    except (_LostBeforeCommit, CommitUncertain):
        raise
    except Exception as e:
        _raiseInterruption(e)
        _raiseTranslated(engine, e)


@implementer(IBatchableWrite)
class BatchableWrite:
    """
    A write interaction that the group-commit writer may batch (see
    L{IBatchableWrite}).

    @param run: the interaction, a function of a cursor.
    @param together: runs several calls as one: C{together(cursor,
        [(args, kwargs), ...])} returns their results in order.
    @param name: the operation's name in metrics (the function's name by
        default).
    @param mailboxes: which users' C{mailboxes} rows a call updates (see
        L{updatesMailboxes}), or C{None}.
    @ivar pipelined: whether it may run in the engine's pipeline.
    """

    def __init__(self, run, together, pipelined=False, name=None, mailboxes=None):
        self._run = run
        self._together = together
        self.pipelined = pipelined
        if mailboxes is not None:
            self.mailboxes = mailboxes
        # Measured (mailgate_database_seconds) under this name.
        self.__name__ = name or getattr(run, "__name__", "other")

    def __call__(self, cursor, *args, **kwargs):
        return self._run(cursor, *args, **kwargs)

    def together(self, cursor, calls):
        return self._together(cursor, calls)

    def __repr__(self):
        return f"<BatchableWrite {getattr(self._run, '__name__', self._run)}>"


def updatesMailboxes(of):
    """
    Declare which users' C{mailboxes} rows (their counters, use and last
    login) a write updates: C{of(cursor, *args, **kwargs)}, called with the
    write's own arguments inside its transaction, returns their user ids.
    The group-commit writer locks the rows of a whole batch up front, in
    one order (L{mailgate.interfaces.IEngine.lockMailboxes}): a batch runs
    several writes, each locking its users' rows as it goes, so two nodes'
    batches (a QUIT's removal for Alice and a delivery to Bob on one, a
    QUIT for Bob and a delivery to Alice on the other) would otherwise
    each hold a row the other waits for.
    """

    def declare(function):
        function.mailboxes = of
        return function

    return declare


def _mailboxesOf(cursor, batch):
    """
    The user ids whose C{mailboxes} rows the writes of C{batch} declare
    (L{updatesMailboxes}) they update.
    """
    userIds = set()
    for function, args, kwargs in batch:
        declared = getattr(function, "mailboxes", None)
        if declared is not None:
            userIds.update(declared(cursor, *args, **kwargs))
    return userIds


class _ItemFailed(Exception):
    """
    One interaction of an optimistic batch failed; the batch is run again
    with savepoints.
    """


def runBatch(engine, conn, batch):
    """
    Run several write interactions in one transaction and commit once.

    Optimistically first: all of them straight through, which costs no more
    round trips than the interactions themselves, and consecutive calls of
    a function that can run together (deliveries) made as one call.  If one
    fails, that transaction is rolled back and the batch runs again with
    each interaction isolated by a savepoint, so that one failing does not
    undo the others.

    @return: a list of C{(succeeded, resultOrFailure)}, one per interaction.
    @raise Exception: when the transaction as a whole failed (begin or
        commit); then none of the interactions took effect.
    """
    try:
        return _runBatch(engine, conn, batch, savepoints=False)
    except _ItemFailed:
        pass
    if len(batch) > 1:
        return _runBatch(engine, conn, batch, savepoints=True)
    function, args, kwargs = batch[0]
    try:
        return [(True, runTransaction(engine, conn, function, args, kwargs, True))]
    except Exception as e:
        if engine.isRetryable(e.__cause__ or e) or engine.isDisconnect(e.__cause__ or e):
            raise
        return [(False, Failure())]


def _runBatch(engine, conn, batch, savepoints):
    results = []
    pipelined = not savepoints and all(IBatchableWrite.providedBy(f) and f.pipelined for f, _, _ in batch)
    try:
        cursor = engine.begin(conn, True)
    except Exception as e:
        _rollbackQuietly(engine, conn)
        _lostBeforeCommit(engine, e)
        raise
    committing = False
    try:
        with engine.pipeline(conn) if pipelined else _nothing():
            engine.lockMailboxes(cursor, _mailboxesOf(cursor, batch))
            results = _runItems(engine, cursor, batch, savepoints)
        committing = True
        _commit(engine, conn)
    except (_ItemFailed, CommitUncertain):
        _rollbackQuietly(engine, conn)
        raise
    except Exception as e:
        _rollbackQuietly(engine, conn)
        if not committing:
            _lostBeforeCommit(engine, e)
        if not savepoints and not (engine.isRetryable(e) or engine.isDisconnect(e)):
            # A failure the optimistic pass cannot attribute (a pipelined
            # statement's error arrives later): let the careful pass decide.
            raise _ItemFailed() from e
        raise
    return results


def _commit(engine, conn):
    """
    Commit on C{conn}; a connection lost meanwhile leaves the outcome
    unknown.

    @raise CommitUncertain: the connection was lost while the COMMIT was
        on its way.
    """
    try:
        engine.commit(conn)
    except Exception as e:
        if engine.isDisconnect(e):
            raise CommitUncertain(f"database connection lost while committing: {e}".strip()) from e
        raise


def _rollbackQuietly(engine, conn):
    try:
        engine.rollback(conn)
    except Exception:
        pass


@contextlib.contextmanager
def _nothing():
    yield


def _together(batch):
    """
    Split a batch into runs of interactions to be made as one call:
    consecutive calls of the same L{BatchableWrite}.  Everything else runs
    alone.
    """
    run = []
    for item in batch:
        function = item[0]
        if run and function is run[0][0] and IBatchableWrite.providedBy(function):
            run.append(item)
            continue
        if run:
            yield run
        run = [item]
    if run:
        yield run


def _runTogether(engine, cursor, batch):
    """
    The optimistic pass: every interaction straight through, consecutive
    calls of a function that can run together as one call.
    """
    results = []
    for run in _together(batch):
        function = run[0][0]
        try:
            if len(run) == 1:
                _, args, kwargs = run[0]
                done = [function(cursor, *args, **kwargs)]
            else:
                done = function.together(cursor, [(args, kwargs) for _, args, kwargs in run])
        except Exception as e:
            if engine.isRetryable(e) or engine.isDisconnect(e):
                raise
            raise _ItemFailed() from e
        results.extend((True, result) for result in done)
    return results


def _runItems(engine, cursor, batch, savepoints):
    if not savepoints:
        return _runTogether(engine, cursor, batch)
    # The careful pass: each interaction alone, inside a savepoint, so that
    # one failing undoes only itself.
    results = []
    for function, args, kwargs in batch:
        cursor.execute("SAVEPOINT mg_batch")
        try:
            result = function(cursor, *args, **kwargs)
        except Exception as e:
            if engine.isRetryable(e) or engine.isDisconnect(e):
                raise
            cursor.execute("ROLLBACK TO SAVEPOINT mg_batch")
            cursor.execute("RELEASE SAVEPOINT mg_batch")
            results.append((False, Failure(_translate(engine, e))))
        else:
            cursor.execute("RELEASE SAVEPOINT mg_batch")
            results.append((True, result))
    return results


class WorkerThreads:
    """
    A fixed set of threads running jobs, each result handed back to the
    reactor thread.  Leaner than L{twisted.python.threadpool} (no per-job
    context copying), which matters when every POP3 command and every
    delivery makes a trip.

    A job goes to the thread that became idle last.  A shared queue would
    wake the one idle longest, so that on a lightly loaded server every
    trip would find a cold thread and, behind it, a cold database
    connection (a PostgreSQL backend asleep, an SQLite page cache that
    others have moved on from); this way a few threads do the work while
    load is light, and the others join in as it grows.

    @param maxWait: seconds a job may wait for a thread before it fails
        with L{TemporaryFailure} without running (see L{_sweep}); C{None}
        for no limit.
    """

    def __init__(self, reactor, count, name, maxWait=None):
        self._reactor = reactor
        self._count = count
        self._name = name
        self._maxWait = maxWait
        self._lock = threading.Lock()
        # Mailboxes of idle threads, the most recently idle last; jobs that
        # found no idle thread, each with the time it came.
        self._idle = []
        self._backlog = deque()
        self._mailboxes = []
        self._threads = []
        self._sweepCall = None

    def start(self):
        self._stopping = False
        self._mailboxes = []
        with self._lock:
            self._idle = []
        for i in range(self._count):
            mailbox = queue.SimpleQueue()
            thread = threading.Thread(target=self._work, args=(mailbox,), name=f"{self._name}-{i}", daemon=True)
            self._mailboxes.append(mailbox)
            self._threads.append(thread)
        with self._lock:
            # The first thread is the first to be given work.
            self._idle.extend(reversed(self._mailboxes))
        for thread in self._threads:
            thread.start()

    def submit(self, function, *args):
        """
        Run C{function(*args)} on one of the threads; a L{Deferred} of its
        result, fired in the reactor thread.
        """
        d = defer.Deferred()
        job = (function, args, d)
        with self._lock:
            if not self._idle:
                self._backlog.append((job, monotonic()))
                if self._maxWait and self._sweepCall is None:
                    self._sweepCall = self._reactor.callLater(self._maxWait, self._sweep)
                return d
            mailbox = self._idle.pop()
        mailbox.put(job)
        return d

    def _sweep(self):
        """
        Fail the jobs that waited L{maxWait} seconds for a thread (on the
        reactor thread): when the database is stuck (a table locked by a
        migration, a server that answers no more), clients are told
        C{-ERR [SYS/TEMP]} or C{451} within that time, rather than each
        waiting behind every job before it.
        """
        self._sweepCall = None
        now = monotonic()
        expired = []
        with self._lock:
            backlog = self._backlog
            while backlog and now - backlog[0][1] >= self._maxWait:
                expired.append(backlog.popleft()[0])
            oldest = backlog[0][1] if backlog else None
        if oldest is not None:
            self._sweepCall = self._reactor.callLater(max(0.0, oldest + self._maxWait - now), self._sweep)
        for _, _, d in expired:
            within = counted(self._maxWait, "second", spec="g")
            d.errback(TemporaryFailure(f"database busy: no connection free within {within}"))

    def _work(self, mailbox):
        while True:
            job = mailbox.get()
            while job is not None:
                function, args, d = job
                try:
                    result = function(*args)
                    ok = True
                except BaseException:
                    result = Failure()
                    result.cleanFailure()
                    ok = False
                # Idle (or on the next job waiting) before the result is
                # handed back: the job a caller submits as soon as it has
                # this result then finds this thread, and its warm
                # connection, even when this thread is descheduled just
                # after handing the result back.
                with self._lock:
                    if self._backlog:
                        following = self._backlog.popleft()[0]
                    else:
                        self._idle.append(mailbox)
                        following = None
                self._reactor.callFromThread(self._fire, d, ok, result)
                job = following
            if self._stopping:
                return

    @staticmethod
    def _fire(d, ok, result):
        if ok:
            d.callback(result)
        else:
            d.errback(result)

    _stopping = False

    def stop(self, timeout=10):
        """
        Ask every thread to end and wait for them, C{timeout} seconds at
        most in all, not each: this runs on the reactor thread, and with
        the database hung (every thread stuck in a statement) a wait per
        thread held the reactor, and the process's stop, for a minute and
        more.  A thread still stuck is left to end with the process (the
        threads are daemons).
        """
        self._stopping = True
        if self._sweepCall is not None and self._sweepCall.active():
            self._sweepCall.cancel()
        self._sweepCall = None
        for mailbox in self._mailboxes:
            mailbox.put(None)
        current = threading.current_thread()
        deadline = monotonic() + timeout
        for thread in self._threads:
            if thread is not current:
                thread.join(max(0.0, deadline - monotonic()))
        self._threads = []


#: seconds a closing L{Database} waits, in all, for its worker threads
#: (writer and readers) to end the statements they are in; threads still
#: stuck then (a hung database) are left to end with the process
THREADS_STOP_TIMEOUT = 10.0


@implementer(IDatabase)
class Database:
    """
    SQL interactions on bounded worker threads, with group commit for writes.

    @ivar engine: the dialect (an L{mailgate.interfaces.IEngine}): how to
        connect, begin and classify errors.
    @ivar reactor: the reactor results are handed back to.
    @ivar metrics: a L{mailgate.metrics.Metrics} told the time of every
        operation, failures and group-commit sizes (from the worker
        threads), or C{None}.
    """

    log = Logger()
    metrics = None
    #: why the latest write transaction failed, or C{None} once one has
    #: committed since (what the health check reports: reads may still
    #: work on a database that takes no writes, a full disk say)
    writeFailure = None
    #: what kind of failure that is, without its text (L{errorKind}: what
    #: the health check answers with; the text may name hosts, users and
    #: paths, and goes to the log)
    writeFailureKind = None
    #: the L{DatabaseDamaged} this process first met, or C{None}: kept
    #: until it stops (the file is restored with the server stopped), where
    #: the engine's damage is not repaired while it serves
    damage = None
    #: what C{database.damaged} lines said already, where damage is not
    #: kept (at most L{DAMAGE_SAID} of them: then said afresh)
    _damageSaid = frozenset()

    def __init__(self, engine, reactor, metrics=None):
        self.engine = engine
        self.metrics = metrics
        self.reactor = reactor
        self._writer = WorkerThreads(reactor, 1, f"mailgate-db-{engine.name}-writer")
        readers = engine.readers
        # Without readers of its own (an in-memory SQLite database exists in
        # one connection only), reads run on the writer's connection.
        self._readers = (
            WorkerThreads(reactor, readers, f"mailgate-db-{engine.name}-reader", maxWait=QUEUE_TIMEOUT)
            if readers else self._writer
        )
        self._local = threading.local()
        self._connections = []
        self._lock = threading.Lock()
        # Writes waiting for the next group commit, and whether one is
        # running; both used on the reactor thread only.
        self._pending = deque()
        self._writing = False
        self._closed = False
        self._started = False
        reactor.callWhenRunning(self._start)

    def _start(self):
        if not self._closed and not self._started:
            self._started = True
            self._writer.start()
            if self._readers is not self._writer:
                self._readers.start()
            self._shutdownTrigger = self.reactor.addSystemEventTrigger(
                "during", "shutdown", self._stopThreads
            )

    # -- worker-thread side ---------------------------------------------

    def _connection(self):
        conn = getattr(self._local, "connection", None)
        if conn is not None and self.engine.isBroken(conn):
            self._forget(conn)
            conn = None
        if conn is None:
            try:
                conn = self.engine.connect()
            except Exception as e:
                _raiseTranslated(self.engine, e)
            self._local.connection = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def _forget(self, conn):
        self._local.connection = None
        with self._lock:
            if conn in self._connections:
                self._connections.remove(conn)
        try:
            conn.close()
        except Exception:
            pass

    def _attempt(self, work, retryDisconnects):
        """
        Run C{work(connection)}, retrying on a fresh connection when the old
        one turned out dead (if C{retryDisconnects}) and after deadlocks.
        """
        for attempt in range(RETRIES):
            conn = self._connection()
            try:
                return work(conn)
            except _LostBeforeCommit as e:
                # Nothing of the write took effect: again, on a fresh
                # connection (whatever retryDisconnects says).
                self._forget(conn)
                if attempt < RETRIES - 1:
                    continue
                _raiseTranslated(self.engine, e.error)
            except Exception as e:
                cause = e.__cause__ or e
                last = attempt == RETRIES - 1
                if self.engine.isDisconnect(cause) or self.engine.isBroken(conn):
                    self._forget(conn)
                    if retryDisconnects and not last:
                        continue
                elif self.engine.isRetryable(cause) and not last:
                    continue
                _raiseTranslated(self.engine, e)

    def _read(self, function, args, kwargs):
        metrics = self.metrics
        if metrics is None:
            return self._attempt(
                lambda conn: runTransaction(self.engine, conn, function, args, kwargs, False),
                retryDisconnects=True,
            )
        started = monotonic()
        try:
            return self._attempt(
                lambda conn: runTransaction(self.engine, conn, function, args, kwargs, False),
                retryDisconnects=True,
            )
        except Exception as e:
            if _isDatabaseError(e):
                metrics.databaseError()
            raise
        finally:
            metrics.databaseOperation(operationName(function), monotonic() - started)

    def _write(self, batch):
        # A write that lost its connection may or may not have committed:
        # it is not retried; its caller reports a temporary failure.
        metrics = self.metrics
        if metrics is None:
            return self._attempt(lambda conn: runBatch(self.engine, conn, batch), retryDisconnects=False)
        started = monotonic()
        try:
            results = self._attempt(lambda conn: runBatch(self.engine, conn, batch), retryDisconnects=False)
        except Exception:
            # The transaction failed as a whole: every write in it failed.
            for _ in batch:
                metrics.databaseError()
            raise
        finally:
            # Each write waited for the whole commit it shared.
            seconds = monotonic() - started
            for function, _, _ in batch:
                metrics.databaseOperation(operationName(function), seconds)
        metrics.groupCommit(len(batch))
        for ok, value in results:
            if not ok and _isDatabaseError(value.value):
                metrics.databaseError()
        return results

    # -- reactor side ----------------------------------------------------

    def _run(self, pool, function, *args):
        if self._closed:
            return defer.fail(TemporaryFailure("the database is closed"))
        if not self._started:
            self._start()
        return pool.submit(function, *args)

    def runInteraction(self, function, *args, **kwargs):
        """
        Run C{function(cursor, *args, **kwargs)} as one read transaction on a
        reader thread.
        """
        return self._run(self._readers, self._read, function, args, kwargs).addErrback(self._damageFound)

    def runWrite(self, function, *args, **kwargs):
        """
        Run C{function(cursor, *args, **kwargs)} in a write transaction.  The
        L{Deferred} fires once the change is durably committed.
        """
        d = defer.Deferred()
        self._pending.append((function, args, kwargs, d))
        if not self._writing:
            self._flush()
        return d.addErrback(self._damageFound)

    def _damageFound(self, failure):
        """
        Say once, as an error (C{database.damaged}), that the database is
        damaged, the first time an interaction meets the damage, and keep
        it (L{damage}) for the health check where the engine is repaired
        with the server stopped (SQLite: restored); on PostgreSQL, repaired
        while the nodes serve (C{REINDEX}), each distinct damage is said
        once and nothing is kept.  The line to alert on and act on.  Each
        session it fails says so in a warning of
        its own, as for any temporary failure; the first line does not
        get lost among them, nor is it repeated at every delivery the
        damage refuses.
        """
        if not failure.check(DatabaseDamaged) or self.damage is not None:
            return failure
        reason = failure.getErrorMessage()
        if self.engine.damageRepairedWhileServing:
            # PostgreSQL's: REINDEX repairs an index while the nodes serve,
            # and every node shares the damage.  Kept, the health check of
            # each node that met it failed until it was restarted, the
            # damage repaired or not: a load balancer had no node left for
            # any user.  Said again where it is other damage.
            if reason not in self._damageSaid:
                said = self._damageSaid if len(self._damageSaid) < DAMAGE_SAID else frozenset()
                self._damageSaid = said | {reason}
                self.log.error("{reason}", reason=reason, event="database.damaged")
            return failure
        self.damage = failure.value
        self.log.error("{reason}", reason=reason, event="database.damaged")
        return failure

    def _flush(self):
        # The next batch is taken here, on the reactor thread, once the
        # previous commit's results have been handed out: the writes that
        # arrived meanwhile (more of them than if the writer went straight
        # on) share one commit.
        batch = []
        while self._pending and len(batch) < MAX_BATCH:
            batch.append(self._pending.popleft())
        self._writing = True
        work = [(f, a, k) for f, a, k, _ in batch]
        d = self._run(self._writer, self._write, work)

        def delivered(results):
            if any(ok for ok, _ in results):
                self._writesWork()
            else:
                self._writesFailed([value for _, value in results])
            for (_, _, _, waiting), (ok, value) in zip(batch, results):
                if ok:
                    waiting.callback(value)
                else:
                    waiting.errback(value)

        def failed(failure):
            self._writesFailed([failure])
            for _, _, _, waiting in batch:
                waiting.errback(failure)

        def next(_):
            self._writing = False
            if self._pending:
                self._flush()

        d.addCallbacks(delivered, failed)
        d.addBoth(next)

    def _writesFailed(self, failures):
        """
        A write transaction failed: remember why (L{writeFailure}), and
        when writes worked until now, say so once, as an error, and in
        C{mailgate_database_writes_failing}.  Every refused message or
        POP3 QUIT has a line of its own; this one is the line to alert on
        (a full disk fails every delivery, and the log may be on it).
        """
        # mailgate's own verdicts (a quota, an unknown user) are answers:
        # only the database's failures count.  Nor does damage: it fails
        # the writes that touch it while others commit, which said "writes
        # fail" and "work again" by turns, an error line each time; it is
        # said once, and kept, as damage (L{_damageFound}).
        for failure in failures:
            if _isDatabaseError(failure.value) and not failure.check(DatabaseDamaged):
                full = failure.check(StorageFull) is not None
                if self.writeFailure is None:
                    self.log.error(
                        "database writes fail" + (" (its storage is full)" if full else "")
                        + ": {reason}; mail is refused with 4xx until a write commits",
                        reason=failure.getErrorMessage(),
                        storageFull=full,
                        event="database.writes_failed",
                    )
                self.writeFailure = failure.getErrorMessage()
                self.writeFailureKind = errorKind(failure.value)
                if self.metrics is not None:
                    self.metrics.writesFailing("storage_full" if full else "other")
                return

    def _writesWork(self):
        """
        A write transaction committed: writes work (again).
        """
        if self.writeFailure is not None:
            self.writeFailure = None
            self.writeFailureKind = None
            self.log.info("database writes work again", event="database.writes_recovered")
            if self.metrics is not None:
                self.metrics.writesFailing(None)

    def _stopThreads(self):
        if self._started:
            self._started = False
            # One bound for the writer and the readers together, as each
            # pool's is for its threads: this runs on the reactor thread,
            # and with the database hung (the writer stuck in a heartbeat,
            # a reader in a health check) a bound per pool held the
            # process's stop twice as long, 20 s after the services' own
            # 10 s (STOP_TIMEOUT in mailgate.service).
            deadline = monotonic() + THREADS_STOP_TIMEOUT
            self._writer.stop(THREADS_STOP_TIMEOUT)
            if self._readers is not self._writer:
                self._readers.stop(max(0.0, deadline - monotonic()))
        with self._lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            try:
                conn.close()
            except Exception:
                pass

    def close(self):
        """
        Stop the worker threads and close their connections.
        """
        if not self._closed:
            self._closed = True
            trigger = getattr(self, "_shutdownTrigger", None)
            if trigger is not None:
                try:
                    self.reactor.removeSystemEventTrigger(trigger)
                except (ValueError, KeyError):
                    pass
            self._stopThreads()
        return defer.succeed(None)


@implementer(IDatabase)
class SynchronousDatabase:
    """
    The same interactions as L{Database}, run inline on one connection.

    Every method returns an already-fired L{Deferred}.

    @ivar connection: the DB-API connection, for work that spans
        transactions of its own (schema upgrades, copying a database) or
        runs outside the store (L{runTransaction}).
    @ivar reactor: C{None}: nothing here waits for a reactor.
    """

    reactor = None
    # Inline: a failed write fails its caller at once.
    writeFailure = None
    writeFailureKind = None
    damage = None

    def __init__(self, engine):
        self.engine = engine
        try:
            self.connection = engine.connect()
        except Exception as e:
            _raiseTranslated(engine, e)

    def _transaction(self, function, args, kwargs, write):
        for attempt in range(RETRIES):
            try:
                return runTransaction(self.engine, self.connection, function, args, kwargs, write)
            except _LostBeforeCommit as e:
                # Nothing of the write took effect; the one connection is gone,
                # so this command cannot go on: a temporary failure (75 from
                # the mailgate command), as a lost read is.
                _raiseTranslated(self.engine, e.error)
            except Exception as e:
                # A deadlock lost (or a serialization failure): the whole
                # transaction was rolled back, and runs again, as the
                # server's L{Database} runs it; a command that deadlocked
                # with a node's transaction used to exit 75 at once
                # ("database unavailable: deadlock detected").
                if attempt == RETRIES - 1 or not self.engine.isRetryable(e.__cause__ or e):
                    raise

    def run(self, function, *args, write=False):
        """
        Run C{function(cursor, *args)} in one transaction, now, and return
        its result (or raise its exception).
        """
        return self._transaction(function, args, {}, write)

    def runInteraction(self, function, *args, **kwargs):
        return defer.maybeDeferred(self._transaction, function, args, kwargs, False)

    def runWrite(self, function, *args, **kwargs):
        return defer.maybeDeferred(self._transaction, function, args, kwargs, True)

    def close(self):
        self.connection.close()
        return defer.succeed(None)
