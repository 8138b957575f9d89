"""
mailgate.session.ReplyWriter on a real TCP connection: Twisted's own
server-side transport around a loopback socket, with a reactor stand-in
that records which descriptors would be watched for writability.
"""

import select
import socket

import pytest
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport

from mailgate.session import ReplyWriter


@pytest.fixture
def connection(tcpConnection):
    """
    conftest's L{TCPConnection}, unpacked: the transport, its protocol, the
    client's socket and the recording reactor.
    """
    c = tcpConnection
    return c.transport, c.protocol, c.client, c.reactor


def receive(client, count):
    data = b""
    while len(data) < count:
        piece = client.recv(count - len(data))
        assert piece, "connection closed early"
        data += piece
    return data


def drain(transport, client, reactor, count):
    """
    Read C{count} octets as the client, writing what waits in the transport
    as the reactor would (when the transport asks to): a bounded number of
    turns.
    """
    received = b""
    for _ in range(100000):
        if len(received) >= count:
            break
        if transport in reactor.writers:
            transport.doWrite()
        readable, _, _ = select.select([client], [], [], 0.01)
        if readable:
            received += client.recv(65536)
    return received


def test_aReplyIsSentAtOnce(connection):
    transport, protocol, client, reactor = connection
    writer = ReplyWriter(protocol)
    writer.write(b"+OK ready\r\n")
    # On the wire already, and nothing left for the reactor to do.
    assert receive(client, 11) == b"+OK ready\r\n"
    assert transport not in reactor.writers
    assert not transport.dataBuffer and not transport._tempDataBuffer


def test_heldRepliesLeaveTogether(connection):
    transport, protocol, client, reactor = connection
    writer = ReplyWriter(protocol)
    client.setblocking(False)
    assert writer.hold()
    writer.write(b"250 one\r\n")
    # Holds nest: only the call that began holding releases.
    assert not writer.hold()
    writer.write(b"250 two\r\n")
    with pytest.raises(BlockingIOError):
        client.recv(100)
    writer.write(b"354 go on\r\n")
    writer.release()
    client.setblocking(True)
    assert receive(client, 29) == b"250 one\r\n250 two\r\n354 go on\r\n"
    assert transport not in reactor.writers


def test_flushSendsWhatIsHeld(connection):
    transport, protocol, client, reactor = connection
    writer = ReplyWriter(protocol)
    writer.hold()
    writer.write(b"+OK begin TLS negotiation\r\n")
    writer.flush()
    assert receive(client, 27) == b"+OK begin TLS negotiation\r\n"
    writer.write(b"+OK later\r\n")
    writer.release()
    assert receive(client, 11) == b"+OK later\r\n"


def test_whatTheSocketCannotTakeWaitsInTheTransportInOrder(connection):
    """
    A response larger than the kernel's buffer: the rest waits in the
    transport (which watches the socket and drives flow control), and
    later writes queue behind it, never ahead.
    """
    transport, protocol, client, reactor = connection
    transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    writer = ReplyWriter(protocol)
    big = bytes(range(256)) * 4096  # 1 MiB
    writer.send(big)
    assert transport in reactor.writers
    writer.write(b"TAIL")
    assert drain(transport, client, reactor, len(big) + 4) == big + b"TAIL"
    assert transport not in reactor.writers


def test_piecesLeaveInOneSendWithoutBeingJoined(connection):
    """
    A reply in pieces (a stuffed message: views of the stored octets with
    the added dots between them) goes out in order, sent at once, and
    held with the other replies of a read; small ones joined, large ones
    as they are.
    """
    transport, protocol, client, reactor = connection
    writer = ReplyWriter(protocol)
    for joinBelow in (0, 100):
        writer.joinBelow = joinBelow
        sendPieces(writer, client, reactor, transport)


def sendPieces(writer, client, reactor, transport):
    body = b"..a\r\n.b\r\n"
    view = memoryview(body)
    writer.writeParts([b"+OK\r\n", view[:5], b".", view[5:], b".\r\n"])
    assert receive(client, 18) == b"+OK\r\n..a\r\n..b\r\n.\r\n"
    assert transport not in reactor.writers
    writer.hold()
    writer.write(b"+OK 1\r\n")
    writer.writeParts([b"x", view[5:7], b"\r\n"])
    assert writer.heldSize == 12
    writer.release()
    assert receive(client, 12) == b"+OK 1\r\nx.b\r\n"


def test_piecesTheSocketCannotTakeWaitInTheTransportInOrder(connection):
    """
    Pieces larger together than the kernel's buffer: what the socket did
    not take waits in the transport, from the right octet on, and later
    writes queue behind it.
    """
    transport, protocol, client, reactor = connection
    transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    writer = ReplyWriter(protocol)
    big = bytes(range(256)) * 4096  # 1 MiB
    view = memoryview(big)
    pieces = [view[n : n + 100000] for n in range(0, len(big), 100000)]
    writer.writeParts([b"+OK\r\n"] + pieces)
    assert transport in reactor.writers
    writer.write(b"TAIL")
    assert drain(transport, client, reactor, len(big) + 9) == b"+OK\r\n" + big + b"TAIL"
    assert transport not in reactor.writers


def test_otherTransportsAreWrittenAsUsual():
    protocol = Protocol()
    transport = StringTransport()
    protocol.makeConnection(transport)
    writer = ReplyWriter(protocol)
    writer.write(b"a")
    writer.hold()
    writer.write(b"b")
    writer.write(b"c")
    assert transport.value() == b"a"
    writer.release()
    assert transport.value() == b"abc"
    writer.writeParts([b"d", memoryview(b"ef")[1:]])
    assert transport.value() == b"abcdf"


def test_aClosedConnectionIsLeftToTheTransport(connection):
    transport, protocol, client, reactor = connection
    writer = ReplyWriter(protocol)
    transport.loseConnection()
    # Disconnecting: the transport buffers the reply and closes after it.
    writer.write(b"+OK bye\r\n")
    assert transport._tempDataBuffer == [b"+OK bye\r\n"]
