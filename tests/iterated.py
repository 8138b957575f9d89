"""
A real reactor of the test's own, for code that reads and writes sockets
from the reactor thread (the PostgreSQL lock connections).
"""

import time

from twisted.internet.epollreactor import EPollReactor
from waiting import MustSucceed


class IteratedReactor(MustSucceed, EPollReactor):
    """
    An epoll reactor that is neither installed nor run: L{wait} turns it,
    one iteration at a time, until a L{Deferred} has fired.  Calls from
    worker threads (C{callFromThread}) arrive through its waker as usual.
    """

    def wait(self, d, timeout=30):
        """
        The result of the L{Deferred} C{d} (a L{Failure} if it failed),
        iterating until it has one.
        """
        results = []
        d.addBoth(results.append)
        self.turnUntil(lambda: results, timeout)
        return results[0]

    def turnUntil(self, done, timeout=30):
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, "nothing happened in time"
            # An iteration as iterate(0.05) runs it, but looking at done()
            # between running what is due (a worker thread's answer, say)
            # and waiting for descriptors: once it is done, nothing would
            # wake the wait, and it would sit out its 50 ms for nothing.
            self.runUntilCurrent()
            if done():
                break
            self.doIteration(0.05)

    def close(self):
        """
        Give back the epoll and waker descriptors.
        """
        self.removeAll()
        self.waker.connectionLost(None)
        self._poller.close()
