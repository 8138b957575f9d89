# -*- test-case-name: tests.test_lifecycle -*-
"""
The store's background work on every node: the retention task (messages
older than their user's EXPIRE, and kept deleted mail past its time), and
the node's part of the POP3 session registry.

It is safe to run on every node at once: a maildrop is worked on only
under its POP3 lock, taken without waiting (a maildrop in use is skipped
until the next pass), and every removal is a C{DELETE ... RETURNING}, so
no message is ever released twice.

Both services are given their reactor, and start their timers once it
runs (C{twistd} starts services before it runs the reactor; an embedder's
running reactor starts them at once), as L{mailgate.policy.service} does.
"""

import os
import random

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger

from mailgate.errors import TemporaryFailure
from mailgate.store import registry
from mailgate.timers import cancelled


class _Repeating(Service):
    """
    A service that runs its C{runOnce} every C{interval} seconds, each pass
    timed from the end of the one before, so that passes never pile up
    behind a slow database.  Subclasses set C{_reactor} and C{_call} (the
    timer, cancelled when they stop).
    """

    def _schedule(self, delay):
        if self.running:
            self._call = self._reactor.callLater(delay, self._tick)

    #: the next pass is due as soon as the one under way ends (see
    #: L{RetentionService.runSoon})
    _soon = False

    def _tick(self):
        self._call = None
        d = self.runOnce()
        d.addBoth(lambda _: self._next())

    def _next(self):
        soon, self._soon = self._soon, False
        self._schedule(0 if soon else self.interval)


class RetentionService(_Repeating):
    """
    Runs the retention task every L{interval} seconds (the first pass
    after a random part of it, so that nodes started together spread
    out), in small batches: each pass works on at most L{usersPerPass}
    maildrops, and passes follow each other only while they find work, up
    to L{maxPasses}.

    @ivar running: the L{Deferred} of the pass under way, if any.
    """

    interval = 600.0
    refreshInterval = 30.0
    usersPerPass = 100
    messagesPerTransaction = 500
    # Rows of recent_deliveries (one per recipient of every message) are
    # small and go in a few statements: 500 a pass, 10,000 a round, fell
    # behind a server storing more than 1.4 million copies a day, and the
    # table grew without end.
    deliveriesPerTransaction = 5000
    maxPasses = 20
    log = Logger()

    def __init__(self, store, reactor, interval=None, refreshInterval=None, metrics=None):
        self._store = store
        self._reactor = reactor
        # Counts each round and what it removed (mailgate.metrics).
        self._metrics = metrics
        if interval is not None:
            self.interval = interval
        if refreshInterval is not None:
            self.refreshInterval = refreshInterval
        self._call = None
        self._refreshCall = None
        self.active = None

    def startService(self):
        Service.startService(self)
        self._reactor.callWhenRunning(self._start)

    def _start(self):
        if self.running:
            self._schedule(random.uniform(0, self.interval / 10))
            self._refreshCall = self._reactor.callLater(0, self._refresh)

    def _refresh(self):
        """
        Reload the users' own retention values, for EXPIRE in CAPA.
        """
        d = self._store.retention.refresh()

        def again(_):
            if self.running:
                self._refreshCall = self._reactor.callLater(self.refreshInterval, self._refresh)

        d.addBoth(again)

    def runSoon(self):
        """
        Run the next round now rather than at its time (a reload changed
        the server's retention defaults, which it reads at each pass): what
        a shorter retention removes goes at once; while a round is under
        way (it may have passed what the new defaults remove), as soon as
        it ends.  Nothing before the first round is scheduled.
        """
        if not self.running:
            return
        if self._call is not None:
            self._call = cancelled(self._call)
            self._schedule(0)
        elif self.active is not None:
            self._soon = True

    def stopService(self):
        Service.stopService(self)
        self._call = cancelled(self._call)
        self._refreshCall = cancelled(self._refreshCall)
        # Let a pass under way finish its transaction.
        return self.active

    def runOnce(self):
        """
        One round of the task; the L{Deferred} fires with C{(expired,
        purged)} and never fails (failures are logged: the next round
        tries again).
        """
        if self.active is not None:
            return self.active
        self.active = d = self._run()

        def failed(failure):
            if failure.check(TemporaryFailure):
                # The database is away (or closing at shutdown): the next
                # round tries again.
                self.log.warn("retention task: {reason}", reason=failure.value, event="retention.failed")
            else:
                self.log.failure("retention task failed", failure, event="retention.failed")
            if self._metrics is not None:
                self._metrics.retentionRound("failed")
            return (0, 0)

        def done(result):
            self.active = None
            return result

        return d.addErrback(failed).addBoth(done)

    @defer.inlineCallbacks
    def _run(self):
        store = self._store
        if store.sessions.clockAhead:
            # What it removes it judges by times other nodes wrote, which
            # look older to it than they are (see SessionRegistry.clockAhead).
            self.log.warn(
                "retention: pass skipped: this node's clock is {seconds:.0f} s ahead of the database server's, "
                "and the other nodes' times look that much older; nothing is removed until the clocks agree "
                "(NTP, chrony)",
                seconds=store.sessions.clockOffset.seconds,
                event="retention.clock_ahead",
            )
            if self._metrics is not None:
                self._metrics.retentionRound("skipped")
            return (0, 0)
        expired = busy = 0
        for _ in range(self.maxPasses):
            done = yield store.expireMessages(self.usersPerPass, self.messagesPerTransaction)
            removed, skipped = done
            expired += removed
            busy = skipped
            if self._metrics is not None:
                self._metrics.retentionRemoved("expired", removed)
            for address, messages, days in getattr(done, "removedFrom", ()):
                # Each maildrop on a line of its own, as a POP3 session's
                # deletions are in its pop3.logout line: what removed a
                # user's mail can be looked up.
                self.log.info(
                    "retention expired user={user} messages={messages} days={days}",
                    user=address,
                    messages=messages,
                    days=days,
                    event="retention.expired",
                )
            failure = getattr(done, "failure", None)
            if failure is not None:
                # Told above what it removed before the failure; the round
                # ends as failed.
                failure.raiseException()
            # A pass that examined maildrops and found nothing to remove
            # in them made their oldest arrivals exact (a POP3 deletion
            # leaves it behind): the next pass finds others, which may
            # hold expired mail.  Only a pass that did neither (no
            # candidates left, or all of them in use) ends the round.
            if not removed and not getattr(done, "examined", 0):
                break
        purged = 0
        for _ in range(self.maxPasses):
            removed = yield store.purgeDeleted(self.messagesPerTransaction)
            purged += removed
            if self._metrics is not None:
                self._metrics.retentionRemoved("purged", removed)
            if removed < self.messagesPerTransaction:
                break
        if expired or purged:
            self.log.info(
                "retention: removed {expired} expired messages and {purged} kept deleted messages"
                + ("; {busy} maildrops in use skipped" if busy else ""),
                expired=expired,
                purged=purged,
                busy=busy,
                event="retention.removed",
            )
        # The deliveries kept to know a client's retry, past their window:
        # bounded work, as above, and not worth a line of the log.
        for _ in range(self.maxPasses):
            forgotten = yield store.forgetDeliveries(self.deliveriesPerTransaction)
            if forgotten < self.deliveriesPerTransaction:
                break
        if self._metrics is not None:
            self._metrics.retentionRound("completed")
        return expired, purged


