# -*- test-case-name: tests.test_policy -*-
"""
L{StoreSync}: keeps a node's in-memory view in step with the shared store,
in the background.

On a timer driven by the reactor it is given (never a global one), every
L{REFRESH_INTERVAL} seconds, it reads the store's ban version (the bans
too, only when that moved) and the failures recorded since its previous
read: one cheap read, so that a ban made by another node is enforced here
within a second, and one added or lifted by the admin command as fast (as
are the failures it forgot, lifting a ban or not: a marker among the
failures says so, L{mailgate.records.FORGOTTEN_PREFIX}).
Every L{EXPIRE_INTERVAL} seconds it also has the store drop the failures
older than the window and the bans that ended, so the tables stay bounded.

It also writes this node's failures (and bans) to the store, without
anyone waiting for them.  A store that cannot be reached is logged once
when it fails and once when it is back; meanwhile the node enforces what
it knows.
"""

from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from mailgate.records import banTarget, forgottenBy, recipientsAddress
from mailgate.timers import wallClock

REFRESH_INTERVAL = 0.5
EXPIRE_INTERVAL = 60.0
# Failures read again from before the previous refresh started: a failure
# committed late by another node (its transaction began before our read
# and ended after) is still seen, and so is one stamped by a node whose
# clock lags this one's, by up to 10 s: two nodes each within the 5 s of
# the database's clock that their clock check lets pass without a warning
# (mailgate.store.registry.CLOCK_SKEW), one on either side.  With 2 s, a
# node 3 s behind the others had its failures read by none of them: the
# penalty they earned held no login there.  Read twice is counted once
# (by id).
OVERLAP = 12.0


class StoreSync:
    """
    @param store: the L{mailgate.interfaces.IPolicyStore}.
    @param reactor: provides C{seconds} and C{callLater} (the timer's clock).
    @param settings: the L{mailgate.policy.settings.PolicySettings}.
    @param failures: the node's L{mailgate.policy.failures.FailureLog}.
    @param bans: the node's L{mailgate.policy.bans.BanList}.
    @param penalty: the node's L{mailgate.policy.penalty.AuthPenalty}.
    """

    log = Logger(namespace="mailgate.policy")

    def __init__(self, store, reactor, settings, failures, bans, penalty, interval=REFRESH_INTERVAL):
        self.store = store
        self._reactor = reactor
        # Times shared with the database: the wall clock's (see wallClock).
        self._wall = wallClock(reactor)
        self._settings = settings
        self._failures = failures
        self._bans = bans
        self._penalty = penalty
        self.interval = interval
        self._loop = None
        self._refreshing = False
        self._since = None
        self._lastExpiry = None
        self._storeFailing = False
        self.refreshes = 0
        self._loadWaiters = []

    def reconfigure(self, settings):
        """
        Other L{mailgate.policy.settings.PolicySettings} (a reload): the
        failures recorded from now on make bans by them, and the store's
        are read and expired over their window.
        """
        self._settings = settings

    # -- the timer --------------------------------------------------------

    def start(self):
        """
        Refresh now, then every L{interval} seconds.
        """
        if self._loop is None:
            self._loop = LoopingCall(self.refresh)
            self._loop.clock = self._reactor
            self._loop.start(self.interval, now=True)

    def stop(self):
        if self._loop is not None:
            loop, self._loop = self._loop, None
            if loop.running:
                loop.stop()
        self._loaded()

    def whenLoaded(self):
        """
        A L{Deferred} that fires (with C{None}) once the first refresh has
        ended, having read the store's bans and failures or having failed
        to (the node then enforces what it knows, as after any failed
        refresh), or once the timer is stopped.
        """
        if self.refreshes:
            return defer.succeed(None)
        d = defer.Deferred()
        self._loadWaiters.append(d)
        return d

    def _loaded(self):
        waiters, self._loadWaiters = self._loadWaiters, []
        for d in waiters:
            d.callback(None)

    # -- reading ------------------------------------------------------------

    def refresh(self):
        """
        Read what changed in the store and apply it.  Returns nothing (the
        timer never waits for the database); a refresh still running when
        the next is due makes that one skip.
        """
        if self._refreshing:
            return
        self._refreshing = True
        now = self._wall()
        # From the last read's start, or from now if that is later: after
        # a step of the clock back (on every node: their NTP server
        # corrected), the failures recorded since are older than the last
        # read, and would not be read until the clock caught up with it.
        since = now - self._settings.banWindow if self._since is None else min(self._since, now - OVERLAP)
        d = self.store.changes(self._bans.version, since, now)
        d.addCallbacks(self._apply, self._failed, callbackArgs=(now,), errbackArgs=("refresh",))
        d.addBoth(self._refreshed)
        self._expireIfDue(now)

    def _apply(self, changes, started):
        self._since = started - OVERLAP
        forgettings = []
        for failure in changes.failures:
            # A marker of ban del (forget:ADDRESS) is applied once, when
            # first read (the failure log knows it by its id), after the
            # failures read with it: those up to its time are forgotten.
            if self._failures.add(failure):
                forgotten = forgottenBy(failure.address)
                if forgotten is not None:
                    forgettings.append((forgotten, failure.at))
        for address, upTo in forgettings:
            self._failures.forget(address, upTo)
            self._failures.forget(recipientsAddress(address), upTo)
        for address in self._bans.update(changes.version, changes.bans):
            self._failures.forget(address)
            self._failures.forget(recipientsAddress(address))
        self._recovered()

    def _refreshed(self, _):
        self._refreshing = False
        self.refreshes += 1
        now = self._wall()
        self._failures.prune(now)
        self._penalty.prune()
        self._bans.sweep()
        self._loaded()

    def _expireIfDue(self, now):
        if self._lastExpiry is not None and now - self._lastExpiry < EXPIRE_INTERVAL:
            return
        self._lastExpiry = now
        d = self.store.expire(now, now - self._settings.banWindow)
        d.addErrback(self._failed, "expiry")

    # -- writing ------------------------------------------------------------

    def record(self, failure, ban, banAfter=None):
        """
        Write a failure to the store (and the ban it made here, if C{ban});
        a ban the store makes from every node's failures is enforced here
        as soon as the write returns.

        @param banAfter: the failures that make a ban; C{None} for the
            settings' C{banAfter} (failed logins; unknown recipients,
            recorded under C{rcpt:ADDRESS}, have their own).
        """
        settings = self._settings
        d = self.store.recordFailure(
            failure, settings.banAfter if banAfter is None else banAfter, settings.banWindow, settings.banTime,
            ban=ban,
        )
        address, _ = banTarget(failure.address)

        def recorded(outcome):
            if outcome.ban is not None and self._bans.get(address) is None:
                self._bans.made(outcome.ban)
            if outcome.banned:
                self._bans.stored(address, outcome.version, outcome.ban)
            self._recovered()

        what = "recording a failed login" if banAfter is None else "recording an unknown recipient"
        return d.addCallbacks(recorded, self._failed, errbackArgs=(what,))

    # -- the store's health -------------------------------------------------

    def _failed(self, failure, what):
        if not self._storeFailing:
            self._storeFailing = True
            self.log.warn(
                "connection policy: {what} failed, enforcing what this node knows: {reason}",
                what=what,
                reason=failure.getErrorMessage(),
                event="policy.store_failed",
            )

    def _recovered(self):
        if self._storeFailing:
            self._storeFailing = False
            self.log.info("connection policy: the store answers again", event="policy.store_recovered")
