# -*- test-case-name: tests.test_copy -*-
"""
Copying a whole mailgate database to another, across backends.

Users keep their ids, passwords and APOP secrets; messages keep their
numbers, unique ids and arrival times; bodies stay shared as they were;
the bans in force stay in force, and the secrets the nodes share stay
the same.  So
POP3 clients that leave mail on the server recognise every message after a
move from SQLite to PostgreSQL (or back) and download nothing again.

The copy runs in one transaction on the target: it is all there or not at
all.  It reads the source as one snapshot, whatever writes it meanwhile.  Bodies are streamed a few chunks at a time, so memory stays bounded
whatever the size of the messages.
"""

import time

import attr

from mailgate.errors import MailgateError
from mailgate.records import REASON_FORGOTTEN

CHUNKS_PER_READ = 8
ROWS_PER_READ = 500


class CopyError(MailgateError):
    """
    The copy cannot be made (the target is not empty).
    """


@attr.s
class CopyReport:
    users = attr.ib(default=0)
    messages = attr.ib(default=0)
    #: deleted messages kept for recovery (their bodies are in bodies and
    #: octets too)
    kept = attr.ib(default=0)
    bodies = attr.ib(default=0)
    octets = attr.ib(default=0)
    bans = attr.ib(default=0)
    masterUsers = attr.ib(default=0)


def _pages(cursor, keyColumns, columns, table):
    """
    Read a table in primary-key order, a page at a time (keyset paging, so
    no driver ever holds the whole table).
    """
    select = ", ".join(columns)
    order = ", ".join(keyColumns)
    last = None
    while True:
        if last is None:
            cursor.execute(f"SELECT {select} FROM {table} ORDER BY {order} LIMIT {ROWS_PER_READ}")
        else:
            condition = f"({order}) > ({', '.join('?' * len(keyColumns))})"
            cursor.execute(
                f"SELECT {select} FROM {table} WHERE {condition} ORDER BY {order} LIMIT {ROWS_PER_READ}",
                last,
            )
        rows = cursor.fetchall()
        if not rows:
            return
        yield rows
        last = tuple(rows[-1][columns.index(k)] for k in keyColumns)


def _insert(cursor, table, columns, rows):
    placeholders = ", ".join("?" * len(columns))
    cursor.executemany(
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({placeholders})",
        [tuple(row) for row in rows],
    )


_TABLES = [
    (
        "users",
        ("user_id",),
        (
            "user_id", "address", "domain", "password_hash", "scram_sha256", "apop_secret", "cram_md5",
            "created_at", "disabled_at", "disabled_reason", "allowed_nets",
        ),
    ),
    (
        "mailboxes",
        ("user_id",),
        (
            "user_id", "uid_validity", "next_uid", "last_login", "used_octets", "used_messages",
            "quota_octets", "quota_messages", "expire_days", "oldest_arrival",
        ),
    ),
    ("bodies", ("owner_id", "body_id"), ("owner_id", "body_id", "size", "header_size", "refcount", "created_at")),
    (
        "maildrop",
        ("user_id", "uid"),
        (
            "user_id", "uid", "uidl", "body_owner", "body_id", "size", "header_size", "arrived_at",
            "dot_lines", "dot_at",
        ),
    ),
    # Each copy's own fields (Delivered-To:), counted in its maildrop row.
    ("maildrop_prefixes", ("user_id", "uid"), ("user_id", "uid", "prefix")),
    (
        "deleted_mail",
        ("user_id", "uid"),
        (
            "user_id", "uid", "uidl", "body_owner", "body_id", "size", "header_size", "arrived_at",
            "deleted_at", "deleted_by", "deleted_by_master", "prefix",
        ),
    ),
    ("imported_ids", ("user_id", "uidl"), ("user_id", "uidl", "size", "digest", "imported_at", "source")),
    # So that an MTA's retry after the move is still known for one.
    (
        "recent_deliveries",
        ("user_id", "delivery_key"),
        ("user_id", "delivery_key", "uidl", "delivered_at"),
    ),
    ("aliases", ("address",), ("address", "domain", "user_id", "created_at")),
    # So that a helpdesk's or a backup's master login works after the move.
    ("master_users", ("name",), ("name", "password_hash", "created_at", "allowed_nets")),
]


