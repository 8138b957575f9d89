# -*- test-case-name: tests.test_policy -*-
"""
Connection limits: how many connections this process serves at once, in
all and per client address.

Counted by the policy when the session core admits a connection, after a
PROXY header has told the real client address, which is why Twisted's
C{LimitConnectionsByPeer} (it counts the balancer's address) is not used.
Only this process's connections are counted: every node has its own limits.
"""

#: the share of the limit on connections in all from which the server is
#: under stress (see IConnectionPolicy.underStress), and the share below
#: which it is no more (apart, so that it does not flap at the edge)
STRESS_FROM = 0.8
STRESS_UNTIL = 0.7


class ConnectionLimits:
    """
    @param maxConnections: connections in all; 0 for no limit.
    @param maxPerAddress: connections per client address; 0 for no limit.
    @ivar total: the connections open now.
    @ivar leaving: those of them L{leave} was told of: asked to close, not
        closed yet (still counted against the limits: each holds a
        descriptor until then).
    @ivar stressed: whether the connections staying (L{total} less
        L{leaving}) came to L{STRESS_FROM} of the limit, and have not fallen
        below L{STRESS_UNTIL} of it since.  Those leaving are not counted:
        a connection is lost a reactor turn after its close, and every idle
        session whose timer was due in the same turn saw the stress and was
        closed, where enough of them to end it were to be.
    """

    stressed = False

    def __init__(self, maxConnections, maxPerAddress):
        self.maxConnections = maxConnections
        self.maxPerAddress = maxPerAddress
        self.total = 0
        self.leaving = 0
        self._perAddress = {}

    @property
    def staying(self):
        """
        The connections open now that have not been asked to close.
        """
        return self.total - self.leaving

    def open(self, key, perAddress=True):
        """
        Count a new connection from C{key}, if the limits allow it.

        @param key: the client's address key, or C{None} (a Unix socket
            peer), which only the total limit applies to.
        @param perAddress: whether the per-address limit applies (not to
            exempt networks); the connection is counted either way.
        @return: whether it was admitted (and counted).
        """
        if self.maxConnections and self.total >= self.maxConnections:
            return False
        if key is not None:
            count = self._perAddress.get(key, 0)
            if perAddress and self.maxPerAddress and count >= self.maxPerAddress:
                return False
            self._perAddress[key] = count + 1
        self.total += 1
        if self.maxConnections and not self.stressed and self.staying >= self.maxConnections * STRESS_FROM:
            self.stressed = True
        return True

    def resize(self, maxConnections, maxPerAddress):
        """
        Other limits (a reload), for the connections opened from now on:
        those open stay, counted, though more than the new limits allow;
        the stress is judged again against the new limit in all.
        """
        self.maxConnections = maxConnections
        self.maxPerAddress = maxPerAddress
        if not maxConnections:
            self.stressed = False
        elif not self.stressed and self.staying >= maxConnections * STRESS_FROM:
            self.stressed = True
        else:
            self._relieve()

    def leave(self):
        """
        A connection L{open} admitted is asked to close: it no longer counts
        towards the stress (L{close} uncounts it once it is closed).
        """
        self.leaving += 1
        self._relieve()

    def close(self, key):
        """
        Uncount a connection L{open} admitted, and L{leave} was told of:
        the server's sessions tell it of each first, closed by them or
        lost (a caller that never tells it leaves nothing to uncount).
        """
        if self.total > 0:
            self.total -= 1
        if self.leaving > 0:
            self.leaving -= 1
        self._relieve()
        if key is not None:
            count = self._perAddress.get(key, 0)
            if count <= 1:
                self._perAddress.pop(key, None)
            else:
                self._perAddress[key] = count - 1

    def _relieve(self):
        if self.stressed and self.staying < self.maxConnections * STRESS_UNTIL:
            self.stressed = False

    def fromAddress(self, key):
        """
        The connections open now from C{key}.
        """
        return self._perAddress.get(key, 0)
