"""
Bounded memory per connection: a client that sends commands and never
reads the replies makes the server stop reading from it (and stop running
its commands) once the unsent output is over the transport's bound, and
resume when the client reads.

In memory, a transport that keeps what is written (a client that does not
read) and, like Twisted's TCP transport, pauses its streaming producer once
more than its buffer size waits.  Then a real server and a real socket.
"""

import os
import socket
import time

import pytest
from twisted.internet.task import Clock

from mailgate.store.sql import CHUNK_SIZE, SQLMessageBody
from mailgate.testing import LOOPBACK, TLSStringTransport, addUser, deliver, pop3Factory, smtpFactory

from e2e import DEADLINE, mailgate_cli, mailgate_server, sqliteOnly  # noqa: F401 (fixtures)

ALICE = "alice@example.org"
PASSWORD = "wonderland"


class UnreadTransport(TLSStringTransport):
    """
    A client that does not read: everything written stays in the buffer
    until L{drain}.  Like C{twisted.internet.abstract.FileDescriptor}, the
    transport pauses its streaming producer on a write that leaves more
    than L{bufferSize} octets waiting, and resumes it once drained.

    C{producerState} (Twisted's) says whether the transport itself is
    reading: C{"paused"} after the session called C{pauseProducing} on it.
    """

    bufferSize = 64 * 1024
    producerPaused = False

    def write(self, data):
        super().write(data)
        if self.producer is not None and self.streaming and len(self.value()) > self.bufferSize:
            self.producerPaused = True
            self.producer.pauseProducing()

    def drain(self):
        """
        The client reads everything; return it.
        """
        data = self.value()
        self.clear()
        if self.producer is not None and self.producerPaused:
            self.producerPaused = False
            self.producer.resumeProducing()
        return data


def connect(factory):
    protocol = factory.buildProtocol(None)
    transport = UnreadTransport(peerAddress=LOOPBACK)
    protocol.makeConnection(transport)
    transport.drain()
    return protocol, transport


def flood(protocol, transport, command, count, chunk=65536):
    """
    Send C{count} copies of C{command} as a client that does not read
    would: reads of up to C{chunk} octets, as long as the server reads.
    Return how many octets the server took.
    """
    data = command * count
    taken = 0
    while taken < len(data) and transport.producerState != "paused":
        protocol.dataReceived(data[taken:taken + chunk])
        taken += chunk
    return min(taken, len(data))


def readAll(protocol, transport, clock, rounds=10000):
    """
    The client now reads until the server has nothing more to say.
    """
    out = b""
    for _ in range(rounds):
        clock.advance(0)
        data = transport.drain()
        if not data:
            return out
        out += data
    raise AssertionError("the server kept writing")


@pytest.fixture
def alice(store):
    addUser(store, ALICE, PASSWORD)
    return ALICE


def assertPausedAtTheBound(protocol, transport, taken, total):
    assert transport.producerState == "paused"
    assert "output" in protocol.readingPaused
    # The replies waiting are about one buffer's worth, not all of them.
    assert transport.bufferSize < len(transport.value()) < 3 * transport.bufferSize
    # The server stopped taking input long before the client stopped
    # sending, and holds at most one read of it.
    assert taken < total
    assert len(protocol._buffer) <= 65536 + protocol.maxBufferedInput


def test_pop3CapaFloodBeforeLoginPausesReadingUntilTheClientReads(store, alice):
    clock = Clock()
    protocol, transport = connect(pop3Factory(store, clock))
    count = 20000
    taken = flood(protocol, transport, b"CAPA\r\n", count)
    assertPausedAtTheBound(protocol, transport, taken, count * 6)
    # More input is not run while the client does not read.
    waiting = len(transport.value())
    clock.advance(1)
    assert len(transport.value()) == waiting
    # The client reads: the server goes on, and pauses again at the bound.
    out = transport.drain()
    assert transport.producerState == "paused"
    out += readAll(protocol, transport, clock)
    assert transport.producerState == "producing"
    assert protocol.readingPaused == frozenset()
    # Everything it took is answered, in order, and nothing more.
    answered = out.count(b"+OK capability list follows\r\n")
    assert answered == taken // 6
    assert out.endswith(b".\r\n")


@pytest.mark.parametrize("command", [b"LIST\r\n", b"RETR 1\r\n", b"UIDL\r\n"])
def test_pop3TransactionFloodPausesReading(store, alice, command):
    for n in range(20):
        deliver(store, [ALICE], b"Subject: %d\r\n\r\n" % n + b"x" * 3000 + b"\r\n")
    clock = Clock()
    protocol, transport = connect(pop3Factory(store, clock))
    protocol.dataReceived(f"USER {ALICE}\r\nPASS {PASSWORD}\r\n".encode())
    assert b"+OK alice@example.org has 20 messages" in transport.drain()
    count = 50000
    taken = flood(protocol, transport, command, count, chunk=8192)
    assertPausedAtTheBound(protocol, transport, taken, count * len(command))
    out = transport.drain() + readAll(protocol, transport, clock)
    assert transport.producerState == "producing"
    assert out.count(b"\r\n.\r\n") == taken // len(command)


