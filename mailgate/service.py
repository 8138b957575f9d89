# -*- test-case-name: tests.test_service -*-
"""
Building mailgate's service hierarchy: the one place that wires storage,
authentication and protocols together.

L{makeService} turns a L{MailgateConfig} into a L{MultiService} that an
embedder can attach to an existing application with C{setServiceParent},
and that C{twistd mailgate} runs on its own.
"""

import signal
import sys

import attr
from twisted.application.internet import StreamServerEndpointService
from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from mailgate.auth.checkers import threadRunner
from mailgate.auth.realm import makePortal
from mailgate.auth.sasl import SASLServer
from mailgate.errors import ConfigurationError
from mailgate.policy import settings as policyDefaults
from mailgate.policy.addresses import DEFAULT_EXEMPT_NETWORKS
from mailgate.pop3 import POP3Factory
from mailgate.policy.service import PolicyService
from mailgate.pop3.factory import DEFAULT_TRUSTED_NETWORKS, APOPAdvertiser
from mailgate.smtp import LMTPFactory, LocalDelivery, SMTPFactory
from mailgate.smtp.protocol import SMTPServer
from mailgate.store import DEFAULT_DATABASE, openStore
from mailgate.tls import ServerTLS

DEFAULT_POP3 = "tcp:1110:interface=127.0.0.1"
APOP_REFRESH = 30


@attr.s(kw_only=True)
class MailgateConfig:
    """
    Everything C{twistd mailgate} can be told, with its defaults.

    @ivar pop3: strports descriptions of the POP3 listeners.
    @ivar apop: offer APOP (the greeting carries a timestamp): C{True},
        C{False}, or C{"auto"} (the default: only while some user has APOP
        enabled, checked every L{APOP_REFRESH} seconds).
    @ivar authFailureDelay: seconds before a failed login is answered.
    @ivar idleTimeout: POP3 autologout, in seconds.
    @ivar loginDelay: minimum seconds between a user's logins, or C{None}.
    @ivar smtp: strports descriptions of the SMTP listeners.
    @ivar lmtp: strports descriptions of the LMTP listeners.
    @ivar domains: the domains SMTP and LMTP accept mail for; C{None} (or
        empty) accepts the domains of existing users.
    @ivar maxMessageSize: octets of message content SMTP and LMTP accept.
    @ivar maxRecipients: recipients per SMTP or LMTP transaction.
    @ivar pop3s: strports descriptions of implicit-TLS POP3 listeners (the
        TLS is mailgate's, from C{tlsCertificate} and C{tlsKey}).
    @ivar tlsCertificate: PEM certificate, optionally followed by its chain.
    @ivar tlsKey: PEM private key.
    @ivar trustedNetworks: CIDR networks from which plaintext passwords are
        accepted without TLS.
    @ivar reloadOnSIGHUP: reload the certificate and key on SIGHUP.
    @ivar maxConnections: connections served at once, in all; 0 for no limit.
    @ivar maxConnectionsPerAddress: connections from one client address
        (the real one behind a PROXY header); 0 for no limit.
    @ivar authPenaltyMax: the longest authentication penalty (Dovecot's:
        2 s after a failure, doubling), in seconds; 0 turns it off.
    @ivar banAfter: the failed login (within C{banWindow}) that bans the
        address; 0 for no bans.
    @ivar banWindow: seconds over which failed logins are counted.
    @ivar banTime: seconds a ban lasts.
    @ivar exemptNetworks: CIDR networks never penalised, banned or limited
        per address (C{["none"]} for none).
    """

    database = attr.ib(default=DEFAULT_DATABASE)
    pop3 = attr.ib(factory=lambda: [DEFAULT_POP3])
    smtp = attr.ib(factory=list)
    lmtp = attr.ib(factory=list)
    hostname = attr.ib(default=None)
    apop = attr.ib(default="auto")
    authFailureDelay = attr.ib(default=1.0)
    idleTimeout = attr.ib(default=600)
    loginDelay = attr.ib(default=None)
    domains = attr.ib(default=None)
    maxMessageSize = attr.ib(default=SMTPServer.maxMessageSize)
    maxRecipients = attr.ib(default=SMTPServer.maxRecipients)
    pop3s = attr.ib(factory=list)
    tlsCertificate = attr.ib(default=None)
    tlsKey = attr.ib(default=None)
    trustedNetworks = attr.ib(factory=lambda: list(DEFAULT_TRUSTED_NETWORKS))
    reloadOnSIGHUP = attr.ib(default=False)
    maxConnections = attr.ib(default=policyDefaults.MAX_CONNECTIONS)
    maxConnectionsPerAddress = attr.ib(default=policyDefaults.MAX_CONNECTIONS_PER_ADDRESS)
    authPenaltyMax = attr.ib(default=policyDefaults.AUTH_PENALTY_MAX)
    banAfter = attr.ib(default=policyDefaults.BAN_AFTER)
    banWindow = attr.ib(default=policyDefaults.BAN_WINDOW)
    banTime = attr.ib(default=policyDefaults.BAN_TIME)
    exemptNetworks = attr.ib(factory=lambda: list(DEFAULT_EXEMPT_NETWORKS))


