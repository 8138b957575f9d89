# -*- test-case-name: tests.test_policy_store -*-
"""
Failed authentications and bans in the database: the policy's shared
state (L{mailgate.interfaces.IPolicyStore}) over SQL, for SQLite and
PostgreSQL alike.

Every method is one interaction handed to the store's L{Database}: reads
on a reader thread, writes through the group-commit writer, never on the
reactor thread.  With the embedded SQLite store the state is in the
database file, so a restart keeps bans; with PostgreSQL every node sharing
the database sees every failure and ban.

Times are whole seconds since the epoch in the database (as elsewhere in
the schema); the records carry them as given back.
"""

import math
import secrets

from zope.interface import implementer

from mailgate.interfaces import IPolicyStore
from mailgate.records import (
    REASON_ADMIN,
    REASON_FORGOTTEN,
    AuthFailure,
    BanRecord,
    FailureOutcome,
    Forgotten,
    PolicyChanges,
    banTarget,
    forgettingOf,
    recipientsAddress,
)


def _seconds(at):
    return int(math.floor(at))


def _ends(at):
    return int(math.ceil(at))


# -- interactions ----------------------------------------------------------
# Each runs on a worker thread with a cursor inside a transaction.


def _version(cursor):
    cursor.execute("SELECT version FROM ban_version WHERE singleton = 1")
    return cursor.fetchone()[0]


def _bump(cursor):
    cursor.execute("UPDATE ban_version SET version = version + 1 WHERE singleton = 1 RETURNING version")
    return cursor.fetchone()[0]


def _banRecord(row):
    address, reason, failures, created, expires = row
    return BanRecord(address, reason, failures, created, expires)


def _banOf(cursor, address):
    cursor.execute(
        "SELECT address, reason, failures, created_at, expires_at FROM bans WHERE address = ?",
        (address,),
    )
    row = cursor.fetchone()
    return None if row is None else _banRecord(row)


def _putBan(cursor, ban):
    cursor.execute(
        "INSERT INTO bans (address, reason, failures, created_at, expires_at) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT (address) DO UPDATE SET reason = excluded.reason, failures = excluded.failures, "
        "created_at = excluded.created_at, expires_at = excluded.expires_at",
        (ban.address, ban.reason, ban.failures, ban.created, ban.expires),
    )
    return _bump(cursor)


def _recordFailure(cursor, failure, banAfter, banWindow, banTime, ban):
    at = _seconds(failure.at)
    # rcpt:KEY counts the unknown recipients of KEY, whose ban is KEY's.
    target, reason = banTarget(failure.address)
    # First the address's own row: its lock orders concurrent failures from
    # one address (on PostgreSQL, across nodes), so the count below sees
    # every one committed before it.
    cursor.execute(
        "INSERT INTO failing_addresses (address, last_failure) VALUES (?, ?) "
        "ON CONFLICT (address) DO UPDATE SET last_failure = excluded.last_failure",
        (failure.address, at),
    )
    existing = _banOf(cursor, target)
    # An earlier mailgate's marker of forgotten failures is no ban, whatever
    # this node's clock says of its time (it was written by another host's).
    if existing is not None and existing.reason != REASON_FORGOTTEN and existing.expires > at:
        cursor.execute(
            "SELECT count(*) FROM auth_failures WHERE address = ? AND failed_at > ?",
            (failure.address, at - banWindow),
        )
        (count,) = cursor.fetchone()
        return FailureOutcome(count, None, True, _version(cursor))
    cursor.execute(
        "INSERT INTO auth_failures (failure_id, address, login, failed_at) VALUES (?, ?, ?, ?)",
        (failure.failureId, failure.address, failure.login, at),
    )
    cursor.execute(
        "SELECT count(*) FROM auth_failures WHERE address = ? AND failed_at > ?",
        (failure.address, at - banWindow),
    )
    (count,) = cursor.fetchone()
    if ban or (banAfter > 0 and count >= banAfter):
        made = BanRecord(target, reason, count, at, _ends(failure.at + banTime))
        return FailureOutcome(count, made, True, _putBan(cursor, made))
    return FailureOutcome(count, None, False, _version(cursor))


def _addBan(cursor, ban):
    _putBan(cursor, ban)
    return ban


def _forgetCounted(cursor, address):
    """
    Delete the failed logins and unknown recipients counted for C{address}:
    how many of each there were.
    """
    counts = []
    for counted in (address, recipientsAddress(address)):
        cursor.execute("DELETE FROM auth_failures WHERE address = ?", (counted,))
        counts.append(max(cursor.rowcount, 0))
        cursor.execute("DELETE FROM failing_addresses WHERE address = ?", (counted,))
    return Forgotten(*counts)


