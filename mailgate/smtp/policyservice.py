# -*- test-case-name: tests.test_quota_status -*-
"""
The quota-status service (C{--quota-status}): a Postfix policy delegation
server (U{http://www.postfix.org/SMTPD_POLICY_README.html}) that Postfix
asks at its own RCPT whether a recipient's mailbox has room, as Dovecot's
C{quota-status -p postfix} service.

Why: with Postfix in front delivering by LMTP, Postfix has taken the
message from the sending MTA by the time mailgate's LMTP says the mailbox
is full; Postfix then keeps it queued and bounces it days later
(backscatter, to a sender who may be forged).  Asked at its RCPT
(C{check_policy_service inet:127.0.0.1:12340} in
C{smtpd_recipient_restrictions}), Postfix refuses the recipient to the
sending MTA in the same session instead, and that MTA tells its own user.

The answer is the SMTP/LMTP RCPT's: the same check
(L{mailgate.smtp.delivery.LocalDelivery.checkRecipient}, the same store
reads and recipient cache), with the size Postfix passes on from MAIL
FROM's C{SIZE=} (C{0}: none declared, then only a mailbox already full is
refused) and the trace fields mailgate's LMTP will add, as RCPT counts
them.  What each outcome becomes is L{QuotaStatusActions}'.

The protocol: requests of C{name=value} lines ended by an empty line,
each answered by C{action=...} and an empty line, many per connection
(Postfix keeps its connection for up to C{smtpd_policy_service_max_ttl}).
Input is bounded (line length, attributes and octets per request, an
idle timeout); a line that is not C{name=value} is logged and the
connection closed, as Postfix's own policy servers do: Postfix then
answers its client 451 4.3.5 for that recipient and reconnects for the
next.  Requests are answered in order, one at a time; reading pauses
while the store is asked.

The service tells anyone who may connect which addresses exist and how
full they are: it answers only peers on C{--quota-status-network}
(loopback by default; Unix socket peers always), and should listen on
loopback or a private address only.

And it bounds how many connections are open at once
(C{--quota-status-max-connections}, L{MAX_CONNECTIONS}): each of
Postfix's smtpd processes keeps one and reuses it, so a normal count is
about Postfix's process limit, and a peer opening thousands (a runaway
client on an allowed network) would have each cost memory and a store
query.  Past the limit a new connection is closed unread and unanswered:
Postfix's C{check_policy_service} then fails for that recipient (after
C{smtpd_policy_service_try_limit} tries), which Postfix answers its
client as C{smtpd_policy_service_default_action} says: by default
C{451 4.3.5 Server configuration problem}, a temporary failure (the mail
is deferred, not lost).

Nothing here knows the store: L{QuotaStatusFactory} is given the
L{LocalDelivery} the SMTP and LMTP listeners are built with.
"""

import re

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger, LogLevel

from mailgate.errors import TemporaryFailure
from mailgate.logs import emitLine
from mailgate.networks import parseNetwork, peerOnNetworks
from mailgate.printable import printable
from mailgate.session.idle import IdleTimer
from mailgate.session.ids import describeAddress, newSessionId
from mailgate.session.refusals import RefusalLog
from mailgate.smtp.envelope import Envelope, SMTPReply, traceOctets

#: the networks whose peers are answered unless configured otherwise:
#: this machine (the service reveals which addresses exist and how full
#: they are)
DEFAULT_NETWORKS = ("127.0.0.0/8", "::1/128")

#: the connections served at once unless configured otherwise: twice
#: Postfix's default_process_limit (100), each of whose smtpd processes
#: keeps one connection (the limit is the whole service's, for every
#: Postfix in front together)
MAX_CONNECTIONS = 200

#: the only request type Postfix's smtpd sends (SMTPD_POLICY_README)
ACCESS_POLICY = "smtpd_access_policy"

#: Postfix's "no opinion": the next restriction decides
DUNNO = "DUNNO"

#: the first words of a Postfix access(5) action that an answer may give
#: (besides a 4NN or 5NN code)
ACTION_WORDS = frozenset({
    "OK", "DUNNO", "REJECT", "DEFER", "DEFER_IF_REJECT", "DEFER_IF_PERMIT", "WARN", "INFO", "HOLD",
    "DISCARD",
})


