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

import datetime
import hashlib
import secrets
import time
from email.utils import format_datetime

import attr
from twisted.internet import defer
from twisted.python.failure import Failure

from mailgate.errors import MaildropInUse, MaildropLockLost, NoSuchUser, UserChanged, UserExists
from mailgate.records import DeletedMessage, ExpiryPass, QuotaStatus
from mailgate.store.bounds import formatSize
from mailgate.store.database import updatesMailboxes
from mailgate.store.reads import CHUNK_SIZE, _readChunks
from mailgate.store.registry import (
    SETTINGS_COUNT_FOR,
    STALE_AFTER,
    SessionRegistry,
    _kick,
    _liveSettings,
    _nodes,
    _sessions,
)
from mailgate.store.rows import (
    BODY_COLUMNS,
    CHUNK_COLUMNS,
    DELIVERED_COLUMNS,
    IMPORTED_COLUMNS,
    MAILDROP_COLUMNS,
    batches,
    bodyPieces,
    deliveryKeyConditions,
    dotLineColumns,
    formatUniqueId,
    insertRows,
    placeholders,
    releaseBodies,
    releaseUsage,
    removeMessages,
    storeLargeBody,
)
from mailgate.plural import counted

#: A stored limit meaning "the server's default".
DEFAULT = None
#: A stored limit meaning "no limit" (or, for retention, NEVER).
UNLIMITED = -1

DAY = 86400
#: Seconds during which a message delivered again with the same delivery
#: key is a client's retry (see L{StoreLimits.duplicateWindow}): a day
#: covers an MTA's retries after a lost reply (Postfix's first comes after
#: 5 minutes, the following ones at most 4000 s apart).
DUPLICATE_WINDOW = DAY


@attr.s(on_setattr=attr.setters.convert)
class StoreLimits:
    """
    The server's defaults for what users have not set themselves, and
    how long deleted mail is kept.  C{None}: no limit.

    @ivar quotaOctets: the default storage quota, in octets.
    @ivar quotaMessages: the default quota in messages.
    @ivar expireDays: the default retention (RFC 2449 EXPIRE), in days.
    @ivar keepDeletedDays: days messages deleted by POP3 are kept for
        recovery (0: removed at once).
    @ivar quotaWarnings: percentages of a user's quota (ascending) at
        which a delivery that brings the use there puts a warning into the
        maildrop (L{quotaWarningMessage}).
    @ivar duplicateWindow: seconds during which a message delivered again
        with the same delivery key is a client's retry, answered as
        delivered and not stored twice (0: never; see
        L{mailgate.interfaces.IMessageSource.deliveryKey}).
    """

    quotaOctets = attr.ib(default=None)
    quotaMessages = attr.ib(default=None)
    expireDays = attr.ib(default=None)
    keepDeletedDays = attr.ib(default=0)
    quotaWarnings = attr.ib(default=(), converter=lambda values: tuple(sorted(set(values))))
    duplicateWindow = attr.ib(default=DUPLICATE_WINDOW)

    def deliveryQuota(self):
        """
        The defaults as the delivery statement takes them: C{(octets,
        messages, warnings)}, -1 for none.
        """
        return (
            UNLIMITED if self.quotaOctets is None else self.quotaOctets,
            UNLIMITED if self.quotaMessages is None else self.quotaMessages,
            self.quotaWarnings,
        )

    def effective(self, own, default):
        """
        A limit as it applies: the user's C{own} (C{None}: the default,
        C{-1}: none), else C{default}; C{None} for no limit.
        """
        if own is None:
            return default
        return None if own < 0 else own


@attr.s(frozen=True, slots=True)
class QuotaCrossing:
    """
    A delivery brought a user's use of a quota to (or past) one of the
    warning percentages: the highest such.

    @ivar percent: the percentage crossed.
    @ivar resource: C{"octets"} or C{"messages"}.
    @ivar used: the use after the delivery.
    @ivar limit: the quota.
    """

    percent = attr.ib()
    resource = attr.ib()
    used = attr.ib()
    limit = attr.ib()


def quotaCrossed(warnings, octets, messages):
    """
    The highest of the percentages C{warnings} that a delivery crossed, of
    either quota, going up: C{before < percent% of the limit <= after}.

    @param octets: C{(before, after, limit)} for the storage quota, the
        limit negative for none.
    @param messages: the same for the quota in messages.
    @return: a L{QuotaCrossing}, or C{None}: nothing crossed.
    """
    found = None
    for resource, (before, after, limit) in (("octets", octets), ("messages", messages)):
        if limit is None or limit <= 0:
            continue
        for percent in warnings:
            if before * 100 < percent * limit <= after * 100 and (found is None or percent > found.percent):
                found = QuotaCrossing(percent, resource, after, limit)
    return found


