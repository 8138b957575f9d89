# -*- test-case-name: tests.test_hostile_load -*-
"""
Which refused connections get a log line.

A banned address, or a scanner hammering a full server, may connect
hundreds of times a second, each connection refused at once: one
C{session.refused} line each would be a log flood of one client's
making, hiding everything else and filling the disk.  L{RefusalLog}
lets through the first refusal of a client address for a reason, then
at most one a minute for it, saying how many were not logged since
(C{mailgate_connections_refused_total} counts every one).  Who was
refused, from where and why is all still there.
"""


class RefusalLog:
    """
    @param clock: provides C{seconds()} (the reactor).
    @ivar interval: seconds between two lines of one address and reason.
    @ivar maxEntries: addresses remembered; past it, those whose minute is
        over are forgotten (and, if that is not enough, all: some
        refusals are then logged again, none is lost).
    """

    interval = 60.0
    maxEntries = 10000

    def __init__(self, clock):
        self._clock = clock
        #: (host, reason) -> [time of the last line, refusals not logged since]
        self._seen = {}

    def note(self, host, reason):
        """
        A connection from C{host} was refused for C{reason}.

        @return: C{None} if it is not to be logged, or how many refusals
            of C{host} for C{reason} were not logged since its last line.
        """
        now = self._clock.seconds()
        key = (host, reason)
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < self.interval:
            seen[1] += 1
            return None
        skipped = seen[1] if seen is not None else 0
        if seen is None and len(self._seen) >= self.maxEntries:
            self._forgetOld(now)
        self._seen[key] = [now, 0]
        return skipped

    def _forgetOld(self, now):
        self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.interval}
        if len(self._seen) >= self.maxEntries:
            self._seen = {}
