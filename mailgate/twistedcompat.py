# -*- test-case-name: tests.test_twistedcompat -*-
"""
Every place mailgate reaches into Twisted's private fields, in one module.

Twisted gives no public way to do these few things, and each saves real
work on a hot path or makes start-up errors clear.  Kept here, and pinned by
tests of the Twisted behaviour they rely on (tests/test_twistedcompat.py),
so that a Twisted upgrade that changes them fails a test rather than mail
delivery.
"""

import weakref

from twisted.internet import main, tcp
from twisted.python import failure


#: The most pieces one C{sendmsg} takes (Linux's IOV_MAX).
_MOST_PIECES = 1024


def sendNow(transport, data):
    """
    Write C{data} to C{transport}, handing it to the kernel at once when
    nothing is waiting in the transport's buffer; what the socket does not
    take (and everything on another kind of transport, Twisted's TLS
    included) goes through the transport's C{write} as usual.  mailgate's
    own TLS layer (L{mailgate.session.tlslayer}) hands its records here.

    @param data: L{bytes}, or a list of bytes-like pieces to send in
        order: one C{sendmsg} takes them without their being joined (a
        large reply is not copied once more on its way out).

    Relies on C{tcp.Connection}'s private C{dataBuffer}, C{_tempDataBuffer}
    and C{_writeDisconnected}: when all are empty and false, nothing is
    queued and a direct C{send} keeps the byte order.  When octets are
    queued, a small reply joins the last of them (L{_joinedToQueued}).
    """
    pieces = type(data) is list
    if _nothingQueued(transport):
        try:
            if not pieces:
                sent = transport.socket.send(data)
            elif len(data) <= _MOST_PIECES:
                sent = transport.socket.sendmsg(data)
            else:
                data = b"".join(data)
                pieces = False
                sent = transport.socket.send(data)
        except OSError:
            # Would block, or the connection is broken: the transport's own
            # write path finds out and reports it the usual way.
            sent = 0
        if not pieces:
            if sent == len(data):
                return
            data = data[sent:]
        else:
            data = _after(data, sent)
            if not data:
                return
    elif pieces:
        data = b"".join(data)
    elif _joinedToQueued(transport, data):
        return
    transport.write(data)


#: Replies shorter than this are added to the last piece waiting in the
#: transport (L{_joinedToQueued}) while that piece is shorter than
#: L{_JOINED_PIECE}.
_SMALL_WRITE = 1024
_JOINED_PIECE = 4096


def _joinedToQueued(transport, data):
    """
    Add the small reply C{data} to the last piece waiting in the
    transport's temporary buffer, rather than as a piece of its own.

    A client that sends command after command and reads none of the
    replies fills the transport's buffer with them until its C{bufferSize}
    (64 KiB) pauses the session: as thousands of nine-octet replies, each
    a Python object of some fifty octets, that held 371 KB for the 64 KiB
    bound (5.7x); joined into pieces of a few KiB, about the octets.  The
    join copies at most L{_JOINED_PIECE} octets a reply, and only while
    octets are waiting, which they rarely are.

    Relies on C{tcp.Connection}'s private C{_tempDataBuffer} (what
    C{write} appends to and C{doWrite} joins), C{_tempDataLen} (its
    length, which flow control reads) and C{_maybePauseProducer} (the
    check C{write} makes after adding), as C{write} does.

    @return: whether it was added (else the caller writes it as usual).
    """
    if len(data) >= _SMALL_WRITE or not isinstance(transport, tcp.Connection):
        return False
    if transport.TLS or not transport.connected or transport.disconnecting or transport._writeDisconnected:
        return False
    queued = transport._tempDataBuffer
    if not queued or type(queued[-1]) is not bytes or len(queued[-1]) >= _JOINED_PIECE:
        return False
    queued[-1] += data
    transport._tempDataLen += len(data)
    transport._maybePauseProducer()
    return True


