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

And how many refused connections may hold a descriptor while they wait
for their TLS handshake (L{refusedInHandshake}).  It lives here, with the
session core, rather than beside the descriptor limits in
L{mailgate.policy.descriptors}: the session core sees no policy module.
"""

from mailgate.networks import clientOfHost
from mailgate.timers import elapsedClock


class RefusalLog:
    """
    @param clock: provides C{seconds()} (the reactor); the minute is
        measured on L{elapsedClock}, or a step of the wall clock back made
        it last as long as the step.
    @ivar interval: seconds between two lines of one address and reason.
    @ivar maxEntries: addresses remembered; past it, those whose minute is
        over are forgotten (and, if that is not enough, all: some
        refusals are then logged again, none is lost).
    """

    interval = 60.0
    maxEntries = 10000

    def __init__(self, clock):
        self._now = elapsedClock(clock)
        #: (host, reason) -> [time of the last line, refusals not logged since]
        self._seen = {}

    def note(self, host, reason):
        """
        A connection from C{host} was refused for C{reason}.  The hosts of
        one IPv6 /64 count as one (L{mailgate.networks.clientOfHost}).

        @return: C{None} if it is not to be logged, or how many refusals
            of C{host} for C{reason} were not logged since its last line.
        """
        now = self._now()
        # One client is one client whatever address it takes: an IPv6 one
        # is its /64, as the policy bans it.  Keyed by address, a banned
        # /64 taking a new address for every connection had each refusal
        # logged.
        key = (clientOfHost(host) if isinstance(host, str) else host, reason)
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


#: connections refused as they arrived on an implicit-TLS listener that may
#: wait for their handshake at once (to read their refusal, see
#: L{mailgate.session.tlslayer.TLSLayer.refusalTimeout}).  Refused, they
#: are counted in no connection limit, and each holds its descriptor for
#: as long as it waits: a banned scanner hammering C{--pop3s} would hold
#: its rate times the wait.  So they come out of the descriptors the
#: policy keeps apart (L{mailgate.policy.descriptors.RESERVED}), beside the
#: two turns' worth of refusals let go at once, and past this many a
#: refused connection still in its handshake is aborted at once, unanswered.
REFUSED_IN_HANDSHAKE = 32


class DescriptorAllowance:
    """
    Descriptors some kind of connection may hold at once, out of those kept
    apart (L{mailgate.policy.descriptors.RESERVED}): L{take} one before
    holding it, L{give} it back once let go; when L{take} says no,
    descriptors are short for that kind, and the connection is closed at
    once.

    @ivar size: how many may be held at once.
    @ivar held: how many are held now.
    """

    def __init__(self, size):
        self.size = size
        self.held = 0

    def take(self):
        """
        @return: whether one more may be held (it is then counted held).
        """
        if self.held >= self.size:
            return False
        self.held += 1
        return True

    def give(self):
        """
        One taken is let go.
        """
        if self.held > 0:
            self.held -= 1


#: the process's refused connections waiting for their TLS handshake (one
#: allowance for all listeners: descriptors are the process's)
refusedInHandshake = DescriptorAllowance(REFUSED_IN_HANDSHAKE)
