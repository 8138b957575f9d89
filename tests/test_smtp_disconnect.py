"""
Every admitted SMTP and LMTP session ends with one line,
C{smtp.disconnect} (C{lmtp.disconnect}), as Postfix's "disconnect from"
line: the client, the name it gave, why the session ended, how long it
lasted and what it did.  An administrator asked "why does this MTA keep
reconnecting" or "is someone guessing addresses" reads it there, without
turning a trace on.

The tests read what an administrator reads: the formatted line, and the
fields the JSON format writes.
"""

import pytest
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.logger import formatEvent
from twisted.python.failure import Failure

from mailgate.testing import SMTPSession, addUser

from test_refusal_logs import ALICE, PASSWORD, PEER, SENDER, capture

kinds = pytest.mark.parametrize("kind", ["smtp", "lmtp"])


@pytest.fixture
def users(store):
    addUser(store, ALICE, PASSWORD)
    return store


def start(store, kind, **options):
    s = SMTPSession(store, lmtp=kind == "lmtp", **options)
    return s, capture(s)


def hello(kind):
    return "LHLO client.test" if kind == "lmtp" else "EHLO client.test"


def ends(events, kind):
    return [e for e in events if e.get("event") == f"{kind}.disconnect"]


def lost(s, why=ConnectionDone):
    s.protocol.connectionLost(Failure(why()))


@kinds
def test_aSessionThatDeliveredEndsWithOneLineSayingWhatItDid(users, kind):
    s, events = start(users, kind)
    assert s.command(hello(kind)).startswith("250")
    assert s.command(f"MAIL FROM:<{SENDER}>").startswith("250")
    assert s.command(f"RCPT TO:<{ALICE}>").startswith("250")
    assert s.command("RCPT TO:<nobody@example.org>").startswith("550")
    assert s.command("DATA").startswith("354")
    s.advance(2.5)
    assert s.command("Subject: hi\r\n\r\nhello\r\n.").startswith("250")
    assert s.command("NOOP").startswith("250")
    assert s.command("QUIT").startswith("221")
    assert not ends(events, kind), "nothing is said before the connection is gone"
    lost(s)
    [event] = ends(events, kind)
    assert formatEvent(event) == (
        f"{kind} disconnect peer={PEER} helo=<client.test> reason='quit' commands=7 errors={1 if kind == 'smtp' else 0} "
        f"rcpt=1/2 messages=1 tls=no seconds=2.500"
    )
    assert event["event"] == f"{kind}.disconnect"
    assert (event["helo"], event["reason"], event["tls"], event["seconds"]) == ("client.test", "quit", False, 2.5)
    assert (event["commands"], event["rcpt"], event["recipients"], event["messages"]) == (7, 2, 1, 1)


def test_aClientThatGoesAwayIsSaidToHaveGoneAway(users):
    s, events = start(users, "smtp")
    lost(s, ConnectionLost)
    [event] = ends(events, "smtp")
    assert formatEvent(event) == (
        f"smtp disconnect peer={PEER} helo=<> reason='connection lost' commands=0 errors=0 "
        "rcpt=0/0 messages=0 tls=no seconds=0.000"
    )


def test_aSessionClosedForItsErrorsSaysSo(users):
    """
    A client guessing addresses: every RCPT refused, the session closed at
    the error limit; the end line shows the guessing (C{rcpt=0/N}).
    """
    s, events = start(users, "smtp")
    s.command(hello("smtp"))
    s.command(f"MAIL FROM:<{SENDER}>")
    limit = s.protocol.maxBadCommands
    for number in range(limit):
        assert not s.disconnected
        s.command(f"RCPT TO:<guess{number}@example.org>")
    assert s.disconnected
    lost(s)
    [event] = ends(events, "smtp")
    assert event["reason"] == "too many errors"
    assert (event["commands"], event["errors"], event["rcpt"], event["recipients"]) == (limit + 2, limit, limit, 0)


def test_anIdleSessionSaysItTimedOut(users):
    s, events = start(users, "smtp")
    s.command(hello("smtp"))
    assert s.advance(s.protocol.idleTimeout).startswith(b"421 4.4.2")
    lost(s)
    [event] = ends(events, "smtp")
    assert event["reason"] == "idle timeout"
    assert event["seconds"] == s.protocol.idleTimeout


def test_aSessionInItsTLSHandshakeAtTheShutdownSaysShutdown(users):
    """
    A session still in its STARTTLS handshake when the server stops is
    aborted at once, with no 421 to send: its end line says the shutdown
    ended it, not the client going away.
    """
    s, events = start(users, "smtp")
    s.command(hello("smtp"))
    # What the TLS layer under the session says until the handshake is done.
    s.transport.handshaking = True
    s.protocol.shutdownRequested()
    assert s.transport.disconnected
    lost(s)
    [event] = ends(events, "smtp")
    assert event["reason"] == "shutdown"


def test_theHelloNameIsShownPrintableAndCut(users):
    s, events = start(users, "smtp")
    # A right-to-left override would turn the rest of the log line around
    # on the administrator's terminal.
    assert s.command("EHLO " + "\u202ex" + "y" * 200).startswith("250")
    lost(s)
    [event] = ends(events, "smtp")
    assert event["helo"] == "?x" + "y" * 62
    assert "\u202e" not in formatEvent(event)


def test_aRefusedConnectionHasItsRefusalLineOnly(users):
    """
    A connection refused as it arrived (banned, too many) is logged as
    refused (C{session.refused}); it never was a session, so no end line.
    """

    class Refusing:
        def admit(self, protocol, address):
            return "too many connections"

        def connectionClosed(self, protocol, address):
            raise AssertionError("never admitted")

    s, events = start(users, "smtp", policy=Refusing())
    lost(s)
    assert not ends(events, "smtp")
