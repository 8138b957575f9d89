# -*- test-case-name: tests.test_lifecycle -*-
"""
Retention (RFC 2449 EXPIRE): the statements of the retention task's
passes (expired messages, kept deleted mail whose days are over, recent
deliveries past the duplicate window), each going by the longest value
any live node keeps, and L{Retention}, what POP3 advertises.
"""

from mailgate.store.limits import DAY, UNLIMITED
from mailgate.store.recovery import _dropKept
from mailgate.store.registry import _liveSettings
from mailgate.store.rows import deliveryKeyConditions, exactOldestArrival, removeMessages


def _expireOverrides(cursor):
    """
    The users with a retention of their own: user id to days (-1 never).
    """
    cursor.execute("SELECT user_id, expire_days FROM mailboxes WHERE expire_days IS NOT NULL")
    return dict(cursor.fetchall())


def _keptLongest(cursor, expireDays, keepDeletedDays, aliveSince, exceptNode):
    """
    The retention defaults the retention task goes by: this node's
    C{expireDays} (-1: never) and C{keepDeletedDays}, or another live
    node's where it keeps mail longer.

    The nodes sharing a database should be given the same values; where
    they are not (a node restarted with a new configuration before the
    others), no node's task removes what another still keeps.  Each
    node's heartbeat says what it keeps (L{mailgate.store.registry}); a
    node that has stopped no longer counts once its last heartbeat is
    older than C{aliveSince} (L{mailgate.store.registry.SETTINGS_COUNT_FOR} ago: a node whose
    clock lags still counts).

    @return: C{(expireDays, keepDeletedDays)}.
    """
    for _, settings in _liveSettings(cursor, aliveSince, exceptNode):
        expire = settings.get("expire_days")
        if type(expire) is int and expireDays != UNLIMITED:
            expireDays = UNLIMITED if expire < 0 else max(expireDays, expire)
        keep = settings.get("keep_deleted_days")
        if type(keep) is int:
            keepDeletedDays = max(keepDeletedDays, keep)
    return expireDays, keepDeletedDays


def _expirePass(cursor, now, ownDefaults, aliveSince, exceptNode, limit):
    """
    What a pass of the retention task removes expired messages by: the
    default retention (L{_keptLongest}), and the users whose maildrop may
    hold messages older than theirs (L{_expireCandidates}).
    """
    defaultDays, _ = _keptLongest(cursor, *ownDefaults, aliveSince, exceptNode)
    return defaultDays, _expireCandidates(cursor, now, defaultDays, limit)


def _purgeKept(cursor, now, ownDefaults, aliveSince, exceptNode, limit):
    """
    A pass of the retention task over kept deleted mail: what was deleted
    longer ago than L{_keptLongest}'s days (all of it at 0).
    """
    _, keepDeletedDays = _keptLongest(cursor, *ownDefaults, aliveSince, exceptNode)
    return _purgeDeleted(cursor, now - keepDeletedDays * DAY, limit)


def _forgetDeliveries(cursor, now, window, aliveSince, exceptNode, limit):
    """
    A pass of the retention task over the recent deliveries kept to know a
    client's retry (L{mailgate.store.sql._alreadyDelivered}): remove at
    most C{limit} delivered longer ago than this node's C{window}
    (seconds), or another live node's where it is longer (as
    L{_keptLongest}: no node forgets what another still goes by).

    @return: how many were removed.
    """
    for _, settings in _liveSettings(cursor, aliveSince, exceptNode):
        theirs = settings.get("duplicate_window")
        if type(theirs) is int:
            window = max(window, theirs)
    cursor.execute(
        "SELECT user_id, delivery_key FROM recent_deliveries WHERE delivered_at < ? "
        "ORDER BY delivered_at LIMIT ?",
        (now - window, limit),
    )
    removed = 0
    # A statement per hundred rows, not per row; one refreshed meanwhile
    # by a retry's delivery on another node stays.
    for condition, values in deliveryKeyConditions((userId, bytes(key)) for userId, key in cursor.fetchall()):
        cursor.execute(
            f"DELETE FROM recent_deliveries WHERE ({condition}) AND delivered_at < ?", (*values, now - window)
        )
        removed += cursor.rowcount
    return removed


