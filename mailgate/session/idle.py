# -*- test-case-name: tests.test_session_core -*-
"""
The inactivity timer every session has.
"""

from mailgate.timers import cancelled, elapsedClock


class IdleTimer:
    """
    A session's inactivity timer: one timer per session, rescheduled
    lazily.  Activity only records a time stamp, so a busy session does not
    pay for cancelling and rescheduling a timer on every command.

    @param clock: provides C{seconds} and C{callLater} (the reactor).  The
        time idle is measured on L{elapsedClock}: the reactor's timers run
        on the wall clock, and a step of it forward made every check due
        at once and every session look idle for the step's length.
    @param timeout: seconds of inactivity allowed; 0 for none.
    @param expired: called once the session has been idle for C{timeout}.
    @param busy: returns whether the session is working on something the
        client is waiting for (then it is not idle, whatever the time).
    @param shortened: returns a shorter timeout that applies for now (the
        server under stress), or C{None}; asked at each check, so a session
        whose check was due in minutes is held to it from that check on.
    """

    def __init__(self, clock, timeout, expired, busy, shortened=None):
        self._clock = clock
        self._now = elapsedClock(clock)
        self.timeout = timeout
        self._expired = expired
        self._busy = busy
        self._shortened = shortened
        self._call = None
        self._cancelled = False
        self.lastActivity = 0

    def _limit(self):
        if self._shortened is not None:
            shorter = self._shortened()
            if shorter is not None and (not self.timeout or shorter < self.timeout):
                return shorter
        return self.timeout

    def activity(self):
        self.lastActivity = self._now()

    def start(self):
        self.activity()
        limit = self._limit()
        if limit and self._call is None:
            self._call = self._clock.callLater(limit, self._check)

    def recheck(self):
        """
        Check again now what the timer would check when due: the timeout
        that applies may have shortened since it was set, or apply where
        none did (no C{timeout}, and the server was not under stress).
        """
        if self._cancelled:
            return
        self._call = cancelled(self._call)
        self._check()

    def cancel(self):
        self._cancelled = True
        self._call = cancelled(self._call)

    def _check(self):
        self._call = None
        idle = self._now() - self.lastActivity
        limit = self._limit()
        if not limit:
            # No timeout applies now (none is set, and the stress whose
            # shorter one set this check is over): nothing to check until
            # one does (L{recheck}).  Checked against 0, every session
            # whose check was due was closed at once, busy or not.
            return
        if idle < limit or self._busy():
            delay = limit - idle if idle < limit else limit
            self._call = self._clock.callLater(delay, self._check)
            return
        self._expired()
