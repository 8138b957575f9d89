"""
L{mailgate.session.tlslayer}: TLS between a connection and its session.

In memory: the layer over a C{StringTransport}, a client made of Python's
C{ssl} module on memory BIOs on the other side, a L{Clock} for its timer.
Over a real loopback socket: the layer on Twisted's TCP transport, in both
layouts mailgate uses (implicit TLS, and TLS started on a connection), with
a real TLS client socket.  The end-to-end tests (tests/test_e2e_tls.py)
run POP3S, STLS and STARTTLS with real mail clients.
"""

import select
import socket
import ssl
import sys
import threading
import weakref

import pytest
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol, IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgate.session.refusals import DescriptorAllowance
from mailgate.session.tlslayer import RECORD, TLSLayer, TLSLayerFactory, _records, startTLS
from mailgate.testing import TLSStringTransport
from mailgate.tls import ServerTLS, isSecure
from certs import makeCertificate
from refcounting import withoutCycleCollector

HOST = "mail.example.test"


class Session(Protocol):
    """
    What a session above the layer sees: what it read, and how it ended.
    Its greeting (if any) is written when it is connected.
    """

    def __init__(self, greeting=None, closeAtOnce=False, refuseAtOnce=False):
        self.received = b""
        self.lost = None
        self.greeting = greeting
        self.closeAtOnce = closeAtOnce
        self.refuseAtOnce = refuseAtOnce

    def connectionMade(self):
        if self.greeting is not None:
            self.transport.write(self.greeting)
        if self.closeAtOnce:
            self.transport.loseConnection()
        if self.refuseAtOnce:
            # As the session core refuses a connection as it arrives.
            self.transport.closeRefused()

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.lost = reason


class Client:
    """
    A TLS client on memory BIOs, trusting the test certificate.
    """

    def __init__(self, cafile, maximum=None, hostname=HOST):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cafile=str(cafile))
        if maximum is not None:
            context.set_ciphers("DEFAULT:@SECLEVEL=0")
            context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
            context.maximum_version = maximum
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname=hostname)
        self.error = None

    def step(self):
        try:
            self.tls.do_handshake()
            return True
        except ssl.SSLWantReadError:
            return False
        except ssl.SSLError as e:
            self.error = e
            return False

    def read(self):
        """
        Everything readable now; C{None} once the server's close_notify came.
        """
        data = b""
        try:
            while True:
                chunk = self.tls.read(1 << 16)
                if not chunk:
                    return None if not data else data
                data += chunk
        except ssl.SSLWantReadError:
            return data


class Wire:
    """
    A layer over a C{StringTransport} and a L{Client}, and the moving of
    octets between them.
    """

    def __init__(self, tls, cafile, session, maximum=None, refusals=None):
        self.clock = Clock()
        self.transport = StringTransport()
        self.session = session
        self.layer = TLSLayer(tls.context, session, self.clock)
        if refusals is not None:
            # The test's own, not the process's.
            self.layer.refusals = refusals
        self.layer.makeConnection(self.transport)
        self.client = Client(cafile, maximum)

    def move(self):
        """
        Move octets both ways until neither side has more to say.
        """
        for _ in range(20):
            toServer = self.client.outgoing.read()
            if toServer:
                self.layer.dataReceived(toServer)
            toClient = self.transport.value()
            self.transport.clear()
            if toClient:
                self.client.incoming.write(toClient)
            if not toServer and not toClient:
                return
        raise AssertionError("the two sides kept talking")

    def handshake(self):
        for _ in range(10):
            done = self.client.step()
            self.move()
            if done or self.client.error is not None:
                return done
        raise AssertionError("the handshake neither completed nor failed")

    def send(self, data):
        self.client.tls.write(data)
        self.move()

    def closeNotify(self):
        """
        The client sends its close_notify (and does not wait for the
        server's).
        """
        try:
            self.client.tls.unwrap()
        except ssl.SSLWantReadError:
            pass
        self.move()

    def lose(self, reason=ConnectionDone):
        """
        The connection below reports its end, as Twisted's would.
        """
        self.layer.connectionLost(Failure(reason()))


