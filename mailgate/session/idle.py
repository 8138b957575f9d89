# -*- test-case-name: tests.test_session_core -*-
"""
The inactivity timer every session has.
"""

from mailgate.timers import cancelled


class IdleTimer:
    """
    A session's inactivity timer: one timer per session, rescheduled
    lazily.  Activity only records a time stamp, so a busy session does not
    pay for cancelling and rescheduling a timer on every command.

    @param clock: provides C{seconds} and C{callLater} (the reactor).
    @param timeout: seconds of inactivity allowed; 0 for none.
    @param expired: called once the session has been idle for C{timeout}.
    @param busy: returns whether the session is working on something the
        client is waiting for (then it is not idle, whatever the time).
    """

    def __init__(self, clock, timeout, expired, busy):
        self._clock = clock
        self.timeout = timeout
        self._expired = expired
        self._busy = busy
        self._call = None
        self.lastActivity = 0

    def activity(self):
        self.lastActivity = self._clock.seconds()

    def start(self):
        self.activity()
        if self.timeout and self._call is None:
            self._call = self._clock.callLater(self.timeout, self._check)

    def cancel(self):
        self._call = cancelled(self._call)

    def _check(self):
        self._call = None
        idle = self._clock.seconds() - self.lastActivity
        if idle < self.timeout or self._busy():
            delay = self.timeout - idle if idle < self.timeout else self.timeout
            self._call = self._clock.callLater(delay, self._check)
            return
        self._expired()
