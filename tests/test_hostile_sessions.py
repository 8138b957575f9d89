"""
Hostile clients, generated from seeds (deterministic, bounded): whole
sessions driven through what a real connection can do to them, in any
order, checked for what must hold whatever happened.

  - Over TLS (mailgate's own layer and Python's C{ssl} on memory BIOs),
    on POP3, SMTP and LMTP, with or without a PROXY header in front (valid
    or not, in pieces): commands, the client's close_notify, a corrupt
    record, octets that are no TLS, the connection half-closed or lost,
    a client that stops reading, time passing.  Nothing is logged as an
    error or with a traceback, and no connection outlives the timeouts.
  - POP3 logins of every kind (USER/PASS, PLAIN, SCRAM to its last step)
    ended every way a session ends (QUIT, a lost connection, the login or
    idle timeout, a shutdown and its grace, a half-close): the maildrop is
    never left locked, and nothing is logged as an error.

test_fuzz.py generates the octets of single sessions (Hypothesis); these
generate what happens around them.
"""

import base64
import random
import ssl
import struct

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure

from mailgate.session.proxy import ProxyHeaderFactory
from mailgate.session.tlslayer import TLSLayer, TLSLayerFactory
from mailgate.testing import POP3Session, addUser, deliver, pop3Factory, smtpFactory

from saslclients import ScramClient

ALICE = "alice@example.org"
PASSWORD = "secret"
CLIENT = IPv4Address("TCP", "198.51.100.7", 1234)
BALANCER = IPv4Address("TCP", "127.0.0.1", 4000)


@pytest.fixture
def alice(store):
    addUser(store, ALICE, PASSWORD)
    for i in range(3):
        deliver(store, [ALICE], b"Subject: %d\r\n\r\n.dot\r\nbody\r\n" % i)
    return store


@pytest.fixture
def errors():
    """
    Every event logged with a failure or at error level or above, while
    the test runs.
    """
    seen = []

    def observe(event):
        if "log_failure" in event or event.get("log_level") in (LogLevel.error, LogLevel.critical):
            seen.append(event)

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


def b64(data):
    return base64.b64encode(data)


def pieces(data, r):
    """
    C{data} cut where C{r} says: single octets, a few, or all of it.
    """
    position = 0
    while position < len(data):
        size = r.choice([1, 2, 3, 7, 50, 500, len(data)])
        yield data[position : position + size]
        position += size


class Connection(StringTransport):
    """
    The connection beneath, as far as a session asks.
    """

    def setTcpNoDelay(self, enabled):
        pass

    def getTcpNoDelay(self):
        return True


def _v2(family=0x11, command=0x21, body=None, tlvs=b""):
    if body is None:
        body = bytes([198, 51, 100, 7, 192, 0, 2, 1]) + struct.pack("!HH", 1234, 995)
    body += tlvs
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([command, family]) + struct.pack("!H", len(body)) + body


#: PROXY headers a balancer (or something pretending to be one) sends:
#: valid ones of each kind, and ones cut short, malformed or too long.
HEADERS = [
    b"PROXY TCP4 198.51.100.7 192.0.2.1 1234 995\r\n",
    b"PROXY UNKNOWN\r\n",
    b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n",
    _v2(),
    _v2(command=0x20),
    _v2(family=0),
    _v2(family=0x31, body=b"\0" * 216),
    _v2(tlvs=b"\x20\x00\x05\x01\0\0\0\0"),
    _v2(tlvs=b"\x04\x00\x03abc\x20\x00\x05\x00\0\0\0\0"),
    _v2(tlvs=b"\x04\x0f\xcd" + b"z" * 4045),
    # Refused: cut short, malformed, too long, not a header.
    _v2(tlvs=b"\x20\x00\x01\x01"),
    _v2(tlvs=b"\x20"),
    _v2(family=0x21, body=b"\0" * 16),
    _v2(tlvs=b"\x04\x0f\xce" + b"z" * 4046),
    b"PROXY TCP4 198.51.100.7 192.0.2.1 1234 995 6\r\n",
    b"PROXY TCP4 198.51.100.7 192.0.2.1 1234 995\n",
    b"\x16\x03\x01\x00\x10",
    b"CAPA\r\n",
]

