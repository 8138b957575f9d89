# -*- test-case-name: tests.test_pop3_protocol,tests.test_sasl,tests.test_pop3_policy -*-
"""
The POP3 AUTHORIZATION state: USER/PASS, APOP, AUTH (SASL, RFC 5034) and
STLS (RFC 2595), and the login every one of them ends in.

Every way in goes through L{AuthorizationCommands._login}, which asks the
connection policy first: a banned address is refused and closed before
any credential is checked, and an address (or login name) with recent
failures waits the policy's penalty before its credentials are checked;
a password then waits its turn, as only a few are hashed at once per
address.  The waits hold this session's command queue only, never the
reactor.
"""

import base64
import binascii
import ipaddress
import re

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.python.failure import Failure

from mailgate.address import loginAddress
from mailgate.auth.checkers import LoginAbandoned, abandonWhen
from mailgate.auth.credentials import (
    APOPCredentials, IMasterCredentials, SecretDigest, passwordCredentials, splitMasterLogin,
)
from mailgate.auth.oauth import IBearerTokenCredentials, OAuthBearerMechanism, XOAuth2Mechanism
from mailgate.auth.sasl import Challenge, SASLError
from mailgate.errors import InvalidAddress, LoginDelayed, MaildropInUse, NetworkRefused, TemporaryFailure, UserDisabled
from mailgate.interfaces import IMaildrop
from mailgate.pop3.arguments import noArguments
from mailgate.pop3.deletions import DeletionMarks
from mailgate.printable import printable
from mailgate.session import CommandError, CommandSession
from mailgate.session.ids import describeAddress
from mailgate.session.trace import shown as shownInTrace
from mailgate.session.trace import startTrace
from mailgate.timers import cancelled
from mailgate.tls import isSecure

AUTHORIZATION = "AUTHORIZATION"
TRANSACTION = "TRANSACTION"
UPDATE = "UPDATE"

_APOP_DIGEST = re.compile(r"^[0-9A-Fa-f]{32}$")

# Logins that prove knowledge of the APOP secret without sending it.
DIGEST_MECHANISMS = frozenset(["apop", "cram-md5"])

PLAINTEXT_REFUSED = (
    "[AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections"
)
INVALID_LOGIN = "[AUTH] invalid user name or password"


def disabledReply(reason):
    """
    The text of the C{-ERR} a disabled user gets for the right password
    (C{mailgate user disable}): as Dovecot answers a C{nologin} account,
    C{[AUTH]} (RFC 3206: the credentials are not accepted, and trying
    again will not help until the administrator does something) and the
    administrator's reason, printable and at most
    L{UserDisabled.REASON_MAX} characters; without one, Dovecot's words.
    """
    if not reason:
        return "[AUTH] Login disabled for this user"
    return "[AUTH] " + printable(" ".join(reason.split())[: UserDisabled.REASON_MAX])


#: The error challenge a failed bearer-token login gets before its -ERR
#: (RFC 7628 section 3.2.2; Google's XOAUTH2 does the same), by mechanism.
BEARER_FAILURES = {
    "oauthbearer": OAuthBearerMechanism.FAILURE,
    "xoauth2": XOAuth2Mechanism.FAILURE,
}


def unavailable(reason):
    """
    The text of a C{-ERR [SYS/TEMP]} reply that a client may get before it
    is logged in (a refused connection, a login the store could not
    answer, a stop): C{[SYS/TEMP] service temporarily unavailable:
    REASON; try again later}.

    RFC 3206's code tells a client that knows it to try again later.
    fetchmail does not read the code: it sorts an C{-ERR} before login by
    its text, and takes one without C{lock}, C{wait}, C{[IN-USE]} or
    C{[LOGIN-DELAY]} and without C{service} with C{unavailable} for an
    authorization failure.  As a daemon it then mails its user that the
    login failed, asking her to check her password, after three polls
    (ten once it has logged in), while the database was down or the
    server full.  With these words it reports a busy server and polls
    again, as it should.
    """
    return f"[SYS/TEMP] service temporarily unavailable: {reason}; try again later"


def _nothing():
    pass


