"""
A password whose session ended before its hash started is not hashed
(mailgate.auth.checkers.LoginAbandoned).

The reactor's thread pool runs ten hashes at once and queues the rest
without bound.  On a real server, 500 connections from one exempt address
that sent USER and PASS and closed at once (a tenth of a second) left 500
hashes queued that nobody would read: a real user's login then waited 86
seconds behind them.  Now a queued hash whose session has gone is dropped
when its turn comes: nothing hashed, nothing counted against the address
or the name, nothing remembered as a failed password, nothing answered.

POP3 sessions in memory, with a thread pool whose jobs wait until the
test runs them, as the real pool's queue does.
"""

import pytest
from twisted.internet import defer

from mailgate.auth import checkers
from mailgate.auth.realm import makePortal
from mailgate.testing import addUser

from test_pop3_policy import ALICE, PASSWORD, PenaltyPolicy, checks, endSession, session, userPass


@pytest.fixture
def alice(store):
    addUser(store, ALICE, PASSWORD)
    return ALICE


class QueuedPool:
    """
    A C{runInThread} whose jobs wait, in order, until L{runAll}: the
    reactor's thread pool with every thread busy.
    """

    def __init__(self):
        self.jobs = []

    def __call__(self, function, *args):
        d = defer.Deferred()
        self.jobs.append((function, args, d))
        return d

    def runAll(self):
        while self.jobs:
            function, args, d = self.jobs.pop(0)
            try:
                result = function(*args)
            except Exception:
                d.errback()
            else:
                d.callback(result)


def _sessionWithQueuedHashes(store, monkeypatch, policy):
    """
    A POP3 session whose password hashes wait in a L{QueuedPool}; the
    pool, and the list of hashes really run.
    """
    hashed = []
    real = checkers.verifyPassword

    def counting(password, encoded):
        hashed.append(password)
        return real(password, encoded)

    monkeypatch.setattr(checkers, "verifyPassword", counting)
    pool = QueuedPool()
    s = session(store, policy)
    s.factory.portal = makePortal(store, pool)
    return s, pool, hashed


def test_aPasswordWhoseSessionEndedBeforeItsHashIsNotHashed(store, alice, monkeypatch, logEvents):
    policy = PenaltyPolicy()
    gone, pool, hashed = _sessionWithQueuedHashes(store, monkeypatch, policy)
    live = session(store, policy)
    live.factory.portal = gone.factory.portal
    assert userPass(gone, password="wrong") == ""
    assert userPass(live, password="also wrong") == ""
    assert len(pool.jobs) == 2
    endSession(gone)

    pool.runAll()
    live.clock.advance(60)

    # Only the session still there had its password hashed, counted and
    # answered.
    assert hashed == [b"also wrong"]
    assert [call[0] for call in checks(policy)] == ["authenticationFailed"]
    assert live.transport.value().startswith(b"-ERR [AUTH]"), live.transport.value()
    failedLines = [e for e in logEvents if e.get("event") == "auth.failed"]
    assert len(failedLines) == 1, failedLines
    assert not [e for e in logEvents if e.get("log_failure") is not None]


def test_aRightPasswordAbandonedIsNotRememberedAsAFailure(store, alice, monkeypatch):
    """
    The dropped hash is no failure: the same password, from a session
    that stays, is hashed and logs in.
    """
    policy = PenaltyPolicy()
    gone, pool, hashed = _sessionWithQueuedHashes(store, monkeypatch, policy)
    assert userPass(gone) == ""
    endSession(gone)
    pool.runAll()
    assert hashed == []

    again = session(store, policy)
    again.factory.portal = gone.factory.portal
    assert userPass(again) == ""
    pool.runAll()
    again.clock.advance(0)
    assert again.transport.value().startswith(b"+OK"), again.transport.value()
    assert hashed == [PASSWORD.encode()]
    assert [call[0] for call in checks(policy)] == ["authenticationSucceeded"]
