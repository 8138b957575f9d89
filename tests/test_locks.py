"""
PostgreSQL's cross-node maildrop locks on their real connections, driven by
a real reactor: which lock connection each maildrop's lock uses, the order
of operations on one maildrop, the snapshot taken with the lock, and what
happens when a lock connection is lost.
"""

import secrets
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from twisted.python.failure import Failure

from mailgate.errors import CredentialsChanged, MaildropInUse, TemporaryFailure
from mailgate.store import engineFromURL
from mailgate.store.postgres import AdvisoryLocks, _key
from mailgate.store.rows import removeMessages
from mailgate.testing import addUser, deliver, memoryStore, resultOf
from iterated import IteratedReactor
import pgkeyproxy

USERS = [f"user{n}@example.org" for n in range(6)]


@pytest.fixture
def node(postgresURL):
    """
    A node's locks (four connections) on a database with a few users, and
    the users' ids.
    """
    store = memoryStore(postgresURL)
    ids = []
    for address in USERS:
        addUser(store, address, "pw")
        ids.append(resultOf(store.findUser(address)).userId)
    reactor = IteratedReactor()
    locks = AdvisoryLocks(engineFromURL(postgresURL), reactor)
    yield locks, reactor, ids, postgresURL
    reactor.resultOf(locks.close())
    reactor.close()
    store.close()


