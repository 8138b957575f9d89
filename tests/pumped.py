"""
A stand-in for the reactor thread, for tests of code that hands work to
real worker threads (the database's, the lock slots').
"""

import queue
import time

from waiting import MustSucceed


class PumpedReactor(MustSucceed):
    """
    Just enough of a reactor for L{mailgate.store.database.Database} and
    L{mailgate.store.postgres.AdvisoryLocks}: calls from the worker threads
    are queued and run by L{pump} on the test's thread, which plays the
    reactor thread.
    """

    def __init__(self):
        self.calls = queue.SimpleQueue()

    def callWhenRunning(self, function, *args):
        function(*args)

    def addSystemEventTrigger(self, *args):
        return object()

    def removeSystemEventTrigger(self, trigger):
        pass

    def callFromThread(self, function, *args):
        self.calls.put((function, args))

    def callLater(self, delay, function, *args, **kwargs):
        """
        A timer that never fires (a timeout the test does not reach):
        L{pump}'s own deadline bounds every wait.
        """
        return _NeverCalled()

    def pump(self, done, timeout=30):
        """
        Run the calls handed over until C{done()} is true.
        """
        deadline = time.monotonic() + timeout
        while not done():
            remaining = deadline - time.monotonic()
            assert remaining > 0, "the worker threads did not answer in time"
            try:
                function, args = self.calls.get(timeout=remaining)
            except queue.Empty:
                continue
            function(*args)

    def wait(self, d, timeout=30):
        """
        The result of the L{Deferred} C{d}, pumping until it has one.
        """
        results = []
        d.addBoth(results.append)
        self.pump(lambda: results, timeout)
        return results[0]


class _NeverCalled:
    def active(self):
        return True

    def cancel(self):
        pass
