"""
The Twisted behaviour behind each reach into Twisted's private fields
(L{mailgate.twistedcompat}), pinned on Twisted's own classes: if an upgrade
changes what these fields mean, a test here fails rather than mail
delivery.

  - L{sendNow}: C{tcp.Connection}'s C{dataBuffer}, C{_tempDataBuffer} and
    C{_writeDisconnected}, and its C{TLS} flag.
  - L{closeWhenWritten}: the same, and what its C{disconnecting} flag
    makes C{write} and C{doWrite} do.
  - L{raiseListenErrorsAtOnce} and L{whenListening}:
    C{StreamServerEndpointService}'s C{_raiseSynchronously} and
    C{_waitingForPort}.
"""

import select
import socket

import pytest
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer, epollreactor, main
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError, ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import IListeningPort, IPushProducer, IStreamServerEndpoint
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.testing import MemoryReactor
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgate.twistedcompat import (
    DRAIN_TIMEOUT,
    closeWhenWritten,
    leanEventDispatch,
    raiseListenErrorsAtOnce,
    sendNow,
    whenListening,
)

# -- tcp.Connection, for sendNow ---------------------------------------------------


def test_anIdleConnectionHasEmptyBuffers(tcpConnection):
    """
    What sendNow takes for "nothing is queued": both write buffers empty
    and the write side open.
    """
    transport = tcpConnection.transport
    assert transport.dataBuffer == b""
    assert transport._tempDataBuffer == []
    assert transport._writeDisconnected is False
    assert not transport.TLS
    assert isinstance(transport.socket, socket.socket)


def test_aWriteWaitsInTheTemporaryBuffer(tcpConnection):
    """
    C{write} only queues, in C{_tempDataBuffer}, until the reactor says the
    socket is writable: sendNow must then queue behind it, never send
    ahead of it.
    """
    transport, client = tcpConnection.transport, tcpConnection.client
    transport.write(b"first ")
    assert transport._tempDataBuffer == [b"first "]
    assert transport._tempDataLen == 6
    assert transport in tcpConnection.reactor.writers
    sendNow(transport, b"second")
    # Queued behind it: a small reply joins the last piece waiting.
    assert transport._tempDataBuffer == [b"first second"]
    assert transport._tempDataLen == 12
    client.setblocking(False)
    with pytest.raises(BlockingIOError):
        client.recv(100)
    client.setblocking(True)
    transport.doWrite()
    assert tcpConnection.receive(12) == b"first second"


def test_pausingTheProducerIsTheWritesOwnCheck(tcpConnection):
    """
    What sendNow does after joining a reply to a queued piece: the check
    C{write} makes, C{_maybePauseProducer}, pauses a registered streaming
    producer once C{_tempDataLen} and C{dataBuffer} pass C{bufferSize}.
    """
    transport = tcpConnection.transport

    @implementer(IPushProducer)
    class Producer:
        paused = 0

        def pauseProducing(self):
            self.paused += 1

        def resumeProducing(self):
            pass

        def stopProducing(self):
            pass

    producer = Producer()
    transport.registerProducer(producer, True)
    transport.write(b"x")
    transport._tempDataLen += transport.bufferSize
    assert producer.paused == 0
    transport._maybePauseProducer()
    assert producer.paused == 1
    transport.unregisterProducer()


def test_smallRepliesToAClientThatDoesNotReadJoinIntoFewPieces(tcpConnection):
    """
    A client that sends command after command and reads nothing: its
    replies wait in the transport as a few pieces of some KiB, not as an
    object each (371 KB held for a 64 KiB buffer before), counted for flow
    control, and reach the client whole and in order once it reads.
    """
    transport, client = tcpConnection.transport, tcpConnection.client
    # A small send buffer; the client's receive buffer as it is: shrunk
    # under an open connection, it closes the window, and the kernel's
    # zero-window probes (a fifth of a second each) drained the queue in
    # 6.7 s instead of a few milliseconds.
    transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    replies = [b"+OK %d %d\r\n" % (n, n * 7) for n in range(20000)]
    for reply in replies:
        sendNow(transport, reply)
    queued = transport._tempDataBuffer
    assert queued and len(queued) < 20000 // 100
    assert max(map(len, queued)) < 4096 + 1024
    assert transport._tempDataLen == sum(map(len, queued))
    expected = b"".join(replies)
    received = b""
    for _ in range(100000):
        if len(received) >= len(expected):
            break
        if transport in tcpConnection.reactor.writers:
            transport.doWrite()
        if select.select([client], [], [], 0.01)[0]:
            received += client.recv(65536)
    assert received == expected


