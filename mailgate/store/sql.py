# -*- test-case-name: tests.test_store -*-
"""
The mail store over SQL, shared by the SQLite and PostgreSQL engines.

Each public method hands one interaction (a function of a cursor) to the
L{Database}, which runs it off the reactor thread: reads as a transaction of
their own, writes through the group-commit queue.  A POP3 session's message
reads go through the store's L{mailgate.interfaces.IMessageReads} instead
(L{mailgate.store.reads}), which the engine chooses.  Queries use C{?}
placeholders; the engine's cursor translates them where the driver wants
another style.
"""

import secrets
import time
from collections import Counter

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from mailgate.errors import MaildropLockLost, NoSuchUser, QuotaExceeded, TemporaryFailure, UserExists
from mailgate.interfaces import ILifecycleStore, IMaildrop, IMailStore, IMessageBody
from mailgate.store import aliases, lifecycle, masterusers, paging
from mailgate.store.aliases import aliasesAmong, refuseAlias
from mailgate.store.database import BatchableWrite, updatesMailboxes
from mailgate.store.guarded import LOCK_LOST, Guarded, lockedOutOfSession
from mailgate.store.limits import StoreLimits, quotaCrossed
from mailgate.store.reads import CHUNK_SIZE, ThreadedMessageReads, firstChunks
from mailgate.store.recovery import _keepDeleted
from mailgate.store.rows import (
    BODY_COLUMNS,
    CHUNK_COLUMNS,
    DELIVERED_COLUMNS,
    PREFIX_COLUMNS,
    ROWS_PER_INSERT,
    batches,
    bodyPieces,
    copyPrefixesOf,
    deliveryKeyConditions,
    dotLineColumns,
    formatUniqueId,
    insertRows,
    placeholders,
    removeMessages,
    storeLargeBody,
    storeQuotaWarning,
)
from mailgate.records import AlreadyDelivered, ExportedMessage, MessageInfo, UserRecord, UserSummary, WarnedOfQuota

# -- interactions ----------------------------------------------------------
# Each runs on a worker thread with a cursor inside a transaction.


def _findUser(cursor, address):
    cursor.execute(
        "SELECT user_id, address, password_hash, scram_sha256, apop_secret, cram_md5 "
        "FROM users WHERE address = ?",
        (address,),
    )
    row = cursor.fetchone()
    return None if row is None else UserRecord(*row)


def _findUsers(cursor, addresses):
    """
    The users of C{addresses} there are, as {address: L{UserRecord}}: one
    statement a few hundred addresses (C{mailgate user import} looked each
    line's user up in a transaction of its own: on PostgreSQL three round
    trips a line, 4 s of 5.8 for 50,000 users there already).
    """
    found = {}
    for batch in batches(addresses):
        cursor.execute(
            "SELECT user_id, address, password_hash, scram_sha256, apop_secret, cram_md5 "
            f"FROM users WHERE address IN ({placeholders(len(batch))})",
            batch,
        )
        for row in cursor.fetchall():
            found[row[1]] = UserRecord(*row)
    return found


def _hasDomain(cursor, domain):
    # A user's, or an alias's (a domain may have aliases only: mail for
    # them is taken, as Postfix's virtual alias domains take it), if the
    # alias's user is there (one removed by hand, with SQL, reaches no one).
    cursor.execute(
        "SELECT EXISTS (SELECT 1 FROM users WHERE domain = ?) OR EXISTS ("
        "SELECT 1 FROM aliases a JOIN users u ON u.user_id = a.user_id WHERE a.domain = ?)",
        (domain, domain),
    )
    return bool(cursor.fetchone()[0])


def _hasAPOPUsers(cursor):
    cursor.execute("SELECT 1 FROM users WHERE apop_secret IS NOT NULL LIMIT 1")
    return cursor.fetchone() is not None


def _digestLoginUsers(cursor):
    # One statement (one round trip to PostgreSQL); each EXISTS stops at
    # the first user it finds.
    cursor.execute(
        "SELECT EXISTS (SELECT 1 FROM users WHERE apop_secret IS NOT NULL), "
        "EXISTS (SELECT 1 FROM users WHERE cram_md5 IS NOT NULL)"
    )
    apop, cramMD5 = cursor.fetchone()
    return bool(apop), bool(cramMD5)


#: The kinds of the users' SCRAM-SHA-256 keys (RFC 5803's
#: C{SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>}, the salt in
#: base64), a row per kind: the text before the first ":", the length of
#: C{<iterations>:<salt>}, and where in that the first "=" (the salt's
#: padding) is, 0 if nowhere.  Each engine's fastest way, from what each
#: has (PostgreSQL's split_part; instr and substr in SQLite, which has
#: none): some 25 ms on PostgreSQL and 85 ms on SQLite for 50,000 users.
_SCRAM_KINDS = {
    "postgres": (
        "SELECT split_part(scram_sha256, ':', 1), octet_length(split_part(scram_sha256, '$', 2)), "
        "strpos(split_part(scram_sha256, '$', 2), '='), count(*) "
        "FROM users WHERE scram_sha256 IS NOT NULL GROUP BY 1, 2, 3"
    ),
    "sqlite": (
        "SELECT substr(scram_sha256, 1, instr(scram_sha256, ':') - 1), instr(substr(scram_sha256, 15), '$') - 1, "
        "CASE WHEN instr(substr(scram_sha256, 15), '=') < instr(substr(scram_sha256, 15), '$') "
        "THEN instr(substr(scram_sha256, 15), '=') ELSE 0 END, count(*) "
        "FROM users WHERE scram_sha256 IS NOT NULL GROUP BY 1, 2, 3"
    ),
}

_SCRAM_PREFIX = "SCRAM-SHA-256$"


