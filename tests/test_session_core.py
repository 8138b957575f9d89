"""
The command-session core on its own: a small line protocol built on
L{mailgate.session.CommandSession}, so what is checked is the core's part
(framing, the queue, dispatch, limits, errors, the idle timer, raw mode,
TLS reset, ids), whatever POP3 and SMTP add to it.
"""

import os
import weakref

import pytest
from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent
from twisted.python.failure import Failure

from mailgate.session import CommandError, CommandSession, SessionFactory, describeAddress, newSessionId
from mailgate.session.factory import OpenPolicy
from mailgate.testing import TLSStringTransport
from refcounting import withoutCycleCollector

PEER = IPv4Address("TCP", "192.0.2.9", 1234)


class Echo(CommandSession):
    protocolName = "echo"
    commandPrefix = "echo_"
    maxCommandLength = 32
    maxBadCommands = 4
    idleTimeout = 60

    def __init__(self):
        super().__init__()
        self.pending = []

    def greet(self):
        self.say("hello")

    def refusal(self, reason):
        self.say(f"refused {reason}")

    def say(self, text):
        self._out.write(text.encode() + b"\r\n")

    def syntaxError(self, text):
        self.say(f"bad {text}")
        self.countBadCommand()

    def lineTooLong(self):
        self.syntaxError("too long")

    def unknownCommand(self, verb):
        self.syntaxError(f"unknown {verb!r}")

    def tooManyBadCommands(self):
        self.say("bye, too many")

    def internalError(self):
        self.say("oops")

    def idleTimedOut(self, stalled):
        self.say(f"idle stalled={stalled}")

    def echo_SAY(self, argument):
        self.say(argument)

    def echo_WAIT(self, argument):
        d = defer.Deferred()
        self.pending.append(d)
        return d.addCallback(lambda _: self.say(f"waited {argument}"))

    def echo_FAIL(self, argument):
        raise RuntimeError("the secret " + argument)

    def echo_REFUSE(self, argument):
        raise CommandError("refused " + argument)

    def echo_RAW(self, argument):
        self.rawReceiver = Counted(int(argument))
        self.say("go")

    def rawDataEnded(self, receiver):
        self.say(f"raw {receiver.data!r}")

    def echo_TLS(self, argument):
        self.say("tls")
        self.startTLS(object())


class Counted:
    """
    A raw receiver that takes exactly C{count} octets.
    """

    def __init__(self, count):
        self.count = count
        self.data = b""

    def feed(self, data):
        want = self.count - len(self.data)
        self.data += data[:want]
        if len(self.data) < self.count:
            return None
        return data[want:]


class CountingTransport(TLSStringTransport):
    writes = 0

    def write(self, data):
        self.writes += 1
        super().write(data)


def connect():
    clock = Clock()
    factory = SessionFactory(clock)
    factory.protocol = Echo
    protocol = factory.buildProtocol(PEER)
    transport = CountingTransport(peerAddress=PEER)
    protocol.makeConnection(transport)
    assert transport.value() == b"hello\r\n"
    transport.clear()
    return protocol, transport, clock


def take(transport):
    value = transport.value()
    transport.clear()
    return value


def test_handlersAreFoundByName():
    protocol, transport, _ = connect()
    protocol.dataReceived(b"say hi there\r\nSay again\r\nNOPE\r\n__init__ x\r\n")
    assert take(transport) == (
        b"hi there\r\nagain\r\nbad unknown 'NOPE'\r\nbad unknown '__INIT__'\r\n"
    )


def test_theRepliesToOneReadLeaveInOneWrite():
    protocol, transport, _ = connect()
    transport.writes = 0
    protocol.dataReceived(b"SAY a\r\nSAY b\r\nSAY c\r\n")
    assert transport.writes == 1
    assert take(transport) == b"a\r\nb\r\nc\r\n"


def test_aWaitingCommandHoldsTheQueue():
    protocol, transport, _ = connect()
    protocol.dataReceived(b"WAIT 1\r\nSAY after\r\nWAIT 2\r\nSAY last\r\n")
    assert take(transport) == b""
    protocol.pending.pop(0).callback(None)
    assert take(transport) == b"waited 1\r\nafter\r\n"
    protocol.pending.pop(0).callback(None)
    assert take(transport) == b"waited 2\r\nlast\r\n"


