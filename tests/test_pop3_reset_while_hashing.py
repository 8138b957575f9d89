"""
A POP3 client that resets its connection (RST) while its wrong password
is being hashed: the session's C{pop3.disconnect} line counts that
failure (C{auth_failed=1}) and comes after its C{auth.failed} line, as
for a client that closes with a FIN (whose commands the session answers
first).  The line waits for the check's answer, within
C{POP3Server.endLineWait} seconds, and never holds the shutdown up.

In memory: a thread pool whose hashes start at once and whose answers
come when the test says (a hash under way); then a real twistd mailgate
and a socket closed with SO_LINGER 0.
"""

import socket
import struct

import pytest
from twisted.internet import defer
from twisted.internet.error import ConnectionLost
from twisted.logger import formatEvent
from twisted.python.failure import Failure

from e2e import DEADLINE, sqliteOnly, waitFor
from e2e import mailgate_cli, mailgate_server  # noqa: F401 (fixtures)
from mailgate.auth.realm import makePortal
from mailgate.pop3.protocol import POP3Server
from mailgate.testing import addUser
from test_pop3_policy import ALICE, PASSWORD, PenaltyPolicy, session, userPass


#: bcrypt, cost 14, of "secret" (about a second to check)
SLOW_HASH = "$2b$14$HVpxLxJqd7qJqvYgHWOsBeWYdKFYw8lOq0CXfdA.IW6dtSeRGxPBG"


@pytest.fixture
def alice(store):
    addUser(store, ALICE, PASSWORD)
    return ALICE


class HashingPool:
    """
    A C{runInThread} that runs each job at once (the hash has started)
    and delivers its answer only at L{answerAll}.
    """

    def __init__(self):
        self.answers = []

    def __call__(self, function, *args):
        d = defer.Deferred()
        try:
            self.answers.append((d, function(*args), None))
        except Exception:
            self.answers.append((d, None, Failure()))
        return d

    def answerAll(self):
        while self.answers:
            d, result, failure = self.answers.pop(0)
            if failure is None:
                d.callback(result)
            else:
                d.errback(failure)


def hashing(store):
    pool = HashingPool()
    s = session(store, PenaltyPolicy(), authFailureDelay=1.0)
    s.factory.portal = makePortal(store, pool)
    return s, pool


def reset(s):
    s.protocol.connectionLost(Failure(ConnectionLost("Connection reset by peer")))


def lines(logEvents):
    return [e["event"] for e in logEvents if e.get("event") in ("auth.failed", "pop3.disconnect")]


def disconnect(logEvents):
    [line] = [e for e in logEvents if e.get("event") == "pop3.disconnect"]
    return line


def test_aResetWhileThePasswordIsHashedCountsItsFailure(store, alice, logEvents):
    s, pool = hashing(store)
    assert userPass(s, password="wrong") == ""
    assert len(pool.answers) == 1
    reset(s)
    # The session is gone (the shutdown would not wait for it); its line
    # waits for the answer.
    assert len(s.factory.tracker) == 0
    assert lines(logEvents) == []
    pool.answerAll()
    assert lines(logEvents) == ["auth.failed", "pop3.disconnect"]
    assert disconnect(logEvents)["authFailed"] == 1
    assert " auth_failed=1 " in formatEvent(disconnect(logEvents))
    # Nothing left scheduled: no failure delay, no bound.
    assert s.clock.getDelayedCalls() == []


def test_theLineWaitsForTheAnswerOnlySoLong(store, alice, logEvents):
    s, pool = hashing(store)
    userPass(s, password="wrong")
    reset(s)
    s.clock.advance(POP3Server.endLineWait - 0.5)
    assert lines(logEvents) == []
    s.clock.advance(0.5)
    assert lines(logEvents) == ["pop3.disconnect"]
    assert disconnect(logEvents)["authFailed"] == 0
    # The answer coming later writes no second line.
    pool.answerAll()
    assert lines(logEvents) == ["pop3.disconnect", "auth.failed"]


def test_theShutdownWritesTheLineAndDoesNotWaitForIt(store, alice, logEvents):
    s, pool = hashing(store)
    userPass(s, password="wrong")
    reset(s)
    stopped = s.factory.tracker.shutdown(30)
    assert stopped.called
    assert lines(logEvents) == ["pop3.disconnect"]
    pool.answerAll()
    s.clock.advance(POP3Server.endLineWait)
    assert lines(logEvents) == ["pop3.disconnect", "auth.failed"]


def test_aResetAfterTheAnswerIsCountedAtOnce(store, alice, logEvents):
    """
    Reset during the failure delay (the answer is in): the line is
    written at once, the failure counted.
    """
    s, pool = hashing(store)
    userPass(s, password="wrong")
    pool.answerAll()
    assert lines(logEvents) == ["auth.failed"]
    reset(s)
    assert lines(logEvents) == ["auth.failed", "pop3.disconnect"]
    assert disconnect(logEvents)["authFailed"] == 1


def cpuTicks(pid):
    """
    The user and system CPU time of process C{pid} so far, in clock ticks
    (fields 14 and 15 of C{/proc/PID/stat}, after the command's name).
    """
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


@sqliteOnly
def test_aRealClientResettingWhileItsPasswordIsHashed(mailgate_server, mailgate_cli, tmp_path):  # noqa: F811
    # A user moved from Dovecot with a bcrypt hash whose check takes
    # about a second: the reset surely comes while it runs.
    (tmp_path / "passwd").write_text(f"{ALICE}:{{BLF-CRYPT}}{SLOW_HASH}::::::\n")
    mailgate_cli.check("user", "import", str(tmp_path / "passwd"))
    server = mailgate_server("--trusted-network", "127.0.0.0/8")
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=DEADLINE)
    reader = sock.makefile("rb")
    assert reader.readline().startswith(b"+OK")
    sock.sendall(f"USER {ALICE}\r\n".encode())
    assert reader.readline().startswith(b"+OK")
    before = cpuTicks(server.process.pid)
    sock.sendall(b"PASS wrong\r\n")
    # Reset once the hash is running (one not started when the session
    # ends is not run at all: nothing to count). The server does nothing
    # else meanwhile, so its CPU time growing by 50 ms is the hash,
    # however slowly a loaded machine runs it.
    waitFor(lambda: cpuTicks(server.process.pid) >= before + 5, "the hash of the PASS to be running")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    reader.close()
    sock.close()
    log = waitFor(
        lambda: server.stdout if "pop3 disconnect" in server.stdout else None, "the session's end line"
    )
    ended = log.index("pop3 disconnect")
    assert "pop3 authentication failed" in log[:ended], log
    assert "reason='connection lost' auth_failed=1 " in log[ended:], log
