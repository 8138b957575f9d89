"""
The command-session core's bookkeeping of a load balancer's health check
(L{mailgate.session.CommandSession.healthCheck}), without sockets: a small
line protocol that names its checks' commands, on a L{StringTransport}
whose C{namedNoClient} says what a PROXY header would.  What POP3 and SMTP
do with it (no end line) is tested in test_pop3_sessionends,
test_e2e_sessionends and, with a real HAProxy, test_pairings.
"""

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from mailgate.session import CommandError, CommandSession, SessionFactory

PEER = IPv4Address("TCP", "192.0.2.9", 1234)


class Checked(CommandSession):
    protocolName = "checked"
    commandPrefix = "checked_"
    healthCheckCommands = frozenset(["PING", "QUIT"])

    def greet(self):
        self._out.write(b"hello\r\n")

    def syntaxError(self, text):
        self._out.write(b"bad\r\n")
        self.countBadCommand()

    def unknownCommand(self, verb):
        self.syntaxError("unknown")

    def lineTooLong(self):
        # Answered without counting it: the core notes it all the same.
        self._out.write(b"too long\r\n")

    def foreignLineRefused(self, why):
        self._out.write(b"bye\r\n")

    def checked_PING(self, argument):
        if argument:
            raise CommandError("PING takes nothing")
        self._out.write(b"pong\r\n")

    def checked_QUIT(self, argument):
        self._out.write(b"bye\r\n")

    def checked_WORK(self, argument):
        self._out.write(b"done\r\n")


class Forgiving(Checked):
    """
    A protocol that counts refusals afresh at each success, as POP3 does
    at each C{+OK}.
    """

    def checked_PING(self, argument):
        super().checked_PING(argument)
        self.forgiveBadCommands()


class Unchecked(Checked):
    healthCheckCommands = frozenset()


def connect(protocol=Checked, namedNoClient=True):
    factory = SessionFactory(Clock())
    factory.protocol = protocol
    session = factory.buildProtocol(PEER)
    transport = StringTransport(peerAddress=PEER)
    transport.namedNoClient = namedNoClient
    session.makeConnection(transport)
    assert transport.value() == b"hello\r\n"
    return session


def test_aSessionNamingNoClientThatSentOnlyCheckCommandsIsACheck():
    session = connect()
    assert session.healthCheck()
    session.dataReceived(b"ping\r\nPING\r\nQuit\r\n")
    assert session.transport.value().endswith(b"pong\r\npong\r\nbye\r\n")
    assert session.healthCheck()


def test_aSessionThatNamedItsClientIsNoCheck():
    assert not connect(namedNoClient=False).healthCheck()
    session = connect()
    del session.transport.namedNoClient
    assert not session.healthCheck()


def test_aCommandNoCheckSendsMakesItNoCheckForGood():
    session = connect()
    session.dataReceived(b"PING\r\nWORK\r\nPING\r\nQUIT\r\n")
    assert not session.healthCheck()


def test_anUnknownOrUnreadableLineIsNoCheck():
    for line in [b"NOPE", b"", b" PING", b"PI\x01NG", b"P\xc4\xb1NG"]:
        session = connect()
        session.dataReceived(line + b"\r\n")
        assert not session.healthCheck(), line


def test_aRefusedCheckCommandIsNoCheck():
    session = connect()
    session.dataReceived(b"PING now\r\n")
    assert session.transport.value().endswith(b"bad\r\n")
    assert not session.healthCheck()


def test_aProtocolWithoutCheckCommandsCountsOnlySilenceAsACheck():
    session = connect(Unchecked)
    assert session.healthCheck()
    session.dataReceived(b"QUIT\r\n")
    assert not session.healthCheck()


def test_aLineOfAnotherProtocolIsLeftToTheProtocol():
    """
    A line of another protocol is no command the core notes: the session
    ends on the protocol's terms (SMTP counts it an error, which its end
    line asks besides).
    """
    session = connect()
    session.dataReceived(b"GET / HTTP/1.1\r\n")
    assert session.transport.value().endswith(b"bye\r\n")
    assert session.healthCheck()


def test_aProtocolNotesALineItAnswersItself():
    session = connect()
    session.noteCommand("QUIT")
    assert session.healthCheck()
    session.noteCommand("BDAT")
    assert not session.healthCheck()


@pytest.mark.parametrize(
    "line",
    [b"PING \x01", b"PING " + b"x" * 600, b"PING x", b"NOPE"],
    ids=["control characters", "too long", "a check command refused", "unknown"],
)
def test_aRefusedLineMakesItNoCheckEvenOnceForgiven(line):
    """
    A bad line, then check commands that succeed (POP3 forgives refusals
    at each C{+OK}): the session is no check, and has its end line.
    """
    session = connect(Forgiving)
    session.dataReceived(line + b"\r\nPING\r\nQUIT\r\n")
    assert session.transport.value().endswith(b"pong\r\nbye\r\n")
    assert session._badCommands == 0
    assert not session.healthCheck()


def test_aLineTooLongIsNoCheckWhateverTheProtocolCounts():
    session = connect()
    session.dataReceived(b"PING " + b"x" * 600 + b"\r\nQUIT\r\n")
    assert session.transport.value() == b"hello\r\ntoo long\r\nbye\r\n"
    assert session._badCommands == 0
    assert not session.healthCheck()
