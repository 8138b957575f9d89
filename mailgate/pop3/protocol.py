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

The session machinery (framing with a line limit, the pipelined command
queue, back-pressure, the idle timer, admission, shutdown) is
L{mailgate.session.CommandSession}'s.  What is here is POP3: the states and
which commands each permits, the replies, CAPA and QUIT, and the one log
line that ends a session.  The commands live beside it, by state:
L{mailgate.pop3.authorization} and L{mailgate.pop3.transaction}; long
responses are built by L{mailgate.pop3.responses}.
"""

import os
import secrets
import time

from twisted.internet import defer

from mailgate import __version__
from mailgate.pop3.arguments import noArguments
from mailgate.pop3.authorization import (
    AUTHORIZATION,
    PLAINTEXT_REFUSED,
    TRANSACTION,
    UPDATE,
    AuthorizationCommands,
    unavailable,
)
from mailgate.pop3.deletions import DeletionMarks
from mailgate.pop3.transaction import TransactionCommands
from mailgate.session import CommandError, CommandSession
from mailgate.timers import cancelled
from mailgate.tls import isSecure, negotiated

__all__ = ["AUTHORIZATION", "TRANSACTION", "UPDATE", "PLAINTEXT_REFUSED", "POP3Server"]

class POP3Server(AuthorizationCommands, TransactionCommands, CommandSession):
    """
    One POP3 session.

    Limits are class attributes (the factory may override them per
    listener), named for what they bound; see also L{CommandSession}'s.

    @cvar maxCommandLength: octets in a command line, CRLF included
        (RFC 2449 section 4 allows 255).
    @cvar maxResponseLength: octets in a SASL response line, which may be
        longer than a command (RFC 5034 section 4), and in an initial
        response on the AUTH line; no line is ever buffered beyond this
        (a bearer token's mechanism allows more, see L{lineLimit}).
    @cvar maxQueuedCommands: pipelined commands held before the server
        stops reading from the connection.
    @cvar maxBadCommands: unknown, malformed or out-of-state commands in
        a row (a +OK starts the count again) tolerated before the session
        is closed.
    @cvar maxAuthFailures: failed logins before the session is closed.
    @cvar idleTimeout: seconds of silence before autologout (RFC 1939
        requires at least ten minutes).
    @cvar loginTimeout: seconds from the greeting to a completed login; a
        client still in the AUTHORIZATION state then is told so and
        disconnected, whatever it sent meanwhile, so that connections that
        never log in cannot be held open by a CAPA now and then (Dovecot's
        login processes allow three minutes).  C{0} or C{None}: no limit.
    @cvar authFailureDelay: seconds before a failed login is answered; the
        same for an unknown user as for a wrong password.
    @cvar listBatch: lines of LIST produced per write.
    @cvar uidlBatch: unique ids read from the store per trip (and written
        per write) for UIDL.
    @cvar clientWorkarounds: the names of Dovecot's C{pop3_client_workarounds}
        RETR and TOP apply (L{mailgate.pop3.workarounds}); none: messages go
        out as stored.
    @cvar commandStates: the commands each state permits; a command of
        another state is refused (and counted as a bad command).
    """

    protocolName = "pop3"
    commandPrefix = "pop3_"
    maxCommandLength = 255
    maxResponseLength = 4096
    maxQueuedCommands = 64
    maxBadCommands = 20
    maxAuthFailures = 3
    idleTimeout = 600
    loginTimeout = 180
    authFailureDelay = 1.0
    listBatch = 1000
    uidlBatch = 5000
    clientWorkarounds = ()
    invalidCharacters = "invalid characters in command line"
    invalidUTF8 = "command line is not valid UTF-8"
    #: what a load balancer's POP3 health check sends (HAProxy's tcp-check:
    #: the greeting, then QUIT), besides nothing at all; see
    #: L{CommandSession.healthCheck}
    healthCheckCommands = frozenset(["CAPA", "QUIT"])

    commandStates = {
        AUTHORIZATION: frozenset("USER PASS APOP AUTH STLS CAPA QUIT XCLIENT".split()),
        TRANSACTION: frozenset("STAT LIST RETR DELE NOOP RSET TOP UIDL CAPA QUIT".split()),
        UPDATE: frozenset(),
    }

    #: the master user (its name) who logged in as the session's user
    #: (L{mailgate.auth.credentials.MasterCredentials}), or C{None}: every
    #: line the session logs from then on names it, beside the user
    #: (L{CommandSession.userFields})
    master = None

    def __init__(self):
        super().__init__()
        self.state = AUTHORIZATION
        self.challenge = None
        self._pendingUser = None
        self._trustedPeer = None
        self._authFailures = 0
        self._heldFailure = None
        self._maildrop = None
        self._logout = None
        self._deleted = DeletionMarks()
        self._count = 0
        self._octets = 0
        self._sasl = None
        self._saslFinishing = False
        self._finishingMechanism = None
        # The bearer-token mechanism whose error challenge awaits the
        # client's reply before the -ERR (see _refuseLogin), or None.
        self._saslFailing = None
        # Why the session is to end before the shutdown would end it
        # (L{_endEarly}): its -ERR and its logout reason, or None.
        self._endRequest = None
        # QUIT's removal while it is being written (L{_update})
        self._updating = None
        self._loginTimer = None
        self._greeted = 0.0
        self._stats = {"retr": 0, "retrBytes": 0, "top": 0, "deleted": 0}
        # The session's pop3.logout line has been written (it logged in):
        # it has no pop3.disconnect line then.
        self._loggedOut = False

    # -- the session core's hooks ------------------------------------------

    def greet(self):
        decided = self.factory.apopDecided()
        if decided is not None:
            # At start: the greeting says whether APOP is offered, which
            # the store tells; commands sent meanwhile wait their turn.
            return decided.addCallback(lambda _: None if self._closed else self._greet())
        self._greet()
        return None

    def _greet(self):
        greeting = f"{self.factory.greeting}"
        if self.factory.xclientNetworks and self.factory.acceptsXCLIENT(self.connectedPeer):
            # Dovecot's POP3 proxy sends XCLIENT to a server whose
            # greeting begins so (and to no other).
            greeting = f"[XCLIENT] {greeting}"
        if self.factory.offersAPOP():
            self.challenge = self._makeChallenge()
            greeting += " " + self.challenge
        self._ok(greeting)
        if self.loginTimeout:
            self._greeted = self._elapsed()
            self._loginTimer = self._clock.callLater(self.loginTimeout, self._loginTimedOut)

    def _loginTimedOut(self):
        self._loginTimer = None
        if self._closed or self.state != AUTHORIZATION:
            return
        # Due early when the wall clock, which the reactor's timers run on,
        # stepped forward: the rest of the time is still the client's.
        left = self.loginTimeout - (self._elapsed() - self._greeted)
        if left > 0:
            self._loginTimer = self._clock.callLater(left, self._loginTimedOut)
            return
        self.factory.metrics.timedOut("pop3", "login")
        self._ending("login timeout")
        self.logInfo(
            "pop3.login_timeout",
            f"pop3 login timeout peer={self.peerText} seconds={self.loginTimeout:g}",
            seconds=self.loginTimeout,
        )
        unit = "second" if self.loginTimeout == 1 else "seconds"
        self._err(f"no login within {self.loginTimeout:g} {unit}; closing the connection")
        # A login under way (its answer from the store still to come) finds
        # the session closed and gives the maildrop back.  A client that
        # does not read is not waited for.
        self.close(abort=self._outputPaused)

    def _cancelLoginTimer(self):
        self._loginTimer = cancelled(self._loginTimer)

    def _makeChallenge(self):
        """
        The APOP timestamp: RFC 1939's C{<process-ID.clock@hostname>},
        plus random digits so that no two greetings ever share one.
        """
        return (
            f"<{os.getpid()}.{time.time_ns()}.{secrets.token_hex(4)}"
            f"@{self.factory.hostname}>"
        )

    def refusal(self, reason):
        # A banned address is told so: its failed logins got it banned,
        # which a client taking the reply for one more failed login (as
        # fetchmail does) reports rightly.  Anything else passes.
        self._err("[SYS/TEMP] banned" if reason == "banned" else unavailable(reason))

    def syntaxError(self, text):
        return self._bad(text)

    def lineLimit(self, start=b""):
        if self._inSASL:
            return self._responseLimit(self._sasl)
        limit = self._authLineLimit(start)
        return self.maxCommandLength if limit is None else limit

    def _responseLimit(self, mechanism):
        """
        The longest SASL response line of C{mechanism}: a bearer token's is
        longer than others (oauth.MAX_TOKEN).
        """
        return max(self.maxResponseLength, getattr(mechanism, "maxResponseLength", 0))

    def _authLineLimit(self, start):
        """
        The longest line of an AUTH command with an initial response, or
        C{None} if C{start} (a line's first octets) begins none: its
        mechanism's longest response, and the command before it.

        RFC 5034 asks clients to send a response that would take the
        command past 255 octets after the server's C{+} instead, but
        Jakarta (Angus) Mail, and so FairEmail, send every initial response
        on the AUTH line unless told not to (XOAUTH2's holds a bearer
        token, a kilobyte or more), as Perl's Net::POP3::XOAuth2 does.
        Dovecot and Gmail take them.  Refused as a command line too long,
        every such client failed to log in with a bearer token.
        """
        sasl = self.factory.sasl
        if sasl is None or self.state != AUTHORIZATION:
            return None
        verb, _, rest = start.partition(b" ")
        if verb.upper() != b"AUTH":
            return None
        argument = rest.lstrip(b" ")
        name, space, _ = argument.partition(b" ")
        if not space or not name.isascii():
            return None
        mechanism = sasl.create(name.decode("ascii").upper())
        if mechanism is None:
            return None
        return len(start) - len(argument) + len(name) + 1 + self._responseLimit(mechanism)

    def lineTooLong(self):
        if self._inSASL:
            return self._saslTooLong()
        self._countOther()
        if self._authLineLimit(self.longLineStart) is not None:
            # An initial response longer than any of its mechanism's.
            return self._bad("[AUTH] SASL response too long")
        return self._bad(f"command line too long (the limit is {self.maxCommandLength} octets)")

    def _countOther(self):
        """
        Count a command line that names no command of RFC 1939, 2449 or
        5034 as C{OTHER} (C{mailgate_pop3_commands_total}): an unknown
        verb, and as much a line refused before its verb is looked up (too
        long, control characters, not UTF-8, a verb that is not ASCII),
        which a scanner's garbage is.  A SASL response is no command.
        """
        self.factory.metrics.pop3Command("OTHER")

    def unreadableLine(self, reason):
        self._countOther()
        return self.syntaxError(reason)

    def lineReceived(self, line):
        if self.stopping and self.state == AUTHORIZATION:
            # Pipelined behind a login the stop let finish (and fail): not
            # run, or a scanner's queue of guesses would hold the stop.
            self._shutdownNow()
            return None
        if self._inSASL:
            return self._saslResponse(line)
        return CommandSession.lineReceived(self, line)

    def dispatch(self, verb, argument):
        handler = getattr(self, "pop3_" + verb, None)
        if handler is None:
            return self.unknownCommand(verb)
        self.factory.metrics.pop3Command(verb)
        if verb not in self.commandStates[self.state]:
            raise CommandError(f"{verb} is not valid in the {self.state} state")
        return handler(argument)

    def unknownCommand(self, verb):
        self._countOther()
        if not verb:
            return self._bad("empty command line")
        return self._bad("unknown command")

    def tooManyBadCommands(self):
        self._err("too many bad commands; closing the connection")
        self._endSession("too many bad commands")

    def foreignLineRefused(self, why):
        # Counted as a line that names no POP3 command, as any is.  The
        # reply names no part of the line: nothing the client sent comes
        # back to it (a browser shows what it reads).
        self._countOther()
        self._err("this is a POP3 server, and that line is no POP3 command; closing the connection")
        self._endSession("forbidden command")

    def internalError(self):
        self._err(unavailable("internal server error"))

    def idleTimedOut(self, stalled):
        if not stalled:
            self._err("autologout: idle for too long")
        self._endSession("idle timeout")

    def sessionEnded(self):
        self._cancelLoginTimer()
        self.endPenalty()
        self._settleHeldFailure()
        updating = self._updating
        if updating is not None and not updating.called:
            # QUIT's removal is being written: its own end releases the
            # lock once it is done.  Released now, the next session could
            # snapshot the messages it is taking away.  (It logged in: its
            # logout line is written.)
            done = defer.Deferred()
            updating.addBoth(lambda result: (done.callback(None), result)[1])
            return done
        if self._logout is None and not self._saslFinishing:
            # Nothing to release (QUIT released it, or there was no
            # login): nothing for the core to wait for either.
            self._logDisconnect()
            return None
        # (TLS failed, when a corrupt record ended it.)
        released = self._endSession(self._endReason or "connection lost")
        self._logDisconnect()
        return released

    def beginShutdown(self):
        """
        A session not logged in has nothing to finish: it is told at once,
        so that idle connections do not hold the shutdown for the whole
        grace period.  A login under way is answered first: one that
        succeeds has logged in (its login counts for C{--login-delay}) and
        gets the grace period to QUIT as the others logged in; one that
        fails is then told (L{idleWhileStopping}), without waiting out
        the rest of its failure delay (C{--auth-failure-delay} may be
        longer than the grace); one waiting out its penalty is not checked,
        and is told at once (a scanner in its penalty would hold the stop
        for up to C{--auth-penalty-max} seconds).
        """
        if self.state != AUTHORIZATION:
            return
        if self._busy:
            self.endPenalty()
            return
        self._shutdownNow()

    def idleWhileStopping(self):
        if self.state == AUTHORIZATION:
            self._shutdownNow()

    def shutdownNow(self, stalled):
        # Closed without applying deletions: only QUIT applies them.
        reply, reason = self._endRequest or (unavailable("server shutting down"), "shutdown")
        if not stalled:
            self._err(reply)
        self._endSession(reason)

    # -- output ------------------------------------------------------------

    def _ok(self, text=""):
        # Bad commands close the session only one after the other, as
        # Dovecot counts them: a long session's occasional unknown command
        # (an old client's LAST or XTND) is not held against it forever.
        # A +OK written without this method (CAPA's, a listing's, RETR's
        # and TOP's) forgives them too.
        self._badCommands = 0
        self._out.write(b"+OK " + text.encode("utf-8") + b"\r\n" if text else b"+OK\r\n")

    def _err(self, text):
        self._out.write(b"-ERR " + text.encode("utf-8") + b"\r\n")

    def _bad(self, reason):
        self._err(reason)
        self.countBadCommand()
        return None

    # -- the end of a session ------------------------------------------------

    def _endSession(self, why, loggedIn=True):
        """
        Release the maildrop (and its lock) exactly once.

        @param loggedIn: the session had logged in (its end is the
            C{pop3.logout} line); not for a login abandoned at SASL's last
            step, which has its own line.  C{why} is also the reason of the
            C{pop3.disconnect} line of a session that did not log in.

        @return: a L{Deferred} that fires once the lock is released (at
            once for locks held in this process; after the database has
            confirmed it for locks shared between nodes).
        """
        self._ending(why)
        if self._saslFinishing:
            # Ended (the connection lost, the login timeout, a shutdown)
            # before the client took SASL's last message: it never logged
            # in, and no logout line says it did.
            return self._loginAbandoned(why)
        logout, self._logout = self._logout, None
        if logout is None:
            return defer.succeed(None)
        maildrop, self._maildrop = self._maildrop, None
        released = defer.maybeDeferred(logout).addErrback(self._releaseFailed)
        if not loggedIn:
            return released
        # One line per session, at its end, written while a lock held in
        # the database is being released.  The text is made here, in one
        # piece, and the fields go along for structured observers.
        fields = dict(
            user=maildrop.address if maildrop is not None else None,
            master=f" master={self.master}" if self.master is not None else "",
            peer=self.peerText,
            reason=why,
            messages=len(maildrop.sizes) if maildrop is not None else 0,
            **self._stats,
        )
        tlsText, tlsFields = negotiated(self.transport)
        line = (
            "pop3 logout user={user}{master} peer={peer} reason={reason!r} messages={messages} "
            "retr={retr}/{retrBytes} top={top} deleted={deleted}"
        ).format(**fields) + tlsText
        # As a field, the master user's name alone (logContext adds it).
        del fields["master"]
        self.logInfo("pop3.logout", line, **fields, **tlsFields)
        self._loggedOut = True
        return released

    def _logDisconnect(self):
        """
        One line at the end of every admitted session that did not log in
        (one that did has its C{pop3.logout} line), as Dovecot's
        C{pop3-login: Disconnected (...)} and mailgate's SMTP end line:
        why it ended, the failed logins, whether TLS was on, how long it
        lasted.  A scanner or a password guesser that never logs in is
        seen to go, and how.  No user name: one that did not log in may be
        a password typed in the wrong field (its C{auth.failed} lines have
        what may be logged of it).  Not for a connection refused as it came
        (its C{session.refused} line, one a minute per address, says so),
        nor for a load balancer's health check (L{healthCheck}: every login
        tried begins with a command no check sends).
        """
        if self._loggedOut or self._admittedAt is None or self.healthCheck():
            return
        self._loggedOut = True
        why = self._endReason or "connection lost"
        tls = isSecure(self.transport)
        tlsText, tlsFields = negotiated(self.transport)
        seconds = self.sessionSeconds()

        def write():
            line = (
                f"pop3 disconnect peer={self.peerText} reason={why!r} auth_failed={self._authFailures} "
                f"tls={'yes' if tls else 'no'}{tlsText} seconds={seconds:.3f}"
            )
            self.logInfo(
                "pop3.disconnect", line, reason=why, authFailed=self._authFailures, tls=tls, seconds=seconds,
                **tlsFields,
            )

        if self._checking and self._closed:
            # Gone (reset by the client) while its password is hashed: the
            # line counts that login once its answer is in, as it would
            # after a close the session waited out, never after its
            # auth.failed line.  Bounded, and never waited for by the
            # shutdown (L{SessionTracker.holdEndLine}).
            self._writeAfterCheck(write)
        else:
            write()

    #: seconds the end line of a session gone while its password is hashed
    #: waits for the check's answer at most (L{_logDisconnect})
    endLineWait = 10.0

    def _writeAfterCheck(self, write):
        tracker = self.factory.tracker

        def once():
            if self._endLine is not once:
                return
            self._endLine = None
            cancelled(timer)
            tracker.releaseEndLine(once)
            write()

        timer = self._clock.callLater(self.endLineWait, once)
        self._endLine = once
        tracker.holdEndLine(once)

    def _kicked(self):
        """
        The administrator ended the session (C{mailgate kick}; the maildrop
        was told how, at login): it ends the way the shutdown's grace
        ends it, through the core (after the command under way if that
        waits on the store, at once otherwise), without the UPDATE state,
        so nothing marked deleted is deleted, and the maildrop's lock is
        released.  A session already applying a QUIT is left to finish.
        """
        if self._endRequest is None:
            self._endEarly("[SYS/TEMP] session ended by the administrator", "kicked by the administrator")

    def _lockLost(self):
        """
        The maildrop's lock was lost under the session (its connection to
        a shared database ended; see L{IMaildrop.sessionStarted}): another
        node may have the maildrop now, so the snapshot may list messages
        gone and the deletions could never be applied.  Ended as a kick
        ends it (after the command under way if that waits on the store),
        without the UPDATE state, so that the client logs in afresh rather
        than hear "try again" for ever.  A session already applying a QUIT
        is left to its guard, which refuses the deletions.
        """
        # It says more than a kick would: it replaces one asked for.
        self._endEarly("[SYS/TEMP] the maildrop lock was lost; log in again", "maildrop lock lost")

    def _endEarly(self, reply, reason):
        """
        End a session in its TRANSACTION state with C{reply} (an -ERR's
        text) and C{reason} (its logout line's), after the command under
        way if that waits on the store, at once otherwise, without the
        UPDATE state.  A session already applying a QUIT is left to finish.
        """
        if self._closed or self.state != TRANSACTION:
            return
        self._endRequest = (reply, reason)
        if self._busy and not (self._streaming or self._outputPaused):
            self._expireAfterCommand = True
            return
        self._shutdownNow()

    def _releaseFailed(self, failure):
        self.logFailure("pop3.release_failed", f"pop3 releasing the maildrop lock failed {self.whoText()}", failure)

    # -- commands of both states -------------------------------------------

    def pop3_CAPA(self, argument):
        """
        RFC 2449: the capabilities.  Those of the AUTHORIZATION state are
        announced in both states (section 5), though USER and AUTH are
        refused after login; STLS only where it can be used (RFC 2595
        registers it for both states, but no client can use it after
        login, and Dovecot leaves it out there too).

        IMPLEMENTATION (mailgate's name and version) only after login,
        as GNU pop3d shows it (IANA's registry of RFC 2449's capabilities
        announces it in the TRANSACTION state or both; Dovecot shows
        none): before, anyone who connected read the exact version,
        whatever a C{--greeting} keeping the software's name out of the
        greeting said, and a scanner knew which release's flaws to try.
        """
        noArguments(argument)
        lines = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        plaintext = self._plaintextAllowed()
        if (
            self.state == AUTHORIZATION
            and self.factory.tls is not None
            and not isSecure(self.transport)
        ):
            lines.append("STLS")
        if plaintext:
            lines.append("USER")
        if self.factory.sasl is not None:
            lines.append("SASL " + " ".join(self.factory.sasl.mechanisms(plaintext)))
        lines.extend(self.factory.extraCapabilities(self._maildrop))
        if self.state != AUTHORIZATION:
            lines.append(f"IMPLEMENTATION mailgate-{__version__}")
        body = "".join(line + "\r\n" for line in lines)
        self._badCommands = 0
        self._out.write(f"+OK capability list follows\r\n{body}.\r\n".encode("ascii"))

    def pop3_QUIT(self, argument):
        noArguments(argument)
        if self.state == AUTHORIZATION:
            self._ending("quit")
            self._ok("mailgate POP3 server signing off")
            self.close()
            return None
        return self._update()
