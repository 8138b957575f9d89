# -*- test-case-name: tests.test_hostile_load -*-
"""
A listener whose process has run out of file descriptors.

The connection limits (L{mailgate.policy.descriptors}) keep connections
below the open file limit, but descriptors may still run out (messages
spooled to disk, a database reconnecting, another part of an embedding
process).  Then C{accept(2)} fails with C{EMFILE}, and Twisted's accept
loop does one of two things:

  - it frees the descriptor it keeps in reserve, accepts and closes every
    connection waiting, and takes the reserve again, writing three log
    lines (C{EMFILE encountered...}, C{Closed socket from...},
    C{Re-reserving...}) for every connection it so closes: a flood of
    connections is a flood of log lines;
  - without its reserve (another thread took the freed descriptor), it
    logs C{Could not accept new connection (EMFILE)} and returns, the
    connection left waiting: the listening socket is still readable, and
    the reactor calls it again at once, a loop at 100 % CPU writing a log
    line per turn until a descriptor is freed.

L{AcceptErrors} takes the listener's accept-loop log events instead: it
counts each connection closed unanswered in
C{mailgate_connections_refused_total{reason="no_descriptors"}}, writes a
warning (C{listener.out_of_descriptors}) at the end of the first one's
turn and then at most one a minute, with the counts since the last, and
after a failed accept stops reading from the listening socket for a
moment (L{ACCEPT_PAUSE}), as nginx does, so that the connections waiting
wait in the kernel's backlog rather than turn the reactor.  Once
connections close, the next connection is served as any other.

It also bounds the connections accepted in one turn of the reactor
(L{MAX_ACCEPTS_PER_TURN}), which the descriptors kept in reserve
(L{mailgate.policy.descriptors.RESERVED}) are counted to cover.

Twisted's reserve itself is one descriptor for the whole process: when
another part of the process takes the descriptor it freed before it is
taken back, Twisted logs a critical error with a traceback each time
(C{Could not reserve EMFILE recovery file descriptor}); L{ReserveErrors}
makes that one warning a minute (C{listener.no_spare_descriptor}).
"""

from twisted.internet import tcp
from twisted.logger import Logger, LogLevel, globalLogPublisher

from mailgate.plural import noun
from mailgate.timers import cancelled, elapsedClock

#: seconds between two warnings of one listener running out of descriptors
LOG_INTERVAL = 60.0
#: seconds a listener that could not accept stops trying
ACCEPT_PAUSE = 0.25
#: connections accepted in one turn of the reactor, at most.  A connection
#: refused by the limits keeps its descriptor until its refusal is written,
#: in the next turn; Twisted accepts 100 a turn and more while the backlog
#: stays full, so under a flood a turn's refusals alone could take the
#: descriptors kept for the database and the log.
MAX_ACCEPTS_PER_TURN = 64

#: the accept loop's events (twisted.internet.tcp), by their format
_RELEASING = "EMFILE encountered;"
_CLOSED = "EMFILE recovery: Closed socket"
_RERESERVING = "Re-reserving EMFILE recovery"
_COULD_NOT_ACCEPT = "Could not accept new connection"


def _metricsProtocol(name):
    return "pop3" if name == "POP3S" else name.lower()


class AcceptErrors:
    """
    The log observer of one listening port's accept loop (see the module
    docstring), installed by L{watchAcceptErrors}.

    @param port: the listening port (a C{twisted.internet.tcp.Port}).
    @param name: its protocol, as the listener names it (C{"POP3"}, ...).
    @param where: where it listens, for the warning.
    @param reactor: the clock, and the pause's timer.
    @param metrics: a L{mailgate.metrics.Metrics}, or C{None}.
    @param forward: where the port's other events go.

    @ivar closed: connections closed unanswered so far.
    @ivar failedAccepts: accepts that failed and left the connection waiting.
    """

    log = Logger(namespace="mailgate.listener")

    def __init__(self, port, name, where, reactor, metrics=None, forward=globalLogPublisher):
        self._port = port
        self._name = name
        self._where = where
        self._reactor = reactor
        # Its minutes are measured on the monotonic clock: a step of the
        # wall clock back made one last as long as the step.
        self._now = elapsedClock(reactor)
        self._metrics = metrics
        self._forward = forward
        self._lastWarning = None
        self._warning = None
        self._error = None
        self._closedSinceWarning = 0
        self._failedSinceWarning = 0
        self._resume = None
        self.closed = 0
        self.failedAccepts = 0

    def __call__(self, event):
        text = event.get("log_format") or ""
        if text.startswith(_RELEASING) or text.startswith(_RERESERVING):
            return
        if text.startswith(_CLOSED):
            self.closed += 1
            self._closedSinceWarning += 1
            if self._metrics is not None:
                self._metrics.connectionRefused(_metricsProtocol(self._name), "no descriptors")
            self._warn("EMFILE")
            return
        if text.startswith(_COULD_NOT_ACCEPT):
            error = event.get("acceptError") or "EMFILE"
            if error == "ECONNABORTED":
                # A client that gave up before it was accepted: not news.
                return
            self.failedAccepts += 1
            self._failedSinceWarning += 1
            self._warn(error)
            self._pause()
            return
        self._forward(event)

    def _warn(self, error):
        """
        Have the warning written: at the end of this turn, once the accept
        loop is done (so that it counts the whole burst), or, within a
        minute of the last one, when that minute is over (so that the
        connections closed meanwhile are still told).
        """
        self._error = error
        if self._warning is not None:
            return
        now = self._now()
        delay = 0 if self._lastWarning is None else max(0, self._lastWarning + LOG_INTERVAL - now)
        self._warning = self._reactor.callLater(delay, self._writeWarning)

    def _writeWarning(self):
        self._warning = None
        self._lastWarning = self._now()
        closed, self._closedSinceWarning = self._closedSinceWarning, 0
        failed, self._failedSinceWarning = self._failedSinceWarning, 0
        error = self._error
        reason = "out of file descriptors" if error in ("EMFILE", "ENFILE") else "out of memory for sockets"
        self.log.emit(
            LogLevel.warn,
            "{protocol} on {where} cannot accept connections: {reason} ({error}); "
            f"{{closed}} {noun(closed, 'connection')} closed unanswered, {{failed}} {noun(failed, 'accept')} "
            "put off, since the last such line (at most one a "
            "minute); raise the open file limit (ulimit -n, systemd's LimitNOFILE) or lower max-connections",
            protocol=self._name,
            where=self._where,
            reason=reason,
            error=error,
            closed=closed,
            failed=failed,
            event="listener.out_of_descriptors",
        )

    def _pause(self):
        port = self._port
        if self._resume is not None or not getattr(port, "connected", False):
            return
        port.stopReading()
        self._resume = self._reactor.callLater(ACCEPT_PAUSE, self._resumeAccepting)

    def _resumeAccepting(self):
        self._resume = None
        port = self._port
        if getattr(port, "connected", False) and not getattr(port, "disconnecting", False):
            port.startReading()

    def stop(self):
        """
        The listener is closing: no more resuming it; a warning still due
        is written now.
        """
        self._resume = cancelled(self._resume)
        if self._warning is not None:
            self._warning = cancelled(self._warning)
            self._writeWarning()


