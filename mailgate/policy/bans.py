# -*- test-case-name: tests.test_policy -*-
"""
L{BanList}: the bans this node enforces, in memory, so that a connection
is refused without a database trip.

Two sources make it up.  The store's bans, as the last refresh read them
(every node's, and the admin command's), replaced wholesale when the
store's ban version moves.  And the bans this node has just made, which it
enforces at once, before the store has them: each is kept until a refresh
has read a version at least as new as the write that stored it (from then
on the store's view tells, so a ban lifted meanwhile is lifted here too),
or, if storing it failed, until it ends.

Every change of what is enforced is logged (C{ban.added}, C{ban.removed})
and the number of bans in force reported to L{mailgate.metrics.Metrics.bans}.
"""

import datetime

from twisted.logger import Logger

from mailgate.policy.addresses import storedKey
from mailgate.records import REASON_RECIPIENTS
from mailgate.timers import wallClock
from mailgate.plural import noun


def _when(at):
    return datetime.datetime.fromtimestamp(at, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class BanList:
    """
    @param clock: provides C{seconds()}.
    @param metrics: a L{mailgate.metrics.Metrics}.
    @ivar version: the store's ban version of the last refresh, or C{None}.
    """

    log = Logger(namespace="mailgate.policy")

    def __init__(self, clock, metrics):
        self._clock = clock
        # Times shared with the database: the wall clock's (see wallClock).
        self._wall = wallClock(clock)
        self._metrics = metrics
        self.version = None
        self._stored = {}
        # Address to [BanRecord, the version of the write that stored it,
        # or None until it is known].
        self._made = {}
        # What is enforced now, address to BanRecord.
        self._enforced = {}
        # When the first ban of those enforced or made ends: until then a
        # sweep has nothing to do (with 100,000 bans, settling them all
        # twice a second cost 80 ms of every 500 on the reactor).
        self._nextEnd = float("inf")
        # The store's address texts to their keys, from the last refresh:
        # a refresh after a ban was added re-reads every ban, and parsing
        # each address again was most of its cost.
        self._keys = {}

    def __len__(self):
        return len(self._enforced)

    def isBanned(self, key):
        ban = self._enforced.get(key)
        return ban is not None and ban.expires > self._wall()

    def get(self, key):
        """
        The L{BanRecord} enforced for C{key}, or C{None}.
        """
        return self._enforced.get(key)

    def made(self, ban):
        """
        This node banned an address: enforce it at once.
        """
        self._made[ban.address] = [ban, None]
        self._settle()

    def stored(self, address, version, ban=None):
        """
        The store answered the write of a ban this node made: it is stored
        as of C{version}, as C{ban} (the store's record, if it made one).
        """
        entry = self._made.get(address)
        if entry is not None:
            if ban is not None:
                entry[0] = ban
            entry[1] = version
            self._settle()

    def update(self, version, bans):
        """
        A refresh read the store's ban version and, if it moved, its bans.

        @param bans: L{BanRecord}s, or C{None} if the version did not move.
        @return: the addresses whose ban was lifted before its end (their
            failures are forgotten by the caller: a fresh start).
        """
        if bans is None:
            # Nothing new in the store: only bans ending change anything.
            return self.sweep()
        first = self.version is None
        self._stored = {}
        known = self._keys
        keys = {}
        for ban in bans:
            key = known.get(ban.address)
            if key is None:
                key = storedKey(ban.address)
            keys[ban.address] = key
            kept = self._stored.get(key)
            if kept is None or kept.expires < ban.expires:
                self._stored[key] = ban
        self._keys = keys
        self.version = version
        for address, (_, written) in list(self._made.items()):
            if written is not None and written <= version:
                del self._made[address]
        return self._settle(loading=first)

    def _settle(self, loading=False):
        """
        Work out what is enforced now, and log what changed.

        @param loading: this is the first read of the store's bans (at
            start-up): the bans found there are not news, and are logged
            as one C{ban.loaded} line, not a C{ban.added} each, which an
            alert on new bans would take for an attack at every restart.
        """
        now = self._wall()
        enforced = {a: b for a, b in self._stored.items() if b.expires > now}
        for address, (ban, _) in list(self._made.items()):
            if ban.expires <= now:
                del self._made[address]
                continue
            current = enforced.get(address)
            if current is None or current.expires < ban.expires:
                enforced[address] = ban
        lifted = []
        for address, ban in self._enforced.items():
            if address not in enforced:
                ended = ban.expires <= now
                if not ended:
                    lifted.append(address)
                self.log.info(
                    "ban of {address} {how}",
                    event="ban.removed",
                    address=address,
                    how="ended" if ended else "lifted",
                    reason=ban.reason,
                )
        if loading and enforced and not self._enforced:
            self.log.info(
                "{count} " + noun(len(enforced), "ban") + " in force, read from the database",
                event="ban.loaded",
                count=len(enforced),
            )
            loaded = enforced
        else:
            loaded = {}
        for address, ban in enforced.items():
            if address in loaded:
                continue
            previous = self._enforced.get(address)
            # The store keeps whole seconds: the record it gives back for a
            # ban made here is the same ban, not a new one.
            if previous is None or previous.reason != ban.reason or abs(previous.expires - ban.expires) > 1:
                what = (
                    "unknown " + noun(ban.failures, "recipient") if ban.reason == REASON_RECIPIENTS
                    else "failed " + noun(ban.failures, "login")
                )
                self.log.info(
                    "banned {address} until {until} ({reason}, {failures} " + what + ")",
                    event="ban.added",
                    address=address,
                    until=_when(ban.expires),
                    expires=ban.expires,
                    reason=ban.reason,
                    failures=ban.failures,
                )
        changed = enforced.keys() != self._enforced.keys()
        self._enforced = enforced
        self._nextEnd = min(
            min((b.expires for b in enforced.values()), default=float("inf")),
            min((ban.expires for ban, _ in self._made.values()), default=float("inf")),
        )
        if changed:
            self._metrics.bans(len(enforced))
        return lifted

    def sweep(self):
        """
        Let go of the bans that ended.

        @return: as L{update}'s (none: an ending ban is not lifted).
        """
        if self._wall() < self._nextEnd:
            return []
        return self._settle()