class RegistryService(_Repeating):
    """
    Keeps this node's part of the POP3 session registry in the database
    (L{mailgate.store.registry}): every L{interval} seconds, writes the
    sessions that came and went (and the heartbeat, when due), and ends
    the sessions C{mailgate kick} marked.  At shutdown, the node's rows go.

    Every L{compareInterval} seconds it also compares the settings the
    other live nodes announce with this node's, and warns when they
    differ (C{node.settings_differ}, once for each change of what
    differs): nodes sharing a database with different quotas accept mail
    the others refuse, and the retention task keeps mail as long as the
    node that keeps it longest.
    """

    interval = 1.0
    compareInterval = 30.0
    log = Logger()

    def __init__(
        self, store, reactor, name=None, interval=None, metrics=None, quotaExceeded=None, recipientDelimiter=None
    ):
        self._store = store
        self._reactor = reactor
        self._metrics = metrics
        if quotaExceeded is not None:
            # Announced with the store's limits (see registry.nodeSettings).
            store.sessions.quotaExceeded = quotaExceeded
        store.sessions.recipientDelimiter = recipientDelimiter
        self._hostname = name
        if interval is not None:
            self.interval = interval
        self._call = None
        self.active = None
        self._failing = False
        self._compared = None
        self.differences = []
        self.clockSkewed = False

    def announce(self, quotaExceeded, recipientDelimiter):
        """
        A reload changed this node's settings (its quota-exceeded,
        recipient-delimiter, or the store's limits): written at the next
        flush, within L{interval} seconds rather than at the heartbeat,
        and compared with the other nodes' at the next pass, so that
        C{node.settings_differ} (or C{node.settings_same}) speaks of the
        settings in service.
        """
        sessions = self._store.sessions
        sessions.quotaExceeded = quotaExceeded
        sessions.recipientDelimiter = recipientDelimiter
        sessions.announceSoon()
        self._compared = None

    def rename(self, name):
        """
        A reload changed the host name: the node is shown by it (C{mailgate
        nodes}, C{who}, the other nodes' warnings) from its next flush on,
        within L{interval} seconds.
        """
        self._hostname = name
        if self.running:
            self._store.sessions.name = f"{name}[{os.getpid()}]"
            self._store.sessions.announceSoon()

    def startService(self):
        Service.startService(self)
        if self._hostname is not None:
            # The configured host name, and the process (several may run
            # on one machine): its id as it is now, twistd having made
            # itself a daemon (a fork, a new process id) since the service
            # was made.
            self._store.sessions.name = f"{self._hostname}[{os.getpid()}]"
        self._reactor.callWhenRunning(self._schedule, 0)

    def _compareSettings(self):
        """
        Compare this node's settings with the other live nodes', when due,
        and say so when what differs has changed.
        """
        now = self._reactor.seconds()
        if self._compared is not None and now - self._compared < self.compareInterval:
            return None
        self._compared = now

        def compared(differences):
            if self._metrics is not None:
                self._metrics.settingsDiffer({option.lstrip("-").replace("-", "_") for option, _, _, _ in differences})
            if differences == self.differences:
                return
            self.differences = differences
            if differences:
                self.log.warn(
                    "nodes sharing the database differ in settings: {described}; give every node the same "
                    "(the retention task keeps mail as long as the node that keeps it longest)",
                    described="; ".join(
                        f"{option} {_shown(option, ours)} here, {_shown(option, theirs)} on {node}"
                        for option, ours, node, theirs in differences
                    ),
                    differences=[
                        {"option": option, "here": ours, "node": node, "there": theirs}
                        for option, ours, node, theirs in differences
                    ],
                    event="node.settings_differ",
                )
            else:
                self.log.info("nodes sharing the database: settings the same again", event="node.settings_same")

        d = self._store.sessions.otherSettings().addCallback(compared)
        return d.addCallback(lambda _: self._compareClocks())

    def _compareClocks(self):
        """
        Say when this node's clock and the database server's come apart,
        and when they agree again (measured by L{otherSettings}).
        """
        offset = self._store.sessions.clockOffset
        if offset is None:
            return
        if self._metrics is not None:
            self._metrics.clockOffset(offset.seconds)
        if offset.skewed and not self.clockSkewed:
            self.clockSkewed = True
            self.log.warn(
                "this node's clock is {seconds:.1f} s {direction} the database server's: nodes tell which of "
                "them are alive by the times of their heartbeats, so with clocks more than {stale} s apart "
                "`mailgate who` and `mailgate kick` miss the sessions of one node; keep every node's clock "
                "in step (NTP)",
                seconds=abs(offset.seconds),
                direction="ahead of" if offset.seconds > 0 else "behind",
                stale=registry.STALE_AFTER,
                offset=round(offset.seconds, 1),
                event="node.clock_skew",
            )
        elif offset.agrees and self.clockSkewed:
            self.clockSkewed = False
            self.log.info(
                "this node's clock agrees with the database server's again (within {seconds:.1f} s)",
                seconds=abs(offset.seconds),
                offset=round(offset.seconds, 1),
                event="node.clock_agrees",
            )

    def stopService(self):
        Service.stopService(self)
        self._call = cancelled(self._call)
        d = defer.maybeDeferred(lambda: self.active)
        d.addBoth(lambda _: self._store.sessions.leave())
        d.addErrback(
            lambda failure: self.log.warn(
                "leaving the session registry: {reason}", reason=failure.value, event="registry.leave_failed"
            )
        )
        return d

    def runOnce(self):
        """
        Write what changed and end the kicked sessions; never fails
        (failures are logged once, until the next success).
        """
        if self.active is not None:
            return self.active
        registry = self._store.sessions
        self.active = d = defer.Deferred()
        d.addCallback(lambda _: registry.flush() if registry.due() else None)
        d.addCallback(lambda _: registry.poll())
        d.addCallback(lambda _: self._compareSettings())

        def done(result):
            if self._failing:
                self._failing = False
                self.log.info("session registry: written again", event="registry.recovered")
            return result

        def failed(failure):
            if not self._failing:
                self._failing = True
                if failure.check(TemporaryFailure):
                    self.log.warn("session registry: {reason}", reason=failure.value, event="registry.failed")
                else:
                    self.log.failure("session registry", failure, event="registry.failed")
            return None

        def finished(result):
            self.active = None
            return result

        d.addCallbacks(done, failed).addBoth(finished)
        d.callback(None)
        return d


def _shown(option, value):
    """
    A setting's value as L{mailgate.store.registry.nodeSettings} gives it,
    for the warning: -1 (and an empty list or delimiter) is none, or
    never for C{--expire-days}, as the option, C{mailgate nodes} and
    README spell it.
    """
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    if value == -1 and option == "--expire-days":
        return "never"
    return "none" if value in (-1, "") else str(value)
