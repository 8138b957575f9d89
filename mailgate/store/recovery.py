# -*- test-case-name: tests.test_lifecycle -*-
"""
Deleted mail kept for recovery (C{--keep-deleted-days}): a POP3 deletion
moves the message's row, with its uid, unique id and body reference, to
C{deleted_mail}; C{mailgate mailbox restore} brings it back, and the
retention task (L{mailgate.store.retention}) removes it for good once
its days are over.  A message's uid and unique id are never given to
another message: kept deleted mail keeps its own, restored mail gets them
back.
"""

from mailgate.records import DeletedMessage, WarnedOfQuota
from mailgate.store.database import updatesMailboxes
from mailgate.store.guarded import _userId
from mailgate.store.limits import StoreLimits, quotaCrossed
from mailgate.store.paging import stillListed
from mailgate.store.rows import (
    MAILDROP_COLUMNS,
    PREFIX_COLUMNS,
    batches,
    formatUniqueId,
    insertRows,
    placeholders,
    releaseBodies,
    releaseUsage,
    storeQuotaWarning,
)

#: No default quota and no warnings (L{StoreLimits.deliveryQuota}).
_NO_QUOTA = StoreLimits().deliveryQuota()


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
def _keepDeleted(cursor, userId, uids, now, peer, master=None):
    """
    The UPDATE state of a POP3 session where deleted mail is kept: the
    messages leave the maildrop (and the user's quota) but their rows, with
    their uid, unique id and body reference, move to C{deleted_mail}, with
    when, from which client (C{peer}, or C{"import"}) and, for a master
    user's session, by which master user (C{master}).

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
        rows = cursor.fetchall()
        # Each copy's own fields (Delivered-To:) go with it, for a restore.
        cursor.execute(
            f"DELETE FROM maildrop_prefixes WHERE user_id = ? AND uid IN ({placeholders(len(batch))}) "
            "RETURNING uid, prefix",
            (userId, *batch),
        )
        prefixes = {uid: bytes(prefix) for uid, prefix in cursor.fetchall()}
        kept += [(*row, now, peer, master, prefixes.get(row[1])) for row in rows]
    insertRows(
        cursor, "deleted_mail", MAILDROP_COLUMNS + ("deleted_at", "deleted_by", "deleted_by_master", "prefix"), kept
    )
    removed = len(kept)
    octets = sum(row[5] for row in kept)
    if removed:
        releaseUsage(cursor, userId, removed, octets)
    return removed


def _listDeleted(cursor, address):
    userId = _userId(cursor, address)
    cursor.execute(
        "SELECT size, uidl, deleted_at, deleted_by, arrived_at, deleted_by_master FROM deleted_mail "
        "WHERE user_id = ? ORDER BY uid",
        (userId,),
    )
    return [DeletedMessage(n, *row) for n, row in enumerate(cursor.fetchall(), 1)]


def _deletedPage(cursor, address, position, limit):
    """
    A page of a user's kept deleted messages (L{mailgate.store.paging}):
    at most C{limit} C{(size, uidl, deleted at, deleted by, arrived,
    deleted by master)}
    after the page before, in their order.

    @param position: C{None} for the first page (C{NoSuchUser} if there
        is no such user), else what the page before returned (the same
        user's, C{NoSuchUser} once she is gone).
    """
    userId, after = (_userId(cursor, address), 0) if position is None else position
    cursor.execute(
        "SELECT uid, size, uidl, deleted_at, deleted_by, arrived_at, deleted_by_master FROM deleted_mail "
        f"WHERE user_id = ? AND uid > ? ORDER BY uid LIMIT {int(limit)}",
        (userId, after),
    )
    rows = cursor.fetchall()
    if position is not None and len(rows) < limit:
        stillListed(cursor, address, userId)
    return (userId, rows[-1][0] if rows else after), [row[1:] for row in rows]


_DELETED_COLUMNS = "uid, uidl, body_owner, body_id, size, header_size, arrived_at, prefix"


def _restoreBound(cursor, address, now):
    """
    The deletion time up to which a restore of all of a user's kept mail
    goes (L{_restoreSome}'s C{until}): C{now}, the restore's start by the
    clock of the host it runs on, or the latest deletion kept if that is
    later.  The deletions were dated by the clocks of the nodes that made
    them: run on a host whose clock lags theirs (an administrator's
    machine two minutes behind), a restore begun a minute after the user
    deleted everything restored none of it and said C{0 messages
    restored}, though C{mailbox deleted} listed the messages.  What a
    POP3 client deletes once the restore has begun still stays deleted,
    dated after the bound by the node's clock.

    @raise NoSuchUser: if there is no such user.
    """
    userId = _userId(cursor, address)
    cursor.execute("SELECT max(deleted_at) FROM deleted_mail WHERE user_id = ?", (userId,))
    latest = cursor.fetchone()[0]
    return now if latest is None else max(now, int(latest))


def _restoreDeleted(cursor, address, uidls, since, asNew, now, quota=_NO_QUOTA):
    """
    Bring kept deleted messages back, all in this transaction; see
    L{_restoreSome}.

    @return: C{(restored, missing)}.
    """
    restored, missing, _ = _restoreSome(cursor, address, uidls, since, asNew, now, quota=quota)
    return restored, missing


def _restoreSome(cursor, address, uidls, since, asNew, now, limit=None, until=None, quota=_NO_QUOTA):
    """
    Bring kept deleted messages back into the maildrop: those with the
    unique ids C{uidls} (all if C{None}), deleted at or after C{since}
    (if given).  They come back after every other message, as new mail
    is delivered, under their own unique ids, or with C{asNew} under new
    ones, so that clients that leave mail on the server download them
    again.  Restoring is never refused for the quota: the mail was
    already stored.

    After the others, not in their old place: a client that forgot their
    ids (it polled while they were gone) takes them for new mail, and
    fetchmail, where more than seven messages are listed, looks for the
    first message it has not seen by halving the list (C{fastuidl}: its
    daemon does on three polls of four, and on every one with fastuidl
    1), taking every message before the last one it has seen for seen:
    among the others, such a poll never found them.  They are dated at
    their restore, too, and Dovecot lists a message file put back last
    (under a new IMAP UID).  Each gets a new uid (the maildrop's order),
    in the order they had; a unique id, kept or new, is never another
    message's.

    A restored message is dated C{now}: its retention (C{--expire-days})
    counts from its restore.  Dated as it first arrived, a message older
    than its retention would be removed for good by the next retention
    pass (retention keeps nothing back), minutes after the restore said
    it was back.

    @param limit: restore at most this many (of all, C{uidls} being
        C{None}), the first in their order: a restore of a large maildrop
        in several transactions.
    A restore that brings the user's use to one of the quota's warning
    percentages warns of it as a delivery does (L{storeQuotaWarning}, in
    this transaction, after the restored messages; the highest of several),
    and not again while the use stays past it: a restore is never refused,
    so without the warning a user whose mailbox a restore filled had mail
    refused without ever having been told it was filling up.

    @param until: restore only those deleted at or before this time:
        the time such a restore began, so that what a POP3 client deletes
        while it runs stays deleted.
    @param quota: the server's default limits and warning percentages,
        C{(octets, messages, warnings)} (L{StoreLimits.deliveryQuota}).
    @return: C{(restored, missing, more)}: a list of C{(old unique id,
        unique id now)}, the requested unique ids that are not kept, and
        whether C{limit} may have left some to restore.  The unique id now
        of the last message of a restore that warned is a
        L{WarnedOfQuota}, saying of which percentage.
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
    if until is not None:
        where += " AND deleted_at <= ?"
        params.append(until)
    rows = []
    if uidls is None and limit is not None:
        cursor.execute(
            f"DELETE FROM deleted_mail WHERE {where} AND uid IN "
            f"(SELECT uid FROM deleted_mail WHERE {where} ORDER BY uid LIMIT {int(limit)}) "
            f"RETURNING {_DELETED_COLUMNS}",
            params + params,
        )
        rows = cursor.fetchall()
    elif uidls is None:
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
    more = limit is not None and len(rows) >= limit
    if not rows:
        return [], missing, more
    cursor.execute(
        "UPDATE mailboxes SET next_uid = next_uid + ? WHERE user_id = ? RETURNING next_uid, uid_validity",
        (len(rows), userId),
    )
    following, validity = cursor.fetchone()
    first = following - len(rows)
    entries = [
        (userId, first + n, formatUniqueId(first + n, validity) if asNew else row[1], *row[2:6], now)
        for n, row in enumerate(rows)
    ]
    insertRows(cursor, "maildrop", MAILDROP_COLUMNS, entries)
    insertRows(
        cursor, "maildrop_prefixes", PREFIX_COLUMNS,
        [(userId, entry[1], bytes(row[7])) for row, entry in zip(rows, entries) if row[7] is not None],
    )
    octets = sum(row[4] for row in rows)
    octetLimit, messageLimit, warnings = quota
    cursor.execute(
        "UPDATE mailboxes SET used_messages = used_messages + ?, used_octets = used_octets + ?, "
        "oldest_arrival = CASE WHEN oldest_arrival IS NULL OR oldest_arrival > ? THEN ? "
        "ELSE oldest_arrival END WHERE user_id = ? "
        "RETURNING used_octets, coalesce(quota_octets, ?), used_messages, coalesce(quota_messages, ?)",
        (len(rows), octets, now, now, userId, octetLimit, messageLimit),
    )
    usedOctets, octetQuota, usedMessages, messageQuota = cursor.fetchone()
    restored = [(row[1], entry[2]) for row, entry in zip(rows, entries)]
    crossing = quotaCrossed(
        warnings,
        (usedOctets - octets, usedOctets, octetQuota),
        (usedMessages - len(rows), usedMessages, messageQuota),
    )
    if crossing is not None:
        storeQuotaWarning(cursor, userId, address, crossing, now)
        old, new = restored[-1]
        restored[-1] = (old, WarnedOfQuota(new, crossing))
    return restored, missing, more
