# -*- test-case-name: tests.test_lifecycle -*-
"""
The limits a maildrop lives under (quotas, retention, how long deleted
mail is kept, the window of a delivery's retry): the server's defaults
(L{StoreLimits}), each user's own, storage use and the warnings a
delivery that nears a quota puts into the maildrop.

The rules they keep:

  - Storage use (C{mailboxes.used_octets}, C{used_messages}) changes in the
    same transaction as the mail it counts, on the row the delivery
    already locks for its uid counter; quotas are checked there too (see
    L{mailgate.store.sql._takeUids}).
  - Limits stored per user are C{NULL} for the server's default and C{-1}
    for none (C{EXPIRE NEVER}); the server's defaults are L{StoreLimits}.
"""

import datetime
import secrets
from email.utils import format_datetime

import attr

from mailgate.errors import NoSuchUser
from mailgate.interfaces import KEEP
from mailgate.plural import counted
from mailgate.store.bounds import formatSize
from mailgate.store.guarded import _userId

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
        "When it is full, new mail for you is refused and returned to the\n"
        "people who sent it, at once or after their mail servers have tried\n"
        "again for a few days.\n"
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


#: An argument not given: the stored value stays as it is (the contract's
#: own, which a caller of setQuota may pass too).
_KEEP = KEEP


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