def quotaWarningMessage(address, crossing, now):
    """
    The message a user finds in the maildrop when a delivery brought the
    use to a warning percentage of the quota: the user of a POP3 mailbox
    sees nothing else of it until mail is refused.  From the mailbox's
    own domain's postmaster, with a null return path and C{Auto-Submitted}
    (RFC 3834), so that nothing answers it.

    @return: the message's octets (CRLF line ends).
    """
    domain = address.rpartition("@")[2] or "localhost"
    used, limit = crossing.used, crossing.limit
    share = used * 100 // limit
    if crossing.resource == "octets":
        holds = f"{_readableSize(used)} of its {_readableSize(limit)} quota ({share}%)"
    else:
        holds = f"{counted(used, 'message')}, of the {limit} it may hold ({share}%)"
    state = "is full" if share >= 100 else f"is {crossing.percent}% full"
    body = (
        f"Your mailbox {address} now holds {holds}.\n"
        "\n"
        "When it is full, new mail for you is refused: the mail servers of the\n"
        "people who write to you keep trying for a few days, then return their\n"
        "mail to them.\n"
        "\n"
        "Make room by deleting the messages you no longer need (a mail program\n"
        "that leaves mail on the server can be told to remove it), or ask your\n"
        "mail administrator for a larger quota.\n"
    )
    header = (
        "Return-Path: <>\n"
        f"Date: {format_datetime(datetime.datetime.fromtimestamp(int(now), datetime.timezone.utc))}\n"
        f"From: Mail System <postmaster@{domain}>\n"
        f"To: <{address}>\n"
        f"Subject: Your mailbox {state}\n"
        f"Message-ID: <quota.{int(now)}.{secrets.token_hex(8)}@{domain}>\n"
        "Auto-Submitted: auto-generated\n"
        "MIME-Version: 1.0\n"
        "Content-Type: text/plain; charset=utf-8\n"
        "Content-Transfer-Encoding: 8bit\n"
    )
    return (header + "\n" + body).replace("\n", "\r\n").encode("utf-8")


def _readableSize(octets):
    """
    A size for people: octets, or KB, MB, GB (of 1024) to one decimal.
    """
    if octets < 1024:
        return counted(octets, "octet")
    for unit in ("KB", "MB", "GB", "TB"):
        octets /= 1024
        if octets < 1024 or unit == "TB":
            return f"{octets:.1f}".removesuffix(".0") + f" {unit}"


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


def lockedUserId(cursor, address, lockedId):
    """
    The id of the user C{address} names, which must be C{lockedId}: the
    user whose maildrop lock an admin command took after looking the
    address up (L{LifecycleStore._underLock}).  Between that look-up and
    this write, the user may have been deleted and the address given to
    another user (renamed or added), whose lock the command does not
    hold: acting on them could remove mail under a POP3 session's feet.

    @raise NoSuchUser: if no user has C{address} (now).
    @raise UserChanged: if another user has it now.
    """
    userId = _userId(cursor, address)
    if lockedId is not None and userId != lockedId:
        raise UserChanged(
            f"the user {address} changed meanwhile (deleted or renamed, and the address given to another "
            "user); nothing was changed"
        )
    return userId


LOCK_LOST = "the maildrop lock was lost; nothing removed"


class Guarded:
    """
    A write made under a maildrop's lock, C{write(cursor, *args)}, in a
    transaction that first runs the lock's guard (see
    L{IMaildropLocks.writeGuard}): it commits only while the lock is held,
    and another node that takes the lock once it is lost reads the
    maildrop after it.  Measured under C{write}'s name.
    """

    def __init__(self, guard, write):
        self._guard = guard
        self._write = write
        self.__name__ = write.__name__

    def __call__(self, cursor, *args):
        if not self._guard(cursor):
            raise MaildropLockLost(LOCK_LOST)
        return self._write(cursor, *args)

    def mailboxes(self, cursor, *args):
        """
        The C{mailboxes} rows C{write} declares it updates
        (L{mailgate.store.database.updatesMailboxes}).
        """
        declared = getattr(self._write, "mailboxes", None)
        return () if declared is None else declared(cursor, *args)

    @classmethod
    def under(cls, locks, userId, write):
        """
        C{write} guarded by this process's lock on C{userId}'s maildrop.

        @raise MaildropLockLost: if the lock is not held, or known lost.
        """
        guard = locks.writeGuard(userId)
        if guard is None:
            raise MaildropLockLost(LOCK_LOST)
        return cls(guard, write)


def _forgetUser(cursor, userId):
    """
    What a user's deletion removes besides the maildrop: kept deleted
    mail (releasing its bodies) and the registry's sessions.
    """
    cursor.execute(
        "DELETE FROM deleted_mail WHERE user_id = ? RETURNING body_owner, body_id", (userId,)
    )
    references = {}
    for owner, bodyId in cursor.fetchall():
        references[(owner, bodyId)] = references.get((owner, bodyId), 0) + 1
    releaseBodies(cursor, references)
    cursor.execute("DELETE FROM pop3_sessions WHERE user_id = ?", (userId,))
    cursor.execute("DELETE FROM imported_ids WHERE user_id = ?", (userId,))
    cursor.execute("DELETE FROM recent_deliveries WHERE user_id = ?", (userId,))