POP3_COMMANDS = [
    b"CAPA", b"USER " + ALICE.encode(), b"PASS " + PASSWORD.encode(), b"STAT", b"RETR 1", b"LIST",
    b"UIDL", b"TOP 1 0", b"DELE 2", b"RSET", b"NOOP", b"QUIT", b"STLS", b"AUTH", b"AUTH PLAIN",
    b"AUTH PLAIN " + b64(b"\0" + ALICE.encode() + b"\0" + PASSWORD.encode()), b"*", b"=", b"A" * 300,
]
SMTP_COMMANDS = [
    b"EHLO client.test", b"LHLO client.test", b"MAIL FROM:<a@remote.test>", b"RCPT TO:<" + ALICE.encode() + b">",
    b"RCPT TO:<nobody@example.org>", b"DATA", b"Subject: x", b"", b".", b"BDAT 5 LAST", b"BDAT 3", b"12345",
    b"STARTTLS", b"RSET", b"NOOP", b"QUIT", b"A" * 600,
]


class HostileTLSClient:
    """
    One session (of C{protocol}) on a L{TLSLayer} over a L{Connection},
    behind a PROXY wrapper or not, and a TLS client on memory BIOs that
    does to it what C{r} chooses.
    """

    def __init__(self, store, tls, r, protocol, proxied):
        self.r = r
        self.clock = Clock()
        if protocol == "pop3":
            factory = pop3Factory(store, self.clock)
            self.commands = POP3_COMMANDS
        else:
            factory = smtpFactory(store, self.clock, lmtp=protocol == "lmtp")
            self.commands = SMTP_COMMANDS
        self.connection = Connection(peerAddress=BALANCER if proxied else CLIENT)
        self.lost = False
        self.received = b""
        if proxied:
            wrapper = ProxyHeaderFactory(TLSLayerFactory(tls, factory, self.clock), self.clock).buildProtocol(None)
            wrapper.makeConnection(self.connection)
            for piece in pieces(r.choice(HEADERS), r):
                wrapper.dataReceived(piece)
            self.below = wrapper
            self.layer = wrapper.wrappedProtocol if wrapper._relaying else None
        else:
            self.layer = TLSLayer(tls.context, factory.buildProtocol(None), self.clock)
            self.layer.makeConnection(self.connection)
            self.below = self.layer
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        if r.random() < 0.3:
            context.maximum_version = ssl.TLSVersion.TLSv1_2
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing)

    def move(self, corrupt=False):
        for _ in range(50):
            data = self.outgoing.read()
            if data and corrupt:
                at = self.r.randrange(len(data))
                data = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]
                corrupt = False
            if data and not self.lost:
                for piece in pieces(data, self.r):
                    self.below.dataReceived(piece)
            back = self.connection.value()
            self.connection.clear()
            if back:
                self.incoming.write(back)
            self.read()
            if not data and not back:
                return
        raise AssertionError("the two sides kept talking")

    def read(self):
        try:
            while True:
                chunk = self.tls.read(65536)
                if not chunk:
                    return
                self.received += chunk
        except ssl.SSLError:
            pass

    def handshake(self):
        for _ in range(10):
            try:
                self.tls.do_handshake()
                self.move()
                return
            except ssl.SSLWantReadError:
                self.move()
            except ssl.SSLError:
                return

    def lose(self, reason=ConnectionDone):
        if not self.lost:
            self.lost = True
            self.below.connectionLost(Failure(reason()))

    def act(self):
        r = self.r
        kind = r.choice(
            ["send", "send", "send", "close_notify", "corrupt", "garbage", "half-close", "lose", "wait",
             "stop reading", "read again", "long record"]
        )
        session = self.layer.protocol if self.layer is not None and self.layer.protocol is not None else None
        try:
            if kind == "send":
                self.tls.write(b"".join(r.choice(self.commands) + b"\r\n" for _ in range(r.randint(1, 5))))
                self.move()
            elif kind == "long record":
                self.tls.write(b"X" * r.choice([16383, 16384, 16385, 70000]) + b"\r\n")
                self.move()
            elif kind == "close_notify":
                self.tls.unwrap()
            elif kind == "corrupt":
                self.tls.write(b"NOOP\r\n")
                self.move(corrupt=True)
            elif kind == "garbage" and not self.lost:
                self.below.dataReceived(bytes(r.randrange(256) for _ in range(r.randint(1, 40))))
                self.move()
            elif kind == "half-close" and not self.lost:
                self.below.readConnectionLost()
                self.move()
            elif kind == "lose":
                self.lose(r.choice([ConnectionDone, ConnectionLost]))
            elif kind == "wait":
                self.clock.advance(r.choice([1, 10, 300, 700]))
                self.move()
            elif kind == "stop reading" and session is not None and not self.connection.disconnecting:
                session.pauseProducing()
            elif kind == "read again" and session is not None and not self.connection.disconnecting:
                session.resumeProducing()
        except ssl.SSLError:
            # The client's own side is broken (it read the server's alert).
            pass
        self.move()
        return kind


