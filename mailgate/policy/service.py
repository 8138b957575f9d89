# -*- test-case-name: tests.test_policy -*-
"""
L{PolicyService}: runs a L{mailgate.policy.connection.ConnectionPolicy}'s
refresh timer while mailgate's services run.
"""

from twisted.application.service import Service


class PolicyService(Service):
    """
    Starts the policy's refreshes from the store once the reactor runs
    (C{twistd} starts services before it runs the reactor; an embedder's
    running reactor starts them at once), and stops them with the service,
    before the store closes: it is added after the store's service, and
    services stop in the reverse order.

    @param policy: the L{mailgate.policy.connection.ConnectionPolicy}.
    @param reactor: the reactor the policy runs on.
    """

    def __init__(self, policy, reactor):
        self.policy = policy
        self._reactor = reactor

    def startService(self):
        Service.startService(self)
        self._reactor.callWhenRunning(self._start)

    def _start(self):
        if self.running:
            self.policy.start()

    def stopService(self):
        Service.stopService(self)
        self.policy.stop()
