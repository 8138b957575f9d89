# -*- test-case-name: tests.test_pop3_protocol -*-
"""
The POP3 server protocol: RFC 1939 with CAPA, RESP-CODES and
AUTH-RESP-CODE (RFC 2449, RFC 3206).

mailgate does not reuse C{twisted.mail.pop3.POP3}: on Python 3 its APOP never
succeeds, it dot-stuffs per chunk, doubles stored CRs, hangs when a message
cannot be read, drops the connection on C{DELE abc}, lets a session log in
twice, lists deleted messages, answers QUIT before its deletions ran and
advertises C{PIPELINE}.  This protocol keeps the same building blocks (a
cred portal, the reactor, producers) and gets those right.

Design:
  - Input is split into lines here, with a hard limit per line, so a client
    cannot make the server buffer an endless line.
  - Commands run strictly one after another.  A command that waits on the
    store (login, RETR, QUIT...) holds the queue; pipelined commands wait
    their turn and get their answers in order.  When too many are queued,
    the server stops reading from the socket until it catches up.
  - Storage is reached only through the L{IMaildrop} avatar the portal
    returns; this module never sees SQL.
"""

import base64
import binascii
import os
import re
import secrets
import time
from collections import deque

from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.cred.credentials import UsernamePassword
from twisted.internet import defer, task
from twisted.internet.protocol import Protocol
from twisted.logger import Logger

from mailgate import __version__
from mailgate.auth.credentials import APOPCredentials
from mailgate.auth.sasl import Challenge, SASLError
from mailgate.errors import LoginDelayed, MaildropInUse, TemporaryFailure
from mailgate.interfaces import IMaildrop
from mailgate.pop3.dotstuff import DotStuffer
from mailgate.pop3.sender import BlockSender, SendAborted
from mailgate.session import IdleTimer, ReplyWriter, setNoDelay
from mailgate.tls import isSecure

AUTHORIZATION = "AUTHORIZATION"
TRANSACTION = "TRANSACTION"
UPDATE = "UPDATE"

_TOO_LONG = object()
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_DIGITS = re.compile(r"^[0-9]{1,10}$")
_APOP_DIGEST = re.compile(r"^[0-9A-Fa-f]{32}$")

ALL_COMMANDS = frozenset(
    "USER PASS APOP AUTH STLS CAPA QUIT STAT LIST RETR DELE NOOP RSET TOP UIDL".split()
)

PLAINTEXT_REFUSED = (
    "[AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections"
)


class _CommandError(Exception):
    """
    Raised by argument parsing: its text goes back as the C{-ERR} reason.
    """


