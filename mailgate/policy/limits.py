# -*- test-case-name: tests.test_policy -*-
"""
Connection limits: how many connections this process serves at once, in
all and per client address.

Counted by the policy when the session core admits a connection, after a
PROXY header has told the real client address, which is why Twisted's
C{LimitConnectionsByPeer} (it counts the balancer's address) is not used.
Only this process's connections are counted: every node has its own limits.
"""


class ConnectionLimits:
    """
    @param maxConnections: connections in all; 0 for no limit.
    @param maxPerAddress: connections per client address; 0 for no limit.
    @ivar total: the connections open now.
    """

    def __init__(self, maxConnections, maxPerAddress):
        self.maxConnections = maxConnections
        self.maxPerAddress = maxPerAddress
        self.total = 0
        self._perAddress = {}

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
        return True

    def close(self, key):
        """
        Uncount a connection L{open} admitted.
        """
        if self.total > 0:
            self.total -= 1
        if key is not None:
            count = self._perAddress.get(key, 0)
            if count <= 1:
                self._perAddress.pop(key, None)
            else:
                self._perAddress[key] = count - 1

    def fromAddress(self, key):
        """
        The connections open now from C{key}.
        """
        return self._perAddress.get(key, 0)
