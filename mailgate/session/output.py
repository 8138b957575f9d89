# -*- test-case-name: tests.test_session -*-
"""
A session's output: replies sent at once, and held together for the
commands of one read.
"""

from mailgate.session.tlslayer import TLSLayer
from mailgate.twistedcompat import sendNow as _sendNow


def setNoDelay(transport):
    """
    Switch off Nagle's algorithm: a reply waiting for the client's delayed
    ACK costs some 40 ms, which is what made Twisted's own mail servers
    manage half a fetch session per second.
    """
    setTcpNoDelay = getattr(transport, "setTcpNoDelay", None)
    if setTcpNoDelay is not None:
        try:
            setTcpNoDelay(True)
        except OSError:
            pass


class ReplyWriter:
    """
    A session's output, sent as soon as it is ready.

    Twisted's TCP transport keeps every write until the reactor's next turn
    and asks epoll to watch the socket for writability meanwhile: for a
    reply of a few octets that is two C{epoll_ctl} calls and a second trip
    through the loop, for each command.  Like asyncio's transports, this
    sends at once when the kernel's buffer has room, which it nearly always
    has.  The replies to the commands of one read (a pipelining client's)
    are gathered between L{hold} and L{release} and sent together.

    @param protocol: the session; its C{transport} is looked up for each
        write, as it may change (TLS started after connecting).

    @ivar heldSize: octets held now, waiting for L{release}.
    """

    #: pieces given to L{writeParts} that add up to at most this many
    #: octets are joined and written as one
    joinBelow = 16 * 1024

    def __init__(self, protocol):
        self._protocol = protocol
        self._held = None
        self.heldSize = 0

    @property
    def transport(self):
        """
        Where replies go: the session's transport, or the connection
        beneath a PROXY-header wrapper (which only relays writes), so that
        the immediate-send path applies behind a balancer too.
        """
        transport = self._protocol.transport
        return getattr(transport, "relayedTransport", transport)

    def _send(self, data):
        if self._protocol is None:
            # The session has ended (L{detach}).
            return
        transport = self.transport
        if type(transport) is TLSLayer:
            # Encrypted and handed to the kernel at once, the same way.
            transport.send(data)
        else:
            _sendNow(transport, data)

    def write(self, data):
        """
        Send C{data}, or keep it with the others while held (L{hold}).
        """
        if self._held is not None:
            self._held.append(data)
            self.heldSize += len(data)
        else:
            self._send(data)

    def writeParts(self, parts):
        """
        Send the bytes-like C{parts} one after the other, or keep them with
        the others while held: a large reply made of pieces (a stuffed
        message) goes to the kernel without being joined first.
        """
        size = sum(map(len, parts))
        if size <= self.joinBelow:
            # Small (a header for TOP): one copy costs less than handing
            # the kernel several pieces.
            self.write(b"".join(parts))
        elif self._held is not None:
            self._held.extend(parts)
            self.heldSize += size
        else:
            self._send(parts)

    def send(self, data):
        """
        Send C{data} now, after anything held (for streamed responses,
        whose flow control is the transport's).
        """
        self.flush()
        self._send(data)

    def flush(self):
        """
        Send what is held now: before the connection closes or TLS starts.
        """
        if self._held:
            held = self._held
            self._held = []
            self.heldSize = 0
            self._send(held[0] if len(held) == 1 and type(held[0]) is bytes else held)

    def detach(self):
        """
        The session has ended: let go of it (the writer is part of it, so
        holding it back would keep both for the cyclic garbage collector),
        and drop whatever is written from now on, as a closed connection
        would.
        """
        self._protocol = None
        self._held = None
        self.heldSize = 0

    def hold(self):
        """
        Keep writes until L{release}, to send them together.

        @return: whether this call began holding (only that caller
            releases: holds nest).
        """
        if self._held is not None:
            return False
        self._held = []
        return True

    def release(self):
        """
        Send what was kept since L{hold}, and send at once again.
        """
        self.flush()
        self._held = None
