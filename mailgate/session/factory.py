# -*- test-case-name: tests.test_session_core -*-
"""
What every session factory gives its sessions besides its protocol's own
settings: the clock, the connection policy, the metrics and the tracker of
open sessions.
"""

from twisted.internet.protocol import ServerFactory

from mailgate.metrics import Metrics
from mailgate.policy import OpenPolicy
from mailgate.session.tracker import SessionTracker


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

    def __init__(self, reactor, policy=None, metrics=None, tracker=None):
        self.reactor = reactor
        self.policy = OpenPolicy() if policy is None else policy
        self.metrics = Metrics() if metrics is None else metrics
        self.tracker = SessionTracker(reactor) if tracker is None else tracker
