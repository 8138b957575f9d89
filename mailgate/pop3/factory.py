# -*- test-case-name: tests.test_pop3_protocol -*-
"""
The POP3 server factory: one per set of listeners, holding the portal and
the per-listener policy every session reads.
"""

from twisted.internet import defer

from mailgate.hostname import machineName
from mailgate.networks import parseNetwork, peerOnNetworks
from mailgate.pop3.protocol import POP3Server
from mailgate.pop3.workarounds import parseWorkarounds
from mailgate.session import SessionFactory

DEFAULT_TRUSTED_NETWORKS = ("127.0.0.0/8", "::1/128")
#: the text of the greeting after C{+OK} (the APOP timestamp follows it)
DEFAULT_GREETING = "mailgate POP3 server ready"

#: Seconds a greeting waits at most, at start, for the store to say whether
#: APOP is offered.
APOP_DECISION_WAIT = 5.0


class APOPAdvertiser:
    """
    The default APOP policy: greetings carry an APOP timestamp only while at
    least one user has APOP enabled.  Clients that prefer APOP whenever a
    timestamp is offered (Twisted's own client; curl when CAPA lists no SASL
    mechanism it can use) then never try it on a server where it cannot
    work.  It also says whether SASL CRAM-MD5 is offered: only while some
    user has the HMAC-MD5 states of a C{{CRAM-MD5}} hash imported from
    Dovecot, whose clients Dovecot served CRAM-MD5 (users with APOP can use
    it then too).  Not merely because some user has APOP: clients that pick
    CRAM-MD5 whenever CAPA lists it and never fall back (curl) would then
    fail for every user without APOP, each failure counting towards a ban of
    their address; the APOP timestamp costs them nothing, as they prefer
    SASL when CAPA lists it.  Dovecot likewise does not offer CRAM-MD5
    because of APOP.

    Until the store's first answer, greetings wait for it (see
    L{whenKnown}): the clients a server finds waiting when it starts (a
    restart under systemd's socket activation queues them) would otherwise
    all be greeted before anything is known.

    @ivar enabled: the current answer, refreshed by L{refresh} (the service
        calls it periodically; it starts as C{True} until the first answer).
    @ivar cramEnabled: whether some user has CRAM-MD5 states from
        Dovecot, by the same answer: whether CRAM-MD5 is offered.
    @ivar known: whether the store has answered yet.
    """

    def __init__(self, store):
        self._store = store
        self.enabled = True
        self.cramEnabled = False
        self.known = False
        self._waiting = []

    def refresh(self):
        d = self._store.digestLoginUsers()

        def got(answers):
            apop, cramMD5 = answers
            self.enabled = bool(apop)
            self.cramEnabled = bool(cramMD5)
            self.known = True
            self._wake()

        def failed(failure):
            # The database is not there yet: greet with what is assumed
            # rather than hold clients until it is.
            self._wake()

        return d.addCallbacks(got, failed)

    def whenKnown(self):
        """
        A L{Deferred} that fires once the store has answered (or failed to)
        for the first time; C{None} if it already has.
        """
        if self.known:
            return None
        d = defer.Deferred(lambda d: self._waiting.remove(d))
        self._waiting.append(d)
        return d

    def _wake(self):
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)


