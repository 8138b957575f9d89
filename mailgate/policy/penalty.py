# -*- test-case-name: tests.test_policy -*-
"""
The authentication penalty: how long to hold an authentication attempt
before checking it, from the recent failures of its address and of its
login name.

Per address it is Dovecot's (its C{auth_penalty}): after a failure from an
address, the next authentication from it waits 2 seconds, twice as long
after each further failure, at most C{maximum} seconds (15 by default);
a maximum of 0 turns the delay off.  A successful login from the address
clears it on the node that saw the success.

Per login name it slows the guessing of one account from many addresses,
which no per-address count sees: once failures against a name come from
L{NAME_ADDRESSES} different addresses within the window, every login
attempt for that name waits the same doubling delay, counted in the
addresses beyond the first few, and capped the same way.  It is a delay,
never a lockout: the real user still gets in, at most C{maximum} seconds
later, and the delay fades as the failures leave the window.
"""

from mailgate.timers import wallClock

INITIAL_DELAY = 2.0

# Different addresses failing against one login name before that name is
# slowed: a user mistyping on a phone and a laptop does not slow their own
# account for everyone.
NAME_ADDRESSES = 3


def penaltyDelay(failures, maximum, initial=INITIAL_DELAY):
    """
    Seconds to wait after C{failures} recent failures: C{initial}, doubled
    for each failure after the first, at most C{maximum}.
    """
    if failures <= 0 or maximum <= 0:
        return 0.0
    # 2 ** 30 seconds is past any maximum: no need to compute further.
    return float(min(initial * 2 ** min(failures - 1, 30), maximum))


def failuresToReach(maximum, initial=INITIAL_DELAY):
    """
    How many failures make L{penaltyDelay} reach C{maximum}.
    """
    failures = 1
    while failures < 32 and initial * 2 ** (failures - 1) < maximum:
        failures += 1
    return failures


class AuthPenalty:
    """
    @param failures: the L{mailgate.policy.failures.FailureLog} to read.
    @param maximum: the longest delay, in seconds; 0 for none.
    @param clock: provides C{seconds()}.
    """

    def __init__(self, failures, maximum, clock):
        self._failures = failures
        self.maximum = maximum
        self._clock = clock
        # Times shared with the database: the wall clock's (see wallClock).
        self._wall = wallClock(clock)
        # Address to the time of its latest successful login on this node.
        self._cleared = {}

    def _since(self):
        return self._wall() - self._failures.window

    def delay(self, key, login):
        """
        Seconds to hold an attempt from the address C{key} (C{None} for
        none) for the normalised login name C{login} (or C{None}).
        """
        if self.maximum <= 0:
            return 0.0
        since = self._since()
        delay = 0.0
        if key is not None:
            after = max(since, self._cleared.get(key, since))
            delay = penaltyDelay(self._failures.fromAddress(key, after), self.maximum)
        if login is not None and delay < self.maximum:
            # Enough addresses to reach the maximum, and no more, are counted.
            enough = NAME_ADDRESSES - 1 + failuresToReach(self.maximum)
            addresses = self._failures.addressesAgainst(login, since, enough)
            delay = max(delay, penaltyDelay(addresses - NAME_ADDRESSES + 1, self.maximum))
        return delay

    def succeeded(self, key):
        """
        A login from C{key} succeeded: its earlier failures no longer delay
        it (they still count towards a ban).
        """
        if key is not None:
            self._cleared[key] = self._wall()

    def prune(self):
        """
        Forget successes older than the window.
        """
        since = self._since()
        for key in [k for k, at in self._cleared.items() if at <= since]:
            del self._cleared[key]
