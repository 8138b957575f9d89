# -*- test-case-name: tests.test_lifecycle -*-
"""
A maildrop's life besides delivery and POP3: quotas, retention (RFC 2449
EXPIRE), deleted mail kept for recovery, renaming, and the registry of
POP3 sessions in progress.

The interactions here run, like those of L{mailgate.store.sql}, on a
cursor inside a transaction, handed to the L{Database} by the store's
methods (L{LifecycleStore}, which L{mailgate.store.sql.SQLMailStore}
inherits).  The rules they keep:

  - Storage use (C{mailboxes.used_octets}, C{used_messages}) changes in the
    same transaction as the mail it counts, on the row the delivery
    already locks for its uid counter; quotas are checked there too (see
    L{mailgate.store.sql._takeUids}).
  - Limits stored per user are C{NULL} for the server's default and C{-1}
    for none (C{EXPIRE NEVER}); the server's defaults are L{StoreLimits}.
  - A message's uid and unique id are never given to another message:
    kept deleted mail keeps its own, restored mail gets them back.
"""

import re

import attr

from mailgate.errors import NoSuchUser

#: A stored limit meaning "the server's default".
DEFAULT = None
#: A stored limit meaning "no limit" (or, for retention, NEVER).
UNLIMITED = -1

DAY = 86400


@attr.s
class StoreLimits:
    """
    The server's defaults for what users have not set themselves, and
    how long deleted mail is kept.  C{None}: no limit.

    @ivar quotaOctets: the default storage quota, in octets.
    @ivar quotaMessages: the default quota in messages.
    @ivar expireDays: the default retention (RFC 2449 EXPIRE), in days.
    @ivar keepDeletedDays: days messages deleted by POP3 are kept for
        recovery (0: removed at once).
    """

    quotaOctets = attr.ib(default=None)
    quotaMessages = attr.ib(default=None)
    expireDays = attr.ib(default=None)
    keepDeletedDays = attr.ib(default=0)

    def deliveryQuota(self):
        """
        The defaults as the delivery statement takes them: C{(octets,
        messages)}, -1 for none.
        """
        return (
            UNLIMITED if self.quotaOctets is None else self.quotaOctets,
            UNLIMITED if self.quotaMessages is None else self.quotaMessages,
        )

    def effective(self, own, default):
        """
        A limit as it applies: the user's C{own} (C{None}: the default,
        C{-1}: none), else C{default}; C{None} for no limit.
        """
        if own is None:
            return default
        return None if own < 0 else own


# -- sizes as administrators write them ------------------------------------