class POP3Factory(SessionFactory):
    """
    @param portal: a L{Portal} whose realm provides
        L{mailgate.interfaces.IMaildrop} avatars (see
        L{mailgate.auth.realm.makePortal}).
    @param hostname: the name in the greeting and APOP timestamp.
    @param apop: offer APOP: put a timestamp in the greeting.  C{True} or
        C{False}, or an L{APOPAdvertiser} that decides from the store.
    @param idleTimeout: seconds before an idle session is logged out.
    @param loginTimeout: seconds a client has from the greeting to a
        completed login (L{POP3Server.loginTimeout}); C{0}: no limit.
    @param authFailureDelay: seconds before a failed login is answered.
    @param reactor: the reactor (or a clock, in tests) for timers; required,
        as for Twisted's endpoints.
    @param loginDelay: the LOGIN-DELAY the realm enforces, to advertise.
    @param tls: a L{mailgate.tls.ServerTLS} to offer STLS with, or C{None}.
    @param sasl: a L{mailgate.auth.sasl.SASLServer} for AUTH, or C{None}.
    @param trustedNetworks: networks (L{ipaddress} objects or CIDR text)
        from which plaintext passwords are accepted without TLS.
    @param policy: the L{mailgate.interfaces.IConnectionPolicy} (connection
        limits, the authentication penalty, bans); admits everyone if not
        given.
    @param metrics: the L{mailgate.metrics.Metrics} to count with.
    @param tracker: the L{mailgate.session.SessionTracker} of the server,
        for a graceful shutdown.
    @param expire: the RFC 2449 EXPIRE line, as a callable given the
        session's maildrop (C{None} before login), e.g. the C{capability}
        of a store's L{mailgate.interfaces.ILifecycleStore.retention};
        C{None}: always C{EXPIRE NEVER}.
    @param defaultRealm: the domain of a login name without one (the
        portal's and the SASL server's, C{--auth-default-realm}), or
        C{None}: a session reads the names it compares (a failed digest
        login's and the user's who then logs in) as the portal does.
    @param clientWorkarounds: Dovecot's C{pop3_client_workarounds} to
        apply to RETR and TOP (names of L{mailgate.pop3.workarounds.KNOWN});
        each session takes the factory's as it is built, so a reload's
        apply to the sessions after it.
    @param xclientNetworks: networks (L{ipaddress} objects or CIDR text)
        of the proxies whose C{XCLIENT} (Dovecot's POP3 proxy) names the
        client they relay: their greeting says C{[XCLIENT]}.  None by
        default.
    @param masterUserSeparator: the character that separates a user's
        name from a master user's in a USER name (C{alice*admin}, Dovecot's
        C{auth_master_user_separator}), where master users may log in as
        other users (the portal's C{masterUsers}); C{None}: USER names
        are the users' own.
    """

    protocol = POP3Server

    def __init__(
        self,
        portal,
        reactor,
        hostname=None,
        apop=True,
        idleTimeout=POP3Server.idleTimeout,
        loginTimeout=POP3Server.loginTimeout,
        authFailureDelay=POP3Server.authFailureDelay,
        greeting=DEFAULT_GREETING,
        loginDelay=None,
        tls=None,
        sasl=None,
        trustedNetworks=DEFAULT_TRUSTED_NETWORKS,
        policy=None,
        metrics=None,
        tracker=None,
        expire=None,
        defaultRealm=None,
        clientWorkarounds=(),
        masterUserSeparator=None,
        xclientNetworks=(),
    ):
        super().__init__(reactor, policy=policy, metrics=metrics, tracker=tracker)
        self.defaultRealm = defaultRealm
        self.portal = portal
        self.hostname = hostname or machineName()
        self.apop = apop
        self.idleTimeout = idleTimeout
        self.loginTimeout = loginTimeout
        self.authFailureDelay = authFailureDelay
        self.greeting = greeting
        self.loginDelay = loginDelay
        self.tls = tls
        self.sasl = sasl
        self.trustedNetworks = tuple(parseNetwork(n) for n in trustedNetworks)
        self.expire = expire
        self.clientWorkarounds = parseWorkarounds(clientWorkarounds or ())
        self.masterUserSeparator = masterUserSeparator
        self.xclientNetworks = tuple(parseNetwork(n) for n in xclientNetworks)

    def buildProtocol(self, addr):
        protocol = self.protocol()
        protocol.factory = self
        protocol.idleTimeout = self.idleTimeout
        protocol.loginTimeout = self.loginTimeout
        protocol.authFailureDelay = self.authFailureDelay
        if self.clientWorkarounds:
            protocol.clientWorkarounds = self.clientWorkarounds
        return protocol

    def apopDecided(self):
        """
        C{None} if L{offersAPOP} can answer now; else (at start, before the
        store's first answer) a L{Deferred} that fires once it can, after
        L{APOP_DECISION_WAIT} seconds at the most.
        """
        apop = self.apop
        if not isinstance(apop, APOPAdvertiser):
            return None
        d = apop.whenKnown()
        if d is None:
            return None
        d.addTimeout(APOP_DECISION_WAIT, self.reactor)

        def waitedLongEnough(failure):
            failure.trap(defer.TimeoutError)
            return None

        return d.addErrback(waitedLongEnough)

    def offersAPOP(self):
        """
        Whether greetings carry an APOP timestamp now.
        """
        apop = self.apop
        return apop.enabled if isinstance(apop, APOPAdvertiser) else bool(apop)

    def offersCramMD5(self):
        """
        Whether SASL CRAM-MD5 is offered now: always with C{--apop} (it
        works for the users with APOP), never with C{--no-apop}; by
        default only once the store has said that some user was imported
        from Dovecot with a C{{CRAM-MD5}} hash's states, not because some
        user has APOP.  (An APOP timestamp costs clients that prefer SASL
        nothing; a SASL mechanism most users cannot use makes clients that
        pick it whenever it is listed, curl among them, fail for them.)
        """
        apop = self.apop
        if isinstance(apop, APOPAdvertiser):
            return apop.known and apop.cramEnabled
        return bool(apop)

    def isTrusted(self, address):
        """
        Whether a peer is on a trusted network.  Local (Unix socket) peers
        are; so is an address whose form is unknown only if it is not IP.
        """
        return peerOnNetworks(address, self.trustedNetworks)

    def extraCapabilities(self, maildrop=None):
        """
        CAPA lines that depend on configuration (RFC 2449 section 6), and
        after login on the user (C{maildrop}, the session's avatar).
        """
        # Without a retention policy mailgate never deletes mail on its
        # own: only clients do, with DELE.
        lines = ["EXPIRE NEVER" if self.expire is None else self.expire(maildrop)]
        if self.loginDelay:
            lines.append(f"LOGIN-DELAY {self.loginDelay}")
        return lines