# -- the handshake -------------------------------------------------------------


def test_theGreetingWaitsForTheHandshake(tls, pair):
    """
    Implicit TLS: the session is connected at once and writes its greeting;
    nothing goes out before the client speaks, and the greeting arrives
    encrypted once the handshake is over.
    """
    wire = Wire(tls, pair[0], Session(b"+OK ready\r\n"))
    assert wire.session.transport is wire.layer
    assert wire.transport.value() == b""
    assert wire.handshake()
    assert wire.client.read() == b"+OK ready\r\n"
    assert wire.layer.version == "TLSv1.3"
    assert isSecure(wire.layer)


def test_bothWaysAfterTheHandshake(tls, pair):
    wire = Wire(tls, pair[0], Session())
    assert wire.layer.version is None and wire.layer.cipher is None
    assert wire.handshake()
    wire.send(b"CAPA\r\nUSER alice\r\n")
    assert wire.session.received == b"CAPA\r\nUSER alice\r\n"
    wire.layer.write(b"+OK\r\n")
    wire.layer.send([b"+OK ", memoryview(b"two"), b"\r\n"])
    wire.layer.writeSequence([b"three\r\n"])
    wire.move()
    assert wire.client.read() == b"+OK\r\n+OK two\r\nthree\r\n"
    # Nothing was written in the clear.
    assert b"alice" not in wire.transport.value()


def test_aLargeReplyArrivesWhole(tls, pair):
    wire = Wire(tls, pair[0], Session())
    assert wire.handshake()
    big = bytes(range(256)) * 1024 + b"\r\n.\r\n"
    wire.layer.send([b"+OK\r\n", big[:1000], memoryview(big)[1000:]])
    received = b""
    for _ in range(100):
        wire.move()
        chunk = wire.client.read()
        received += chunk
        if len(received) >= len(big) + 5:
            break
    assert received == b"+OK\r\n" + big


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1:DeprecationWarning")
def test_aTLS11ClientIsRefusedWithAnAlert(tls, pair):
    """
    A client offering at most TLS 1.1 gets OpenSSL's protocol_version
    alert, the connection is closed, and the session learns why.
    """
    wire = Wire(tls, pair[0], Session(b"+OK ready\r\n"), maximum=ssl.TLSVersion.TLSv1_1)
    assert not wire.handshake()
    assert wire.client.error is not None
    assert "protocol version" in str(wire.client.error)
    assert wire.transport.disconnecting
    wire.lose()
    assert wire.session.lost.check(ssl.SSLError)
    assert wire.session.received == b""


def test_somethingElseThanTLSIsDropped(tls, pair):
    """
    A client speaking plain POP3 to the TLS port: the handshake fails,
    the connection closes, nothing reaches the session, no traceback.
    """
    wire = Wire(tls, pair[0], Session(b"+OK ready\r\n"))
    wire.layer.dataReceived(b"USER alice\r\nPASS secret\r\n")
    assert wire.transport.disconnecting
    wire.lose()
    assert wire.session.received == b""
    assert isinstance(wire.session.lost.value, ssl.SSLError)
    assert wire.session.lost.value.reason == "WRONG_VERSION_NUMBER"
    # Input after the failure is ignored.
    wire.layer.dataReceived(b"more\r\n")
    assert wire.session.received == b""


def test_aLayerIsSecureOnlyOnceItsHandshakeHasCompleted(tls, pair):
    """
    A session over the layer is taken as one over TLS (plaintext logins,
    C{tls=yes} in SMTP's end line) from the end of the handshake on, and
    still once the connection has ended; one whose handshake failed never
    is.
    """
    failed = Wire(tls, pair[0], Session())
    assert not isSecure(failed.layer)
    failed.layer.dataReceived(b"EHLO mx.example.test\r\n")
    failed.lose()
    assert failed.session.lost.check(ssl.SSLError)
    assert not isSecure(failed.layer)
    completed = Wire(tls, pair[0], Session())
    assert completed.handshake()
    assert isSecure(completed.layer)
    completed.lose()
    assert isSecure(completed.layer)