def test_largeRepliesAreNotJoined(tcpConnection):
    transport = tcpConnection.transport
    transport.write(b"first ")
    big = b"y" * 2000
    sendNow(transport, big)
    assert transport._tempDataBuffer == [b"first ", big]


def test_whatTheSocketDidNotTakeWaitsInTheDataBuffer(tcpConnection):
    """
    Once the reactor has written part of a large write, the rest is in
    C{dataBuffer}: sendNow must queue behind that too.
    """
    transport, client = tcpConnection.transport, tcpConnection.client
    transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    big = bytes(range(256)) * 4096
    transport.write(big)
    transport.doWrite()
    assert transport.dataBuffer and transport._tempDataBuffer == []
    sendNow(transport, b"TAIL")
    assert transport._tempDataBuffer == [b"TAIL"]
    received = b""
    for _ in range(100000):
        if len(received) >= len(big) + 4:
            break
        if transport in tcpConnection.reactor.writers:
            transport.doWrite()
        if select.select([client], [], [], 0.01)[0]:
            received += client.recv(65536)
    assert received == big + b"TAIL"


def test_anIdleConnectionSendsAtOnce(tcpConnection):
    transport = tcpConnection.transport
    sendNow(transport, b"+OK ready\r\n")
    assert tcpConnection.receive(11) == b"+OK ready\r\n"
    assert transport not in tcpConnection.reactor.writers
    assert transport.dataBuffer == b"" and transport._tempDataBuffer == []


def test_aHalfClosedConnectionSetsWriteDisconnected(tcpConnection):
    """
    After the write side is shut down, C{_writeDisconnected} is set and
    C{write} drops data: sendNow must not send it directly either.
    """
    transport, client = tcpConnection.transport, tcpConnection.client
    transport.loseWriteConnection()
    transport.doWrite()
    assert transport._writeDisconnected is True
    sendNow(transport, b"too late")
    assert transport._tempDataBuffer == []
    assert client.recv(100) == b""  # the end of the stream, nothing else


def test_aTLSConnectionSaysSo(tcpConnection, tmp_path):
    """
    After Twisted's own C{startTLS} (an embedding application's, not
    mailgate's TLS layer) the transport's C{TLS} flag is set: sendNow then
    leaves the writing to it (a direct send would go out in the clear).
    """
    from certs import makeCertificate
    from OpenSSL import SSL
    from twisted.internet.interfaces import IOpenSSLServerConnectionCreator

    certificatePath, keyPath = makeCertificate(tmp_path)
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.use_certificate_file(str(certificatePath))
    context.use_privatekey_file(str(keyPath))

    @implementer(IOpenSSLServerConnectionCreator)
    class ServerSide:
        def serverConnectionForTLS(self, protocol):
            return SSL.Connection(context, None)

    transport = tcpConnection.transport
    transport.startTLS(ServerSide())
    assert transport.TLS
    sendNow(transport, b"secret")
    # Written into the TLS layer, not onto the socket.
    tcpConnection.client.setblocking(False)
    try:
        data = tcpConnection.client.recv(100)
    except BlockingIOError:
        data = b""
    assert b"secret" not in data


# -- tcp.Connection, for closeWhenWritten ----------------------------------------


def _recordLoss(tcpConnection):
    lost = []
    tcpConnection.protocol.connectionLost = lost.append
    tcpConnection.transport.startReading()
    return lost


def _endOfStream(client):
    """
    What the client reads until the end of the stream; a reset raises.
    """
    data = b""
    for _ in range(1000):
        piece = client.recv(65536)
        if not piece:
            return data
        data += piece
    raise AssertionError("no end of stream")


def test_anIdleConnectionClosesWithoutWaitingToWrite(tcpConnection):
    """
    Nothing queued: the connection stops reading at once and is closed in
    the reactor's next turn, without ever being watched for writing (which
    Twisted's loseConnection would do: a turn of the loop, three epoll_ctl
    and an empty send); the client reads what was sent, then the end of
    the stream (an orderly close, not a reset).
    """
    transport, reactor = tcpConnection.transport, tcpConnection.reactor
    lost = _recordLoss(tcpConnection)
    sendNow(transport, b"+OK bye\r\n")
    closeWhenWritten(transport)
    assert transport not in reactor.readers and transport not in reactor.writers
    assert lost == []
    reactor.clock.advance(0)
    assert transport not in reactor.writers
    [reason] = lost
    assert reason.check(ConnectionDone)
    assert _endOfStream(tcpConnection.client) == b"+OK bye\r\n"


