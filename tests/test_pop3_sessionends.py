"""
Every admitted POP3 session ends with one line in the log, however it
ends (Dovecot's C{pop3-login: Disconnected (...)}, mailgate's own
C{smtp.disconnect}): C{pop3.logout} for one that logged in, as before,
C{pop3.disconnect} for one that did not (a scanner, a password guesser,
a client that gave up in its TLS handshake), with why, the failed
logins, whether TLS was on and how long it lasted; never a user name
that did not log in.  A connection refused as it came has its
C{session.refused} line, one a minute per address, and no other.  The
sessions run over a L{StringTransport}; the client's going away is its
C{connectionLost}.
"""

import ssl

import pytest
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.logger import formatEvent
from twisted.python.failure import Failure

from mailgate.logs import eventAsRecord
from mailgate.pop3.protocol import POP3Server
from mailgate.session import TraceSelection
from mailgate.testing import POP3Session, addUser, pop3Factory
from test_admission import RecordingPolicy

ALICE = "alice@example.org"
PASSWORD = "wonderland"
PEER = "127.0.0.1:40000"


@pytest.fixture
def alice(store):
    addUser(store, ALICE, PASSWORD)
    return ALICE


def closing(events):
    """
    The closing lines logged (pop3.disconnect and pop3.logout), as
    (event, text, JSON record).
    """
    return [
        (e["event"], formatEvent(e), eventAsRecord(e))
        for e in events
        if e.get("event") in ("pop3.disconnect", "pop3.logout")
    ]


def ended(events, reason, authFailed=0, tls=False):
    """
    The one closing line of a session that did not log in, checked: its
    event, text and fields.
    """
    [(event, text, record)] = closing(events)
    assert event == "pop3.disconnect", text
    assert text.startswith(
        f"pop3 disconnect peer={PEER} reason={reason!r} auth_failed={authFailed} tls={'yes' if tls else 'no'}"
    ), text
    assert text.endswith(f" seconds={record['seconds']:.3f}"), text
    assert (record["reason"], record["authFailed"], record["tls"]) == (reason, authFailed, tls)
    assert "user" not in record
    return text, record


def lost(s, failure=None):
    s.protocol.connectionLost(failure or Failure(ConnectionDone()))


def test_quitWithoutLogin(store, alice, logEvents):
    s = POP3Session(store)
    s.clock.advance(2.5)
    assert s.command("QUIT").startswith("+OK")
    lost(s)
    _, record = ended(logEvents, "quit")
    assert record["seconds"] == 2.5


def test_idleTimeout(store, alice, logEvents):
    s = POP3Session(store, loginTimeout=0)
    s.clock.advance(POP3Server.idleTimeout + 1)
    assert s.disconnected
    lost(s)
    ended(logEvents, "idle timeout")


def test_loginTimeout(store, alice, logEvents):
    s = POP3Session(store, loginTimeout=30)
    s.clock.advance(31)
    lost(s)
    ended(logEvents, "login timeout")
    assert [e for e in logEvents if e.get("event") == "pop3.login_timeout"]


def test_failedLoginsThenTheClientCloses(store, alice, logEvents):
    """
    The failed logins are counted; the names tried are not on the line
    (one may be a password typed in the wrong field).
    """
    s = POP3Session(store)
    for name in ("mallory@example.org", "S3cret-typed-as-a-name"):
        s.command(f"USER {name}")
        assert s.command("PASS guess").startswith("-ERR")
    lost(s)
    text, _ = ended(logEvents, "connection lost", authFailed=2)
    assert "mallory" not in text and "S3cret" not in text


def test_tooManyFailedLogins(store, alice, logEvents):
    s = POP3Session(store)
    for _ in range(POP3Server.maxAuthFailures):
        s.command("USER mallory@example.org")
        s.command("PASS guess")
    assert s.disconnected
    lost(s)
    ended(logEvents, "too many failed logins", authFailed=POP3Server.maxAuthFailures)


def test_tooManyBadCommands(store, alice, logEvents):
    s = POP3Session(store)
    for _ in range(POP3Server.maxBadCommands):
        s.command("XYZZY")
    assert s.disconnected
    lost(s)
    ended(logEvents, "too many bad commands")


def test_connectionReset(store, alice, logEvents):
    s = POP3Session(store)
    lost(s, Failure(ConnectionLost("Connection reset by peer")))
    ended(logEvents, "connection lost")


def test_forbiddenCommand(store, alice, logEvents):
    s = POP3Session(store)
    s.send(b"GET / HTTP/1.1\r\n")
    assert s.disconnected
    lost(s)
    ended(logEvents, "forbidden command")


def test_tlsFailed(store, alice, logEvents):
    s = POP3Session(store)
    lost(s, Failure(ssl.SSLError(1, "[SSL: HTTP_REQUEST] http request")))
    ended(logEvents, "TLS failed")


