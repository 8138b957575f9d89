"""
SMTP's delay of error replies past the soft error limit (Postfix's
smtpd_soft_error_limit and smtpd_error_sleep_time), without sockets: an
L{SMTPSession} over a StringTransport, its timers on a
L{MemoryReactorClock} the test advances.  No assertion is timed: what the
client has been sent is read before and after the clock moves.
"""

import pytest
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from mailgate.smtp.protocol import SMTPServer
from mailgate.testing import SMTPSession, addUser, smtpFactory

ALICE = "alice@example.org"
SENDER = "sender@remote.test"
UNKNOWN = "550 5.1.1 <nobody{}@example.org>: no such user here\r\n"


@pytest.fixture
def users(store):
    addUser(store, ALICE, "secret")
    return store


def session(store, soft=10, sleep=1.0, lmtp=False):
    clock = MemoryReactorClock()
    factory = smtpFactory(store, clock=clock, lmtp=lmtp)
    if soft is not None:
        factory.softErrorLimit = soft
        factory.errorSleepTime = sleep
    s = SMTPSession(store, clock=clock, factory=factory)
    hello = "LHLO client.test" if lmtp else "EHLO client.test"
    assert s.command(hello).startswith("250")
    assert s.command(f"MAIL FROM:<{SENDER}>").startswith("250")
    return s


def guess(s, n):
    return s.command(f"RCPT TO:<nobody{n}@example.org>")


def test_errorsPastTheSoftLimitAreAnsweredASecondLater(users):
    """
    A client guessing addresses gets its first 10 refusals at once (the
    soft limit, as Postfix's: errors allowed before the wait); the 11th,
    and each after it, a second later, not before.
    """
    s = session(users)
    for n in range(10):
        assert guess(s, n) == UNKNOWN.format(n)
    assert guess(s, 10) == ""
    assert s.advance(0.999) == b""
    assert s.advance(0.001) == UNKNOWN.format(10).encode()
    assert guess(s, 11) == ""
    assert s.advance(1) == UNKNOWN.format(11).encode()
    assert not s.disconnected
    # The reactor is never held: a timer, nothing else.
    assert len(s.clock.getDelayedCalls()) == 1  # the idle timer


def test_aSuccessfulCommandIsNeverHeld(users):
    """
    Past the soft limit, a recipient that exists (and NOOP, RSET) is
    answered at once: only errors wait.
    """
    s = session(users)
    for n in range(11):
        guess(s, n)
        s.advance(1)
    assert guess(s, 11) == ""
    assert s.advance(1) == UNKNOWN.format(11).encode()
    assert s.command(f"RCPT TO:<{ALICE}>") == f"250 2.1.5 recipient <{ALICE}> OK\r\n"
    assert s.command("NOOP") == "250 2.0.0 OK\r\n"
    assert s.command("RSET").startswith("250")


def test_pipelinedCommandsWaitBehindAHeldErrorAndRepliesStayInOrder(users):
    """
    Commands pipelined behind a held error (PIPELINING) are run only once
    it is answered: the replies come in the order of the commands, and
    the errors among them each wait their own second.
    """
    s = session(users)
    for n in range(10):
        guess(s, n)
    pipelined = (
        b"RCPT TO:<nobody10@example.org>\r\n"
        + f"RCPT TO:<{ALICE}>\r\n".encode()
        + b"RCPT TO:<nobody11@example.org>\r\n"
        + b"NOOP\r\n"
    )
    assert s.send(pipelined) == b""
    assert s.advance(0.5) == b""
    assert s.advance(0.5) == (UNKNOWN.format(10) + f"250 2.1.5 recipient <{ALICE}> OK\r\n").encode()
    assert s.advance(1) == (UNKNOWN.format(11) + "250 2.0.0 OK\r\n").encode()


def test_inputPipelinedWhileAnErrorIsHeldIsBounded(users):
    """
    A client that keeps sending while its error waits fills the session's
    input buffer and no more: reading from the connection is paused.
    """
    s = session(users)
    for n in range(10):
        guess(s, n)
    assert s.send(b"RCPT TO:<nobody10@example.org>\r\n") == b""
    flood = b"".join(b"RCPT TO:<flood%d@example.org>\r\n" % i for i in range(5000))
    s.send(flood)
    assert s.protocol.readingPaused == {"input"}
    assert s.transport.producerState == "paused"