def test_aWriteAfterTheCloseIsSentBeforeIt(tcpConnection):
    """
    Written between the close and the reactor's next turn: Twisted's write
    path sends it and then closes, as after its own loseConnection (its
    C{doWrite} says C{CONNECTION_DONE} once the buffer is empty, and the
    reactor then calls C{connectionLost}).
    """
    transport, reactor = tcpConnection.transport, tcpConnection.reactor
    lost = _recordLoss(tcpConnection)
    closeWhenWritten(transport)
    transport.write(b"late\r\n")
    reactor.clock.advance(0)
    assert lost == [] and transport in reactor.writers
    assert transport.doWrite() is main.CONNECTION_DONE
    transport.connectionLost(Failure(main.CONNECTION_DONE))
    assert _endOfStream(tcpConnection.client) == b"late\r\n"
    assert lost[0].check(ConnectionDone)


def test_queuedOctetsTakeTwistedsOwnClose(tcpConnection):
    """
    Octets waiting in the transport's buffer: Twisted's loseConnection,
    which writes them, then closes.
    """
    transport, reactor = tcpConnection.transport, tcpConnection.reactor
    lost = _recordLoss(tcpConnection)
    transport.write(b"queued\r\n")
    closeWhenWritten(transport)
    assert transport.disconnecting and transport in reactor.writers
    # Only the check that the client takes what waits (see below).
    [check] = reactor.clock.getDelayedCalls()
    assert check.getTime() == DRAIN_TIMEOUT
    assert transport.doWrite() is main.CONNECTION_DONE
    transport.connectionLost(Failure(main.CONNECTION_DONE))
    assert _endOfStream(tcpConnection.client) == b"queued\r\n"
    assert lost[0].check(ConnectionDone)


def _stalled(tcpConnection):
    """
    Octets waiting in the transport for a client that reads nothing: the
    socket's buffers are full, and what was left is in C{dataBuffer}.
    """
    transport = tcpConnection.transport
    transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    transport.write(b"x" * (4 << 20))
    transport.doWrite()
    assert transport.dataBuffer
    return transport


def test_aClientThatReadsNothingMoreIsNotWaitedForForEver(tcpConnection):
    """
    A close with octets waiting for a client that takes none of them (it
    sent QUIT behind replies it never reads): Twisted's loseConnection
    would wait for ever, holding the descriptor and the octets, with the
    session's idle timer stopped; the connection is aborted once the
    client has taken nothing for C{timeout} seconds.
    """
    reactor = tcpConnection.reactor
    transport = _stalled(tcpConnection)
    lost = _recordLoss(tcpConnection)
    closeWhenWritten(transport, timeout=30)
    reactor.clock.advance(29)
    assert lost == [] and transport.connected
    reactor.clock.advance(1)
    reactor.clock.advance(0)
    [reason] = lost
    assert reason.check(ConnectionAborted)
    assert reactor.clock.getDelayedCalls() == []


def test_aClientThatReadsSlowlyIsWaitedFor(tcpConnection):
    """
    A client that takes some of what waits between two checks is waited
    for, however long it takes; once it stops, it gets C{timeout} seconds
    more.
    """
    reactor, client = tcpConnection.reactor, tcpConnection.client
    transport = _stalled(tcpConnection)
    lost = _recordLoss(tcpConnection)
    closeWhenWritten(transport, timeout=30)
    for _ in range(3):
        reactor.clock.advance(20)
        client.recv(1 << 20)
        transport.doWrite()
        reactor.clock.advance(10)
        assert lost == [] and transport.connected
    reactor.clock.advance(30)
    reactor.clock.advance(0)
    [reason] = lost
    assert reason.check(ConnectionAborted)


def test_writtenAfterAnIdleCloseIsBoundedToo(tcpConnection):
    """
    Octets written between an idle close and the reactor's next turn go
    Twisted's way (above), under the same bound.
    """
    reactor = tcpConnection.reactor
    transport = tcpConnection.transport
    lost = _recordLoss(tcpConnection)
    closeWhenWritten(transport, timeout=30)
    transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    transport.write(b"x" * (4 << 20))
    transport.doWrite()
    reactor.clock.advance(0)
    assert lost == [] and transport.dataBuffer and transport in reactor.writers
    reactor.clock.advance(30)
    reactor.clock.advance(0)
    [reason] = lost
    assert reason.check(ConnectionAborted)


def test_theConnectionBeneathAPROXYHeaderWrapperIsWatched(tcpConnection):
    """
    Closed through a PROXY-header wrapper (which relays writes and the
    close to the connection beneath), the connection beneath is bounded.
    """
    reactor = tcpConnection.reactor
    transport = _stalled(tcpConnection)
    lost = _recordLoss(tcpConnection)

    class Wrapper:
        relayedTransport = transport

        def loseConnection(self):
            transport.loseConnection()

    closeWhenWritten(Wrapper(), timeout=30)
    assert transport.disconnecting
    reactor.clock.advance(30)
    reactor.clock.advance(0)
    [reason] = lost
    assert reason.check(ConnectionAborted)