def _markForgotten(cursor, address, at):
    """
    Tell every node that the failures of C{address} up to C{at} are
    forgotten: a marker among the failures, which every node's next read
    brings (see L{mailgate.records.FORGOTTEN_PREFIX}), and which expires
    with them.  Rounded up: a node's failure stamped within the second
    before is forgotten too, as it was here.
    """
    cursor.execute(
        "INSERT INTO auth_failures (failure_id, address, login, failed_at) VALUES (?, ?, NULL, ?)",
        (secrets.token_hex(8), forgettingOf(address), _ends(at)),
    )


def _removeBan(cursor, address, at):
    # A marker an earlier mailgate left is no ban (REASON_FORGOTTEN).
    cursor.execute("DELETE FROM bans WHERE address = ? AND reason <> ?", (address, REASON_FORGOTTEN))
    removed = cursor.rowcount > 0
    if removed:
        # A lifted ban is a fresh start: the failures that made it would
        # otherwise make it again at the next one.  The nodes that read
        # the ban forget them when it is gone; the marker tells the others
        # too (one that had not read it yet, or saw it end).
        _forgetCounted(cursor, address)
        _markForgotten(cursor, address, at)
        _bump(cursor)
    return removed


def _forgetFailures(cursor, address, at):
    forgotten = _forgetCounted(cursor, address)
    if forgotten.logins or forgotten.recipients:
        # The running nodes counted these failures too, and read no
        # deletion: the marker tells them.  (Before, it was a row of the
        # bans table, which a ban made before the nodes read it replaced.)
        _markForgotten(cursor, address, at)
    return forgotten


def _listBans(cursor, at):
    # An earlier mailgate's marker of forgotten failures ends as it was
    # written, but by the clock of the host that wrote it: a node whose
    # clock lags would enforce it.
    cursor.execute(
        "SELECT address, reason, failures, created_at, expires_at FROM bans "
        "WHERE expires_at > ? AND reason <> ? ORDER BY address",
        (_seconds(at), REASON_FORGOTTEN),
    )
    return [_banRecord(row) for row in cursor.fetchall()]


def _changes(cursor, version, failuresSince, at):
    # The version is read before the bans: a ban committed in between is
    # then in the list with the old version noted, and read again next
    # time, never missed (PostgreSQL runs each read statement on a snapshot
    # of its own).
    current = _version(cursor)
    bans = None
    if current != version:
        bans = tuple(_listBans(cursor, at))
    cursor.execute(
        "SELECT failure_id, address, login, failed_at FROM auth_failures WHERE failed_at >= ?",
        (_seconds(failuresSince),),
    )
    failures = tuple(AuthFailure(*row) for row in cursor.fetchall())
    return PolicyChanges(current, bans, failures)


def _expire(cursor, at, failuresBefore):
    before = _seconds(failuresBefore)
    cursor.execute("DELETE FROM auth_failures WHERE failed_at < ?", (before,))
    removed = cursor.rowcount
    cursor.execute("DELETE FROM failing_addresses WHERE last_failure < ?", (before,))
    removed += cursor.rowcount
    # Ended bans need no version change: every node already treats them
    # as ended, from their times.  An earlier mailgate's marker of
    # forgotten failures is kept as long as the failures it forgot would
    # have been.
    cursor.execute("DELETE FROM bans WHERE expires_at <= ? AND reason <> ?", (_seconds(at), REASON_FORGOTTEN))
    removed += cursor.rowcount
    cursor.execute("DELETE FROM bans WHERE reason = ? AND created_at < ?", (REASON_FORGOTTEN, before))
    removed += cursor.rowcount
    return removed


@implementer(IPolicyStore)
class SQLPolicyStore:
    """
    Failures and bans in the tables of schema migration 2.

    @param database: the mail store's L{mailgate.store.database.Database}
        (or L{SynchronousDatabase}, for the admin command).
    """

    def __init__(self, database):
        self.database = database

    def recordFailure(self, failure, banAfter, banWindow, banTime, ban=False):
        return self.database.runWrite(_recordFailure, failure, banAfter, banWindow, banTime, ban)

    def addBan(self, address, at, duration, reason=REASON_ADMIN):
        ban = BanRecord(address, reason, 0, _seconds(at), _ends(at + duration))
        return self.database.runWrite(_addBan, ban)

    def removeBan(self, address, at):
        return self.database.runWrite(_removeBan, address, at)

    def forgetFailures(self, address, at):
        return self.database.runWrite(_forgetFailures, address, at)

    def listBans(self, at):
        return self.database.runInteraction(_listBans, at)

    def changes(self, version, failuresSince, at):
        return self.database.runInteraction(_changes, version, failuresSince, at)

    def expire(self, at, failuresBefore):
        return self.database.runWrite(_expire, at, failuresBefore)