_NAME = re.compile(r"[a-z0-9_]+\Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CODE = re.compile(r"[45][0-9][0-9]\Z")

#: what a store that cannot be asked gets Postfix to answer (Dovecot's
#: quota-status answers its errors with DEFER_IF_PERMIT too): 450 if the
#: other restrictions would let the recipient in, their refusal if not
TEMPFAIL_ACTION = "DEFER_IF_PERMIT 4.3.0 temporary failure looking up the recipient; try again later"


def checkAction(text):
    """
    Whether C{text} is an action Postfix takes from a policy server, as
    written in a C{--quota-status-*} setting: an access(5) word
    (L{ACTION_WORDS}) or a 4NN/5NN code, then optional text, on one line.

    @return: C{text}, stripped.
    @raise ValueError: saying why not.
    """
    text = text.strip()
    if _CONTROL.search(text):
        raise ValueError("an action is one line, without control characters")
    first = text.split(" ", 1)[0]
    if first.upper() not in ACTION_WORDS and not _CODE.match(first):
        raise ValueError(
            f"not a Postfix access action: {first!r} is none of {', '.join(sorted(ACTION_WORDS))}, "
            "nor a 4NN or 5NN code (552 5.2.2 Mailbox is full)"
        )
    if _CODE.match(first) and not text[len(first):].strip():
        raise ValueError(f"{first} needs a text after it (552 5.2.2 Mailbox is full)")
    return text


class QuotaStatusActions:
    """
    What each outcome is answered with, as Dovecot's C{quota_status_*}
    settings.

    @ivar success: a recipient with room (C{DUNNO} by default: Postfix's
        other restrictions decide; C{OK} would skip them).
    @ivar nouser: a recipient of a domain served here that no user or
        alias has (C{DUNNO} by default: Postfix's own
        C{virtual_mailbox_maps} or mailgate's LMTP refuse it, which
        mailgate's LMTP does at Postfix's RCPT already when Postfix
        verifies recipients; C{REJECT Unknown user} refuses it here).
    @ivar overquota: a mailbox over quota, or that the message would put
        over it; C{None}: the reply mailgate's RCPT gives, as
        C{--quota-exceeded} says (C{452 4.2.2 mailbox full}, or
        C{552 5.2.2 mailbox full} when permanent).
    @ivar toolarge: a message larger than the mailbox's whole quota;
        C{None}: RCPT's C{552 5.2.3} reply, which names the quota.
    """

    def __init__(self, success=DUNNO, nouser=DUNNO, overquota=None, toolarge=None):
        self.success = checkAction(success)
        self.nouser = checkAction(nouser)
        self.overquota = None if overquota is None else checkAction(overquota)
        self.toolarge = None if toolarge is None else checkAction(toolarge)


def _replyAction(reply, mailbox):
    """
    The action that gives Postfix's client the refusal C{reply} (an
    L{SMTPReply} of the RCPT check): its codes and its text without the
    recipient, which Postfix's own reply names already
    (C{<bob@example.org>: Recipient address rejected: mailbox full}).
    """
    text = reply.text
    prefix = f"<{mailbox}>: "
    if text.startswith(prefix):
        text = text[len(prefix):]
    return f"{reply.code} {reply.enhanced} {text}"


class QuotaStatusServer(Protocol):
    """
    One connection of Postfix's (see the module's docstring).

    @cvar maxLineLength: octets in an attribute line, its end included.
        Postfix's own limit for such lines is 2048 (C{line_length_limit}).
    @cvar maxAttributes: attribute lines in one request; Postfix 3 sends
        some 35.
    @cvar maxRequestOctets: octets in one request.
    @cvar idleTimeout: seconds without a request line before the
        connection is closed: longer than Postfix keeps an idle one
        (C{smtpd_policy_service_max_idle}, 300 s), so that Postfix is the
        one that closes it as a rule.
    """

    maxLineLength = 4096
    maxAttributes = 100
    maxRequestOctets = 32 * 1024
    idleTimeout = 600

    log = Logger()

    def __init__(self):
        self._buffer = b""
        self._attributes = {}
        self._count = 0
        self._octets = 0
        self._busy = False
        self._processing = False
        self._closed = False
        self._idle = None
        self._warnedRequest = False
        self.sessionId = None
        self.peerText = None

    # -- connection ----------------------------------------------------------

    def connectionMade(self):
        factory = self.factory
        self.sessionId = newSessionId()
        peer = self.transport.getPeer()
        self.peerText = describeAddress(peer)
        if not peerOnNetworks(peer, factory.networks):
            # One line a minute per address.
            self._refuse(getattr(peer, "host", self.peerText), "not on quota-status-network")
            return
        if factory.maxConnections and len(factory.connections) >= factory.maxConnections:
            # The limit is the service's, not a peer's: one line a minute
            # for a burst of them, whoever they come from.
            self._refuse(None, "too many connections", f" (quota-status-max-connections {factory.maxConnections} open)")
            return
        self._idle = IdleTimer(factory.reactor, self.idleTimeout, self._timedOut, lambda: self._busy)
        self._idle.start()
        factory.connections.add(self)
        if factory.metrics is not None:
            # mailgate_connections{protocol="quota-status"}, down again
            # in connectionLost: the refused above never count there.
            factory.metrics.connectionOpened("quota-status")

    def _refuse(self, key, reason, detail=""):
        """
        Close the connection unread and unanswered for C{reason}, counted
        every time and logged at most once a minute per C{key} (the first
        of a burst, then a line saying how many were not logged).
        """
        factory = self.factory
        self._closed = True
        if factory.metrics is not None:
            factory.metrics.connectionRefused("quota-status", reason)
        skipped = factory.refusals.note(key, reason)
        if skipped is not None:
            more = f" ({skipped} more refused since the last line)" if skipped else ""
            self._log(
                LogLevel.warn,
                f"quota-status connection refused peer={self.peerText} reason={reason}{detail}{more}",
                event="quota_status.refused",
                reason=reason,
                unlogged=skipped,
            )
        self.transport.loseConnection()

    def connectionLost(self, reason):
        self._closed = True
        factory = self.factory
        if self in factory.connections:
            factory.connections.discard(self)
            if factory.metrics is not None:
                factory.metrics.connectionClosed("quota-status")
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        self._buffer = b""
        self._attributes = {}

    def _timedOut(self):
        if self._closed:
            return
        self._log(
            LogLevel.info,
            f"quota-status connection idle for {self.idleTimeout} s closed peer={self.peerText}",
            event="quota_status.timeout",
        )
        self._close()

    def stop(self):
        """
        Close the connection for the server's stop (an answer under way
        is not sent).
        """
        if not self._closed:
            self._close()

    def _close(self):
        self._closed = True
        self._buffer = b""
        self.transport.loseConnection()

    def _fail(self, reason):
        """
        Close the connection for input that is no policy request (a
        garbage line, a request past a bound), logged, as Postfix's policy
        servers do: no answer could be trusted to be read as one.
        """
        self._log(
            LogLevel.warn,
            f"quota-status closing the connection peer={self.peerText}: {reason}",
            event="quota_status.bad_input",
            reason=reason,
        )
        self._close()

    # -- input ---------------------------------------------------------------

    def dataReceived(self, data):
        if self._closed:
            return
        self._buffer += data
        self._process()

    def _process(self):
        if self._processing:
            # An answer given at once (a recipient remembered), from
            # within the loop below: it goes on with the next line.
            return
        self._processing = True
        try:
            self._readLines()
        finally:
            self._processing = False

    def _readLines(self):
        buffer, start = self._buffer, 0
        try:
            while not (self._busy or self._closed):
                newline = buffer.find(b"\n", start)
                if newline < 0:
                    if len(buffer) - start >= self.maxLineLength:
                        self._fail(f"a line longer than {self.maxLineLength} octets")
                    return
                if newline + 1 - start > self.maxLineLength:
                    self._fail(f"a line longer than {self.maxLineLength} octets")
                    return
                line = buffer[start:newline]
                octets, start = newline + 1 - start, newline + 1
                if line.endswith(b"\r"):
                    line = line[:-1]
                # Activity is a whole line: one trickled an octet at a
                # time is idleness, which the timeout bounds.
                self._idle.activity()
                self._line(line, octets)
        finally:
            # Cut once, not at every line: a read of many requests is
            # not copied once per line.
            if not self._closed and start:
                self._buffer = buffer[start:]

    def _line(self, line, octets):
        if not line:
            attributes, count = self._attributes, self._count
            self._attributes, self._count, self._octets = {}, 0, 0
            self._answer(attributes)
            return
        self._count += 1
        self._octets += octets
        if self._count > self.maxAttributes:
            self._fail(f"a request of more than {self.maxAttributes} attributes")
            return
        if self._octets > self.maxRequestOctets:
            self._fail(f"a request of more than {self.maxRequestOctets} octets")
            return
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self._fail("a line that is not UTF-8")
            return
        name, equals, value = text.partition("=")
        if not equals or not _NAME.match(name) or _CONTROL.search(value):
            self._fail("a line that is not name=value")
            return
        # The first of a name counts (as Dovecot's reads recipient=);
        # Postfix names each once.
        self._attributes.setdefault(name, value)

    # -- answers ---------------------------------------------------------------

    def _answer(self, attributes):
        request = attributes.get("request")
        recipient = attributes.get("recipient", "")
        if request != ACCESS_POLICY:
            if not self._warnedRequest:
                # Once a connection: a client sending another kind has
                # every one of them answered so.
                self._warnedRequest = True
                self._log(
                    LogLevel.warn,
                    f"quota-status request={printable((request or '(none)')[:64])} is no "
                    f"{ACCESS_POLICY} peer={self.peerText}: answered DUNNO",
                    event="quota_status.unknown_request",
                )
            self._send(DUNNO, "ignored", attributes=attributes)
            return
        if not recipient:
            # Not asked at RCPT (the end of DATA, with several recipients).
            self._send(DUNNO, "ignored", attributes=attributes)
            return
        size = _size(attributes.get("size"))
        self._busy = True
        self.transport.pauseProducing()
        d = defer.maybeDeferred(self.factory.check, recipient, size, attributes)
        d.addCallback(lambda answer: self._send(*answer, attributes=attributes, size=size))
        d.addErrback(self._internalError, attributes, size)
        d.addBoth(self._done)

    def _internalError(self, failure, attributes, size):
        self.log.failure(
            "{line}", failure,
            line=f"quota-status check failed recipient=<{_shown(attributes.get('recipient'))}> peer={self.peerText}",
            event="quota_status.error", session=self.sessionId, protocol="quota-status", peer=self.peerText,
        )
        self._send(TEMPFAIL_ACTION, "tempfail", attributes=attributes, size=size)

    def _done(self, _):
        self._busy = False
        if self._closed:
            return
        self._idle.activity()
        self.transport.resumeProducing()
        self._process()

    def _send(self, action, result, error=None, *, attributes, size=None):
        """
        Answer C{action}, counted as C{result}; C{error}, the store's
        failure of a C{tempfail}, ends its line: Postfix defers the
        recipient at its RCPT, so mailgate's LMTP, whose line would have
        said why, is never reached.
        """
        if self._closed:
            return
        self.factory.countAnswer(result)
        if action != DUNNO:
            # No message content here, nor anything of the sender's
            # but the addresses Postfix's own log has.
            level = LogLevel.warn if result == "tempfail" else LogLevel.info
            fields = {} if error is None else {"error": error}
            self._log(
                level,
                f"quota-status {result} recipient=<{_shown(attributes.get('recipient'))}> size={size or 0} "
                f"action={printable(action)} client={_shown(attributes.get('client_address'), 64)} "
                f"queue_id={_shown(attributes.get('queue_id'), 32) or '-'} peer={self.peerText}"
                + ("" if error is None else f": {error}"),
                event="quota_status.answer",
                result=result,
                recipient=_shown(attributes.get("recipient")),
                size=size or 0,
                action=action,
                **fields,
            )
        self.transport.write(b"action=" + action.encode("utf-8") + b"\n\n")

    def _log(self, level, text, event, **fields):
        """
        Log C{text} as C{event}, with the connection's fields, as a
        session's lines are.
        """
        emitLine(
            self.log, level, text,
            {"event": event, "session": self.sessionId, "protocol": "quota-status", "peer": self.peerText, **fields},
        )


def _shown(text, limit=256):
    return printable((text or "")[:limit])


def _size(text):
    """
    The C{size} attribute's octets: C{0} when there is none, or it is no
    number (as Dovecot's quota-status takes it).
    """
    if text is None or not text.isdigit() or not text.isascii() or len(text) > 20:
        return 0
    return int(text)


class QuotaStatusFactory(Factory):
    """
    @param delivery: the L{mailgate.smtp.delivery.LocalDelivery} whose
        RCPT check answers (the one SMTP and LMTP use, or one built as
        theirs are).
    @param reactor: the reactor (a clock in tests), for the idle timer.
    @param actions: the L{QuotaStatusActions}.
    @param networks: the networks (CIDR text or L{ipaddress} networks)
        whose peers are answered; others are closed unread.
    @param hostname: the name in the trace fields mailgate's LMTP will add
        (counted in the room a message takes).
    @param metrics: the L{mailgate.metrics.Metrics} counting answers and
        connections refused.
    @param maxConnections: the connections served at once; past it a new
        one is closed unread.  0 for no limit.
    @ivar maxConnections: as given; a reload sets it, for the connections
        made after it (those open stay, though more than a lower limit).
    """

    protocol = QuotaStatusServer
    # Its listener says where it listens; Twisted's "Starting factory"
    # lines say nothing more.
    noisy = False

    def __init__(
        self, delivery, reactor, actions=None, networks=DEFAULT_NETWORKS, hostname="localhost", metrics=None,
        maxConnections=MAX_CONNECTIONS,
    ):
        self.delivery = delivery
        self.reactor = reactor
        self.actions = actions if actions is not None else QuotaStatusActions()
        self.networks = tuple(parseNetwork(n) for n in networks)
        self.hostname = hostname
        self.metrics = metrics
        self.maxConnections = maxConnections
        self.refusals = RefusalLog(reactor)
        #: the connections open (Postfix keeps its own for minutes)
        self.connections = set()

    def stopFactory(self):
        """
        The last listener stopped (the server stopping, after the mail
        sessions' grace, before the store closes): the connections Postfix
        keeps are closed too, rather than asked on of a store that is
        closing; Postfix connects again, or answers as its
        C{smtpd_policy_service_default_action} says.
        """
        for connection in list(self.connections):
            connection.stop()

    def countAnswer(self, result):
        if self.metrics is not None:
            self.metrics.quotaStatusAnswer(result)

    def roomNeeded(self, recipient, size, attributes):
        """
        The octets the message takes in C{recipient}'s mailbox, as RCPT
        counts them: the size declared and the trace fields mailgate's
        LMTP adds (naming the client Postfix had it from, as with
        XFORWARD); C{None} when no size was declared.
        """
        if not size:
            return None
        client = attributes.get("client_name")
        envelope = Envelope(
            helo=attributes.get("helo_name") or None,
            peer=IPv4Address("TCP", attributes.get("client_address") or "127.0.0.1", 0),
            protocol="LMTP",
            sender=attributes.get("sender", ""),
            peerName=client if client and client != "unknown" else None,
        )
        # And the copy's Delivered-To:, where LMTP will write one.
        return size + traceOctets(envelope, self.hostname, recipient, getattr(self.delivery, "deliveredTo", "none"))

    def check(self, recipient, size, attributes):
        """
        Ask the RCPT check about C{recipient} for a message of C{size}
        octets (C{0}: not declared).

        @return: a L{Deferred} of C{(action, result)}, C{result} one of
            L{mailgate.metrics.QUOTA_STATUS_RESULTS}; of C{(action,
            "tempfail", error)} when the store failed, C{error} its text.
        """
        d = self.delivery.checkRecipient(recipient, self.roomNeeded(recipient, size, attributes))
        return d.addCallbacks(lambda _: (self.actions.success, "success"), self._refused, errbackArgs=(recipient,))

    def _refused(self, failure, recipient):
        actions = self.actions
        if failure.check(SMTPReply):
            reply = failure.value
            if reply.enhanced == "5.2.3":
                return (actions.toolarge or _replyAction(reply, recipient), "toolarge")
            if reply.enhanced in ("4.2.2", "5.2.2"):
                return (actions.overquota or _replyAction(reply, recipient), "overquota")
            if reply.enhanced == "5.1.1":
                return (actions.nouser, "nouser")
            # A domain not served here (relay access denied): Postfix's
            # own restrictions decide about it.
            return (DUNNO, "ignored")
        if failure.check(TemporaryFailure):
            return (TEMPFAIL_ACTION, "tempfail", printable(str(failure.value) or failure.value.__class__.__name__))
        return failure