def test_pop3StreamedMessageHandsTheTransportBackToTheSession(store, alice):
    """
    A message longer than one read streams through a BlockSender, which
    the transport paces while it runs; afterwards the session is the
    transport's producer again, and pipelined commands after RETR wait.
    """
    line = b"y" * 78 + b"\r\n"
    deliver(store, [ALICE], b"Subject: big\r\n\r\n" + line * 20000)
    clock = Clock()
    protocol, transport = connect(pop3Factory(store, clock))
    protocol.dataReceived(f"USER {ALICE}\r\nPASS {PASSWORD}\r\n".encode())
    transport.drain()
    protocol.dataReceived(b"RETR 1\r\nSTAT\r\nNOOP\r\n")
    clock.advance(0)
    assert transport.producer is not protocol
    # One block read from the store beyond the bound, not the message.
    block = SQLMessageBody.chunksPerRead * CHUNK_SIZE
    assert len(transport.value()) < transport.bufferSize + block + 100
    out = readAll(protocol, transport, clock)
    assert out.endswith(b"\r\n.\r\n+OK 1 %d\r\n+OK\r\n" % (16 + 80 * 20000))
    assert transport.producer is protocol


def test_aStreamedMessageTheClientStoppedReadingIsNotCountedAsRetrieved(store, alice):
    """
    A client that stops reading halfway through a long RETR, then goes
    idle: the session's logout line and the retrieved-octets metric count
    the messages that went out whole, not the one it abandoned.
    """
    from twisted.logger import Logger

    line = b"y" * 78 + b"\r\n"
    deliver(store, [ALICE], b"Subject: big\r\n\r\n" + line * 20000)
    deliver(store, [ALICE], b"Subject: small\r\n\r\nhello\r\n")
    clock = Clock()
    factory = pop3Factory(store, clock)
    protocol, transport = connect(factory)
    events = []
    protocol.log = Logger(observer=events.append)
    protocol.dataReceived(f"USER {ALICE}\r\nPASS {PASSWORD}\r\nRETR 2\r\n".encode())
    readAll(protocol, transport, clock)
    protocol.dataReceived(b"RETR 1\r\n")
    clock.advance(0)
    # Some of it is out; the rest waits for a client that does not read.
    assert transport.value().startswith(b"+OK %d octets\r\n" % (16 + 80 * 20000))
    assert not transport.value().endswith(b"\r\n.\r\n")
    clock.advance(protocol.idleTimeout + 1)
    [logout] = [e for e in events if e.get("event") == "pop3.logout"]
    small = len(b"Subject: small\r\n\r\nhello\r\n")
    assert (logout["retr"], logout["retrBytes"]) == (1, small)
    assert factory.metrics.registry.get_sample_value("mailgate_pop3_retrieved_bytes_total") == small


@pytest.mark.parametrize("lmtp", [False, True], ids=["smtp", "lmtp"])
def test_smtpHelloFloodPausesReadingUntilTheClientReads(store, alice, lmtp):
    """
    Replies a client does not read stop the server reading at the bound.
    Hellos count as junk commands (f815cc2), whose limit would end this
    session after some 120 of them, long before their replies fill the
    bound: raised here, so that what is tested is the back-pressure.
    """
    clock = Clock()
    protocol, transport = connect(smtpFactory(store, clock, lmtp=lmtp))
    protocol.maxJunkCommands = 10**6
    hello = b"LHLO x\r\n" if lmtp else b"EHLO x\r\n"
    count = 50000
    taken = flood(protocol, transport, hello, count)
    assertPausedAtTheBound(protocol, transport, taken, count * len(hello))
    out = transport.drain() + readAll(protocol, transport, clock)
    # One whole reply (its last line) per hello taken.
    assert out.count(b"250 CHUNKING\r\n") == taken // len(hello)
    assert transport.producerState == "producing"


def test_inputAndOutputPausesAreKeptApart(store, alice):
    """
    Reading paused for input (a command waiting on the store, too many
    queued behind it) is not resumed by the output draining, nor the
    other way round.
    """
    clock = Clock()
    factory = pop3Factory(store, clock, authFailureDelay=5)
    protocol, transport = connect(factory)
    protocol.dataReceived(f"USER {ALICE}\r\nPASS wrong\r\n".encode() + b"CAPA\r\n" * 100)
    assert protocol.readingPaused == {"input"}
    assert transport.producerState == "paused"
    # The transport says its buffer drained: still paused for input.
    protocol.pauseProducing()
    protocol.resumeProducing()
    assert protocol.readingPaused == {"input"}
    assert transport.producerState == "paused"
    clock.advance(5)
    assert protocol.readingPaused == frozenset()
    assert transport.producerState == "producing"
    assert transport.value().count(b"+OK capability list follows") == 100


