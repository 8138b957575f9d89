# -*- test-case-name: tests.test_tlslayer,tests.test_e2e_tls -*-
"""
TLS between a connection and its session, on Python's C{ssl} module.

L{TLSLayer} sits between the connection (below) and the session (above):
records the connection reads are decrypted and handed to the session;
what the session writes is encrypted and handed to the kernel at once.
Implicit-TLS listeners (POP3S) put it under every session
(L{TLSLayerFactory}); STLS and STARTTLS put it under a session already
connected (L{startTLS}).

Why not Twisted's C{TLSMemoryBIOProtocol}: it is general, and a POP3
session pays for that at every command.  It keeps each small write for the
reactor's next turn to make fewer records (a timer, a second trip through
the loop and two C{epoll_ctl} calls per reply, where the session core
already gathers one read's replies into one write), goes through
pyOpenSSL's wrappers for each record, and declares interfaces on every
connection.  Measured on one logged-in session (benchmarks/RESULTS.md):
a TOP over TLS cost 50 µs more of the server's user CPU than over plain
TCP, where the cipher work itself is under 10 µs.  The cryptography here
is the same OpenSSL, through the C{ssl.SSLObject} asyncio uses.

What it does, as Twisted's layer did:

  - Writes made before the handshake completes (an implicit-TLS greeting)
    are held and sent after it.
  - L{loseConnection} sends what was written, then a close_notify, then
    closes the connection.  Asked during the handshake, it waits for the
    handshake (at most L{closeTimeout} seconds).  A connection refused as
    it arrived (L{closeRefused}) waits for it at most L{refusalTimeout}
    seconds, so that a client refused at connection time still reads why
    but a scanner that never finishes its handshake does not hold a
    descriptor for long; none at all when descriptors are short.
  - A close_notify from the client closes the connection.
  - A failed handshake or a corrupt record: the alert OpenSSL made is sent,
    the connection closed, and the session's C{connectionLost} gets the
    C{ssl.SSLError} as its reason.
  - Flow control is the connection's: records are written as soon as they
    are made, so unsent output waits in the connection's buffer, and
    producers registered here are registered there.
"""

import functools
import ssl
import sys

from twisted.internet import tcp
from twisted.internet.interfaces import IHalfCloseableProtocol, IHandshakeListener, ILoggingContext, ISSLTransport
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgate.session.refusals import refusedInHandshake
from mailgate.timers import cancelled
from mailgate.twistedcompat import closeWhenWritten, sendNow

#: The most plaintext one TLS record carries.
RECORD = 16 * 1024


def _unlessServerNameNotASCII(hook, unraisable):
    """
    Pass an unraisable exception on to C{hook}, unless it is the one
    Python's C{ssl} module writes when a client asks (SNI) for a host name
    that is not ASCII: it decodes the name for the context's
    C{sni_callback} (set with C{--tls-sni-cert}), fails, writes a
    traceback through C{sys.unraisablehook} (five lines at error level in
    twistd's log, for any client that sends such a name) and fails the
    handshake, which is logged as any failed one (reason
    C{CALLBACK_FAILED}).  RFC 6066 allows ASCII alone (an IDN goes as its
    A-labels), so no client of a real server sends one.
    """
    if (
        unraisable.exc_type is UnicodeDecodeError
        and isinstance(unraisable.object, bytes)
        and unraisable.exc_value.object == unraisable.object
    ):
        return
    hook(unraisable)


