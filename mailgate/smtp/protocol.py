# -*- test-case-name: tests.test_smtp_protocol -*-
"""
SMTP (RFC 5321) and LMTP (RFC 2033) intake.

One protocol class, in the shape of aiosmtpd's: the wire protocol is here,
the policy (which recipients to accept, where mail goes) lives in a
delivery object the factory holds (L{mailgate.smtp.delivery.LocalDelivery}),
and the limits are named class attributes a factory can override.

mailgate does not build on C{twisted.mail.smtp.ESMTP}: it leaves DATA mode
on an over-long body line (so the rest of the body runs as commands), has
no SIZE, PIPELINING, 8BITMIME or ENHANCEDSTATUSCODES, no LMTP, and turns
storage failures into permanent 550 replies.  Here, on the session core
(L{mailgate.session.CommandSession}):

  - Input is taken from the buffer one command at a time, so a mode switch
    (DATA) takes effect exactly where it happens in the byte stream.
  - Commands run one after another; one waiting on the store (RCPT, the end
    of DATA) holds the rest back, and replies come in order (PIPELINING).
  - Handlers are found by name (C{smtp_MAIL}); LMTP is only what differs.
  - Every reply carries an RFC 3463 enhanced status code.
  - The 250 after DATA is sent only once the store has committed the
    message; a storage failure is a 451, never a 5xx.
  - A message may come in chunks instead (RFC 3030 CHUNKING, BDAT), read
    by their announced sizes (L{mailgate.smtp.chunks}) and ended as DATA
    ends: the same store, limits, replies and log lines.
"""

import errno
import re

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address

from mailgate.errors import NoSuchUser, StorageFull, TemporaryFailure
from mailgate.message import DeliveryKey, MessageSpool
from mailgate.printable import printable
from mailgate.records import AlreadyDelivered
from mailgate.session import CommandSession, describeAddress
from mailgate.session.trace import shown as shownInTrace
from mailgate.session.trace import startTrace
from mailgate.smtp.chunks import BDATSyntaxError, ChunkedMessage, ChunkReader, parseBDAT
from mailgate.smtp.data import DataReader
from mailgate.smtp.delivery import MailboxFull, namedRecipients
from mailgate.smtp.envelope import (
    Envelope,
    SMTPReply,
    copyPrefixes,
    fieldText,
    forwardPath,
    traceHeaders,
    traceOctets,
)
from mailgate.smtp.forwarding import (
    XCLIENT_ATTRIBUTES,
    XFORWARD_ATTRIBUTES,
    ForwardingSyntaxError,
    parseXCLIENT,
    parseXFORWARD,
    updated,
)
from mailgate.smtp.syntax import (
    BrokenSender,
    EnvelopeSyntaxError,
    NonASCIIAddress,
    ParameterSyntaxError,
    parseCommandPath,
)
from mailgate.timers import cancelled
from mailgate.tls import isSecure, negotiated, tlsFailure

_SIZE = re.compile(r"^[0-9]{1,20}$")

#: The spool errors that are a lack of room (the disk, a quota, the file
#: size limit), answered 452 4.3.1 "insufficient system storage".
_NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
#: What a well-formed BDAT line can hold: a line that begins like one and
#: holds anything else (a tab, a control, a non-ASCII octet) is taken for
#: a malformed BDAT, not for a command of no name.
_BDAT_LINE = re.compile(rb"BDAT [\x20-\x7e]*", re.IGNORECASE)
#: The reply to a command that needs TLS first (RFC 3207 section 4, in
#: Postfix's and RFC 3207's words), from a client outside the factory's
#: cleartext networks.
_TLS_FIRST = (530, "5.7.0", "Must issue a STARTTLS command first")
#: The commands refused with it before STARTTLS, besides DATA and BDAT
#: (refused by their handlers, which must not run what follows them as
#: commands): RFC 3207 refuses every command but NOOP, EHLO, STARTTLS and
#: QUIT; HELO, LHLO and RSET carry no mail either.
_NEED_TLS = frozenset({"MAIL", "RCPT", "VRFY", "EXPN", "HELP"})

#: the commands a client pipelines behind MAIL in one transaction (RFC 2920
#: section 3.1; RFC 3030 section 2 for BDAT): after a refused MAIL, any
#: other command ends what is forgiven (L{SMTPServer._afterRefusedMail})
_PIPELINED_BEHIND_MAIL = frozenset({b"RCPT", b"DATA", b"BDAT"})


def _beginsAsBDAT(line):
    """
    Whether the command line C{line} (octets) begins as BDAT does, after
    any spaces and tabs: what a front end on the way may take for BDAT.
    """
    return line.lstrip(b" \t")[:4].upper() == b"BDAT"


def _beginsAsDATA(line):
    """
    Whether the command line C{line} (octets) is DATA followed by a space
    or tab, after any spaces and tabs: what a front end on the way that
    takes longer lines (and trims what follows the verb, as Postfix's
    smtpd does) takes for DATA.
    """
    return line.lstrip(b" \t")[:5].upper() in (b"DATA ", b"DATA\t")


# Why a RCPT was refused, by the refusal's enhanced code, for its log line.
_RCPT_REASONS = {
    "5.1.1": "no such user",
    "5.7.1": "relay denied",
    "4.2.2": "mailbox full",
    "5.2.2": "mailbox full",
    "5.2.3": "larger than the quota",
}
# The reasons of the log lines as mailgate_recipients_refused_total labels
# them (anything else: other).
_RCPT_REFUSAL_LABELS = {
    "no such user": "no_such_user",
    "relay denied": "relay_denied",
    "mailbox full": "mailbox_full",
    "larger than the quota": "larger_than_quota",
    "too many recipients": "too_many",
    "bad parameters": "bad_syntax",
    "bad address syntax": "bad_syntax",
    "non-ASCII address": "bad_syntax",
}
# The reasons of smtp.sender_refused as mailgate_senders_refused_total
# labels them (anything else: other).
_MAIL_REFUSAL_LABELS = {
    "message too large": "too_large",
    "bad parameters": "bad_syntax",
    "bad address syntax": "bad_syntax",
    "non-ASCII address": "bad_syntax",
    "TLS required": "tls_required",
}


def _bounded(text, limit=256):
    """
    Client-supplied text fit for a log line: at most C{limit} characters,
    anything unprintable (an escape sequence, say) shown as C{?}.
    """
    return printable(text[:limit])


def _takenAsBroken(path):
    """
    Whether a sender that is no RFC 5321 mailbox may be taken as the null
    sender (L{SMTPServer.takesBrokenSender}): text without white space or
    anything unprintable, as the broken paths Dovecot's LMTP takes
    (C{a@b@example.net}, C{undisclosed-recipients:;}); one with a space or
    a control character in it is refused, as Dovecot refuses it.
    """
    return all(ch.isprintable() and not ch.isspace() for ch in path)


#: RFC 5321 section 4.5.3.1.5: a reply line is at most 512 octets, CRLF
#: included.
MAX_REPLY_LINE = 512
# A line of at most this many characters fits whatever they are (UTF-8
# takes at most four octets for one).
_SAFE_REPLY_CHARACTERS = (MAX_REPLY_LINE - 2) // 4


def _fitReplyLine(line):
    """
    A reply line (without its CRLF) cut to L{MAX_REPLY_LINE} octets with
    its CRLF, at a character's boundary: replies that name what the client
    sent (a parameter's keyword, a recipient of multi-octet characters)
    can be longer than the command that carried it.
    """
    encoded = line.encode("utf-8")
    if len(encoded) <= MAX_REPLY_LINE - 2:
        return line
    return encoded[: MAX_REPLY_LINE - 2].decode("utf-8", "ignore")


def _rawPath(argument):
    """
    The recipient of a RCPT command (or the sender of a MAIL command) that
    could not be parsed, as the client wrote it, for the log: C{TO:} (or
    C{FROM:}) and the angle brackets taken off.
    """
    path = argument.strip()
    for keyword in ("TO:", "FROM:"):
        if path[:len(keyword)].upper() == keyword:
            path = path[len(keyword):].strip()
            break
    if path.startswith("<"):
        path = path[1:].partition(">")[0]
    return path


