# -*- test-case-name: tests.test_policy -*-
"""
Connection limits, the authentication penalty and bans.

L{ConnectionPolicy} (in L{mailgate.policy.connection}) is what
C{twistd mailgate} runs: limits per process and per client address,
Dovecot's authentication penalty, and bans shared by every node through
the store.  L{OpenPolicy} admits everyone and never delays: what a
protocol factory uses when it is given no policy (an embedder's tests, the
in-memory test sessions).
"""

from zope.interface import implementer

from mailgate.interfaces import IConnectionPolicy


@implementer(IConnectionPolicy)
class OpenPolicy:
    """
    No limits, no penalty, no bans.
    """

    def admit(self, protocol, address):
        return None

    def connectionClosed(self, protocol, address):
        pass

    def isBanned(self, address):
        return False

    def authenticationDelay(self, address, login):
        return 0.0

    def authenticationFailed(self, address, login, password=None):
        pass

    def authenticationSucceeded(self, address, login):
        pass