@implementer(ISSLTransport, IHalfCloseableProtocol)
class TLSLayer:
    """
    The server side of TLS on one connection.

    @param context: the C{ssl.SSLContext} (server side) to use.
    @param protocol: the session above.
    @param clock: the reactor, for L{closeTimeout}.

    @ivar protocol: the session above.
    @ivar transport: the connection below (or the PROXY-header wrapper).
    @ivar connected: the connection below is open.
    @ivar disconnecting: L{loseConnection} or L{abortConnection} was
        called, or the TLS session failed.
    """

    #: seconds a close asked for during the handshake waits for it
    closeTimeout = 10.0

    #: seconds a connection refused as it arrived (too many connections, a
    #: banned address, the server stopping: L{closeRefused}) waits for its
    #: handshake, so that the client reads why, before it is aborted.  A
    #: real client's handshake takes a round trip or two, milliseconds; a
    #: scanner's never comes.  Refused connections are counted in no
    #: connection limit and each holds a descriptor while it waits: a
    #: banned scanner hammering the port holds its rate times this many.
    refusalTimeout = 2.0

    #: the descriptors refused connections may hold while they wait (a
    #: L{mailgate.session.refusals.DescriptorAllowance}, the process's);
    #: when all are held, a refused connection is aborted at once
    refusals = refusedInHandshake

    #: plaintext octets asked of OpenSSL per read (it gives at most a record)
    readSize = 64 * 1024

    def __init__(self, context, protocol, clock):
        self.protocol = protocol
        self.transport = None
        self._clock = clock
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._sink = None
        self._handshaking = True
        # What the handshake negotiated, kept past the connection's end
        # for the session's end line (L{version}, L{cipher}).
        self._version = self._cipher = None
        self._held = []
        self._shutDown = False
        self._closeTimer = None
        self._holdsRefusal = False
        self._error = None
        self.connected = False
        self.disconnecting = False

    # -- below: the layer is the connection's protocol -------------------------

    def makeConnection(self, transport):
        """
        Implicit TLS: the connection is made; the session above is
        connected at once (its greeting waits for the handshake).
        """
        self.attach(transport)
        self.protocol.makeConnection(self)

    def attach(self, transport):
        """
        Sit on C{transport} (L{makeConnection} without connecting the
        session above, for L{startTLS}).
        """
        self.transport = transport
        # Behind a PROXY-header wrapper, records go straight to the
        # connection beneath it.
        self._sink = getattr(transport, "relayedTransport", transport)
        self.connected = True

    def logPrefix(self):
        prefix = getattr(self.protocol, "logPrefix", None)
        return prefix() if prefix is not None else self.__class__.__name__

    def dataReceived(self, data):
        if self._shutDown or not self.connected:
            return
        self._incoming.write(data)
        if self._handshaking and not self._handshake():
            return
        if not self.disconnecting:
            self._readRecords()

    def _handshake(self):
        """
        Go on with the handshake.

        @return: whether it is complete and the session may read.
        """
        hook = sys.unraisablehook
        sys.unraisablehook = functools.partial(_unlessServerNameNotASCII, hook)
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return False
        except ssl.SSLError as e:
            self._fail(e)
            return False
        finally:
            sys.unraisablehook = hook
        self._handshaking = False
        tls = self._tls
        self._version, self._cipher = tls.version(), tls.cipher()[0]
        held, self._held = self._held, []
        if held:
            self._encrypt(held)
        else:
            self._flush()
        if self.disconnecting:
            self._cancelCloseTimer()
            self._shutdown()
            return False
        # The session is told (Twisted's IHandshakeListener, as its own
        # TLS layer tells it) before it reads anything over TLS; not one
        # closing already (refused as it arrived), which will read nothing.
        if IHandshakeListener.providedBy(self.protocol):
            self.protocol.handshakeCompleted()
        return True

    def _readRecords(self):
        chunks = []
        closed = False
        tls = self._tls
        incoming = self._incoming
        try:
            while True:
                chunk = tls.read(self.readSize)
                if not chunk:
                    # The client's close_notify.
                    closed = True
                    break
                chunks.append(chunk)
                if not incoming.pending and not tls.pending():
                    # All read: asking again would only raise SSLWantReadError.
                    break
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError as e:
            self._fail(e)
            return
        # Reading may have made records to send (a key update's answer).
        self._flush()
        if chunks:
            self.protocol.dataReceived(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if closed:
            self._inputEnded()

    def _inputEnded(self):
        """
        The client will send nothing more (its close_notify, or the end of
        the connection beneath): a session above that can answer what it
        was sent first is told so (TLS 1.3 lets the server write after the
        client's close_notify); otherwise, or mid-handshake, close.
        """
        halfCloseable = None if self._handshaking else IHalfCloseableProtocol(self.protocol, None)
        if halfCloseable is None or self.disconnecting:
            self.loseConnection()
        else:
            halfCloseable.readConnectionLost()

    # IHalfCloseableProtocol, for the connection beneath.

    def readConnectionLost(self):
        if self._shutDown or not self.connected:
            return
        if self._handshaking:
            # Nothing to finish: the handshake cannot complete now.
            self.abortConnection()
            return
        self._inputEnded()

    def writeConnectionLost(self):
        pass

    def _fail(self, error):
        """
        The handshake failed or a record was corrupt: send OpenSSL's alert
        and close; the session learns why in C{connectionLost}.

        The error is kept without its traceback: its frames hold this
        layer and the C{SSLObject}, a cycle that only Python's rare full
        collections would free, for every scanner and plain-text client
        that fails a handshake.
        """
        self._error = error.with_traceback(None)
        self._flush()
        self._held = []
        self._shutDown = True
        self.disconnecting = True
        self._cancelCloseTimer()
        self.transport.loseConnection()

    def connectionLost(self, reason):
        self.connected = False
        self.disconnecting = True
        self._cancelCloseTimer()
        if self._holdsRefusal:
            self._holdsRefusal = False
            self.refusals.give()
        if self._error is not None:
            reason = Failure(self._error)
        try:
            self.protocol.connectionLost(reason)
        finally:
            # The session above keeps this layer as its transport: let go
            # of it, and of OpenSSL's state for the connection (some 20 KiB
            # of buffers), so that both are freed as soon as the session
            # is, not at Python's next full garbage collection.  From here
            # on the layer only answers that it is closed.
            self.protocol = None
            self._tls = self._incoming = self._outgoing = None
            self._held = []

    # -- above: the layer is the session's transport --------------------------

    def write(self, data):
        self.send(data)

    def writeSequence(self, data):
        self.send(list(data))

    def send(self, data):
        """
        Encrypt C{data} and hand the records to the kernel (what it does
        not take waits in the connection's buffer).

        @param data: L{bytes}, or a list of bytes-like pieces to send in
            order.
        """
        if self._shutDown or not self.connected:
            return
        pieces = data if type(data) is list else [data]
        if self._handshaking:
            self._held.extend(pieces)
            return
        self._encrypt(pieces)

    def _encrypt(self, pieces):
        write = self._tls.write
        if len(pieces) > 1:
            pieces = _records(pieces)
        for piece in pieces:
            size = len(piece)
            written = write(piece)
            while written < size:
                piece = memoryview(piece)[written:]
                size = len(piece)
                written = write(piece)
        self._flush()

    def _flush(self):
        outgoing = self._outgoing
        if outgoing.pending:
            sendNow(self._sink, outgoing.read())

    def loseConnection(self):
        """
        Send what was written and a close_notify, then close the
        connection (once the handshake is over, if it is not yet).
        """
        if self.disconnecting or not self.connected:
            return
        self.disconnecting = True
        if self._handshaking:
            self._closeTimer = self._clock.callLater(self.closeTimeout, self._handshakeTooSlow)
            return
        self._shutdown()

    def closeRefused(self):
        """
        Close a connection refused as it arrived, its refusal written: as
        L{loseConnection}, but one still in its handshake waits for it
        L{refusalTimeout} seconds at most, and is aborted at once,
        unanswered, when the descriptors refused connections may hold
        (L{refusals}) are all held.
        """
        if self.disconnecting or not self.connected:
            return
        if not self._handshaking:
            self.loseConnection()
            return
        if not self.refusals.take():
            self.abortConnection()
            return
        self._holdsRefusal = True
        self.disconnecting = True
        self._closeTimer = self._clock.callLater(self.refusalTimeout, self._handshakeTooSlow)

    def _handshakeTooSlow(self):
        self._closeTimer = None
        self._held = []
        self._shutDown = True
        self.transport.abortConnection()

    def _cancelCloseTimer(self):
        self._closeTimer = cancelled(self._closeTimer)

    def _shutdown(self):
        self._shutDown = True
        try:
            self._tls.unwrap()
        except ssl.SSLError:
            # Waiting for the client's close_notify (never awaited), or the
            # session is broken already: either way, closing is what is left.
            pass
        self._flush()
        closeWhenWritten(self.transport)

    def abortConnection(self):
        self.disconnecting = True
        self._shutDown = True
        self._held = []
        self._cancelCloseTimer()
        self.transport.abortConnection()

    def loseWriteConnection(self):
        # A half-close would leave the TLS session without its
        # close_notify; close it whole.
        self.loseConnection()

    def getPeer(self):
        return self.transport.getPeer()

    @property
    def namedNoClient(self):
        """
        Whether the connection below named no client: a PROXY header of a
        load balancer's health check (L{mailgate.session.proxy}), which
        the session logs no end of, over implicit TLS as in the clear.
        """
        return getattr(self.transport, "namedNoClient", False)

    def getHost(self):
        return self.transport.getHost()

    def getPeerCertificate(self):
        """
        Clients are not asked for certificates.
        """
        return None

    def getTcpNoDelay(self):
        return self.transport.getTcpNoDelay()

    def setTcpNoDelay(self, enabled):
        self.transport.setTcpNoDelay(enabled)

    def getTcpKeepAlive(self):
        return self.transport.getTcpKeepAlive()

    def setTcpKeepAlive(self, enabled):
        self.transport.setTcpKeepAlive(enabled)

    # Flow control is the connection's (see the module's docstring).

    def registerProducer(self, producer, streaming):
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self):
        self.transport.unregisterProducer()

    def pauseProducing(self):
        self.transport.pauseProducing()

    def resumeProducing(self):
        self.transport.resumeProducing()

    def stopProducing(self):
        self.transport.stopProducing()

    # -- what the session may ask ----------------------------------------------

    @property
    def handshaking(self):
        """
        The handshake is not over: the client has been sent nothing the
        session wrote, and has sent it nothing yet.
        """
        return self._handshaking and not self._shutDown

    @property
    def established(self):
        """
        The handshake completed (and stays so once the connection has
        ended): what L{mailgate.tls.isSecure} asks, so that a session whose
        handshake failed is neither taken nor logged as one over TLS.
        """
        return not self._handshaking

    @property
    def version(self):
        """
        The protocol negotiated (C{"TLSv1.3"}), once the handshake has
        completed (and still once the connection has ended, for the
        session's end line); C{None} before.
        """
        return self._version

    @property
    def cipher(self):
        """
        The cipher suite's name (C{"TLS_AES_256_GCM_SHA384"}), as
        L{version}.
        """
        return self._cipher


