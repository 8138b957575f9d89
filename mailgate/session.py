# -*- test-case-name: tests.test_pop3_protocol,tests.test_smtp_protocol -*-
"""
Connection-level pieces every mailgate protocol needs.
"""

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


class IdleTimer:
    """
    A session's inactivity timer: one timer per session, rescheduled
    lazily.  Activity only records a time stamp, so a busy session does not
    pay for cancelling and rescheduling a timer on every command.

    @param clock: provides C{seconds} and C{callLater} (the reactor).
    @param timeout: seconds of inactivity allowed; 0 for none.
    @param expired: called once the session has been idle for C{timeout}.
    @param busy: returns whether the session is working on something the
        client is waiting for (then it is not idle, whatever the time).
    """

    def __init__(self, clock, timeout, expired, busy):
        self._clock = clock
        self.timeout = timeout
        self._expired = expired
        self._busy = busy
        self._call = None
        self.lastActivity = 0

    def activity(self):
        self.lastActivity = self._clock.seconds()

    def start(self):
        self.activity()
        if self.timeout and self._call is None:
            self._call = self._clock.callLater(self.timeout, self._check)

    def cancel(self):
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None

    def _check(self):
        self._call = None
        idle = self._clock.seconds() - self.lastActivity
        if idle < self.timeout or self._busy():
            delay = self.timeout - idle if idle < self.timeout else self.timeout
            self._call = self._clock.callLater(delay, self._check)
            return
        self._expired()


class ReplyWriter:
    """
    A session's output, sent as soon as it is ready.

    Twisted's TCP transport keeps every write until the reactor's next turn
    and asks epoll to watch the socket for writability meanwhile: for a
    reply of a few octets that is two C{epoll_ctl} calls and a second trip
    through the loop, for each command.  Like asyncio's transports, this
    sends at once when the kernel's buffer has room, which it nearly always
    has.  The replies to the commands of one read (a pipelining client's)
    are gathered while L{holding} and sent together.

    @param protocol: the session; its C{transport} is looked up for each
        write, as it may change (a wrapper installed after connecting).
    """

    def __init__(self, protocol):
        self._protocol = protocol
        self._held = None

    @property
    def transport(self):
        return self._protocol.transport

    def write(self, data):
        """
        Send C{data}, or keep it with the others if L{holding}.
        """
        if self._held is not None:
            self._held.append(data)
        else:
            _sendNow(self.transport, data)

    def send(self, data):
        """
        Send C{data} now, after anything held (for streamed responses,
        whose flow control is the transport's).
        """
        self.flush()
        _sendNow(self.transport, data)

    def flush(self):
        """
        Send what is held now: before the connection closes or TLS starts.
        """
        if self._held:
            data = b"".join(self._held)
            del self._held[:]
            _sendNow(self.transport, data)

    def holding(self):
        """
        A context manager: writes inside it go out together at its end.
        """
        return _Holding(self)


class _Holding:
    def __init__(self, writer):
        self._writer = writer
        self._outer = False

    def __enter__(self):
        if self._writer._held is None:
            self._outer = True
            self._writer._held = []

    def __exit__(self, *exc):
        if self._outer:
            self._writer.flush()
            self._writer._held = None
        return False
