# -*- test-case-name: tests.test_metrics -*-
"""
The metrics endpoint, C{--metrics}: C{GET /metrics}, C{GET /healthz} and
C{GET /healthz/<protocol>} over HTTP, for the L{mailgate.metrics.Metrics}
the server counts with.

A module apart from L{mailgate.metrics} because it is built on Twisted
Web, whose import costs every process that loads it some 60 ms of CPU:
the counting is needed by every server and by C{mailgate deliver}, the
HTTP site only by a server with C{--metrics} (L{mailgate.service} imports
this module then).

L{MetricsResource} renders the exposition with prometheus-client's own
encoders (C{choose_encoder}) rather than through
C{prometheus_client.twisted}: that resource wraps the library's WSGI
application in a C{WSGIResource} bound to the global reactor and its
thread pool, which an embedder's reactor and mailgate's rule (the reactor
is passed in, never a global) both exclude, and a thread hand-off buys
nothing for a render that takes microseconds.
"""

import functools
import io
import itertools

from prometheus_client.exposition import choose_encoder
from twisted.internet import defer
from twisted.logger import Logger
from twisted.protocols import policies
from twisted.web import http, resource, server

from mailgate.errors import DatabaseDamaged, ShuttingDown, WritesFailing, errorKind
from mailgate.metrics import PROTOCOLS, NotServed

#: the protocols of C{/healthz/<protocol>}: the mail protocols, and the
#: quota-status service Postfix asks (which reads the database only)
HEALTH_PROTOCOLS = (*PROTOCOLS, "quota-status")
from mailgate.timers import cancelled


class _Exposition(resource.Resource):
    """
    C{GET /metrics}: the registry in the text format the scraper asks for
    (Prometheus text by default, OpenMetrics when accepted).
    """

    def __init__(self, registry):
        super().__init__()
        self._registry = registry

    def render_GET(self, request):
        # The Accept headers' octets as they came, all of them (HTTP reads
        # several as one list): Twisted's getHeader("accept") decodes the
        # last as UTF-8 and raised on any other octets, a 500 and a
        # critical line with a traceback in the log per such request.
        accept = b",".join(request.requestHeaders.getRawHeaders(b"accept", [])).decode("latin-1")
        encoder, contentType = choose_encoder(accept or None)
        body = encoder(self._registry)
        request.setHeader("content-type", contentType)
        return body

    def render_HEAD(self, request):
        """
        C{HEAD /metrics}: a GET's headers, its length included, without
        the body.  Left to Twisted (a GET's body, which it drops), every
        such request logged "I think I'll eat it": a line per probe, on a
        site that writes no access log.
        """
        body = self.render_GET(request)
        request.setHeader("content-length", b"%d" % (len(body),))
        return b""

    def getChild(self, path, request):
        return _NotFound()