def trickle(protocol, data):
    """
    Hand C{data} to the session an octet at a time, as a client writing
    one octet per segment does.
    """
    for i in range(len(data)):
        protocol.dataReceived(data[i:i + 1])


def reading(transport):
    return transport.producerState == "producing"


def test_readingPausesAtTheQueuedLineLimitHoweverTheInputArrives():
    """
    Behind a command that waits, reading stops once more complete lines
    wait than L{maxQueuedCommands} allows, whether they came in one read
    or an octet at a time; the lines are kept, run in order once the
    command ends, and reading resumes.
    """
    protocol, transport, _ = connect()
    protocol.maxQueuedCommands = 5
    protocol.dataReceived(b"WAIT 1\r\n")
    trickle(protocol, b"SAY a\r\n" * 5 + b"SAY b")
    assert reading(transport)
    trickle(protocol, b"\r")
    assert reading(transport)
    trickle(protocol, b"\n")
    assert not reading(transport)
    protocol.pending.pop(0).callback(None)
    assert take(transport) == b"waited 1\r\n" + b"a\r\n" * 5 + b"b\r\n"
    assert reading(transport)


def test_theQueuedLinesAreCountedAfreshOnceSomeHaveRun():
    """
    Lines taken by the commands that ran no longer count towards the
    limit; lines waiting behind the next command that waits do.
    """
    protocol, transport, _ = connect()
    protocol.maxQueuedCommands = 5
    protocol.dataReceived(b"WAIT 1\r\n")
    trickle(protocol, b"SAY a\r\n" * 3 + b"WAIT 2\r\n" + b"SAY b\r\n" * 3)
    assert not reading(transport)
    protocol.pending.pop(0).callback(None)
    assert take(transport) == b"waited 1\r\n" + b"a\r\n" * 3
    # Three lines wait behind WAIT 2: reading again, up to two more.
    assert reading(transport)
    trickle(protocol, b"SAY c\r\n" * 2)
    assert reading(transport)
    trickle(protocol, b"SAY d\r\n")
    assert not reading(transport)
    protocol.pending.pop(0).callback(None)
    assert take(transport) == b"waited 2\r\n" + b"b\r\n" * 3 + b"c\r\n" * 2 + b"d\r\n"
    assert reading(transport)


def test_noLinesAreCountedThatRanBeforeTheBufferGrewAgain():
    """
    Every waiting line has run: longer input that arrives afterwards (here
    in one read) is counted on its own (four lines under a limit of five
    keep the session reading), not with the lines that came before.
    """
    protocol, transport, _ = connect()
    protocol.maxQueuedCommands = 5
    protocol.dataReceived(b"WAIT 1\r\n")
    trickle(protocol, b"SAY a\r\n" * 6 + b"WAIT 2\r\n")
    assert not reading(transport)
    protocol.pending.pop(0).callback(None)
    assert take(transport) == b"waited 1\r\n" + b"a\r\n" * 6
    assert reading(transport)
    protocol.dataReceived(b"SAY bbbbbbbbbbbb\r\n" * 4)
    assert reading(transport)
    protocol.pending.pop(0).callback(None)
    assert take(transport) == b"waited 2\r\n" + b"bbbbbbbbbbbb\r\n" * 4


def test_linesInPiecesBehindAWaitingCommandRunWhole():
    """
    A line split across reads while a command waits, and another after a
    raw part, reach their handlers whole, as bytes.
    """
    protocol, transport, _ = connect()
    seen = []
    handler = protocol.lineReceived
    protocol.lineReceived = lambda line: seen.append(line) or handler(line)
    protocol.dataReceived(b"WAIT 1\r\nSA")
    protocol.dataReceived(b"Y one\r\nRAW 3\r")
    protocol.dataReceived(b"\nxyzSAY t")
    protocol.dataReceived(b"wo\r\n")
    protocol.pending.pop(0).callback(None)
    assert take(transport) == b"waited 1\r\none\r\ngo\r\nraw b'xyz'\r\ntwo\r\n"
    assert seen == [b"WAIT 1", b"SAY one", b"RAW 3", b"SAY two"]
    assert all(type(line) is bytes for line in seen)