def _records(pieces):
    """
    The pieces, small neighbours joined up to a record's size: a reply
    made of many short parts (a dot-stuffed message) goes out in full
    records, not a record per part.
    """
    batch = []
    batchSize = 0
    for piece in pieces:
        size = len(piece)
        if batchSize + size > RECORD and batch:
            yield batch[0] if len(batch) == 1 else b"".join(batch)
            batch = []
            batchSize = 0
        if size >= RECORD:
            yield piece
            continue
        batch.append(piece)
        batchSize += size
    if batch:
        yield batch[0] if len(batch) == 1 else b"".join(batch)


@implementer(ILoggingContext)
class TLSLayerFactory:
    """
    Implicit TLS (POP3S): every connection the wrapped factory serves gets
    a L{TLSLayer} beneath its session.

    @param tls: a L{mailgate.tls.ServerTLS}; each connection uses the
        certificate it holds when the connection is made.
    @param wrappedFactory: the sessions' factory.
    @param clock: the reactor.
    """

    def __init__(self, tls, wrappedFactory, clock):
        self.tls = tls
        self.wrappedFactory = wrappedFactory
        self.clock = clock

    def logPrefix(self):
        wrapped = self.wrappedFactory
        prefix = wrapped.logPrefix() if ILoggingContext.providedBy(wrapped) else wrapped.__class__.__name__
        return f"{prefix} (TLS)"

    def doStart(self):
        self.wrappedFactory.doStart()

    def doStop(self):
        self.wrappedFactory.doStop()

    def buildProtocol(self, addr):
        protocol = self.wrappedFactory.buildProtocol(addr)
        if protocol is None:
            return None
        return TLSLayer(self.tls.context, protocol, self.clock)


def startTLS(protocol, tls, clock):
    """
    Start TLS under C{protocol}, a connected session: from now on its
    transport is a L{TLSLayer} on the connection it had.

    A transport of another kind (an application's own, or
    L{mailgate.testing.TLSStringTransport}, TLS in name only) starts TLS
    its own way: its C{startTLS} is called with C{tls}.

    @return: the L{TLSLayer}, or C{None} if the transport started TLS itself.
    """
    below = protocol.transport
    if isinstance(below, tcp.Connection):
        reroute = "protocol"
    elif isinstance(below, ProtocolWrapper):
        reroute = "wrappedProtocol"
    else:
        below.startTLS(tls)
        return None
    layer = TLSLayer(tls.context, protocol, clock)
    layer.attach(below)
    # What the connection reads and its end now go to the layer.
    setattr(below, reroute, layer)
    protocol.transport = layer
    return layer