class _Health(resource.Resource):
    """
    C{GET /healthz}: 200 C{ok} when the database answers within
    C{timeout} seconds, 503 otherwise, for load balancers.  A failure is
    logged once (C{health.failed}) until its reason changes, and its end
    once (C{health.recovered}): balancers ask every second or two.

    C{GET /healthz/pop3}, C{/healthz/smtp}, C{/healthz/lmtp} and
    C{/healthz/quota-status} are the same, for one protocol's backend (C{check} is then the service's
    answer for that protocol): what that protocol needs of the database
    (POP3 and quota-status only read, so a node whose writes fail stays in its backend,
    200 with that said after C{ok}), and 503 when the node has no
    listener for it (L{NotServed}).  Each endpoint keeps its own account
    of what it logged: one shared would log a failure and a recovery at
    every probe while POP3 passes and SMTP fails.

    The 503's body says what a balancer and an operator need (the
    database is unavailable, or takes no writes, and the error's class and
    SQLSTATE: L{errorKind}), never the database error's text: the
    endpoint is open to balancers and sometimes wider, and the text can
    name hosts, users, databases and paths.  The text goes to the log, in
    C{health.failed}.
    """

    log = Logger()

    def __init__(self, check, reactor, timeout, path="/healthz"):
        super().__init__()
        self._check = check
        self._reactor = reactor
        self._timeout = timeout
        self._path = path
        # Why the last check failed, once logged: a balancer probing every
        # second would otherwise log a line a second for as long as the
        # database fails (a full disk: on the disk the log may be on).
        self._loggedReason = None

    def render_GET(self, request):
        gone = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        d = defer.maybeDeferred(self._check)
        d.addTimeout(self._timeout, self._reactor)

        def answer(code, text):
            if gone:
                return
            request.setResponseCode(code)
            request.setHeader("content-type", "text/plain; charset=utf-8")
            request.setHeader("cache-control", "no-store")
            request.write(text.encode("utf-8"))
            request.finish()

        def healthy(note):
            if self._loggedReason is not None:
                self._loggedReason = None
                self.log.info(
                    "health check {check}: passes again", check=self._path, event="health.recovered"
                )
            if isinstance(note, WritesFailing):
                # Healthy for this protocol, and said (for whoever reads
                # it with curl): its writes are logged, and measured, as
                # database.writes_failed and the writes-failing gauge.
                answer(200, f"ok, but database writes fail ({errorKind(note)})\n")
            else:
                answer(200, "ok\n")

        def unhealthy(failure):
            if failure.check(ShuttingDown):
                # Nothing failed: the 503 tells balancers to go elsewhere.
                answer(503, "unavailable: shutting down\n")
                return
            if failure.check(defer.TimeoutError):
                reason = shown = f"the database did not answer within {self._timeout:g} s"
            elif failure.check(NotServed):
                # Words of the service's own, naming no host or path.
                reason = shown = str(failure.value)
            else:
                reason = f"the database failed: {' '.join(str(failure.value).split())}"
                if failure.check(WritesFailing):
                    shown = f"database writes fail ({errorKind(failure.value)})"
                elif failure.check(DatabaseDamaged):
                    shown = f"database damaged ({errorKind(failure.value)})"
                else:
                    shown = f"database unavailable ({errorKind(failure.value)})"
            if reason != self._loggedReason:
                self._loggedReason = reason
                self.log.warn(
                    "health check {check}: {reason}", check=self._path, reason=reason, event="health.failed"
                )
            answer(503, f"unavailable: {shown}\n")

        d.addCallbacks(healthy, unhealthy)
        return server.NOT_DONE_YET

    def getChild(self, path, request):
        return _NotFound()


class _NotFound(resource.Resource):
    """
    Everything else: 404.
    """

    def getChild(self, path, request):
        return self

    def render(self, request):
        request.setResponseCode(404)
        request.setHeader("content-type", "text/plain; charset=utf-8")
        body = b"not found: this endpoint serves /metrics, /healthz and /healthz/{pop3,smtp,lmtp,quota-status}\n"
        if request.method == b"HEAD":
            # The headers alone: a body returned to a HEAD is dropped by
            # Twisted with a log line each time, any client's to ask for.
            request.setHeader("content-length", b"%d" % (len(body),))
            return b""
        return body


class MetricsResource(_NotFound):
    """
    The root of the metrics endpoint: C{/metrics}, C{/healthz}, and 404 for
    anything else.

    @param metrics: the L{Metrics} to export.
    @param healthCheck: returns a L{Deferred} that fires when the database
        answered (and fails otherwise).
    @param reactor: for the health check's deadline.
    @param timeout: seconds the database has to answer.
    @param protocolCheck: C{protocolCheck(protocol)} for
        C{/healthz/<protocol>} (each of L{HEALTH_PROTOCOLS}): a L{Deferred} that
        fires (with C{None}, or a L{WritesFailing} note for a protocol
        that only reads) when this node can serve it, and fails otherwise
        (L{NotServed} without its listener).  Without it, those paths
        are 404.
    """

    def __init__(self, metrics, healthCheck, reactor, timeout=1.0, protocolCheck=None):
        super().__init__()
        self.putChild(b"metrics", _Exposition(metrics.registry))
        health = _Health(healthCheck, reactor, timeout)
        if protocolCheck is not None:
            for protocol in HEALTH_PROTOCOLS:
                check = functools.partial(protocolCheck, protocol)
                health.putChild(
                    protocol.encode("ascii"), _Health(check, reactor, timeout, path=f"/healthz/{protocol}")
                )
        self.putChild(b"healthz", health)

    def getChild(self, path, request):
        return _NotFound()