# -- a real server, a real socket ------------------------------------------------


def _serverReceiveQueue(serverPort, clientPort):
    """
    The octets the kernel holds for the server's end of a loopback
    connection that the server has not read (the rx_queue of
    /proc/net/tcp), or None if the socket is not found.
    """
    wanted = (f"0100007F:{serverPort:04X}", f"0100007F:{clientPort:04X}")
    with open("/proc/net/tcp") as table:
        next(table)
        for row in table:
            fields = row.split()
            if (fields[1], fields[2]) == wanted:
                return int(fields[4].split(":")[1], 16)
    return None


def _rss(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _cpuSeconds(pid):
    """
    The CPU time a process has used so far, user and system.
    """
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _floodUntilTheServerStopsReading(port, greetingStart, command, login=b"", smallBuffers=True):
    """
    Connect, send C{login}, then C{command} over and over without reading
    anything, until the server has not taken a single octet for a second.
    Return the socket and the octets sent.

    @param smallBuffers: shrink the client's socket buffers, so that the
        server's writes fill them soon; with the kernel's defaults, the
        server's reads are larger (more commands in one).
    """
    sock = socket.socket()
    if smallBuffers:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    sock.settimeout(DEADLINE)
    sock.connect(("127.0.0.1", port))
    if greetingStart:
        assert sock.recv(100).startswith(greetingStart)
    if login:
        sock.sendall(login)
    sock.setblocking(False)
    block = command * (65536 // len(command))
    sent = 0
    stalledSince = None
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        try:
            sent += sock.send(block)
            stalledSince = None
        except BlockingIOError:
            now = time.monotonic()
            if stalledSince is None:
                stalledSince = now
            elif now - stalledSince >= 1.0:
                return sock, sent
            time.sleep(0.02)
    pytest.fail(f"the server kept reading: {sent} octets taken in {DEADLINE} s")


@sqliteOnly
@pytest.mark.parametrize("protocol", ["pop3", "pop3-login", "metrics"])
def test_aClientThatNeverReadsStopsTheServerReading(mailgate_server, mailgate_cli, protocol):
    """
    A client pipelines commands (or HTTP requests to the metrics port,
    some 30 KB of answer each) and reads nothing.  The server stops
    reading from it (the kernel holds what the client sent, unread),
    its memory stays bounded, and it goes on serving others meanwhile.

    Not SMTP: every command an SMTP client can repeat without delivering
    (EHLO, NOOP, RSET, VRFY, HELP) is a junk command, and the junk limit
    ends such a session after some 120 of them, their replies far from
    filling a buffer (test_smtp_protocol); its back-pressure is tested
    above with the limit raised.
    """
    server = mailgate_server(
        "--metrics", "tcp:0:interface=127.0.0.1",
        "--auth-failure-delay", "0",
    )
    pid = server.process.pid
    if protocol == "pop3-login":
        mailgate_cli.addUser(ALICE, PASSWORD)
        mailgate_cli.deliver(ALICE, b"Subject: hi\n\n" + b"x" * 2000 + b"\n")
    before = _rss(pid)
    if protocol == "metrics":
        port, greeting, login = server.portOf("METRICS"), None, b""
        command = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
    elif protocol == "pop3":
        port, greeting, command, login = server.port, b"+OK", b"CAPA\r\n", b""
    else:
        port, greeting = server.port, b"+OK"
        command, login = b"RETR 1\r\n", f"USER {ALICE}\r\nPASS {PASSWORD}\r\n".encode()
    # The metrics port with the kernel's buffer sizes: reads of many
    # requests at once, which Twisted's own HTTP channel answers in one go.
    sock, sent = _floodUntilTheServerStopsReading(port, greeting, command, login, smallBuffers=protocol != "metrics")
    with sock:
        clientPort = sock.getsockname()[1]
        unread = _serverReceiveQueue(port, clientPort)
        assert unread is not None and unread > 0, "the server's end holds nothing unread"
        busyBefore = _cpuSeconds(pid)
        time.sleep(1.5)
        # Still not reading: the same octets wait in the kernel, and the
        # server is not busy making answers nobody reads either.
        assert _serverReceiveQueue(port, clientPort) == unread
        assert _cpuSeconds(pid) - busyBefore < 0.5
        # Bounded: far less than a server that buffered everything would
        # have grown (the issue saw 300 MB and more).
        assert _rss(pid) - before < 48 * 1024 * 1024, (before, _rss(pid))
        # Others are served meanwhile.
        with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as other:
            if greeting is None:
                other.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                assert other.recv(100).startswith(b"HTTP/1.1 200 OK\r\n")
            else:
                assert other.recv(100).startswith(greeting)
    assert sent < 64 * 1024 * 1024
    assert os.path.exists(f"/proc/{pid}")
