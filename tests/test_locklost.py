"""
A POP3 session whose maildrop lock is lost under it (the lock's
PostgreSQL connection ends: its backend terminated, the server
restarted) is ended as soon as the node knows, as Dovecot ends a session
whose mailbox lock it lost: C{-ERR [SYS/TEMP]} saying so, the connection
closed without the UPDATE state (nothing it marked deleted is deleted),
and its C{pop3.logout} line says why.  Before, it went on answering from
its old view, and every RETR and QUIT said "try again" for ever.

The embedded SQLite store cannot lose a lock so: its locks live in the
server's memory and in an open file description lock of its lock file,
both held as long as the process.
"""

import psycopg
import pytest

from mailgate.store import openStore
from mailgate.testing import POP3Session, addUser, deliver, memoryStore, resultOf
from test_locks import RecordingReactor, lockHolders

ALICE = "alice@example.org"
LOST = "-ERR [SYS/TEMP] the maildrop lock was lost; log in again\r\n"


def named(events, name):
    return [event for event in events if event.get("event") == name]


def terminate(url, pid):
    """
    End the backend C{pid}, which the caller found holding one of this
    test's own schema's maildrop locks (L{lockHolders}): no other backend
    of the shared cluster is touched.
    """
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))


@pytest.fixture
def node(postgresURL):
    """
    A node's store driven by a reactor of the test's own (its lock
    connections watched by it), with Alice and three messages.
    """
    setup = memoryStore(postgresURL)
    addUser(setup, ALICE, "wonderland")
    for n in range(3):
        deliver(setup, [ALICE], b"Subject: %d\r\n\r\nbody\r\n" % n)
    setup.close()
    reactor = RecordingReactor()
    store = openStore(postgresURL, reactor)
    yield store, reactor, postgresURL
    reactor.resultOf(store.close())
    reactor.close()


def loggedIn(store, reactor):
    session = POP3Session(store)
    session.protocol.dataReceived(f"USER {ALICE}\r\nPASS wonderland\r\n".encode())
    reactor.turnUntil(lambda: b"+OK " + ALICE.encode() in session.transport.value(), timeout=30)
    session.transport.clear()
    return session


def test_aSessionWhoseLockConnectionDiesIsEnded(node, logEvents):
    """
    The lock's connection is ended; another process then expunges the
    maildrop: the session is ended, saying why, with nothing deleted by
    it, and the client can log in afresh.
    """
    store, reactor, url = node
    session = loggedIn(store, reactor)
    assert session.command("DELE 1").startswith("+OK")
    [pid] = lockHolders(url)
    terminate(url, pid)
    reactor.turnUntil(lambda: session.disconnected, timeout=30)
    assert session.transport.value().decode() == LOST
    [logout] = named(logEvents, "pop3.logout")
    assert (logout["reason"], logout["deleted"]) == ("maildrop lock lost", 0)
    # Another process has the maildrop now; nothing of the session's DELE.
    admin = memoryStore(url)
    try:
        assert len(resultOf(admin.listMessages(ALICE))) == 3
        assert resultOf(admin.expungeMessages(ALICE, 100)) == (0, 0)
    finally:
        admin.close()
    again = loggedIn(store, reactor)
    assert again.command("STAT").startswith("+OK 3 ")
    again.protocol.dataReceived(b"QUIT\r\n")
    reactor.turnUntil(lambda: again.disconnected, timeout=30)
    assert again.transport.value().startswith(b"+OK")


def test_aLockKnownLostWhenTheSessionStartsEndsItAtOnce(node):
    """
    The lock's connection lost between the login's snapshot and the
    session's start: the session is told at the reactor's next turn.
    """
    store, reactor, url = node
    user = reactor.wait(store.findUser(ALICE))
    maildrop = reactor.wait(store.openMaildrop(user))
    [pid] = lockHolders(url)
    terminate(url, pid)
    reactor.turnUntil(lambda: store.locks.writeGuard(user.userId) is None, timeout=30)
    told = []
    maildrop.sessionStarted("127.0.0.1:1", None, lambda: told.append(True))
    reactor.turnUntil(lambda: told, timeout=30)
    reactor.resultOf(maildrop.release())
    assert told == [True]


