# -*- test-case-name: tests.test_session_core -*-
"""
What every session factory gives its sessions besides its protocol's own
settings: the clock, the connection policy, the metrics and the tracker of
open sessions.
"""

from twisted.internet import defer
from twisted.internet.protocol import ServerFactory
from zope.interface import implementer

from mailgate.interfaces import IConnectionPolicy
from mailgate.metrics import Metrics
from mailgate.networks import hostOnNetworks
from mailgate.session.refusals import RefusalLog
from mailgate.session.tracker import SessionTracker


@implementer(IConnectionPolicy)
class OpenPolicy:
    """
    No limits, no penalty, no bans: what a factory given no policy uses
    (an embedder's tests, the in-memory test sessions).  C{twistd mailgate}
    runs L{mailgate.policy.connection.ConnectionPolicy}.
    """

    def admit(self, protocol, address):
        return None

    def connectionClosing(self, protocol, address):
        pass

    def connectionClosed(self, protocol, address):
        pass

    def isBanned(self, address):
        return False

    def authenticationDelay(self, address, login):
        return 0.0

    def verificationTurn(self, address):
        return defer.succeed(_nothing)

    def authenticationFailed(self, address, login, password=None):
        pass

    def authenticationSucceeded(self, address, login):
        pass

    def underStress(self):
        return False

    def unknownRecipient(self, address):
        pass

    def recipientErrorDelay(self, address):
        return 0.0


def _nothing():
    pass


class SessionFactory(ServerFactory):
    """
    @param reactor: the reactor (or a clock, in tests) for timers; required,
        as for Twisted's endpoints.
    @param policy: the L{mailgate.interfaces.IConnectionPolicy} admitting
        connections and pacing logins; L{OpenPolicy} if not given.
    @param metrics: the L{Metrics} to count with; a private one if not
        given.
    @param tracker: the L{SessionTracker} to register sessions with (one
        per server, shared by its factories); a private one if not given.
    """

    noisy = False
    #: the L{mailgate.session.trace.TraceSelection} of clients whose
    #: sessions are traced, or C{None}
    trace = None
    #: the networks (L{ipaddress} networks) of the proxies and MTAs in
    #: front whose XCLIENT (and, in SMTP and LMTP, XFORWARD) names the
    #: client they relay (C{--xclient-network}, replaced at a reload)
    xclientNetworks = ()

    def __init__(self, reactor, policy=None, metrics=None, tracker=None):
        self.reactor = reactor
        self.policy = OpenPolicy() if policy is None else policy
        self.metrics = Metrics() if metrics is None else metrics
        self.tracker = SessionTracker(reactor) if tracker is None else tracker
        #: which refused connections are logged (L{RefusalLog})
        self.refusals = RefusalLog(reactor)

    def acceptsXCLIENT(self, address):
        """
        Whether the peer C{address} (the connection's own, never one an
        XCLIENT named) is a proxy or MTA on L{xclientNetworks}, whose word
        on the client it relays is taken: an IP peer on one of them.
        """
        host = getattr(address, "host", None)
        return bool(self.xclientNetworks) and host is not None and hostOnNetworks(host, self.xclientNetworks)