class ListeningService(StreamServerEndpointService):
    """
    A listener that says where it listens, and fails start-up (rather than
    logging and carrying on deaf) when it cannot.
    """

    log = Logger()
    _raiseSynchronously = True

    def __init__(self, name, description, endpoint, factory):
        super().__init__(endpoint, factory)
        self.protocolName = name
        self.description = description
        self.port = None

    def privilegedStartService(self):
        try:
            super().privilegedStartService()
        except Exception as e:
            raise ConfigurationError(
                f"cannot listen for {self.protocolName} on {self.description}: {e}"
            ) from e
        self._waitingForPort.addCallback(self._listening)

    def _listening(self, port):
        self.port = port
        address = port.getHost()
        if hasattr(address, "port"):
            where = f"{address.host}:{address.port}"
        else:
            where = getattr(address, "name", address)
            if isinstance(where, bytes):
                where = where.decode("utf-8", "replace")
        self.log.info(
            "{protocol} listening on {where} ({description})",
            protocol=self.protocolName,
            where=where,
            description=self.description,
        )
        return port


class StoreService(Service):
    """
    Owns the store: closes its connections when the service stops.
    """

    def __init__(self, store):
        self.store = store

    def stopService(self):
        Service.stopService(self)
        return self.store.close()


class MailgateService(MultiService):
    """
    The root of mailgate's services.

    @ivar store: the L{mailgate.interfaces.IMailStore} every protocol uses.
    @ivar listeners: the L{ListeningService}s, by protocol name.
    @ivar policy: the L{mailgate.interfaces.IConnectionPolicy} every
        listener's sessions consult.
    @ivar exitOnStartupError: end the process with a one-line message when
        a listener cannot start (what C{twistd mailgate} wants), instead of
        raising L{ConfigurationError} (what an embedding application wants).
    """

    exitOnStartupError = False
    daemonized = False
    policy = None
    log = Logger()

    def __init__(self, store, tls=None, reactor=None, reloadOnSIGHUP=False):
        super().__init__()
        self.store = store
        self.tls = tls
        self.listeners = {}
        self._reactor = reactor
        self._reloadOnSIGHUP = reloadOnSIGHUP and tls is not None
        self._previousHandler = None

    def reloadTLS(self):
        """
        Load the TLS certificate and key again: new connections get the new
        certificate, established sessions keep theirs.  An unusable new
        pair is logged and the old one stays in service.

        @return: whether the reload succeeded.
        """
        if self.tls is None:
            return False
        try:
            self.tls.reload()
        except ConfigurationError as e:
            self.log.error("TLS reload failed, keeping the previous certificate: {error}", error=e)
            return False
        self.log.info(
            "TLS certificate reloaded: {subject} sha256 {fingerprint}",
            subject=self.tls.subject,
            fingerprint=self.tls.fingerprint,
        )
        return True

    def startService(self):
        super().startService()
        if self._reloadOnSIGHUP:
            reactor = self._reactor

            def onSIGHUP(signum, frame):
                reactor.callFromThread(self.reloadTLS)

            self._previousHandler = signal.signal(signal.SIGHUP, onSIGHUP)

    def stopService(self):
        if self._previousHandler is not None:
            signal.signal(signal.SIGHUP, self._previousHandler)
            self._previousHandler = None
        return super().stopService()

    def privilegedStartService(self):
        try:
            super().privilegedStartService()
        except ConfigurationError as e:
            if not self.exitOnStartupError or self.daemonized:
                # A daemonized twistd reports exceptions (not SystemExit)
                # back to the waiting parent, which prints them and exits 1.
                raise
            # twistd has pointed sys.stderr at the log by now.
            stderr = sys.__stderr__ or sys.stderr
            stderr.write(f"mailgate: {e}\n")
            stderr.flush()
            raise SystemExit(1)

    def addListener(self, listener):
        listener.setServiceParent(self)
        self.listeners.setdefault(listener.protocolName, []).append(listener)


def _endpoint(reactor, description):
    try:
        return serverFromString(reactor, description)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigurationError(f"invalid endpoint {description!r}: {e}") from None


