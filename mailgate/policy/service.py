# -*- test-case-name: tests.test_policy -*-
"""
L{PolicyService}: runs a L{mailgate.policy.connection.ConnectionPolicy}'s
refresh timer while mailgate's services run, and keeps the mail listeners
from accepting until its first refresh has read the bans.
"""

from twisted.application.service import Service
from twisted.logger import Logger

from mailgate.timers import cancelled

#: seconds a start keeps its mail listeners from accepting while the first
#: read of the bans is under way, at most: a database that does not answer
#: then leaves the node enforcing what it knows, as after any failed read
LOAD_WAIT = 10.0


class PolicyService(Service):
    """
    Starts the policy's refreshes from the store once the reactor runs
    (C{twistd} starts services before it runs the reactor; an embedder's
    running reactor starts them at once), and stops them with the service,
    before the store closes: it is added after the store's service, and
    services stop in the reverse order.

    The listeners are bound before the reactor runs, and the connections
    made meanwhile (every one a socket-activated listener queued while the
    service was down) would be accepted in its first turn, before the
    first read of the bans came back: a banned address was greeted and its
    mail taken by a server just restarted.  So the listeners given accept
    nothing until that read has ended (the kernel queues the connections),
    at most L{LOAD_WAIT} seconds.

    @param policy: the L{mailgate.policy.connection.ConnectionPolicy}.
    @param reactor: the reactor the policy runs on.
    @param heldListeners: called when the reactor runs, the listening
        services (with C{whenListening}) whose ports wait for the first
        read; C{None} for none.
    """

    log = Logger()

    def __init__(self, policy, reactor, heldListeners=None):
        self.policy = policy
        self._reactor = reactor
        self._heldListeners = heldListeners
        self._held = []
        self._loading = False
        self._giveUp = None

    def startService(self):
        Service.startService(self)
        self._reactor.callWhenRunning(self._start)

    def _start(self):
        if not self.running:
            return
        if self._heldListeners is not None:
            self._loading = True
            for listener in self._heldListeners():
                listener.whenListening().addCallbacks(self._hold, lambda _: None)
            self._giveUp = self._reactor.callLater(LOAD_WAIT, self._notLoaded)
        self.policy.start()
        self.policy.whenLoaded().addCallback(lambda _: self._release())

    def _hold(self, port):
        if self._loading and hasattr(port, "stopReading"):
            port.stopReading()
            self._held.append(port)

    def _notLoaded(self):
        self._giveUp = None
        self.log.warn(
            "accepting connections before the bans were read from the database (no answer within {seconds} s)",
            seconds=LOAD_WAIT,
            event="policy.not_loaded",
        )
        self._release()

    def _release(self):
        self._loading = False
        self._giveUp = cancelled(self._giveUp)
        held, self._held = self._held, []
        for port in held:
            if getattr(port, "connected", False) and not getattr(port, "disconnecting", False):
                port.startReading()

    def stopService(self):
        Service.stopService(self)
        self._loading = False
        self._giveUp = cancelled(self._giveUp)
        self._held = []
        self.policy.stop()