_SIZE = re.compile(r"^\s*([0-9]+)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parseSize(text):
    """
    Octets from C{1G}, C{500M}, C{64k} or a plain number (units of 1024,
    as Dovecot's quota settings count them).

    @raise ValueError: for anything else.
    """
    match = _SIZE.match(text or "")
    if not match:
        raise ValueError(f"not a size: {text!r} (use e.g. 1G, 500M, 64K or octets)")
    number, unit, _ = match.groups()
    return int(number) * _UNITS[unit.lower()]


def formatSize(octets):
    """
    A size the way L{parseSize} reads it, exact: C{1G}, C{1536K}, C{1000}.
    """
    for unit in ("T", "G", "M", "K"):
        factor = _UNITS[unit.lower()]
        if octets and octets % factor == 0:
            return f"{octets // factor}{unit}"
    return str(octets)


def describeLimit(own, unit=None):
    """
    A user's own limit for listings: C{default}, C{none} (C{never} for
    retention) or the value.
    """
    if own is None:
        return "default"
    if own < 0:
        return "never" if unit == "days" else "none"
    if unit == "octets":
        return formatSize(own)
    return str(own)


# -- interactions ------------------------------------------------------------


def _userId(cursor, address):
    cursor.execute("SELECT user_id FROM users WHERE address = ?", (address,))
    row = cursor.fetchone()
    if row is None:
        raise NoSuchUser(address)
    return row[0]


def _forgetUser(cursor, userId):
    """
    What a user's deletion removes besides the maildrop: kept deleted
    mail (releasing its bodies) and the registry's sessions.
    """
    from mailgate.store.sql import _releaseBodies

    cursor.execute(
        "DELETE FROM deleted_mail WHERE user_id = ? RETURNING body_owner, body_id", (userId,)
    )
    references = {}
    for owner, bodyId in cursor.fetchall():
        references[(owner, bodyId)] = references.get((owner, bodyId), 0) + 1
    _releaseBodies(cursor, references)
    cursor.execute("DELETE FROM pop3_sessions WHERE user_id = ?", (userId,))


_KEEP = object()


def _setLimits(cursor, address, quotaOctets=_KEEP, quotaMessages=_KEEP, expireDays=_KEEP):
    userId = _userId(cursor, address)
    changes = [
        (column, value)
        for column, value in (
            ("quota_octets", quotaOctets),
            ("quota_messages", quotaMessages),
            ("expire_days", expireDays),
        )
        if value is not _KEEP
    ]
    if changes:
        cursor.execute(
            f"UPDATE mailboxes SET {', '.join(f'{c} = ?' for c, _ in changes)} WHERE user_id = ?",
            [v for _, v in changes] + [userId],
        )


def _quotaOf(cursor, address):
    cursor.execute(
        "SELECT b.user_id, b.used_octets, b.used_messages, b.quota_octets, b.quota_messages "
        "FROM users u JOIN mailboxes b ON b.user_id = u.user_id WHERE u.address = ?",
        (address,),
    )
    return cursor.fetchone()


def _expireOverrides(cursor):
    """
    The users with a retention of their own: user id to days (-1 never).
    """
    cursor.execute("SELECT user_id, expire_days FROM mailboxes WHERE expire_days IS NOT NULL")
    return dict(cursor.fetchall())


def _expireCandidates(cursor, now, defaultDays, limit):
    """
    Users whose maildrop may hold messages older than their retention
    allows, judged by each maildrop's C{oldest_arrival} (a lower bound:
    a maildrop found here may turn out to have nothing to remove).
    """
    cursor.execute(
        "SELECT user_id FROM mailboxes WHERE oldest_arrival IS NOT NULL "
        "AND coalesce(expire_days, ?) >= 0 "
        "AND oldest_arrival < ? - coalesce(expire_days, ?) * ? "
        "ORDER BY oldest_arrival LIMIT ?",
        (defaultDays, now, defaultDays, DAY, limit),
    )
    return [row[0] for row in cursor.fetchall()]


def _expireUser(cursor, userId, now, defaultDays, limit):
    """
    Remove at most C{limit} of a user's messages that are older than the
    user's retention, oldest first, and make C{oldest_arrival} exact once
    nothing older is left.

    @return: C{(messages removed, whether more may be left)}.
    """
    from mailgate.store.sql import _removeMessages

    cursor.execute("SELECT coalesce(expire_days, ?) FROM mailboxes WHERE user_id = ?", (defaultDays, userId))
    row = cursor.fetchone()
    if row is None or row[0] < 0:
        return 0, False
    cutoff = now - row[0] * DAY
    cursor.execute(
        "SELECT uid FROM maildrop WHERE user_id = ? AND arrived_at < ? ORDER BY uid LIMIT ?",
        (userId, cutoff, limit),
    )
    uids = [r[0] for r in cursor.fetchall()]
    removed = _removeMessages(cursor, userId, uids) if uids else 0
    if len(uids) < limit:
        cursor.execute(
            "UPDATE mailboxes SET oldest_arrival = (SELECT min(arrived_at) FROM maildrop WHERE user_id = ?) "
            "WHERE user_id = ?",
            (userId, userId),
        )
        return removed, False
    return removed, True


def _purgeDeleted(cursor, before, limit):
    """
    Remove at most C{limit} kept deleted messages deleted before
    C{before}, releasing their bodies.

    @return: how many were removed.
    """
    from mailgate.store.sql import _releaseBodies

    cursor.execute(
        "SELECT user_id, uid FROM deleted_mail WHERE deleted_at < ? ORDER BY deleted_at LIMIT ?",
        (before, limit),
    )
    byUser = {}
    for userId, uid in cursor.fetchall():
        byUser.setdefault(userId, []).append(uid)
    references = {}
    removed = 0
    for userId, uids in sorted(byUser.items()):
        for batch in _batches(uids):
            cursor.execute(
                f"DELETE FROM deleted_mail WHERE user_id = ? AND uid IN ({','.join('?' * len(batch))}) "
                "RETURNING body_owner, body_id",
                (userId, *batch),
            )
            for owner, bodyId in cursor.fetchall():
                references[(owner, bodyId)] = references.get((owner, bodyId), 0) + 1
                removed += 1
    _releaseBodies(cursor, references)
    return removed


def _batches(items, size=500):
    items = list(items)
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Retention:
    """
    What POP3 advertises as EXPIRE (RFC 2449 section 6.7), answered from
    memory: the users who have a retention of their own, loaded from the
    store and refreshed periodically (like the APOP advertiser), so that
    neither CAPA nor a login costs a trip to the database.

    @ivar overrides: user id to the user's own days (-1: never).
    """

    def __init__(self, store):
        self._store = store
        self.overrides = {}

    def refresh(self):
        d = self._store.database.runInteraction(_expireOverrides)

        def got(overrides):
            self.overrides = overrides

        return d.addCallbacks(got, lambda failure: None)

    @property
    def defaultDays(self):
        return self._store.limits.expireDays

    def daysFor(self, userId):
        """
        A user's retention in days, or C{None} for never.
        """
        return self._store.limits.effective(self.overrides.get(userId), self.defaultDays)

    def variesPerUser(self):
        default = self.defaultDays
        return any(self._store.limits.effective(days, default) != default for days in self.overrides.values())

    def capability(self, maildrop=None):
        """
        The CAPA line: before login, the server's default, followed by
        C{USER} when some users have another value; after login (given
        the session's maildrop), the user's own.
        """
        if maildrop is not None:
            days = getattr(maildrop, "expireDays", self.defaultDays)
            return "EXPIRE " + ("NEVER" if days is None else str(days))
        line = "EXPIRE " + ("NEVER" if self.defaultDays is None else str(self.defaultDays))
        return line + " USER" if self.variesPerUser() else line


class LifecycleStore:
    """
    The lifecycle half of L{mailgate.store.sql.SQLMailStore}.

    @ivar limits: the server's L{StoreLimits}; the service sets them from
        its configuration.
    """

    def setQuota(self, address, octets=_KEEP, messages=_KEEP):
        """
        Set a user's own quota: a number, L{UNLIMITED} or L{DEFAULT} (the
        server's), for octets and for messages; an argument not given is
        left as it is.  Mail already stored stays, whatever the new quota.

        @return: a L{Deferred}; fails with L{NoSuchUser}.
        """
        return self.database.runWrite(_setLimits, address, quotaOctets=octets, quotaMessages=messages)

    def setExpire(self, address, days):
        """
        Set a user's own retention: days, L{UNLIMITED} (never) or
        L{DEFAULT}.

        @return: a L{Deferred}; fails with L{NoSuchUser}.
        """
        return self.database.runWrite(_setLimits, address, expireDays=days)

    def quotaOf(self, address):
        """
        A user's storage use and the limits that apply to it now: a
        L{Deferred} L{mailgate.store.records.QuotaStatus}, or C{None} if
        there is no such user.
        """
        from mailgate.store.records import QuotaStatus

        def status(row):
            if row is None:
                return None
            userId, octets, messages, quotaOctets, quotaMessages = row
            return QuotaStatus(
                userId,
                octets,
                messages,
                self.limits.effective(quotaOctets, self.limits.quotaOctets),
                self.limits.effective(quotaMessages, self.limits.quotaMessages),
            )

        return self.database.runInteraction(_quotaOf, address).addCallback(status)

    @property
    def retention(self):
        """
        The store's L{Retention}: what POP3 advertises as EXPIRE.
        """
        retention = self.__dict__.get("_retention")
        if retention is None:
            retention = self.__dict__["_retention"] = Retention(self)
        return retention

    def expireMessages(self, users=100, messagesPerTransaction=500):
        """
        One pass of the retention task: remove messages older than their
        user's retention from at most C{users} maildrops, a transaction
        of at most C{messagesPerTransaction} removals at a time, skipping
        every maildrop a POP3 session holds (its lock is taken without
        waiting, through the store's locks, so this is safe on several
        nodes at once).

        @return: a L{Deferred} of C{(messages removed, maildrops skipped
            because busy)}.
        """
        from twisted.internet import defer

        from mailgate.errors import MaildropInUse

        now = self._now()
        default = UNLIMITED if self.limits.expireDays is None else self.limits.expireDays

        @defer.inlineCallbacks
        def run():
            candidates = yield self.database.runInteraction(_expireCandidates, now, default, users)
            removed = busy = 0
            for userId in candidates:
                try:
                    yield self.locks.acquire(userId)
                except MaildropInUse:
                    busy += 1
                    continue
                try:
                    more = True
                    while more:
                        count, more = yield self.database.runWrite(
                            _expireUser, userId, now, default, messagesPerTransaction
                        )
                        removed += count
                finally:
                    yield self.locks.release(userId)
            return removed, busy

        return run()

    def purgeDeleted(self, limit=500):
        """
        Remove kept deleted mail older than L{StoreLimits.keepDeletedDays}
        (all of it when that is 0), at most C{limit} messages.

        @return: a L{Deferred} of how many were removed.
        """
        before = self._now() - self.limits.keepDeletedDays * DAY
        return self.database.runWrite(_purgeDeleted, before, limit)