def test_aVerbIsMatchedInASCIIOnly():
    """
    A verb with a letter that Unicode upper-cases to an ASCII one (a long
    s, a dotless i) names no command: "\u017fay" is not SAY.
    """
    protocol, transport, _ = connect()
    protocol.dataReceived("\u017fay hi\r\nsay ok\r\n".encode("utf-8"))
    assert take(transport) == "bad unknown '\u017fay'\r\nok\r\n".encode("utf-8")


def test_aLineSplitAnywhereIsOneLine():
    protocol, transport, _ = connect()
    for piece in (b"S", b"AY sp", b"lit\r", b"\nSAY x\n"):
        protocol.dataReceived(piece)
    assert take(transport) == b"split\r\nx\r\n"


def test_anOverLongLineIsDroppedAsItArrivesAndAnsweredWhereItEnds():
    protocol, transport, _ = connect()
    protocol.dataReceived(b"SAY ok\r\nSAY " + b"x" * 100)
    assert take(transport) == b"ok\r\n"
    assert len(protocol._buffer) < Echo.maxCommandLength
    protocol.dataReceived(b"y" * 100000)
    assert len(protocol._buffer) < Echo.maxCommandLength
    protocol.dataReceived(b"z\r\nSAY next\r\n")
    assert take(transport) == b"bad too long\r\nnext\r\n"


def test_exactlyTheLimitIsAccepted():
    protocol, transport, _ = connect()
    line = b"SAY " + b"x" * (Echo.maxCommandLength - 6) + b"\r\n"
    assert len(line) == Echo.maxCommandLength
    protocol.dataReceived(line + b"SAY " + b"x" * (Echo.maxCommandLength - 5) + b"\r\n")
    assert take(transport) == line[4:] + b"bad too long\r\n"


def test_aClientThatHalfClosesIsAnsweredThenClosed():
    """
    Commands followed by the client's end of input (a half-close): each
    runs and is answered, a waiting one included, and only then does the
    session close; an unfinished last line is dropped.
    """
    protocol, transport, _ = connect()
    protocol.dataReceived(b"SAY a\r\nWAIT 1\r\nSAY b\r\nSAY unfinish")
    protocol.readConnectionLost()
    assert take(transport) == b"a\r\n"
    assert not transport.disconnecting
    protocol.pending.pop(0).callback(None)
    assert take(transport) == b"waited 1\r\nb\r\n"
    assert transport.disconnecting


def test_aClientThatHalfClosesWhileNotReadingIsClosedOnceItReads():
    """
    The client's end of input arrives while its replies wait for it to
    read (the transport paused the session): the session closes when
    they have gone, not before.
    """
    protocol, transport, _ = connect()
    protocol.pauseProducing()
    protocol.dataReceived(b"SAY a\r\nSAY b\r\n")
    protocol.readConnectionLost()
    assert take(transport) == b""
    assert not transport.disconnecting
    protocol.resumeProducing()
    assert take(transport) == b"a\r\nb\r\n"
    assert transport.disconnecting


def test_aHalfCloseInRawModeEndsTheSession():
    protocol, transport, _ = connect()
    protocol.dataReceived(b"RAW 10\r\nabc")
    protocol.readConnectionLost()
    assert take(transport) == b"go\r\n"
    assert transport.disconnecting


def test_badCommandsAreCountedAndCloseTheSession():
    protocol, transport, _ = connect()
    protocol.dataReceived(b"REFUSE a\r\n\x00\r\n\xff\r\n")
    assert take(transport) == b"bad refused a\r\nbad invalid characters in command\r\nbad command is not valid UTF-8\r\n"
    assert not protocol.closed
    protocol.dataReceived(b"NOPE\r\nSAY never\r\n")
    assert take(transport) == b"bad unknown 'NOPE'\r\nbye, too many\r\n"
    assert protocol.closed and transport.disconnecting