def _advisoryLocksOf(url, kinds, userIds, granted):
    """
    The backend pids holding (C{granted}) or waiting for advisory locks of
    this test's database schema's maildrops (keys C{namespace:kind:id}),
    one entry per lock: other tests' locks, in other schemas of the same
    database (other pytest-xdist workers), are left out.
    """
    with psycopg.connect(url, autocommit=True) as conn:
        namespace = ":".join(conn.execute("SELECT current_database(), current_schema()").fetchone())
        rows = conn.execute(
            "SELECT pid, classid, objid FROM pg_locks WHERE locktype = 'advisory' AND granted = %s AND objsubid = 1",
            (granted,),
        ).fetchall()
    keys = [_key(f"{namespace}:{kind}:{userId}") for kind in kinds for userId in userIds]
    ours = {((key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF) for key in keys}
    return [pid for pid, classid, objid in rows if (int(classid), int(objid)) in ours]


def lockHolders(url, userIds=range(1, 100)):
    """
    The backend pids holding maildrop locks of this test's database schema
    (other tests' locks are left out), one entry per lock.
    """
    return _advisoryLocksOf(url, ["maildrop"], userIds, granted=True)


def openConnections(locks):
    return [slot for slot in locks._slots if slot.connection.connected]


def test_anIdleNodeKeepsToOneLockConnection(node):
    """
    Sessions one after another all lock through the first connection,
    whose database backend stays warm; the others are never opened.
    """
    locks, reactor, ids, url = node
    for userId in ids:
        assert reactor.wait(locks.acquire(userId)) == userId
        assert reactor.wait(locks.release(userId)) is None
    assert openConnections(locks) == [locks._slots[0]]
    assert locks._routes == {}


def test_locksTakenTogetherSpreadOverTheConnections(node):
    locks, reactor, ids, url = node
    pending = [locks.acquire(userId) for userId in ids[:4]]
    assert [reactor.wait(d) for d in pending] == ids[:4]
    holders = lockHolders(url)
    assert len(holders) == 4 and len(set(holders)) == 4
    for userId in ids[:4]:
        reactor.resultOf(locks.release(userId))
    assert lockHolders(url) == []
    assert locks._routes == {}


def test_reloginBeforeTheUnlockCompletesFollowsIt(node):
    """
    QUIT, then a new login to the same maildrop on this node at once: the
    acquire is queued behind the unlock on the connection that held the
    lock, so it succeeds, even while another connection is idle.
    """
    locks, reactor, ids, url = node
    alice = ids[0]
    assert reactor.wait(locks.acquire(alice)) == alice
    released = locks.release(alice)
    again = locks.acquire(alice)
    assert reactor.wait(again) == alice
    assert reactor.wait(released) is None
    assert openConnections(locks) == [locks._slots[0]]
    assert len(lockHolders(url)) == 1
    reactor.resultOf(locks.release(alice))
    assert lockHolders(url) == []


def test_anotherNodeWaitsForTheUnlock(node, postgresURL):
    locks, reactor, ids, url = node
    other = AdvisoryLocks(engineFromURL(url), reactor)
    try:
        alice = ids[0]
        assert reactor.wait(locks.acquire(alice)) == alice
        refused = reactor.wait(other.acquire(alice))
        assert refused.check(MaildropInUse)
        assert other._routes == {}
        reactor.resultOf(locks.release(alice))
        assert reactor.wait(other.acquire(alice)) == alice
        reactor.resultOf(other.release(alice))
    finally:
        reactor.resultOf(other.close())


def test_theSnapshotTakenWithTheLockListsTheMaildropInOrder(node):
    locks, reactor, ids, url = node
    store = memoryStore(url)
    try:
        for n in range(300):
            body = b"x" * (n * 37 % 1000)
            deliver(store, [USERS[1]], b"Subject: %d\r\n\r\n%s\r\n" % (n, body))
    finally:
        store.close()
    bob = ids[1]
    with psycopg.connect(url, autocommit=True) as conn:
        expected = conn.execute("SELECT uid, size, uidl FROM maildrop WHERE user_id = %s", (bob,)).fetchall()
    assert len(expected) == 300 and len({size for _, size, _ in expected}) > 100
    uids, got, uniqueIds = reactor.wait(locks.acquireAndSnapshot(bob, None))
    assert list(zip(uids, got, uniqueIds)) == sorted(expected)
    reactor.resultOf(locks.release(bob))
    # An empty maildrop.
    alice = ids[0]
    uids, got, uniqueIds = reactor.wait(locks.acquireAndSnapshot(alice, None))
    assert (list(uids), list(got), uniqueIds) == ([], [], [])
    assert lockHolders(url) != []
    reactor.resultOf(locks.release(alice))
    assert lockHolders(url) == []


def test_aPasswordChangedSinceItWasVerifiedGivesTheLockBack(node):
    locks, reactor, ids, url = node
    alice = ids[0]
    failure = reactor.wait(locks.acquireAndSnapshot(alice, "$scrypt$not-the-stored-one"))
    assert failure.check(CredentialsChanged)
    reactor.turnUntil(lambda: lockHolders(url) == [] and locks._routes == {}, timeout=10)
    assert alice not in locks._held


def endBackend(url, pid):
    """
    End the backend C{pid} and wait until the server has let it go, without
    turning the test's reactor: the node does not see its connection close.
    """
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        for _ in range(100):
            if admin.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()[0] == 0:
                return
        raise AssertionError(f"backend {pid} did not end")


def waitingForAnAdvisoryLock(url, userIds=range(1, 100)):
    """
    Whether a backend waits for an advisory lock of this test's schema's
    maildrops (a maildrop lock or its write key): a wait of another
    test's, in another schema, does not count.
    """
    return bool(_advisoryLocksOf(url, ["maildrop", "maildrop-write"], userIds, granted=False))


def guardHolds(url, guard):
    """
    What a write guard says in a transaction of its own on another
    connection, as a session's deletions run it (rolled back after).
    """
    engine = engineFromURL(url)
    conn = engine.connect()
    try:
        return guard(engine.begin(conn, True))
    finally:
        engine.rollback(conn)
        conn.close()


def test_aLockWhoseConnectionIsLostIsNoLongerHeld(node):
    """
    Killing the backend that holds a lock releases it at the database: the
    guard of this node's deletions says so, whether or not the node has
    noticed yet; another node can take the lock, and after the session
    ends this node can lock it again.
    """
    locks, reactor, ids, url = node
    alice = ids[0]
    assert locks.writeGuard(alice) is None
    assert reactor.wait(locks.acquire(alice)) == alice
    guard = locks.writeGuard(alice)
    assert guardHolds(url, guard) is True
    [pid] = lockHolders(url)
    endBackend(url, pid)
    # The node has not seen its connection close: its guard asks the database.
    assert guardHolds(url, locks.writeGuard(alice)) is False
    reactor.turnUntil(lambda: locks.writeGuard(alice) is None, timeout=10)
    other = AdvisoryLocks(engineFromURL(url), reactor)
    try:
        assert reactor.wait(other.acquire(alice)) == alice
        reactor.resultOf(locks.release(alice))
        assert reactor.wait(locks.acquire(alice)).check(MaildropInUse)
        reactor.resultOf(other.release(alice))
    finally:
        reactor.resultOf(other.close())
    assert reactor.wait(locks.acquire(alice)) == alice
    assert lockHolders(url) != [pid]
    reactor.resultOf(locks.release(alice))


def test_theGuardKnowsTheLockConnectionBehindAPoolerThatHidesItsPid(node):
    """
    Behind a pooler (PgBouncer, session pooling), libpq's backend pid is
    the one in the pooler's own key, which no backend has: the guard asks
    the backend for its pid.  Before, it looked for the lock under the
    pooler's, found none, and every POP3 QUIT that deleted answered
    -ERR [SYS/TEMP] and removed nothing.
    """
    locks, reactor, ids, url = node
    parts = urlsplit(url)
    proxy = pgkeyproxy.start((parts.hostname, parts.port), pid=1)
    netloc = f"{parts.username}:{parts.password}@127.0.0.1:{proxy.address[1]}"
    behind = AdvisoryLocks(engineFromURL(urlunsplit(parts._replace(netloc=netloc))), reactor)
    try:
        alice = ids[0]
        assert reactor.wait(behind.acquire(alice)) == alice
        assert behind._slots[0].connection.backendPid == 1
        assert guardHolds(url, behind.writeGuard(alice)) is True
        reactor.resultOf(behind.release(alice))
        assert lockHolders(url) == []
    finally:
        reactor.resultOf(behind.close())
        proxy.close()


def test_aRolesIdleSessionTimeoutEndsNoConnectionOfANode(node):
    """
    idle_session_timeout set on the role (ALTER ROLE ... SET, PostgreSQL
    14 on) ended the lock connection of a POP3 session whose client took
    longer than it between two commands: the lock went with it, and the
    session's QUIT with deletions answered -ERR [SYS/TEMP] and removed
    nothing.  Each connection turns it off for itself, the worker
    threads' too.
    """
    import time

    locks, reactor, ids, url = node
    role = "mgidle_" + secrets.token_hex(4)
    with psycopg.connect(url, autocommit=True) as admin:
        if admin.info.server_version < 140000:
            pytest.skip("idle_session_timeout is PostgreSQL 14's")
        admin.execute(f"CREATE ROLE {role} LOGIN SUPERUSER PASSWORD 'pw'")
        admin.execute(f"ALTER ROLE {role} SET idle_session_timeout = '200ms'")
    parts = urlsplit(url)
    engine = engineFromURL(urlunsplit(parts._replace(netloc=f"{role}:pw@{parts.netloc.rpartition('@')[2]}")))
    idle = AdvisoryLocks(engine, reactor)
    try:
        alice = ids[0]
        assert reactor.wait(idle.acquire(alice)) == alice
        conn = engine.connect()
        try:
            # Idle for longer than the role allows (the reactor not turned).
            time.sleep(0.6)
            assert guardHolds(url, idle.writeGuard(alice)) is True
            assert conn.execute("SHOW idle_session_timeout").fetchone()[0] == "0"
        finally:
            conn.close()
        reactor.resultOf(idle.release(alice))
    finally:
        reactor.resultOf(idle.close())
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'")
            admin.execute(f"DROP ROLE {role}")


def test_aBackendHoldingTheLockUnderADeadConnectionsPidIsNotTakenForIt(node):
    """
    PostgreSQL gives a dead backend's pid to a new one in time.  This
    node's lock connection dies; another node takes the lock on a backend
    which, here, stands for one that got the dead backend's pid: the lock
    is held under that pid, but not by the connection that took it, and
    this node's guard says so (its session's deletions are refused, not
    written under another node's session).
    """
    locks, reactor, ids, url = node
    alice = ids[0]
    assert reactor.wait(locks.acquire(alice)) == alice
    guard = locks.writeGuard(alice)
    [pid] = lockHolders(url)
    endBackend(url, pid)
    other = AdvisoryLocks(engineFromURL(url), reactor)
    try:
        assert reactor.wait(other.acquire(alice)) == alice
        [reusedPid] = lockHolders(url)
        assert guardHolds(url, other.writeGuard(alice)) is True
        guard.pid = reusedPid
        assert guardHolds(url, guard) is False
        reactor.resultOf(other.release(alice))
    finally:
        reactor.resultOf(other.close())


def test_aNodeTakingALostLockSeesTheDeletionsBeingWrittenWholeOrNotAtAll(node):
    """
    A session's deletions were checked by their guard and are being
    written when the session's lock connection dies: the lock is free at
    the database at once, but another node that takes it waits for that
    write to end before reading its snapshot, which then does not list the
    removed message (before, it read the snapshot at once, listed a
    message about to vanish, and its client's RETR of it failed).
    """
    locks, reactor, ids, url = node
    setup = memoryStore(url)
    for n in range(3):
        deliver(setup, [USERS[0]], b"Subject: %d\r\n\r\nbody\r\n" % n)
    setup.close()
    alice = ids[0]
    uids, _, _ = reactor.wait(locks.acquireAndSnapshot(alice, None))
    assert len(uids) == 3
    engine = engineFromURL(url)
    writer = engine.connect()
    other = AdvisoryLocks(engineFromURL(url), reactor)
    try:
        cursor = engine.begin(writer, True)
        assert locks.writeGuard(alice)(cursor) is True
        removeMessages(cursor, alice, [uids[0]])
        [pid] = lockHolders(url)
        endBackend(url, pid)
        taking = other.acquireAndSnapshot(alice, None)
        taken = []
        taking.addBoth(taken.append)
        # The other node's lock statement took the lock and waits at the
        # database for the write to end; its snapshot is not read meanwhile.
        reactor.turnUntil(lambda: taken or waitingForAnAdvisoryLock(url), timeout=10)
        assert taken == []
        engine.commit(writer)
        reactor.turnUntil(lambda: taken, timeout=10)
        [(seen, _, _)] = taken
        assert list(seen) == list(uids[1:])
        reactor.resultOf(other.release(alice))
    finally:
        engine.rollback(writer)
        writer.close()
        reactor.resultOf(other.close())


def test_aLoginWhoseLockConnectionDiedUnnoticedRunsAgainOnAFreshOne(node):
    """
    The lock connection's backend was ended (an administrator, a database
    restart) and the node has not noticed yet: the next login's lock
    statement fails with the connection.  The lock, if it was taken, went
    with the old connection, so the login runs once more on a fresh one
    and the client gets in instead of -ERR [SYS/TEMP].
    """
    locks, reactor, ids, url = node
    alice = ids[0]
    reactor.resultOf(locks.acquireAndSnapshot(alice, None))
    reactor.resultOf(locks.release(alice))
    [slot] = openConnections(locks)
    pid = slot.connection.backendPid
    endBackend(url, pid)
    # Gone at the server; the node has not seen the connection close.
    assert slot.connection.connected
    result = reactor.wait(locks.acquireAndSnapshot(alice, None))
    assert not isinstance(result, Failure), result
    assert slot.connection.backendPid != pid
    assert lockHolders(url) == [slot.connection.backendPid]
    assert guardHolds(url, locks.writeGuard(alice)) is True
    reactor.resultOf(locks.release(alice))
    assert lockHolders(url) == []
    # Lost again with a second chance used: the failure reaches the login.
    endBackend(url, slot.connection.backendPid)
    failure = reactor.wait(locks.acquireAndSnapshot(alice, None, again=False))
    assert failure.check(TemporaryFailure)


def addUserWithThreeMessages(url):
    """
    The first of L{USERS}, with three messages, made on a store of its own.
    """
    setup = memoryStore(url)
    try:
        addUser(setup, USERS[0], "pw")
        for n in range(3):
            deliver(setup, [USERS[0]], b"Subject: %d\r\n\r\nbody\r\n" % n)
    finally:
        setup.close()


class RecordingReactor(IteratedReactor):
    """
    A reactor of the test's own that notes every reader, timer and call
    from a worker thread handed to it.
    """

    def __init__(self):
        self.readersAdded = []
        self.timers = []
        self.fromThreads = 0
        super().__init__()

    def addReader(self, reader):
        self.readersAdded.append(reader)
        return super().addReader(reader)

    def callLater(self, delay, function, *args, **kwargs):
        self.timers.append(function)
        return super().callLater(delay, function, *args, **kwargs)

    def callFromThread(self, function, *args, **kwargs):
        self.fromThreads += 1
        return super().callFromThread(function, *args, **kwargs)


def test_openStoreRunsTheLocksOnTheReactorItIsGiven(postgresURL):
    """
    C{openStore(url, reactor)} hands its reactor to everything below it:
    a whole POP3 login, QUIT and close on PostgreSQL run on a reactor that
    is neither installed nor running, turned by the test.  The lock
    connections' sockets are watched by it, their deadlines are its
    timers, the worker threads hand their results to it, and the global
    reactor never sees a lock connection.
    """
    from twisted.internet import reactor as globalReactor

    from mailgate.store import openStore
    from mailgate.store.pgreactor import ReactorConnection

    addUserWithThreeMessages(postgresURL)
    reactor = RecordingReactor()
    store = openStore(postgresURL, reactor)
    try:
        user = reactor.wait(store.findUser(USERS[0]))
        assert user.address == USERS[0]
        maildrop = reactor.wait(store.openMaildrop(user))
        assert len(maildrop.sizes) == 3
        assert len(lockHolders(postgresURL)) == 1
        assert reactor.wait(maildrop.expunge([0])) == 1
        assert reactor.wait(maildrop.release()) is None
        assert lockHolders(postgresURL) == []
    finally:
        reactor.resultOf(store.close())
        reactor.close()
    lockConnections = [r for r in reactor.readersAdded if isinstance(r, ReactorConnection)]
    assert len(lockConnections) == 1
    assert any(getattr(t, "__self__", None) is lockConnections[0] for t in reactor.timers)
    assert reactor.fromThreads >= 3  # the user lookup, the lock connection, the expunge
    assert not [r for r in globalReactor.getReaders() if isinstance(r, ReactorConnection)]


def test_aQuitWhoseLockWentUnnoticedDeletesNothing(postgresURL):
    """
    As below, but the node has not yet seen its lock connection close when
    the client QUITs (the other node's session runs on a reactor of its
    own): the removal's own transaction finds the lock no longer held by
    that connection and removes nothing, with a temporary failure that
    does not count against the database the removal was written to.
    """
    from mailgate.errors import MaildropLockLost
    from mailgate.store import openStore

    addUserWithThreeMessages(postgresURL)
    reactor, otherReactor = RecordingReactor(), RecordingReactor()
    store = openStore(postgresURL, reactor)
    other = openStore(postgresURL, otherReactor)
    try:
        user = reactor.wait(store.findUser(USERS[0]))
        maildrop = reactor.wait(store.openMaildrop(user))
        [pid] = lockHolders(postgresURL)
        endBackend(postgresURL, pid)
        second = otherReactor.wait(other.openMaildrop(user))
        assert not isinstance(second, Failure), second
        failed = reactor.wait(maildrop.expunge([0, 2]))
        assert isinstance(failed, Failure) and failed.check(MaildropLockLost), failed
        assert store.database.writeFailure is None
        assert len(reactor.wait(store.listMessages(USERS[0]))) == 3
        reactor.resultOf(maildrop.release())
        assert otherReactor.wait(second.expunge([1])) == 1
        otherReactor.resultOf(second.release())
        assert len(reactor.wait(store.listMessages(USERS[0]))) == 2
    finally:
        otherReactor.resultOf(other.close())
        reactor.resultOf(store.close())
        otherReactor.close()
        reactor.close()


def test_aQuitWhoseLockWentWithItsConnectionDeletesNothing(postgresURL):
    """
    A session's lock connection is ended (an administrator, a restart)
    and another node's session takes the maildrop: the first session's
    QUIT finds its lock gone and removes nothing, with a temporary
    failure (-ERR [SYS/TEMP]); the other session's view stays whole.
    """
    from mailgate.store import openStore

    addUserWithThreeMessages(postgresURL)
    reactor = RecordingReactor()
    store = openStore(postgresURL, reactor)
    other = openStore(postgresURL, reactor)
    try:
        user = reactor.wait(store.findUser(USERS[0]))
        maildrop = reactor.wait(store.openMaildrop(user))
        [pid] = lockHolders(postgresURL)
        with psycopg.connect(postgresURL, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        reactor.turnUntil(lambda: lockHolders(postgresURL) == [], timeout=20)
        second = reactor.wait(other.openMaildrop(user))
        assert not isinstance(second, Failure), second
        failed = reactor.wait(maildrop.expunge([0, 2]))
        assert isinstance(failed, Failure) and failed.check(TemporaryFailure), failed
        assert len(reactor.wait(store.listMessages(USERS[0]))) == 3
        reactor.resultOf(maildrop.release())
        # The other node's session still holds the maildrop, and its
        # deletions apply.
        assert reactor.wait(second.expunge([1])) == 1
        reactor.resultOf(second.release())
        assert len(reactor.wait(store.listMessages(USERS[0]))) == 2
    finally:
        reactor.resultOf(other.close())
        reactor.resultOf(store.close())
        reactor.close()