def _expireCandidates(cursor, now, defaultDays, limit):
    """
    Users whose maildrop may hold messages older than their retention
    allows, judged by each maildrop's C{oldest_arrival} (a lower bound:
    a maildrop found here may turn out to have nothing to remove): C{(user
    id, address)} each, the address for the log.
    """
    cursor.execute(
        "SELECT b.user_id, u.address FROM mailboxes b JOIN users u ON u.user_id = b.user_id "
        "WHERE b.oldest_arrival IS NOT NULL "
        "AND coalesce(b.expire_days, ?) >= 0 "
        "AND b.oldest_arrival < ? - coalesce(b.expire_days, ?) * ? "
        "ORDER BY b.oldest_arrival LIMIT ?",
        (defaultDays, now, defaultDays, DAY, limit),
    )
    return [tuple(row) for row in cursor.fetchall()]


def _expireUser(cursor, userId, now, defaultDays, limit):
    """
    Remove at most C{limit} of a user's messages that are older than the
    user's retention, oldest first, and make C{oldest_arrival} exact once
    nothing older is left.

    @return: C{(messages removed, whether more may be left, the
        retention in days it went by)}.
    """
    # The mailbox row is locked first (an update that changes nothing):
    # a delivery to the user that is committing holds it, and what the
    # statements below see then includes its message, which the oldest
    # arrival written at the end must count.
    cursor.execute(
        "UPDATE mailboxes SET oldest_arrival = oldest_arrival WHERE user_id = ? "
        "RETURNING coalesce(expire_days, ?)",
        (userId, defaultDays),
    )
    row = cursor.fetchone()
    if row is None or row[0] < 0:
        return 0, False, None
    days = row[0]
    cutoff = now - days * DAY
    cursor.execute(
        "SELECT uid FROM maildrop WHERE user_id = ? AND arrived_at < ? ORDER BY uid LIMIT ?",
        (userId, cutoff, limit),
    )
    uids = [r[0] for r in cursor.fetchall()]
    removed = removeMessages(cursor, userId, uids) if uids else 0
    if len(uids) < limit:
        exactOldestArrival(cursor, userId)
        return removed, False, days
    return removed, True, days


def _purgeDeleted(cursor, before, limit):
    """
    Remove at most C{limit} kept deleted messages deleted before
    C{before}, releasing their bodies.

    @return: how many were removed.
    """
    cursor.execute(
        "SELECT user_id, uid FROM deleted_mail WHERE deleted_at < ? ORDER BY deleted_at LIMIT ?",
        (before, limit),
    )
    byUser = {}
    for userId, uid in cursor.fetchall():
        byUser.setdefault(userId, []).append(uid)
    return _dropKept(cursor, byUser)


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
        # The distinct retentions users have of their own (None: never),
        # worked out once per refresh rather than at every CAPA.
        self._ownDays = frozenset()

    def refresh(self):
        d = self._store.database.runInteraction(_expireOverrides)

        def got(overrides):
            self.overrides = overrides
            self._ownDays = frozenset(self._store.limits.effective(days, None) for days in overrides.values())

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
        return any(days != default for days in self._ownDays)

    def shortest(self):
        """
        The shortest retention any user has, the server's default
        included (it is every other user's, and a new user's): C{None}
        only if every user's mail is kept for ever (C{NEVER} is the
        longest).
        """
        days = [d for d in self._ownDays | {self.defaultDays} if d is not None]
        return min(days) if days else None

    def capability(self, maildrop=None):
        """
        The CAPA line: after login (given the session's maildrop), the
        user's own retention; before it, the shortest any user has,
        followed by C{USER} when users have different values.

        EXPIRE's argument is the server-guaranteed minimum retention
        (RFC 2449 section 6.7): before login the client may be any user,
        so the value announced must hold for every one of them.  The
        server's default with C{USER} promised a user whose mail is
        removed sooner (C{mailgate user expire}) more than mailgate
        keeps, and a client that reads CAPA only before login (and
        leaves mail on the server) lost mail it thought kept; C{USER}
        still tells clients to ask again after login for their own.
        """
        if maildrop is not None:
            days = maildrop.expireDays
            return "EXPIRE " + ("NEVER" if days is None else str(days))
        days = self.shortest()
        line = "EXPIRE " + ("NEVER" if days is None else str(days))
        return line + " USER" if self.variesPerUser() else line