def test_droppedInTheSTLSHandshake(store, alice, logEvents):
    """
    After STLS, gone before the handshake completed (TLS in name only
    here: the transport says the handshake is not over).
    """
    s = POP3Session(store, tls=object())
    assert s.command("STLS").startswith("+OK")
    s.transport.established = False
    lost(s)
    ended(logEvents, "connection lost in TLS handshake")


def test_overTLS(store, alice, logEvents):
    s = POP3Session(store, tls=object())
    assert s.command("STLS").startswith("+OK")
    assert s.command("QUIT").startswith("+OK")
    lost(s)
    ended(logEvents, "quit", tls=True)


def test_shutdown(store, alice, logEvents):
    s = POP3Session(store)
    s.protocol.shutdownRequested()
    assert s.disconnected
    lost(s)
    ended(logEvents, "shutdown")


def test_aLoggedInSessionHasItsLogoutLineAlone(store, alice, logEvents):
    s = POP3Session(store)
    assert s.login(ALICE, PASSWORD).startswith("+OK")
    assert s.command("QUIT").startswith("+OK")
    lost(s)
    [(event, text, _)] = closing(logEvents)
    assert event == "pop3.logout"
    assert text.startswith(f"pop3 logout user={ALICE} peer={PEER} reason='quit' messages=0 ")


def test_aLoggedInSessionsLogoutSaysTLSFailed(store, alice, logEvents):
    """
    A corrupt record ending a logged-in session: its logout line's
    reason says so (it said 'connection lost').
    """
    s = POP3Session(store)
    assert s.login(ALICE, PASSWORD).startswith("+OK")
    lost(s, Failure(ssl.SSLError(1, "[SSL: DECRYPTION_FAILED_OR_BAD_RECORD_MAC] bad record mac")))
    [(event, text, record)] = closing(logEvents)
    assert (event, record["reason"]) == ("pop3.logout", "TLS failed"), text


def test_aRefusedConnectionHasItsRefusalLineAlone(store, alice, logEvents):
    """
    Refused as it came (banned, over the limits): the session.refused
    line, one a minute per address, and no closing line.
    """
    clock = Clock()
    factory = pop3Factory(store, clock, policy=RecordingPolicy(refuse="banned"))
    for _ in range(3):
        s = POP3Session(store, clock=clock, factory=factory)
        lost(s)
    assert closing(logEvents) == []
    assert len([e for e in logEvents if e.get("event") == "session.refused"]) == 1


def test_aBalancersHealthCheckHasNoLine(store, alice, logEvents):
    s = POP3Session(store)
    s.transport.namedNoClient = True
    lost(s)
    assert closing(logEvents) == []


@pytest.mark.parametrize("commands", [["QUIT"], ["CAPA", "QUIT"]], ids=["QUIT", "CAPA QUIT"])
def test_aBalancersCheckThatSaysQuitHasNoLine(store, alice, logEvents, commands):
    """
    HAProxy's C{tcp-check} of a POP3 server (C{expect string +OK}, C{send
    QUIT}) behind a header naming no client: no line for it, every 2
    seconds, as for one that says nothing.
    """
    s = POP3Session(store)
    s.transport.namedNoClient = True
    for command in commands:
        assert s.command(command).startswith("+OK")
    lost(s)
    assert closing(logEvents) == []


@pytest.mark.parametrize(
    "commands, reason, authFailed",
    [(["USER alice@example.org", "PASS wrong", "QUIT"], "quit", 1), (["HELO", "QUIT"], "quit", 0)],
    ids=["a login tried", "a command refused"],
)
def test_aSessionNamingNoClientThatDidMoreIsLogged(store, alice, logEvents, commands, reason, authFailed):
    """
    Behind a header naming no client, a session that tried a login or
    sent a command no check sends is no check: its line is written.
    """
    s = POP3Session(store)
    s.transport.namedNoClient = True
    for command in commands:
        s.command(command)
    lost(s)
    ended(logEvents, reason, authFailed=authFailed)


def test_theTLSLayerTellsWhetherTheConnectionNamedNoClient():
    """
    Over implicit TLS (POP3S) the session's transport is the TLS layer: it
    tells what the connection below it says of its PROXY header, so a
    balancer's check that leaves before its handshake has no line either.
    """
    from mailgate.session.tlslayer import TLSLayer

    layer = TLSLayer.__new__(TLSLayer)
    layer.transport = None
    assert layer.namedNoClient is False
    layer.transport = type("Below", (), {"namedNoClient": True})()
    assert layer.namedNoClient is True


def test_theTraceSaysHowTheSessionEnded(store, alice, logEvents):
    """
    A traced client gone in its TLS handshake: the trace's last line says
    so (it stopped at its first).
    """
    clock = Clock()
    factory = pop3Factory(store, clock, tls=object())
    factory.trace = TraceSelection(["127.0.0.1/32"])
    s = POP3Session(store, clock=clock, factory=factory)
    assert s.command("STLS").startswith("+OK")
    s.transport.established = False
    lost(s)
    traced = [e["trace"] for e in logEvents if e.get("event") == "session.trace"]
    assert traced[-1] == "ended: connection lost in TLS handshake", traced