def _nothingQueued(transport):
    """
    Whether C{transport} is Twisted's own plain TCP connection, open, not
    closing, with nothing waiting in its write buffers: then octets handed
    to its socket directly keep their order.
    """
    return (
        isinstance(transport, tcp.Connection)
        and not transport.TLS
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnected
        and not transport.dataBuffer
        and not transport._tempDataBuffer
    )


def _after(pieces, sent):
    """
    What is left of C{pieces} once their first C{sent} octets are gone,
    joined (empty if nothing is).
    """
    for index, piece in enumerate(pieces):
        size = len(piece)
        if sent < size:
            rest = pieces[index:]
            rest[0] = memoryview(piece)[sent:]
            return b"".join(rest)
        sent -= size
    return b""


#: Seconds a closing connection may go without its client taking any of the
#: octets still waiting for it (L{closeWhenWritten}) before it is aborted:
#: the longest of the sessions' idle timeouts (POP3's autologout), so that
#: no client an open session would have waited for is cut.
DRAIN_TIMEOUT = 600.0


def closeWhenWritten(transport, timeout=DRAIN_TIMEOUT):
    """
    C{transport.loseConnection()}, without a trip through the reactor's
    write readiness when nothing is left to write, and bounded when
    something is.

    Twisted's C{loseConnection} always waits for the socket to be writable
    (an C{epoll_ctl} to stop reading, another to watch for writing, a turn
    of the loop, an empty C{send}, a third C{epoll_ctl}) before it closes,
    even when its buffer is empty, as it nearly always is for mailgate's
    sessions, whose replies go to the kernel at once (L{sendNow}).  That
    is a tenth of the system calls of a short POP3 session.  Here, when
    nothing waits in the transport's buffer and no producer is
    registered, the connection stops reading at once and is closed in the
    reactor's next turn (as Twisted would close it: C{shutdown}, C{close},
    the protocol's C{connectionLost} with C{ConnectionDone}); what was
    sent is in the kernel's buffer and still reaches the client, as with
    C{loseConnection}.  Anything else (another kind of transport, TLS by
    Twisted, octets waiting) takes Twisted's own C{loseConnection}.

    Twisted's C{loseConnection} waits for its buffer to empty however long
    that takes, and the session's idle timer has stopped: a client that
    sent QUIT (or half-closed) behind replies it never reads held its
    connection, its descriptor, its place in the connection limits and
    the octets waiting for it for ever.  So while octets wait, a client
    that takes none of them for C{timeout} seconds has its connection
    aborted (L{_abortIfStalled}); one that reads, however slowly, is
    waited for.

    Relies on C{tcp.Connection}'s private C{dataBuffer}, C{offset},
    C{_tempDataBuffer}, C{_tempDataLen} and C{_writeDisconnected} (as
    L{sendNow}), and on its C{disconnecting} flag, which makes its C{write}
    keep octets for a close under way.

    @param timeout: seconds without progress before the abort.
    """
    if _nothingQueued(transport) and transport.producer is None:
        transport.stopReading()
        transport.disconnecting = 1
        transport.reactor.callLater(0, _closeIdle, transport, timeout)
        return
    transport.loseConnection()
    # Behind a PROXY-header wrapper, the connection beneath is watched.
    _watchDrain(getattr(transport, "relayedTransport", transport), timeout)


def _closeIdle(transport, timeout):
    """
    The second half of L{closeWhenWritten}, a turn of the reactor later.
    """
    if not transport.connected:
        # Closed meanwhile (aborted, or the peer reset it).
        return
    if transport.dataBuffer or transport._tempDataBuffer or transport.producer is not None:
        # Written to since: Twisted's own write path sends it, then closes
        # (C{disconnecting} is set).
        transport.startWriting()
        _watchDrain(transport, timeout)
        return
    transport.connectionLost(failure.Failure(main.CONNECTION_DONE))