def makePolicy(store, config, reactor):
    """
    The connection policy from C{config}: limits, the authentication
    penalty and bans, shared through C{store}'s database (in this process's
    memory for a store without one).

    @raise ConfigurationError: for settings out of range.
    """
    from mailgate.policy.connection import ConnectionPolicy
    from mailgate.policy.memory import MemoryPolicyStore
    from mailgate.policy.settings import PolicySettings
    from mailgate.store.policy import SQLPolicyStore

    try:
        settings = PolicySettings(
            maxConnections=config.maxConnections,
            maxConnectionsPerAddress=config.maxConnectionsPerAddress,
            authPenaltyMax=config.authPenaltyMax,
            banAfter=config.banAfter,
            banWindow=config.banWindow,
            banTime=config.banTime,
            exemptNetworks=config.exemptNetworks,
        )
    except ValueError as e:
        raise ConfigurationError(f"connection policy: {e}") from None
    database = getattr(store, "database", None)
    policyStore = MemoryPolicyStore() if database is None else SQLPolicyStore(database)
    return ConnectionPolicy(policyStore, reactor, settings)


def makePOP3Factory(store, config, reactor, tls=None, policy=None):
    """
    The POP3 factory for C{store}: the portal with its checkers, SASL, and
    the session policy from C{config}.
    """
    portal = makePortal(
        store, threadRunner(reactor), apop=bool(config.apop), loginDelay=config.loginDelay
    )
    apop = APOPAdvertiser(store) if config.apop == "auto" else bool(config.apop)
    return POP3Factory(
        portal,
        hostname=config.hostname,
        apop=apop,
        idleTimeout=config.idleTimeout,
        authFailureDelay=config.authFailureDelay,
        reactor=reactor,
        loginDelay=config.loginDelay,
        tls=tls,
        sasl=SASLServer(store.findUser),
        trustedNetworks=config.trustedNetworks,
        policy=policy,
    )


def makeSMTPFactory(store, config, reactor, lmtp=False, tls=None, policy=None):
    """
    The SMTP (or LMTP) factory for C{store}, with the limits from C{config}.
    """
    factoryClass = LMTPFactory if lmtp else SMTPFactory
    return factoryClass(
        LocalDelivery(store, config.domains or None),
        hostname=config.hostname,
        maxMessageSize=config.maxMessageSize,
        maxRecipients=config.maxRecipients,
        reactor=reactor,
        tls=tls,
        policy=policy,
    )


def makeTLS(config):
    """
    The server TLS from C{config}, or C{None} if no certificate is set.

    @raise ConfigurationError: if only one of certificate and key is set,
        or they cannot be loaded.
    """
    if (config.tlsCertificate is None) != (config.tlsKey is None):
        raise ConfigurationError("TLS needs both a certificate and a key")
    if config.tlsCertificate is None:
        if config.pop3s:
            raise ConfigurationError("implicit-TLS listeners need a certificate and a key")
        return None
    return ServerTLS(config.tlsCertificate, config.tlsKey)


def makeService(config, reactor=None, store=None):
    """
    Build mailgate's service hierarchy.

    @param config: a L{MailgateConfig}.
    @param reactor: the reactor to listen with; the global one by default.
    @param store: an already opened store to use instead of opening
        C{config.database}.
    @raise ConfigurationError: if the database cannot be opened or an
        endpoint description is invalid.
    """
    if reactor is None:
        from twisted.internet import reactor
    listeners = {
        name: [(d, _endpoint(reactor, d)) for d in descriptions]
        for name, descriptions in (
            ("POP3", config.pop3),
            ("POP3S", config.pop3s),
            ("SMTP", config.smtp),
            ("LMTP", config.lmtp),
        )
    }
    tls = makeTLS(config)
    if store is None:
        store = openStore(config.database, reactor)
    root = MailgateService(store, tls, reactor, config.reloadOnSIGHUP)
    StoreService(store).setServiceParent(root)
    # After the store's service: it stops (its refresh timer with it)
    # before the store closes.
    policy = makePolicy(store, config, reactor)
    root.policy = policy
    PolicyService(policy, reactor).setServiceParent(root)
    pop3 = []

    def pop3Factory():
        if not pop3:
            factory = makePOP3Factory(store, config, reactor, tls, policy=policy)
            if isinstance(factory.apop, APOPAdvertiser):
                # Fire and forget: a slow database must not hold up shutdown.
                refresh = TimerService(APOP_REFRESH, lambda: factory.apop.refresh() and None)
                refresh.clock = reactor
                refresh.setServiceParent(root)
            pop3.append(factory)
        return pop3[0]

    builders = {
        "POP3": pop3Factory,
        "POP3S": lambda: TLSMemoryBIOFactory(tls, False, pop3Factory()),
        "SMTP": lambda: makeSMTPFactory(store, config, reactor, tls=tls, policy=policy),
        "LMTP": lambda: makeSMTPFactory(store, config, reactor, lmtp=True, tls=tls, policy=policy),
    }
    for name, endpoints in listeners.items():
        if endpoints:
            factory = builders[name]()
            for description, endpoint in endpoints:
                root.addListener(ListeningService(name, description, endpoint, factory))
    return root