class AuthorizationCommands:
    """
    The commands of the AUTHORIZATION state, for L{mailgate.pop3.POP3Server}.
    """

    #: when the login being checked was asked (the clock's seconds)
    _loginAsked = None
    #: C{(timer, Deferred)} of the penalty the login waits out
    #: (L{_waitPenalty})
    _penalty = None
    #: the policy's L{Deferred} of the turn the login's password waits
    #: for (L{_checkInTurn})
    _turn = None
    #: credentials are being checked (a password hashed), their answer
    #: not yet taken in
    _checking = False
    #: writes the end line of a session gone while its credentials were
    #: being checked, once their answer is counted (see _logDisconnect)
    _endLine = None
    #: the name of the master user whose login (to another user's
    #: maildrop) is being checked, or C{None}
    _checkingMaster = None

    def _plaintextAllowed(self):
        """
        Plaintext passwords (USER/PASS, AUTH PLAIN) are accepted only over
        TLS or from a trusted network, as Dovecot does by default.
        """
        if self._trustedPeer is None:
            self._trustedPeer = self.factory.isTrusted(self.peer)
        return self._trustedPeer or isSecure(self.transport)

    @property
    def _inSASL(self):
        return self._sasl is not None or self._saslFinishing or self._saslFailing is not None

    # -- traces --------------------------------------------------------------

    def tracedCommand(self, line):
        """
        A trace shows no password: PASS's argument, APOP's digest, AUTH's
        initial response and the client's SASL responses are hidden, also
        in commands that will be refused (a tab for a space, a NUL), and
        responses that come as commands (see
        L{CommandSession.tracedCommand}, which hides PASS and AUTH's).
        """
        if self._inSASL:
            return "<SASL response>"
        text = line.decode("utf-8", "replace")
        verb = text.lstrip()[:4].upper()
        if verb == "APOP":
            words = text.split()
            if words[0].upper() == "APOP" and len(words) == 3:
                return f"APOP {shownInTrace(words[1])} <digest>"
            return "APOP <arguments>"
        if verb == "USER" and text.split(None, 1)[0].upper() == "USER":
            # A password is what a client may send next, or on the same
            # line, in place of PASS: until a command comes, a line that is
            # none is hidden, and so is what follows the name's first word.
            self._traceHiding = "USER"
            words = text.split()
            if len(words) > 2:
                return f"USER {shownInTrace(words[1])} <more hidden>"
            return shownInTrace(text)
        return CommandSession.tracedCommand(self, line)

    def _traceIfListed(self, name, loggedIn, how=None):
        trace = self.factory.trace
        if not trace or self.traced:
            return
        # USER alice@example.org*admin (--master-user-separator) names
        # alice, as a master user's login to her maildrop: traced from it,
        # not only once it succeeded, so that a failing one shows too.
        masterLogin = None if loggedIn else self._masterLoginTarget(name)
        if trace.user(name) or (masterLogin is not None and trace.user(masterLogin)):
            if how is None:
                how = f"logged in as {name}" if loggedIn else f"USER {shownInTrace(name)}"
            startTrace(self, f"{how}, on --debug-user")

    def _masterLoginTarget(self, name):
        """
        The user a name given to C{USER} is a master user's login to
        (C{USER*MASTER}, cut as L{passwordCredentials} cuts it), or C{None}.
        """
        separator = self.factory.masterUserSeparator
        parts = splitMasterLogin(name, separator) if separator else None
        return None if parts is None else parts[0]

    # -- USER/PASS and APOP --------------------------------------------------

    def pop3_USER(self, argument):
        if not self._plaintextAllowed():
            return self._bad(PLAINTEXT_REFUSED)
        name = argument.strip()
        if not name:
            raise CommandError("USER needs a user name")
        self._traceIfListed(name, loggedIn=False)
        self._pendingUser = name
        self._ok("send PASS")

    def notUTF8(self, line):
        """
        A PASS whose password is not UTF-8 is a password all the same, its
        octets as the client sent them (C{surrogateescape} carries them to
        L{pop3_PASS}), as AUTH PLAIN's are and as Dovecot takes them: a
        client in a legacy character set (Latin-1, Windows-1252) sends its
        user's accented password so, and a hash imported from Dovecot may
        well be of those octets.  Refused as a line that is not UTF-8, such
        a user never logged in with USER/PASS, and no failed login was
        logged.  Any other command line must be UTF-8.
        """
        if line[:5].upper() == b"PASS " and self.state == AUTHORIZATION:
            self.factory.metrics.pop3Command("PASS")
            return self.pop3_PASS(line[5:].decode("utf-8", "surrogateescape"))
        return CommandSession.notUTF8(self, line)

    def pop3_PASS(self, argument):
        if not self._plaintextAllowed():
            return self._bad(PLAINTEXT_REFUSED)
        if self._pendingUser is None:
            raise CommandError("send USER first")
        user, self._pendingUser = self._pendingUser, None
        # Octets that are not UTF-8 come back as they were sent (notUTF8).
        password = argument.encode("utf-8", "surrogateescape")
        separator = self.factory.masterUserSeparator
        if separator is None:
            credentials = UsernamePassword(user.encode("utf-8"), password)
        else:
            credentials = passwordCredentials(user.encode("utf-8"), password, separator)
        return self._login(credentials, user, "user")

    def pop3_APOP(self, argument):
        if self.challenge is None:
            raise CommandError("APOP is not available on this server")
        name, _, digest = argument.rpartition(" ")
        if not name.strip() or not _APOP_DIGEST.match(digest):
            raise CommandError("expected: APOP name digest (32 hex digits)")
        credentials = APOPCredentials(
            self.challenge.encode("ascii"), name.strip().encode("utf-8"), digest.encode("ascii")
        )
        return self._login(credentials, name.strip(), "apop")

    # -- XCLIENT --------------------------------------------------------------

    def pop3_XCLIENT(self, argument):
        """
        A proxy's word on the client it relays: Dovecot's POP3 proxy, seeing
        C{[XCLIENT]} in the greeting, sends C{XCLIENT ADDR=... PORT=...
        SESSION=... TTL=...} before the login it relays.  From a proxy on
        C{--xclient-network} (as Dovecot takes it from its
        C{login_trusted_networks}), before any login, the client's address
        stands for the proxy's in what the login is checked against (bans,
        penalties, the user's and a master user's allowed networks) and in
        the session's log lines, C{mailgate who} and what it deletes.
        Whether a password may come in the clear stays the proxy's link's
        to decide (C{--trusted-network}, TLS), and the connection is still
        counted against the proxy's address.  Unknown fields are ignored,
        as Dovecot ignores them.
        """
        # Counted by how it ends (mailgate_xclient_commands_total): a
        # proxy refused for being outside --xclient-network otherwise
        # shows only in the log.
        counted = self.factory.metrics.relayCommand
        if not self.factory.acceptsXCLIENT(self.connectedPeer):
            counted(self.protocolName, "XCLIENT", "refused_network")
            raise CommandError("XCLIENT is not allowed from this address")
        if self.peer is not self.connectedPeer or self._pendingUser is not None or self._authFailures:
            counted(self.protocolName, "XCLIENT", "refused_sequence")
            raise CommandError("XCLIENT comes once, before the login")
        fields = {}
        for item in argument.split():
            name, _, value = item.partition("=")
            fields[name.upper()] = value
        address = fields.get("ADDR", "")
        try:
            # Not with a zone (fe80::1%eth0): Python takes whatever text
            # follows the "%" into the address, which becomes the session's
            # peer in the log and the policy; Dovecot's proxy never sends one.
            ip = None if "%" in address else ipaddress.ip_address(address)
            port = int(fields.get("PORT", "0"))
        except ValueError:
            ip = None
        if ip is None or not 0 <= port <= 65535:
            counted(self.protocolName, "XCLIENT", "refused_syntax")
            raise CommandError("XCLIENT needs ADDR=IP-ADDRESS (and PORT=NUMBER)")
        counted(self.protocolName, "XCLIENT", "accepted")
        proxy = self.peerText
        # The link to the proxy decides whether plaintext passwords may
        # come (a Dovecot on this machine or on a trusted network).
        self._trustedPeer = self.factory.isTrusted(self.connectedPeer)
        ip = getattr(ip, "ipv4_mapped", None) or ip
        self.peer = (IPv4Address if ip.version == 4 else IPv6Address)("TCP", str(ip), port)
        self.peerText = describeAddress(self.peer)
        session = fields.get("SESSION")
        shownSession = printable(session[:64]) if session else None
        self.logInfo(
            "pop3.xclient",
            f"pop3 xclient peer={self.peerText} proxy={proxy}"
            + (f" proxy_session={shownSession}" if shownSession else ""),
            proxy=proxy,
            proxySession=shownSession,
        )
        trace = self.factory.trace
        if trace and not self.traced and trace.peer(self.peer):
            # Behind Dovecot's proxy, the client is known from here on (as
            # SMTP's XCLIENT starts one).
            startTrace(self, "the client XCLIENT named is on --debug-peer")
        self._ok("the client's address is taken")

    # -- STLS ----------------------------------------------------------------

    def pop3_STLS(self, argument):
        """
        RFC 2595: switch to TLS.  Whatever the client sent after STLS in
        the same packet is discarded, never run after the handshake as if
        it had been protected (the STARTTLS injection attack).
        """
        noArguments(argument)
        if self.factory.tls is None:
            raise CommandError("STLS is not available on this server")
        if isSecure(self.transport):
            raise CommandError("already using TLS")
        self._ok("begin TLS negotiation")
        self._pendingUser = None
        self.startTLS(self.factory.tls)
        return None

    # -- AUTH ----------------------------------------------------------------

    def pop3_AUTH(self, argument):
        """
        RFC 5034 SASL authentication.  Without a mechanism, lists the
        mechanisms (the older RFC 1734 form some clients still use).
        """
        sasl = self.factory.sasl
        if sasl is None:
            raise CommandError("AUTH is not available on this server")
        # A failure the exchange itself reports is no master user's.
        self._checkingMaster = None
        plaintext = self._plaintextAllowed()
        if not argument.strip():
            names = sasl.mechanisms(plaintext)
            body = "".join(name + "\r\n" for name in names)
            self._badCommands = 0
            self._out.write(f"+OK\r\n{body}.\r\n".encode("ascii"))
            return None
        # Spaces around the mechanism and the initial response are
        # forgiven, as around other commands' arguments (and as Dovecot
        # forgives them): "AUTH PLAIN <response> " logs in.  A space inside
        # the response is still not base64.
        name, _, initial = argument.strip(" ").partition(" ")
        initial = initial.strip(" ")
        # Mechanism names are ASCII (RFC 4422): upper-cased over Unicode,
        # "\u017fCRAM-SHA-256" (a long s) would name SCRAM-SHA-256.
        name = name.upper() if name.isascii() else name
        mechanism = sasl.create(name)
        if mechanism is None:
            raise CommandError(f"unsupported authentication mechanism {ascii(name[:20])}")
        if mechanism.plaintext and not plaintext:
            return self._bad(PLAINTEXT_REFUSED)
        data = None
        if initial:
            data = self._decodeSASL(initial.encode("ascii", "replace"), initial=True)
            if data is None:
                return None
        self._sasl = mechanism
        return self._saslStep(mechanism.start, data)

    def _decodeSASL(self, line, initial=False):
        """
        A client's base64 data, or C{None} once the exchange is refused.
        C{=} is the empty initial response (RFC 5034 section 4) and
        nothing else: an empty response to a challenge is an empty line,
        and C{=} there is not base64, which the server MUST refuse (as
        Dovecot does), not take for an empty response (LOGIN took it for
        an empty password, a failed login after the failure delay).
        """
        if initial and line == b"=":
            return b""
        try:
            return base64.b64decode(line, validate=True)
        except (binascii.Error, ValueError):
            self._sasl = None
            self._bad("[AUTH] invalid base64 data")
            return None

    def _saslResponse(self, line):
        """
        A line while a SASL exchange is under way: the client's response.
        """
        if self._saslFailing is not None:
            # The client's answer to a bearer token's error challenge
            # (OAUTHBEARER's ^A, XOAUTH2's empty line, or anything else, a
            # "*" too): the login has failed, and now it is told so.
            self._saslFailing = None
            return self._refuseLogin()
        if self._saslFinishing:
            self._saslFinishing = False
            if line == b"":
                self._loginCompleted(self._finishingMechanism)
                self._enterTransaction()
                return None
            released = self._loginAbandoned("authentication cancelled")
            return self._refuseOnceReleased(released, "[AUTH] authentication cancelled")
        if line == b"*":
            # Counted as a bad command: an exchange begun and cancelled
            # again and again (SCRAM's first message looks the user up in
            # the database) is no failed login, so neither the penalty
            # nor the failed-login limit would ever end it.
            self._sasl = None
            return self._bad("authentication cancelled")
        data = self._decodeSASL(line)
        if data is None:
            return None
        return self._saslStep(self._sasl.step, data)

    def _saslTooLong(self):
        self._sasl = None
        if self._saslFailing is not None:
            # The answer to a bearer token's error challenge, however long:
            # the login has failed, and now it is told so (left waiting,
            # the session took the client's next command for the answer).
            self._saslFailing = None
            return self._refuseLogin()
        if self._saslFinishing:
            self._saslFinishing = False
            released = self._loginAbandoned("authentication abandoned")
            return self._refuseOnceReleased(released, "[AUTH] SASL response too long", bad=True)
        return self._bad("[AUTH] SASL response too long")

    def _refuseOnceReleased(self, released, reason, bad=False):
        """
        Answer C{-ERR reason} once the maildrop a login took at SASL's last
        step is released: RFC 1939 section 4 has the lock released before
        the command is refused, and a client that logs in again as soon as
        it reads the refusal (the maildrop's lock held in the database,
        shared between nodes) must not find it still in use.  The command
        queue waits meanwhile.

        @param bad: count the refusal as a bad command.
        """
        def refuse(_):
            if self._closed:
                return
            if bad:
                self._bad(reason)
            else:
                self._err(reason)

        return released.addCallback(refuse)

    def _saslStep(self, step, data):
        mechanism = self._sasl
        d = defer.maybeDeferred(step, data)

        def next(result):
            if isinstance(result, Challenge):
                self._out.write(b"+ " + base64.b64encode(result.data) + b"\r\n")
                return None
            name = getattr(result.credentials, "username", b"")
            name = name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
            # The exchange named the user (a master user's login to the
            # user's maildrop too): traced from its answer, as USER is.
            self._traceIfListed(name, loggedIn=False, how=f"AUTH {mechanism.name} as {shownInTrace(name)}")
            return self._login(result.credentials, name, mechanism.name.lower())

        def failed(failure):
            self._sasl = None
            if failure.check(SASLError):
                return self._bad(f"[AUTH] {failure.value}")
            # A mechanism that looks its user up during the exchange
            # (SCRAM) knows whose login failed: the log names them.
            login = getattr(mechanism, "loginName", None) or "(sasl)"
            if login != "(sasl)":
                self._traceIfListed(login, loggedIn=False, how=f"AUTH {mechanism.name} as {shownInTrace(login)}")
            return self._loginFailed(failure, login, mechanism.name.lower())

        return d.addCallbacks(next, failed)

    # -- the login -------------------------------------------------------------

    def _login(self, credentials, login, mechanism):
        """
        Check credentials and open the maildrop, after what the connection
        policy asks: refuse a banned address outright, and hold an address
        with recent failures for its penalty before checking anything.
        """
        # (A user's own password, nearly every login, is no master's.)
        self._checkingMaster = None if type(credentials) is UsernamePassword else _masterOf(credentials)
        if self._checkingMaster is not None:
            # The master user's allowed networks are checked against it.
            credentials.peer = self.peer
        policy = self.factory.policy
        if policy.isBanned(self.peer):
            return self._refuseBanned(login, mechanism)
        delay = policy.authenticationDelay(self.peer, login)
        if delay and delay > 0:
            return self._waitPenalty(delay, self._checkInTurn, credentials, login, mechanism)
        return self._checkInTurn(credentials, login, mechanism)

    def _checkInTurn(self, credentials, login, mechanism):
        """
        Check credentials that carry a password (USER/PASS, PLAIN, LOGIN)
        in their turn: the policy lets only a few password hashes run at
        once per address (L{mailgate.policy.verifications}), and the others
        wait here, in order, their session's command queue held.  A
        client's 50 connections sending 50 different wrong passwords at
        once had 50 hashes running before its first failure was counted,
        and every other user's login waited behind them.  Digests (APOP,
        CRAM-MD5) and SCRAM's proof are checked against stored secrets,
        with no hash to run: they do not wait.

        A login whose password a recent login verified (the checker's
        cache: no hash either) waits all the same: which password is
        cached only the checker knows, and a well-behaved client has no
        other verification of its address to wait behind.
        """
        if not isinstance(credentials, UsernamePassword) or self._closed or self.stopping:
            return self._check(credentials, login, mechanism)
        turn = self.factory.policy.verificationTurn(self.peer)

        def inTurn(done):
            self._turn = None
            checked = defer.maybeDeferred(self._check, credentials, login, mechanism, done)
            # Given back as soon as the check has its answer (see _check);
            # here too, whatever happened before.
            return checked.addBoth(lambda result: (done(), result)[1])

        def givenUp(failure):
            # The session ended while it waited (endPenalty): nothing was
            # checked, nothing is answered.
            self._turn = None
            failure.trap(defer.CancelledError)
            return None

        if turn.called and not isinstance(turn.result, Failure):
            # Its turn at once (nearly every login): checked now, without
            # the turn's Deferred in the chain the command waits on.
            done, turn.result = turn.result, None
            return inTurn(done)
        self._turn = turn
        return turn.addCallbacks(inTurn, givenUp)

    def _check(self, credentials, login, mechanism, done=_nothing):
        """
        @param done: called once the portal's answer is taken in (the
            password's hash has run, a failure is counted), or at once
            when nothing is checked: the end of the verification the
            policy gave a turn to.
        """
        if self._closed or self.stopping:
            # Gone, or the server stopped while the penalty held the login
            # back: nothing has been checked, nothing is answered but the
            # shutdown's -ERR.
            done()
            return None
        if self.factory.policy.isBanned(self.peer):
            # Banned while it waited.
            done()
            return self._refuseBanned(login, mechanism)
        self._loginAsked = self._elapsed()
        if isinstance(credentials, UsernamePassword):
            # A password whose hash has not started when the session ends
            # is not hashed: no one would read the answer.
            abandonWhen(credentials, lambda: self._closed)
        self._checking = True
        # The mind is the client's address: the user's allowed networks
        # are checked against it where the maildrop is opened.
        d = self.factory.portal.login(credentials, self.peer, IMaildrop)
        # The policy recognises a password tried again (a client with an
        # old one) by a keyed digest of it: only the mechanisms that carry
        # the password itself can repeat themselves, and a bearer token's
        # (a client whose token expired, sending it at each poll: counted
        # each time, it banned its address at the tenth).
        if isinstance(credentials, UsernamePassword):
            password = credentials.password
        elif IBearerTokenCredentials.providedBy(credentials):
            password = credentials.token
        else:
            password = None
        # A digest's failure is held with the digest (L{_settleHeldFailure}).
        digest = credentials if isinstance(credentials, SecretDigest) else None
        def answered():
            self._checkAnswered(done)

        d.addCallbacks(
            _thenDone,
            _thenDone,
            callbackArgs=(self._loggedIn, answered, login, mechanism),
            errbackArgs=(self._loginFailed, answered, login, mechanism, password, digest),
        )
        return d

    def _checkAnswered(self, done):
        """
        The check's answer is taken in (a failure counted), before any
        failure delay: end its verification (C{done}), and the end line of
        a session gone meanwhile (L{_logDisconnect}) counts it now.
        """
        done()
        self._checking = False
        if self._endLine is not None:
            self._endLine()

    def _loginMetric(self, mechanism, result):
        self.factory.metrics.login(self.protocolName, mechanism, result)

    def _authFailed(self, login, mechanism, reason, text, result=None):
        """
        Count and log a refused login: the one C{auth.failed} event, whose
        C{reason} (C{failed}, C{banned}, C{in_use}, C{disabled}, C{network}
        or C{login_delay}) is
        also the metric's result unless C{result} says otherwise.
        """
        self._loginMetric(mechanism, result or reason)
        master = self._checkingMaster
        if master is not None:
            text = f"{text} (master user {master})"
            self.logInfo("auth.failed", text, user=_logName(login), mechanism=mechanism, reason=reason, master=master)
            return
        self.logInfo("auth.failed", text, user=_logName(login), mechanism=mechanism, reason=reason)

    def _refuseBanned(self, login, mechanism):
        self._sasl = None
        self._authFailed(
            login, mechanism, "banned",
            f"pop3 login refused user={_logName(login)!r} peer={self.peerText}: the address is banned",
        )
        self._closeBanned()
        return None

    def _closeBanned(self):
        if self._closed:
            return
        self._err("[SYS/TEMP] banned")
        self._endSession("banned")
        self.close()

    def _bannedWhileChecked(self, login, mechanism):
        """
        The address was banned while these credentials were being checked:
        its other sessions' failures, checked at the same time, made the
        ban.  A guesser opens as many sessions as it may and sends a
        password on each at once; answered as they come, every check in
        flight when the ban lands would be one more guess, and a right one
        would log in, banned.  So whatever the check found (a right or a
        wrong password, a maildrop in use), the answer is that the address
        is banned, as late as a wrong password's would come: no login, and
        nothing learnt.
        """
        self._sasl = None
        self._settleHeldFailure()
        self._authFailed(
            login, mechanism, "banned",
            f"pop3 login refused user={_logName(login)!r} peer={self.peerText}: "
            f"the address was banned while the login was checked",
        )
        return self._waitPenalty(self._failureDelayLeft(), self._closeBanned)

    def _loggedIn(self, result, login, mechanism):
        _, maildrop, logout = result
        if self.factory.policy.isBanned(self.peer):
            logout()
            return self._bannedWhileChecked(login, mechanism)
        sasl, self._sasl = self._sasl, None
        self._settleHeldFailure(maildrop.address)
        self.factory.policy.authenticationSucceeded(self.peer, login)
        if self._closed:
            logout()
            return
        self._maildrop = maildrop
        self._logout = logout
        self.user = maildrop.address
        master = self._checkingMaster
        if master is not None:
            self.master = master
            self.userFields = {"master": master}
        self._traceIfListed(maildrop.address, loggedIn=True)
        data = sasl.successData() if sasl is not None else None
        if data:
            # SASL "additional data with success" (RFC 5034 section 4): a
            # last challenge, answered by an empty line, then +OK.  The
            # login counts once the client has taken the server's proof
            # (SCRAM's): one that cancels here did not log in.
            self._saslFinishing = True
            self._finishingMechanism = mechanism
            self._out.write(b"+ " + base64.b64encode(data) + b"\r\n")
            return
        self._loginCompleted(mechanism)
        self._enterTransaction()

    def _loginCompleted(self, mechanism):
        self._loginMetric(mechanism, "ok")
        self.logInfo(
            "pop3.login",
            f"pop3 login {self.whoText()} mechanism={mechanism}",
            mechanism=mechanism,
            messages=len(self._maildrop.sizes),
        )

    def _loginAbandoned(self, why):
        """
        The client did not take the server's last SASL message (it may have
        found the server's proof wrong, or gone, or the session was ended
        meanwhile): no login, and the maildrop goes.

        @return: what L{_endSession} returns.
        """
        self._saslFinishing = False
        self.logInfo(
            "auth.abandoned",
            f"pop3 login abandoned user={self.user} peer={self.peerText} "
            f"mechanism={self._finishingMechanism}: {why}",
            mechanism=self._finishingMechanism,
            reason=why,
        )
        return self._endSession(why, loggedIn=False)

    def _enterTransaction(self):
        self._cancelLoginTimer()
        maildrop = self._maildrop
        self._deleted = DeletionMarks(len(maildrop.sizes))
        self._count = len(maildrop.sizes)
        self._octets = sum(maildrop.sizes)
        self.state = TRANSACTION
        # The store learns who the session is (the client's address and
        # the master user who logged in, if one did, go with what it
        # deletes, and mailgate who shows them) and how to end it
        # (mailgate kick).
        maildrop.sessionStarted(self.peerText, self._kicked, self._lockLost, master=self.master)
        self._ok(f"{maildrop.address} has {self._count} messages ({self._octets} octets)")

    def _failureDelayLeft(self):
        """
        The seconds still to wait before answering a failed login: the
        failure delay counts from when the login was asked, so a refusal
        comes as long after the question whatever the check cost (an
        unknown user's, a mailgate hash's, a costlier Argon2 hash imported
        from Dovecot), and its timing does not tell who exists.
        """
        asked, self._loginAsked = self._loginAsked, None
        if asked is None:
            return self.authFailureDelay
        return max(0.0, self.authFailureDelay - (self._elapsed() - asked))

    def _loginFailed(self, failure, login, mechanism, password=None, digest=None):
        self._sasl = None
        if failure.check(LoginAbandoned):
            # The session ended before the password was hashed: nothing
            # was checked, so nothing is counted or answered.
            return None
        policy = self.factory.policy
        if failure.check(
            UnauthorizedLogin, UnhandledCredentials, MaildropInUse, LoginDelayed, UserDisabled, NetworkRefused
        ) and policy.isBanned(self.peer):
            return self._bannedWhileChecked(login, mechanism)
        if failure.check(UnauthorizedLogin, UnhandledCredentials, NetworkRefused):
            # A client on none of the user's allowed networks (mailgate
            # user networks, Dovecot's allow_nets) is answered, delayed and
            # counted towards the address's penalty and ban as a wrong
            # password, as Dovecot does: told anything else, or spared the
            # penalty, it would learn that the password was right.
            self._authFailures += 1
            self._settleHeldFailure(failedWith=(login, password))
            if mechanism in DIGEST_MECHANISMS:
                self._heldFailure = (login, digest)
            else:
                policy.authenticationFailed(self.peer, login, password)
            # A checker may say why (a bearer token's: expired, another
            # issuer, ...), for the log alone; a password's says nothing.
            why = str(failure.value) if failure.check(UnauthorizedLogin, NetworkRefused) else ""
            text = f"pop3 authentication failed user={_logName(login)!r} peer={self.peerText}"
            reason = "network" if failure.check(NetworkRefused) else "failed"
            self._authFailed(login, mechanism, reason, f"{text}: {why}" if why else text)
            return self._waitPenalty(self._failureDelayLeft(), self._refuseLogin, BEARER_FAILURES.get(mechanism))
        if failure.check(MaildropInUse):
            # The credentials were right; the maildrop is busy.
            self._settleHeldFailure(login)
            policy.authenticationSucceeded(self.peer, login)
            self._authFailed(
                login, mechanism, "in_use",
                f"pop3 login refused user={_logName(login)!r} peer={self.peerText}: "
                f"maildrop in use by another POP3 session",
            )
            self._err("[IN-USE] maildrop is locked by another POP3 session")
        elif failure.check(UserDisabled):
            # The credentials were right, and the user is disabled: told
            # so, and why (nothing a guesser learns: only the right
            # password gets here).  Not a failure towards the address's
            # penalty or ban, which the user's own client would earn
            # polling; nor a success that would forgive the address the
            # failures it made guessing other users.
            self._settleHeldFailure(login)
            self._authFailed(
                login, mechanism, "disabled",
                f"pop3 login refused user={_logName(login)!r} peer={self.peerText}: the user is disabled",
            )
            self._err(disabledReply(failure.value.reason))
        elif failure.check(LoginDelayed):
            self._settleHeldFailure(login)
            policy.authenticationSucceeded(self.peer, login)
            self._authFailed(
                login, mechanism, "login_delay",
                f"pop3 login refused user={_logName(login)!r} peer={self.peerText}: "
                f"login delay ({failure.value})",
                result="tempfail",
            )
            self._err(f"[LOGIN-DELAY] {failure.value}")
        elif failure.check(TemporaryFailure):
            # Logged once, as the store's failure (a warning), with the
            # reason auth.failed would give it.
            self._loginMetric(mechanism, "tempfail")
            self.logWarning(
                "pop3.login_failed",
                f"pop3 login failed user={_logName(login)!r} peer={self.peerText}: "
                f"tempfail ({failure.value})",
                user=_logName(login),
                mechanism=mechanism,
                reason="tempfail",
            )
            self._err(unavailable("the mail store is unavailable"))
        else:
            self._loginMetric(mechanism, "tempfail")
            self.logFailure(
                "pop3.login_failed",
                f"pop3 login failed user={_logName(login)!r} peer={self.peerText}: internal error",
                failure,
                user=_logName(login),
                mechanism=mechanism,
                reason="internal_error",
            )
            self._err(unavailable("internal server error"))
        return None

    def _settleHeldFailure(self, succeededAs=None, failedWith=None):
        """
        Count the failed APOP or CRAM-MD5 login this session holds, if
        any, towards the policy's penalties and bans; unless the session
        has since proven, with other credentials, to be that user
        (C{succeededAs}), or has since failed as that user with the very
        password the digest was made with (C{failedWith}: the login name
        and the password of a failed USER/PASS, PLAIN or LOGIN).

        Clients that prefer CRAM-MD5 whenever it is offered (fetchmail's
        C{auth any}) try it for users without APOP, then log in with
        USER/PASS: counted at once, a fetchmail polling ten accounts got
        its address banned.  Telling users without a secret apart (not
        counting their failures) would answer, to anyone watching the
        next attempt's penalty, which users have APOP.  So every digest
        failure is held alike, and counted when the session fails
        again, ends, or logs in as someone else; only that user's own
        login forgives it, which a guesser cannot make.

        The same fetchmail left with an old password fails twice at every
        poll, with CRAM-MD5 and with USER/PASS: both tried the one
        password, which the policy does not count again when it is tried
        again.  The digest failure is that USER/PASS failure, counted with
        it (once, and not at all once it repeats): counted apart, every
        poll counted one and banned the address.  It is dropped only when
        the digest is exactly what that password gives, so no guess goes
        uncounted.
        """
        held, self._heldFailure = self._heldFailure, None
        if held is None:
            return
        heldLogin, digest = held
        realm = self.factory.defaultRealm
        if succeededAs is not None and _sameUser(heldLogin, succeededAs, realm):
            return
        if failedWith is not None:
            login, password = failedWith
            if password is not None and digest is not None and _sameUser(heldLogin, login, realm):
                if digest.checkPassword(password):
                    return
        self.factory.policy.authenticationFailed(self.peer, heldLogin)

    def _waitPenalty(self, seconds, then, *args):
        """
        Run C{then(*args)} after the policy's penalty, or a failed login's
        delay, of C{seconds}: the command waits on the L{Deferred}
        returned; L{endPenalty} ends the wait early.

        A session that has ended, or whose server is stopping, does not
        wait at all: L{endPenalty}, called when either began, has run
        already, and a check that was in flight then (a password's hash, a
        database) ends after it.  Its failure delay started then would
        hold a lost session's timer, or the stop, for up to a week
        (C{--auth-failure-delay}).
        """
        if self._closed or self.stopping:
            return then(*args)
        d = defer.Deferred()
        d.addCallback(lambda _: then(*args))
        self._penalty = (self._clock.callLater(seconds, self.endPenalty), d)
        return d

    def endPenalty(self):
        """
        End the penalty a login waits out now, if any, and its wait for its
        turn to have its password checked (L{_checkInTurn}).  When the
        server starts stopping, a scanner held for its penalty (up to
        C{--auth-penalty-max} seconds, and an internet-facing server nearly
        always holds one) or behind its address's other logins must not
        hold the stop up: its login is then not checked (see L{_check}).
        A failed login waiting out its failure delay is answered at once:
        its check is over, and a delay longer than the grace held the stop
        for the whole grace and the abort after it.  When the connection is
        lost, the timer lets go of the session at once, and the login's
        place in its address's queue goes.
        """
        turn, self._turn = self._turn, None
        if turn is not None:
            turn.cancel()
        penalty, self._penalty = self._penalty, None
        if penalty is None:
            return
        call, d = penalty
        cancelled(call)
        d.callback(None)

    def _refuseLogin(self, failureChallenge=None):
        """
        Tell the client its login failed.  A bearer token's failure is
        first an error challenge (L{BEARER_FAILURES}), which the client
        answers before the C{-ERR} (L{_saslResponse}).
        """
        if self._closed:
            return
        if failureChallenge is not None:
            self._saslFailing = failureChallenge
            self._out.write(b"+ " + base64.b64encode(failureChallenge) + b"\r\n")
            return
        self._err(INVALID_LOGIN)
        if self._authFailures >= self.maxAuthFailures:
            self.logTooManyErrors("too many failed logins", self._authFailures)
            self._ending("too many failed logins")
            self._err("too many failed logins; closing the connection")
            self.close()


