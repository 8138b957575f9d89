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
storage failures into permanent 550 replies.  Here:

  - Input is taken from the buffer one command at a time, so a mode switch
    (DATA) takes effect exactly where it happens in the byte stream.
  - Commands run one after another; one waiting on the store (RCPT, the end
    of DATA) holds the rest back, and replies come in order (PIPELINING).
  - Every reply carries an RFC 3463 enhanced status code.
  - The 250 after DATA is sent only once the store has committed the
    message; a storage failure is a 451, never a 5xx.
"""

import re

from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger

from mailgate.errors import NoSuchUser, TemporaryFailure
from mailgate.message import MessageSpool
from mailgate.smtp.data import DataReader
from mailgate.smtp.envelope import Envelope, SMTPReply, traceHeaders
from mailgate.session import IdleTimer, ReplyWriter, setNoDelay
from mailgate.smtp.syntax import EnvelopeSyntaxError, parseCommandPath
from mailgate.tls import isSecure

_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_SIZE = re.compile(r"^[0-9]{1,20}$")


class SMTPServer(Protocol):
    """
    One SMTP session.

    @cvar maxCommandLength: octets in a command line, CRLF included
        (RFC 5321 section 4.5.3.1.4).
    @cvar maxLineLength: octets in a line of message text, CRLF included
        (RFC 5321 section 4.5.3.1.6).
    @cvar maxRecipients: recipients per transaction (RFC 5321 requires at
        least 100 to be accepted).
    @cvar maxMessageSize: octets of message content, advertised as SIZE.
    @cvar maxBadCommands: errors tolerated before the session is closed.
    @cvar idleTimeout: seconds of silence before the session is closed
        (RFC 5321 section 4.5.3.2.7: at least five minutes).
    @cvar maxBufferedInput: octets of pipelined input held while a command
        waits, before the server stops reading from the connection.
    """

    lmtp = False
    helloVerb = "EHLO"
    maxCommandLength = 512
    maxLineLength = 1000
    maxRecipients = 100
    maxMessageSize = 50 * 1024 * 1024
    maxBadCommands = 20
    idleTimeout = 300
    maxBufferedInput = 64 * 1024

    log = Logger()

    def __init__(self):
        self._buffer = b""
        self._discarding = False
        self._busy = False
        self._processing = False
        self._closed = False
        self._readingPaused = False
        self._helo = None
        self._esmtp = False
        self._envelope = None
        self._reader = None
        self._badCommands = 0
        self._idle = None

    # -- connection ------------------------------------------------------

    @property
    def _reactor(self):
        return self.factory.reactor

    @property
    def hostname(self):
        return self.factory.hostname

    def connectionMade(self):
        setNoDelay(self.transport)
        self._out = ReplyWriter(self)
        self._idle = IdleTimer(self._reactor, self.idleTimeout, self._timedOut, lambda: self._busy)
        kind = "LMTP" if self.lmtp else "ESMTP"
        self._send(f"220 {self.hostname} {kind} mailgate ready\r\n")
        self._idle.start()

    def connectionLost(self, reason):
        self._closed = True
        if self._idle is not None:
            self._idle.cancel()
        self._discardData()

    def _discardData(self):
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.spool.close()

    def _close(self):
        self._closed = True
        self._discardData()
        self._out.flush()
        self.transport.loseConnection()

    # -- timer -----------------------------------------------------------

    def _activity(self):
        self._idle.activity()

    def _timedOut(self):
        if self._closed:
            return
        self._reply(421, "4.4.2", f"{self.hostname} timeout exceeded, closing connection")
        self._close()

    # -- output ----------------------------------------------------------

    def _send(self, text):
        self._out.write(text.encode("utf-8"))

    def _reply(self, code, enhanced, text):
        self._send(f"{code} {enhanced} {text}\r\n")

    def _replyLines(self, code, lines):
        out = [f"{code}-{line}\r\n" for line in lines[:-1]]
        out.append(f"{code} {lines[-1]}\r\n")
        self._send("".join(out))

    def _bad(self, code, enhanced, text):
        self._reply(code, enhanced, text)
        self._badCommands += 1
        if self._badCommands >= self.maxBadCommands:
            self._reply(421, "4.7.0", f"{self.hostname} too many errors, closing connection")
            self._close()
        return None

    # -- input -----------------------------------------------------------

    def dataReceived(self, data):
        if self._closed:
            return
        self._activity()
        if self._discarding:
            newline = data.find(b"\n")
            if newline < 0:
                return
            data = data[newline + 1:]
            self._discarding = False
        self._buffer = self._buffer + data if self._buffer else data
        self._process()

    def _process(self):
        if self._processing:
            return
        self._processing = True
        try:
            # The replies to pipelined commands leave in one write.
            with self._out.holding():
                self._processBuffer()
        finally:
            self._processing = False
        self._flowControl()

    def _processBuffer(self):
        while not self._busy and not self._closed and self._buffer:
            if self._reader is not None:
                data, self._buffer = self._buffer, b""
                rest = self._reader.feed(data)
                if rest is None:
                    break
                self._buffer = rest
                self._run(self._guarded(self._dataEnded))
                continue
            newline = self._buffer.find(b"\n")
            if newline < 0:
                if len(self._buffer) >= self.maxCommandLength:
                    self._buffer = b""
                    self._discarding = True
                    self._bad(500, "5.5.2", f"line too long (the limit is {self.maxCommandLength} octets)")
                break
            line, self._buffer = self._buffer[:newline], self._buffer[newline + 1:]
            if len(line) + 1 > self.maxCommandLength:
                self._bad(500, "5.5.2", f"line too long (the limit is {self.maxCommandLength} octets)")
                continue
            if line.endswith(b"\r"):
                line = line[:-1]
            self._run(self._guarded(self._dispatch, line))

    @staticmethod
    def _guarded(function, *args):
        """
        Run a command; a bug in it costs the client one 451, not its
        session (the failure is logged by L{_internalError}).
        """
        try:
            return function(*args)
        except Exception:
            return defer.fail()

    def _run(self, result):
        if isinstance(result, defer.Deferred):
            self._busy = True
            result.addErrback(self._internalError)
            result.addBoth(self._commandDone)

    def _commandDone(self, _):
        self._busy = False
        if not self._closed:
            self._activity()
            self._process()

    def _flowControl(self):
        if self._closed:
            return
        if self._busy and len(self._buffer) > self.maxBufferedInput and not self._readingPaused:
            self._readingPaused = True
            self.transport.pauseProducing()
        elif self._readingPaused and not self._busy:
            self._readingPaused = False
            self.transport.resumeProducing()

    def _internalError(self, failure):
        self.log.failure("smtp command failed", failure)
        if not self._closed:
            self._reply(451, "4.3.0", "internal server error; try again later")
        return None

    def _dispatch(self, line):
        if _CONTROL.search(line):
            return self._bad(500, "5.5.2", "invalid characters in command")
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            return self._bad(500, "5.5.2", "command is not valid UTF-8")
        verb, _, argument = text.partition(" ")
        handler = self._commands.get(verb.upper())
        if handler is None:
            return self._bad(500, "5.5.2", "command not recognized")
        return handler(self, argument)

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
        ]
        if self.factory.tls is not None and not isSecure(self.transport):
            extensions.append("STARTTLS")
        return extensions + list(self.factory.extraExtensions(self))

    def _hello(self, argument, esmtp):
        name = argument.strip()
        if not name or " " in name or len(name) > 255:
            return self._bad(501, "5.5.4", f"syntax: {'EHLO' if esmtp else 'HELO'} hostname")
        self._helo = name
        self._esmtp = esmtp
        self._envelope = None
        greeting = f"{self.hostname} greets {name}"
        if esmtp:
            self._replyLines(250, [greeting] + self.extensions())
        else:
            self._send(f"250 {greeting}\r\n")
        return None

    def smtp_EHLO(self, argument):
        return self._hello(argument, True)

    def smtp_HELO(self, argument):
        return self._hello(argument, False)

    def smtp_LHLO(self, argument):
        return self._bad(500, "5.5.1", "LHLO is for LMTP; this is SMTP")

    def smtp_NOOP(self, argument):
        self._reply(250, "2.0.0", "OK")

    def smtp_RSET(self, argument):
        if argument.strip():
            return self._bad(501, "5.5.4", "RSET takes no arguments")
        self._envelope = None
        self._reply(250, "2.0.0", "OK")

    def smtp_QUIT(self, argument):
        self._reply(221, "2.0.0", f"{self.hostname} closing connection")
        self._close()

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
        self._buffer = b""
        self._discarding = False
        self._helo = None
        self._esmtp = False
        self._envelope = None
        # The reply goes out in the clear, before the handshake.
        self._out.flush()
        self.transport.startTLS(self.factory.tls)
        return None

    def smtp_VRFY(self, argument):
        # Never confirm or deny that an address exists.
        self._reply(252, "2.5.0", "cannot VRFY user; send some mail and it will be delivered if possible")

    def smtp_EXPN(self, argument):
        return self._bad(502, "5.5.1", "EXPN is not supported")

    def smtp_HELP(self, argument):
        self._reply(214, "2.0.0", "mailgate: see RFC 5321 (SMTP) and RFC 2033 (LMTP)")

    # -- the mail transaction --------------------------------------------

    def _protocolName(self):
        """
        The "with" of the Received field (RFC 3848).
        """
        secure = "S" if isSecure(self.transport) else ""
        if self.lmtp:
            return "LMTP" + secure
        return ("ESMTP" + secure) if self._esmtp else "SMTP"

    def smtp_MAIL(self, argument):
        if self._helo is None:
            return self._bad(503, "5.5.1", f"send {self.helloVerb} first")
        if self._envelope is not None:
            return self._bad(503, "5.5.1", "nested MAIL command")
        try:
            sender, parameters = parseCommandPath(argument, "FROM", allowEmpty=True)
        except EnvelopeSyntaxError as e:
            return self._bad(501, "5.1.7", f"bad sender address syntax: {e}")
        if parameters and not self._esmtp:
            return self._bad(555, "5.5.4", "MAIL parameters need EHLO")
        for keyword, value in parameters.items():
            if keyword == "SIZE":
                if value is None or not _SIZE.match(value):
                    return self._bad(501, "5.5.4", "SIZE needs a number")
                if int(value) > self.maxMessageSize:
                    return self._bad(
                        552, "5.3.4", f"message size exceeds the limit of {self.maxMessageSize} octets"
                    )
            elif keyword == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    return self._bad(501, "5.5.4", "BODY must be 7BIT or 8BITMIME")
            elif keyword == "SMTPUTF8":
                if value is not None:
                    return self._bad(501, "5.5.4", "SMTPUTF8 takes no value")
            else:
                return self._bad(555, "5.5.4", f"unsupported MAIL parameter {keyword}")
        self._envelope = Envelope(
            helo=self._helo,
            peer=self.transport.getPeer(),
            protocol=self._protocolName(),
            sender=sender,
            parameters=parameters,
            utf8="SMTPUTF8" in parameters,
        )
        self._reply(250, "2.1.0", f"sender <{sender}> OK")
        return None

    def smtp_RCPT(self, argument):
        envelope = self._envelope
        if envelope is None:
            return self._bad(503, "5.5.1", "need MAIL command first")
        try:
            mailbox, parameters = parseCommandPath(argument, "TO", allowEmpty=False, utf8=envelope.utf8)
        except EnvelopeSyntaxError as e:
            return self._bad(501, "5.1.3", f"bad recipient address syntax: {e}")
        if parameters:
            return self._bad(555, "5.5.4", f"unsupported RCPT parameter {next(iter(parameters))}")
        if len(envelope.recipients) >= self.maxRecipients:
            self._reply(452, "4.5.3", f"too many recipients (the limit is {self.maxRecipients})")
            return None
        declared = envelope.parameters.get("SIZE")
        d = self.factory.delivery.checkRecipient(mailbox, int(declared) if declared else None)

        def accepted(address):
            if self._envelope is envelope:
                envelope.recipients.append(address)
            self._reply(250, "2.1.5", f"recipient <{mailbox}> OK")

        def refused(failure):
            if failure.check(SMTPReply):
                reply = failure.value
                self._bad(reply.code, reply.enhanced, reply.text)
            elif failure.check(TemporaryFailure):
                self.log.warn("smtp recipient lookup failed: {reason}", reason=failure.value)
                self._reply(451, "4.3.0", "temporary failure looking up the recipient; try again later")
            else:
                self.log.failure("smtp recipient check failed", failure)
                self._reply(451, "4.3.0", "internal error checking the recipient; try again later")

        d.addCallbacks(accepted, refused)
        return d

    def smtp_DATA(self, argument):
        if argument.strip():
            return self._bad(501, "5.5.4", "DATA takes no arguments")
        envelope = self._envelope
        if envelope is None:
            return self._bad(503, "5.5.1", "need MAIL command first")
        if not envelope.recipients:
            return self._bad(554, "5.5.1", "no valid recipients")
        spool = MessageSpool()
        spool.writeLines(traceHeaders(envelope, self.hostname))
        self._reader = DataReader(spool, self.maxMessageSize, self.maxLineLength)
        self._send("354 End data with <CR><LF>.<CR><LF>\r\n")
        return None

    def _dataEnded(self):
        """
        The end of the data: refuse it, or commit it and answer once the
        store has made it durable.
        """
        reader, self._reader = self._reader, None
        envelope, self._envelope = self._envelope, None
        if reader.tooLarge:
            reader.spool.close()
            return self._dataReplies(
                envelope, 552, "5.3.4", f"message size exceeds the limit of {self.maxMessageSize} octets"
            )
        if reader.lineTooLong:
            reader.spool.close()
            return self._dataReplies(
                envelope, 500, "5.5.2", f"line too long (the limit is {self.maxLineLength} octets)"
            )
        if reader.storageFailed:
            self.log.error("smtp cannot spool message data (is the temporary directory full?)")
            return self._dataReplies(
                envelope, 452, "4.3.1", "insufficient system storage; try again later"
            )
        spool = reader.spool.finish()
        d = self.factory.delivery.deliver(envelope, spool, partial=self.lmtp)
        d.addCallbacks(self._delivered, self._deliveryFailed, callbackArgs=(envelope,), errbackArgs=(envelope,))
        d.addBoth(lambda _: spool.close())
        return d

    def _dataReplies(self, envelope, code, enhanced, text):
        self._reply(code, enhanced, text)
        return None

    def _delivered(self, results, envelope):
        self._reply(250, "2.0.0", f"OK: message accepted as {envelope.transactionId}")
        self._logDelivery("smtp", envelope, peer=getattr(envelope.peer, "host", envelope.peer))

    def _logDelivery(self, protocol, envelope, **extra):
        """
        One line per delivered message.  The text is made here in one
        piece (Twisted's formatting of many fields costs more than the
        rest of a small delivery's logging); the fields go along for
        structured observers.
        """
        fields = dict(
            id=envelope.transactionId,
            sender=envelope.sender,
            recipients=",".join(envelope.recipients),
            **extra,
        )
        line = f"{protocol} delivered id={fields['id']} from=<{fields['sender']}> to={fields['recipients']}"
        if "peer" in extra:
            line += f" peer={extra['peer']}"
        self.log.info("{line}", line=line, **fields)

    def _deliveryFailed(self, failure, envelope):
        if failure.check(SMTPReply):
            reply = failure.value
            return self._dataReplies(envelope, reply.code, reply.enhanced, reply.text)
        if failure.check(NoSuchUser):
            self.log.warn("smtp recipient vanished before commit: {reason}", reason=failure.value)
            text = "a recipient no longer exists; try again"
        elif failure.check(TemporaryFailure):
            self.log.warn("smtp delivery failed: {reason}", reason=failure.value)
            text = "temporary failure storing the message; try again later"
        else:
            self.log.failure("smtp delivery failed", failure)
            text = "internal error storing the message; try again later"
        self._dataReplies(envelope, 451, "4.3.0", text)

    _commands = {
        "EHLO": smtp_EHLO,
        "HELO": smtp_HELO,
        "LHLO": smtp_LHLO,
        "MAIL": smtp_MAIL,
        "RCPT": smtp_RCPT,
        "DATA": smtp_DATA,
        "RSET": smtp_RSET,
        "NOOP": smtp_NOOP,
        "QUIT": smtp_QUIT,
        "STARTTLS": smtp_STARTTLS,
        "VRFY": smtp_VRFY,
        "EXPN": smtp_EXPN,
        "HELP": smtp_HELP,
    }


class LMTPServer(SMTPServer):
    """
    LMTP (RFC 2033): LHLO instead of EHLO, and after DATA one reply per
    accepted recipient, in RCPT order, so one recipient's failure does not
    fail the others.
    """

    lmtp = True
    helloVerb = "LHLO"

    def smtp_LHLO(self, argument):
        return self._hello(argument, True)

    def smtp_EHLO(self, argument):
        return self._bad(500, "5.5.1", "this is an LMTP server: use LHLO")

    smtp_HELO = smtp_EHLO

    def _dataReplies(self, envelope, code, enhanced, text):
        for address in envelope.recipients:
            self._reply(code, enhanced, f"<{address}> {text}")
        return None

    def _delivered(self, results, envelope):
        for address in envelope.recipients:
            result = results.get(address)
            if isinstance(result, NoSuchUser) or result is None:
                self._reply(550, "5.1.1", f"<{address}> no such user here")
            elif isinstance(result, SMTPReply):
                self._reply(result.code, result.enhanced, result.text)
            else:
                self._reply(250, "2.0.0", f"<{address}> delivered as {result}")
        self._logDelivery("lmtp", envelope)

    _commands = dict(
        SMTPServer._commands,
        LHLO=smtp_LHLO,
        EHLO=smtp_EHLO,
        HELO=smtp_HELO,
    )