def test_aConnectionClosedMeanwhileIsNotKeptForItsCheck(tcpConnection):
    """
    The pending check holds the connection weakly (a connection that is
    gone is freed then, with what was left in its buffer, not when the
    check is due), and finds nothing to do once it is gone.
    """
    reactor = tcpConnection.reactor
    transport = _stalled(tcpConnection)
    lost = _recordLoss(tcpConnection)
    closeWhenWritten(transport, timeout=30)
    [check] = reactor.clock.getDelayedCalls()
    assert not [argument for argument in check.args if argument is transport]
    transport.connectionLost(Failure(main.CONNECTION_LOST))
    reactor.clock.advance(30)
    assert len(lost) == 1 and reactor.clock.getDelayedCalls() == []


def test_aConnectionAbortedMeanwhileIsNotClosedTwice(tcpConnection):
    transport, reactor = tcpConnection.transport, tcpConnection.reactor
    lost = _recordLoss(tcpConnection)
    closeWhenWritten(transport)
    transport.connectionLost(Failure(main.CONNECTION_LOST))
    reactor.clock.advance(0)
    assert len(lost) == 1


# -- StreamServerEndpointService, for the listeners ------------------------------


@implementer(IStreamServerEndpoint)
class RefusingEndpoint:
    """
    An endpoint that cannot listen, and says so at once.
    """

    def listen(self, factory):
        return defer.fail(CannotListenError("127.0.0.1", 110, OSError("address in use")))


def test_aListenErrorIsLoggedUnlessRaisedAtOnce():
    """
    By default the service only logs a failure to listen and starts deaf;
    with the flag L{raiseListenErrorsAtOnce} sets, it raises.
    """
    deaf = StreamServerEndpointService(RefusingEndpoint(), ServerFactory())
    assert deaf._raiseSynchronously is False
    deaf.privilegedStartService()  # no exception: logged, and carrying on

    service = StreamServerEndpointService(RefusingEndpoint(), ServerFactory())
    raiseListenErrorsAtOnce(service)
    with pytest.raises(CannotListenError):
        service.privilegedStartService()


def test_whenListeningGivesThePort():
    """
    C{privilegedStartService} keeps the Deferred of C{endpoint.listen} in
    C{_waitingForPort}: L{whenListening} gets the listening port from it.
    """
    reactor = MemoryReactor()
    service = StreamServerEndpointService(
        serverFromString(reactor, "tcp:0:interface=127.0.0.1"), ServerFactory()
    )
    raiseListenErrorsAtOnce(service)
    service.privilegedStartService()
    ports = []
    whenListening(service, ports.append)
    [port] = ports
    assert IListeningPort.providedBy(port)
    assert reactor.tcpServers[0][3] == "127.0.0.1"


class _Echo(Protocol):
    def dataReceived(self, data):
        if data.startswith(b"boom"):
            raise RuntimeError("a bug in a protocol")
        self.transport.write(data)


def _iterateUntil(reactor, done, rounds=200):
    for _ in range(rounds):
        if done():
            return True
        reactor.doIteration(0.02)
    return done()


def test_leanEventDispatchServesConnectionsAndSurvivesABug():
    """
    An epoll reactor with the lean dispatch still reads, writes and
    accepts; a protocol's exception closes that connection only (what
    Twisted's own handling does), and the reactor goes on.
    """
    reactor = epollreactor.EPollReactor()
    assert leanEventDispatch(reactor) is True
    factory = ServerFactory.forProtocol(_Echo)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        clients = [socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5) for _ in range(2)]
        for client in clients:
            client.setblocking(False)
        assert _iterateUntil(reactor, lambda: len(reactor.getReaders()) >= 3)
        clients[0].sendall(b"boom\r\n")
        clients[1].sendall(b"hello\r\n")
        received = []

        def echoed():
            try:
                received.append(clients[1].recv(100))
            except BlockingIOError:
                pass
            return b"".join(received) == b"hello\r\n"

        assert _iterateUntil(reactor, echoed)

        def closed():
            try:
                return clients[0].recv(100) == b""
            except BlockingIOError:
                return False
            except ConnectionResetError:
                return True

        assert _iterateUntil(reactor, closed)
        for client in clients:
            client.close()
    finally:
        port.stopListening()
        reactor.disconnectAll()


def test_leanEventDispatchLeavesOtherReactorsAlone():
    reactor = MemoryReactor()
    assert leanEventDispatch(reactor) is False
    assert not hasattr(reactor, "doPoll")
