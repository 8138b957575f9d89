# -*- test-case-name: tests.test_shutdown -*-
"""
Every open session of a server, for a graceful shutdown.

Factories register their sessions with one L{SessionTracker}; when the
server stops, L{SessionTracker.shutdown} asks each to finish (a POP3
session gets the grace period to QUIT, an SMTP transaction whose data is
arriving is committed, an idle SMTP session is told C{421} at once), closes
what is still open when the grace period ends, and fires once every session
is gone, so that the store is closed only after the last of them.
"""

from twisted.internet import defer
from twisted.logger import Logger

from mailgate.timers import cancelled
from mailgate.plural import noun


class SessionTracker:
    """
    The open sessions of one server (any number of factories may share it).

    @param clock: the reactor, or a L{twisted.internet.task.Clock} in tests.
    @ivar stopping: whether a shutdown has begun; sessions connecting now
        are refused.
    @ivar ended: how many sessions have ended since the tracker was made
        (what L{mailgate.memory.MemoryTrimmer} watches).
    @cvar abortDelay: seconds after the grace period ends before sessions
        that were told to close but have not (a client that does not read)
        are aborted, and the shutdown is over whatever remains.
    """

    abortDelay = 5.0
    log = Logger()

    def __init__(self, clock):
        self._clock = clock
        self._sessions = set()
        self._waiting = []
        self._calls = []
        self.stopping = False
        self.ended = 0
        # End lines of sessions already gone that wait for an answer (see
        # holdEndLine), and whether the shutdown is over.
        self._endLines = set()
        self._over = False
        #: whether the server was under stress at the last connection
        #: (see CommandSession._noteStress)
        self.stressed = False

    def __len__(self):
        return len(self._sessions)

    def stressChanged(self, stressed):
        """
        The server came under stress, or out of it, other than by a
        connection: a reload changed max-connections
        (L{mailgate.policy.connection.ConnectionPolicy.reconfigure}).  Coming
        under it, the sessions open are held to the shorter idle timeout at
        once, as when a connection brings it (C{CommandSession._noteStress}):
        over a lowered limit no connection is admitted to do so, and the
        idle clients that had not logged in kept their slots for their whole
        login timeout while the log said they were being closed.  Checked
        whenever under stress (a reload is rare): L{stressed} is as the last
        connection found it, and the stress may have ended and come back
        since.
        """
        if stressed:
            for session in list(self._sessions):
                idle = getattr(session, "_idle", None)
                if idle is not None:
                    idle.recheck()
        self.stressed = stressed

    def __iter__(self):
        return iter(list(self._sessions))

    def add(self, session):
        """
        Register an admitted session.
        """
        self._sessions.add(session)
        if self.stopping:
            session.shutdownRequested()

    def remove(self, session):
        """
        A session is gone (its connection closed, what it held let go).
        """
        if session in self._sessions:
            self._sessions.remove(session)
            self.ended += 1
        if not self._sessions and self._waiting:
            self._finished()

    def holdEndLine(self, write):
        """
        A session already gone writes its end line later, once an answer
        it counts has come (a POP3 password still being hashed: its
        failure goes in the line), or after a bound of its own.  The
        shutdown never waits for it: C{write()} is called, with what is
        known then, once every session is gone (L{shutdown}'s end), so no
        line is lost to the reactor stopping first.
        """
        if self._over:
            write()
        else:
            self._endLines.add(write)

    def releaseEndLine(self, write):
        """
        The end line L{holdEndLine} was given is written.
        """
        self._endLines.discard(write)

    def shutdown(self, grace):
        """
        Stop every session gracefully.

        @param grace: seconds sessions get to finish what they are doing.
        @return: a L{Deferred} that fires when every session is gone (or,
            at the latest, L{abortDelay} seconds after the grace period).
        """
        d = defer.Deferred()
        self._waiting.append(d)
        if self.stopping:
            if not self._sessions:
                self._finished()
            return d
        self.stopping = True
        for session in list(self._sessions):
            session.shutdownRequested()
        # Sessions closing (their connection being let go, or closed just
        # now: nothing to finish) are not counted: the count is of those
        # the grace period is for.
        finishing = sum(1 for session in self._sessions if not session.closed)
        if finishing:
            self.log.info(
                f"shutting down: {{count}} {noun(finishing, 'session')} {noun(finishing, 'gets', 'get')} "
                f"{{grace}} {noun(grace, 'second')} to finish",
                count=finishing,
                grace=grace,
                event="session.shutdown",
            )
        if not self._sessions:
            self._finished()
            return d
        self._calls.append(self._clock.callLater(grace, self._graceOver, grace))
        return d

    def _graceOver(self, grace):
        # The sessions the grace ends (a POP3 session's deletions not
        # applied, a message still arriving not stored) are said, as a
        # warning: each one's own end line says "shutdown" alone, at info.
        cut = sum(1 for session in self._sessions if not session.closed)
        if cut:
            self.log.warn(
                f"shutdown: {{count}} {noun(cut, 'session')} still open when {noun(cut, 'its', 'their')} "
                f"{{grace}} {noun(grace, 'second')} of grace ran out: closed (a logged-in POP3 session without "
                f"applying its deletions)",
                count=cut,
                grace=grace,
                event="session.shutdown",
            )
        for session in list(self._sessions):
            session.graceExpired()
        if self._sessions:
            self._calls.append(self._clock.callLater(self.abortDelay, self._abort))

    def _abort(self):
        remaining = list(self._sessions)
        for session in remaining:
            transport = getattr(session, "transport", None)
            if transport is not None:
                transport.abortConnection()
        if self._sessions:
            self.log.warn(
                "shutdown: {count} " + noun(len(self._sessions), "session") + " did not end in time",
                count=len(self._sessions),
                event="session.shutdown",
            )
            self._sessions.clear()
        self._finished()

    def _finished(self):
        for call in self._calls:
            cancelled(call)
        del self._calls[:]
        self._over = True
        for write in list(self._endLines):
            write()
        self._endLines.clear()
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)