class MetricsRequest(server.Request):
    """
    A request to the metrics site, which answers C{GET} (and C{HEAD}) only:
    one that announces a body (C{Content-Length} above 0, or chunked) is
    answered C{413} as soon as its headers are read, and its connection
    closed, the body unread.  Twisted would otherwise keep a body of any
    size (past 100 KB in a temporary file) until it had all arrived, only
    to answer C{405}: a client on the metrics port could fill the disk.
    """

    refused = False

    def gotLength(self, length):
        if length == 0:
            super().gotLength(length)
            return
        self.refused = True
        self.content = io.BytesIO()
        # No "100 Continue" after the refusal (Twisted sends it after this
        # call for a request that expects it).
        self.requestHeaders.removeHeader(b"expect")
        reason = b"request bodies are not accepted here: GET /metrics or /healthz\n"
        self.channel.transport.write(
            b"HTTP/1.1 413 Payload Too Large\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (len(reason), reason)
        )
        self.channel.loseConnection()

    def handleContentChunk(self, data):
        if not self.refused:
            super().handleContentChunk(data)

    def requestReceived(self, command, path, version):
        # A refused request's body may still end in the bytes already read:
        # it has had its answer.
        if not self.refused:
            super().requestReceived(command, path, version)


class MetricsChannel(http.HTTPChannel):
    """
    An HTTP connection that answers no more pipelined requests while the
    answers already written wait to be sent.

    Twisted's channel stops reading while a request is in progress, but
    the metrics site answers at once: every request of a read is answered
    in the same call, and a client that sends requests without reading
    the answers (each scrape is some 30 KB) made the server hold gigabytes
    of unsent answers.  Here, once the transport says its buffer is full,
    the rest of what was read waits unparsed, reading stops, and both go
    on when the transport has drained: the memory a connection holds is
    one read and one transport buffer.

    (This uses the channel's own account of the transport's state,
    C{_waitingForTransport}, and of the request in progress; the tests
    of this class would show a Twisted that changes them.)
    """

    _heldForTransport = False
    _requestTimer = None

    #: when the connection last did anything (it opened, octets came), as
    #: a number of L{_activity}: the one that did so longest ago gives
    #: way at the connection limit (L{_LimitedSite})
    lastActivity = 0
    _activity = itertools.count(1)

    def connectionMade(self):
        self.lastActivity = next(self._activity)
        super().connectionMade()

    @property
    def answering(self):
        """
        Whether a request of this connection is being answered now (a
        health check waiting for the database, say).
        """
        return self._handlingRequest

    #: seconds a request's line and headers may take from their first
    #: octet; Twisted's idle timeout starts again at every octet, so a
    #: client trickling one every few seconds (a slow loris) kept its
    #: connection, and 32 of them the port, for ever
    requestTimeout = 10

    def dataReceived(self, data):
        if data:
            self.lastActivity = next(self._activity)
        if data and self._requestTimer is None and not self._handlingRequest:
            self._requestTimer = self.callLater(self.requestTimeout, self._requestTooSlow)
        super().dataReceived(data)

    def allHeadersReceived(self):
        self._requestTimer = cancelled(self._requestTimer)
        super().allHeadersReceived()

    def _requestTooSlow(self):
        self._requestTimer = None
        self.transport.write(
            b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        self.transport.loseConnection()

    def lineLengthExceeded(self, line):
        """
        A request line or header line longer than C{MAX_LENGTH} (16 KiB):
        answered C{414} or C{431} with the reason, then closed.  Twisted's
        line reader closed the connection without a word, and the client
        could not tell a refused request from a server that went away.
        """
        self._requestTimer = cancelled(self._requestTimer)
        if self.transport.disconnecting:
            return
        # Twisted's own account of where the request is: 1 until its
        # request line has been read.
        if getattr(self, "_HTTPChannel__first_line", 0):
            status, reason = b"414 URI Too Long", b"request line too long"
        else:
            status, reason = b"431 Request Header Fields Too Large", b"header line too long"
        reason += b" (the limit is %d octets)\n" % (self.MAX_LENGTH,)
        self.transport.write(
            b"HTTP/1.1 %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (status, len(reason), reason)
        )
        self.transport.loseConnection()

    _closingTimer = None

    def timeoutConnection(self):
        """
        Close a connection idle for L{IDLE_TIMEOUT} seconds, as Twisted
        does (what is unsent goes first, for C{abortTimeout} seconds at
        most), without its log lines: "Timing out client:
        IPv4Address(type='TCP', host='192.0.2.7', port=40112)", and
        "Forcibly timing out client: ..." once those seconds ran out, an
        info line per connection that any client of the port causes at will
        (and a scraper whose interval is past the timeout at every scrape),
        whose C{peer} in the JSON log was that Python text, not an address.
        """
        self.loseConnection()
        if self.abortTimeout is not None:
            self._closingTimer = self.callLater(self.abortTimeout, self._abortClosing)

    def _abortClosing(self):
        self._closingTimer = None
        self.transport.abortConnection()

    def connectionLost(self, reason):
        self._requestTimer = cancelled(self._requestTimer)
        self._closingTimer = cancelled(self._closingTimer)
        super().connectionLost(reason)

    def requestDone(self, request):
        if self._waitingForTransport:
            # Stops LineReceiver's loop over what is left of this read.
            self.paused = True
            self._heldForTransport = True
            self._networkProducer.pauseProducing()
        super().requestDone(request)

    def resumeProducing(self):
        super().resumeProducing()
        if self._heldForTransport and not self._handlingRequest:
            self._heldForTransport = False
            self.paused = False
            self.dataReceived(b"")


class MetricsSite(server.Site):
    """
    A site that writes no access log (a scraper's request every few
    seconds is not news), reads no request body (L{MetricsRequest}) and
    answers no faster than its client reads (L{MetricsChannel}).
    """

    noisy = False
    protocol = MetricsChannel
    requestFactory = MetricsRequest

    def log(self, request):
        pass


#: seconds an HTTP connection to the metrics site may stay idle: a scraper
#: that keeps its connection between scrapes (every 15 s or so) keeps it,
#: one that went away does not hold a descriptor for long.
IDLE_TIMEOUT = 60


#: HTTP connections the metrics site holds at once.  Scrapers and health
#: checks need a few: the limit keeps a client on the metrics port from
#: taking the descriptors the mail listeners need (their own limits do
#: not count this port).
MAX_CONNECTIONS = 32


class _LimitedSite(policies.WrappingFactory):
    """
    The metrics site behind L{MAX_CONNECTIONS}.

    At the limit, a new connection takes the place of the one that has
    been quiet longest (sent nothing since, and has no request being
    answered): 32 connections opened and left silent, which cost their
    client nothing and held until the idle timeout, kept every health
    check and scrape out (a balancer then takes the node out of service).
    The new connection is closed as it arrives only when every one is
    being answered.  A scraper whose kept-alive connection gave way
    connects again at its next scrape.

    Not noisy: a wrapping factory is by default, and every start and stop
    of the server logged "Starting factory <mailgate.metrics._LimitedSite
    object at 0x7f8fd0887f10>", under the event name of the class, beside
    the listener's own line.
    """

    noisy = False

    def buildProtocol(self, addr):
        if len(self.protocols) >= MAX_CONNECTIONS and not self._makeRoom():
            return None
        return super().buildProtocol(addr)

    def _makeRoom(self):
        """
        Close the connection quiet longest, if one is not being answered.

        @return: whether one was closed.
        """
        quiet = [
            wrapper for wrapper in self.protocols
            if not wrapper.wrappedProtocol.answering and not getattr(wrapper, "gaveWay", False)
        ]
        if not quiet:
            return False
        oldest = min(quiet, key=lambda wrapper: wrapper.wrappedProtocol.lastActivity)
        # Counted until its connectionLost, which comes on a later turn of
        # the reactor: marked, so that another arrival closes another one.
        oldest.gaveWay = True
        oldest.transport.abortConnection()
        return True


def metricsSite(metrics, healthCheck, reactor, timeout=1.0, protocolCheck=None):
    """
    The HTTP factory for C{--metrics}, its timers on C{reactor}.
    """
    site = MetricsSite(
        MetricsResource(metrics, healthCheck, reactor, timeout, protocolCheck), timeout=IDLE_TIMEOUT, reactor=reactor
    )
    site.displayTracebacks = False
    return _LimitedSite(site)