class POP3Server(Protocol):
    """
    One POP3 session.

    Limits are class attributes (the factory may override them per
    listener), named for what they bound:

    @cvar maxCommandLength: octets in a command line, CRLF included
        (RFC 2449 section 4 allows 255).
    @cvar maxResponseLength: octets in a SASL response line, which may be
        longer than a command (RFC 5034 section 4); no line is ever buffered
        beyond this.
    @cvar maxQueuedCommands: pipelined commands held before the server
        stops reading from the connection.
    @cvar maxBadCommands: unknown, malformed or out-of-state commands
        tolerated before the session is closed.
    @cvar maxAuthFailures: failed logins before the session is closed.
    @cvar idleTimeout: seconds of silence before autologout (RFC 1939
        requires at least ten minutes).
    @cvar authFailureDelay: seconds before a failed login is answered; the
        same for an unknown user as for a wrong password.
    @cvar listBatch: lines of LIST produced per write.
    @cvar uidlBatch: unique ids read from the store per trip (and written
        per write) for UIDL.
    """

    maxCommandLength = 255
    maxResponseLength = 4096
    maxQueuedCommands = 64
    maxBadCommands = 20
    maxAuthFailures = 3
    idleTimeout = 600
    authFailureDelay = 1.0
    listBatch = 1000
    uidlBatch = 5000

    log = Logger()

    def __init__(self):
        self.state = AUTHORIZATION
        self._buffer = b""
        self._discarding = False
        self._lines = deque()
        self._busy = False
        self._processing = False
        self._readingPaused = False
        self._closed = False
        self._idle = None
        self._sending = False
        self._badCommands = 0
        self._authFailures = 0
        self._user = None
        self.challenge = None
        self._maildrop = None
        self._logout = None
        self._deleted = set()
        self._count = 0
        self._octets = 0
        self._sasl = None
        self._saslFinishing = False
        self._stats = {"retr": 0, "retrBytes": 0, "top": 0, "deleted": 0}

    # -- connection ------------------------------------------------------

    @property
    def _reactor(self):
        return self.factory.reactor

    def connectionMade(self):
        setNoDelay(self.transport)
        self._out = ReplyWriter(self)
        self._idle = IdleTimer(
            self._reactor, self.idleTimeout, self._timedOut, lambda: self._busy and not self._sending
        )
        self._trustedPeer = None
        greeting = f"{self.factory.greeting}"
        if self.factory.offersAPOP():
            self.challenge = self._makeChallenge()
            greeting += " " + self.challenge
        self._ok(greeting)
        self._idle.start()

    def _makeChallenge(self):
        """
        The APOP timestamp: RFC 1939's C{<process-ID.clock@hostname>},
        plus random digits so that no two greetings ever share one.
        """
        return (
            f"<{os.getpid()}.{time.time_ns()}.{secrets.token_hex(4)}"
            f"@{self.factory.hostname}>"
        )

    def connectionLost(self, reason):
        self._closed = True
        self._cancelTimeout()
        self._lines.clear()
        self._endSession("connection lost")

    @property
    def peer(self):
        """
        The client's address.  Read from the transport when needed, not at
        connection time: behind a PROXY-protocol listener the client's real
        address is only known once the PROXY header has been read.
        """
        return self.transport.getPeer()

    def _endSession(self, why):
        """
        Release the maildrop (and its lock) exactly once.

        @return: a L{Deferred} that fires once the lock is released (at
            once for locks held in this process; after the database has
            confirmed it for locks shared between nodes).
        """
        logout, self._logout = self._logout, None
        if logout is None:
            return defer.succeed(None)
        maildrop, self._maildrop = self._maildrop, None
        released = defer.maybeDeferred(logout).addErrback(self._releaseFailed)
        # One line per session, at its end, written while a lock held in
        # the database is being released.  Logging is not free (Twisted's
        # file observer formats and flushes every event): the text is made
        # here, in one piece, and the fields go along for structured
        # observers.
        fields = dict(
            user=maildrop.address if maildrop is not None else None,
            peer=_describe(self.peer),
            why=why,
            messages=len(maildrop.sizes) if maildrop is not None else 0,
            **self._stats,
        )
        line = (
            "pop3 logout user={user} peer={peer} reason={why!r} messages={messages} "
            "retr={retr}/{retrBytes} top={top} deleted={deleted}"
        ).format(**fields)
        self.log.info("{line}", line=line, **fields)
        return released

    def _releaseFailed(self, failure):
        self.log.failure("releasing the maildrop lock failed", failure)

    def _close(self):
        self._closed = True
        self._cancelTimeout()
        self._out.flush()
        self.transport.loseConnection()

    # -- idle timer ------------------------------------------------------

    def _activity(self):
        self._idle.activity()

    def _cancelTimeout(self):
        if self._idle is not None:
            self._idle.cancel()

    def _timedOut(self):
        if self._closed:
            return
        if not self._sending:
            self._err("autologout: idle for too long")
        self._endSession("idle timeout")
        self._close()
        if self._sending:
            # The client stopped reading a response: nothing more can be
            # written in order, so drop the connection outright.
            self._out.flush()
            self.transport.abortConnection()

    def _kicked(self):
        """
        The administrator ended the session (C{mailgate kick}): it closes
        without the UPDATE state, so nothing marked deleted is deleted,
        and the maildrop's lock is released.
        """
        if self._closed or self.state == UPDATE:
            return
        if not self._sending:
            self._err("[SYS/TEMP] session ended by the administrator")
        self._endSession("kicked")
        self._close()
        if self._sending:
            self.transport.abortConnection()

    # -- input -----------------------------------------------------------

    def dataReceived(self, data):
        if self._closed:
            return
        self._activity()
        self._splitLines(data)
        self._processLines()

    def _splitLines(self, data):
        """
        Cut input into lines.  A line longer than L{maxCommandLength} is
        dropped as it arrives (never buffered) and queued as a marker so its
        error reply takes its turn among pipelined commands.
        """
        if self._discarding:
            end = data.find(b"\n")
            if end < 0:
                return
            data = data[end + 1:]
            self._discarding = False
            self._lines.append(_TOO_LONG)
        buffer = self._buffer + data if self._buffer else data
        parts = buffer.split(b"\n")
        rest = parts.pop()
        limit = self.maxResponseLength
        for part in parts:
            if len(part) + 1 > limit:
                self._lines.append(_TOO_LONG)
            else:
                self._lines.append(part[:-1] if part.endswith(b"\r") else part)
        if len(rest) >= limit:
            self._buffer = b""
            self._discarding = True
        else:
            self._buffer = rest
        if len(self._lines) > self.maxQueuedCommands and not self._readingPaused:
            self._readingPaused = True
            self.transport.pauseProducing()

    def _processLines(self):
        if self._processing:
            return
        self._processing = True
        try:
            # The replies to pipelined commands leave in one write.
            with self._out.holding():
                while self._lines and not self._busy and not self._closed:
                    line = self._lines.popleft()
                    try:
                        result = self._dispatch(line)
                    except Exception:
                        # A bug must cost the client one -ERR, not its session.
                        result = defer.fail()
                    if isinstance(result, defer.Deferred):
                        self._busy = True
                        result.addErrback(self._internalError)
                        result.addBoth(self._commandDone)
        finally:
            self._processing = False
        if self._readingPaused and not self._closed and len(self._lines) < self.maxQueuedCommands // 2:
            self._readingPaused = False
            self.transport.resumeProducing()

    def _commandDone(self, _):
        self._busy = False
        if not self._closed:
            self._activity()
            self._processLines()

    def _internalError(self, failure):
        if failure.check(SendAborted):
            return None
        self.log.failure("pop3 command failed", failure)
        if not self._closed:
            self._err("[SYS/TEMP] internal server error")
        return None

    # -- dispatch --------------------------------------------------------

    def _dispatch(self, line):
        if self._sasl is not None or self._saslFinishing:
            return self._saslResponse(line)
        if line is _TOO_LONG or len(line) + 2 > self.maxCommandLength:
            return self._bad(f"command line too long (the limit is {self.maxCommandLength} octets)")
        if _CONTROL.search(line):
            return self._bad("invalid characters in command line")
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            return self._bad("command line is not valid UTF-8")
        keyword, _, argument = text.partition(" ")
        keyword = keyword.upper()
        handler = self._handlers[self.state].get(keyword)
        if handler is None:
            if keyword in ALL_COMMANDS:
                return self._bad(f"{keyword} is not valid in the {self.state} state")
            if not keyword:
                return self._bad("empty command line")
            return self._bad("unknown command")
        try:
            return handler(self, argument)
        except _CommandError as e:
            return self._bad(str(e))

    def _bad(self, reason):
        self._err(reason)
        self._badCommands += 1
        if self._badCommands >= self.maxBadCommands:
            self._err("too many bad commands; closing the connection")
            self._endSession("too many bad commands")
            self._close()
        return None

    # -- output ----------------------------------------------------------

    def _ok(self, text=""):
        self._out.write(b"+OK " + text.encode("utf-8") + b"\r\n" if text else b"+OK\r\n")

    def _err(self, text):
        self._out.write(b"-ERR " + text.encode("utf-8") + b"\r\n")

    # -- arguments -------------------------------------------------------

    @staticmethod
    def _noArguments(argument):
        if argument.strip():
            raise _CommandError("this command takes no arguments")

    def _number(self, text, what="message number"):
        if not _DIGITS.match(text):
            raise _CommandError(f"invalid {what}: {text[:20]!r}" if text else f"missing {what}")
        return int(text)

    def _messageIndex(self, text):
        """
        Parse a message number and check it names a message of this session
        that is not marked deleted.  Returns the 0-based index.
        """
        number = self._number(text.strip())
        if not 1 <= number <= len(self._maildrop.sizes):
            raise _CommandError(f"no such message: {number}")
        index = number - 1
        if index in self._deleted:
            raise _CommandError(f"message {number} is deleted")
        return index

    def _arguments(self, argument, count, names):
        parts = argument.split()
        if len(parts) != count or argument != " ".join(parts):
            raise _CommandError(f"expected: {names}")
        return parts

    # -- AUTHORIZATION state ---------------------------------------------

    def _plaintextAllowed(self):
        """
        Plaintext passwords (USER/PASS, AUTH PLAIN) are accepted only over
        TLS or from a trusted network, as Dovecot does by default.
        """
        if self._trustedPeer is None:
            self._trustedPeer = self.factory.isTrusted(self.peer)
        return self._trustedPeer or isSecure(self.transport)

    def do_USER(self, argument):
        if not self._plaintextAllowed():
            return self._bad(PLAINTEXT_REFUSED)
        name = argument.strip()
        if not name:
            raise _CommandError("USER needs a user name")
        self._user = name
        self._ok("send PASS")

    def do_PASS(self, argument):
        if not self._plaintextAllowed():
            return self._bad(PLAINTEXT_REFUSED)
        if self._user is None:
            raise _CommandError("send USER first")
        user, self._user = self._user, None
        credentials = UsernamePassword(user.encode("utf-8"), argument.encode("utf-8"))
        return self._login(credentials, user)

    def do_APOP(self, argument):
        if self.challenge is None:
            raise _CommandError("APOP is not available on this server")
        name, _, digest = argument.rpartition(" ")
        if not name.strip() or not _APOP_DIGEST.match(digest):
            raise _CommandError("expected: APOP name digest (32 hex digits)")
        credentials = APOPCredentials(
            self.challenge.encode("ascii"), name.strip().encode("utf-8"), digest.encode("ascii")
        )
        return self._login(credentials, name.strip())

    def _login(self, credentials, user):
        d = self.factory.portal.login(credentials, None, IMaildrop)
        d.addCallbacks(self._loggedIn, self._loginFailed, callbackArgs=(user,), errbackArgs=(user,))
        return d

    def _loggedIn(self, result, user):
        _, maildrop, logout = result
        mechanism, self._sasl = self._sasl, None
        if self._closed:
            logout()
            return
        self._maildrop = maildrop
        self._logout = logout
        data = mechanism.successData() if mechanism is not None else None
        if data:
            # SASL "additional data with success" (RFC 5034 section 4): a
            # last challenge, answered by an empty line, then +OK.
            self._saslFinishing = True
            self._out.write(b"+ " + base64.b64encode(data) + b"\r\n")
            return
        self._enterTransaction()

    def _enterTransaction(self):
        maildrop = self._maildrop
        self._deleted = set()
        self._count = len(maildrop.sizes)
        self._octets = sum(maildrop.sizes)
        self.state = TRANSACTION
        # The store learns who the session is (the client's address goes
        # with what it deletes) and how to end it (mailgate kick).
        started = getattr(maildrop, "sessionStarted", None)
        if started is not None:
            started(_describe(self.peer), self._kicked)
        self._ok(f"{maildrop.address} has {self._count} messages ({self._octets} octets)")

    def _loginFailed(self, failure, user):
        self._sasl = None
        if failure.check(UnauthorizedLogin, UnhandledCredentials):
            self._authFailures += 1
            self.log.info(
                "pop3 authentication failed user={user!r} peer={peer}",
                user=user[:64],
                peer=_describe(self.peer),
            )
            return task.deferLater(self._reactor, self.authFailureDelay, self._refuseLogin)
        if failure.check(MaildropInUse):
            self._err("[IN-USE] maildrop is locked by another POP3 session")
        elif failure.check(LoginDelayed):
            self._err(f"[LOGIN-DELAY] {failure.value}")
        elif failure.check(TemporaryFailure):
            self.log.warn("pop3 login of {user!r}: {reason}", user=user[:64], reason=failure.value)
            self._err("[SYS/TEMP] the mail store is unavailable; try again later")
        else:
            self.log.failure("pop3 login of {user!r} failed", failure, user=user[:64])
            self._err("[SYS/TEMP] internal server error")
        return None

    def _refuseLogin(self):
        if self._closed:
            return
        self._err("[AUTH] invalid user name or password")
        if self._authFailures >= self.maxAuthFailures:
            self._err("too many failed logins; closing the connection")
            self._close()

    def do_CAPA(self, argument):
        self._noArguments(argument)
        lines = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self.state == AUTHORIZATION:
            plaintext = self._plaintextAllowed()
            if self.factory.tls is not None and not isSecure(self.transport):
                lines.append("STLS")
            if plaintext:
                lines.append("USER")
            if self.factory.sasl is not None:
                lines.append("SASL " + " ".join(self.factory.sasl.mechanisms(plaintext)))
        lines.extend(self.factory.extraCapabilities(self._maildrop))
        lines.append(f"IMPLEMENTATION mailgate-{__version__}")
        body = "".join(line + "\r\n" for line in lines)
        self._out.write(f"+OK capability list follows\r\n{body}.\r\n".encode("ascii"))

    def do_STLS(self, argument):
        """
        RFC 2595: switch to TLS.  Whatever the client sent after STLS in
        the same packet is discarded, never run after the handshake as if
        it had been protected (the STARTTLS injection attack).
        """
        self._noArguments(argument)
        if self.factory.tls is None:
            raise _CommandError("STLS is not available on this server")
        if isSecure(self.transport):
            raise _CommandError("already using TLS")
        self._ok("begin TLS negotiation")
        self._lines.clear()
        self._buffer = b""
        self._discarding = False
        self._user = None
        # The reply goes out in the clear, before the handshake.
        self._out.flush()
        self.transport.startTLS(self.factory.tls)
        return None

    def do_AUTH(self, argument):
        """
        RFC 5034 SASL authentication.  Without a mechanism, lists the
        mechanisms (the older RFC 1734 form some clients still use).
        """
        sasl = self.factory.sasl
        if sasl is None:
            raise _CommandError("AUTH is not available on this server")
        plaintext = self._plaintextAllowed()
        if not argument.strip():
            names = sasl.mechanisms(plaintext)
            body = "".join(name + "\r\n" for name in names)
            self._out.write(f"+OK\r\n{body}.\r\n".encode("ascii"))
            return None
        name, _, initial = argument.partition(" ")
        name = name.upper()
        mechanism = sasl.create(name)
        if mechanism is None:
            raise _CommandError(f"unsupported authentication mechanism {name[:20]!r}")
        if mechanism.plaintext and not plaintext:
            return self._bad(PLAINTEXT_REFUSED)
        data = None
        if initial:
            data = self._decodeSASL(initial.encode("ascii", "replace"))
            if data is None:
                return None
        self._sasl = mechanism
        return self._saslStep(mechanism.start, data)

    def _decodeSASL(self, line):
        if line == b"=":
            return b""
        try:
            return base64.b64decode(line, validate=True)
        except (binascii.Error, ValueError):
            self._sasl = None
            self._bad("[AUTH] invalid base64 data")
            return None

    def _saslResponse(self, line):
        if line is _TOO_LONG:
            self._sasl = None
            self._abandonSASL()
            return self._bad("[AUTH] SASL response too long")
        if self._saslFinishing:
            self._saslFinishing = False
            if line == b"":
                self._enterTransaction()
            else:
                self._endSession("authentication cancelled")
                self._err("[AUTH] authentication cancelled")
            return None
        if line == b"*":
            self._sasl = None
            self._err("authentication cancelled")
            return None
        data = self._decodeSASL(line)
        if data is None:
            return None
        return self._saslStep(self._sasl.step, data)

    def _abandonSASL(self):
        self._saslFinishing = False
        self._endSession("authentication abandoned")

    def _saslStep(self, step, data):
        d = defer.maybeDeferred(step, data)

        def next(result):
            if isinstance(result, Challenge):
                self._out.write(b"+ " + base64.b64encode(result.data) + b"\r\n")
                return None
            name = getattr(result.credentials, "username", b"")
            name = name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
            return self._login(result.credentials, name)

        def failed(failure):
            self._sasl = None
            if failure.check(SASLError):
                return self._bad(f"[AUTH] {failure.value}")
            return self._loginFailed(failure, "(sasl)")

        return d.addCallbacks(next, failed)

    def do_QUIT(self, argument):
        self._noArguments(argument)
        if self.state == AUTHORIZATION:
            self._ok("mailgate POP3 server signing off")
            self._close()
            return None
        return self._update()

    # -- TRANSACTION state -----------------------------------------------

    def do_STAT(self, argument):
        self._noArguments(argument)
        self._ok(f"{self._count} {self._octets}")

    def do_NOOP(self, argument):
        self._noArguments(argument)
        self._ok()

    def do_RSET(self, argument):
        self._noArguments(argument)
        self._deleted.clear()
        self._count = len(self._maildrop.sizes)
        self._octets = sum(self._maildrop.sizes)
        self._ok(f"maildrop has {self._count} messages ({self._octets} octets)")

    def do_DELE(self, argument):
        index = self._messageIndex(argument)
        self._deleted.add(index)
        self._count -= 1
        self._octets -= self._maildrop.sizes[index]
        self._ok(f"message {index + 1} deleted")

    def do_LIST(self, argument):
        if argument:
            index = self._messageIndex(argument)
            self._ok(f"{index + 1} {self._maildrop.sizes[index]}")
            return None
        sizes = self._maildrop.sizes
        deleted = self._deleted
        batch = self.listBatch
        status = f"+OK {self._count} messages ({self._octets} octets)\r\n".encode("ascii")
        if len(sizes) <= batch:
            # The usual case: the whole listing in one write.
            lines = [b"%d %d\r\n" % (i + 1, size) for i, size in enumerate(sizes) if i not in deleted]
            self._out.write(status + b"".join(lines) + b".\r\n")
            return None
        self._out.write(status)
        positions = iter(range(0, len(sizes), batch))

        def nextBlock():
            for start in positions:
                lines = [
                    b"%d %d\r\n" % (i + 1, sizes[i])
                    for i in range(start, min(start + batch, len(sizes)))
                    if i not in deleted
                ]
                if lines:
                    return b"".join(lines)
            return _END

        return self._send(_terminated(nextBlock))

    def do_UIDL(self, argument):
        if argument:
            index = self._messageIndex(argument)
            d = self._maildrop.uniqueIds(index, 1)
            d.addCallback(lambda ids: self._ok(f"{index + 1} {ids[0]}"))
            d.addErrback(self._storeError, "unique id")
            return d
        total = len(self._maildrop.sizes)
        deleted = self._deleted
        batch = self.uidlBatch
        positions = iter(range(0, total, batch))

        def format(ids, start):
            return b"".join(
                b"%d %s\r\n" % (start + offset + 1, uid.encode("ascii"))
                for offset, uid in enumerate(ids)
                if start + offset not in deleted
            )

        def nextBlock():
            start = next(positions, None)
            if start is None:
                return _END
            return self._maildrop.uniqueIds(start, min(batch, total - start)).addCallback(format, start)

        # Read the first batch before answering +OK, so a store failure
        # can still be reported as -ERR.
        first = nextBlock()
        if first is _END:
            self._ok("unique-id listing follows")
            self._out.write(b".\r\n")
            return None

        def begin(block):
            status = b"+OK unique-id listing follows\r\n"
            if total <= batch:
                self._out.write(status + block + b".\r\n")
                return None
            self._out.write(status + block)
            return self._send(_terminated(nextBlock))

        first.addCallback(begin)
        first.addErrback(self._storeError, "unique ids")
        return first

    def do_RETR(self, argument):
        index = self._messageIndex(argument)
        return self._sendMessage(index, None)

    def do_TOP(self, argument):
        number, lines = self._arguments(argument, 2, "TOP message-number lines")
        index = self._messageIndex(number)
        count = self._number(lines, "line count")
        return self._sendMessage(index, count)

    def _sendMessage(self, index, bodyLines):
        d = self._maildrop.openMessage(index, headerOnly=bodyLines == 0)

        def opened(body):
            if self._closed:
                return None
            if bodyLines is None:
                self._stats["retr"] += 1
                self._stats["retrBytes"] += body.size
                status = b"+OK %d octets\r\n" % body.size
            else:
                self._stats["top"] += 1
                status = b"+OK top of message follows\r\n"
            source = _MessageBlocks(body, bodyLines)
            whole = source.whole()
            if whole is not None:
                # The message (or all TOP wants of it) came in one piece:
                # one write, no producer.
                self._out.write(status + whole)
                return None
            self._out.write(status)
            return self._send(source.nextBlock).addErrback(self._streamBroken, index)

        d.addCallbacks(opened, self._storeError, errbackArgs=("message",))
        return d

    def _streamBroken(self, failure, index):
        """
        The message could not be read after +OK went out.  There is no way
        to say -ERR in the middle of a multi-line response, so the session
        ends; the client sees a truncated response, and nothing is deleted.
        """
        if failure.check(SendAborted):
            return None
        self.log.failure("pop3 reading message {n} failed mid-response", failure, n=index + 1)
        self._endSession("message read failed")
        self._out.flush()
        self.transport.abortConnection()
        self._closed = True
        return None

    def _storeError(self, failure, what):
        if failure.check(TemporaryFailure):
            self.log.warn("pop3 cannot read {what}: {reason}", what=what, reason=failure.value)
            self._err(f"[SYS/TEMP] cannot read the {what} now; try again later")
        else:
            self.log.failure("pop3 reading {what} failed", failure, what=what)
            self._err("[SYS/TEMP] internal server error")
        return None

    def _send(self, nextBlock):
        if self._closed:
            return defer.succeed(None)
        self._sending = True

        def progress(block):
            self._idle.activity()
            return block

        def source():
            block = nextBlock()
            if isinstance(block, defer.Deferred):
                return block.addCallback(progress)
            return progress(block)

        def sent(result):
            self._sending = False
            return result

        return BlockSender(self.transport, source, self._out.send).start().addBoth(sent)

    def _update(self):
        """
        QUIT in the TRANSACTION state: the UPDATE state.  Marked messages
        are removed in one transaction, and +OK goes out only once that
        transaction has committed.
        """
        self.state = UPDATE
        deleted = sorted(self._deleted)
        d = self._maildrop.expunge(deleted)

        def removed(_):
            self._stats["deleted"] = len(deleted)
            return f"+OK mailgate POP3 server signing off ({self._count} messages left)\r\n"

        def failed(failure):
            if failure.check(TemporaryFailure):
                self.log.warn("pop3 update failed: {reason}", reason=failure.value)
            else:
                self.log.failure("pop3 update failed", failure)
            return "-ERR [SYS/TEMP] could not remove the deleted messages; none were removed\r\n"

        def finish(reply):
            # The lock is released before the reply goes out, so a client
            # that logs in again (on any node) as soon as it reads +OK finds
            # the maildrop free.
            released = self._endSession("quit")

            def answer(_):
                self._out.write(reply.encode("utf-8"))
                self._close()

            return released.addBoth(answer)

        d.addCallbacks(removed, failed)
        d.addCallback(finish)
        return d

    _handlers = {
        AUTHORIZATION: {
            "USER": do_USER,
            "PASS": do_PASS,
            "APOP": do_APOP,
            "AUTH": do_AUTH,
            "STLS": do_STLS,
            "CAPA": do_CAPA,
            "QUIT": do_QUIT,
        },
        TRANSACTION: {
            "STAT": do_STAT,
            "LIST": do_LIST,
            "RETR": do_RETR,
            "DELE": do_DELE,
            "NOOP": do_NOOP,
            "RSET": do_RSET,
            "TOP": do_TOP,
            "UIDL": do_UIDL,
            "CAPA": do_CAPA,
            "QUIT": do_QUIT,
        },
        UPDATE: {},
    }


