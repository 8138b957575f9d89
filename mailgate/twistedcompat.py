# -*- test-case-name: tests.test_twistedcompat -*-
"""
Every place mailgate reaches into Twisted's private fields, in one module.

Twisted gives no public way to do these few things, and each saves real
work on a hot path or makes start-up errors clear.  Kept here, and pinned by
tests of the Twisted behaviour they rely on (tests/test_twistedcompat.py),
so that a Twisted upgrade that changes them fails a test rather than mail
delivery.
"""

from twisted.internet import tcp
from twisted.internet._newtls import _BypassTLS
from twisted.protocols.tls import TLSMemoryBIOProtocol


#: The most pieces one C{sendmsg} takes (Linux's IOV_MAX).
_MOST_PIECES = 1024


def sendNow(transport, data):
    """
    Write C{data} to C{transport}, handing it to the kernel at once when
    nothing is waiting in the transport's buffer; what the socket does not
    take (and everything on a TLS or non-TCP transport) goes through the
    transport's C{write} as usual.

    @param data: L{bytes}, or a list of bytes-like pieces to send in
        order: one C{sendmsg} takes them without their being joined (a
        large reply is not copied once more on its way out).

    Relies on C{tcp.Connection}'s private C{dataBuffer}, C{_tempDataBuffer}
    and C{_writeDisconnected}: when all are empty and false, nothing is
    queued and a direct C{send} keeps the byte order.
    """
    pieces = type(data) is list
    tls = _tlsLayer(transport)
    if tls is not None:
        _sendThroughTLS(tls, data if pieces else [data])
        return
    if (
        isinstance(transport, tcp.Connection)
        and not transport.TLS
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnected
        and not transport.dataBuffer
        and not transport._tempDataBuffer
    ):
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
    transport.write(data)


def _tlsLayer(transport):
    """
    For a TLS connection over TCP, C{(protocol, sink, connection)}: the
    C{TLSMemoryBIOProtocol}, the object whose C{write} it hands its records
    to, and the TCP connection beneath; else C{None}.

    Implicit TLS (POP3S, through C{TLSMemoryBIOFactory}): the session's
    transport is the TLS protocol, its own transport the TCP connection.
    TLS started on a connection (STLS, C{_newtls}): the session's transport
    is the TCP connection, with C{TLS} set, its C{protocol} the TLS
    protocol, writing through a C{_BypassTLS} of that connection.
    """
    if isinstance(transport, TLSMemoryBIOProtocol):
        connection = transport.transport
        if isinstance(connection, tcp.Connection) and not connection.TLS:
            return transport, connection, connection
        return None
    if isinstance(transport, tcp.Connection) and transport.TLS:
        protocol = transport.protocol
        sink = getattr(protocol, "transport", None)
        if (
            isinstance(protocol, TLSMemoryBIOProtocol)
            and isinstance(sink, _BypassTLS)
            and sink._connection is transport
        ):
            return protocol, sink, transport
    return None


def _sendThroughTLS(layer, pieces):
    """
    Write the bytes-like C{pieces} through a TLS layer over TCP, one after
    the other, and hand the records they make to the kernel at once.

    Twisted's TLS transport keeps small writes for the reactor's next turn
    (C{BufferingTLSTransport}: a C{callLater(0)} per reply) to make fewer
    records of them; the session already gathers the replies of one read,
    so here that only costs a timer and a trip through the loop and, for
    the records, two C{epoll_ctl} calls and another trip, per command.

    Relies on C{TLSMemoryBIOProtocol} writing its records with
    C{self.transport.write} (C{_flushSendBIO}), on C{BufferingTLSTransport}
    keeping the writes it holds in C{_aggregator} (flushed first, to keep
    the order), and on C{_newtls}'s C{_BypassTLS} (see L{_tlsLayer}).  For
    the length of the write, the sink's C{write} is shadowed by an instance
    attribute collecting the records; what the socket does not take goes
    to the sink as before.
    """
    protocol, sink, connection = layer
    if "write" in vars(sink) or not connection.connected:
        for piece in pieces:
            protocol.write(piece)
        return
    aggregator = getattr(protocol, "_aggregator", None)
    if aggregator is not None and getattr(aggregator, "_buffer", None):
        # Written by someone else and not sent yet: it goes first.
        aggregator.flush()
    records = []
    sink.write = records.append
    try:
        for piece in pieces:
            TLSMemoryBIOProtocol.write(protocol, piece)
    finally:
        del sink.write
    if not records:
        return
    if (
        not connection.disconnecting
        and not connection._writeDisconnected
        and not connection.dataBuffer
        and not connection._tempDataBuffer
        and len(records) <= _MOST_PIECES
    ):
        try:
            sent = connection.socket.sendmsg(records)
        except OSError:
            sent = 0
        rest = _after(records, sent)
    else:
        rest = b"".join(records)
    if rest:
        sink.write(rest)


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