def _scramParameters(cursor, engine):
    """
    How many users have SCRAM-SHA-256 keys of each iteration count and
    salt length, as {(iterations, salt length in octets): users}: one
    statement that reads the keys where they are and sends back a row per
    kind (a handful), not one per user.  A salt's length in octets is its
    base64's length and padding (16, 17 and 18 octets are all 24
    characters).  Keys that do not read so are left out (they serve no
    SCRAM login: their users are answered as names that are no user),
    among them octets where text belongs (SQLite keeps what it is given)
    and an iteration count of more digits than Python's int() reads: one
    such key failed the whole read, and with it every SCRAM login.

    @param engine: the engine's name, for its L{_SCRAM_KINDS}.
    """
    cursor.execute(_SCRAM_KINDS[engine])
    found = {}
    for head, length, equals, users in cursor.fetchall():
        prefixed = isinstance(head, str) and head.startswith(_SCRAM_PREFIX)
        iterations = head[len(_SCRAM_PREFIX):] if prefixed else ""
        if not (iterations.isascii() and iterations.isdigit()):
            continue
        try:
            count = int(iterations)
        except ValueError:
            continue
        salt = length - len(iterations) - 1
        padding = length - equals + 1 if equals else 0
        if salt < 0 or salt % 4 or padding > 2 or (equals and equals <= len(iterations) + 1):
            continue
        kind = (count, salt // 4 * 3 - padding)
        found[kind] = found.get(kind, 0) + users
    return found


def _sharedSecret(cursor, name, candidate):
    # The first node to ask stores its candidate; every node, then and
    # later, reads back the one stored.
    cursor.execute(
        "INSERT INTO shared_secrets (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
        (name, candidate),
    )
    cursor.execute("SELECT value FROM shared_secrets WHERE name = ?", (name,))
    return bytes(cursor.fetchone()[0])


_USER_VALUES = "(?, ?, ?, ?, ?, ?, ?)"
_INSERT_USER = (
    "INSERT INTO users (address, domain, password_hash, scram_sha256, apop_secret, cram_md5, created_at) "
    f"VALUES {_USER_VALUES}"
)


def _userRow(address, credentials, now):
    """
    The values of L{_INSERT_USER} for a new user: one row, whether added
    alone (L{_addUser}) or with others (L{_addUsers}).
    """
    return (
        address,
        address.rpartition("@")[2],
        credentials.passwordHash,
        credentials.scramSha256,
        credentials.apopSecret,
        credentials.cramMD5,
        now,
    )


#: The tables whose rows outlive a user removed by hand (not with C{user
#: del}), each keyed by the user's id first: his mail, his maildrop's
#: counters.
_HOLDING_USER_IDS = (
    ("mailboxes", "user_id"),
    ("maildrop", "user_id"),
    ("maildrop_prefixes", "user_id"),
    ("deleted_mail", "user_id"),
    ("bodies", "owner_id"),
    ("imported_ids", "user_id"),
    ("recent_deliveries", "user_id"),
    ("aliases", "user_id"),
)

#: the ids still held a new user is moved past before giving up
HELD_IDS_SKIPPED = 1000


def _heldUserIds(cursor, userIds):
    """
    Which of C{userIds} rows of L{_HOLDING_USER_IDS} hold: a user removed
    by hand, his mail left, whose id the counter gives again (set back:
    a database copied by a mailgate that set it past the users only, a
    sequence restored or reset by hand).  One look-up by primary key a
    table.
    """
    marks = ", ".join("?" * len(userIds))
    union = " UNION ".join(
        f"SELECT {column} FROM {table} WHERE {column} IN ({marks})" for table, column in _HOLDING_USER_IDS
    )
    cursor.execute(union, [userId for _ in _HOLDING_USER_IDS for userId in userIds])
    return {userId for (userId,) in cursor.fetchall()}


def _insertUser(cursor, row):
    """
    Insert the user C{row} (L{_userRow}), under an id no mail holds: one
    it holds (L{_heldUserIds}) is given up, the user inserted again under
    the counter's next.  Nobody is given a removed user's mail, nor
    refused (his maildrop's counters there already, "duplicate key", exit
    70) for it.

    @return: the new user's id.
    """
    for _ in range(HELD_IDS_SKIPPED):
        cursor.execute(f"{_INSERT_USER} RETURNING user_id", row)
        (userId,) = cursor.fetchone()
        if not _heldUserIds(cursor, [userId]):
            return userId
        cursor.execute("DELETE FROM users WHERE user_id = ?", (userId,))
    raise TemporaryFailure(
        f"the user ids the database gives next are held by the mail of {HELD_IDS_SKIPPED} users removed by hand: "
        "mailgate db check names them"
    )


def _addUser(cursor, engine, address, credentials, now):
    cursor.execute("SELECT 1 FROM users WHERE address = ?", (address,))
    if cursor.fetchone() is not None:
        raise UserExists(address)
    refuseAlias(cursor, address)
    try:
        userId = _insertUser(cursor, _userRow(address, credentials, now))
    except Exception as e:
        if engine.isUniqueViolation(e):
            raise UserExists(address) from None
        raise
    cursor.execute(
        "INSERT INTO mailboxes (user_id, uid_validity, next_uid) VALUES (?, ?, 1)",
        (userId, secrets.randbits(31)),
    )
    return _findUser(cursor, address)


#: Users C{mailgate user import} adds per transaction (L{_addUsers}): 500
#: a commit rather than one each, and a server beside it (SQLite's one
#: write lock) waits at most about one such transaction.
IMPORT_BATCH = 500


def _addUsers(cursor, users, now):
    """
    Add each of C{users}, C{(address, credentials, quota)} with C{quota} a
    dict of the C{octets} and C{messages} limits to set (possibly empty)
    and, for a user added disabled, C{disabled}, the reason (C{""}: none),
    and for one restricted to some networks, C{networks} (their text),
    in this one transaction: a list of booleans, C{True} for each added,
    C{False} for each whose address is taken (there before, or added by
    another command meanwhile: C{ON CONFLICT DO NOTHING}, which on
    PostgreSQL does not abort the transaction as a unique violation
    would).

    The users, then their mailboxes, are inserted C{ROWS_PER_INSERT} to a
    statement: three statements a user, a round trip each, were 11 of the
    14 s PostgreSQL took to import 50,000.
    """
    added = []
    for part in batches(users, ROWS_PER_INSERT):
        # An alias's address is taken as a user's is (mailgate.store.aliases).
        aliased = aliasesAmong(cursor, [address for address, _, _ in part])
        free = [user for user in part if user[0] not in aliased]
        userIds = {}
        if free:
            cursor.execute(
                f"{_INSERT_USER}{f', {_USER_VALUES}' * (len(free) - 1)} "
                "ON CONFLICT (address) DO NOTHING RETURNING user_id, address",
                [value for address, credentials, _ in free for value in _userRow(address, credentials, now)],
            )
            # In no given order: each by its address.
            userIds = {address: userId for userId, address in cursor.fetchall()}
        held = _heldUserIds(cursor, list(userIds.values())) if userIds else set()
        for address, credentials, _ in part:
            if userIds.get(address) in held:
                # Under a removed user's id, whose mail is left: again,
                # under the counter's next free one.
                cursor.execute("DELETE FROM users WHERE user_id = ?", (userIds[address],))
                userIds[address] = _insertUser(cursor, _userRow(address, credentials, now))
        mailboxes = []
        for address, _, quota in part:
            # Popped: the same address twice is added once.
            userId = userIds.pop(address, None)
            added.append(userId is not None)
            if userId is not None:
                mailboxes.append((userId, secrets.randbits(31), 1, quota.get("octets"), quota.get("messages")))
                if quota.get("disabled") is not None:
                    # Added disabled (a passwd-file's nologin), in the
                    # same transaction: never a moment it could log in.
                    lifecycle._setDisabled(cursor, userId, now, quota["disabled"] or None)
                if quota.get("networks") is not None:
                    # Added with the networks it may log in from (a
                    # passwd-file's allow_nets), in the same transaction.
                    cursor.execute("UPDATE users SET allowed_nets = ? WHERE user_id = ?", (quota["networks"], userId))
        insertRows(
            cursor, "mailboxes", ("user_id", "uid_validity", "next_uid", "quota_octets", "quota_messages"), mailboxes
        )
    return added



def _setCredentials(cursor, address, credentials):
    cursor.execute(
        "UPDATE users SET password_hash = ?, scram_sha256 = ?, apop_secret = ?, cram_md5 = ? "
        "WHERE address = ?",
        (credentials.passwordHash, credentials.scramSha256, credentials.apopSecret, credentials.cramMD5, address),
    )
    if cursor.rowcount != 1:
        raise NoSuchUser(address)


def _upgradeCredentials(cursor, address, oldHash, credentials, hashOnly):
    # Only over the hash the password was checked against: a password
    # changed meanwhile (the mailgate command) is not put back.
    if hashOnly:
        # Nor an APOP secret or CRAM-MD5 states erased (user apop off) or
        # set (user apop on) meanwhile, which keep the same hash.
        cursor.execute(
            "UPDATE users SET password_hash = ?, scram_sha256 = ? WHERE address = ? AND password_hash = ?",
            (credentials.passwordHash, credentials.scramSha256, address, oldHash),
        )
        return cursor.rowcount == 1
    cursor.execute(
        "UPDATE users SET password_hash = ?, scram_sha256 = ?, apop_secret = ?, cram_md5 = ? "
        "WHERE address = ? AND password_hash = ?",
        (
            credentials.passwordHash, credentials.scramSha256, credentials.apopSecret, credentials.cramMD5,
            address, oldHash,
        ),
    )
    return cursor.rowcount == 1


def _deleteUser(cursor, address, userIds=None, aliveSince=None, lockedId=None):
    """
    Remove a user, their maildrop and what hangs on them; not while a
    live node shows them in a POP3 session (C{aliveSince}: see
    L{lockedOutOfSession}), which would go on answering for mail that
    is gone.

    @param lockedId: the id of the user whose maildrop lock is held: the
        address, another user's by now, is not deleted (see
        L{mailgate.store.guarded.lockedUserId}).
    """
    if userIds is not None:
        userIds.pop(address, None)
    userId = lockedOutOfSession(cursor, address, lockedId, aliveSince)
    # The mailbox row goes first: its removal waits for the deliveries to
    # the user that are committing (they hold it), and the maildrop listed
    # next includes what they stored; the deliveries that come after find
    # no mailbox and store nothing.
    cursor.execute("DELETE FROM mailboxes WHERE user_id = ?", (userId,))
    cursor.execute("SELECT uid FROM maildrop WHERE user_id = ?", (userId,))
    removeMessages(cursor, userId, [row[0] for row in cursor.fetchall()])
    lifecycle._forgetUser(cursor, userId)
    cursor.execute("DELETE FROM users WHERE user_id = ?", (userId,))


#: The users' listing, whole (L{_listUsers}) or a page at a time
#: (L{_userPage}), which wrote this query and its reading out each: what
#: they list is the same, only the order and the bounds differ.  Each
#: maildrop's use is kept up to date with its deliveries and removals: no
#: scan of the maildrops.  A password hash written {SCHEME}... is one
#: imported from another server (mailgate.auth.foreign), not yet replaced
#: by a login.
_USER_SUMMARIES = (
    "SELECT u.address, b.used_messages, b.used_octets, u.apop_secret IS NOT NULL, "
    "b.quota_octets, b.quota_messages, b.expire_days, substr(u.password_hash, 1, 1) = '{', "
    "u.cram_md5 IS NOT NULL, b.last_login, u.disabled_at, u.disabled_reason, u.allowed_nets "
    "FROM users u JOIN mailboxes b ON b.user_id = u.user_id "
)


def _userSummaries(cursor):
    """
    The L{UserSummary}s of the rows a L{_USER_SUMMARIES} query selected.
    """
    return [
        UserSummary(a, n, s, bool(apop), qo, qm, e, bool(imported), bool(cram), last, disabledAt, reason, nets)
        for a, n, s, apop, qo, qm, e, imported, cram, last, disabledAt, reason, nets in cursor.fetchall()
    ]


#: How each engine orders addresses by code point (byte order of their
#: UTF-8, which is code point order), as C{LC_ALL=C sort} and Python do:
#: SQLite's default BINARY collation compares the octets; a PostgreSQL
#: database's collation (en_US.UTF-8, ICU) puts a_b before a-c before a+b,
#: and jörg between jones and jung, its "C" collation does not.
_CODE_POINT_ORDER = {"sqlite": "", "postgres": ' COLLATE "C"'}


def _userSummary(cursor, address):
    """
    The L{UserSummary} of the user C{address}, or C{None}: one row of the
    listing, read as L{_listUsers} reads them all.
    """
    cursor.execute(f"{_USER_SUMMARIES}WHERE u.address = ?", (address,))
    rows = _userSummaries(cursor)
    return rows[0] if rows else None


def _listUsers(cursor, collate):
    """
    Every user's L{UserSummary}, in the paged listing's order
    (L{_userPage}): the admin commands that go through all users
    (C{mailbox export --all}, C{user recount --all}) take them in the
    order C{user list} shows, whatever the database's collation.

    @param collate: the engine's L{_CODE_POINT_ORDER}.
    """
    cursor.execute(f"{_USER_SUMMARIES}ORDER BY u.address{collate}")
    return _userSummaries(cursor)


def _userPage(cursor, collate, position, limit):
    """
    A page of the users' listing (L{mailgate.store.paging}): at most
    C{limit} L{UserSummary}s in code point order of their addresses, after
    the address C{position} (C{None} for the first page).  Users added or
    removed between two pages are listed or not as their address falls
    before or after the page read.

    @param collate: the engine's L{_CODE_POINT_ORDER}.
    """
    after = "" if position is None else f"WHERE u.address{collate} > ? "
    cursor.execute(
        f"{_USER_SUMMARIES}{after}ORDER BY u.address{collate} LIMIT {int(limit)}",
        () if position is None else (position,),
    )
    rows = _userSummaries(cursor)
    return (rows[-1].address if rows else position), rows


def _listedMaildrop(cursor, address):
    """
    What the first page of a maildrop's listing fixes for the later ones:
    C{(user id, next uid)}, the user's whatever has the address since, and
    what is delivered meanwhile (at or above the next uid) not listed.

    @raise NoSuchUser: there is no such user.
    """
    user = _findUser(cursor, address)
    if user is None:
        raise NoSuchUser(address)
    cursor.execute("SELECT next_uid FROM mailboxes WHERE user_id = ?", (user.userId,))
    row = cursor.fetchone()
    return user.userId, 0 if row is None else row[0]


def _maildropPage(cursor, columns, address, position, limit):
    """
    A page of a maildrop's listing (L{mailgate.store.paging}): at most
    C{limit} rows of C{columns} after the page before, below the
    maildrop's next uid when the first page was read (what is delivered
    meanwhile is not listed).

    @param position: C{None} for the first page, which looks the user up
        (C{NoSuchUser} if there is none), else what the page before
        returned: later pages are the same user's whatever has the
        address since (C{NoSuchUser} once she is gone).
    """
    later = position is not None
    userId, below, after = position if later else (*_listedMaildrop(cursor, address), 0)
    cursor.execute(
        f"SELECT uid, {columns} FROM maildrop "
        f"WHERE user_id = ? AND uid > ? AND uid < ? ORDER BY uid LIMIT {int(limit)}",
        (userId, after, below),
    )
    rows = cursor.fetchall()
    if later and len(rows) < limit:
        paging.stillListed(cursor, address, userId)
    return (userId, below, rows[-1][0] if rows else after), [row[1:] for row in rows]


def _messagePage(cursor, address, position, limit):
    """
    A page of C{(size, uidl, arrived)} of a maildrop's listing (L{_maildropPage}).
    """
    return _maildropPage(cursor, "size, uidl, arrived_at", address, position, limit)


def _listMessages(cursor, address):
    user = _findUser(cursor, address)
    if user is None:
        raise NoSuchUser(address)
    cursor.execute(
        "SELECT size, uidl, arrived_at FROM maildrop WHERE user_id = ? ORDER BY uid",
        (user.userId,),
    )
    return [
        MessageInfo(number, size, uidl, arrived)
        for number, (size, uidl, arrived) in enumerate(cursor.fetchall(), 1)
    ]


#: Messages an export lists in one read: what it holds of the listing.
#: Listed whole, a maildrop of 100,000 messages took 140 MB of the
#: command's memory before its first message was written (and ten times
#: that for a million).
EXPORT_PAGE = 1000


def _exportedPage(cursor, address, position, limit):
    """
    A page of a maildrop's listing for an export (L{_maildropPage}):
    C{(size, uidl, arrived, body owner, body id, header size, prefix)}
    each, the prefix the copy's own octets before its body (C{None}: none).
    """
    return _maildropPage(
        cursor,
        "size, uidl, arrived_at, body_owner, body_id, header_size, "
        "(SELECT p.prefix FROM maildrop_prefixes p WHERE p.user_id = maildrop.user_id AND p.uid = maildrop.uid)",
        address, position, limit,
    )


class _Separately(Exception):
    """
    Deliveries run together cannot all succeed: run them one by one, so
    that only the one that fails fails.

    @ivar missing: the recipients that no longer exist.
    """

    def __init__(self, missing=()):
        Exception.__init__(self, *missing)
        self.missing = missing


# Small bodies of a batch are inserted together once this much is waiting.
_CHUNK_OCTETS_PER_INSERT = 1 << 20


def _userIdsOf(cursor, addresses, userIds):
    """
    Address to user id for those of C{addresses} that are users, asking
    the database only for addresses not in the C{userIds} cache.

    Two addresses the cache gives one id are asked again: one of them is
    stale (the user was renamed, perhaps by another process, and her old
    address given to someone else), and a message to both would give the
    renamed user both copies (the new owner's too) and, for a message with
    a delivery key, fail on PostgreSQL for one user's key written twice.
    """
    known = {a: userIds[a] for a in addresses if a in userIds}
    if len(set(known.values())) < len(known):
        owners = Counter(known.values())
        for address in [a for a, userId in known.items() if owners[userId] > 1]:
            del known[address]
            userIds.pop(address, None)
    unknown = [a for a in addresses if a not in known]
    for batch in batches(unknown):
        cursor.execute(
            f"SELECT user_id, address FROM users WHERE address IN ({placeholders(len(batch))})",
            batch,
        )
        for userId, address in cursor.fetchall():
            known[address] = userIds[address] = userId
    return known


# The server's default limits as the delivery statement takes them:
# (octets, messages), -1 for none, and the percentages of a quota at which
# a user is warned (StoreLimits.deliveryQuota).
NO_QUOTA = (-1, -1, ())
# Rows of the counter update per statement (5 values each).
_USERS_PER_UPDATE = 100


def _takeUids(cursor, wanted, octets=None, now=0, addresses=None, quota=NO_QUOTA):
    """
    Advance the per-user message counters and storage use, within each
    user's quota: C{wanted} maps a user id to how many uids (messages) it
    needs, C{octets} to how many octets they add.  A row lock on these
    users only, never a global sequence per message; the quota is checked
    and the use added in the same statement, on the locked row, so that
    concurrent deliveries (on any node) never both squeeze under a limit.

    @param addresses: user id to the address it was found under; a user
        no longer known by that address (renamed) counts as gone.
    @param quota: the server's default limits, C{(octets, messages,
        warnings)}, -1 for none; a user's own limits (C{mailboxes.quota_*})
        come first.  With C{warnings} (percentages), the statement also
        returns each user's use and limits, to see which percentage the
        delivery crossed.
    @return: C{(taken, full, warn)}: user id to C{(first uid, uid
        validity)}, the set of user ids refused for their quota (nothing
        taken; an id in neither has no mailbox: the user is gone), and
        user id to the L{QuotaCrossing} of those to warn.
    """
    octets = octets or {}
    addresses = addresses or {}
    octetLimit, messageLimit, warnings = quota
    returning = "mailboxes.user_id, mailboxes.next_uid, mailboxes.uid_validity"
    if warnings:
        returning += (
            ", mailboxes.used_octets, coalesce(mailboxes.quota_octets, ?), "
            "mailboxes.used_messages, coalesce(mailboxes.quota_messages, ?)"
        )
    taken = {}
    warn = {}
    ids = sorted(wanted)
    for start in range(0, len(ids), _USERS_PER_UPDATE):
        batch = ids[start : start + _USERS_PER_UPDATE]
        params = []
        for userId in batch:
            params += [userId, wanted[userId], octets.get(userId, 0), now, addresses.get(userId, "")]
        params += [octetLimit, octetLimit, messageLimit, messageLimit]
        if warnings:
            params += [octetLimit, messageLimit]
        cursor.execute(
            "UPDATE mailboxes SET next_uid = mailboxes.next_uid + v.column2, "
            "used_messages = mailboxes.used_messages + v.column2, "
            "used_octets = mailboxes.used_octets + v.column3, "
            "oldest_arrival = coalesce(mailboxes.oldest_arrival, v.column4) "
            f"FROM (VALUES {','.join(['(?, ?, ?, ?, ?)'] * len(batch))}) AS v JOIN users u "
            "ON u.user_id = v.column1 AND (v.column5 = '' OR u.address = v.column5) "
            "WHERE mailboxes.user_id = v.column1 "
            "AND (coalesce(mailboxes.quota_octets, ?) < 0 "
            "OR mailboxes.used_octets + v.column3 <= coalesce(mailboxes.quota_octets, ?)) "
            "AND (coalesce(mailboxes.quota_messages, ?) < 0 "
            "OR mailboxes.used_messages + v.column2 <= coalesce(mailboxes.quota_messages, ?)) "
            f"RETURNING {returning}",
            params,
        )
        for row in cursor.fetchall():
            userId, following, validity = row[:3]
            taken[userId] = (following - wanted[userId], validity)
            if warnings:
                usedOctets, octetQuota, usedMessages, messageQuota = row[3:]
                crossing = quotaCrossed(
                    warnings,
                    (usedOctets - octets.get(userId, 0), usedOctets, octetQuota),
                    (usedMessages - wanted[userId], usedMessages, messageQuota),
                )
                if crossing is not None:
                    warn[userId] = crossing
    full = set()
    missing = [userId for userId in ids if userId not in taken]
    # The rare case: someone was refused.  Over quota, or gone?
    for batch in batches(missing):
        cursor.execute(
            "SELECT b.user_id, u.address FROM mailboxes b JOIN users u ON u.user_id = b.user_id "
            f"WHERE b.user_id IN ({placeholders(len(batch))})",
            batch,
        )
        for userId, address in cursor.fetchall():
            if addresses.get(userId, "") in ("", address):
                full.add(userId)
    return taken, full, warn


def _recipientsOf(cursor, addressLists, userIds, sizes=None, now=0, quota=NO_QUOTA, extras=None):
    """
    Resolve the recipients of one or more messages and take a uid for each
    delivery.

    @param addressLists: one list of distinct addresses per message.
    @param sizes: the size of each message, for the recipients' quotas.
    @param extras: per message, address to the octets its copy has
        beyond the shared body (see L{copyPrefixesOf}), or C{None}.
    @return: C{(known, taken, full, warn)}: address to user id for the
        recipients that exist, user id to C{(first uid, uid validity)}
        (each user gets one uid per message it is a recipient of, from the
        first on), the user ids whose quota refused their messages, and
        those to warn of their use (see L{_takeUids}).
    """
    sizes = sizes or [0] * len(addressLists)
    extras = extras or [{}] * len(addressLists)
    everyone = list(dict.fromkeys(a for addresses in addressLists for a in addresses))
    known = _userIdsOf(cursor, everyone, userIds)

    def needs(wanted):
        counts, octets = Counter(), Counter()
        for addresses, size, extra in zip(addressLists, sizes, extras):
            for a in addresses:
                if a in wanted and a in known:
                    counts[known[a]] += 1
                    octets[known[a]] += size + len(extra.get(a, b""))
        return counts, octets

    counts, octets = needs(set(everyone))
    byId = {known[a]: a for a in everyone if a in known}
    taken, full, warn = _takeUids(cursor, counts, octets, now, byId, quota)
    # A remembered id with no mailbox: the user was deleted (perhaps by
    # another process), and perhaps created again under a new id; or
    # renamed, and the address is now someone else's or no one's.
    stale = [a for a in everyone if a in known and known[a] not in taken and known[a] not in full]
    if stale:
        for address in stale:
            del known[address]
            userIds.pop(address, None)
        known.update(_userIdsOf(cursor, stale, userIds))
        counts, octets = needs(set(stale))
        counts = {u: n for u, n in counts.items() if u not in taken and u not in full}
        byId = {known[a]: a for a in stale if a in known}
        again, moreFull, moreWarn = _takeUids(cursor, counts, octets, now, byId, quota)
        taken.update(again)
        full |= moreFull
        warn.update(moreWarn)
    for address in everyone:
        if known.get(address) not in taken and known.get(address) not in full:
            known.pop(address, None)
            userIds.pop(address, None)
    return known, taken, full, warn


def _alreadyDelivered(cursor, engine, messages, userIds, window):
    """
    The recipients who already have one of C{messages}: those whose
    L{recent_deliveries} hold its C{deliveryKey} (see
    L{mailgate.interfaces.IMessageSource}) from less than C{window}
    seconds before it.  One statement for the lot, after the engine's
    locks of those pairs (L{mailgate.interfaces.IEngine.lockDeliveries}): a delivery of the
    same message to the same user committing on another node meanwhile
    is waited for and found, not stored a second time.

    @return: per message (by index), address to the L{AlreadyDelivered}
        unique id its earlier copy got.
    @raise _Separately: when two messages run together are the same
        message for the same user (the second must see the first's row:
        run one after the other, it does).
    """
    keyed = [(i, m) for i, m in enumerate(messages) if getattr(m[1], "deliveryKey", None)]
    if not keyed or not window:
        return {}
    known = _userIdsOf(cursor, list(dict.fromkeys(a for _, m in keyed for a in m[0])), userIds)
    wanted = {}
    for i, (addresses, source, now, _) in keyed:
        for address in dict.fromkeys(addresses):
            if address in known:
                pair = (known[address], source.deliveryKey)
                if pair in wanted and wanted[pair][0] != i:
                    raise _Separately()
                wanted.setdefault(pair, (i, address, now - window))
    engine.lockDeliveries(cursor, wanted)
    found = {}
    # Each user with the keys of her messages: one probe of the primary
    # key per delivery.  (Users IN (...) AND keys IN (...) made the engines
    # probe every user with every key: a group commit of n messages to n
    # users cost n^2 probes.)
    for condition, values in deliveryKeyConditions(wanted):
        cursor.execute(
            f"SELECT user_id, delivery_key, uidl, delivered_at FROM recent_deliveries WHERE {condition}", values
        )
        for userId, key, uidl, deliveredAt in cursor.fetchall():
            pair = (userId, bytes(key))
            if pair in wanted and deliveredAt >= wanted[pair][2]:
                i, address, _ = wanted[pair]
                found.setdefault(i, {})[address] = AlreadyDelivered(uidl)
    return found


def _rememberDeliveries(cursor, rows):
    """
    Keep C{(user id, delivery key, unique id, time)} of what was just
    delivered (L{_alreadyDelivered} finds them); a row left from an older
    delivery of the same octets, past the window, is replaced.
    """
    row = "(?, ?, ?, ?)"
    for start in range(0, len(rows), ROWS_PER_INSERT):
        part = rows[start : start + ROWS_PER_INSERT]
        cursor.execute(
            "INSERT INTO recent_deliveries (user_id, delivery_key, uidl, delivered_at) "
            f"VALUES {','.join([row] * len(part))} "
            "ON CONFLICT (user_id, delivery_key) DO UPDATE "
            "SET uidl = excluded.uidl, delivered_at = excluded.delivered_at",
            [value for r in part for value in r],
        )


def _deliverMessages(cursor, engine, messages, userIds, quota=NO_QUOTA, window=0):
    """
    Store several messages, each body once, and give each known recipient a
    maildrop entry; a handful of statements whatever the number of
    messages.

    @param engine: the L{mailgate.interfaces.IEngine}, whose locks make
        concurrent deliveries of one message to one user take turns.
    @param messages: C{(addresses, source, now, partial)} per message.
    @param quota: the server's default limits (see L{_takeUids}).
    @param window: seconds during which a message with the same
        C{deliveryKey} as one delivered to a user is that delivery again
        (a client's retry), answered with the first one's unique id and not
        stored; 0: every message is stored.
    @return: per message, address to unique id (an L{AlreadyDelivered} one
        for a retry), L{NoSuchUser} or L{QuotaExceeded}.
    @raise _Separately: when a message with C{partial} false has a
        recipient that no longer exists (that message alone must fail),
        or when several messages were run together and a quota refused
        some (run alone, each fits or not on its own).
    @raise QuotaExceeded: when the message (alone) has C{partial} false
        and a recipient is over quota: nothing is stored.
    """
    again = _alreadyDelivered(cursor, engine, messages, userIds, window)
    addressLists = [[a for a in dict.fromkeys(m[0]) if a not in again.get(i, ())] for i, m in enumerate(messages)]
    sizes = [m[1].size for m in messages]
    prefixes = [copyPrefixesOf(m[1]) for m in messages]
    known, taken, full, warn = _recipientsOf(
        cursor, addressLists, userIds, sizes, min(m[2] for m in messages), quota, prefixes
    )
    if full and len(messages) > 1:
        raise _Separately()
    nextUid = {userId: first for userId, (first, _) in taken.items()}
    outcomes = []
    bodies, chunks, entries, remembered, copies = [], [], [], [], []
    pending = 0
    for i, ((addresses, source, now, partial), unique) in enumerate(zip(messages, addressLists)):
        results = dict(again.get(i, {}))
        results.update((a, NoSuchUser(a)) for a in addresses if a not in known and a not in results)
        missing = [a for a in results if isinstance(results[a], NoSuchUser)]
        if missing and not partial:
            raise _Separately(sorted(missing))
        refused = [a for a in unique if a in known and known[a] in full]
        if refused and not partial:
            raise QuotaExceeded(*refused)
        results.update((a, QuotaExceeded(a)) for a in refused)
        recipients = [a for a in unique if a in known and known[a] not in full]
        outcomes.append(results)
        if not recipients:
            continue
        owner = known[recipients[0]]
        if source.size <= CHUNK_SIZE:
            bodyId = secrets.token_hex(16)
            bodies.append((owner, bodyId, source.size, source.headerSize, len(recipients), now))
            chunks.extend((owner, bodyId, seq, chunk) for seq, chunk in enumerate(bodyPieces(source)))
            pending += source.size
            if pending >= _CHUNK_OCTETS_PER_INSERT:
                insertRows(cursor, "bodies", BODY_COLUMNS, bodies)
                insertRows(cursor, "body_chunks", CHUNK_COLUMNS, chunks)
                bodies, chunks, pending = [], [], 0
        else:
            bodyId = storeLargeBody(cursor, owner, source, len(recipients), now)
        dotColumns = dotLineColumns(source)
        key = getattr(source, "deliveryKey", None) if window else None
        for address in recipients:
            userId = known[address]
            uid = nextUid[userId]
            nextUid[userId] = uid + 1
            uidl = formatUniqueId(uid, taken[userId][1])
            # The copy's own fields before the shared body: counted in its
            # size and header (what LIST shows and the quota holds).
            prefix = prefixes[i].get(address, b"")
            entries.append(
                (userId, uid, uidl, owner, bodyId, source.size + len(prefix), source.headerSize + len(prefix), now,
                 *dotColumns)
            )
            if prefix:
                copies.append((userId, uid, prefix))
            if key:
                remembered.append((userId, key, uidl, now))
            results[address] = uidl
    insertRows(cursor, "bodies", BODY_COLUMNS, bodies)
    insertRows(cursor, "body_chunks", CHUNK_COLUMNS, chunks)
    insertRows(cursor, "maildrop", DELIVERED_COLUMNS, entries)
    insertRows(cursor, "maildrop_prefixes", PREFIX_COLUMNS, copies)
    _rememberDeliveries(cursor, remembered)
    if warn:
        addressOf = {userId: address for address, userId in known.items()}
        now = max(m[2] for m in messages)
        for userId, crossing in sorted(warn.items()):
            storeQuotaWarning(cursor, userId, addressOf[userId], crossing, now)
        _markWarned(outcomes, known, warn)
    return outcomes


def _markWarned(outcomes, known, warn):
    """
    Say, in the results of the deliveries, which copy brought a user's use
    to a warning percentage (L{WarnedOfQuota}), for the log: the user's
    last copy among C{outcomes} (deliveries committed together warn once).
    """
    pending = dict(warn)
    for results in reversed(outcomes):
        for address, result in results.items():
            userId = known.get(address)
            if userId in pending and type(result) is str:
                results[address] = WarnedOfQuota(result, pending.pop(userId))


def _deliverOne(cursor, engine, addresses, source, now, partial=True, userIds=None, quota=NO_QUOTA, window=0):
    """
    Store the body once and give each known recipient a maildrop entry.

    Few statements, and only two whose answers are waited for (the user
    lookup, skipped for addresses in C{userIds}, and the counters): on
    PostgreSQL the rest travel in one pipeline.

    @param engine: see L{_deliverMessages}.
    @param userIds: a cache of address to user id, kept by the writer
        thread; an id that no longer has a mailbox (the user was deleted,
        perhaps by another process) is found out by the counter update.
    @param quota: the server's default limits (see L{_takeUids}).
    @param window: see L{_deliverMessages}.
    """
    userIds = {} if userIds is None else userIds
    try:
        [results] = _deliverMessages(cursor, engine, [(addresses, source, now, partial)], userIds, quota, window)
    except _Separately as e:
        refusal = NoSuchUser(", ".join(e.missing))
        refusal.addresses = tuple(e.missing)
        raise refusal from None
    return results


def _deliverTogether(cursor, calls):
    """
    Run several L{_deliverOne} calls as one: the group-commit writer hands
    over every delivery waiting for the same commit.  The counters, bodies
    and maildrop entries of all of them take one statement each, so the
    writer pays per batch, not per message, for each trip into the
    database engine.
    """
    messages = []
    engine = userIds = quota = window = None
    for args, kwargs in calls:
        dialect, addresses, source, now, partial, ids, limits, seconds = _deliverArguments(*args, **kwargs)
        messages.append((addresses, source, now, partial))
        if userIds is None:
            engine, userIds = dialect, {} if ids is None else ids
            quota, window = limits, seconds
        elif dialect is not engine or ids is not userIds or limits != quota or seconds != window:
            raise _Separately()
    return _deliverMessages(cursor, engine, messages, userIds, quota, window)


def _deliverArguments(engine, addresses, source, now, partial=True, userIds=None, quota=NO_QUOTA, window=0):
    return engine, addresses, source, now, partial, userIds, quota, window


def _recipientMailboxes(cursor, *args, **kwargs):
    """
    The user ids of a delivery's recipients (L{updatesMailboxes}): from
    the writer's cache, the others looked up as the delivery would look
    them up (it then finds them in the cache).
    """
    _, addresses, _, _, _, userIds, _, _ = _deliverArguments(*args, **kwargs)
    return _userIdsOf(cursor, list(dict.fromkeys(addresses)), {} if userIds is None else userIds).values()


# Safe to run in a PostgreSQL pipeline: it waits for the answers it needs.
_deliver = BatchableWrite(
    _deliverOne, _deliverTogether, pipelined=True, name="deliver", mailboxes=_recipientMailboxes
)


@updatesMailboxes(lambda cursor, userId, *args, **kwargs: (userId,))
def _recordLogin(cursor, userId, now, minimumInterval):
    """
    Record a login at C{now} unless the previous one is less than
    C{minimumInterval} seconds old (the row is locked first, see
    L{updatesMailboxes}).

    @return: C{(recorded, previous)}: the last login it replaced, for
        L{_forgetLogin} should the login not complete.
    """
    cursor.execute("SELECT last_login FROM mailboxes WHERE user_id = ?", (userId,))
    row = cursor.fetchone()
    cursor.execute(
        "UPDATE mailboxes SET last_login = ? WHERE user_id = ? "
        "AND (last_login IS NULL OR last_login <= ?)",
        (now, userId, now - minimumInterval),
    )
    return cursor.rowcount == 1, None if row is None else row[0]


@updatesMailboxes(lambda cursor, userId, *args, **kwargs: (userId,))
def _forgetLogin(cursor, userId, recordedAt, previous):
    """
    Take back a login L{_recordLogin} recorded at C{recordedAt} that did
    not complete: the last login is C{previous} again, unless something
    newer was written meanwhile.
    """
    cursor.execute(
        "UPDATE mailboxes SET last_login = ? WHERE user_id = ? AND last_login = ?",
        (previous, userId, recordedAt),
    )


def _uniqueIds(cursor, userId, low, high):
    cursor.execute(
        "SELECT uid, uidl FROM maildrop WHERE user_id = ? AND uid BETWEEN ? AND ?",
        (userId, low, high),
    )
    return dict(cursor.fetchall())


# -- the store -------------------------------------------------------------


@implementer(IMailStore, ILifecycleStore)
class SQLMailStore(lifecycle.LifecycleStore):
    """
    L{IMailStore} on a L{Database}.

    @param database: a L{Database} or L{SynchronousDatabase}.
    @param locks: the L{IMaildropLocks} guarding POP3 sessions.
    @param clock: returns the time in seconds (for arrival stamps).
    @ivar metrics: a L{mailgate.metrics.Metrics} told how many maildrop
        locks this store's sessions hold, or C{None}.
    """

    metrics = None
    _log = Logger()

    def __init__(self, database, locks, clock=time.time, reads=None):
        """
        @param reads: the L{mailgate.interfaces.IMessageReads} POP3
            sessions read messages through; by default read transactions
            of C{database}.
        """
        self.database = database
        self.locks = locks
        self.reads = ThreadedMessageReads(database) if reads is None else reads
        self._clock = clock
        # Maildrops opened and not yet released (for the metrics).
        self._opened = 0
        # Address to user id, used and kept by the writer thread alone.
        self._userIds = {}
        # User id to (identity, when, the last login before) of a login
        # recorded for LOGIN-DELAY whose session has not begun yet (see
        # recordLogin).
        self._loginsNotBegun = {}
        self.limits = StoreLimits()

    @property
    def engine(self):
        return self.database.engine

    def _now(self):
        return int(self._clock())

    def findUser(self, address):
        return self.database.runInteraction(_findUser, address)

    def findUsers(self, addresses):
        return self.database.runInteraction(_findUsers, list(addresses))

    def findAlias(self, address):
        return self.database.runInteraction(aliases._aliasTarget, address)

    def findAliases(self, addresses):
        return self.database.runInteraction(aliases._aliasTargets, list(addresses))

    def findMasterUser(self, name):
        return self.database.runInteraction(masterusers._findMasterUser, name)

    def hasDomain(self, domain):
        return self.database.runInteraction(_hasDomain, domain)

    def hasAPOPUsers(self):
        return self.database.runInteraction(_hasAPOPUsers)

    def digestLoginUsers(self):
        return self.database.runInteraction(_digestLoginUsers)

    def sharedSecret(self, name):
        return self.database.runWrite(_sharedSecret, name, secrets.token_bytes(32))

    def scramParameters(self):
        return self.database.runInteraction(_scramParameters, self.engine.name)

    def addUser(self, address, credentials):
        return self.database.runWrite(_addUser, self.engine, address, credentials, self._now())

    def addUsers(self, users):
        return self.database.runWrite(_addUsers, list(users), self._now())

    def setCredentials(self, address, credentials):
        return self.database.runWrite(_setCredentials, address, credentials)

    def upgradeCredentials(self, address, oldHash, credentials, hashOnly=False):
        return self.database.runWrite(_upgradeCredentials, address, oldHash, credentials, hashOnly)

    def deleteUser(self, address, perTransaction=None, progress=None):
        """
        See L{IMailStore.deleteUser}.  The maildrop and kept deleted mail
        are removed first, C{perTransaction} messages at a time, as an
        expunge removes them (L{lifecycle.LifecycleStore._expungeLocked}:
        one transaction for 100,000 messages held SQLite's write lock 3.6
        s, every delivery waiting), then the user and what is left, in one
        transaction; the maildrop's lock is held throughout.

        @param progress: called after each committed removal with the
            running totals C{(messages, kept deleted messages)}.
        """
        now = self._now()

        @defer.inlineCallbacks
        def locked(userId):
            yield self._expungeLocked(address, userId, None, now, perTransaction, progress)
            yield self.database.runWrite(
                Guarded.under(self.locks, userId, _deleteUser),
                address, self._userIds, self._registryAliveSince(now), userId,
            )

        return self._holdingLock(address, locked)

    def userSummary(self, address):
        return self.database.runInteraction(_userSummary, address)

    def listUsers(self, page=None):
        if page is None:
            return self.database.runInteraction(_listUsers, _CODE_POINT_ORDER[self.engine.name])
        return paging.pagedListing(self.database, _userPage, (_CODE_POINT_ORDER[self.engine.name],), page)

    def listMessages(self, address, page=None):
        if page is None:
            return self.database.runInteraction(_listMessages, address)
        return paging.pagedListing(self.database, _messagePage, (address,), page, paging.numbered(MessageInfo))

    def exportMessages(self, address, page=None):
        page = EXPORT_PAGE if page is None else page
        return paging.pagedListing(self.database, _exportedPage, (address,), page, self._exported)

    def _exported(self, rows, before):
        """
        An export's messages of a page of its listing, numbered after the
        C{before} of the pages before (a message removed before its page
        was read is not listed, and its followers are numbered without
        it), their first chunks read ahead together.
        """
        ahead = _ExportReadAhead(self.database, [(owner, bodyId, size) for size, _, _, owner, bodyId, _, _ in rows])
        for index, (size, uidl, arrived, owner, bodyId, headerSize, prefix) in enumerate(rows):
            body = _ExportedBody(
                ahead, index, self.reads, owner, bodyId, size, headerSize, b"", True, None,
                b"" if prefix is None else bytes(prefix),
            )
            yield ExportedMessage(before + index + 1, size, uidl, arrived, body)

    def deliver(self, addresses, source, partial=True):
        d = self.database.runWrite(
            _deliver, self.engine, list(addresses), source, self._now(), partial, self._userIds,
            self.limits.deliveryQuota(), self.limits.duplicateWindow,
        )
        return d.addCallback(self._logQuotaWarnings)

    def _logQuotaWarnings(self, results):
        """
        Log each quota warning a delivery put into a maildrop
        (C{quota.warned}): the warning tells the user alone, and whether
        a user was warned before her mail was refused is looked up in the
        log.
        """
        for address, result in results.items():
            crossing = getattr(result, "crossing", None)
            if crossing is not None:
                self._log.info(
                    "quota warned user={user} percent={percent} resource={resource} used={used} limit={limit}",
                    user=address, percent=crossing.percent, resource=crossing.resource, used=crossing.used,
                    limit=crossing.limit, event="quota.warned",
                )
        return results

    def recordLogin(self, identity, minimumInterval):
        """
        See L{IMailStore.recordLogin}.  The login is recorded before the
        client is told (check and record in one step, under the maildrop's
        lock), but counts only once its session begins
        (L{SQLMaildrop.sessionStarted}): a maildrop released before that
        (a login refused or cancelled after its credentials were checked:
        SCRAM's client turning down the server's proof, an address banned
        meanwhile, a client gone) takes it back, so that it does not hold
        the user's next login back for LOGIN-DELAY.
        """
        userId, now = identity.userId, self._now()

        def recorded(result):
            allowed, previous = result
            if allowed:
                self._loginsNotBegun[userId] = (identity, now, previous)
            return allowed

        return self.database.runWrite(_recordLogin, userId, now, minimumInterval).addCallback(recorded)

    def openMaildrop(self, identity, peer=None):
        userId = identity.userId
        # The password hash the login was verified against: the snapshot
        # confirms it is still the user's (see PasswordChecker).
        passwordHash = identity.passwordHash
        d = self.locks.acquireAndSnapshot(userId, passwordHash, identity.address, peer)
        return d.addCallback(self._maildropOpened, identity)

    def _maildropOpened(self, result, identity):
        self._lockCountChanged(1)
        return SQLMaildrop(self, identity, *result)

    def _lockCountChanged(self, change):
        self._opened += change
        if self.metrics is not None:
            self.metrics.maildropLocks(self._opened)

    def close(self):
        d = defer.maybeDeferred(self.locks.close)
        d.addBoth(lambda _: self.reads.close())
        d.addBoth(lambda _: self.database.close())
        d.addBoth(lambda _: self.engine.releaseServer())
        return d


@implementer(IMaildrop)
class SQLMaildrop:
    """
    One session's snapshot of a maildrop: the ids and sizes of the messages
    present at login, in two compact arrays (a 100,000-message maildrop costs
    about 1.6 MB), and a small maildrop's unique ids.  Bodies, and a large
    maildrop's unique ids, are read on demand.
    """

    #: messages read ahead per trip to the database, and the octets of
    #: their first chunks (whole messages, or long messages' headers)
    readAhead = 32
    readAheadOctets = 256 * 1024
    log = Logger()

    #: for TOP n 0, messages whose headers are read per trip, and the
    #: octets of those headers (a client listing headers asks for them all)
    headerReadAhead = 100
    headerReadAheadOctets = 256 * 1024
    #: a client that skips at most this many messages is still on its run
    #: (it passes over deleted ones, or takes only the header of a large
    #: one); one that jumps further is picking
    runGap = 4

    def __init__(self, store, identity, uids, sizes, uniqueIds=None):
        self._store = store
        self._userId = identity.userId
        self.address = identity.address
        self._uids = uids
        self.sizes = sizes
        # A small maildrop's unique ids came with the snapshot (its rows are
        # the session's while the lock is held); a large one's are read
        # when asked for.
        self._uniqueIds = uniqueIds
        self._released = False
        # For whole messages (False) and headers (True) apart: the messages
        # read ahead, by index, and the index last opened (the run a client
        # is on).
        self._ahead = {False: {}, True: {}}
        self._lastOpened = {False: None, True: None}
        self.peer = None
        self.master = None
        self._session = None
        self._identity = identity
        # Whether the POP3 session began (sessionStarted): the login
        # completed.
        self._begun = False

    def sessionStarted(self, peer, end=None, lockLost=None, master=None):
        """
        The POP3 session working on this maildrop has begun: C{peer} is
        the client's address (C{"host:port"}), recorded with what the
        session deletes and shown by C{mailgate who}, and so is C{master},
        the name of the master user who logged in, if one did; C{end()},
        if given, ends the session without applying its deletions
        (C{mailgate kick}); C{lockLost()}, if given, ends it so when the
        maildrop's lock is lost (L{IMaildropLocks.whenLost}).
        """
        self.peer = peer
        self.master = master
        # The login is complete: what recordLogin recorded stays.
        self._begun = True
        self._store._loginsNotBegun.pop(self._userId, None)
        self._session = self._store.sessions.started(self, peer, end, master)
        if lockLost is not None and not self._released:
            self._store.locks.whenLost(self._userId, lockLost)

    @property
    def userId(self):
        return self._userId

    @property
    def expireDays(self):
        """
        The owner's retention in days (RFC 2449 EXPIRE after login), or
        C{None} for never.
        """
        return self._store.retention.daysFor(self._userId)

    def uniqueIds(self, first, count):
        if self._uniqueIds is not None:
            return defer.succeed(self._uniqueIds[first : first + count])
        uids = self._uids[first : first + count]
        if not uids:
            return defer.succeed([])
        d = self._store.database.runInteraction(
            _uniqueIds, self._userId, uids[0], uids[-1]
        )

        def inOrder(found):
            try:
                return [found[uid] for uid in uids]
            except KeyError:
                missing = [uid for uid in uids if uid not in found]
                raise TemporaryFailure(f"messages {missing[:5]} vanished from the maildrop") from None

        return d.addCallback(inOrder)

    def openMessage(self, index, headerOnly=False):
        reads = self._store.reads
        step = self._step(index, headerOnly)
        self._lastOpened[headerOnly] = index
        ahead = self._ahead[headerOnly].pop(index, None)
        if ahead is None and headerOnly:
            ahead = _headerOf(self._ahead[False].get(index))
        if ahead is not None:
            return defer.succeed(SQLMessageBody(reads, *ahead))
        if step:
            uids = self._readingAhead(index, headerOnly, step)
        else:
            # Not a run: this message alone, and what was read ahead stays
            # for the client's return to its run.
            uids = [self._uids[index]]
        budget = self.headerReadAheadOctets if headerOnly else self.readAheadOctets
        d = reads.openMessages(self._userId, uids, headerOnly, budget)

        def opened(rows):
            if not rows:
                raise TemporaryFailure("message vanished from the maildrop")
            if step:
                following = enumerate(rows[1:], 1)
                self._ahead[headerOnly] = {index + offset * step: row for offset, (_, row) in following}
            return SQLMessageBody(reads, *rows[0][1])

        return d.addCallback(opened)

    def _step(self, index, headerOnly):
        """
        Which way to read ahead from message C{index}: C{1} for a client
        going forward (this is the first message, or it opened one a
        little before), C{-1} for one going from the newest back (this is
        the last, or it opened one a little after), C{0} (this message
        alone) for one picking messages here and there: what it skips
        would be read for nothing, again at each pick.  "A little" is at
        most L{runGap} messages skipped.  Kept apart for whole messages and
        for headers (TOP n 0), as what was read ahead is: a client listing
        headers and then fetching a few messages keeps its headers' run,
        and one taking the header alone of each large message and the
        others whole keeps both runs.
        """
        last = self._lastOpened[headerOnly]
        if last is None:
            if index == 0:
                return 1
            return -1 if index == len(self._uids) - 1 else 0
        distance = index - last
        if 0 < distance <= self.runGap + 1:
            return 1
        if 0 < -distance <= self.runGap + 1:
            return -1
        return 0

    def _readingAhead(self, index, headerOnly, step):
        """
        The uids to ask for in one trip from message C{index} on, going
        C{step} (1 or -1): the next L{readAhead} (L{headerReadAhead} for
        TOP n 0), of which the database returns those within
        L{readAheadOctets} (L{headerReadAheadOctets}) of what is read: the
        whole messages, a long message's first chunk (its header), or the
        headers.

        So the run does not stop at a long message: its header is read
        ahead too, and a client that takes only that (TOP n 0, beyond its
        download limit) finds it read, while one that downloads it finds
        its start read and goes on with its chunks.
        """
        count = self.headerReadAhead if headerOnly else self.readAhead
        return [self._uids[i] for i in range(index, self._runEnd(index, step, count), step)]

    def _runEnd(self, index, step, count):
        """
        Where a run of at most C{count} messages from C{index}, going
        C{step}, stops (a C{range} end): at the maildrop's end or start.
        """
        if step > 0:
            return min(index + count, len(self._uids))
        return max(index - count, -1)

    def expunge(self, indexes, peer=None):
        """
        Remove the messages at C{indexes}, in one transaction.  Where the
        server keeps deleted mail (L{StoreLimits.keepDeletedDays},
        or another live node's), they leave the maildrop (and the quota) all
        the same but are kept for recovery, with the time and C{peer}, the client's address
        (by default the one given to L{sessionStarted}), and the master
        user given to L{sessionStarted}, if one logged in.
        """
        uids = [self._uids[i] for i in indexes]
        if not uids:
            return defer.succeed(0)
        peer = self.peer if peer is None else peer
        guard = self._store.locks.writeGuard(self._userId)
        if guard is None:
            return defer.fail(MaildropLockLost(LOCK_LOST))
        if self._store.limits.keepDeletedDays > 0 or self._store.sessions.othersKeepDeleted():
            return self._store.database.runWrite(
                Guarded(guard, _keepDeleted), self._userId, uids, self._store._now(), peer, self.master
            )
        return self._store.database.runWrite(Guarded(guard, removeMessages), self._userId, uids)

    def release(self):
        if self._released:
            return defer.succeed(None)
        self._released = True
        self._store._lockCountChanged(-1)
        session, self._session = self._session, None
        if session is not None:
            self._store.sessions.ended(session)
        notBegun = None if self._begun else self._store._loginsNotBegun.get(self._userId)
        if notBegun is None or notBegun[0] is not self._identity:
            return defer.maybeDeferred(self._store.locks.release, self._userId)
        del self._store._loginsNotBegun[self._userId]
        # Released before its session began: the login did not complete,
        # and its record is taken back while the lock still keeps other
        # logins of the user out (and before a refusal waiting for this
        # release goes out).  Should that fail, the lock goes all the same.
        d = self._store.database.runWrite(_forgetLogin, self._userId, *notBegun[1:])
        d.addErrback(
            lambda failure: self.log.failure(
                "taking back a login that did not complete", failure, event="lock.undo_failed"
            )
        )
        return d.addCallback(lambda _: self._store.locks.release(self._userId))


def _headerOf(row):
    """
    What opening a message for TOP n 0 gives, made from the row of the
    message read ahead for RETR (the whole message, or the first piece of
    a long one): a client that takes only the header of the messages
    beyond its download limit, and the others whole, gets the header of
    one read ahead with the others without another trip.

    @param row: a message's C{(owner, bodyId, size, headerSize, first,
        needsStuffing, dotOffsets, prefix)} (see L{reads.openedMessages}),
        or C{None}.
    @return: the row L{reads.openedMessages} gives for its header alone
        (cut the same way), or C{None} if C{row} is C{None} or its first
        piece does not hold the whole header.
    """
    if row is None:
        return None
    owner, bodyId, size, headerSize, first, needsStuffing, dotOffsets, prefix = row
    if headerSize > CHUNK_SIZE or len(first) < min(headerSize, size):
        return None
    if not headerSize:
        first = b""
    elif headerSize < size:
        first = first[:headerSize]
        size = headerSize
    return owner, bodyId, size, headerSize, first, needsStuffing, dotOffsets, prefix


@implementer(IMessageBody)
class SQLMessageBody:
    """
    A message read a few chunks at a time (L{chunksPerRead} × 128 KiB per
    trip to the database), so a 50 MB message streams through in bounded
    memory.

    A copy with octets of its own before the body it shares with the
    other recipients' copies (its C{prefix}: see
    L{mailgate.store.rows.PREFIX_COLUMNS}) is one message all the same:
    C{size}, C{headerSize}, C{dotOffsets} and C{first} are the copy's
    (L{mailgate.store.reads.openedMessages} put the prefix before the first
    chunk), and a body read from its start puts it before chunk 0.
    """

    chunksPerRead = 4

    def __init__(
        self, reads, owner, bodyId, size, headerSize, first, needsStuffing=True, dotOffsets=None, prefix=b""
    ):
        """
        @param reads: the store's L{mailgate.interfaces.IMessageReads}.
        @param prefix: the copy's own octets before the body, already in
            C{first} if C{first} was read.
        """
        self._prefix = prefix
        self._reads = reads
        self._owner = owner
        self._bodyId = bodyId
        self.size = size
        self.headerSize = headerSize
        # Unknown (NULL) counts as needing it.
        self.needsStuffing = needsStuffing
        self.dotOffsets = dotOffsets
        # Chunks read and not yet handed out, the next one last.
        self._pending = [first]
        self._sent = 0
        self._seq = 1
        # The whole message, when its first piece is all of it.
        self.whole = first if len(first) >= size else None

    @classmethod
    def unread(cls, reads, owner, bodyId, size, headerSize):
        """
        A body none of which is read yet: its first L{read} reads from its
        first chunk on.
        """
        body = cls(reads, owner, bodyId, size, headerSize, b"")
        body._pending = []
        body._seq = 0
        body.whole = None if size else b""
        return body

    def read(self):
        if self._pending:
            chunk = self._pending.pop()
            self._sent += len(chunk)
            return defer.succeed(chunk)
        if self._sent >= self.size:
            return defer.succeed(b"")
        seq = self._seq
        d = self._reads.readChunks(self._owner, self._bodyId, seq, self.chunksPerRead)

        def got(chunks):
            # A chunk missing in the middle ends what this trip returns;
            # the next read asks for it again, and fails if it is gone.
            self._seq = seq + len(chunks)
            if not seq and self._prefix:
                chunks[0] = self._prefix + chunks[0]
            chunks.reverse()
            self._pending = chunks
            chunk = chunks.pop()
            self._sent += len(chunk)
            return chunk

        return d.addCallback(got)


class _ExportReadAhead:
    """
    The first chunks of an export's messages, read for many messages in
    one read transaction (at most L{messages} of them, and L{octets} of
    chunks) when the first of them is read: a small message is all in its
    first chunk, and a trip to the database for each (a transaction and a
    statement, and on PostgreSQL their round trips) was most of what an
    export of small messages spent outside writing files.  Only the chunks
    of the messages being written are held.

    @ivar _bodies: C{(owner, body id, size)} of each message, in order.
    """

    messages = 100
    octets = 1 << 20

    def __init__(self, database, bodies):
        self._database = database
        self._bodies = bodies
        self._read = {}

    def first(self, index):
        """
        The first chunk of message C{index} (from 0): a L{Deferred} of its
        octets, or of C{None} if it had none (gone since it was listed).
        """
        if index in self._read:
            return defer.succeed(self._read.pop(index))
        group, octets = [], 0
        for following in range(index, min(index + self.messages, len(self._bodies))):
            cost = min(self._bodies[following][2], CHUNK_SIZE)
            if group and octets + cost > self.octets:
                break
            group.append(following)
            octets += cost
        d = self._database.runInteraction(firstChunks, [self._bodies[n][:2] for n in group])

        def got(found):
            # What another message's body did not take is dropped: held
            # chunks stay within one group.
            self._read = {n: found.get(self._bodies[n][:2]) for n in group[1:]}
            return found.get(self._bodies[index][:2])

        return d.addCallback(got)


class _ExportedBody(SQLMessageBody):
    """
    A message of an export: its first chunk comes from the export's
    L{_ExportReadAhead}, the rest as any body's.
    """

    def __init__(self, ahead, index, *args):
        SQLMessageBody.__init__(self, *args)
        self._pending = []
        self._seq = 0
        self.whole = None if self.size else b""
        self._ahead = ahead
        self._index = index

    def read(self):
        ahead, self._ahead = self._ahead, None
        if ahead is None or not self.size:
            return SQLMessageBody.read(self)

        def got(first):
            if first is not None:
                self._pending = [self._prefix + first if self._prefix else first]
                self._seq = 1
            # Else chunk 0 is asked for again, and its absence reported.
            return SQLMessageBody.read(self)

        return ahead.first(self._index).addCallback(got)