def _forgetImported(cursor, address, uidls):
    """
    Forget the unique ids imported for C{address} (those of C{uidls}, or
    all): a later import brings such a message in again if the maildrop no
    longer holds it.

    @return: how many were forgotten.
    """
    userId = _userId(cursor, address)
    if uidls is None:
        cursor.execute("DELETE FROM imported_ids WHERE user_id = ?", (userId,))
        return cursor.rowcount
    forgotten = 0
    for batch in batches(uidls):
        cursor.execute(
            f"DELETE FROM imported_ids WHERE user_id = ? AND uidl IN ({placeholders(len(batch))})",
            (userId, *batch),
        )
        forgotten += cursor.rowcount
    return forgotten


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
    older than C{aliveSince} (L{SETTINGS_COUNT_FOR} ago: a node whose
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
        cursor.execute(
            "UPDATE mailboxes SET oldest_arrival = (SELECT min(arrived_at) FROM maildrop WHERE user_id = ?) "
            "WHERE user_id = ?",
            (userId, userId),
        )
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


def _dropKept(cursor, byUser):
    """
    Remove kept deleted messages for good, releasing their bodies.

    @param byUser: the uids to remove, a list by user id.
    @return: how many were removed (only rows this transaction removed:
        one another took first is not released twice).
    """
    references = {}
    removed = 0
    for userId, uids in sorted(byUser.items()):
        for batch in batches(uids):
            cursor.execute(
                f"DELETE FROM deleted_mail WHERE user_id = ? AND uid IN ({placeholders(len(batch))}) "
                "RETURNING body_owner, body_id",
                (userId, *batch),
            )
            for owner, bodyId in cursor.fetchall():
                references[(owner, bodyId)] = references.get((owner, bodyId), 0) + 1
                removed += 1
    releaseBodies(cursor, references)
    return removed


@updatesMailboxes(lambda cursor, userId, *args, **kwargs: (userId,))
def _keepDeleted(cursor, userId, uids, now, peer):
    """
    The UPDATE state of a POP3 session where deleted mail is kept: the
    messages leave the maildrop (and the user's quota) but their rows, with
    their uid, unique id and body reference, move to C{deleted_mail}.

    @return: how many were removed.
    """
    # Only the rows this transaction removed are kept: one that another
    # transaction removed meanwhile (a user deletion, say) has had its
    # body reference let go already, and keeping it would let go of it
    # again at the purge.
    kept = []
    for batch in batches(uids):
        cursor.execute(
            f"DELETE FROM maildrop WHERE user_id = ? AND uid IN ({placeholders(len(batch))}) "
            f"RETURNING {', '.join(MAILDROP_COLUMNS)}",
            (userId, *batch),
        )
        kept += [(*row, now, peer) for row in cursor.fetchall()]
    insertRows(cursor, "deleted_mail", MAILDROP_COLUMNS + ("deleted_at", "deleted_by"), kept)
    removed = len(kept)
    octets = sum(row[5] for row in kept)
    if removed:
        releaseUsage(cursor, userId, removed, octets)
    return removed


def _listDeleted(cursor, address):
    userId = _userId(cursor, address)
    cursor.execute(
        "SELECT size, uidl, deleted_at, deleted_by, arrived_at FROM deleted_mail "
        "WHERE user_id = ? ORDER BY uid",
        (userId,),
    )
    return [DeletedMessage(n, *row) for n, row in enumerate(cursor.fetchall(), 1)]


_DELETED_COLUMNS = "uid, uidl, body_owner, body_id, size, header_size, arrived_at"


def _restoreDeleted(cursor, address, uidls, since, asNew, now):
    """
    Bring kept deleted messages back into the maildrop: those with the
    unique ids C{uidls} (all if C{None}), deleted at or after C{since}
    (if given).  They come back under their own uid and unique id, in
    their old place among the others, or with C{asNew} under new ones
    (after every other message), so that clients that leave mail on the
    server download them again.  Restoring is never refused for the
    quota: the mail was already stored.

    A restored message is dated C{now}: its retention (C{--expire-days})
    counts from its restore.  Dated as it first arrived, a message older
    than its retention would be removed for good by the next retention
    pass (retention keeps nothing back), minutes after the restore said
    it was back.

    @return: C{(restored, missing)}: a list of C{(old unique id, unique id
        now)}, and the requested unique ids that are not kept.
    """
    userId = _userId(cursor, address)
    # The mailbox row is locked first, as the retention task, an expunge,
    # a recount, a user's deletion and a delivery take it before the rows
    # they change: taken last (after the kept rows), it closed a deadlock
    # with an expunge or a user's deletion that held it and was about to
    # remove those kept rows, and PostgreSQL ended one of them with an
    # error.
    cursor.execute("UPDATE mailboxes SET oldest_arrival = oldest_arrival WHERE user_id = ?", (userId,))
    where, params = "user_id = ?", [userId]
    if since is not None:
        where += " AND deleted_at >= ?"
        params.append(since)
    # The kept rows are taken by deleting them, and only those this
    # transaction deleted come back: another restore, or the purge on
    # another node, that took a row first (and let go of its body
    # reference) leaves nothing here to restore twice.
    rows = []
    if uidls is None:
        cursor.execute(f"DELETE FROM deleted_mail WHERE {where} RETURNING {_DELETED_COLUMNS}", params)
        rows = cursor.fetchall()
    else:
        for batch in batches(sorted(set(uidls))):
            cursor.execute(
                f"DELETE FROM deleted_mail WHERE {where} "
                f"AND uidl IN ({placeholders(len(batch))}) RETURNING {_DELETED_COLUMNS}",
                params + batch,
            )
            rows += cursor.fetchall()
    rows.sort()
    found = {row[1] for row in rows}
    missing = [] if uidls is None else [u for u in dict.fromkeys(uidls) if u not in found]
    if not rows:
        return [], missing
    if asNew:
        cursor.execute(
            "UPDATE mailboxes SET next_uid = next_uid + ? WHERE user_id = ? RETURNING next_uid, uid_validity",
            (len(rows), userId),
        )
        following, validity = cursor.fetchone()
        first = following - len(rows)
        entries = [
            (userId, first + n, formatUniqueId(first + n, validity), *row[2:6], now)
            for n, row in enumerate(rows)
        ]
    else:
        entries = [(userId, *row[:6], now) for row in rows]
    insertRows(cursor, "maildrop", MAILDROP_COLUMNS, entries)
    cursor.execute(
        "UPDATE mailboxes SET used_messages = used_messages + ?, used_octets = used_octets + ?, "
        "oldest_arrival = CASE WHEN oldest_arrival IS NULL OR oldest_arrival > ? THEN ? "
        "ELSE oldest_arrival END WHERE user_id = ?",
        (len(rows), sum(row[4] for row in rows), now, now, userId),
    )
    return [(row[1], entry[2]) for row, entry in zip(rows, entries)], missing


def _presentBodies(cursor, userId, uidls):
    """
    What a user's maildrop holds (or keeps deleted) under each of
    C{uidls} it has: unique id to a list of C{(size, owner, body id,
    None)}; or, for an id an earlier import brought in whose message is
    gone since, C{[(size, None, None, SHA-256 of its octets)]}.
    """
    present = {}
    for batch in batches(sorted(set(uidls))):
        marks = placeholders(len(batch))
        for table in ("maildrop", "deleted_mail"):
            cursor.execute(
                f"SELECT uidl, size, body_owner, body_id FROM {table} WHERE user_id = ? AND uidl IN ({marks})",
                (userId, *batch),
            )
            for uidl, size, owner, bodyId in cursor.fetchall():
                present.setdefault(uidl, []).append((size, owner, bodyId, None))
        cursor.execute(
            f"SELECT uidl, size, digest FROM imported_ids WHERE user_id = ? AND uidl IN ({marks})",
            (userId, *batch),
        )
        for uidl, size, digest in cursor.fetchall():
            if uidl not in present:
                present[uidl] = [(size, None, None, bytes(digest))]
    return present


def _existingUidls(cursor, address, uidls):
    present = _presentBodies(cursor, _userId(cursor, address), uidls)
    return {uidl: {size for size, _, _, _ in bodies} for uidl, bodies in present.items()}


def _storedDigest(cursor, owner, bodyId, size):
    """
    The SHA-256 of a stored body, read a few chunks at a time.
    """
    digest = hashlib.sha256()
    seq = read = 0
    while read < size:
        for chunk in _readChunks(cursor, owner, bodyId, seq, 8):
            digest.update(chunk)
            read += len(chunk)
            seq += 1
    return digest.digest()


def _sourceDigest(source):
    digest = hashlib.sha256()
    for chunk in source.chunks(CHUNK_SIZE):
        digest.update(chunk)
    return digest.digest()


def _conflictWith(cursor, stored, source):
    """
    Why C{source} is not the message the maildrop holds under its unique
    id (C{stored}, from L{_presentBodies}), or C{None} if it is: the same
    octets.  The id alone does not tell: another server (or another
    mailbox) can have given it to other mail, and an importer deletes
    from its source what is already present.
    """
    sizes = [size for size, _, _, _ in stored]
    if source.size not in sizes:
        return (
            f"the maildrop already has another message under this unique id "
            f"({' or '.join(map(str, sizes))} octets, this one {source.size})"
        )
    digest = _sourceDigest(source)
    for size, owner, bodyId, importedDigest in stored:
        if size != source.size:
            continue
        if importedDigest is not None:
            # Imported before and deleted here since: the same message
            # again is skipped, not brought back.
            if importedDigest == digest:
                return None
            return (
                f"an earlier import brought in another message of the same size ({size} octets) "
                f"under this unique id"
            )
        if _storedDigest(cursor, owner, bodyId, size) == digest:
            return None
    return f"the maildrop already has another message of the same size ({source.size} octets) under this unique id"


def _sortImports(cursor, userId, items):
    """
    Split C{items} into those to add, the unique ids already present with
    the very same content (a resumed import), and C{(uidl, reason)} for
    the conflicts: an id present with other content, or given twice.
    Nothing is dropped without a word.
    """
    present = _presentBodies(cursor, userId, [item[0] for item in items])
    fresh, skipped, conflicts, seen = [], [], [], set()
    for item in items:
        uidl, source = item[0], item[1]
        if uidl in seen:
            conflicts.append((uidl, "the same unique id is given to two messages"))
            continue
        seen.add(uidl)
        if uidl not in present:
            fresh.append(item)
            continue
        reason = _conflictWith(cursor, present[uidl], source)
        if reason is None:
            skipped.append(uidl)
        else:
            conflicts.append((uidl, reason))
    return fresh, skipped, conflicts


def generatedUid(uidl, validity):
    """
    The uid whose generated unique id (L{mailgate.store.rows.formatUniqueId}
    under C{validity}) is C{uidl}, or C{None} if mailgate could never
    generate it there.
    """
    suffix = f"{validity:08x}"
    if len(uidl) < 16 or not uidl.endswith(suffix):
        return None
    prefix = uidl[: -len(suffix)]
    try:
        uid = int(prefix, 16)
    except ValueError:
        return None
    return uid if f"{uid:08x}" == prefix else None


def _importMessages(cursor, address, items):
    """
    Add messages from another server to a user's maildrop, keeping the
    unique ids that server gave them, in one transaction.  Ids the
    maildrop already has with the same content (a resumed import) are
    skipped; with other content they are conflicts, and not added (see
    L{_sortImports}).  The messages
    take the next uids, in the order given (POP3 numbers them so), and
    count towards the user's storage use, but no quota refuses them: a
    migration must not lose mail.

    An imported id must never collide with one mailgate generates later:
    where an imported id has the shape of mailgate's own ids for this
    maildrop (L{generatedUid}), the uid counter is moved past it.

    @param items: C{(uidl, source, arrived)} per message, the source an
        L{mailgate.interfaces.IMessageSource}.
    @return: C{(imported, skipped, conflicts)}: the unique ids added,
        those skipped as already present, and C{(uidl, reason)} for those
        neither.
    """
    userId = _userId(cursor, address)
    fresh, skipped, conflicts = _sortImports(cursor, userId, items)
    if not fresh:
        return [], skipped, conflicts
    octets = sum(source.size for _, source, _ in fresh)
    oldest = min(arrived for _, _, arrived in fresh)
    cursor.execute(
        "UPDATE mailboxes SET next_uid = next_uid + ?, used_messages = used_messages + ?, "
        "used_octets = used_octets + ?, "
        "oldest_arrival = CASE WHEN oldest_arrival IS NULL OR oldest_arrival > ? THEN ? "
        "ELSE oldest_arrival END WHERE user_id = ? RETURNING next_uid, uid_validity",
        (len(fresh), len(fresh), octets, oldest, oldest, userId),
    )
    row = cursor.fetchone()
    if row is None:
        # Deleted since it was found (as in _recountUsage).
        raise NoSuchUser(address)
    following, validity = row
    first = following - len(fresh)
    colliding = [generatedUid(uidl, validity) for uidl, _, _ in fresh]
    colliding = [uid for uid in colliding if uid is not None and uid >= following]
    if colliding:
        cursor.execute(
            "UPDATE mailboxes SET next_uid = ? WHERE user_id = ? AND next_uid <= ?",
            (max(colliding) + 1, userId, max(colliding)),
        )
    bodies, chunks, entries, digests = [], [], [], []
    for n, (uidl, source, arrived) in enumerate(fresh):
        # The digest kept below, of the octets as they are stored: a third
        # reading of each source (after its measuring and its storing) was
        # about a tenth of an import's time.
        digest = hashlib.sha256()
        if source.size <= CHUNK_SIZE:
            bodyId = secrets.token_hex(16)
            bodies.append((userId, bodyId, source.size, source.headerSize, 1, arrived))
            chunks.extend((userId, bodyId, seq, chunk) for seq, chunk in enumerate(bodyPieces(source, digest)))
        else:
            bodyId = storeLargeBody(cursor, userId, source, 1, arrived, digest)
        digests.append(digest.digest())
        entries.append(
            (userId, first + n, uidl, userId, bodyId, source.size, source.headerSize, arrived, *dotLineColumns(source))
        )
    insertRows(cursor, "bodies", BODY_COLUMNS, bodies)
    insertRows(cursor, "body_chunks", CHUNK_COLUMNS, chunks)
    insertRows(cursor, "maildrop", DELIVERED_COLUMNS, entries)
    # Remembered after the message is gone: a later run must not bring
    # back what the user deletes here meanwhile.
    now = int(time.time())
    insertRows(
        cursor, "imported_ids", IMPORTED_COLUMNS,
        [(userId, uidl, source.size, digest, now) for (uidl, source, _), digest in zip(fresh, digests)],
    )
    return [uidl for uidl, _, _ in fresh], skipped, conflicts


def _removeImportedGone(cursor, address, listed, now, aliveSince, lockedId=None):
    """
    Take out of a user's maildrop the messages an import brought in (their
    unique id and size in C{imported_ids}) whose unique id the source no
    longer lists: deleted there since the import, by a client or by the
    source's retention.  A leave-on-server client forgets the id of a
    message its server no longer lists; served again here, the message
    would be downloaded again.  They are kept for recovery as a POP3
    deletion is (C{deleted_by} C{import}, for L{_keptLongest}'s days);
    their ids stay remembered, so that no later run brings them back.

    @param listed: every unique id the source lists now.
    @param lockedId: the id of the user whose maildrop lock is held (see
        L{lockedUserId}).
    @return: the unique ids taken out, sorted.
    @raise UserChanged: if C{address} is no longer C{lockedId}'s.
    @raise MaildropInUse: if the user is in a POP3 session.
    """
    userId = lockedUserId(cursor, address, lockedId)
    if _inSession(cursor, userId, aliveSince):
        raise MaildropInUse(address)
    cursor.execute(
        "SELECT m.uid, m.uidl FROM maildrop m JOIN imported_ids i "
        "ON i.user_id = m.user_id AND i.uidl = m.uidl AND i.size = m.size WHERE m.user_id = ?",
        (userId,),
    )
    gone = [(uid, uidl) for uid, uidl in cursor.fetchall() if uidl not in listed]
    if gone:
        _keepDeleted(cursor, userId, [uid for uid, _ in gone], now, "import")
    return sorted(uidl for _, uidl in gone)


def _inSession(cursor, userId, aliveSince):
    """
    Whether a live node's registry shows a POP3 session of the user.
    """
    cursor.execute(
        "SELECT 1 FROM pop3_sessions s JOIN mailgate_nodes n ON n.node_id = s.node_id "
        "WHERE s.user_id = ? AND n.seen_at >= ? LIMIT 1",
        (userId, aliveSince),
    )
    return cursor.fetchone() is not None


def _renameUser(cursor, engine, old, new, aliveSince, lockedId=None):
    """
    Give a user a new address: the maildrop, its unique ids, quota and
    retention stay with the user (they hang on the user id).

    @param lockedId: the id of the user whose maildrop lock is held (see
        L{lockedUserId}).
    @raise NoSuchUser: if there is no C{old}.
    @raise UserChanged: if C{old} is no longer C{lockedId}'s.
    @raise UserExists: if C{new} is taken.
    @raise MaildropInUse: if the user is in a POP3 session.
    """
    userId = lockedUserId(cursor, old, lockedId)
    cursor.execute("SELECT 1 FROM users WHERE address = ?", (new,))
    if cursor.fetchone() is not None:
        raise UserExists(new)
    if _inSession(cursor, userId, aliveSince):
        raise MaildropInUse(old)
    try:
        cursor.execute(
            "UPDATE users SET address = ?, domain = ? WHERE user_id = ?",
            (new, new.rpartition("@")[2], userId),
        )
    except Exception as e:
        if engine.isUniqueViolation(e):
            raise UserExists(new) from None
        raise


def _expungeUser(cursor, address, before, aliveSince, lockedId=None):
    """
    Remove a user's messages for good: all of them, or those that arrived
    before C{before}; those of them deleted by POP3 and kept for recovery
    too (an administrator erasing a user's mail means all of it; expunged
    messages are not kept).

    @param lockedId: the id of the user whose maildrop lock is held (see
        L{lockedUserId}).
    @return: C{(messages removed from the maildrop, kept deleted messages
        removed)}.
    @raise UserChanged: if C{address} is no longer C{lockedId}'s.
    @raise MaildropInUse: if the user is in a POP3 session.
    """
    userId = lockedUserId(cursor, address, lockedId)
    if _inSession(cursor, userId, aliveSince):
        raise MaildropInUse(address)
    # Locked first, as in _expireUser: a delivery committing meanwhile is
    # in the oldest arrival written at the end.
    cursor.execute("UPDATE mailboxes SET oldest_arrival = oldest_arrival WHERE user_id = ?", (userId,))
    if before is None:
        cursor.execute("SELECT uid FROM maildrop WHERE user_id = ?", (userId,))
    else:
        cursor.execute("SELECT uid FROM maildrop WHERE user_id = ? AND arrived_at < ?", (userId, before))
    uids = [row[0] for row in cursor.fetchall()]
    removed = removeMessages(cursor, userId, uids) if uids else 0
    cursor.execute(
        "UPDATE mailboxes SET oldest_arrival = (SELECT min(arrived_at) FROM maildrop WHERE user_id = ?) "
        "WHERE user_id = ?",
        (userId, userId),
    )
    if before is None:
        cursor.execute("SELECT uid FROM deleted_mail WHERE user_id = ?", (userId,))
    else:
        cursor.execute("SELECT uid FROM deleted_mail WHERE user_id = ? AND arrived_at < ?", (userId, before))
    kept = [row[0] for row in cursor.fetchall()]
    return removed, _dropKept(cursor, {userId: kept}) if kept else 0


def _recountUsage(cursor, address):
    """
    Set a user's storage use to what the maildrop holds.

    @return: C{(before, after)}, each C{(messages, octets)}.
    """
    userId = _userId(cursor, address)
    # Locked first, as in _expungeUser: a delivery or a QUIT committing
    # meanwhile is counted once, before the count or after it.
    cursor.execute(
        "UPDATE mailboxes SET oldest_arrival = oldest_arrival WHERE user_id = ? "
        "RETURNING used_messages, used_octets",
        (userId,),
    )
    row = cursor.fetchone()
    if row is None:
        # Deleted since it was found: a user deletion committed meanwhile
        # (waited for here, on PostgreSQL).  Not a TypeError: recount
        # --all goes on with the others.
        raise NoSuchUser(address)
    before = tuple(row)
    cursor.execute(
        "SELECT count(*), coalesce(sum(size), 0), min(arrived_at) FROM maildrop WHERE user_id = ?", (userId,)
    )
    messages, octets, oldest = cursor.fetchone()
    after = (int(messages), int(octets))
    cursor.execute(
        "UPDATE mailboxes SET used_messages = ?, used_octets = ?, oldest_arrival = ? WHERE user_id = ?",
        (*after, oldest, userId),
    )
    return before, after


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
        L{Deferred} L{mailgate.records.QuotaStatus}, or C{None} if
        there is no such user.
        """
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
                quotaOctets,
                quotaMessages,
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

        @return: a L{Deferred} L{ExpiryPass}: C{(messages removed,
            maildrops skipped because busy)}, and how many maildrops were
            examined; C{(0, 0)} while this node's clock runs ahead of the
            database server's (L{SessionRegistry.clockAhead}).
        """
        if self.sessions.clockAhead:
            return defer.succeed(ExpiryPass(0, 0, 0))
        now = self._now()

        @defer.inlineCallbacks
        def run():
            default, candidates = yield self.database.runInteraction(
                _expirePass, now, self._ownRetention(), now - SETTINGS_COUNT_FOR, self.sessions.nodeId, users
            )
            removed = busy = examined = 0
            removedFrom = []
            for userId, address in candidates:
                try:
                    yield self.locks.acquire(userId)
                except MaildropInUse:
                    busy += 1
                    continue
                except Exception:
                    # The database away: what the pass removed so far is
                    # still told (see ExpiryPass.failure).
                    return ExpiryPass(removed, busy, examined, removedFrom, Failure())
                fromThis = 0
                failure = None
                try:
                    more = True
                    while more:
                        # Each transaction guarded, as a QUIT's is: should
                        # the lock be lost, a node that takes it reads the
                        # maildrop after the removals, not before.
                        count, more, days = yield self.database.runWrite(
                            Guarded.under(self.locks, userId, _expireUser), userId, now, default,
                            messagesPerTransaction,
                        )
                        fromThis += count
                    examined += 1
                except MaildropLockLost:
                    # Another session may have the maildrop now.
                    busy += 1
                except Exception:
                    # A write failed (the database away): the pass ends
                    # here, and the removals committed before it, in this
                    # maildrop and the others, are still told, for the log
                    # and the metrics.
                    failure = Failure()
                finally:
                    removed += fromThis
                    if fromThis:
                        removedFrom.append((address, fromThis, days))
                    yield self.locks.release(userId)
                if failure is not None:
                    return ExpiryPass(removed, busy, examined, removedFrom, failure)
            return ExpiryPass(removed, busy, examined, removedFrom)

        return run()

    def purgeDeleted(self, limit=500):
        """
        Remove kept deleted mail older than L{StoreLimits.keepDeletedDays}
        (all of it when that is 0), or than a live node keeps it (see
        L{_keptLongest}), at most C{limit} messages.

        @return: a L{Deferred} of how many were removed (none while this
            node's clock runs ahead: L{SessionRegistry.clockAhead}).
        """
        if self.sessions.clockAhead:
            return defer.succeed(0)
        now = self._now()
        return self.database.runWrite(
            _purgeKept, now, self._ownRetention(), now - SETTINGS_COUNT_FOR, self.sessions.nodeId, limit
        )

    def forgetDeliveries(self, limit=500):
        """
        Forget at most C{limit} recent deliveries older than the duplicate
        window (L{StoreLimits.duplicateWindow}, or a live node's longer
        one): a message sent again after that is stored again.

        @return: a L{Deferred} of how many were forgotten (none while this
            node's clock runs ahead: L{SessionRegistry.clockAhead}).
        """
        if self.sessions.clockAhead:
            return defer.succeed(0)
        now = self._now()
        return self.database.runWrite(
            _forgetDeliveries, now, self.limits.duplicateWindow, now - SETTINGS_COUNT_FOR,
            self.sessions.nodeId, limit,
        )

    def _ownRetention(self):
        """
        This node's retention defaults, as L{_keptLongest} takes them.
        """
        expireDays = UNLIMITED if self.limits.expireDays is None else self.limits.expireDays
        return expireDays, self.limits.keepDeletedDays

    def listDeleted(self, address):
        """
        A user's kept deleted messages: a L{Deferred} list of
        L{mailgate.records.DeletedMessage}, in their maildrop order.
        Fails with L{NoSuchUser}.
        """
        return self.database.runInteraction(_listDeleted, address)

    def restoreDeleted(self, address, uidls=None, since=None, asNew=False):
        """
        Bring kept deleted messages back; see L{_restoreDeleted}.

        @param uidls: the unique ids to restore; C{None} for all.
        @param since: only those deleted at or after this time (seconds).
        @return: a L{Deferred} of C{(restored, missing)}.
        """
        return self.database.runWrite(
            _restoreDeleted, address, None if uidls is None else list(uidls), since, asNew, self._now()
        )

    @property
    def sessions(self):
        """
        This store's part of the registry of POP3 sessions
        (L{mailgate.store.registry.SessionRegistry}).
        """
        sessions = self.__dict__.get("_sessions")
        if sessions is None:
            sessions = self.__dict__["_sessions"] = SessionRegistry(self)
        return sessions

    def listSessions(self, address=None, kicked=False):
        """
        The POP3 sessions in progress on every live node (of C{address}
        only, if given; with C{kicked}, only those a kick marked): a
        L{Deferred} list of L{mailgate.records.SessionInfo}, oldest first.
        """
        return self.database.runInteraction(_sessions, self._now() - STALE_AFTER, address, kicked)

    def listNodes(self):
        """
        The live nodes and the settings they announce: a L{Deferred} list
        of L{mailgate.records.NodeInfo}, by name.
        """
        return self.database.runInteraction(_nodes, self._now() - STALE_AFTER)

    def kickSessions(self, address):
        """
        Ask the nodes serving C{address}'s POP3 sessions to end them
        (without applying their deletions): a L{Deferred} of how many were
        marked.
        """
        now = self._now()
        return self.database.runWrite(_kick, address, now, now - STALE_AFTER)

    def importMessages(self, address, items):
        """
        Add messages from another server, keeping their unique ids; see
        L{_importMessages}.  One transaction: all of C{items} or none.

        @return: a L{Deferred} of C{(imported, skipped, conflicts)}; fails
            with L{NoSuchUser}.
        """
        return self.database.runWrite(_importMessages, address, list(items))

    def forgetImported(self, address, uidls=None):
        """
        Forget the unique ids imported for a user (C{uidls}, or all): see
        L{_forgetImported}.  A L{Deferred} of how many; fails with
        L{NoSuchUser}.
        """
        return self.database.runWrite(_forgetImported, address, None if uidls is None else list(uidls))

    def existingUidls(self, address, uidls):
        """
        Which of C{uidls} a user's maildrop already holds (or keeps
        deleted): a L{Deferred} dict, unique id to the set of sizes of
        what it holds under it.
        """
        return self.database.runInteraction(_existingUidls, address, list(uidls))

    def removeImportedGone(self, address, listed):
        """
        Take out of a user's maildrop what an import brought in and the
        source no longer lists (see L{_removeImportedGone}), kept for
        recovery; not while a POP3 session holds the maildrop.

        @param listed: every unique id the source lists now.
        @return: a L{Deferred} of the unique ids taken out; fails with
            L{NoSuchUser} or L{MaildropInUse}.
        """
        now = self._now()
        return self._underLock(address, _removeImportedGone, address, frozenset(listed), now, now - STALE_AFTER)

    def _underLock(self, address, write, *args):
        """
        Write, C{write(cursor, *args)}, holding the maildrop's POP3 lock,
        taken without waiting: fails with L{MaildropInUse} if a session
        holds it.  (Where locks are per process, as with the embedded
        SQLite store, the session registry is checked as well, inside the
        write's transaction.)  The write is guarded (L{Guarded}): it fails
        with L{MaildropLockLost}, having changed nothing, if the lock was
        lost on the way.

        The write is given the id of the user whose lock is held, last,
        and must act on that user only (L{lockedUserId}): the address
        may be another user's by the time it runs, whose lock is not held.
        """
        @defer.inlineCallbacks
        def run():
            user = yield self.findUser(address)
            if user is None:
                raise NoSuchUser(address)
            yield self.locks.acquire(user.userId)
            try:
                result = yield self.database.runWrite(
                    Guarded.under(self.locks, user.userId, write), *args, user.userId
                )
            finally:
                yield self.locks.release(user.userId)
            return result

        return run()

    def renameUser(self, old, new):
        """
        Rename a user; refused (L{MaildropInUse}) while the user is in a
        POP3 session.  The next login must use the new address, also on a
        running server: a password remembered for the old one no longer
        opens the maildrop (see L{mailgate.store.snapshot}).

        @return: a L{Deferred}; fails with L{NoSuchUser}, L{UserExists} or
            L{MaildropInUse}.
        """
        return self._underLock(old, _renameUser, self.engine, old, new, self._now() - STALE_AFTER)

    def expungeMessages(self, address, olderThanDays=None):
        """
        Remove a user's messages for good (all of them, or those older
        than C{olderThanDays}), those kept for recovery included, not
        while a POP3 session holds the maildrop.

        @return: a L{Deferred} of C{(messages removed from the maildrop,
            kept deleted messages removed)}; fails with L{NoSuchUser} or
            L{MaildropInUse}.
        """
        now = self._now()
        before = None if olderThanDays is None else now - olderThanDays * DAY
        return self._underLock(address, _expungeUser, address, before, now - STALE_AFTER)

    def recountUsage(self, address):
        """
        Count a user's storage use again from the maildrop's messages.

        @return: a L{Deferred} of C{(before, after)}, each C{(messages,
            octets)}; fails with L{NoSuchUser}.
        """
        return self.database.runWrite(_recountUsage, address)