class SMTPServer(CommandSession):
    """
    One SMTP session.

    @cvar maxCommandLength: octets in a command line, CRLF included
        (RFC 5321 section 4.5.3.1.4).
    @cvar maxLineLength: octets in a line of message text, CRLF included,
        beyond which the message is refused; C{None} (the default): lines
        of any length are accepted, as Postfix and Dovecot accept them,
        stored in pieces as they arrive (RFC 5321 section 4.5.3.1.6 sets
        1000 for senders, and asks receivers to impose no limit where they
        can).
    @cvar maxRecipients: recipients per transaction (RFC 5321 requires at
        least 100 to be accepted).
    @cvar maxMessageSize: octets of message content, advertised as SIZE.
    @cvar maxBadCommands: errors tolerated before the session is closed,
        counted since the session's start or its last delivered message.
    @cvar maxJunkCommands: commands that deliver nothing (NOOP, RSET,
        VRFY, HELP, EHLO, HELO, LHLO) tolerated since the session's start
        or its last delivered message (in LMTP, its last recipient looked
        up: L{lookupForgivesJunk}), beyond which each counts as an error, as
        Postfix's C{smtpd_junk_command_limit}: a client that only keeps its
        connection alive (a NOOP every few minutes resets the idle timer)
        is closed after L{maxBadCommands} more.
    @cvar maxRecipientOvershoot: recipients refused without being the
        client's error (past L{maxRecipients}: C{452 4.5.3}; over quota)
        tolerated since the session's start or its last delivered message,
        beyond which each counts as an error, as Postfix's
        C{smtpd_recipient_overshoot_limit}: otherwise a client repeating
        RCPT in one transaction was answered (and logged, and for a full
        mailbox looked up in the store) for ever, each line resetting the
        idle timer.  SMTP only (L{countRefusedRecipients}).
    @cvar idleTimeout: seconds of silence before the session is closed
        (RFC 5321 section 4.5.3.2.7: at least five minutes).
    @cvar maxBufferedInput: octets of pipelined input held while a command
        waits, before the server stops reading from the connection.
    @cvar takesUnannouncedUTF8: a non-ASCII address is taken in a
        transaction whose MAIL did not say SMTPUTF8 (LMTP, see
        L{LMTPServer}); else it is refused with C{553 5.6.7}.
    @cvar minDataRate: octets per second a message's data must average
        beyond an allowance of L{idleTimeout} seconds: the data of N octets
        may take C{idleTimeout + N / minDataRate} seconds.  A client that
        sends slower is told C{421} and disconnected, so that a connection
        cannot be held by trickling a message in a byte at a time, which
        the idle timer alone allows.  Postfix's C{smtpd_min_data_rate}
        default; C{0}: no limit.
    @cvar softErrorLimit: errors (counted as for L{maxBadCommands}) a
        session may make before each further error reply is held back
        L{errorSleepTime} seconds, the session's next commands with it, as
        Postfix's C{smtpd_soft_error_limit}, which sleeps once its
        C{error_count >= limit}: under the default of 10 the 11th error's
        reply waits; C{0}: from the first error.  A client guessing
        addresses (or a bot sending junk) gets its next answers one a
        second, where a reply a millisecond let it try the rest of its 20
        at once.  Replies to commands that succeed are never held.  A
        factory's own C{softErrorLimit} and C{errorSleepTime}, when it has
        them, win (C{twistd mailgate} sets them on SMTP's from its
        settings).
    @cvar errorSleepTime: seconds an error reply is held back past
        L{softErrorLimit} (Postfix's C{smtpd_error_sleep_time}); C{0}:
        never, the default of the class (LMTP's client is the site's own
        MTA, and a protocol test's clock is advanced by hand).
    """

    protocolName = "smtp"
    commandPrefix = "smtp_"
    lmtp = False
    helloVerb = "EHLO"
    # DATA after no accepted recipient: RFC 5321 section 3.3's 554.
    noRecipientsCode = 554
    maxCommandLength = 512
    maxLineLength = None
    maxRecipients = 100
    maxMessageSize = 50 * 1024 * 1024
    maxBadCommands = 20
    maxJunkCommands = 100
    maxRecipientOvershoot = 1000
    idleTimeout = 300
    maxBufferedInput = 64 * 1024
    minDataRate = 500
    softErrorLimit = 10
    errorSleepTime = 0
    refuseLongLineAtOnce = True
    takesUnannouncedUTF8 = False
    #: a MAIL whose sender is no mailbox RFC 5321 allows (L{BrokenSender})
    #: is taken as the null sender C{<>} (LMTP, see L{LMTPServer}); else
    #: it is refused with C{501 5.1.7}
    takesBrokenSender = False
    #: a load balancer's SMTP health check (HAProxy's C{option smtpchk}:
    #: C{HELO localhost} or C{EHLO} a name, then C{QUIT}; see
    #: L{CommandSession.healthCheck})
    healthCheckCommands = frozenset(["HELO", "EHLO", "QUIT", "NOOP", "RSET"])
    # A recipient refused (no such user, relaying) counts towards
    # maxBadCommands, as Postfix's smtpd_hard_error_limit counts it: a
    # client guessing addresses is cut off.
    countRefusedRecipients = True
    #: a recipient looked up and answered (taken, or refused as unknown or
    #: over quota) starts the count of junk commands (L{maxJunkCommands})
    #: afresh, as a delivered message does (LMTP, see L{LMTPServer}); else
    #: only a delivered message does
    lookupForgivesJunk = False

    def __init__(self):
        super().__init__()
        self._helo = None
        self._esmtp = False
        self._envelope = None
        self._dataTimer = None
        self._junkCommands = 0
        self._overshoot = 0
        # A MAIL was refused, and what the client may have pipelined behind
        # it is arriving: the RCPTs (how many so far) and the DATA or BDAT
        # of that transaction, refused 503 for want of one.  The client
        # could not know (RFC 2920 section 3.1: it reads the MAIL's reply
        # after sending them), so they are not its errors; the MAIL is.
        # None: no command follows a refused MAIL now.
        self._afterRefusedMail = None
        # The transaction's message failed at one of its chunks (RFC 3030
        # section 2: the transaction has failed): the chunks the client
        # pipelined after it are read and refused, without counting as
        # errors, until RSET or a new MAIL.
        self._chunksFailed = False
        # The transaction whose message failed at a chunk before its last:
        # its chunk marked LAST, pipelined behind, is answered as the end of
        # its message is, once per recipient in LMTP.
        self._failedEnvelope = None
        # The transaction said SMTPUTF8: its replies may hold UTF-8.
        self._utf8Replies = False
        # What the session's end line tells (see _logDisconnect): why it
        # ended (None: the client went away), when it began, and counts.
        self._endReason = None
        self._began = None
        self._tally = dict(commands=0, errors=0, rcpt=0, recipients=0, messages=0)
        # Whether the peer may send mail without TLS (the factory's
        # cleartext networks), once asked.
        self._cleartextPeer = None
        # An error reply held back (see softErrorLimit): the timer, and
        # the Deferred the command waits on.
        self._errorHeld = None
        # The host name the session names itself by (see hostname).
        self._hostname = None
        # The client a relay's XFORWARD names (a RelayedClient) for the
        # next mail transaction: taken into its envelope at MAIL, dropped
        # with the transaction (RSET, EHLO, STARTTLS, XCLIENT).  None: no
        # XFORWARD since.
        self._forwarded = None
        # What a proxy's XCLIENT said of the client besides its address
        # (self.peer from then on): its name and HELO name (a
        # RelayedClient), which the proxy's own EHLO after it does not
        # replace.  None: no XCLIENT.
        self._xclient = None

    @property
    def hostname(self):
        # The factory's name when the session first names itself (its
        # greeting), kept to its end: a reload may give the factory
        # another, and a session under way keeps the name of its greeting
        # in every reply and Received field.
        if self._hostname is None:
            self._hostname = self.factory.hostname
        return self._hostname

    # -- the session core's hooks ------------------------------------------

    def greet(self):
        self._began = self._elapsed()
        self._send(self._greeting())

    def _greeting(self):
        kind = "LMTP" if self.lmtp else "ESMTP"
        return f"220 {self.hostname} {kind} mailgate ready\r\n"

    def refusal(self, reason):
        if reason == "shutting down":
            self._reply(421, "4.3.2", f"{self.hostname} service shutting down")
        else:
            self._reply(421, "4.7.0", reason)

    def syntaxError(self, text):
        return self._bad(500, "5.5.2", text)

    def lineTooLong(self):
        """
        A command line over the limit is refused, and the session goes on;
        but one that begins as BDAT does is a malformed BDAT (see
        L{lineReceived}), which ends the session: its chunk follows it,
        and a front end on the way that takes longer lines (a size with
        leading zeros, spaces after LAST, as mailgate's own BDAT takes
        them) sends the chunk as a message where the octets would
        otherwise run here as commands.
        """
        if _beginsAsBDAT(self.longLineStart):
            return self._badBDAT()
        if _beginsAsDATA(self.longLineStart):
            return self._longDATA()
        return self._bad(500, "5.5.2", f"line too long (the limit is {self.maxCommandLength} octets)")

    def _longDATA(self):
        """
        A DATA line over the limit (C{DATA} and hundreds of spaces) ends the
        session.  A front end on the way that takes longer lines answers it
        354 and sends what follows as the message, whose lines here would
        run as commands (a C{MAIL} or C{RCPT} in it obeyed as the client's:
        SMTP smuggling); and when the line is refused as soon as the limit
        is passed, whether text follows it cannot be known yet, so a refusal
        that lets the session go on (as L{smtp_DATA}'s does when nothing
        was sent early) is not safe here.
        """
        self.logInfo(
            f"{self.protocolName}.bad_data",
            f"{self.protocolName} DATA line too long peer={self.peerText}: 501 5.5.4, closing",
        )
        self._ending("bad DATA")
        self._reply(501, "5.5.4", "DATA takes no arguments; closing connection")
        self.close()
        return None

    def unknownCommand(self, verb):
        return self._bad(500, "5.5.2", "command not recognized")

    def tooManyBadCommands(self):
        self._ending("too many errors")
        self._reply(421, "4.7.0", f"{self.hostname} too many errors, closing connection")

    def foreignLine(self, line):
        """
        An HTTP request or header (see L{CommandSession.foreignLine}), and,
        as Postfix's C{smtpd_forbidden_commands} default (its C{Bogus}
        rule, since 3.9), a line whose first word begins with no letter:
        no SMTP or LMTP command does, and no MTA sends one (an empty line,
        or spaces before a command, are refused as before, as Postfix
        refuses them without ending the session).  Such a line is another
        protocol's (a client's TLS handshake sent to a cleartext port),
        another server's reply echoed back, or a message's text sent on
        after a refused DATA, whose lines, run as commands, would act for
        whoever wrote them.
        """
        found = super().foreignLine(line)
        if found is None:
            first = line.lstrip(b" \t")[:1]
            if first and not first.isalpha():
                return "no command", None
        return found

    def foreignLineRefused(self, why):
        # 421 (RFC 5321 section 3.8: the reply the server may give to any
        # command when it closes the connection), as mailgate's other ends
        # of a session are; Postfix answers 221 2.7.0, which RFC 5321
        # gives to QUIT.  Nothing of the line comes back in the reply.
        self._tally["errors"] += 1
        self._ending("forbidden command")
        kind = "LMTP" if self.lmtp else "SMTP"
        self._reply(421, "4.7.0", f"{self.hostname} that line is no {kind} command, closing connection")

    def internalError(self):
        self._reply(451, "4.3.0", "internal server error; try again later")

    def idleTimedOut(self, stalled):
        self._ending("idle timeout")
        if not stalled:
            self._reply(421, "4.4.2", f"{self.hostname} timeout exceeded, closing connection")

    def connectionLost(self, reason):
        if tlsFailure(reason) is not None:
            # A failed STARTTLS handshake or a corrupt record: the end line
            # says so, whose session.tls_failed line (one a minute per
            # address and reason) an MTA retrying at once does not get.
            self._ending("TLS failed")
        super().connectionLost(reason)

    def sessionEnded(self):
        self._endErrorDelay()
        self._discardData()
        # A balancer's health check is no session: no line.  A line of
        # another protocol (no command the core notes) is an error here.
        if self._began is not None and not (self.healthCheck() and self._tally["errors"] == 0):
            self._logDisconnect()

    def _ending(self, reason):
        """
        Note why the session is ending, for its end line: the first reason
        given stands (a QUIT answered during the shutdown is a QUIT).
        """
        if self._endReason is None:
            self._endReason = reason

    def _logDisconnect(self):
        """
        One line at the end of every admitted session, as Postfix's
        "disconnect from" line: who it was, why it ended, how long it
        lasted, and what it did (command lines, errors, RCPT commands and
        recipients accepted, messages delivered), so that a client
        guessing addresses (C{rcpt=0/40}) or an MTA whose connection is
        cut off shows without a trace.
        """
        tally = self._tally
        seconds = round(self._elapsed() - self._began, 3)
        helo = _bounded(self._helo, 64) if self._helo is not None else ""
        why = self._endReason or "connection lost"
        tls = "yes" if isSecure(self.transport) else "no"
        tlsText, tlsFields = negotiated(self.transport)
        # After XCLIENT, the client the proxy named, and the proxy.
        proxy = {} if self._xclient is None else {"proxy": describeAddress(self.connectedPeer)}
        via = "".join(f" proxy={value}" for value in proxy.values())
        line = (
            f"{self.protocolName} disconnect peer={self.peerText}{via} helo=<{helo}> reason={why!r} "
            f"commands={tally['commands']} errors={tally['errors']} "
            f"rcpt={tally['recipients']}/{tally['rcpt']} messages={tally['messages']} "
            f"tls={tls}{tlsText} seconds={seconds:.3f}"
        )
        self.logInfo(
            f"{self.protocolName}.disconnect", line,
            helo=helo, reason=why, tls=tls == "yes", seconds=seconds, **tally, **tlsFields, **proxy,
        )

    def close(self, abort=False):
        self._discardData()
        super().close(abort)

    def _discardData(self):
        self._cancelDataTimer()
        reader, self.rawReceiver = self.rawReceiver, None
        if reader is not None:
            reader.discard()
        self._dropTransaction()

    def _dropTransaction(self):
        """
        End the mail transaction, if one is open, without its message: the
        chunks it had received are discarded.
        """
        self._chunksFailed = False
        self._failedEnvelope = None
        # XFORWARD's attributes are for the next transaction, which ends
        # here if it began (XFORWARD_README: at RSET or the end of DATA).
        self._forwarded = None
        envelope, self._envelope = self._envelope, None
        if envelope is not None and envelope.chunks is not None:
            envelope.chunks.discard()
            envelope.chunks = None

    # -- the data's minimum rate -------------------------------------------

    def _startDataTimer(self, reader, started=None):
        """
        Hold C{reader}'s data to the minimum rate, from C{started}: now
        for DATA (and a refused chunk), a message's first chunk for each of
        its chunks.  Sent in chunks three octets at a time, each chunk
        quick and the idle timer never due, a message would otherwise hold
        the connection for as long as it may grow: a chunk that begins
        when its message is already too slow is refused at once.
        """
        if self.minDataRate:
            self._checkDataRate(reader, self._elapsed() if started is None else started)

    @staticmethod
    def _octetsArrived(reader):
        """
        Octets of the data read so far: of the whole message, for a chunk
        of one.
        """
        message = reader.message if isinstance(reader, ChunkReader) else None
        return reader.wireOctets if message is None else message.wireOctets

    def _checkDataRate(self, reader, started):
        self._dataTimer = None
        if self._closed or self.rawReceiver is not reader:
            return
        elapsed = self._elapsed() - started
        octets = self._octetsArrived(reader)
        allowed = self.idleTimeout + octets / self.minDataRate
        if elapsed < allowed:
            self._dataTimer = self._clock.callLater(allowed - elapsed, self._checkDataRate, reader, started)
            return
        self.factory.metrics.timedOut(self.protocolName, "data_rate")
        if self._envelope is None:
            # The octets of a refused chunk, read only to be dropped.
            self.logInfo(
                f"{self.protocolName}.data_too_slow",
                f"{self.protocolName} data too slow peer={self.peerText} octets={octets} "
                f"seconds={elapsed:.0f}: 421 4.4.2 data too slow",
                code=421, enhanced="4.4.2", reason="data too slow",
                octets=octets, seconds=round(elapsed),
            )
        else:
            self._logRefusedMessage(
                self._envelope, "data_too_slow", "data too slow", 421, "4.4.2", "data too slow",
                tail=f" octets={octets} seconds={elapsed:.0f}",
                octets=octets,
                seconds=round(elapsed),
            )
        self._ending("data too slow")
        self._reply(
            421, "4.4.2",
            f"{self.hostname} message data too slow ({octets} octets in {elapsed:.0f} s; "
            f"at least {self.minDataRate} octets/s needed), closing connection",
        )
        self.close()

    def _cancelDataTimer(self):
        self._dataTimer = cancelled(self._dataTimer)

    def shutdownRequested(self):
        # A session still in its STARTTLS handshake is aborted at once by
        # the core (L{CommandSession.shutdownRequested}), with no reply to
        # note why: its end line says it was the shutdown, not the client
        # going away.
        if not (self._closed or self.stopping) and getattr(self.transport, "handshaking", False):
            self._ending("shutdown")
        super().shutdownRequested()

    def beginShutdown(self):
        """
        An idle session is told C{421} at once.  A transaction whose data
        is arriving (or being committed), or a command waiting on the
        store, is finished and answered first: the commands pipelined
        after it are told C{421} (see L{dispatch}), QUIT excepted, and if
        none is, C{421} follows the answer (L{idleWhileStopping}).  A
        message coming in chunks is arriving from its first chunk to its
        last: its next chunks are still taken.  An error reply held back
        (L{softErrorLimit}) is sent at once.
        """
        self._endErrorDelay()
        if self.rawReceiver is None and not self._busy:
            self.idleWhileStopping()

    def _chunksArriving(self):
        """
        Whether a message is coming in chunks: its first has been taken,
        its last not yet.
        """
        envelope = self._envelope
        return envelope is not None and envelope.chunks is not None and not self._chunksFailed

    def idleWhileStopping(self):
        # Not left waiting for a next command: an MTA keeping the
        # connection for its next message would hold the stop up for the
        # whole grace period.  A client that reads nothing (its replies
        # fill the connection's buffers) is cut off, as it would be at the
        # grace's end: a close waiting to send it the 421 would hold the
        # stop for the grace and more.  A message's next chunk is waited
        # for, as the rest of a DATA section is (the grace bounds both).
        if self._chunksArriving() and not self._outputPaused:
            return
        self._shutdownNow()

    def _shutdownReply(self):
        self._ending("shutdown")
        self._reply(421, "4.3.2", f"{self.hostname} service shutting down")

    def shutdownNow(self, stalled):
        self._ending("shutdown")
        if not stalled:
            self._shutdownReply()

    def dispatch(self, verb, argument):
        if self.stopping and verb != "QUIT" and not (verb == "BDAT" and self._chunksArriving()):
            self._shutdownReply()
            self.close()
            return None
        if verb in _NEED_TLS and self._mustStartTLS():
            code, enhanced, text = _TLS_FIRST
            if verb == "MAIL":
                # Logged as every refused MAIL is: the mail an MTA could not
                # hand over in the clear can be looked up.
                return self._refuseSender(_rawPath(argument), code, enhanced, "TLS required", text)
            return self._bad(code, enhanced, text)
        return super().dispatch(verb, argument)

    def _mustStartTLS(self):
        """
        Whether the client must start TLS before a mail transaction: it is
        not on the factory's cleartext networks (by its real address, after
        a PROXY header; the proxy's after XCLIENT, whose link to mailgate
        it is), and TLS has not started.
        """
        if self._cleartextPeer is None:
            self._cleartextPeer = self.factory.takesCleartext(self.connectedPeer)
        return not self._cleartextPeer and not isSecure(self.transport)

    # -- output ----------------------------------------------------------

    def _send(self, text):
        self._out.write(text.encode("utf-8"))

    def _reply(self, code, enhanced, text):
        line = f"{code} {enhanced} {text}"
        if not line.isascii():
            if self._utf8Replies:
                # An address the client sent, named back: an invisible
                # character in it (a right-to-left override) would turn
                # the reply's words around in the client's log or bounce.
                line = printable(line)
            else:
                # An address named in the reply, taken without SMTPUTF8
                # (takesUnannouncedUTF8): a client that did not ask for
                # UTF-8 gets ASCII, as it got before such addresses were
                # taken.
                line = line.encode("ascii", "replace").decode("ascii")
        if len(line) > _SAFE_REPLY_CHARACTERS:
            line = _fitReplyLine(line)
        self._send(line + "\r\n")

    def _replyLines(self, code, lines):
        out = [f"{code}-{line}\r\n" for line in lines[:-1]]
        out.append(f"{code} {lines[-1]}\r\n")
        self._send("".join(out))

    def _bad(self, code, enhanced, text):
        """
        Refuse a command as the client's error: answered, and counted
        towards L{maxBadCommands}; past L{softErrorLimit}, answered only
        after L{errorSleepTime} seconds, during which the session's next
        commands wait (a L{Deferred} is returned for the command to end
        on: the reactor is not held, and pipelined replies stay in order).
        """
        seconds = self._errorDelay()
        if seconds:
            return self._holdError(seconds, code, enhanced, text)
        return self._badNow(code, enhanced, text)

    def _badNow(self, code, enhanced, text):
        self._reply(code, enhanced, text)
        self.countBadCommand()
        return None

    def _errorDelay(self):
        """
        Seconds to hold the error reply about to be sent: L{errorSleepTime}
        once the session has made L{softErrorLimit} errors before this one;
        from its first, what the connection policy says of an address that
        has had many recipients refused as unknown (C{recipientErrorDelay}),
        whichever is longer.
        """
        factory = self.factory
        if self._closed or self.stopping:
            return 0
        # An address that has had many recipients refused as unknown, in
        # this session or others, on this node or others: from the first.
        harvesting = getattr(factory.policy, "recipientErrorDelay", None)
        slowed = harvesting(self.peer) if harvesting is not None and self.countRefusedRecipients else 0
        seconds = getattr(factory, "errorSleepTime", self.errorSleepTime)
        if not seconds or self._badCommands < getattr(factory, "softErrorLimit", self.softErrorLimit):
            return slowed
        return max(seconds, slowed)

    def _unknownRecipient(self):
        """
        Tell the connection policy of a recipient refused as unknown
        (L{mailgate.policy.connection.ConnectionPolicy.unknownRecipient}).
        """
        counted = getattr(self.factory.policy, "unknownRecipient", None)
        if counted is not None:
            counted(self.peer)

    def _holdError(self, seconds, code, enhanced, text):
        def answer(_):
            self._errorHeld = None
            if not self._closed:
                self._badNow(code, enhanced, text)

        d = defer.Deferred()
        d.addCallback(answer)
        self._errorHeld = (self._clock.callLater(seconds, d.callback, None), d)
        return d

    def _endErrorDelay(self):
        """
        Answer a held error reply now (the server stops: the stop is not
        held for it), or let it go unanswered (the session ended).
        """
        held, self._errorHeld = self._errorHeld, None
        if held is not None:
            call, d = held
            cancelled(call)
            d.callback(None)

    def countBadCommand(self):
        self._tally["errors"] += 1
        super().countBadCommand()

    def _junk(self):
        """
        A command that delivers nothing was answered: past
        L{maxJunkCommands}, it counts as an error.
        """
        self._junkCommands += 1
        if self._junkCommands > self.maxJunkCommands:
            self.countBadCommand()

    def forgiveBadCommands(self):
        super().forgiveBadCommands()
        self._junkCommands = 0
        self._overshoot = 0

    def _recipientOvershoot(self):
        """
        A recipient was refused without it being an error (over the
        recipient limit, over quota): past L{maxRecipientOvershoot}, it
        counts as one.
        """
        if not self.countRefusedRecipients:
            return
        self._overshoot += 1
        if self._overshoot > self.maxRecipientOvershoot:
            self.countBadCommand()

    # -- session commands ------------------------------------------------

    def extensions(self):
        """
        The ESMTP extensions advertised after EHLO or LHLO.
        """
        extensions = [
            f"SIZE {self.maxMessageSize}",
            "PIPELINING",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
            "CHUNKING",
        ]
        if self.factory.tls is not None and not isSecure(self.transport):
            extensions.append("STARTTLS")
        if self.factory.acceptsXCLIENT(self.connectedPeer):
            # To the MTAs and proxies of --xclient-network only (Postfix's
            # smtpd_authorized_xforward_hosts and _xclient_hosts).
            extensions.append("XCLIENT " + " ".join(XCLIENT_ATTRIBUTES))
            extensions.append("XFORWARD " + " ".join(XFORWARD_ATTRIBUTES))
        return extensions + list(self.factory.extraExtensions(self))

    def _hello(self, argument, esmtp):
        name = argument.strip()
        if not name or " " in name or len(name) > 255:
            return self._bad(501, "5.5.4", f"syntax: {'EHLO' if esmtp else 'HELO'} hostname")
        self._helo = name
        self._esmtp = esmtp
        self._dropTransaction()
        # The name as the Received field will show it: the client has not
        # asked for UTF-8 replies (it cannot before MAIL), and the line
        # stays within RFC 5321's 512 octets whatever the name's length.
        greeting = f"{self.hostname} greets {fieldText(name)}"
        if esmtp:
            self._replyLines(250, [greeting] + self.extensions())
        else:
            self._send(f"250 {greeting}\r\n")
        # Delivers nothing either, and can be repeated for ever (as
        # Postfix's smtpd flags HELO and EHLO): a client that sends it
        # instead of a NOOP every few minutes kept its connection for good.
        self._junk()
        return None

    def smtp_EHLO(self, argument):
        return self._hello(argument, True)

    def smtp_HELO(self, argument):
        return self._hello(argument, False)

    def smtp_LHLO(self, argument):
        return self._bad(500, "5.5.1", "LHLO is for LMTP; this is SMTP")

    def smtp_NOOP(self, argument):
        self._reply(250, "2.0.0", "OK")
        self._junk()

    def smtp_RSET(self, argument):
        if argument.strip():
            return self._bad(501, "5.5.4", "RSET takes no arguments")
        self._dropTransaction()
        self._reply(250, "2.0.0", "OK")
        self._junk()

    def smtp_QUIT(self, argument):
        # RFC 5321 section 4.1.1.10: QUIT takes no argument; a line with
        # one is no QUIT (as RSET's and STARTTLS's), and the session goes
        # on (Dovecot's LMTP answers it so too).
        if argument.strip():
            return self._bad(501, "5.5.4", "QUIT takes no arguments")
        self._ending("quit")
        self._reply(221, "2.0.0", f"{self.hostname} closing connection")
        self.close()

    def smtp_STARTTLS(self, argument):
        """
        RFC 3207.  Input the client pipelined after STARTTLS is discarded,
        never run as if it had come over TLS (the STARTTLS injection
        attack), and the session starts over: no EHLO, no transaction.
        """
        if argument.strip():
            return self._bad(501, "5.5.4", "STARTTLS takes no arguments")
        if self.factory.tls is None:
            return self._bad(502, "5.5.1", "STARTTLS is not available")
        if isSecure(self.transport):
            return self._bad(503, "5.5.1", "already using TLS")
        self._reply(220, "2.0.0", "ready to start TLS")
        self._helo = None
        self._esmtp = False
        self._dropTransaction()
        self.startTLS(self.factory.tls)
        return None

    def smtp_VRFY(self, argument):
        if not argument.strip():
            # RFC 5321 section 4.1.1.6: VRFY takes a string (Postfix's
            # "501 5.5.4 Syntax: VRFY address").
            return self._bad(501, "5.5.4", "syntax: VRFY address")
        # Never confirm or deny that an address exists.
        self._reply(252, "2.5.0", "cannot VRFY user; send some mail and it will be delivered if possible")
        self._junk()

    def smtp_EXPN(self, argument):
        return self._bad(502, "5.5.1", "EXPN is not supported")

    def smtp_AUTH(self, argument):
        # Not offered (mailgate takes mail to its users, it relays none):
        # a client set up to authenticate here, an MUA given this host as
        # its outgoing server, is told so rather than "command not
        # recognized", which reads as a broken server (Postfix without
        # SASL says "authentication not enabled").  Counted as an error.
        return self._bad(502, "5.5.1", "authentication is not enabled: this server takes mail for its users, "
                                       "it does not send mail for them")

    def smtp_HELP(self, argument):
        self._reply(214, "2.0.0", "mailgate: see RFC 5321 (SMTP) and RFC 2033 (LMTP)")
        self._junk()

    # -- the client a relay names (XFORWARD, XCLIENT) ------------------------

    def _relayCommand(self, command):
        """
        Whether XFORWARD or XCLIENT (C{command}) may run now; if not, the
        refusal (a L{Deferred} or C{None}, as L{_bad} returns it) in a
        list, counted.  Only an MTA or proxy on C{--xclient-network} (by
        the address of its own connection, whatever an XCLIENT before
        said) may name the client it relays (both documents: the commands
        change audit trails), and not in a mail transaction (between MAIL
        and the end of its data or RSET).
        """
        if not self.factory.acceptsXCLIENT(self.connectedPeer):
            self._relayCommandEnded(command, "refused_network")
            return [self._bad(550, "5.7.0", "insufficient authorization")]
        if self._envelope is not None:
            self._relayCommandEnded(command, "refused_sequence")
            return [self._bad(503, "5.5.1", "mail transaction in progress")]
        return None

    def _relayCommandEnded(self, command, result):
        """
        Count an XFORWARD or XCLIENT by how it ended
        (C{mailgate_xclient_commands_total}): a peer refused for being
        outside C{--xclient-network} otherwise shows only in the log.
        """
        self.factory.metrics.relayCommand(self.protocolName, command, result)

    def smtp_XFORWARD(self, argument):
        """
        Postfix's XFORWARD: the client the MTA in front had the next
        message from (C{lmtp_send_xforward_command = yes}), for that
        transaction's Received field and log lines only, as Postfix takes
        it: no policy here applies to it (the MTA's connection is the one
        this session has).  The attributes add up over the commands before
        MAIL (Postfix sends them in two when they are long), and are
        forgotten when the transaction ends, or at RSET or EHLO without
        one.
        """
        refused = self._relayCommand("XFORWARD")
        if refused is not None:
            return refused[0]
        try:
            attributes = parseXFORWARD(argument)
        except ForwardingSyntaxError as e:
            self._relayCommandEnded("XFORWARD", "refused_syntax")
            return self._bad(501, "5.5.4", str(e))
        self._relayCommandEnded("XFORWARD", "accepted")
        self._forwarded = updated(self._forwarded, attributes)
        trace = self.factory.trace
        address = self._forwarded.address
        if (
            trace and not self.traced and address is not None
            and trace.peer((IPv4Address if address.version == 4 else IPv6Address)("TCP", str(address), 0))
        ):
            # What the MTA relays for a client on --debug-peer, from the
            # XFORWARD that names it (the MTA's own connection is not).
            startTrace(self, "the client XFORWARD named is on --debug-peer")
        self._reply(250, "2.0.0", "OK")
        return None

    def smtp_XCLIENT(self, argument):
        """
        XCLIENT (Postfix's; what Dovecot's LMTP proxy sends once its LHLO
        is answered, and nginx's mail proxy for SMTP): the client the
        proxy relays is this session's from now on, as if it had
        connected, in the Received field, the log lines and the policy
        that applies per client (a ban, unknown recipients counted); the
        connection stays counted against the proxy, whose link decides
        whether TLS is needed (L{_mustStartTLS}).  The session starts over
        (XCLIENT_README): the reply is a new greeting, and EHLO or LHLO
        comes again, whose name does not replace a HELO the proxy gave.
        An ADDR or PORT of C{[UNAVAILABLE]} leaves the address as it was,
        as Dovecot's LMTP leaves it; what is not named stays as the last
        XCLIENT left it; the attributes that grant nothing here (LOGIN,
        TTL...) are taken and ignored.  A client the policy bans is told
        C{421} and the connection closed, as it would have been had it
        connected itself.
        """
        refused = self._relayCommand("XCLIENT")
        if refused is not None:
            return refused[0]
        try:
            attributes = parseXCLIENT(argument)
        except ForwardingSyntaxError as e:
            self._relayCommandEnded("XCLIENT", "refused_syntax")
            return self._bad(501, "5.5.4", str(e))
        # Taken, even where the client it names is banned (counted as
        # the ban's, below).
        self._relayCommandEnded("XCLIENT", "accepted")
        address = attributes.pop("ADDR", None)
        port = attributes.pop("PORT", None)
        if address is not None or port is not None:
            host = str(address) if address is not None else self.peer.host
            if port is None:
                port = self.peer.port if address is None else 0
            self.peer = (IPv4Address if ":" not in host else IPv6Address)("TCP", host, port)
            self.peerText = describeAddress(self.peer)
        self._xclient = updated(self._xclient, attributes)
        self._helo = None
        self._esmtp = False
        self._dropTransaction()
        proxy = describeAddress(self.connectedPeer)
        client = self._xclient
        shown = "".join(
            f" {label}={value}" for label, value in (("helo", client.helo), ("name", client.name)) if value
        )
        self.logInfo(
            f"{self.protocolName}.xclient",
            f"{self.protocolName} xclient peer={self.peerText} proxy={proxy}{shown}",
            proxy=proxy,
            **{field: value for field, value in (("clientHelo", client.helo), ("clientName", client.name)) if value},
        )
        trace = self.factory.trace
        if trace and not self.traced and trace.peer(self.peer):
            startTrace(self, "the client XCLIENT named is on --debug-peer")
        isBanned = getattr(self.factory.policy, "isBanned", None)
        if isBanned is not None and isBanned(self.peer):
            self._ending("banned")
            self._reply(421, "4.7.0", f"{self.hostname} the client's address is banned, closing connection")
            self.close()
            return None
        self._send(self._greeting())
        return None

    def _client(self, forwarded):
        """
        The client a transaction's Received field names, as C{(HELO name,
        address, host name)}: the one XFORWARD named (C{forwarded}; none
        for a forwarded local submission, which has no client), else the
        session's (after XCLIENT, the one the proxy named, with the HELO
        name it gave).
        """
        if forwarded is not None:
            if forwarded.localSubmission:
                return None, None, None
            ip = forwarded.address
            peer = (IPv4Address if ip.version == 4 else IPv6Address)("TCP", str(ip), forwarded.port or 0)
            return forwarded.helo, peer, forwarded.name
        xclient = self._xclient
        if xclient is not None:
            return xclient.helo or self._helo, self.peer, xclient.name
        return self._helo, self.peer, None

    def _clientText(self, forwarded):
        """
        How a line about a transaction names its client, and the JSON
        record's fields for it: C{peer=} the session's; for a transaction
        of a client XFORWARD named (C{forwarded}), that client's address
        and HELO name, the MTA that relayed it (C{relay=}, the session's
        peer) and its id of the message (C{orig_queue_id=}, as Postfix
        logs it), so that the MTA's log and this one can be read together.
        """
        if forwarded is None:
            return f"peer={self.peerText}", {}
        client = forwarded.describe()
        text = f"peer={client}"
        fields = {"peer": client, "relay": self.peerText}
        if forwarded.helo:
            helo = _bounded(forwarded.helo, 64)
            text += f" helo=<{helo}>"
            fields["clientHelo"] = helo
        if forwarded.name:
            fields["clientName"] = forwarded.name
        text += f" relay={self.peerText}"
        if forwarded.ident:
            ident = _bounded(forwarded.ident, 64)
            text += f" orig_queue_id={ident}"
            fields["origQueueId"] = ident
        return text, fields

    # -- the mail transaction --------------------------------------------

    def _protocolName(self, utf8=False):
        """
        The "with" of the Received field (RFC 3848), for a transaction with
        SMTPUTF8 (C{utf8}) RFC 6531's C{UTF8SMTP} and C{UTF8LMTP} forms,
        as Postfix writes them.
        """
        secure = "S" if isSecure(self.transport) else ""
        if self.lmtp:
            return ("UTF8LMTP" if utf8 else "LMTP") + secure
        if utf8:
            return "UTF8SMTP" + secure
        return ("ESMTP" + secure) if self._esmtp else "SMTP"

    def smtp_MAIL(self, argument):
        if self._helo is None:
            return self._bad(503, "5.5.1", f"send {self.helloVerb} first")
        if self._envelope is not None:
            return self._bad(503, "5.5.1", "nested MAIL command")
        self._utf8Replies = False
        broken = None
        try:
            sender, parameters = parseCommandPath(
                argument, "FROM", allowEmpty=True, utf8=self.takesUnannouncedUTF8
            )
        except ParameterSyntaxError as e:
            return self._refuseSender(_rawPath(argument), 501, "5.5.4", "bad parameters", f"bad MAIL parameters: {e}")
        except NonASCIIAddress as e:
            return self._refuseSender(_rawPath(argument), 553, "5.6.7", "non-ASCII address", f"bad sender address: {e}")
        except BrokenSender as e:
            if not self.takesBrokenSender or not _takenAsBroken(_rawPath(argument)):
                return self._refuseSender(
                    _rawPath(argument), 501, "5.1.7", "bad address syntax", f"bad sender address syntax: {e}"
                )
            sender, parameters, broken = "", e.parameters, (_rawPath(argument), e)
        except EnvelopeSyntaxError as e:
            return self._refuseSender(
                _rawPath(argument), 501, "5.1.7", "bad address syntax", f"bad sender address syntax: {e}"
            )
        if parameters and not self._esmtp:
            return self._refuseSender(sender, 555, "5.5.4", "bad parameters", "MAIL parameters need EHLO")
        for keyword, value in parameters.items():
            if keyword == "SIZE":
                if value is None or not _SIZE.match(value):
                    return self._refuseSender(sender, 501, "5.5.4", "bad parameters", "SIZE needs a number")
                if int(value) > self.maxMessageSize:
                    return self._refuseSender(
                        sender, 552, "5.3.4", "message too large",
                        f"message size exceeds the limit of {self.maxMessageSize} octets",
                    )
            elif keyword == "BODY":
                if value is None:
                    return self._refuseSender(
                        sender, 501, "5.5.4", "bad parameters", "BODY needs a value: 7BIT or 8BITMIME"
                    )
                if value.upper() not in ("7BIT", "8BITMIME"):
                    # A body type not implemented here (RFC 3030's
                    # BINARYMIME, which is not offered): RFC 5321 section
                    # 4.1.1.11's 555 for a parameter the server cannot
                    # implement, as Postfix answers it ("555 5.5.4
                    # Unsupported option: BODY=BINARYMIME").
                    return self._refuseSender(
                        sender, 555, "5.5.4", "bad parameters",
                        f"unsupported body type BODY={value[:20]}; only 7BIT and 8BITMIME",
                    )
            elif keyword == "SMTPUTF8":
                if value is not None:
                    return self._refuseSender(sender, 501, "5.5.4", "bad parameters", "SMTPUTF8 takes no value")
            else:
                return self._refuseSender(
                    sender, 555, "5.5.4", "bad parameters", f"unsupported MAIL parameter {keyword}"
                )
        self._chunksFailed = False
        self._failedEnvelope = None
        forwarded, self._forwarded = self._forwarded, None
        helo, peer, peerName = self._client(forwarded)
        self._envelope = Envelope(
            helo=helo,
            peer=peer,
            peerName=peerName,
            forwarded=forwarded,
            protocol=self._protocolName("SMTPUTF8" in parameters),
            sender=sender,
            parameters=parameters,
            utf8="SMTPUTF8" in parameters,
        )
        self._utf8Replies = self._envelope.utf8
        if broken is not None:
            self._logBrokenSender(*broken, forwarded)
        self._reply(250, "2.1.0", f"sender <{sender}> OK")
        return None

    def smtp_RCPT(self, argument):
        self._tally["rcpt"] += 1
        envelope = self._envelope
        if envelope is None:
            if self._behindRefusedMail(last=False, recipient=True):
                self._reply(503, "5.5.1", "need MAIL command first")
                return None
            return self._bad(503, "5.5.1", "need MAIL command first")
        if envelope.chunks is not None:
            # The message is arriving, its trace fields written at its
            # first chunk (as DATA writes them, after every RCPT): a
            # recipient added now would get a copy whose Received field
            # names the one recipient there was then ("for <...>", a Bcc
            # recipient's address, say).
            return self._bad(503, "5.5.1", "no RCPT once the message's chunks are arriving")
        try:
            mailbox, parameters = parseCommandPath(
                argument, "TO", allowEmpty=False, utf8=envelope.utf8 or self.takesUnannouncedUTF8
            )
        except ParameterSyntaxError as e:
            self._logRecipientRefused(envelope, _rawPath(argument), 501, "5.5.4", "bad parameters")
            return self._bad(501, "5.5.4", f"bad RCPT parameters: {e}")
        except NonASCIIAddress as e:
            self._logRecipientRefused(envelope, _rawPath(argument), 553, "5.6.7", "non-ASCII address")
            return self._bad(553, "5.6.7", f"bad recipient address: {e}")
        except EnvelopeSyntaxError as e:
            self._logRecipientRefused(envelope, _rawPath(argument), 501, "5.1.3", "bad address syntax")
            return self._bad(501, "5.1.3", f"bad recipient address syntax: {e}")
        if parameters:
            self._logRecipientRefused(envelope, mailbox, 555, "5.5.4", "bad parameters")
            return self._bad(555, "5.5.4", f"unsupported RCPT parameter {next(iter(parameters))}")
        if len(envelope.recipients) >= self.maxRecipients:
            self._logRecipientRefused(envelope, mailbox, 452, "4.5.3", "too many recipients")
            self._reply(452, "4.5.3", f"too many recipients (the limit is {self.maxRecipients})")
            self._recipientOvershoot()
            return None
        trace = self.factory.trace
        if trace and not self.traced:
            self._traceIfListed(trace, mailbox)
        declared = envelope.parameters.get("SIZE")
        # The room the message takes is what it is stored as: the size the
        # client declares and the trace fields put before it.  By the
        # declared size alone, a recipient with room for that but not for
        # the fields was taken here and refused at the end of DATA, where
        # SMTP refuses the message for everyone, again at every retry.
        size = (
            int(declared) + traceOctets(envelope, self.hostname, mailbox, self._deliveredTo())
            if declared else None
        )
        d = self.factory.delivery.checkRecipient(mailbox, size)

        def accepted(address):
            self._tally["recipients"] += 1
            self._lookedUp()
            if trace and not self.traced and address != mailbox and trace.user(address):
                # An alias of a user of --debug-user: the mail is the
                # user's, known only now that it was looked up.
                startTrace(
                    self, f"RCPT TO:<{shownInTrace(mailbox)}>, an alias of {shownInTrace(address)}, on --debug-user"
                )
            if self._envelope is envelope:
                envelope.recipients.append(address)
                envelope.forwardPaths.append(forwardPath(mailbox, address))
            self._reply(250, "2.1.5", f"recipient <{mailbox}> OK")

        def refused(failure):
            if failure.check(SMTPReply):
                self._lookedUp()
                reply = failure.value
                reason = _RCPT_REASONS.get(reply.enhanced, "refused")
                self._logRecipientRefused(envelope, mailbox, reply.code, reply.enhanced, reason)
                if reply.enhanced == "5.1.1" and self.countRefusedRecipients:
                    # Across sessions and nodes (LMTP's client is the site's MTA).
                    self._unknownRecipient()
                if failure.check(MailboxFull) or not self.countRefusedRecipients:
                    # Over quota (or LMTP): a fair request refused, not a
                    # bad command.
                    self._reply(reply.code, reply.enhanced, reply.text)
                    self._recipientOvershoot()
                else:
                    return self._bad(reply.code, reply.enhanced, reply.text)
            elif failure.check(TemporaryFailure):
                who, fields = self._clientText(envelope.forwarded)
                self.logWarning(
                    f"{self.protocolName}.recipient_failed",
                    f"{self.protocolName} recipient lookup failed from=<{_bounded(envelope.sender)}> "
                    f"to=<{_bounded(mailbox)}> {who}: {failure.value}",
                    sender=_bounded(envelope.sender),
                    recipient=_bounded(mailbox),
                    **fields,
                )
                self._reply(451, "4.3.0", "temporary failure looking up the recipient; try again later")
            else:
                who, fields = self._clientText(envelope.forwarded)
                self.logFailure(
                    f"{self.protocolName}.recipient_failed",
                    f"{self.protocolName} recipient check failed from=<{_bounded(envelope.sender)}> "
                    f"to=<{_bounded(mailbox)}> {who}",
                    failure,
                    sender=_bounded(envelope.sender),
                    recipient=_bounded(mailbox),
                    **fields,
                )
                self._reply(451, "4.3.0", "internal error checking the recipient; try again later")

        d.addCallbacks(accepted, refused)
        return d

    def _lookedUp(self):
        """
        A recipient was looked up and answered: where that is the client's
        work (L{lookupForgivesJunk}), the junk commands before it are not
        held against it.
        """
        if self.lookupForgivesJunk:
            self._junkCommands = 0

    def _traceIfListed(self, trace, mailbox):
        """
        Trace the session from a RCPT that names a user of --debug-user
        (by the whole address, or the user it names with a detail): what
        becomes of that user's mail is then in the log.  (One naming an
        alias of the user is traced once looked up, from its reply on.)
        """
        withoutDetail = getattr(self.factory.delivery, "withoutDetail", None)
        user = withoutDetail(mailbox) if withoutDetail is not None else None
        if trace.user(mailbox) or (user is not None and trace.user(user)):
            startTrace(self, f"RCPT TO:<{shownInTrace(mailbox)}>, on --debug-user")

    def _logBrokenSender(self, raw, error, forwarded=None):
        """
        A sender taken as the null sender (L{takesBrokenSender}): one line
        naming what the client wrote, so that a message whose Return-Path
        says C{<>} can be traced to it.

        @param forwarded: the client XFORWARD named for the transaction.
        """
        raw = _bounded(raw)
        who, fields = self._clientText(forwarded)
        self.logInfo(
            f"{self.protocolName}.sender_broken",
            f"{self.protocolName} sender taken as <> from=<{raw}> {who}: {error}",
            sender=raw,
            reason=str(error),
            **fields,
        )

    def _refuseSender(self, sender, code, enhanced, reason, text):
        """
        Refuse a MAIL command, and log it in one line as a refused RCPT is
        (C{smtp.sender_refused}): a message bounced for the size its MTA
        declared, or for its sender's address, can be looked up, as one
        bounced at RCPT or at the end of DATA can.

        @param sender: the sender's mailbox, or for one that could not be
            parsed what the client wrote (bounded and made printable here).
        @param reason: the short reason (the event's C{reason} field).
        @param text: the reply's text.
        """
        sender = _bounded(sender)
        # The client an XFORWARD before it named: the refused MAIL was its.
        who, fields = self._clientText(self._forwarded)
        self.logInfo(
            f"{self.protocolName}.sender_refused",
            f"{self.protocolName} sender refused from=<{sender}> {who}: {code} {enhanced} {reason}",
            sender=sender,
            code=code,
            enhanced=enhanced,
            reason=reason,
            **fields,
        )
        self.factory.metrics.senderRefused(self.protocolName, _MAIL_REFUSAL_LABELS.get(reason, "other"))
        self._afterRefusedMail = 0
        return self._bad(code, enhanced, text)

    def _behindRefusedMail(self, last, recipient=False):
        """
        Whether a RCPT (C{recipient}), DATA or BDAT refused for want of a
        transaction is one the client pipelined behind a refused MAIL
        (L{_afterRefusedMail}), and so not its error (RFC 2920 section 3.1:
        the client sends MAIL, its RCPTs and DATA before it reads a reply,
        as Postfix's SMTP and LMTP clients do).  Counted, each oversized
        message Postfix sends over a cached connection (it sends them
        there, with SIZE over the limit the server gave) was three errors,
        and seven closed the connection with 421.  The MAIL still counts:
        a client that only sends refused transactions is closed after
        L{maxBadCommands} of them, each forgiven at most L{maxRecipients}
        RCPTs and one DATA (or chunks to the one marked LAST, each a junk
        command).

        @param last: the command ends what a refused MAIL may have behind
            it (DATA, BDAT LAST).
        """
        count = self._afterRefusedMail
        if count is None:
            return False
        if recipient:
            if count >= self.maxRecipients:
                return False
            self._afterRefusedMail = count + 1
        elif last:
            self._afterRefusedMail = None
        return True

    def _logRecipientRefused(self, envelope, recipient, code, enhanced, reason):
        """
        One line per refused RCPT: who sent to whom, the reply and why.

        @param recipient: the recipient's mailbox, or for one that could
            not be parsed what the client wrote (bounded and made printable
            here).
        """
        sender = _bounded(envelope.sender)
        recipient = _bounded(recipient)
        who, fields = self._clientText(envelope.forwarded)
        self.logInfo(
            f"{self.protocolName}.recipient_refused",
            f"{self.protocolName} recipient refused from=<{sender}> to=<{recipient}> "
            f"{who}: {code} {enhanced} {reason}",
            sender=sender,
            recipient=recipient,
            code=code,
            enhanced=enhanced,
            reason=reason,
            **fields,
        )
        self.factory.metrics.recipientRefused(self.protocolName, _RCPT_REFUSAL_LABELS.get(reason, "other"))

    def smtp_DATA(self, argument):
        envelope = self._envelope
        counted = True
        behindRefusedMail = self._behindRefusedMail(last=True)
        if self._mustStartTLS():
            # First, before what else is wrong with it: a message's text
            # sent on without waiting for the reply ends the session, as
            # after every refused DATA (_refuseEarlyData).
            refusal = _TLS_FIRST
        elif argument.strip():
            refusal = 501, "5.5.4", "DATA takes no arguments"
        elif envelope is None:
            refusal = 503, "5.5.1", "need MAIL command first"
            counted = not behindRefusedMail
        elif envelope.chunks is not None or self._chunksFailed:
            # RFC 3030 section 3: DATA and BDAT cannot be mixed in one
            # transaction; the client must send RSET.  The message's
            # chunks are dropped.
            self._dropTransaction()
            refusal = 503, "5.5.1", "DATA after BDAT in the same transaction; send RSET"
        elif not envelope.recipients:
            refusal = self.noRecipientsCode, "5.5.1", "no valid recipients"
            counted = self.countRefusedRecipients
        else:
            return self._startData(envelope)
        if counted:
            # Not held (softErrorLimit): what follows needs the reply sent.
            self._badNow(*refusal)
        else:
            self._reply(*refusal)
        if self.inputPending and not self.closed:
            self._refuseEarlyData(envelope)
        else:
            # A client that sends its message whatever the reply: its lines
            # come as commands, and a trace must not show them.
            self.hideNonCommandsFromTrace("a refused DATA")
        return None

    def _refuseEarlyData(self, envelope):
        """
        DATA was refused, and the client had sent more without waiting for
        that reply: the message's text, as a rule.  No client may (RFC 2920
        puts DATA last in a group of pipelined commands, and RFC 5321
        section 3.3 sends the text only after a 354), and run as commands
        that text would be obeyed as the client's: a C{MAIL}, C{RCPT} or
        C{DATA} line in a message would add its author's recipients to the
        open transaction, or send mail of its own (SMTP smuggling).  As
        Exim's synchronization check, none of it is run: the session ends.
        """
        sender = "" if envelope is None else _bounded(envelope.sender)
        who, fields = self._clientText(self._forwarded if envelope is None else envelope.forwarded)
        self.logInfo(
            f"{self.protocolName}.early_data",
            f"{self.protocolName} input sent before the reply to a refused DATA from=<{sender}> "
            f"{who}: 421 4.5.0, closing",
            sender=sender,
            **fields,
        )
        self._ending("early data")
        self._reply(
            421, "4.5.0",
            f"{self.hostname} input sent before the reply to a refused DATA (RFC 2920), closing connection",
        )
        self.close()

    def _newSpool(self, envelope):
        """
        The spool a message's content goes to, its trace fields written
        first.
        """
        spool = MessageSpool(directory=getattr(self.factory, "spoolDirectory", None))
        # With --delivered-to final the Return-Path: goes in each copy's
        # own fields, before its Delivered-To: (as Dovecot's LMTP writes
        # them), and the message stored once begins with the Received:
        # field.  Decided here for this message, whatever a reload changes
        # before it ends.
        spool.perCopyTrace = self._deliveredTo() == "final"
        spool.writeLines(traceHeaders(envelope, self.hostname, returnPath=not spool.perCopyTrace))
        return spool

    def _deliveredTo(self):
        """
        C{--delivered-to} as the factory's delivery holds it
        (L{mailgate.smtp.delivery.LocalDelivery.deliveredTo}, replaced at a
        reload); C{"none"} for an embedder's delivery that does not say (a
        wrapper of its own), which then stores messages as it did before
        the setting existed.
        """
        return getattr(self.factory.delivery, "deliveredTo", "none")

    def _deliveryKey(self, envelope):
        # The content is hashed as it is stored, for its delivery key: the
        # same octets from the same sender again are a retry (sent by DATA
        # or in chunks alike).
        return DeliveryKey(self.protocolName, envelope.sender)

    def _startData(self, envelope):
        self.rawReceiver = DataReader(
            self._newSpool(envelope), self.maxMessageSize, self.maxLineLength, digest=self._deliveryKey(envelope),
            afterTrace=True,
        )
        self._startDataTimer(self.rawReceiver)
        self._send("354 End data with <CR><LF>.<CR><LF>\r\n")
        return None

    def _dataRefusal(self, reader):
        """
        Why the data, as it arrived, is refused for good, as C{(code,
        enhanced status, the log's reason, the reply's text)}; C{None} if
        it is not.
        """
        if reader.tooLarge:
            limit = f"message size exceeds the limit of {self.maxMessageSize} octets"
            return 552, "5.3.4", "message too large", limit
        if reader.lineTooLong:
            return 500, "5.5.2", "line too long", f"line too long (the limit is {self.maxLineLength} octets)"
        return None

    def rawDataEnded(self, reader):
        """
        The end of the data (or of a BDAT chunk): refuse it, or commit it
        and answer once the store has made it durable.
        """
        self._cancelDataTimer()
        if isinstance(reader, ChunkReader):
            return self._chunkEnded(reader)
        envelope, self._envelope = self._envelope, None
        spool = None
        if self._dataRefusal(reader) is None and not reader.storageFailed:
            try:
                spool = reader.spool.finish()
                spool.deliveryKey = reader.digest.key()
            except OSError as error:
                # Its last octets, held in the file's buffer until now,
                # could not be written (the disk filled up).
                reader.storageFailed = True
                reader.storageError = error
                reader.spool.close()
                spool = None
        return self._messageEnded(envelope, reader, spool)

    def _contentFailed(self, envelope, content):
        """
        The message's content failed as it arrived (C{content}: a
        L{DataReader} or a L{ChunkedMessage}): too large, a line too long,
        or the spool could not be written.  Counted, logged, and the
        reply's C{(code, enhanced, text)} returned.
        """
        content.discard()
        metrics = self.factory.metrics
        refusal = self._dataRefusal(content)
        if refusal is not None:
            code, enhanced, reason, reply = refusal
            metrics.delivery(self.protocolName, "rejected")
            self._logRefusedMessage(envelope, "rejected", "rejected", code, enhanced, reason)
            return code, enhanced, reply
        metrics.delivery(self.protocolName, "tempfail")
        error = content.storageError
        if error is None or error.errno in _NO_ROOM:
            code, enhanced, reply = 452, "4.3.1", "insufficient system storage; try again later"
        else:
            # Not a full disk: out of file descriptors, a spool directory
            # gone or not writable.  "Insufficient system storage" would
            # send the administrator to look at free space; RFC 5321's
            # 451 says what it is, and the log line says which error.
            code, enhanced, reply = 451, "4.3.0", "local error in processing; try again later"
        why = "unknown error" if error is None else (error.strerror or str(error))
        self._logRefusedMessage(
            envelope, "spool_failed", "spool failed", code, enhanced, "spool failed",
            detail=f"cannot spool message data: {why}",
            level="error",
        )
        return code, enhanced, reply

    def _messageEnded(self, envelope, content, spool):
        """
        A message has arrived whole: C{spool}, finished, or C{None} if its
        C{content} failed on the way.  Deliver it, and answer once the
        store has committed it.
        """
        if spool is None:
            return self._dataReplies(envelope, *self._contentFailed(envelope, content))
        started = self._elapsed()
        if getattr(spool, "perCopyTrace", False):
            spool.copyPrefixes = copyPrefixes(envelope)
        d = self.factory.delivery.deliver(envelope, spool, partial=self.lmtp)
        d.addCallbacks(
            self._delivered,
            self._deliveryFailed,
            callbackArgs=(envelope, spool.size, started),
            errbackArgs=(envelope,),
        )
        d.addBoth(lambda _: spool.close())
        return d

    # -- CHUNKING (RFC 3030) ----------------------------------------------

    def lineReceived(self, line):
        """
        A line that begins as BDAT does (spaces before it, a tab after it,
        a control or non-ASCII octet in it) is a malformed BDAT, and ends
        the session as one does: answered as a command of no name, the
        chunk's octets after it would run as commands, where a front end
        on the way that took the line for BDAT sends them as a message.
        """
        self._tally["commands"] += 1
        if self._afterRefusedMail is not None and line.partition(b" ")[0].upper() not in _PIPELINED_BEHIND_MAIL:
            self._afterRefusedMail = None
        if _beginsAsBDAT(line) and not _BDAT_LINE.fullmatch(line):
            # Answered before the core reads it: a command all the same.
            self.noteCommand("BDAT")
            return self._badBDAT()
        return super().lineReceived(line)

    def _badBDAT(self):
        # How many octets follow is unknown: none of them can be read as a
        # command, so the session cannot go on.
        self.logInfo(
            f"{self.protocolName}.bad_bdat",
            f"{self.protocolName} malformed BDAT command peer={self.peerText}: 501 5.5.4, closing",
        )
        self._ending("bad BDAT")
        self._reply(501, "5.5.4", "syntax: BDAT chunk-size [LAST]; closing connection")
        self.close()
        return None

    def smtp_BDAT(self, argument):
        """
        A chunk of the message: its octets follow the command line, exactly
        as many as it says, and are read whatever the reply (RFC 3030
        section 2: a client pipelines its chunks, and a refused chunk's
        octets are no commands).  The chunk marked C{LAST} ends the message
        as the end of DATA does.
        """
        try:
            size, last = parseBDAT(argument)
        except BDATSyntaxError:
            return self._badBDAT()
        envelope = self._envelope
        if size > self.maxMessageSize:
            # Refused before a single octet, whatever the transaction's
            # state: reading that many only to drop them is not worth the
            # connection's time (and a client declaring a chunk of 10**19
            # octets would keep the server reading for ever).
            text = f"message size exceeds the limit of {self.maxMessageSize} octets; closing connection"
            failsMessage = envelope is not None and envelope.recipients and not self._chunksFailed
            if failsMessage:
                message = self._chunkedMessage(envelope)
                message.tooLarge = True
                self._contentFailed(envelope, message)
            self._dropTransaction()
            if failsMessage and last:
                # The message's end: one reply per recipient in LMTP.
                self._dataReplies(envelope, 552, "5.3.4", text)
            else:
                self._reply(552, "5.3.4", text)
            self._ending("message too large")
            self.close()
            return None
        if self._mustStartTLS():
            # Its octets are read and dropped, as every refused chunk's.
            refusal = *_TLS_FIRST, True
        elif self._chunksFailed:
            # A chunk pipelined after its message failed: the client was
            # told why at that chunk.
            refusal = 503, "5.5.1", "the message failed at an earlier chunk; send RSET", False
        elif envelope is not None and not self._esmtp:
            # CHUNKING is an extension, offered in the reply to EHLO only
            # (RFC 3030 section 2), as MAIL's parameters need EHLO.
            refusal = 503, "5.5.1", "BDAT needs EHLO", True
        elif envelope is None:
            # Behind a refused MAIL, a junk command (L{_chunkEnded}): the
            # chunks a client pipelined after it are not its errors, and a
            # client sending chunks for ever is still closed.
            refusal = 503, "5.5.1", "need MAIL command first", not self._behindRefusedMail(last=last)
        elif not envelope.recipients:
            # The transaction fails with this chunk (RFC 3030 section 2):
            # a recipient accepted after it must not get the message
            # without it.  The envelope stays, as for a refused DATA (a
            # RCPT may still be given), until RSET.
            self._chunksFailed = True
            refusal = self.noRecipientsCode, "5.5.1", "no valid recipients", self.countRefusedRecipients
        else:
            refusal = None
        if refusal is not None:
            reader = ChunkReader(None, size, last, refusal=refusal)
        else:
            reader = ChunkReader(self._chunkedMessage(envelope), size, last)
        if size == 0:
            return self._chunkEnded(reader)
        self.rawReceiver = reader
        self._startDataTimer(reader, None if reader.message is None else reader.message.started)
        return None

    def _chunkedMessage(self, envelope):
        """
        The transaction's message, begun at its first chunk.
        """
        if envelope.chunks is None:
            envelope.chunks = ChunkedMessage(
                self._newSpool(envelope), self.maxMessageSize, self.maxLineLength,
                digest=self._deliveryKey(envelope), started=self._elapsed(), afterTrace=True,
            )
        return envelope.chunks

    def _chunkEnded(self, reader):
        """
        All of a chunk's octets have been read: answer it, and end the
        message at its last chunk.
        """
        if reader.refusal is not None:
            code, enhanced, text, counted = reader.refusal
            if counted:
                return self._bad(code, enhanced, text)
            envelope = self._failedEnvelope if reader.last else None
            if envelope is not None:
                # The end of a failed message, its chunks pipelined by a
                # client that had not yet read the failure: an LMTP client
                # waits for as many replies as it has recipients.
                self._failedEnvelope = None
                self._dataReplies(envelope, code, enhanced, text)
            else:
                self._reply(code, enhanced, text)
            self._junk()
            return None
        message = reader.message
        if not reader.last:
            if message.failed:
                envelope = self._envelope
                self._dropTransaction()
                self._chunksFailed = True
                self._failedEnvelope = envelope
                self._reply(*self._contentFailed(envelope, message))
                return None
            self._reply(250, "2.0.0", f"{reader.size} octets received")
            if reader.size == 0:
                # Chunks of nothing deliver nothing either.
                self._junk()
            return None
        envelope, self._envelope = self._envelope, None
        envelope.chunks = None
        spool = message.finish()
        if spool is not None:
            spool.deliveryKey = message.digest.key()
        return self._messageEnded(envelope, message, spool)

    def _dataReplies(self, envelope, code, enhanced, text):
        self._reply(code, enhanced, text)
        return None

    def _delivered(self, results, envelope, octets, started):
        metrics = self.factory.metrics
        # LMTP answers per recipient: one over quota, or deleted since its
        # RCPT (550 5.1.1), is a refused delivery of its own (SMTP refuses
        # the whole message instead, see _deliveryFailed); the message is
        # accepted once if anyone got it, never when nobody did.
        outcomes = [results.get(address) for address in envelope.recipients]
        copies = [result for result in outcomes if isinstance(result, str)]
        if copies and all(isinstance(result, AlreadyDelivered) for result in copies):
            # A client's retry of a message its recipients already have.
            metrics.delivery(self.protocolName, "duplicate")
        elif copies:
            metrics.delivery(
                self.protocolName, "accepted", octets=octets, seconds=self._elapsed() - started
            )
        if copies:
            self._tally["messages"] += 1
            # Errors count towards maxBadCommands until mail is delivered,
            # as Postfix's smtpd_hard_error_limit does: an MTA that keeps
            # its (LMTP) connection open for message after message, some
            # of them to unknown users (550 5.1.1), is not cut off with
            # 421 halfway through a later one.
            self.forgiveBadCommands()
        for result in outcomes:
            if isinstance(result, MailboxFull):
                metrics.delivery(self.protocolName, result.outcome)
            elif result is None or isinstance(result, NoSuchUser):
                metrics.delivery(self.protocolName, "rejected")
        self._acknowledge(results, envelope)

    def _acknowledge(self, results, envelope):
        """
        The replies to a committed message, and its log line.
        """
        copies = [r for r in results.values() if isinstance(r, str)]
        if copies and all(isinstance(r, AlreadyDelivered) for r in copies):
            self._reply(250, "2.0.0", "OK: already delivered, not stored again (a retry of the same message)")
        else:
            self._reply(250, "2.0.0", f"OK: message accepted as {envelope.transactionId}")
        # The id in the reply (and in the Received field) is the message's;
        # the log line adds the unique id each recipient's copy got.
        uniqueIds = {a: r for a, r in results.items() if isinstance(r, str)}
        # Recipients who had it already (a retry): not stored again, the
        # line says so and names the copy they have.
        again = [a for a in envelope.recipients if isinstance(results.get(a), AlreadyDelivered)]
        duplicate = f" duplicate={','.join(again)}" if again else ""
        who, fields = self._clientText(envelope.forwarded)
        self._logDelivery(
            envelope,
            f" uids={_uidsField(envelope, uniqueIds)}{duplicate} {who}",
            uniqueIds=uniqueIds,
            **({"duplicates": again} if again else {}),
            **fields,
        )

    def _logDelivery(self, envelope, tail="", uniqueIds=None, **extra):
        """
        One line per delivered message, naming the id the client was told.
        The text is made here in one piece (Twisted's formatting of many
        fields costs more than the rest of a small delivery's logging); the
        fields go along for structured observers.

        The sender is shown as every other line shows it (L{_bounded}): an
        SMTPUTF8 address may hold a right-to-left override or another
        invisible format character, which would turn the line round on an
        administrator's terminal.  Each copy's unique id goes in a list of
        C{{"recipient", "uid"}} pairs in the order of C{to=}, not in an
        object keyed by address: a JSON log's field names stay the same
        whatever the recipients (a log store makes a field of each name),
        and an address such as C{password-reset@...}, named like a secret,
        is not dropped as one (L{mailgate.logs.eventAsRecord}).

        @param uniqueIds: the unique id of each recipient's copy, by
            address (those without one left out).
        """
        recipients = ",".join(envelope.recipients)
        sender = _bounded(envelope.sender)
        line = (
            f"{self.protocolName} delivered id={envelope.transactionId} "
            f"from=<{sender}> to={recipients}{tail}"
        )
        if uniqueIds is not None:
            extra["uniqueIds"] = [
                {"recipient": address, "uid": str(uniqueIds[address])}
                for address in envelope.recipients
                if address in uniqueIds
            ]
        self.logInfo(
            f"{self.protocolName}.delivered",
            line,
            id=envelope.transactionId,
            sender=sender,
            recipients=recipients,
            **extra,
        )

    def _deliveryFailed(self, failure, envelope):
        event, what = "delivery_failed", "delivery failed"
        if failure.check(MailboxFull):
            # A recipient over quota: nothing was stored, the message is
            # refused as a whole (452 4.2.2, or 552 5.2.2 if permanent).
            reply = failure.value
            self._logRefusedMessage(
                envelope, event, what, reply.code, reply.enhanced, "mailbox full", detail=reply.text
            )
            self.factory.metrics.delivery(self.protocolName, reply.outcome)
            return self._dataReplies(envelope, reply.code, reply.enhanced, reply.text)
        if failure.check(StorageFull):
            # The database's disk is full: RFC 3463's "mail system full",
            # as for a spool that cannot be written.  Nothing was stored.
            self._logRefusedMessage(
                envelope, event, what, 452, "4.3.1", "storage full",
                detail=f"storage full: {failure.value}", level="warn",
            )
            self.factory.metrics.delivery(self.protocolName, "tempfail")
            return self._dataReplies(envelope, 452, "4.3.1", "insufficient system storage; try again later")
        if failure.check(NoSuchUser):
            self._logRefusedMessage(
                envelope, event, what, 451, "4.3.0", "recipient vanished",
                detail=f"recipient vanished before commit: {failure.value}", level="warn",
            )
            text = "a recipient no longer exists; try again"
        elif failure.check(TemporaryFailure):
            self._logRefusedMessage(
                envelope, event, what, 451, "4.3.0", "store unavailable",
                detail=f"store unavailable: {failure.value}", level="warn",
            )
            text = "temporary failure storing the message; try again later"
        else:
            self._logRefusedMessage(
                envelope, event, what, 451, "4.3.0", "internal error", failure=failure
            )
            text = "internal error storing the message; try again later"
        self.factory.metrics.delivery(self.protocolName, "tempfail")
        self._dataReplies(envelope, 451, "4.3.0", text)

    def _logRefusedMessage(self, envelope, event, what, code, enhanced, reason,
                           detail=None, tail="", level="info", failure=None, **extra):
        """
        The one line for a message refused at or after DATA (too large, a
        line too long, its data too slow, its spool or its store failing,
        a recipient over quota), naming its transaction as C{_logDelivery}
        does and the reply the client got.

        @param event: the event's name after the protocol's, e.g.
            C{"rejected"} for C{smtp.rejected}.
        @param what: the line's words after the protocol's name.
        @param reason: the short reason (the event's C{reason} field).
        @param detail: what the line says instead of C{reason}, if more.
        @param tail: text before the reply, for C{extra} fields.
        """
        sender = _bounded(envelope.sender)
        recipients = ",".join(envelope.recipients)
        who, client = self._clientText(envelope.forwarded)
        line = (
            f"{self.protocolName} {what} id={envelope.transactionId} from=<{sender}> "
            f"to={recipients} {who}{tail}: {code} {enhanced} {detail or reason}"
        )
        fields = dict(
            id=envelope.transactionId, sender=sender, recipients=recipients,
            code=code, enhanced=enhanced, reason=reason, **extra, **client,
        )
        event = f"{self.protocolName}.{event}"
        if failure is not None:
            self.logFailure(event, line, failure, **fields)
        elif level == "error":
            self.logError(event, line, **fields)
        elif level == "warn":
            self.logWarning(event, line, **fields)
        else:
            self.logInfo(event, line, **fields)


