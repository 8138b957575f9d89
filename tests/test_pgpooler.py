"""
mailgate behind a real PgBouncer: session pooling serves, transaction
pooling (one backend shared by many connections, which breaks session-level
advisory locks and prepared statements) is refused at start, in one line.
"""

import pytest

from mailgate.errors import ConfigurationError
from mailgate.store import engineFromURL
from mailgate.store.postgres import AdvisoryLocks
from mailgate.testing import memoryStore
from iterated import IteratedReactor
from pgbouncerserver import PrivatePgBouncer, pgbouncerBinary


@pytest.fixture
def pooler(request, postgresURL):
    if pgbouncerBinary() is None:
        pytest.skip("no pgbouncer on this machine (tests/sysdeps.sh installs it)")
    bouncer = PrivatePgBouncer(postgresURL, request.param)
    yield bouncer
    bouncer.stop()


@pytest.mark.parametrize("pooler", ["transaction", "statement"], indirect=True)
def test_aPoolerSharingBackendsBetweenConnectionsIsRefusedAtStart(pooler):
    """
    Before, a node started and served behind it: its maildrop locks were
    held by whichever backend ran their statement (another node's lock
    statement run there found the lock its own), and logins failed now
    and then with "prepared statement mailgate_lock does not exist".
    """
    with pytest.raises(ConfigurationError) as raised:
        engineFromURL(pooler.url).claimServer()
    message = str(raised.value)
    assert "pool_mode = transaction" in message and "pool_mode = session" in message
    assert "\n" not in message


@pytest.mark.parametrize("pooler", ["session"], indirect=True)
def test_aPoolerInSessionModeIsAcceptedAndItsLocksGuardDeletions(pooler):
    """
    Accepted at start; a maildrop lock taken through it is one the guard
    of a session's deletions finds held (before, it looked under the pid
    of PgBouncer's own key and every QUIT that deleted was refused).
    """
    engineFromURL(pooler.url).claimServer()
    memoryStore(pooler.server).close()
    reactor = IteratedReactor()
    locks = AdvisoryLocks(engineFromURL(pooler.url), reactor)
    direct = engineFromURL(pooler.server)
    conn = direct.connect()
    try:
        assert reactor.wait(locks.acquire(4242)) == 4242
        assert locks.writeGuard(4242)(direct.begin(conn, True)) is True
    finally:
        direct.rollback(conn)
        conn.close()
        reactor.resultOf(locks.close())
        reactor.close()