# -- the session's side, on the embedded store (whose lock cannot be lost:
# the test plays the store telling the session it was) ---------------------


@pytest.fixture
def watched(store, monkeypatch):
    """
    Alice with a message on the embedded store, and the callables the
    sessions' maildrops ask to be called should their lock be lost.
    """
    addUser(store, ALICE, "wonderland")
    deliver(store, [ALICE], b"Subject: 1\r\n\r\nbody\r\n")
    watchers = []
    monkeypatch.setattr(store.locks, "whenLost", lambda userId, lost: watchers.append(lost), raising=False)
    return store, watchers


def test_anIdleSessionEndsAtOnceWithoutItsDeletions(watched, logEvents):
    store, watchers = watched
    session = POP3Session(store)
    assert session.login(ALICE, "wonderland").startswith("+OK")
    assert session.command("DELE 1").startswith("+OK")
    [lost] = watchers
    lost()
    assert session.disconnected
    assert session.transport.value().decode() == LOST
    [logout] = named(logEvents, "pop3.logout")
    assert (logout["reason"], logout["user"], logout["deleted"]) == ("maildrop lock lost", ALICE, 0)
    # A command sent after it is not run; the maildrop is whole and free.
    session.transport.clear()
    assert session.command("QUIT") == ""
    again = POP3Session(store)
    assert again.login(ALICE, "wonderland").startswith(f"+OK {ALICE} has 1 messages")


def test_aCommandUnderWayIsAnsweredFirst(watched, logEvents):
    """
    Told while a command waits on the store, the session answers it and
    then ends, as a kick does: the client never sees half a reply.
    """
    from twisted.internet import defer

    store, watchers = watched
    session = POP3Session(store)
    assert session.login(ALICE, "wonderland").startswith("+OK")
    maildrop = session.protocol._maildrop
    pending = defer.Deferred()
    uniqueIds = maildrop.uniqueIds
    maildrop.uniqueIds = lambda first, count: pending.addCallback(lambda _: uniqueIds(first, count))
    assert session.command("UIDL 1") == ""
    [lost] = watchers
    lost()
    assert session.transport.value() == b"" and not session.disconnected
    pending.callback(None)
    reply = session.advance(0).decode()
    assert reply.startswith("+OK 1 ") and reply.endswith(LOST)
    assert session.disconnected
    [logout] = named(logEvents, "pop3.logout")
    assert logout["reason"] == "maildrop lock lost"


def test_aSessionInItsUpdateStateIsLeftToItsGuard(watched):
    """
    Told once QUIT's deletions are on their way to the store: the QUIT is
    answered as the store answers it (here +OK, the deletion applied; for
    a lock truly lost, its guard refuses the deletions), not with the
    loss, and the client never sees its QUIT cut off.
    """
    from twisted.internet import defer

    store, watchers = watched
    session = POP3Session(store)
    assert session.login(ALICE, "wonderland").startswith("+OK")
    assert session.command("DELE 1").startswith("+OK")
    maildrop = session.protocol._maildrop
    pending = defer.Deferred()
    expunge = maildrop.expunge
    maildrop.expunge = lambda *args, **kwargs: pending.addCallback(lambda _: expunge(*args, **kwargs))
    # QUIT's deletions on their way to the store: the UPDATE state.
    assert session.command("QUIT") == ""
    assert session.protocol.state == "UPDATE"
    [lost] = watchers
    lost()
    assert not session.disconnected and session.transport.value() == b""
    # The QUIT is answered as the store answers it, not with the loss.
    pending.callback(None)
    assert session.advance(0).decode().startswith("+OK mailgate POP3 server signing off (0 messages left)")
    assert session.disconnected
    again = POP3Session(store)
    assert again.login(ALICE, "wonderland").startswith(f"+OK {ALICE} has 0 messages")
