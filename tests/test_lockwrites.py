"""
The maildrop lock of a shared PostgreSQL database and the writes it
guards (L{mailgate.store.postgres.WriteGuard}), on real connections: what
a node's lock statement leaves behind when its wait for a write fails, and
the writes besides a QUIT's that remove messages under the lock.
"""

from urllib.parse import quote

import psycopg
import pytest
from twisted.python.failure import Failure

from mailgate.errors import TemporaryFailure
from mailgate.store import engineFromURL
from mailgate.store.postgres import AdvisoryLocks, _key
from mailgate.testing import addUser, memoryStore, resultOf
from iterated import IteratedReactor
from test_locks import USERS, lockHolders, waitingForAnAdvisoryLock


def withLockTimeout(url, milliseconds):
    """
    C{url} (whose C{options} set the test's schema) with a C{lock_timeout}
    as well, as an administrator may set one for the role or in the URL.
    """
    return url.replace("options=", "options=" + quote(f"-c lock_timeout={milliseconds} "), 1)


def writeKey(url, userId):
    """
    The advisory key a QUIT's deletions of C{userId}'s maildrop hold.
    """
    with psycopg.connect(url, autocommit=True) as conn:
        namespace = ":".join(conn.execute("SELECT current_database(), current_schema()").fetchone())
    return _key(f"{namespace}:maildrop-write:{userId}")


def test_aLoginWhoseWaitForADeletionFailsLeavesNoLockBehind(postgresURL):
    """
    A login's lock statement takes the maildrop lock, then waits for
    another session's deletions still being written (a commit waiting for
    a synchronous standby, say).  When the server ends that wait with an
    error (here the role's lock_timeout; statement_timeout or a cancel do
    the same), the login fails as a temporary failure, and the lock is not
    left held: before, the session-level lock the statement had taken
    outlived its error, held by the node's lock connection until that
    closed, and every node answered every later login of the user
    "[IN-USE]".
    """
    store = memoryStore(postgresURL)
    addUser(store, USERS[0], "pw")
    alice = resultOf(store.findUser(USERS[0])).userId
    store.close()
    reactor = IteratedReactor()
    locks = AdvisoryLocks(engineFromURL(withLockTimeout(postgresURL, 200)), reactor)
    other = AdvisoryLocks(engineFromURL(postgresURL), reactor)
    writer = psycopg.connect(postgresURL)
    try:
        # A QUIT's deletions being written: their transaction holds the key.
        writer.execute("SELECT pg_advisory_xact_lock(%s)", (writeKey(postgresURL, alice),))
        failed = reactor.wait(locks.acquire(alice))
        assert isinstance(failed, Failure) and failed.check(TemporaryFailure), failed
        writer.commit()
        assert lockHolders(postgresURL, [alice]) == []
        assert locks._routes == {} and locks._held == {}
        # Another node's login gets the maildrop, and after it this node's.
        assert reactor.wait(other.acquire(alice)) == alice
        reactor.resultOf(other.release(alice))
        assert reactor.wait(locks.acquire(alice)) == alice
        reactor.resultOf(locks.release(alice))
        assert lockHolders(postgresURL, [alice]) == []
    finally:
        writer.close()
        reactor.resultOf(other.close())
        reactor.resultOf(locks.close())
        reactor.close()


@pytest.mark.parametrize(
    "removal",
    [
        pytest.param(lambda store: store.expireMessages(), id="retention"),
        pytest.param(lambda store: store.expungeMessages(USERS[0], olderThanDays=1), id="mailbox-expunge"),
    ],
)
def test_aNodeTakingALostLockWaitsForTheRemovalsMadeUnderIt(postgresURL, removal):
    """
    The retention task removes a user's expired messages under the
    maildrop lock, like a QUIT, and so does C{mailgate mailbox expunge};
    the lock connection dies while they are written (held up here by a
    row lock, as a busy server does).  Another node's login, which takes
    the lock at once, waits for that write and then lists only what is
    left: before, the write did not guard itself, the login listed the
    three messages being removed, and its client's RETR of each failed.
    """
    from mailgate.store import openStore
    from test_locks import RecordingReactor, addUserWithThreeMessages, endBackend

    addUserWithThreeMessages(postgresURL)
    with psycopg.connect(postgresURL, autocommit=True) as conn:
        conn.execute("UPDATE maildrop SET arrived_at = arrived_at - 10 * 86400")
        conn.execute("UPDATE mailboxes SET oldest_arrival = (SELECT min(arrived_at) FROM maildrop)")
    reactor, otherReactor = RecordingReactor(), RecordingReactor()
    store = openStore(postgresURL, reactor)
    store.limits.expireDays = 1
    other = openStore(postgresURL, otherReactor)
    blocker = psycopg.connect(postgresURL)
    try:
        user = reactor.wait(store.findUser(USERS[0]))
        blocker.execute("SELECT 1 FROM mailboxes WHERE user_id = %s FOR UPDATE", (user.userId,))
        expiring = []
        removal(store).addBoth(expiring.append)
        reactor.turnUntil(lambda: expiring or waitingForARowLock(postgresURL, blocker), timeout=10)
        assert expiring == []
        [pid] = lockHolders(postgresURL, [user.userId])
        endBackend(postgresURL, pid)
        opening = []
        other.openMaildrop(user).addBoth(opening.append)
        otherReactor.turnUntil(lambda: opening or waitingForAnAdvisoryLock(postgresURL), timeout=10)
        blocker.commit()
        reactor.turnUntil(lambda: expiring, timeout=10)
        otherReactor.turnUntil(lambda: opening, timeout=10)
        [maildrop] = opening
        assert not isinstance(maildrop, Failure), maildrop
        left = len(otherReactor.wait(other.listMessages(USERS[0])))
        assert len(maildrop.sizes) == left
        for index in range(len(maildrop.sizes)):
            opened = otherReactor.wait(maildrop.openMessage(index))
            assert not isinstance(opened, Failure), opened
        otherReactor.resultOf(maildrop.release())
    finally:
        blocker.close()
        otherReactor.resultOf(other.close())
        reactor.resultOf(store.close())
        otherReactor.close()
        reactor.close()


def waitingForARowLock(url, blocker):
    """
    Whether a backend waits for a lock that the connection C{blocker}
    holds (the row it locked): another test's waits, on other pytest-xdist
    workers sharing the database, do not count.
    """
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))",
            (blocker.info.backend_pid,),
        ).fetchone()[0] > 0
