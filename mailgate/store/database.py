# -*- test-case-name: tests.test_database -*-
"""
Running SQL off the reactor thread.

L{Database} wraps an L{adbapi.ConnectionPool}.  Reads run as one transaction
each.  Writes go through a group-commit queue: writes that arrive while a
commit is in flight are run together, each inside its own savepoint, and made
durable by a single commit.  Under load this turns N fsyncs into one without
weakening the rule that a write's L{Deferred} fires only once it is durable.

L{SynchronousDatabase} runs the same interactions inline on one connection.
The admin command uses it (there is no reactor to hand work to), and so do
protocol tests, which then run against a real database file without threads.
"""

from collections import deque

from twisted.enterprise import adbapi
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailgate.errors import TemporaryFailure

MAX_BATCH = 256


def _translate(engine, exc):
    """
    Turn a driver error the engine deems transient into L{TemporaryFailure}.
    """
    if isinstance(exc, TemporaryFailure):
        return exc
    if engine.isTransient(exc):
        failure = TemporaryFailure(f"database unavailable: {exc}")
        failure.__cause__ = exc
        return failure
    return exc


def runTransaction(engine, conn, function, args, kwargs, write):
    """
    Run C{function(cursor, *args, **kwargs)} in one transaction on C{conn}
    and commit it.  Runs on a worker thread.
    """
    try:
        cursor = engine.begin(conn, write)
        try:
            result = function(cursor, *args, **kwargs)
        except BaseException:
            engine.rollback(conn)
            raise
        engine.commit(conn)
        return result
    except Exception as e:
        translated = _translate(engine, e)
        if translated is e:
            raise
        raise translated from e


def runBatch(engine, conn, batch):
    """
    Run several write interactions in one transaction, each isolated by a
    savepoint so that one failing does not undo the others, then commit once.

    @return: a list of C{(succeeded, resultOrFailure)}, one per interaction.
    @raise Exception: when the transaction as a whole failed (begin or
        commit); then none of the interactions took effect.
    """
    if len(batch) == 1:
        function, args, kwargs = batch[0]
        try:
            return [(True, runTransaction(engine, conn, function, args, kwargs, True))]
        except Exception:
            return [(False, Failure())]
    results = []
    try:
        cursor = engine.begin(conn, True)
        for function, args, kwargs in batch:
            cursor.execute("SAVEPOINT mg_batch")
            try:
                result = function(cursor, *args, **kwargs)
            except Exception as e:
                cursor.execute("ROLLBACK TO SAVEPOINT mg_batch")
                cursor.execute("RELEASE SAVEPOINT mg_batch")
                translated = _translate(engine, e)
                results.append((False, Failure(translated)))
            else:
                cursor.execute("RELEASE SAVEPOINT mg_batch")
                results.append((True, result))
        engine.commit(conn)
    except Exception as e:
        try:
            engine.rollback(conn)
        except Exception:
            pass
        translated = _translate(engine, e)
        if translated is e:
            raise
        raise translated from e
    return results


class Database:
    """
    SQL interactions on a thread pool, with group commit for writes.

    @ivar engine: the dialect: how to connect, begin and classify errors.
    """

    log = Logger()

    def __init__(self, engine, reactor=None):
        if reactor is None:
            from twisted.internet import reactor
        self.engine = engine
        self._reactor = reactor
        module, args, kwargs = engine.poolArguments()
        self._pool = adbapi.ConnectionPool(
            module,
            *args,
            cp_openfun=engine.onConnect,
            cp_reactor=reactor,
            cp_noisy=False,
            **kwargs,
        )
        self._queue = deque()
        self._writing = False

    def runInteraction(self, function, *args, **kwargs):
        """
        Run C{function(cursor, *args, **kwargs)} as one read transaction on a
        worker thread.
        """
        return self._pool.runWithConnection(self._read, function, args, kwargs)

    def _read(self, conn, function, args, kwargs):
        return runTransaction(self.engine, _raw(conn), function, args, kwargs, False)

    def runWrite(self, function, *args, **kwargs):
        """
        Run C{function(cursor, *args, **kwargs)} in a write transaction.  The
        L{Deferred} fires once the change is durably committed.
        """
        d = defer.Deferred()
        self._queue.append((function, args, kwargs, d))
        if not self._writing:
            self._flush()
        return d

    def _flush(self):
        batch = []
        while self._queue and len(batch) < MAX_BATCH:
            batch.append(self._queue.popleft())
        self._writing = True
        work = [(f, a, k) for f, a, k, _ in batch]
        d = self._pool.runWithConnection(self._write, work)

        def delivered(results):
            for (_, _, _, waiting), (ok, value) in zip(batch, results):
                if ok:
                    waiting.callback(value)
                else:
                    waiting.errback(value)

        def failed(failure):
            for _, _, _, waiting in batch:
                waiting.errback(failure)

        def next(_):
            self._writing = False
            if self._queue:
                self._flush()

        d.addCallbacks(delivered, failed)
        d.addBoth(next)

    def _write(self, conn, batch):
        return runBatch(self.engine, _raw(conn), batch)

    def close(self):
        """
        Close the pool's connections.
        """
        self._pool.close()
        return defer.succeed(None)


def _raw(conn):
    """
    adbapi hands out a wrapper; our transactions want the DB-API connection.
    """
    return getattr(conn, "_connection", conn)


class SynchronousDatabase:
    """
    The same interactions as L{Database}, run inline on one connection.

    Every method returns an already-fired L{Deferred}.
    """

    def __init__(self, engine):
        self.engine = engine
        self._conn = engine.connect()

    def runInteraction(self, function, *args, **kwargs):
        return defer.maybeDeferred(
            runTransaction, self.engine, self._conn, function, args, kwargs, False
        )

    def runWrite(self, function, *args, **kwargs):
        return defer.maybeDeferred(
            runTransaction, self.engine, self._conn, function, args, kwargs, True
        )

    def close(self):
        self._conn.close()
        return defer.succeed(None)