def test_theHardLimitStillClosesTheSession(users):
    """
    The 20th error is still the last: answered (a second later), then 421
    and the connection closed.
    """
    s = session(users)
    for n in range(19):
        guess(s, n)
        s.advance(1)
    assert not s.disconnected
    assert guess(s, 19) == ""
    assert s.advance(1) == (
        UNKNOWN.format(19) + "421 4.7.0 mailgate.test too many errors, closing connection\r\n"
    ).encode()
    assert s.disconnected


def test_aDeliveredMessageStartsTheCountAfresh(users):
    """
    As the hard limit, the soft one counts errors since the last
    delivered message: an MTA whose list has stale addresses is answered
    at once again after each message it delivers.
    """
    s = session(users)
    for n in range(10):
        guess(s, n)
    assert guess(s, 10) == ""
    s.advance(1)
    assert s.command(f"RCPT TO:<{ALICE}>").startswith("250")
    assert s.command("DATA").startswith("354")
    assert s.send(b"Subject: hi\r\n\r\nhello\r\n.\r\n").startswith(b"250 2.0.0 OK")
    assert s.command(f"MAIL FROM:<{SENDER}>").startswith("250")
    assert guess(s, 11) == UNKNOWN.format(11)


def test_aHeldErrorOfALostConnectionLeavesNoTimer(users):
    """
    The client goes away while its error waits: nothing is written, and
    no timer is left behind on the reactor.
    """
    s = session(users)
    for n in range(10):
        guess(s, n)
    assert guess(s, 10) == ""
    s.protocol.connectionLost(Failure(ConnectionDone()))
    assert s.clock.getDelayedCalls() == []
    assert s.advance(5) == b""


def test_aHeldErrorIsAnsweredAtOnceWhenTheServerStops(users):
    """
    The stop is not held up by an error reply waiting its second: it is
    sent, then the pipelined command behind it is told 421.
    """
    s = session(users)
    for n in range(10):
        guess(s, n)
    assert s.send(b"RCPT TO:<nobody10@example.org>\r\nNOOP\r\n") == b""
    s.protocol.shutdownRequested()
    assert s.advance(0) == (
        UNKNOWN.format(10) + "421 4.3.2 mailgate.test service shutting down\r\n"
    ).encode()
    assert s.disconnected
    assert [c for c in s.clock.getDelayedCalls() if c.active()] == []


@pytest.mark.parametrize("soft", [0, 1, 2])
def test_theSoftLimitIsTheErrorsAnsweredAtOnce(users, soft):
    """
    As Postfix's smtpd_soft_error_limit, the limit is how many errors are
    answered at once: 0, none (the first error waits); 1, the first (the
    second waits); 2, two.  0 and 1 are not the same.
    """
    s = session(users, soft=soft)
    for n in range(soft):
        assert guess(s, n) == UNKNOWN.format(n)
    assert guess(s, soft) == ""
    assert s.advance(1) == UNKNOWN.format(soft).encode()


def test_aSoftLimitOfTheHardOneNeverWaits(users):
    """
    20, the most: the 20th error closes the session before any reply has
    had to wait.
    """
    s = session(users, soft=20)
    for n in range(19):
        assert guess(s, n) == UNKNOWN.format(n)
    assert guess(s, 19) == UNKNOWN.format(19) + "421 4.7.0 mailgate.test too many errors, closing connection\r\n"
    assert s.disconnected


@pytest.mark.parametrize("command", ["FOO", "MAIL FROM:<a@b>", "RCPT TO:<a b>", "VRFY", "STARTTLS x"])
def test_everyKindOfErrorIsHeld(users, command):
    """
    Not only refused recipients: syntax errors, unknown commands, commands
    out of sequence, each is an error past the soft limit.
    """
    s = session(users, soft=0)
    assert s.command(command) == ""
    assert s.advance(1)[:1] in (b"5", b"4")


def test_noDelayWithoutTheSettingNorForLMTP(users):
    """
    A factory given no error sleep time (an embedder's, a protocol test's)
    answers every error at once, and so does LMTP: its client is the
    site's own MTA (twistd mailgate sets the delay on SMTP only).
    """
    assert SMTPServer.errorSleepTime == 0
    for s in (session(users, soft=None), session(users, soft=None, lmtp=True)):
        for n in range(15):
            assert guess(s, n).startswith("550 5.1.1")