def _thenDone(result, answer, done, *args):
    """
    Take in a check's result with C{answer}, then end its verification
    (C{done}): the next login of the address waiting its turn is checked
    once this one's failure is counted (and a ban it made is in force),
    and need not wait for the failure delay.
    """
    try:
        return answer(result, *args)
    finally:
        done()


def _masterOf(credentials):
    """
    The name of the master user whose login C{credentials} are, as a log
    line shows it (the name as given, made printable, if it is no master
    user's name), or C{None} for a user's own login.
    """
    if not IMasterCredentials.providedBy(credentials):
        return None
    if credentials.master is not None:
        return credentials.master
    return _logName(credentials.masterAsGiven)


#: A space or a tab followed by more text in a login name: where a
#: password typed after the name would begin.
_AFTER_SPACE = re.compile(r"[ \t]+[^ \t]")


def _logName(login):
    """
    A login name as the client sent it, fit for a log line: at most 64
    characters, anything unprintable (an escape sequence, a right-to-left
    override, a line separator) shown as C{?}, as SMTP's addresses are.

    What follows a space or a tab in it is not logged but shown as C{[...]}:
    C{USER name password} on one line (a script's mistake, which some
    clients' documentation shows) is a login name with the password in
    it, and a password is never logged.  No address has white space
    outside quotes, which no real mailbox uses.

    A quoted local part with a space (C{"john smith"@example.org}, legal in
    RFC 5321) is cut too, as C{"john [...]}: no user of mailgate's has one
    (local parts are dot-atoms, L{mailgate.address.userAddress}), so such
    a login fails whatever the line shows, while showing it whole would
    show the password of C{USER "john p4ss"@word}, a name and a password
    that no rule can tell from one quoted name.
    """
    after = _AFTER_SPACE.search(login)
    if after is not None:
        login = login[: after.start()] + " [...]"
    return printable(login[:64])


def _sameUser(first, second, defaultRealm=None):
    """
    Whether two login names are the same user's: addresses compared as the
    portal reads them (case, a domain in Unicode, the default realm of a
    bare name).  Compared in their normal form alone, fetchmail's failed
    CRAM-MD5 as C{bob} (under C{--auth-default-realm}) or as
    C{bob@bücher.example} was not forgiven by bob's own login, and every
    poll counted a failure towards a ban.
    """
    def normal(name):
        try:
            return loginAddress(name, defaultRealm)
        except InvalidAddress:
            return name.strip().lower()

    return normal(first) == normal(second)
