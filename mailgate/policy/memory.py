# -*- test-case-name: tests.test_policy_store -*-
"""
L{MemoryPolicyStore}: failures and bans in this process's memory.

The in-memory implementation beside L{mailgate.interfaces.IPolicyStore}
(the SQL one is L{mailgate.store.policy.SQLPolicyStore}): what the policy's
unit tests run on, with a L{twisted.internet.task.Clock}, and what an
embedder's own mail store gets (one process, nothing kept across restarts).
Every method answers at once, with an already-fired L{Deferred}.
"""

import math

from twisted.internet import defer
from zope.interface import implementer

from mailgate.interfaces import IPolicyStore
from mailgate.records import (
    REASON_ADMIN,
    BanRecord,
    FailureOutcome,
    Forgotten,
    PolicyChanges,
    banTarget,
    recipientsAddress,
)


@implementer(IPolicyStore)
class MemoryPolicyStore:
    """
    @ivar failures: the recorded L{AuthFailure}s, oldest first.
    @ivar bans: address to L{BanRecord}.
    @ivar version: the ban version.
    @ivar forgotten: address to when its failures were forgotten without a
        ban (L{forgetFailures}).
    """

    def __init__(self):
        self.failures = []
        self.bans = {}
        self.version = 0
        self.forgotten = {}

    def _count(self, address, since):
        return sum(1 for f in self.failures if f.address == address and f.at > since)

    def _put(self, ban):
        self.bans[ban.address] = ban
        # One row per address in the SQL store: a ban replaces the marker.
        self.forgotten.pop(ban.address, None)
        self.version += 1

    def recordFailure(self, failure, banAfter, banWindow, banTime, ban=False):
        # rcpt:KEY: an unknown recipient from KEY, whose ban is KEY's.
        target, reason = banTarget(failure.address)
        existing = self.bans.get(target)
        if existing is not None and existing.expires > failure.at:
            count = self._count(failure.address, failure.at - banWindow)
            return defer.succeed(FailureOutcome(count, None, True, self.version))
        self.failures.append(failure)
        count = self._count(failure.address, failure.at - banWindow)
        if ban or (banAfter > 0 and count >= banAfter):
            made = BanRecord(target, reason, count, failure.at, failure.at + banTime)
            self._put(made)
            return defer.succeed(FailureOutcome(count, made, True, self.version))
        return defer.succeed(FailureOutcome(count, None, False, self.version))

    def addBan(self, address, at, duration, reason=REASON_ADMIN):
        ban = BanRecord(address, reason, 0, at, at + duration)
        self._put(ban)
        return defer.succeed(ban)

    def removeBan(self, address):
        removed = self.bans.pop(address, None) is not None
        if removed:
            forgotten = {address, recipientsAddress(address)}
            self.failures = [f for f in self.failures if f.address not in forgotten]
            self.version += 1
        return defer.succeed(removed)

    def forgetFailures(self, address, at):
        logins = sum(1 for f in self.failures if f.address == address)
        recipients = sum(1 for f in self.failures if f.address == recipientsAddress(address))
        if logins or recipients:
            forgotten = {address, recipientsAddress(address)}
            self.failures = [f for f in self.failures if f.address not in forgotten]
            self.forgotten[address] = math.floor(at)
            self.version += 1
        return defer.succeed(Forgotten(logins, recipients))

    def _inForce(self, at):
        return tuple(sorted((b for b in self.bans.values() if b.expires > at), key=lambda b: b.address))

    def listBans(self, at):
        return defer.succeed(list(self._inForce(at)))

    def changes(self, version, failuresSince, at):
        bans = forgotten = None
        if version != self.version:
            bans = self._inForce(at)
            forgotten = tuple(self.forgotten.items())
        # Whole seconds, as the SQL store keeps them: a caller asking from
        # a fraction of a second gets the failures of that whole second.
        since = math.floor(failuresSince)
        failures = tuple(f for f in self.failures if f.at >= since)
        return defer.succeed(PolicyChanges(self.version, bans, failures, forgotten))

    def expire(self, at, failuresBefore):
        kept = [f for f in self.failures if f.at >= failuresBefore]
        ended = [a for a, b in self.bans.items() if b.expires <= at]
        removed = len(self.failures) - len(kept) + len(ended)
        self.failures = kept
        for address in ended:
            del self.bans[address]
        for address in [a for a, when in self.forgotten.items() if when < math.floor(failuresBefore)]:
            del self.forgotten[address]
            removed += 1
        return defer.succeed(removed)