#: The columns, besides users.user_id, that hold a user's id: a row left
#: by a user removed by hand (his messages, his maildrop's counters) keeps
#: it.  The target's ids continue past them all, or a new user there would
#: be given a number still in use: refused (its maildrop's counters there
#: already, "duplicate key", exit 70), or given the mail left behind.
_USER_ID_COLUMNS = {
    "mailboxes": ("user_id",),
    "bodies": ("owner_id",),
    "maildrop": ("user_id", "body_owner"),
    "maildrop_prefixes": ("user_id",),
    "deleted_mail": ("user_id", "body_owner"),
    "imported_ids": ("user_id",),
    "recent_deliveries": ("user_id",),
    "aliases": ("user_id",),
}


def _largestUserId(table, columns, rows):
    """
    The largest user id C{rows} of C{table} hold (L{_USER_ID_COLUMNS}), or 0.
    """
    places = [columns.index(name) for name in _USER_ID_COLUMNS.get(table, ())]
    return max((row[place] for row in rows for place in places), default=0)


def _sourceCounter(sourceCursor, engineName):
    """
    The largest user id the source's counter has given, users deleted
    since included (0 where it cannot be read: a role that may not read
    the sequence): the target gives none of them again.
    """
    if engineName == "postgres":
        # NULL, not an error, for a role that may not read the sequence.
        sourceCursor.execute(
            "SELECT last_value FROM pg_sequences "
            "WHERE format('%I.%I', schemaname, sequencename) = pg_get_serial_sequence('users', 'user_id')"
        )
    else:
        sourceCursor.execute("SELECT seq FROM sqlite_sequence WHERE name = 'users'")
    row = sourceCursor.fetchone()
    return (row[0] if row is not None else None) or 0


def copyDatabase(source, target):
    """
    Copy everything from one synchronous store to another, empty one.

    @param source: a store from L{mailgate.store.openSynchronousStore}.
    @param target: likewise; it must have no users.
    @return: a L{CopyReport}.
    @raise CopyError: if the target already has users.
    """
    targetEngine = target.database.engine
    report = CopyReport()
    now = int(time.time())

    def write(targetCursor):
        # Counted afresh: a transaction that lost a deadlock runs again
        # (SynchronousDatabase), and what the first run counted was undone.
        for counter in attr.fields(CopyReport):
            setattr(report, counter.name, 0)
        targetCursor.execute("SELECT count(*) FROM users")
        if targetCursor.fetchone()[0]:
            raise CopyError("the target database already has users; copy into an empty database")
        # A master user added there first (its name then the source's too)
        # is no copy's to replace.
        targetCursor.execute("SELECT count(*) FROM master_users")
        if targetCursor.fetchone()[0]:
            raise CopyError("the target database already has master users; copy into an empty database")
        # Once first, on the empty target, so that a role that may not set
        # the ids' sequence is refused before the whole source is read.
        targetEngine.resetIdentity(targetCursor, "users", "user_id")

        def read(sourceCursor):
            # Past every id the source gave, and every one its rows hold.
            past = _sourceCounter(sourceCursor, source.database.engine.name)
            for table, key, columns in _TABLES:
                for rows in _pages(sourceCursor, key, columns, table):
                    _insert(targetCursor, table, columns, rows)
                    past = max(past, _largestUserId(table, columns, rows))
                    if table == "users":
                        report.users += len(rows)
                    elif table == "maildrop":
                        report.messages += len(rows)
                    elif table == "deleted_mail":
                        report.kept += len(rows)
                    elif table == "master_users":
                        report.masterUsers += len(rows)
                    elif table == "bodies":
                        report.bodies += len(rows)
                        for row in rows:
                            report.octets += row[2]
                            _copyChunks(sourceCursor, targetCursor, row[0], row[1])
            targetEngine.resetIdentity(targetCursor, "users", "user_id", past)
            report.bans = _copyBans(sourceCursor, targetCursor, now)
            _copySharedSecrets(sourceCursor, targetCursor)

        _readSnapshot(source, read)

    try:
        target.database.run(write, write=True)
    except Exception as e:
        # The target was empty when this copy looked: another writer (a
        # second copy into it, run while this one was) has committed
        # users since, whose keys this copy's rows collide with.
        if targetEngine.isUniqueViolation(e):
            raise CopyError(
                "the target database already has users (written while this copy ran: another copy "
                "into it?); copy into an empty database"
            ) from e
        raise
    return report