def test_anInternalErrorCostsOneReplyAndIsLoggedWithTheContext():
    protocol, transport, _ = connect()
    events = []
    protocol.log = Logger(observer=events.append)
    protocol.dataReceived(b"FAIL detail\r\nSAY still here\r\n")
    assert take(transport) == b"oops\r\nstill here\r\n"
    [event] = events
    assert event["event"] == "session.error"
    assert event["session"] == protocol.sessionId
    assert event["protocol"] == "echo" and event["peer"] == "192.0.2.9:1234"
    assert event["log_failure"].check(RuntimeError)


@pytest.mark.parametrize("method, twistedMethod", [
    ("logInfo", "info"), ("logWarning", "warn"), ("logError", "error"),
])
def test_aSessionEventIsTheEventTwistedsLoggerWouldEmit(method, twistedMethod):
    """
    A session's events skip L{Logger.emit}'s checks, not its fields: the
    same keys and values (but the time) reach the same observer, and
    Twisted formats the same text from them.
    """
    protocol, transport, _ = connect()
    events = []
    protocol.log = Logger(namespace="mailgate.test", source=protocol, observer=events.append)
    protocol.user = "alice@example.org"
    getattr(protocol, method)("session.test", "did {this}", count=3)
    getattr(protocol.log, twistedMethod)(
        "{line}", line="did {this}", event="session.test", **protocol.logContext(count=3)
    )
    ours, twisteds = events
    assert ours["log_time"] == pytest.approx(twisteds["log_time"], abs=5)
    assert {k: v for k, v in ours.items() if k != "log_time"} == {
        k: v for k, v in twisteds.items() if k != "log_time"
    }
    assert ours["user"] == "alice@example.org" and ours["count"] == 3
    assert formatEvent(ours) == formatEvent(twisteds) == "did {this}"


def test_rawModeTakesEffectExactlyWhereItStarts():
    protocol, transport, _ = connect()
    protocol.dataReceived(b"RAW 10\r\n0123456789SAY after\r\n")
    assert take(transport) == b"go\r\nraw b'0123456789'\r\nafter\r\n"
    protocol.dataReceived(b"RAW 4\r\nSAY ")
    protocol.dataReceived(b"xSAY y\r\n")
    assert take(transport) == b"go\r\nraw b'SAY '\r\nbad unknown 'XSAY'\r\n"


def test_startTLSDiscardsWhatWasPipelinedInTheClear():
    protocol, transport, _ = connect()
    protocol.dataReceived(b"TLS\r\nSAY injected\r\nSAY partial")
    assert transport.clearText == b"tls\r\n"
    assert transport.value() == b"tls\r\n"
    protocol.dataReceived(b"SAY over tls\r\n")
    assert transport.value() == b"tls\r\nover tls\r\n"


def test_theIdleTimerCountsFromTheLastInput():
    protocol, transport, clock = connect()
    clock.advance(50)
    protocol.dataReceived(b"SAY x\r\n")
    take(transport)
    clock.advance(59)
    assert not protocol.closed
    clock.advance(1)
    assert take(transport) == b"idle stalled=False\r\n"
    assert protocol.closed and transport.disconnecting


class _Stress(OpenPolicy):
    """
    A policy whose stress a test turns on and off.
    """

    stressed = False

    def underStress(self):
        return self.stressed


class _Untimed(Echo):
    idleTimeout = 0
    stressIdleTimeout = 10


def test_withNoIdleTimeoutOnlyAStressClosesAnIdleSession():
    """
    With no idle timeout (C{--idle-timeout 0}), a session opened under
    stress is held to the stress timeout while the stress lasts; once it
    is over, the check that stress set finds no timeout that applies, and
    the session stays, however long it is idle: it was closed at once,
    its last line a few seconds old.  When a new connection brings the
    stress back, an idle session is held to it again.
    """
    clock = Clock()
    policy = _Stress()
    factory = SessionFactory(clock, policy=policy)
    factory.protocol = _Untimed

    def connect():
        protocol = factory.buildProtocol(PEER)
        transport = CountingTransport(peerAddress=PEER)
        protocol.makeConnection(transport)
        return protocol, transport

    policy.stressed = True
    protocol, transport = connect()
    clock.advance(5)
    protocol.dataReceived(b"SAY x\r\n")
    policy.stressed = False
    connect()
    clock.advance(6)
    assert not protocol.closed
    clock.advance(3600)
    assert not protocol.closed
    assert not clock.getDelayedCalls()
    policy.stressed = True
    connect()
    assert protocol.closed and b"idle stalled=False\r\n" in transport.value()


