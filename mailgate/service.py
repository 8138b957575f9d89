# -*- test-case-name: tests.test_service -*-
"""
Building mailgate's service hierarchy: the one place that wires storage,
authentication and protocols together.

L{makeService} turns a L{MailgateConfig} into a L{MultiService} that an
embedder can attach to an existing application with C{setServiceParent},
and that C{twistd mailgate} runs on its own.
"""

import sys

import attr
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger

from mailgate.auth.checkers import threadRunner
from mailgate.auth.realm import makePortal
from mailgate.errors import ConfigurationError
from mailgate.pop3 import POP3Factory
from mailgate.smtp import LMTPFactory, LocalDelivery, SMTPFactory
from mailgate.smtp.protocol import SMTPServer
from mailgate.store import DEFAULT_DATABASE, openStore

DEFAULT_POP3 = "tcp:1110:interface=127.0.0.1"


@attr.s(kw_only=True)
class MailgateConfig:
    """
    Everything C{twistd mailgate} can be told, with its defaults.

    @ivar pop3: strports descriptions of the POP3 listeners.
    @ivar apop: offer APOP (the greeting carries a timestamp).
    @ivar authFailureDelay: seconds before a failed login is answered.
    @ivar idleTimeout: POP3 autologout, in seconds.
    @ivar loginDelay: minimum seconds between a user's logins, or C{None}.
    @ivar smtp: strports descriptions of the SMTP listeners.
    @ivar lmtp: strports descriptions of the LMTP listeners.
    @ivar domains: the domains SMTP and LMTP accept mail for; C{None} (or
        empty) accepts the domains of existing users.
    @ivar maxMessageSize: octets of message content SMTP and LMTP accept.
    @ivar maxRecipients: recipients per SMTP or LMTP transaction.
    """

    database = attr.ib(default=DEFAULT_DATABASE)
    pop3 = attr.ib(factory=lambda: [DEFAULT_POP3])
    smtp = attr.ib(factory=list)
    lmtp = attr.ib(factory=list)
    hostname = attr.ib(default=None)
    apop = attr.ib(default=True)
    authFailureDelay = attr.ib(default=1.0)
    idleTimeout = attr.ib(default=600)
    loginDelay = attr.ib(default=None)
    domains = attr.ib(default=None)
    maxMessageSize = attr.ib(default=SMTPServer.maxMessageSize)
    maxRecipients = attr.ib(default=SMTPServer.maxRecipients)


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
    @ivar exitOnStartupError: end the process with a one-line message when
        a listener cannot start (what C{twistd mailgate} wants), instead of
        raising L{ConfigurationError} (what an embedding application wants).
    """

    exitOnStartupError = False

    def __init__(self, store):
        super().__init__()
        self.store = store
        self.listeners = {}

    def privilegedStartService(self):
        try:
            super().privilegedStartService()
        except ConfigurationError as e:
            if not self.exitOnStartupError:
                raise
            sys.stderr.write(f"mailgate: {e}\n")
            sys.stderr.flush()
            raise SystemExit(1)

    def addListener(self, listener):
        listener.setServiceParent(self)
        self.listeners.setdefault(listener.protocolName, []).append(listener)


def _endpoint(reactor, description):
    try:
        return serverFromString(reactor, description)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigurationError(f"invalid endpoint {description!r}: {e}") from None


def makePOP3Factory(store, config, reactor):
    """
    The POP3 factory for C{store}: the portal with its checkers, and the
    session policy from C{config}.
    """
    portal = makePortal(
        store, threadRunner(reactor), apop=config.apop, loginDelay=config.loginDelay
    )
    return POP3Factory(
        portal,
        hostname=config.hostname,
        apop=config.apop,
        idleTimeout=config.idleTimeout,
        authFailureDelay=config.authFailureDelay,
        reactor=reactor,
        loginDelay=config.loginDelay,
    )


def makeSMTPFactory(store, config, reactor, lmtp=False):
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
    )


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
        for name, descriptions in (("POP3", config.pop3), ("SMTP", config.smtp), ("LMTP", config.lmtp))
    }
    if store is None:
        store = openStore(config.database, reactor)
    root = MailgateService(store)
    StoreService(store).setServiceParent(root)
    builders = {
        "POP3": lambda: makePOP3Factory(store, config, reactor),
        "SMTP": lambda: makeSMTPFactory(store, config, reactor),
        "LMTP": lambda: makeSMTPFactory(store, config, reactor, lmtp=True),
    }
    for name, endpoints in listeners.items():
        if endpoints:
            factory = builders[name]()
            for description, endpoint in endpoints:
                root.addListener(ListeningService(name, description, endpoint, factory))
    return root