@implementer(IHandshakeListener)
class Listening(Session):
    """
    A session told when the handshake completes (Twisted's
    IHandshakeListener): what the layer said negotiated, then.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.completed = []

    def handshakeCompleted(self):
        self.completed.append((self.transport.version, self.transport.cipher, self.received))


@pytest.mark.parametrize(
    "maximum, version",
    [(ssl.TLSVersion.TLSv1_2, "TLSv1.2"), (None, "TLSv1.3")],
    ids=["TLSv1.2", "TLSv1.3"],
)
def test_theSessionIsToldWhatTheHandshakeNegotiated(tls, pair, maximum, version):
    """
    Once the handshake completes, the session is told (before it reads
    anything) and the layer names the version and cipher the client
    negotiated, which stay once the connection has ended, for the
    session's end line; before, none.
    """
    wire = Wire(tls, pair[0], Listening(), maximum=maximum)
    assert (wire.layer.version, wire.layer.cipher) == (None, None)
    assert wire.handshake()
    cipher = wire.client.tls.cipher()[0]
    assert wire.client.tls.version() == version
    assert wire.session.completed == [(version, cipher, b"")]
    wire.send(b"CAPA\r\n")
    wire.lose()
    assert (wire.layer.version, wire.layer.cipher) == (version, cipher)
    assert len(wire.session.completed) == 1


def test_aFailedOrRefusedHandshakeTellsTheSessionNothing(tls, pair):
    """
    A handshake that failed tells the session nothing; nor does one
    completed on a connection refused as it arrived (its refusal is sent,
    and the session reads nothing over TLS).
    """
    wire = Wire(tls, pair[0], Listening(), maximum=ssl.TLSVersion.TLSv1_1)
    assert not wire.handshake()
    assert wire.session.completed == []
    assert wire.layer.version is None
    refused = Wire(tls, pair[0], Listening(b"-ERR [SYS/TEMP] banned\r\n", refuseAtOnce=True),
                   refusals=DescriptorAllowance(1))
    assert refused.handshake()
    assert refused.session.completed == []


def test_aServerNameThatIsNotASCIIFailsTheHandshakeWithoutATraceback(tmp_path, monkeypatch):
    """
    A client asking (SNI) for a host name that is not ASCII, which RFC
    6066 forbids (an IDN goes as its A-labels), where certificates are
    chosen by name (--tls-sni-cert): Python's ssl module fails to decode
    the name before mailgate's callback sees it, fails the handshake
    (reason CALLBACK_FAILED, logged as any failed handshake), and wrote a
    traceback through sys.unraisablehook, which twistd logs as five
    lines at error level: any client could fill the log with them.  The
    handshake still fails, with its alert, and nothing is written.
    """
    main = makeCertificate(tmp_path, HOST, name="main")
    named = makeCertificate(tmp_path, "mail.example.net", name="named")
    tls = ServerTLS(str(main[0]), str(main[1]), named=[named])
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    wire = Wire(tls, main[0], Session(b"+OK ready\r\n"))
    wire.client = Client(main[0], hostname="zzil.example.net")
    wire.client.step()
    hello = wire.client.outgoing.read()
    assert hello.count(b"zzil.example.net") == 1
    # The same length, so the ClientHello's lengths stay right.
    wire.layer.dataReceived(hello.replace(b"zzil.", "\u00e4il.".encode("utf-8")))
    assert unraisable == []
    assert wire.transport.disconnecting
    wire.client.incoming.write(wire.transport.value())
    assert not wire.client.step()
    assert "internal error" in str(wire.client.error)
    wire.lose()
    assert wire.session.lost.value.reason == "CALLBACK_FAILED"
    assert wire.session.received == b""
    # The process's hook is its own again.
    assert sys.unraisablehook == unraisable.append


# -- closing ---------------------------------------------------------------------


def test_closingSendsWhatWasWrittenThenCloseNotify(tls, pair):
    wire = Wire(tls, pair[0], Session())
    assert wire.handshake()
    wire.layer.write(b"+OK bye\r\n")
    wire.layer.loseConnection()
    assert wire.layer.disconnecting and wire.transport.disconnecting
    wire.move()
    assert wire.client.read() == b"+OK bye\r\n"
    assert wire.client.read() is None  # the close_notify
    # Writes after the close go nowhere.
    wire.layer.write(b"late\r\n")
    assert wire.transport.value() == b""
    wire.lose()
    assert wire.session.lost.check(ConnectionDone)


def test_aCloseDuringTheHandshakeWaitsForIt(tls, pair):
    """
    A session that refuses the connection at once (too many connections)
    over implicit TLS: the connection stays open for the handshake, the
    client reads the refusal, then the close.
    """
    wire = Wire(tls, pair[0], Session(b"-ERR [SYS/TEMP] too many connections\r\n", closeAtOnce=True))
    assert not wire.transport.disconnecting
    assert wire.handshake()
    assert wire.transport.disconnecting
    assert wire.client.read() == b"-ERR [SYS/TEMP] too many connections\r\n"
    assert wire.client.read() is None
    # The timer for a handshake that never ends was cancelled.
    assert wire.clock.getDelayedCalls() == []


def test_aHandshakeThatNeverComesIsAbortedAfterAClose(tls, pair):
    wire = Wire(tls, pair[0], Session(b"-ERR go away\r\n", closeAtOnce=True))
    wire.clock.advance(TLSLayer.closeTimeout - 1)
    assert not wire.transport.disconnecting
    wire.clock.advance(1)
    assert wire.transport.disconnected  # aborted
    assert wire.transport.value() == b""


def refusedWire(tls, pair, allowance):
    """
    A L{Wire} whose session refuses the connection as it arrives, the
    layer holding refused connections to C{allowance}.
    """
    return Wire(tls, pair[0], Session(b"-ERR [SYS/TEMP] banned\r\n", refuseAtOnce=True), refusals=allowance)


def test_aRefusalIsReadByAClientThatFinishesItsHandshake(tls, pair):
    """
    A connection refused as it arrived (closeRefused) over implicit TLS:
    a client that completes its handshake reads the refusal, then the
    close; the timer is cancelled, and the descriptor it held from the
    refusals' allowance is given back once the connection is gone.
    """
    allowance = DescriptorAllowance(1)
    wire = refusedWire(tls, pair, allowance)
    assert not wire.transport.disconnecting
    assert allowance.held == 1
    assert wire.handshake()
    assert wire.transport.disconnecting
    assert wire.client.read() == b"-ERR [SYS/TEMP] banned\r\n"
    assert wire.client.read() is None
    assert wire.clock.getDelayedCalls() == []
    wire.lose()
    assert allowance.held == 0


def test_aRefusedHandshakeThatNeverComesIsAbortedSoon(tls, pair):
    """
    A refused client that never finishes its handshake (a scanner that
    connects and sends nothing) is aborted after refusalTimeout, a fraction
    of closeTimeout, holding its descriptor no longer; the allowance is
    given back when the connection is gone.
    """
    assert TLSLayer.refusalTimeout <= TLSLayer.closeTimeout / 4
    allowance = DescriptorAllowance(1)
    wire = refusedWire(tls, pair, allowance)
    wire.clock.advance(TLSLayer.refusalTimeout - 0.1)
    assert not wire.transport.disconnecting
    wire.clock.advance(0.1)
    assert wire.transport.disconnected  # aborted
    assert wire.transport.value() == b""
    assert allowance.held == 1
    wire.lose()
    assert allowance.held == 0
    assert wire.clock.getDelayedCalls() == []


def test_aRefusedHandshakeIsAbortedAtOnceWhenDescriptorsAreShort(tls, pair):
    """
    With every descriptor allowed to refused connections held, one more
    refused connection still in its handshake is aborted at once, waiting
    for nothing, and takes nothing from the allowance.
    """
    allowance = DescriptorAllowance(1)
    first = refusedWire(tls, pair, allowance)
    second = refusedWire(tls, pair, allowance)
    assert not first.transport.disconnecting
    assert second.transport.disconnected  # aborted
    assert second.clock.getDelayedCalls() == []
    assert allowance.held == 1
    second.lose()
    assert allowance.held == 1
    # Once the first is gone, a refused connection waits again.
    first.clock.advance(TLSLayer.refusalTimeout)
    first.lose()
    assert allowance.held == 0
    third = refusedWire(tls, pair, allowance)
    assert not third.transport.disconnecting
    assert allowance.held == 1


def test_aRefusalAfterTheHandshakeClosesAsAnyClose(tls, pair):
    """
    closeRefused on a connection whose handshake is over is loseConnection:
    the refusal, then the close, and nothing taken from the allowance.
    """
    allowance = DescriptorAllowance(0)
    wire = Wire(tls, pair[0], Session(), refusals=allowance)
    assert wire.handshake()
    wire.layer.write(b"-ERR [SYS/TEMP] shutting down\r\n")
    wire.layer.closeRefused()
    assert wire.transport.disconnecting and not wire.transport.disconnected
    wire.move()
    assert wire.client.read() == b"-ERR [SYS/TEMP] shutting down\r\n"
    assert wire.client.read() is None


def test_theClientsCloseNotifyClosesTheConnection(tls, pair):
    wire = Wire(tls, pair[0], Session())
    assert wire.handshake()
    wire.send(b"QUIT\r\n")
    wire.closeNotify()
    assert wire.session.received == b"QUIT\r\n"
    assert wire.transport.disconnecting


@implementer(IHalfCloseableProtocol)
class Answering(Session):
    """
    A session that, told the client sent all it will, answers and closes
    (as mailgate's sessions do with the commands they were sent).
    """

    inputEnded = 0

    def readConnectionLost(self):
        self.inputEnded += 1
        self.transport.write(b"+OK bye\r\n")
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass


def test_theClientsCloseNotifyStillGetsTheAnswers(tls, pair):
    """
    TLS 1.3 lets a client close its side with close_notify and read on: a
    session that can answer what it was sent does, then closes with its
    own close_notify.
    """
    wire = Wire(tls, pair[0], Answering())
    assert wire.handshake()
    wire.send(b"QUIT\r\n")
    wire.closeNotify()
    assert wire.session.received == b"QUIT\r\n"
    assert wire.session.inputEnded == 1
    # The answer, then the server's close_notify (which a client that has
    # sent its own is told of by SSLZeroReturnError).
    answer = b""
    with pytest.raises(ssl.SSLZeroReturnError):
        for _ in range(10):
            answer += wire.client.tls.read(1 << 16)
    assert answer == b"+OK bye\r\n"
    assert wire.transport.disconnecting


def test_theEndOfTheConnectionBeneathIsTheEndOfInput(tls, pair):
    """
    The connection beneath reports the client's end (a TCP half-close,
    no close_notify): the session above is told, answers and closes.  In
    the handshake, the connection is aborted: nothing can complete it.
    """
    wire = Wire(tls, pair[0], Answering())
    assert wire.handshake()
    wire.send(b"STAT\r\n")
    wire.layer.readConnectionLost()
    wire.move()
    assert wire.session.inputEnded == 1
    assert wire.client.read() == b"+OK bye\r\n"
    assert wire.transport.disconnecting

    early = Wire(tls, pair[0], Answering())
    early.client.step()
    early.layer.dataReceived(early.client.outgoing.read())
    early.layer.readConnectionLost()
    assert early.session.inputEnded == 0
    assert early.transport.disconnecting


def test_aCorruptRecordEndsTheSession(tls, pair):
    wire = Wire(tls, pair[0], Session())
    assert wire.handshake()
    wire.client.tls.write(b"USER alice\r\n")
    record = bytearray(wire.client.outgoing.read())
    record[-1] ^= 0x01  # the authentication tag no longer matches
    wire.layer.dataReceived(bytes(record))
    assert wire.session.received == b""
    assert wire.transport.disconnecting
    wire.lose()
    assert wire.session.lost.check(ssl.SSLError)


def test_anEndedConnectionLetsGoOfOpenSSLAndTheSession(tls, pair):
    """
    Once the connection below is lost and the session told, the layer keeps
    neither OpenSSL's state for the connection (some 20 KiB of buffers) nor
    the session above: both are freed by reference counting alone, not at
    Python's next full garbage collection, and the layer answers only that
    it is closed.
    """
    with withoutCycleCollector():
        wire = Wire(tls, pair[0], Session())
        assert wire.handshake()
        wire.send(b"QUIT\r\n")
        assert wire.layer.version == "TLSv1.3"
        openssl = weakref.ref(wire.layer._tls)
        session = weakref.ref(wire.session)
        wire.lose()
        assert wire.session.lost.check(ConnectionDone)
        assert openssl() is None
        # What was negotiated stays, for the session's end line.
        assert wire.layer.version == "TLSv1.3" and wire.layer.cipher == "TLS_AES_256_GCM_SHA384"
        wire.layer.send(b"late\r\n")
        wire.layer.dataReceived(b"late")
        assert wire.transport.value() == b""
        del wire.session
        assert session() is None


@pytest.mark.parametrize("failure", ["handshake", "record"])
def test_aFailedSessionIsFreedByReferenceCountingToo(tls, pair, failure):
    """
    A failed handshake (a scanner, a client speaking plain POP3 to the
    POP3S port) or a corrupt record: once the connection below is lost,
    the layer and its OpenSSL state are freed at once, like those of a
    session that ended well; the session above still learns why.
    """
    with withoutCycleCollector():
        wire = Wire(tls, pair[0], Session(greeting=b"+OK\r\n"))
        if failure == "handshake":
            wire.layer.dataReceived(b"USER alice\r\n")
        else:
            assert wire.handshake()
            wire.client.tls.write(b"USER alice\r\n")
            record = bytearray(wire.client.outgoing.read())
            record[-1] ^= 0x01
            wire.layer.dataReceived(bytes(record))
        assert wire.transport.disconnecting
        openssl = weakref.ref(wire.layer._tls)
        layer = weakref.ref(wire.layer)
        session = weakref.ref(wire.session)
        wire.lose()
        assert wire.session.lost.check(ssl.SSLError)
        assert openssl() is None
        del wire.session, wire.layer
        assert session() is None and layer() is None


def test_abortClosesAtOnce(tls, pair):
    wire = Wire(tls, pair[0], Session())
    assert wire.handshake()
    wire.layer.abortConnection()
    assert wire.transport.disconnected
    wire.layer.write(b"late\r\n")
    assert wire.transport.value() == b""


# -- what passes through -----------------------------------------------------------


def test_flowControlIsTheConnections(tls, pair):
    """
    Producers registered with the layer are the connection's, and pausing
    the layer pauses reading from the connection.
    """
    wire = Wire(tls, pair[0], Session())
    producer = object()
    wire.layer.registerProducer(producer, True)
    assert wire.transport.producer is producer and wire.transport.streaming
    wire.layer.unregisterProducer()
    assert wire.transport.producer is None
    wire.layer.pauseProducing()
    assert wire.transport.producerState == "paused"
    wire.layer.resumeProducing()
    assert wire.transport.producerState == "producing"


def test_recordsSplitAtEveryOctetOrManyInOneRead(tls, pair):
    """
    However the connection cuts what the client sent (the handshake and
    its records one octet at a time, or many records and the client's
    close_notify in one read), the session reads exactly what was sent.
    """
    wire = Wire(tls, pair[0], Session(greeting=b"+OK\r\n"))
    for _ in range(10):
        done = wire.client.step()
        toServer = wire.client.outgoing.read()
        for octet in range(len(toServer)):
            wire.layer.dataReceived(toServer[octet : octet + 1])
        wire.client.incoming.write(wire.transport.value())
        wire.transport.clear()
        if done and not toServer:
            break
    assert wire.layer.version == "TLSv1.3"
    assert wire.client.read() == b"+OK\r\n"
    commands = [b"TOP %d 0\r\n" % number for number in range(100)]
    for command in commands:
        wire.client.tls.write(command)
    records = wire.client.outgoing.read()
    for octet in range(len(records)):
        wire.layer.dataReceived(records[octet : octet + 1])
    assert wire.session.received == b"".join(commands)
    for command in commands:
        wire.client.tls.write(command)
    wire.client.tls.write(b"x" * 100000)
    with pytest.raises(ssl.SSLWantReadError):
        wire.client.tls.unwrap()
    wire.layer.dataReceived(wire.client.outgoing.read())
    assert wire.session.received == b"".join(commands) * 2 + b"x" * 100000
    assert wire.transport.disconnecting


def test_addressesAreTheConnections(tls, pair):
    wire = Wire(tls, pair[0], Session())
    assert wire.layer.getPeer() == wire.transport.getPeer()
    assert wire.layer.getHost() == wire.transport.getHost()
    assert wire.layer.getPeerCertificate() is None


def test_smallPiecesAreJoinedIntoRecords():
    pieces = [b"a" * 100, b"b" * 200, memoryview(b"c" * 300)]
    assert list(_records(pieces)) == [b"a" * 100 + b"b" * 200 + b"c" * 300]
    big = b"x" * (RECORD + 1)
    out = list(_records([b"head", big, b"tail", b"y" * (RECORD - 2), b"z" * 10]))
    # A piece of a record's size or more goes alone; neighbours are joined
    # only while they fit in one record; the order is kept.
    assert out == [b"head", big, b"tail", b"y" * (RECORD - 2), b"z" * 10]
    assert list(_records([b"+OK\r\n", b"z" * 10, b".\r\n"])) == [b"+OK\r\n" + b"z" * 10 + b".\r\n"]
    assert list(_records([])) == []


def test_theFactoryPutsALayerUnderEverySession(tls):
    sessions = Factory.forProtocol(Session)
    factory = TLSLayerFactory(tls, sessions, Clock())
    layer = factory.buildProtocol(None)
    assert isinstance(layer, TLSLayer) and isinstance(layer.protocol, Session)
    # What the listener's "starting on" log line calls it.
    assert factory.logPrefix() == "Factory (TLS)"

    class Refusing(Factory):
        def buildProtocol(self, addr):
            return None

    assert TLSLayerFactory(tls, Refusing(), Clock()).buildProtocol(None) is None


# -- starting TLS on a connected session -----------------------------------------------


def test_startTLSOnATCPConnection(tcpConnection, tls):
    session = tcpConnection.protocol
    connection = tcpConnection.transport
    layer = startTLS(session, tls, Clock())
    assert session.transport is layer
    assert connection.protocol is layer
    assert layer.transport is connection


def test_startTLSBehindAWrapper(tls):
    """
    Behind a wrapper (the PROXY-header reader), the wrapper's reads go to
    the layer.
    """
    session = Session()
    wrapper = ProtocolWrapper(WrappingFactory(Factory()), session)
    below = StringTransport()
    wrapper.makeConnection(below)
    assert session.transport is wrapper
    layer = startTLS(session, tls, Clock())
    assert wrapper.wrappedProtocol is layer
    assert session.transport is layer


def test_startTLSOnAnotherTransportLeavesItToIt(tls):
    session = Session()
    transport = TLSStringTransport()
    session.makeConnection(transport)
    assert startTLS(session, tls, Clock()) is None
    assert transport.tlsStarted is tls
    assert session.transport is transport


# -- over a real socket ------------------------------------------------------------------


def _tlsSession(tcpConnection, tls, layout):
    """
    The layer on Twisted's TCP transport: C{"implicit"} (POP3S, the layer
    the connection's protocol from the start) or C{"started"} (STLS, put
    under the connection's protocol).  The client's handshake runs in a
    thread while the test plays the reactor.

    @return: the layer and the client's TLS socket.
    """
    connection = tcpConnection.transport
    if layout == "implicit":
        layer = TLSLayer(tls.context, Session(), Clock())
        connection.protocol = layer
        layer.makeConnection(connection)
    else:
        layer = startTLS(tcpConnection.protocol, tls, Clock())
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    shaken = {}

    def handshake():
        try:
            shaken["socket"] = context.wrap_socket(tcpConnection.client)
        except Exception as e:  # reported by the assertion below
            shaken["error"] = e

    thread = threading.Thread(target=handshake, daemon=True)
    thread.start()
    pump(connection, tcpConnection.reactor, lambda: not thread.is_alive())
    thread.join(10)
    assert "socket" in shaken, shaken
    pump(connection, tcpConnection.reactor, lambda: layer.version is not None and not connection.dataBuffer)
    return layer, shaken["socket"]


def pump(connection, reactor, done, rounds=2000):
    """
    Play the reactor for C{connection} until C{done()} (bounded).
    """
    for _ in range(rounds):
        if connection in reactor.writers:
            connection.doWrite()
        if done():
            return
        readable, _, _ = select.select([connection.socket], [], [], 0.01)
        if readable:
            connection.doRead()
    raise AssertionError("the TLS connection did not get there")


@pytest.mark.parametrize("layout", ["implicit", "started"])
def test_aTLSReplyGoesOutAtOnce(tcpConnection, tls, layout):
    """
    The records of a reply go to the kernel at once: nothing waits for the
    reactor's next turn (no write watched), and the client reads the reply,
    decrypted, in order.
    """
    layer, client = _tlsSession(tcpConnection, tls, layout)
    connection, reactor = tcpConnection.transport, tcpConnection.reactor
    layer.send(b"+OK one\r\n")
    layer.send([b"+OK ", memoryview(b"two\r\n")])
    assert connection not in reactor.writers
    assert not connection.dataBuffer and not connection._tempDataBuffer
    received = b""
    client.settimeout(10)
    while len(received) < 18:
        received += client.recv(100)
    assert received == b"+OK one\r\n+OK two\r\n"
    client.close()


@pytest.mark.parametrize("layout", ["implicit", "started"])
def test_whatTheSocketDoesNotTakeOfTLSRecordsWaitsInOrder(tcpConnection, tls, layout):
    """
    Records the kernel's buffer cannot take wait in the TCP transport (not
    encrypted twice), and later replies queue behind them.
    """
    layer, client = _tlsSession(tcpConnection, tls, layout)
    connection, reactor = tcpConnection.transport, tcpConnection.reactor
    connection.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    big = bytes(range(256)) * 1024  # 256 KiB
    layer.send(big)
    assert connection in reactor.writers
    layer.send(b"TAIL")
    client.setblocking(False)
    received = b""

    def gotAll():
        nonlocal received
        try:
            received += client.recv(1 << 16)
        except (BlockingIOError, ssl.SSLWantReadError):
            pass
        return len(received) >= len(big) + 4

    pump(connection, reactor, gotAll, rounds=20000)
    assert received == big + b"TAIL"
    client.close()