@pytest.mark.parametrize("first", range(0, 240, 60))
def test_sessionsOverTLSSurviveHostileClients(alice, tls, errors, first):
    for seed in range(first, first + 60):
        r = random.Random(seed)
        client = HostileTLSClient(alice, tls, r, r.choice(["pop3", "smtp", "lmtp"]), proxied=r.random() < 0.4)
        done = []
        if client.layer is None:
            # The PROXY header was refused, or is not whole (a v1 header
            # ended by a bare LF): the connection is dropped, at once or
            # once the header's time is up.
            client.clock.advance(ProxyHeaderFactory.headerTimeout)
            assert client.connection.disconnecting, seed
            client.lose()
            continue
        if r.random() < 0.1:
            client.below.dataReceived(bytes(r.randrange(256) for _ in range(r.randint(1, 300))))
            done.append("no TLS")
        client.handshake()
        for _ in range(r.randint(1, 12)):
            done.append(client.act())
            if client.lost:
                break
        # However it went, the server ends the connection in time: nothing
        # is left waiting for ever.
        client.clock.advance(1000)
        client.move()
        client.clock.advance(1000)
        assert client.lost or client.connection.disconnecting, (seed, done)
        client.lose()
        client.clock.advance(1000)
        # The layer let go of the session and of OpenSSL's state.
        assert client.layer.protocol is None, (seed, done)
        assert b"Traceback" not in client.received, (seed, done)
        assert errors == [], (seed, done, errors)


def _scramLogin(s, r):
    """
    SCRAM-SHA-256 to its last step, with the right or a wrong password; the
    server's proof answered, cancelled, or not at all.
    """
    client = ScramClient(ALICE, r.choice([PASSWORD, "wrong"]))
    reply = s.send(b"AUTH SCRAM-SHA-256 " + b64(client.first()) + b"\r\n") + s.advance(0)
    if not reply.startswith(b"+ "):
        return
    final = client.final(base64.b64decode(reply[2:].split(b"\r\n")[0]))
    reply = s.send(b64(final) + b"\r\n") + s.advance(0)
    if reply.startswith(b"+ ") and r.random() < 0.7:
        s.send(r.choice([b"\r\n", b"*\r\n", b"x" * 5000 + b"\r\n"]))


def _pop3Action(s, r):
    protocol = s.protocol
    kind = r.choice(
        ["user/pass", "plain", "scram", "commands", "commands", "wait", "stop reading", "read again",
         "shutdown", "grace", "half-close", "lose", "quit"]
    )
    if kind == "user/pass":
        s.send(b"USER " + ALICE.encode() + b"\r\nPASS " + r.choice([PASSWORD.encode(), b"wrong"]) + b"\r\n")
    elif kind == "plain":
        password = r.choice([PASSWORD.encode(), b"wrong"])
        data = b"AUTH PLAIN\r\n" + b64(b"\0" + ALICE.encode() + b"\0" + password) + b"\r\n"
        for piece in pieces(data, r):
            s.send(piece)
    elif kind == "scram":
        _scramLogin(s, r)
    elif kind == "commands":
        data = b"".join(r.choice(POP3_COMMANDS) + b"\r\n" for _ in range(r.randint(1, 6)))
        for piece in pieces(data, r):
            s.send(piece)
    elif kind == "wait":
        s.advance(r.choice([0.5, 1, 10, 200, 700]))
    elif kind == "stop reading":
        protocol.pauseProducing()
    elif kind == "read again":
        protocol.resumeProducing()
    elif kind == "shutdown":
        protocol.shutdownRequested()
    elif kind == "grace":
        protocol.graceExpired()
    elif kind == "half-close":
        protocol.readConnectionLost()
    elif kind == "lose":
        protocol.connectionLost(Failure(ConnectionDone()))
    elif kind == "quit":
        s.send(b"QUIT\r\n")
    return kind


def test_pop3SessionsEndedAnyWayLeaveTheMaildropFree(alice, errors):
    for seed in range(200):
        r = random.Random(seed)
        options = {"peer": CLIENT} if r.random() < 0.3 else {}
        s = POP3Session(alice, **options)
        done = []
        for _ in range(r.randint(1, 12)):
            done.append(_pop3Action(s, r))
            if done[-1] == "lose":
                break
        s.advance(5)
        if done[-1] != "lose":
            s.protocol.connectionLost(Failure(ConnectionDone()))
        s.advance(1000)
        other = POP3Session(alice)
        reply = other.login(ALICE, PASSWORD)
        assert reply.startswith(f"+OK {ALICE} has "), (seed, done, reply)
        other.send(b"RSET\r\n")
        other.protocol.connectionLost(Failure(ConnectionDone()))
        assert errors == [], (seed, done, errors)