class ReserveErrors:
    """
    The log observer of Twisted's spare descriptor (C{tcp._reservedFD}),
    installed by L{watchAcceptErrors}: its failures to take the spare
    back, a critical error with a traceback each, become a warning at
    most once a minute, with how many there were since the last.

    @param reactor: the clock.
    @param forward: where its other events go.
    @ivar failures: how many so far.
    """

    log = Logger(namespace="mailgate.listener")

    def __init__(self, reactor, forward=globalLogPublisher):
        self._reactor = reactor
        # Its minutes are measured on the monotonic clock: a step of the
        # wall clock back made one last as long as the step.
        self._now = elapsedClock(reactor)
        self._forward = forward
        self._lastWarning = None
        self._sinceWarning = 0
        self.failures = 0

    def __call__(self, event):
        if "EMFILE recovery file descriptor" not in (event.get("log_format") or ""):
            self._forward(event)
            return
        self.failures += 1
        self._sinceWarning += 1
        now = self._now()
        if self._lastWarning is not None and now - self._lastWarning < LOG_INTERVAL:
            return
        self._lastWarning = now
        count, self._sinceWarning = self._sinceWarning, 0
        self.log.warn(
            "out of file descriptors: the spare descriptor kept to refuse connections when they run "
            f"out could not be taken back ({{count}} {noun(count, 'time')} since the last such line, at most one a "
            "minute); connections wait until descriptors are freed",
            count=count,
            event="listener.no_spare_descriptor",
        )


def watchReserve(reactor, reservation=None):
    """
    Give Twisted's spare descriptor (C{tcp._reservedFD}, one for the
    process) a L{ReserveErrors}, once.

    @return: the L{ReserveErrors}, or C{None} if it had one already or
        Twisted keeps no spare.
    """
    if reservation is None:
        reservation = getattr(tcp, "_reservedFD", None)
    if not isinstance(getattr(reservation, "_log", None), Logger) or isinstance(
        getattr(reservation._log, "observer", None), ReserveErrors
    ):
        return None
    watcher = ReserveErrors(reactor)
    reservation._log = Logger(namespace=reservation._log.namespace, source=reservation, observer=watcher)
    return watcher


def watchAcceptErrors(port, name, where, reactor, metrics=None):
    """
    Give C{port}'s accept loop an L{AcceptErrors} for its log events, and
    accept at most L{MAX_ACCEPTS_PER_TURN} connections a turn, if it is
    one of Twisted's stream ports (TCP, Unix sockets, an adopted socket),
    which log through their C{_logger}.

    @return: the L{AcceptErrors}, or C{None} for another kind of port.
    """
    logger = getattr(port, "_logger", None)
    if not isinstance(logger, Logger) or not hasattr(port, "stopReading"):
        return None
    watcher = AcceptErrors(port, name, where, reactor, metrics)
    port._logger = Logger(namespace=logger.namespace, source=port, observer=watcher)
    watchReserve(reactor)
    if isinstance(getattr(port, "numberAccepts", None), int):
        doRead = port.doRead

        def acceptAtMost():
            port.numberAccepts = min(port.numberAccepts, MAX_ACCEPTS_PER_TURN)
            return doRead()

        port.doRead = acceptAtMost
    return watcher
