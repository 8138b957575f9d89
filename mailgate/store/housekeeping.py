# -*- test-case-name: tests.test_lifecycle -*-
"""
The store's background work on every node: the retention task (messages
older than their user's EXPIRE, and kept deleted mail past its time).

It is safe to run on every node at once: a maildrop is worked on only
under its POP3 lock, taken without waiting (a maildrop in use is skipped
until the next pass), and every removal is a C{DELETE ... RETURNING}, so
no message is ever released twice.
"""

import random

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger

from mailgate.errors import TemporaryFailure


class RetentionService(Service):
    """
    Runs the retention task every L{interval} seconds (the first pass
    after a random part of it, so that nodes started together spread
    out), in small batches: each pass works on at most L{usersPerPass}
    maildrops, and passes follow each other only while they find work, up
    to L{maxPasses}.

    @ivar running: the L{Deferred} of the pass under way, if any.
    """

    interval = 600.0
    usersPerPass = 100
    messagesPerTransaction = 500
    maxPasses = 20
    log = Logger()

    def __init__(self, store, reactor, interval=None):
        self._store = store
        self._reactor = reactor
        if interval is not None:
            self.interval = interval
        self._call = None
        self.active = None

    def startService(self):
        Service.startService(self)
        self._schedule(random.uniform(0, self.interval / 10))

    def stopService(self):
        Service.stopService(self)
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        # Let a pass under way finish its transaction.
        return self.active

    def _schedule(self, delay):
        if self.running:
            self._call = self._reactor.callLater(delay, self._tick)

    def _tick(self):
        self._call = None
        d = self.runOnce()
        d.addBoth(lambda _: self._schedule(self.interval))

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
                self.log.warn("retention task: {reason}", reason=failure.value)
            else:
                self.log.failure("retention task failed", failure)
            return (0, 0)

        def done(result):
            self.active = None
            return result

        return d.addErrback(failed).addBoth(done)

    @defer.inlineCallbacks
    def _run(self):
        store = self._store
        expired = busy = 0
        for _ in range(self.maxPasses):
            removed, skipped = yield store.expireMessages(self.usersPerPass, self.messagesPerTransaction)
            expired += removed
            busy = skipped
            if not removed:
                break
        purged = 0
        for _ in range(self.maxPasses):
            removed = yield store.purgeDeleted(self.messagesPerTransaction)
            purged += removed
            if removed < self.messagesPerTransaction:
                break
        if expired or purged:
            self.log.info(
                "retention: removed {expired} expired messages and {purged} kept deleted messages"
                "{busy}",
                expired=expired,
                purged=purged,
                busy=f"; {busy} maildrops in use skipped" if busy else "",
                event="retention.removed",
            )
        return expired, purged