_END = None


def _terminated(nextBlock):
    """
    Wrap a block source so that the response's final "." follows its last
    block.
    """
    state = {"ended": False}

    def blocks():
        if state["ended"]:
            return _END
        block = nextBlock()
        if isinstance(block, defer.Deferred):
            return block.addCallback(lambda b: _endIfNone(b, state))
        return _endIfNone(block, state)

    return blocks


def _endIfNone(block, state):
    if block is None:
        state["ended"] = True
        return b".\r\n"
    return block


class _MessageBlocks:
    """
    A message as the blocks of a RETR or TOP response: read chunk by chunk,
    cut after the header and C{bodyLines} lines for TOP, dot-stuffed, and
    terminated.
    """

    def __init__(self, body, bodyLines):
        self._body = body
        self._stuffer = DotStuffer()
        self._headerLeft = body.headerSize
        self._linesLeft = bodyLines
        self._ended = False

    def nextBlock(self):
        if self._ended:
            return _END
        return self._body.read().addCallback(self._encode)

    def whole(self):
        """
        The entire response at once, if the body's first piece holds all
        of it (nearly every message); else C{None}, and nothing consumed.
        """
        first = getattr(self._body, "whole", None)
        if first is None:
            return None
        out = self._encode(first)
        if not self._ended:
            out += self._encode(b"")
        return out

    def _encode(self, chunk):
        done = not chunk
        if chunk and self._linesLeft is not None:
            chunk, done = self._cut(chunk)
        out = self._stuffer.stuff(chunk)
        if done:
            self._ended = True
            out += self._stuffer.terminator()
        return out

    def _cut(self, chunk):
        """
        For TOP: keep the header and then C{bodyLines} lines of the body.
        """
        keep = min(self._headerLeft, len(chunk))
        self._headerLeft -= keep
        head, rest = chunk[:keep], chunk[keep:]
        if self._headerLeft:
            return head, False
        position = 0
        while self._linesLeft and position < len(rest):
            end = rest.find(b"\n", position)
            if end < 0:
                return head + rest, False
            position = end + 1
            self._linesLeft -= 1
        return head + rest[:position], self._linesLeft == 0


def _describe(address):
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None:
        return str(address)
    return f"{host}:{port}"
