# -*- test-case-name: tests.test_session_core,tests.test_pop3_protocol,tests.test_smtp_protocol -*-
"""
The one command-session core: what a POP3, SMTP or LMTP session does that
is not the protocol itself.

L{CommandSession} owns, once for every protocol:

  - B{Admission.}  Once the client's real address is known (after a PROXY
    header, see L{mailgate.session.proxy}), the factory's connection policy
    admits the connection or the client gets one refusal reply and is
    closed, before any database work or password hashing.
  - B{Framing.}  Input is cut into lines one at a time, as they are run, so
    a mode switch (SMTP DATA, a SASL exchange) takes effect exactly where it
    happens in the byte stream.  A line longer than the limit is dropped as
    it arrives, never buffered.  In raw mode (L{rawReceiver}) input goes to
    a receiver instead (the SMTP DATA reader) until it says it is done.
  - B{The command queue.}  Commands run one after another.  A command that
    returns a L{Deferred} holds the queue until it fires; the replies to
    the commands of one read leave in one write.
  - B{Dispatch} by method name, the way aiosmtpd finds C{smtp_*} methods:
    the verb C{MAIL} runs C{smtp_MAIL} when L{commandPrefix} is C{"smtp_"}.
  - B{Limits}, as named class attributes a factory may override, and the
    bad-command count that closes a session.
  - B{A load balancer's health check} (L{healthCheck}): which commands a
    session sent, so that a check is told from a client by the end-of-session
    code of every protocol alike; a protocol names its checks' commands
    (L{healthCheckCommands}).
  - B{Lines of another protocol} (L{foreignLine}): an HTTP request that a
    browser or proxy was made to send here ends the session at once, its
    body's lines never run as commands (see L{_endForeign}).
  - B{Bounded memory.}  The session is its transport's streaming producer:
    while the transport holds more unsent output than its buffer size
    (64 KiB on TCP), the session stops running queued commands and stops
    reading from the connection (as soon as there is input to hold back),
    and goes on when the client has read.
    Unread input is bounded as well.  The two reasons to stop reading are
    kept apart, so one never resumes what the other paused.  A long
    response streamed by a L{BlockSender} is that sender's to pace.
  - B{A client that half-closes} (C{nc -N}, a script piping commands in):
    the commands it sent before its end run and are answered, then the
    session closes (L{readConnectionLost}).
  - B{The idle timer}, B{internal errors} (one reply, never a traceback to
    the client, never a dead session), B{closing}, and B{starting TLS}
    (input pipelined in the clear after STLS/STARTTLS is discarded).
  - B{Session ids and log context}: every event a session logs carries
    C{event}, C{session}, C{protocol}, C{peer} and, once known, C{user}.
  - B{Graceful shutdown}: the session is registered with the factory's
    L{mailgate.session.tracker.SessionTracker}, which tells it when the
    server stops (L{shutdownRequested}, then the protocol's L{beginShutdown})
    and when the grace period is over (L{graceExpired}, then the protocol's
    L{shutdownNow}).

A protocol subclasses L{CommandSession} and provides the hooks documented
below (C{greet}, C{refusal}, C{syntaxError}, C{lineTooLong} ...).
"""

import re

from twisted.internet import defer
from twisted.internet.interfaces import IHalfCloseableProtocol, IHandshakeListener, IPushProducer, ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger, LogLevel
from zope.interface import implementer

from mailgate.logs import emitLine
from mailgate.session.idle import IdleTimer
from mailgate.session.ids import describeAddress, newSessionId
from mailgate.session.output import ReplyWriter, setNoDelay
from mailgate.session.sender import BlockSender, SendAborted
from mailgate.session.tlslayer import startTLS
from mailgate.session.trace import shown as shownInTrace
from mailgate.session.trace import endTrace, startTrace
from mailgate.timers import elapsedClock
from mailgate.tls import tlsEstablished, tlsFailure, versionAndCipher
from mailgate.twistedcompat import closeWhenWritten

_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
#: An HTTP request line, as a browser or proxy sends it: a method of RFC
#: 9110 section 9.3 (or PATCH, RFC 5789) in upper case, then a space.
_HTTP_REQUEST = re.compile(rb"(?:CONNECT|GET|POST|PUT|HEAD|OPTIONS|DELETE|PATCH|TRACE) ")
#: An HTTP header field line (RFC 9110 section 5.1): a token, then a colon.
_HTTP_HEADER = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+:")

#: Input waiting below this many octets is joined to the next read by
#: copying (a line in pieces); above, it grows in place (a bytearray).
_COPIED_INPUT = 1024

# Why reading from the connection is paused.
INPUT = "input"
OUTPUT = "output"


class CommandError(Exception):
    """
    Raised by a command handler to refuse the command: its text is the
    reason given to the client (see L{CommandSession.syntaxError}), and the
    refusal counts as a bad command.
    """