def test_aCommandTheClientWaitsForIsNotIdleness():
    protocol, transport, clock = connect()
    protocol.dataReceived(b"WAIT x\r\n")
    clock.advance(600)
    assert not protocol.closed
    protocol.pending.pop().callback(None)
    assert take(transport) == b"waited x\r\n"


def test_aClientThatDoesNotReadIsAbortedWhenIdle():
    protocol, transport, clock = connect()
    protocol.pauseProducing()  # the transport's buffer is full
    clock.advance(60)
    # Nothing more can be said to it: the protocol is told so, and the
    # connection is aborted rather than closed after a write that would
    # never leave.
    assert take(transport) == b"idle stalled=True\r\n"
    assert protocol.closed and transport.disconnected


def test_thePolicyRefusesBeforeTheGreeting():
    class Refusing:
        def admit(self, protocol, address):
            return "not today"

    clock = Clock()
    factory = SessionFactory(clock, policy=Refusing())
    factory.protocol = Echo
    protocol = factory.buildProtocol(PEER)
    transport = TLSStringTransport(peerAddress=PEER)
    protocol.makeConnection(transport)
    assert transport.value() == b"refused not today\r\n"
    assert transport.disconnecting
    protocol.dataReceived(b"SAY x\r\n")
    assert transport.value() == b"refused not today\r\n"


def test_sessionIds():
    first, second = newSessionId(), newSessionId()
    prefix, _, number = first.partition(".")
    assert second == f"{prefix}.{int(number) + 1}"
    assert len(prefix) == 12 and int(prefix, 16) >= 0


def test_aForkedChildHandsOutIdsOfItsOwn():
    """
    twistd daemonizing forks after the parent may have handed out ids: the
    child draws a prefix of its own, so no id is ever handed out twice.
    """
    parentPrefix = newSessionId().partition(".")[0]
    reading, writing = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(writing, newSessionId().encode("ascii"))
        finally:
            os._exit(0)
    os.close(writing)
    try:
        childId = os.read(reading, 100).decode("ascii")
    finally:
        os.close(reading)
        os.waitpid(pid, 0)
    childPrefix, _, number = childId.partition(".")
    assert len(childPrefix) == 12 and childPrefix != parentPrefix
    assert number == "1"
    assert newSessionId().partition(".")[0] == parentPrefix


@pytest.mark.parametrize(
    "address, text",
    [
        (IPv4Address("TCP", "192.0.2.1", 110), "192.0.2.1:110"),
        (IPv6Address("TCP", "2001:db8::1", 995), "[2001:db8::1]:995"),
        (UNIXAddress(b"/run/mailgate/lmtp"), "unix:/run/mailgate/lmtp"),
        (UNIXAddress(None), "unix"),
    ],
)
def test_addressesInTheLogs(address, text):
    assert describeAddress(address) == text


# -- what an ended session leaves --------------------------------------------


def test_anEndedSessionIsFreedWithoutTheCycleCollector():
    """
    Once its connection is lost, nothing of a session refers back to it
    (its reply writer, its idle timer): it is freed as soon as the
    connection lets go, by reference counting alone, not at Python's next
    full garbage collection, which on a busy server comes thousands of
    sessions later (and, over TLS, with each one's OpenSSL buffers).
    """
    with withoutCycleCollector():
        protocol, transport, _ = connect()
        protocol.dataReceived(b"SAY hi\r\n")
        protocol.connectionLost(Failure(ConnectionDone()))
        ended = weakref.ref(protocol)
        del protocol
        assert ended() is None


def test_aReplyMadeAfterTheEndIsDropped():
    """
    A command that was waiting (on the store) when the client went away
    finishes without error, and its reply goes nowhere.
    """
    protocol, transport, _ = connect()
    protocol.dataReceived(b"WAIT x\r\n")
    protocol.connectionLost(Failure(ConnectionDone()))
    transport.clear()
    protocol.pending[0].callback(None)
    assert take(transport) == b""