def _uidsField(envelope, uniqueIds):
    """
    The log line's unique ids, one per recipient in the order of its
    C{to=} field, C{-} for a recipient that got none (refused for its
    quota, say): read side by side, each id names its recipient.
    """
    return ",".join(uniqueIds.get(address, "-") for address in envelope.recipients)


class LMTPServer(SMTPServer):
    """
    LMTP (RFC 2033): what differs from SMTP.  LHLO instead of EHLO, and
    after DATA one reply per accepted recipient, in RCPT order, so one
    recipient's failure does not fail the others.
    """

    protocolName = "lmtp"
    lmtp = True
    helloVerb = "LHLO"
    # RFC 2033 section 4.2: DATA without a successful RCPT MUST fail 503.
    noRecipientsCode = 503
    # The client is the site's own MTA handing over what it accepted (a
    # list's message for fifty members, twenty of whom have left; spam
    # for unknown users, message after message over one cached
    # connection): its refused recipients are answered, not held against
    # it, and neither is the DATA it pipelined behind them when all were
    # refused.  Counted, they closed the connection with 421 in the middle
    # of a transaction, deferring its good recipients.
    countRefusedRecipients = False
    # Nor are the RSETs around its transactions: Postfix ends one whose
    # recipients were all refused with RSET before it caches the
    # connection, and probes the connection with RSET before it reuses it.
    # Counted as junk, a flood for unknown users (a dictionary attack
    # Postfix took for a domain it has no user list for) reached the limit
    # after some 60 messages over one connection, as would its address
    # verification (MAIL, RCPT and the RSET its documentation says ends a
    # probe) asking about each address of such an attack; where the 421 came after the 250 to
    # a probe (an odd count of errors since the last delivery), Postfix
    # read it as the reply to the next message's MAIL and deferred that
    # message to its queue's next retry, however good.  A recipient looked
    # up is work the client asked for; a client that only sends NOOP,
    # RSET or LHLO is still closed after 120 of them.
    lookupForgivesJunk = True
    # The MTA hands over what its smtpd took: Postfix's takes a non-ASCII
    # sender (or recipient) from a client that did not say SMTPUTF8
    # (strict_smtputf8 = no, its default) and passes it on by LMTP
    # without SMTPUTF8, as it detects none for mail from smtpd
    # (smtputf8_autodetect_classes).  Refused with 553 5.6.7, such mail
    # bounced after Postfix had accepted it; Dovecot's LMTP takes it too.
    takesUnannouncedUTF8 = True
    # A sender RFC 5321 does not allow (<a@b@example.net>, fetchmail's
    # sender taken from a "From: undisclosed-recipients:;" header) is
    # taken as <>, as Dovecot's LMTP takes it (mail_path_allow_broken):
    # this is final delivery, no bounce goes back to it, and refused the
    # message was never delivered (fetchmail left it on the old server and
    # tried again at every poll; an MTA bounced it to its postmaster).
    # Nothing of the broken text reaches the message; the log line names it.
    takesBrokenSender = True

    def smtp_LHLO(self, argument):
        return self._hello(argument, True)

    def smtp_EHLO(self, argument):
        return self._bad(500, "5.5.1", "this is an LMTP server: use LHLO")

    smtp_HELO = smtp_EHLO

    def _dataReplies(self, envelope, code, enhanced, text):
        for named in namedRecipients(envelope):
            self._reply(code, enhanced, f"<{named}> {text}")
        return None

    def _acknowledge(self, results, envelope):
        uniqueIds = {}
        gone = []
        # Each reply names its recipient as the RCPT did (an alias, a
        # detail), not the user's address it is: the text reaches the
        # sender in a bounce.
        for address, named in zip(envelope.recipients, namedRecipients(envelope)):
            result = results.get(address)
            if isinstance(result, NoSuchUser) or result is None:
                gone.append(address)
                self._reply(550, "5.1.1", f"<{named}> no such user here")
            elif isinstance(result, SMTPReply):
                self._reply(result.code, result.enhanced, result.text)
            elif isinstance(result, AlreadyDelivered):
                uniqueIds[address] = result
                self._reply(250, "2.0.0", f"<{named}> already delivered as {result}")
            else:
                uniqueIds[address] = result
                self._reply(250, "2.0.0", f"<{named}> delivered as {result}")
        # Each recipient's reply names its message's unique id: so does
        # the log line, for matching it with the MTA's (and it names the
        # recipients refused for their quota, and those refused 550 5.1.1
        # because they were deleted since RCPT).
        full = [a for a in envelope.recipients if isinstance(results.get(a), MailboxFull)]
        tail = f" uids={_uidsField(envelope, uniqueIds)}"
        if full:
            tail += f" full={','.join(full)}"
        extra = {}
        if gone:
            tail += f" gone={','.join(gone)}"
            extra["gone"] = gone
        again = [a for a in envelope.recipients if isinstance(results.get(a), AlreadyDelivered)]
        if again:
            tail += f" duplicate={','.join(again)}"
            extra["duplicates"] = again
        # As SMTP's line: the client (the MTA) the message came from, or
        # the one its XFORWARD named and the MTA.
        who, fields = self._clientText(envelope.forwarded)
        tail += f" {who}"
        self._logDelivery(envelope, tail, uniqueIds=uniqueIds, full=full, **extra, **fields)