def _readSnapshot(source, read):
    """
    Run C{read(cursor)} on the source as one snapshot of it, so that a
    server still writing the source (one that was not stopped first)
    cannot make the copy inconsistent: a message delivered between the
    pages of bodies and of maildrops would be copied without its body,
    after its user's uid counter, which the target's next delivery to
    that user then collides with.  SQLite's read transaction is a
    snapshot already (WAL: it holds no writer up); PostgreSQL reads in
    autocommit, one snapshot per statement, so the read runs as a
    REPEATABLE READ, READ ONLY transaction instead (which holds no writer
    up either).
    """
    if source.database.engine.name != "postgres":
        return source.database.run(read)

    def snapshot(cursor):
        cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        return read(cursor)

    return source.database.run(snapshot, write=True)


def _copyBans(sourceCursor, targetCursor, now):
    """
    Copy the bans in force (an administrator's, for as long as ten years,
    and those failed logins made), so that moving the database does not
    let in again who was kept out.  A ban the target has already for an
    address (one of its nodes, started before the copy, made it) is kept;
    the bans' version is raised, so that nodes running on the target load
    them (as after C{mailgate ban add}).  The failed logins are not
    copied: they count towards a ban for minutes.

    @return: how many bans were copied.
    """
    # Not the markers of failures forgotten that an earlier mailgate's ban
    # del left in the bans table, which are no ban, whatever the clock
    # says; and a target's marker gives way to a ban, as it does to a ban
    # made there.  (Markers now are among the failures, not copied.)
    sourceCursor.execute(
        "SELECT address, reason, failures, created_at, expires_at FROM bans WHERE expires_at > ? AND reason <> ? "
        "ORDER BY address",
        (now, REASON_FORGOTTEN),
    )
    rows = [tuple(row) for row in sourceCursor.fetchall()]
    if not rows:
        return 0
    targetCursor.executemany(
        "INSERT INTO bans (address, reason, failures, created_at, expires_at) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT (address) DO UPDATE SET reason = excluded.reason, failures = excluded.failures, "
        "created_at = excluded.created_at, expires_at = excluded.expires_at "
        f"WHERE bans.reason = '{REASON_FORGOTTEN}'",
        rows,
    )
    targetCursor.execute("UPDATE ban_version SET version = version + 1 WHERE singleton = 1")
    return len(rows)


def _copySharedSecrets(sourceCursor, targetCursor):
    """
    Copy the secrets the nodes share, replacing those a node started on
    the target made: the key of the salts SCRAM makes up for names with no
    user.  Under a new key every made-up salt would change at the move
    while real users' salts stay, and a client that asked before and
    after could tell which names are real users.
    """
    sourceCursor.execute("SELECT name, value FROM shared_secrets ORDER BY name")
    rows = [(name, bytes(value)) for name, value in sourceCursor.fetchall()]
    if rows:
        targetCursor.executemany(
            "INSERT INTO shared_secrets (name, value) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            rows,
        )


def _copyChunks(sourceCursor, targetCursor, owner, bodyId):
    seq = 0
    while True:
        sourceCursor.execute(
            "SELECT seq, data FROM body_chunks WHERE owner_id = ? AND body_id = ? AND seq >= ? "
            f"ORDER BY seq LIMIT {CHUNKS_PER_READ}",
            (owner, bodyId, seq),
        )
        rows = sourceCursor.fetchall()
        if not rows:
            return
        targetCursor.executemany(
            "INSERT INTO body_chunks (owner_id, body_id, seq, data) VALUES (?, ?, ?, ?)",
            [(owner, bodyId, s, bytes(data)) for s, data in rows],
        )
        seq = rows[-1][0] + 1