def _watchDrain(transport, timeout):
    """
    Check the closing C{transport} every C{timeout} seconds until it is
    gone (L{_abortIfStalled}); nothing for other kinds of transport (a TLS
    layer closes the connection beneath it with L{closeWhenWritten}).
    """
    if isinstance(transport, tcp.Connection) and transport.connected:
        # A weak reference: a connection that closes meanwhile is freed
        # then, with what was left in its buffer, not when the check is due.
        transport.reactor.callLater(timeout, _abortIfStalled, weakref.ref(transport), timeout, _waiting(transport))


def _abortIfStalled(reference, timeout, waitingBefore):
    """
    Abort the closing connection if its client has taken nothing of what
    waited for it C{timeout} seconds ago; else check again later.
    """
    transport = reference()
    if transport is None or not transport.connected:
        return
    waiting = _waiting(transport)
    if waiting >= waitingBefore:
        transport.abortConnection()
        return
    transport.reactor.callLater(timeout, _abortIfStalled, reference, timeout, waiting)


def _waiting(transport):
    """
    The octets still waiting in C{transport}'s buffers.
    """
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


def raiseListenErrorsAtOnce(service):
    """
    Make a C{StreamServerEndpointService} raise from its
    C{privilegedStartService} when its endpoint fails to listen at once (a
    port in use, a permission refused), instead of logging the error and
    carrying on deaf.  Call it before the service starts.

    Relies on the service's private C{_raiseSynchronously} flag, which
    Twisted reads in C{privilegedStartService} (and resets after it).
    """
    service._raiseSynchronously = True


def whenListening(service, callback):
    """
    Call C{callback(port)} with the C{IListeningPort} of a
    C{StreamServerEndpointService} once its endpoint listens; call it
    after C{privilegedStartService}.

    Relies on the service's private C{_waitingForPort}: the L{Deferred} of
    C{endpoint.listen}, which C{privilegedStartService} keeps there.
    """
    service._waitingForPort.addCallback(callback)


def leanEventDispatch(reactor):
    """
    Make C{reactor}, if it is Twisted's epoll reactor, hand each ready
    descriptor to its connection directly, without wrapping every event
    in the legacy logging context (C{log.callWithLogger}: a C{logPrefix}
    call, a context dictionary copied and a context stack pushed, for each
    read).  That context only adds a C{system} field to legacy
    C{twisted.python.log} messages; mailgate's events carry their own
    session fields.  An exception that escapes a connection's handler is
    still logged, and the loop goes on, as before.

    Used by C{twistd mailgate}, which owns its reactor; an application
    embedding mailgate's services keeps its reactor as it is.

    Relies on C{EPollReactor}'s private C{_poller}, C{_selectables} and
    C{_doReadOrWrite}, read by its C{doPoll}, which the main loop calls as
    C{doIteration}.

    @return: whether the reactor was changed.
    """
    import errno

    from twisted.internet import epollreactor
    from twisted.python import log

    if not isinstance(reactor, epollreactor.EPollReactor):
        return False
    poller = reactor._poller
    selectables = reactor._selectables
    doReadOrWrite = reactor._doReadOrWrite

    def doPoll(timeout):
        if timeout is None:
            timeout = -1
        try:
            events = poller.poll(timeout, len(selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            try:
                doReadOrWrite(selectable, fd, event)
            except Exception:
                log.err(None, "unhandled error handling a ready descriptor")

    reactor.doPoll = reactor.doIteration = doPoll
    return True


def twistedHandshakeDone(transport):
    """
    Whether Twisted's own TLS under a session (C{TLSMemoryBIOProtocol}: an
    C{ssl:} listener, an embedding host's C{TLSMemoryBIOFactory}) has
    completed its handshake; C{True} for a transport that does not say.

    The session is told the same through C{IHandshakeListener}, but
    L{mailgate.tls.isSecure} asks it of the transport, and a handshake that
    failed half way has a version and a cipher chosen all the same: only
    this flag tells it from one that completed.

    Relies on C{TLSMemoryBIOProtocol}'s private C{_handshakeDone}, set where
    it calls C{handshakeCompleted} and kept once the connection is lost.
    """
    return getattr(transport, "_handshakeDone", True)
