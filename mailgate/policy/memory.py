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
import secrets

from twisted.internet import defer
from zope.interface import implementer

from mailgate.interfaces import IPolicyStore
from mailgate.records import (
    REASON_ADMIN,
    AuthFailure,
    BanRecord,
    FailureOutcome,
    Forgotten,
    PolicyChanges,
    banTarget,
    forgettingOf,
    recipientsAddress,
)


@implementer(IPolicyStore)
class MemoryPolicyStore:
    """
    @ivar failures: the recorded L{AuthFailure}s, oldest first (and the
        markers of failures forgotten, L{mailgate.records.FORGOTTEN_PREFIX}).
    @ivar bans: address to L{BanRecord}.
    @ivar version: the ban version.
    """

    def __init__(self):
        self.failures = []
        self.bans = {}
        self.version = 0

    def _count(self, address, since):
        return sum(1 for f in self.failures if f.address == address and f.at > since)

    def _put(self, ban):
        self.bans[ban.address] = ban
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

    def _forget(self, address, at):
        """
        Forget the failures counted for C{address}, and record the marker
        that tells the nodes: how many of each there were.
        """
        logins = sum(1 for f in self.failures if f.address == address)
        recipients = sum(1 for f in self.failures if f.address == recipientsAddress(address))
        forgotten = {address, recipientsAddress(address)}
        self.failures = [f for f in self.failures if f.address not in forgotten]
        self.failures.append(AuthFailure(secrets.token_hex(8), forgettingOf(address), None, math.ceil(at)))
        return Forgotten(logins, recipients)

    def removeBan(self, address, at):
        removed = self.bans.pop(address, None) is not None
        if removed:
            self._forget(address, at)
            self.version += 1
        return defer.succeed(removed)

    def forgetFailures(self, address, at):
        counted = {address, recipientsAddress(address)}
        if not any(f.address in counted for f in self.failures):
            return defer.succeed(Forgotten(0, 0))
        return defer.succeed(self._forget(address, at))

    def _inForce(self, at):
        return tuple(sorted((b for b in self.bans.values() if b.expires > at), key=lambda b: b.address))

    def listBans(self, at):
        return defer.succeed(list(self._inForce(at)))

    def changes(self, version, failuresSince, at):
        bans = None
        if version != self.version:
            bans = self._inForce(at)
        # Whole seconds, as the SQL store keeps them: a caller asking from
        # a fraction of a second gets the failures of that whole second.
        since = math.floor(failuresSince)
        failures = tuple(f for f in self.failures if f.at >= since)
        return defer.succeed(PolicyChanges(self.version, bans, failures))

    def expire(self, at, failuresBefore):
        kept = [f for f in self.failures if f.at >= failuresBefore]
        ended = [a for a, b in self.bans.items() if b.expires <= at]
        removed = len(self.failures) - len(kept) + len(ended)
        self.failures = kept
        for address in ended:
            del self.bans[address]
        return defer.succeed(removed)