@implementer(IPushProducer, IHalfCloseableProtocol, IHandshakeListener)
class CommandSession(Protocol):
    """
    One command session.  Subclasses set the class attributes and provide
    the hooks.

    @cvar protocolName: C{"pop3"}, C{"smtp"} or C{"lmtp"}: what the policy,
        the metrics and the logs call it.
    @cvar commandPrefix: the prefix of command handler names.
    @cvar maxCommandLength: octets in a command line, line end included.
    @cvar maxBufferedInput: octets of input held unread (while a command
        waits, or while the client does not read its replies) before the
        session stops reading from the connection.
    @cvar maxQueuedCommands: complete lines held unread before the session
        stops reading, or C{None} for no limit but L{maxBufferedInput}.
    @cvar maxHeldOutput: octets of replies to one read's commands gathered
        before they are written (and the transport can push back).
    @cvar maxBadCommands: refused commands tolerated before the session is
        closed.
    @cvar idleTimeout: seconds of silence before the session is closed.
    @cvar stressIdleTimeout: seconds of silence before a session that has
        not logged in (any SMTP or LMTP session) is closed while the server
        is near its connection limit
        (L{mailgate.interfaces.IConnectionPolicy.underStress}), as
        Postfix's C{smtpd_timeout} under stress: idle connections, each a
        slot, cannot keep the others out.
    @cvar refuseLongLineAtOnce: answer an over-long line as soon as it is
        seen (SMTP), rather than when it ends (POP3).
    @cvar invalidCharacters: the refusal text for control characters.
    @cvar invalidUTF8: the refusal text for a line that is not UTF-8.
    @cvar healthCheckCommands: the verbs (upper case) a load balancer's
        health check of the protocol sends, HAProxy's C{option smtpchk} or
        C{tcp-check} (L{healthCheck}); none by default.

    @ivar sessionId: the id every log event of this connection carries.
    @ivar peer: the client's address (the real one, behind a balancer
        speaking the PROXY protocol).
    @ivar user: the authenticated user, once there is one, for the logs.
    @ivar stopping: the server is shutting down.
    @ivar traced: the session's commands and replies are logged
        (L{mailgate.session.trace}).
    @ivar rawReceiver: while set, input goes to its C{feed(data)} instead of
        being cut into lines; C{feed} returns C{None} while it wants more,
        and the octets after its end once done, when the session leaves raw
        mode and runs L{rawDataEnded}.
    @ivar longLineStart: the first octets (at most L{maxCommandLength}) of
        the line L{lineTooLong} refuses, for a protocol to which what a
        line begins with matters even when it is too long (SMTP's BDAT,
        whose chunk follows it).
    """

    protocolName = None
    commandPrefix = None
    maxCommandLength = 512
    maxBufferedInput = 64 * 1024
    maxQueuedCommands = None
    maxHeldOutput = 64 * 1024
    maxBadCommands = 20
    idleTimeout = 300
    stressIdleTimeout = 10
    refuseLongLineAtOnce = False
    invalidCharacters = "invalid characters in command"
    invalidUTF8 = "command is not valid UTF-8"
    healthCheckCommands = frozenset()
    traced = False

    log = Logger()

    def __init__(self):
        self._buffer = b""
        self._pos = 0
        self._resetLineCount()
        self._discarding = False
        self._tooLongPending = False
        self._busy = False
        self._processing = False
        self._closed = False
        self._inputEnded = False
        self._admitted = False
        # When the session was let in (on the monotonic clock), for its
        # end line's duration; None for a connection refused as it came.
        self._admittedAt = None
        # Why the session is ending, for its end line and its trace (see
        # _ending): None until a reason is known.
        self._endReason = None
        self._leaving = False
        self._paused = set()
        self._outputPaused = False
        self._producing = None
        self._streaming = False
        self._expireAfterCommand = False
        self._badCommands = 0
        # A command of the protocol's has been seen (see foreignLine).
        self._spoken = False
        # Every command line so far was one of healthCheckCommands, and
        # none was refused, too long or unreadable (see healthCheck).
        self._onlyCheckCommands = True
        self._idle = None
        self._out = None
        self.rawReceiver = None
        self.longLineStart = b""
        self.sessionId = None
        self.peer = None
        self.peerText = None
        self.connectedPeer = None
        self.user = None
        #: what a line names beside the user, once logged in, as fields of
        #: the JSON record and C{name=value} after C{user=} (POP3: the
        #: master user who logged in as the user), or C{None}
        self.userFields = None
        self.stopping = False

    # -- hooks a protocol provides ------------------------------------------

    def greet(self):
        """
        Send the greeting of an admitted connection; or return a
        L{Deferred} that fires once it has been sent, the commands the
        client sends meanwhile waiting as behind a running command.
        """
        raise NotImplementedError()

    def refusal(self, reason):
        """
        Send the reply that refuses a connection (C{reason} is the policy's,
        e.g. C{"too many connections"}); the core closes it.
        """
        raise NotImplementedError()

    def syntaxError(self, text):
        """
        Refuse a malformed command with C{text}, counting it (see
        L{countBadCommand}).
        """
        raise NotImplementedError()

    def lineTooLong(self):
        """
        A line over the limit ended (or, with L{refuseLongLineAtOnce}, was
        seen): refuse it.
        """
        raise NotImplementedError()

    def unknownCommand(self, verb):
        """
        Refuse a verb that has no handler.
        """
        raise NotImplementedError()

    def tooManyBadCommands(self):
        """
        Say goodbye to a client that sent L{maxBadCommands} bad commands;
        the core closes the session.
        """
        raise NotImplementedError()

    def foreignLineRefused(self, why):
        """
        Say goodbye to a client that sent a line of another protocol
        (L{foreignLine}; C{why} is its C{"HTTP request"} ...); the core
        logs it and closes the session.
        """
        raise NotImplementedError()

    def internalError(self):
        """
        Reply to a command that failed unexpectedly (the failure is logged).
        """
        raise NotImplementedError()

    def idleTimedOut(self, stalled):
        """
        The idle timer ran out; send the protocol's reply unless C{stalled}
        (the client is not reading, nothing more can be said).  The core
        closes the session.
        """
        raise NotImplementedError()

    def sessionEnded(self):
        """
        The connection is gone: let go of what the session holds.

        @return: C{None}, or a L{Deferred} that fires once it is let go
            (the shutdown waits for it).
        """

    def rawDataEnded(self, receiver):
        """
        L{rawReceiver} C{receiver} has read its end: act on it (a command
        of its own: it may return a L{Deferred}).
        """

    #: why a trace hides the lines that are no command of the protocol's,
    #: until a line that is one (C{"AUTH"}: they may be SASL responses;
    #: see L{hideNonCommandsFromTrace}), or C{None}
    _traceHiding = None

    def hideNonCommandsFromTrace(self, after):
        """
        From now on, until a line that is a command of the protocol's, a
        trace shows a line that is none as hidden, C{after} what (a
        refused DATA: a client that sends its message whatever the reply
        has each of its lines read as a command, and message content
        never goes to the log).
        """
        self._traceHiding = after

    def tracedCommand(self, line):
        """
        How a trace shows the command line C{line} (octets, without its
        line end): as it came, unless the protocol hides part of it (a
        password).

        PASS's argument is hidden in every protocol: a POP3 client set up
        with the SMTP port sends its password there.  AUTH's initial
        response is hidden, and so, from an AUTH on, is every line that
        is no command of the protocol's until one that is: SASL responses
        that reach the command parser (sent along with an AUTH refused
        before any exchange, a mechanism not offered, plaintext refused,
        an SMTP server that has no AUTH, or by a client going on after a
        refusal) are passwords in base64.  An IMAP client set up with this
        port sends its password after a tag: a tagged LOGIN's arguments
        are hidden, and so are AUTHENTICATE's and the lines after it, as
        after AUTH.
        """
        text = line.decode("utf-8", "replace")
        verb = text.lstrip()[:4].upper()
        if verb == "PASS":
            return "PASS <password>"
        if verb == "AUTH":
            self._traceHiding = "AUTH"
            words = text.split()
            if words[0].upper() != "AUTH" or len(words) > 3:
                return "AUTH <arguments>"
            if len(words) == 3:
                return f"AUTH {shownInTrace(words[1])} <initial response>"
            return shownInTrace(" ".join(words))
        words = text.split(None, 2)
        if len(words) > 1 and words[1].upper() in ("LOGIN", "AUTHENTICATE") and not self._isCommand(words[0]):
            if words[1].upper() == "AUTHENTICATE":
                self._traceHiding = "IMAP's AUTHENTICATE"
            return f"{shownInTrace(words[0])} {words[1].upper()} <arguments>"
        if self._traceHiding is not None:
            if not self._isCommand(text.partition(" ")[0]):
                return f"<not a command: hidden after {self._traceHiding}>"
            self._traceHiding = None
        return shownInTrace(text)

    def _isCommand(self, word):
        """
        Whether C{word} is the verb of one of the protocol's commands.
        """
        verb = word.upper()
        return word.isascii() and verb.isalpha() and getattr(self, self.commandPrefix + verb, None) is not None

    def beginShutdown(self):
        """
        The server is stopping: L{stopping} is set.  The default is to wait
        for the grace period to end.
        """

    def shutdownNow(self, stalled):
        """
        Close the session for the shutdown: send the protocol's goodbye
        (unless C{stalled}) and end it; the core closes the connection.
        """

    def idleWhileStopping(self):
        """
        The server is stopping and the session has just become idle: what
        it was doing is answered, no command waits.  The default is to
        wait for the grace period to end.
        """

    # -- connection ----------------------------------------------------------

    @property
    def _clock(self):
        return self.factory.reactor

    @property
    def _elapsed(self):
        """
        The clock a session's timers measure elapsed time on: monotonic
        (L{elapsedClock}), where C{_clock} schedules on the wall clock.
        """
        return elapsedClock(self.factory.reactor)

    def connectionMade(self):
        self.sessionId = newSessionId()
        self.peer = self.transport.getPeer()
        self.peerText = describeAddress(self.peer)
        # What the connection policy admitted and counts: the peer stays
        # that, whoever a proxy later says the client is (POP3's XCLIENT).
        self.connectedPeer = self.peer
        self._out = ReplyWriter(self)
        factory = self.factory
        if factory.tracker.stopping:
            self._refuse("shutting down")
            return
        reason = factory.policy.admit(self.protocolName, self.peer)
        if reason is not None:
            self._refuse(reason)
            return
        self._admitted = True
        self._admittedAt = self._elapsed()
        factory.metrics.connectionOpened(self.protocolName)
        if getattr(self.transport, "balancerTLS", None) is not None and not ISSLTransport.providedBy(self.transport):
            # The client's TLS, ended by a trusted balancer that said so
            # (haproxy: listeners, send-proxy-v2-ssl): counted by the
            # version it told, as a handshake of mailgate's own is
            # (handshakeCompleted); "other" if it told none.
            factory.metrics.tlsEstablished(self.protocolName, versionAndCipher(self.transport)[0])
        setNoDelay(self.transport)
        self._idle = IdleTimer(self._clock, self.idleTimeout, self._timedOut, self._waitedOn, self._stressLimit)
        self._registerProducer()
        trace = factory.trace
        if trace and trace.peer(self.peer):
            startTrace(self, "the client is on --debug-peer")
        self._run(self.greet)
        self._idle.start()
        factory.tracker.add(self)
        self._noteStress(factory)

    def _refuse(self, reason):
        factory = self.factory
        factory.metrics.connectionRefused(self.protocolName, reason)
        # Every refusal is counted; an address refused again and again (a
        # banned one, hammering) has a line a minute.
        self._logAMinute(
            "session.refused", reason, reason,
            f"{self.protocolName} connection refused peer={self.peerText} reason={reason}",
            "more refused since the last line",
        )
        self._closed = True
        self.refusal(reason)
        self._out.flush()
        closeRefused = getattr(self.transport, "closeRefused", None)
        if closeRefused is not None:
            # Implicit TLS: the refusal waits for the client's handshake,
            # briefly (TLSLayer.refusalTimeout), or not at all when
            # descriptors are short.
            closeRefused()
        else:
            self.transport.loseConnection()

    def _logAMinute(self, event, reason, key, line, moreText):
        """
        Log C{line} as C{event} unless this peer's address had a line for
        C{key} less than a minute ago (the factory's C{refusals}, a
        L{RefusalLog}), saying how many went unlogged since.
        """
        skipped = self.factory.refusals.note(getattr(self.peer, "host", self.peerText), key)
        if skipped is not None:
            more = f" ({skipped} {moreText})" if skipped else ""
            self.logInfo(event, line + more, reason=reason, unlogged=skipped)

    def connectionLost(self, reason):
        self._closed = True
        if self._idle is not None:
            self._idle.cancel()
        why = tlsFailure(reason)
        if why is not None:
            # A failed handshake (a client speaking something else than
            # TLS, or only versions refused) or a corrupt record, under
            # mailgate's TLS layer or Twisted's.
            if self._admitted:
                # A connection refused as it arrived (whose handshake an
                # implicit-TLS port waits for, to send the refusal) counts
                # as refused only: a banned scanner's garbage on port 995
                # is not clients refusing the certificate.
                self.factory.metrics.tlsFailed(self.protocolName)
            # A scanner's every connection fails its handshake: a line a
            # minute per address and reason.
            self._logAMinute(
                "session.tls_failed", why, f"tls: {why}",
                f"{self.protocolName} TLS failed peer={self.peerText} reason={why}",
                "more since the last line",
            )
            self._ending("TLS failed")
        elif ISSLTransport.providedBy(self.transport) and not tlsEstablished(self.transport):
            # Gone before its handshake completed, without an error of
            # OpenSSL's (the client closed or reset it, a timeout of ours
            # aborted it): a scanner, or a client refusing the certificate
            # with a close rather than an alert.
            self._ending("connection lost in TLS handshake")
        if self.traced and self._admitted:
            endTrace(self, self._endReason or "connection lost")
        self._buffer = b""
        self._pos = 0
        self._resetLineCount()
        self.rawReceiver = None
        ended = self.sessionEnded()
        if self._admitted:
            self._noteLeaving()
            self._admitted = False
            factory = self.factory
            factory.policy.connectionClosed(self.protocolName, self.connectedPeer)
            factory.metrics.connectionClosed(self.protocolName)
            if isinstance(ended, defer.Deferred):
                ended.addBoth(lambda _: factory.tracker.remove(self))
            else:
                factory.tracker.remove(self)
        # The timer, the reply writer and the transport (as its producer)
        # refer back to the session: let go of them now, and a session
        # that has ended is freed at once by reference counting (with,
        # over TLS, its OpenSSL buffers), not at Python's next full garbage
        # collection, which on a busy server comes only after many
        # thousands of sessions have piled up.
        self._idle = None
        if self._out is not None:
            self._out.detach()
        self._unregisterProducer()

    def _ending(self, reason):
        """
        Note why the session is ending, for its end line and its trace:
        the first reason given stands (a QUIT answered during the shutdown
        is a QUIT; a timeout's abort of a handshake is the timeout).
        """
        if self._endReason is None:
            self._endReason = reason

    def sessionSeconds(self):
        """
        How long the session has lasted since it was let in, in seconds
        (on the monotonic clock; C{0.0} for one refused as it came).
        """
        if self._admittedAt is None:
            return 0.0
        return round(self._elapsed() - self._admittedAt, 3)

    @property
    def closed(self):
        """
        Whether the session has ended (it reads nothing more).
        """
        return self._closed

    def close(self, abort=False):
        """
        End the session: send what is held and close the connection once it
        is written, or at once with C{abort} (when the client does not read
        what it is sent).

        A connection still in its TLS handshake is aborted too: only a
        timeout ends such a session (the idle or login timeout, or idleness
        near the connection limit), its client has sent no command, and a
        close would wait for a handshake it has not finished in all that
        time (L{mailgate.session.tlslayer.TLSLayer.closeTimeout}, 10 s
        more), holding a descriptor and a connection slot: near the limit,
        where idle sessions are to be closed after 10 s, they took 20, and
        every one was closed, as none had gone when the others' turn came.
        """
        self._closed = True
        # Told before the transport is: one that reports the loss at once
        # (in tests) would have it told after connectionClosed.
        self._noteLeaving()
        if self._idle is not None:
            self._idle.cancel()
        self._out.flush()
        # A registered producer would keep a TLS connection open forever.
        self._unregisterProducer()
        if abort or getattr(self.transport, "handshaking", False):
            self.transport.abortConnection()
        else:
            closeWhenWritten(self.transport)

    def _noteLeaving(self):
        """
        Tell the policy, once, that this admitted connection is going
        (L{mailgate.interfaces.IConnectionPolicy.connectionClosing}): at its
        close, or at its loss if it was not closed first.  Near the limit,
        the idle sessions whose timers come due in the same reactor turn
        are closed only until enough are going to end the stress; the
        connections themselves are lost only in a later turn.
        """
        if self._admitted and not self._leaving:
            self._leaving = True
            closing = getattr(self.factory.policy, "connectionClosing", None)
            if closing is not None:
                closing(self.protocolName, self.connectedPeer)

    # -- logs ----------------------------------------------------------------

    def logContext(self, **fields):
        """
        The fields every log event of this session carries, with C{fields}.
        """
        context = {"session": self.sessionId, "protocol": self.protocolName, "peer": self.peerText}
        if self.user is not None:
            context["user"] = self.user
            if self.userFields:
                context.update(self.userFields)
        context.update(fields)
        return context

    def whoText(self):
        """
        How a line names the session's client, as its login and logout
        lines do: C{user=} once logged in, and C{peer=}.  (A line whose
        reader must find the session's other lines to know whose it is
        tells less than the JSON record, which has them as fields.)
        """
        if self.user is None:
            return f"peer={self.peerText}"
        if self.userFields:
            named = "".join(f" {name}={value}" for name, value in self.userFields.items())
            return f"user={self.user}{named} peer={self.peerText}"
        return f"user={self.user} peer={self.peerText}"

    def logInfo(self, event, text, **fields):
        """
        Log C{text} (already formatted: Twisted's formatting of many fields
        costs more than the rest of a small command) as event C{event}.
        """
        emitLine(self.log, LogLevel.info, text, self.logContext(event=event, **fields))

    def logWarning(self, event, text, **fields):
        emitLine(self.log, LogLevel.warn, text, self.logContext(event=event, **fields))

    def logError(self, event, text, **fields):
        emitLine(self.log, LogLevel.error, text, self.logContext(event=event, **fields))

    def logFailure(self, event, text, failure, **fields):
        self.log.failure("{line}", failure, line=text, event=event, **self.logContext(**fields))

    # -- the idle timer ------------------------------------------------------

    def _noteStress(self, factory):
        """
        When this connection brought the server under stress, hold the
        sessions already open to the shorter timeout at once, not only
        when their timers come due (minutes from now).
        """
        underStress = getattr(factory.policy, "underStress", None)
        stressed = underStress is not None and underStress()
        tracker = factory.tracker
        if stressed and not tracker.stressed:
            for session in list(tracker):
                if session is not self and session._idle is not None:
                    session._idle.recheck()
        tracker.stressed = stressed

    def _stressLimit(self):
        """
        The idle timeout that applies for now, if shorter than
        L{idleTimeout}: L{stressIdleTimeout} under stress, for a session
        that has not logged in.
        """
        if self.user is not None:
            return None
        underStress = getattr(self.factory.policy, "underStress", None)
        return self.stressIdleTimeout if underStress is not None and underStress() else None

    def _waitedOn(self):
        # A command the client waits for (a slow store) is not idleness; a
        # response the client does not read is.
        return self._busy and not self._streaming

    def _timedOut(self):
        if self._closed:
            return
        stalled = self._streaming or self._outputPaused
        self.factory.metrics.timedOut(self.protocolName, "idle")
        self.idleTimedOut(stalled)
        self.close(abort=stalled)

    # -- input ---------------------------------------------------------------

    def dataReceived(self, data):
        if self._closed:
            return
        if b"\n" in data or self.rawReceiver is not None:
            # Activity is a command line ended (or a message's data, which
            # its own rate limit watches), not any octet: a client that
            # trickles a line an octet every few seconds (a slow loris) is
            # idle, and the idle timeout bounds the time one line may take.
            self._idle.activity()
        if self._discarding:
            newline = data.find(b"\n")
            if newline < 0:
                return
            data = data[newline + 1:]
            self._discarding = False
            if not self.refuseLongLineAtOnce:
                self._tooLongPending = True
        buffer = self._buffer
        if not buffer:
            # The usual case: nothing waits, and a read is one or more
            # whole commands, taken as they are.
            self._buffer = data
        elif len(buffer) < _COPIED_INPUT:
            # A line in pieces: joined, as cheap as anything for so few.
            self._buffer = buffer + data
        elif type(buffer) is bytearray:
            buffer += data
        else:
            # Input piles up (commands waiting behind a slow one): in a
            # buffer that grows in place, so that each read costs its own
            # octets, not a copy of all that waits.
            buffer = bytearray(buffer)
            buffer += data
            self._buffer = buffer
        self._process()

    def lineLimit(self, start=b""):
        """
        The longest line accepted now, in octets, line end included: at
        least L{maxCommandLength} (asked only of lines longer than that).

        @param start: the line's first L{maxCommandLength} octets, for a
            protocol whose limit depends on the command (POP3's AUTH,
            whose initial response may be longer than a command).
        """
        return self.maxCommandLength

    def _process(self):
        if self._processing:
            return
        self._processing = True
        # The replies to pipelined commands leave in one write.
        out = self._out
        outer = out.hold()
        try:
            self._runQueue()
        finally:
            self._processing = False
            if outer:
                out.release()
        self._flowControl()
        if self._inputEnded:
            self._endOnceAnswered()
        elif self.stopping and not (self._closed or self._busy or self._outputPaused) and (
            self.rawReceiver is None
        ):
            self.idleWhileStopping()

    # -- the client's end of input (IHalfCloseableProtocol) -------------------

    def readConnectionLost(self):
        """
        The client has sent all it will send and closed its side (a
        half-close): the commands it sent before that still run and their
        replies still go out, then the session closes.  Closed at once,
        the client would lose those replies, among them an SMTP C{250}
        for a message already committed (it would send it again).
        """
        if self._closed:
            return
        self._inputEnded = True
        self._process()

    def writeConnectionLost(self):
        # The session never closes only its writing side.
        pass

    def _endOnceAnswered(self):
        """
        Close once every command the client sent has run: not while one is
        running or the client's replies wait for it to read (the idle timer
        bounds that); what is left is an unfinished line or message, which
        nothing can complete now.
        """
        if self._closed or self._busy or self._outputPaused:
            return
        self.close()

    def _runQueue(self):
        out = self._out
        try:
            while not (self._busy or self._closed or self._outputPaused):
                if self._tooLongPending:
                    self._tooLongPending = False
                    self._run(self._lineTooLong)
                elif self.rawReceiver is not None:
                    if self._pos >= len(self._buffer):
                        break
                    data = self._buffer[self._pos:] if self._pos else self._buffer
                    if type(data) is bytearray:
                        data = bytes(data)
                    self._buffer = b""
                    self._pos = 0
                    self._resetLineCount()
                    rest = self.rawReceiver.feed(data)
                    if rest is None:
                        break
                    self._buffer = rest
                    receiver, self.rawReceiver = self.rawReceiver, None
                    self._run(self.rawDataEnded, receiver)
                else:
                    buffer = self._buffer
                    start = self._pos
                    newline = buffer.find(b"\n", start)
                    if newline < 0:
                        pending = len(buffer) - start
                        if pending >= self.maxCommandLength and pending >= self.lineLimit(
                            bytes(buffer[start : start + self.maxCommandLength])
                        ):
                            # Too long whatever follows: drop it as it comes.
                            self.longLineStart = bytes(buffer[start : start + self.maxCommandLength])
                            self._buffer = b""
                            self._pos = 0
                            self._resetLineCount()
                            self._discarding = True
                            if self.refuseLongLineAtOnce:
                                self._run(self._lineTooLong)
                        break
                    self._pos = newline + 1
                    length = newline + 1 - start
                    if length > self.maxCommandLength and length > self.lineLimit(
                        bytes(buffer[start : start + self.maxCommandLength])
                    ):
                        self.longLineStart = bytes(buffer[start : start + self.maxCommandLength])
                        self._run(self._lineTooLong)
                        continue
                    end = newline - 1 if newline > start and buffer[newline - 1] == 0x0D else newline
                    line = buffer[start:end]
                    if type(line) is bytearray:
                        line = bytes(line)
                    # _run, inline: this is the path of every command.
                    try:
                        result = self.lineReceived(line)
                    except CommandError as e:
                        result = self.syntaxError(str(e))
                    except Exception:
                        result = defer.fail()
                    if result is not None and isinstance(result, defer.Deferred):
                        self._busy = True
                        result.addErrback(self._internalError)
                        result.addBoth(self._commandDone)
                if out.heldSize > self.maxHeldOutput:
                    # Let the transport see it (and push back) before the
                    # replies to a whole read pile up here.
                    out.flush()
        finally:
            if self._pos:
                buffer = self._buffer
                if type(buffer) is bytearray:
                    # In place: a bytearray drops its first octets without
                    # moving the rest.
                    del buffer[:self._pos]
                else:
                    self._buffer = buffer[self._pos:]
                self._pos = 0
                # The lines counted waiting (_linesWaiting) are counted
                # again from the start.
                self._countedTo = self._countedLines = 0

    def _lineTooLong(self):
        # A line too long for a command is none a health check sends.
        self._onlyCheckCommands = False
        return self.lineTooLong()

    def _run(self, function, *args):
        """
        Run one command; a Deferred result holds the queue until it fires.
        """
        try:
            result = function(*args)
        except CommandError as e:
            result = self.syntaxError(str(e))
        except Exception:
            # A bug must cost the client one reply, not its session.
            result = defer.fail()
        if result is not None and isinstance(result, defer.Deferred):
            self._busy = True
            result.addErrback(self._internalError)
            result.addBoth(self._commandDone)

    def _commandDone(self, _):
        self._busy = False
        if self._closed:
            return
        self._idle.activity()
        if self._expireAfterCommand:
            self._expireAfterCommand = False
            self._shutdownNow()
            return
        self._process()

    def _internalError(self, failure):
        if failure.check(SendAborted):
            return None
        self.logFailure("session.error", f"{self.protocolName} command failed {self.whoText()}", failure)
        if not self._closed:
            self.internalError()
        return None

    def lineReceived(self, line):
        """
        Run one command line (without its line end): check it, find the
        handler for its verb, call it with the rest of the line.
        """
        foreign = self.foreignLine(line)
        if foreign is not None:
            return self._endForeign(*foreign)
        if self._onlyCheckCommands:
            self.noteCommand(line.partition(b" ")[0].upper().decode("latin-1"))
        if _CONTROL.search(line):
            return self.unreadableLine(self.invalidCharacters)
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            return self.notUTF8(line)
        verb, _, argument = text.partition(" ")
        if not verb.isascii():
            # Upper-cased over Unicode, "MA\u0131L" (a dotless i) or
            # "R\u017fET" (a long s) would run as MAIL or RSET, where a
            # filter or proxy on the way sees another command.
            return self.unknownCommand(verb)
        verb = verb.upper()
        if not self._spoken and self._isCommand(verb):
            self._spoken = True
        return self.dispatch(verb, argument)

    def noteCommand(self, verb):
        """
        Note a command line the session read, by its first word C{verb}
        (upper case), for L{healthCheck}.  L{lineReceived} notes every line
        but one of another protocol (its session ends on its own terms,
        with a line of its own); a protocol that answers a line before the
        core reads it (SMTP's malformed BDAT) notes it itself.
        """
        if verb not in self.healthCheckCommands:
            self._onlyCheckCommands = False

    def healthCheck(self):
        """
        Whether the session was a load balancer's health check, which its
        end-of-session code does not log or count as a session: a PROXY
        header naming no client (HAProxy's C{check} sends C{LOCAL} on a
        C{send-proxy-v2} server, its own connection's addresses on a
        C{send-proxy} one; the transport's C{namedNoClient}), then no
        command line but L{healthCheckCommands}, none refused.  A balancer
        checks every 2 seconds: a line each time would be 43,200 a day per
        balancer and listener about no client at all.

        A refused line (L{countBadCommand}: too long, control characters,
        a check command with a wrong argument) makes the session no check
        for good, even if the protocol forgives it later (POP3 counts
        refusals afresh at each C{+OK}): a bad line, then C{CAPA} and
        C{QUIT}, still has its end line.
        """
        return getattr(self.transport, "namedNoClient", False) and self._onlyCheckCommands

    def foreignLine(self, line):
        """
        Whether the command line C{line} (octets, without its line end) is
        another protocol's, which ends the session at once: an HTTP request
        line (C{POST / HTTP/1.1}, its method in upper case as HTTP sends
        it), or, before any command of the session's protocol, an HTTP
        header field (C{Host: ...}).

        A browser made to send an HTTP request to a mail port (the ALPACA
        attack, over TLS with a certificate that also names the web site;
        the older HTTP-to-SMTP form posting) relies on the server answering
        each line it cannot read with an error and reading on: the
        request's body, its own lines (C{USER}, C{PASS}; C{MAIL}, C{RCPT},
        C{DATA}), then runs as the session's commands.  As Postfix's
        C{smtpd_forbidden_commands}, the session ends at the first line,
        and nothing sent after it is run.

        @return: C{None}, or why (C{"HTTP request"}, C{"HTTP header"}, or
            a protocol's own reason) and the verb fit for the log (an HTTP
            method, from the fixed set), or C{None}.
        """
        if _HTTP_REQUEST.match(line):
            return "HTTP request", line.partition(b" ")[0].decode("ascii")
        if not self._spoken and _HTTP_HEADER.match(line):
            # (Its field name is not logged: who knows what it is.)
            return "HTTP header", None
        return None

    def _endForeign(self, why, verb):
        """
        End the session for a line of another protocol (L{foreignLine}):
        the protocol's goodbye, one C{session.forbidden_command} line
        (who and why, the HTTP method at most: never the line, which may
        hold anything), counted in C{mailgate_forbidden_commands_total}.
        """
        named = f" verb={verb}" if verb is not None else ""
        self.logInfo(
            "session.forbidden_command",
            f"{self.protocolName} forbidden command peer={self.peerText} why={why!r}{named}: session closed",
            why=why,
            verb=verb,
        )
        self.factory.metrics.forbiddenCommand(self.protocolName)
        self.foreignLineRefused(why)
        self.close()
        return None

    def notUTF8(self, line):
        """
        A command line without control characters that is not UTF-8:
        refused as unreadable, unless the protocol takes some command's
        argument as octets (POP3's PASS).
        """
        return self.unreadableLine(self.invalidUTF8)

    def unreadableLine(self, reason):
        """
        A command line refused before its verb is read (control
        characters, not UTF-8): answered as a syntax error.  A protocol
        that counts its commands by name counts this one here (POP3: as
        C{OTHER}, as it counts an unknown verb).
        """
        return self.syntaxError(reason)

    def dispatch(self, verb, argument):
        """
        Run the handler of C{verb} (upper case) with C{argument}: the
        method named L{commandPrefix} + C{verb}.  Only attributes with that
        prefix can be reached this way.
        """
        handler = getattr(self, self.commandPrefix + verb, None)
        if handler is None:
            return self.unknownCommand(verb)
        return handler(argument)

    def countBadCommand(self):
        """
        Count a refused command; close the session at L{maxBadCommands}.
        A session that had one refused is no health check (L{healthCheck}).
        """
        self._onlyCheckCommands = False
        self._badCommands += 1
        if self._badCommands >= self.maxBadCommands and not self._closed:
            # The bad commands themselves are not logged (a scanner sends
            # thousands): the end of the session they cost is, once.
            self.logTooManyErrors("too many bad commands", self._badCommands)
            self.tooManyBadCommands()
            self.close()

    def logTooManyErrors(self, reason, count):
        """
        Log, once, that the session is being closed for C{count} errors of
        the client's (C{session.too_many_errors}), as Dovecot's
        "Disconnected: Too many invalid commands" and Postfix's "too many
        errors" lines: who, from where and why, never what was sent.
        """
        self.logInfo(
            "session.too_many_errors",
            f"{self.protocolName} session closed peer={self.peerText} reason={reason} count={count}",
            reason=reason,
            count=count,
        )

    def forgiveBadCommands(self):
        """
        Start counting refused commands afresh: the client has done what it
        came for (an SMTP client delivered a message), so its earlier
        errors are not held against the next transaction.
        """
        self._badCommands = 0

    # -- flow control ----------------------------------------------------------

    def _flowControl(self):
        if self._closed:
            return
        pending = len(self._buffer) - self._pos
        if not pending and not self._paused:
            # The usual case: every command run, reading not paused.
            return
        if self._outputPaused and pending:
            # Input the session cannot run while the client does not read.
            self._pauseReading(OUTPUT)
        over = pending > self.maxBufferedInput
        limit = self.maxQueuedCommands
        if not over and limit is not None and pending > limit:
            over = self._linesWaiting() > limit
        if over:
            self._pauseReading(INPUT)
        else:
            self._resumeReading(INPUT)

    def _linesWaiting(self):
        """
        How many complete lines wait in the input buffer (called with
        C{_pos} at 0, after L{_runQueue}).  Counted as the octets arrive:
        while a command runs and input piles up behind it, each read counts
        only its own octets, not everything that waits again.
        """
        buffer = self._buffer
        counted = self._countedTo
        if counted > len(buffer):
            # Taken from without a reset: never trust a stale count.
            self._resetLineCount()
            counted = 0
        if counted < len(buffer):
            self._countedLines += buffer.count(b"\n", counted)
            self._countedTo = len(buffer)
        return self._countedLines

    def _resetLineCount(self):
        """
        Forget L{_linesWaiting}'s count: the buffer's first octets were
        taken (or it was replaced), so the count starts again from there.
        """
        self._countedTo = 0
        self._countedLines = 0

    def _pauseReading(self, reason):
        if reason in self._paused or self._closed:
            return
        if not self._paused:
            self.transport.pauseProducing()
        self._paused.add(reason)

    def _resumeReading(self, reason):
        if reason not in self._paused:
            return
        self._paused.discard(reason)
        if not self._paused and not self._closed:
            self.transport.resumeProducing()

    @property
    def readingPaused(self):
        """
        Why reading from the connection is paused now: a set of
        C{"input"} (too much unread input) and C{"output"} (the client is
        not reading its replies); empty while reading.
        """
        return frozenset(self._paused)

    @property
    def inputPending(self):
        """
        Whether input the client sent waits to be run: in a command's
        handler, input sent after the command without waiting for its
        reply (pipelined behind it).
        """
        return len(self._buffer) > self._pos

    def _registerProducer(self):
        if self._producing is None and not self._closed:
            self._producing = transport = self.transport
            transport.registerProducer(self, True)

    def _unregisterProducer(self):
        # From the transport it was registered with (a test may have put
        # another in its place since).
        transport, self._producing = self._producing, None
        if transport is not None:
            transport.unregisterProducer()

    # IPushProducer: the transport's buffer of unsent output.

    def pauseProducing(self):
        """
        The transport holds more unsent output than it should: stop running
        commands, and stop reading as soon as there is input to hold back.

        Reading stops only then (at once if commands are waiting, else when
        the next one arrives), not on the pause itself: a transport may
        pause its producer for output of its own (a TLS layer's handshake,
        which needs the connection read).
        """
        if self._outputPaused or self._closed:
            return
        self._outputPaused = True
        if len(self._buffer) > self._pos:
            self._pauseReading(OUTPUT)

    def resumeProducing(self):
        """
        The client has read its replies: go on.
        """
        if not self._outputPaused:
            return
        self._outputPaused = False
        if self._closed:
            return
        self._idle.activity()
        self._resumeReading(OUTPUT)
        self._process()

    def stopProducing(self):
        # The connection is gone; connectionLost does the rest.
        self._producing = None

    # -- responses too long to hold ------------------------------------------

    def stream(self, nextBlock):
        """
        Write a long response block by block, paced by the transport: while
        it streams, the L{BlockSender} is the transport's producer.

        @param nextBlock: see L{BlockSender}.
        @return: a L{Deferred} that fires once the last block is written.
        """
        if self._closed:
            return defer.succeed(None)
        self._streaming = True
        self._unregisterProducer()
        idle = self._idle

        def progress(block):
            idle.activity()
            return block

        def source():
            block = nextBlock()
            if isinstance(block, defer.Deferred):
                return block.addCallback(progress)
            return progress(block)

        def finished(result):
            self._streaming = False
            self._registerProducer()
            return result

        sender = BlockSender(self.transport, source, self._out.send)
        return sender.start().addBoth(finished)

    # -- TLS -------------------------------------------------------------------

    def startTLS(self, tls):
        """
        Start TLS after the reply that said so.  Whatever the client sent
        after the command in the clear is discarded, never run as if it had
        come over TLS (the STARTTLS injection attack).

        @param tls: the L{mailgate.tls.ServerTLS} to start it with.
        """
        self._buffer = b""
        self._pos = 0
        self._resetLineCount()
        self._discarding = False
        self._tooLongPending = False
        self.rawReceiver = None
        # The reply goes out in the clear, before the handshake.
        self._out.flush()
        startTLS(self, tls, self._clock)

    def handshakeCompleted(self):
        """
        The TLS handshake under this session completed (pop3s, STLS,
        STARTTLS; the layer tells, as Twisted's IHandshakeListener): the
        version negotiated is counted in
        C{mailgate_tls_sessions_total{protocol,version}}, the clients a
        higher C{--tls-min-version} would turn away.  The session's end
        line names the version and cipher (L{mailgate.tls.negotiated}).
        """
        if self._admitted:
            self.factory.metrics.tlsEstablished(self.protocolName, versionAndCipher(self.transport)[0])

    # -- shutdown ----------------------------------------------------------------

    def shutdownRequested(self):
        """
        Called by the L{SessionTracker} when the server starts shutting
        down: set L{stopping} and let the protocol decide (L{beginShutdown}).
        """
        if self._closed or self.stopping:
            return
        self.stopping = True
        if getattr(self.transport, "handshaking", False):
            # Still in its TLS handshake, the client has been told nothing
            # and has asked nothing: a close would wait for the handshake
            # (TLSLayer.closeTimeout) for a client that may never finish
            # it, holding the whole shutdown up.
            self._ending("shutdown")
            self.close(abort=True)
            return
        self.beginShutdown()

    def graceExpired(self):
        """
        Called by the L{SessionTracker} when the grace period is over: close now,
        after the command under way if it waits on the store (a commit, a
        QUIT's deletions) so nothing is cut in half.
        """
        if self._closed:
            return
        self.stopping = True
        if self._busy and not (self._streaming or self._outputPaused):
            self._expireAfterCommand = True
            return
        self._shutdownNow()

    def _shutdownNow(self):
        if self._closed:
            return
        stalled = self._streaming or self._outputPaused
        self.shutdownNow(stalled)
        self.close(abort=stalled)
