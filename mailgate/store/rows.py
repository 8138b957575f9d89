# -*- test-case-name: tests.test_store,tests.test_lifecycle -*-
"""
A maildrop's rows, written and removed: the cursor-level pieces that
delivery and POP3's UPDATE state (L{mailgate.store.sql}) share with the
lifecycle operations (L{mailgate.store.lifecycle}: import, restoring
deleted mail, retention), so that a message's rows, its body's chunks and
the user's storage use are written and released one way whatever the path.

Each function runs on a worker thread with a cursor inside a transaction.
Queries use C{?} placeholders; the engine's cursor translates them.
"""

import secrets
import struct
from collections import Counter

from mailgate.message import spoolBytes
from mailgate.store.database import updatesMailboxes
from mailgate.store.limits import quotaWarningMessage
from mailgate.store.reads import CHUNK_SIZE

#: Values in one C{IN (...)} list at most.
IN_BATCH = 500


def batches(items, size=IN_BATCH):
    items = list(items)
    for start in range(0, len(items), size):
        yield items[start : start + size]


def placeholders(n):
    return ",".join("?" * n)


def formatUniqueId(uid, uidValidity):
    """
    The unique id POP3 shows for a message: 16 hex digits, the per-user
    message counter then the maildrop's validity stamp (the same shape as
    Dovecot's default C{%08Xu%08Xv}).  The counter never goes back and the
    stamp changes when a user is re-created, and in a backup (which a
    restore sets the counter back to), so an id is never reused.
    """
    return f"{uid:08x}{uidValidity:08x}"


@updatesMailboxes(lambda cursor, userId, *args, **kwargs: (userId,))
def removeMessages(cursor, userId, uids):
    """
    Delete maildrop entries, give their octets back to the user's quota,
    and drop each body whose last reference went.
    """
    references = Counter()
    octets = 0
    for batch in batches(uids):
        # RETURNING counts only rows this transaction really removed, so a
        # message is never released twice.
        cursor.execute(
            f"DELETE FROM maildrop WHERE user_id = ? AND uid IN ({placeholders(len(batch))}) "
            "RETURNING body_owner, body_id, size",
            (userId, *batch),
        )
        for owner, bodyId, size in cursor.fetchall():
            references[(owner, bodyId)] += 1
            octets += size
        # Their copies' own fields, if they had any (see PREFIX_COLUMNS).
        cursor.execute(
            f"DELETE FROM maildrop_prefixes WHERE user_id = ? AND uid IN ({placeholders(len(batch))})",
            (userId, *batch),
        )
    if references:
        releaseUsage(cursor, userId, sum(references.values()), octets)
    releaseBodies(cursor, references)
    return sum(references.values())


def releaseUsage(cursor, userId, messages, octets):
    cursor.execute(
        "UPDATE mailboxes SET used_messages = used_messages - ?, used_octets = used_octets - ? "
        "WHERE user_id = ?",
        (messages, octets, userId),
    )


def exactOldestArrival(cursor, userId):
    """
    Make the user's C{oldest_arrival} exact again: the arrival of the
    oldest message left, or C{NULL} for an empty maildrop.  Deliveries
    and imports only ever lower it (a lower bound the retention task
    starts from); what removes the oldest messages, an expire or an
    expunge, sets it here, in one statement both wrote out before.
    """
    cursor.execute(
        "UPDATE mailboxes SET oldest_arrival = (SELECT min(arrived_at) FROM maildrop WHERE user_id = ?) "
        "WHERE user_id = ?",
        (userId, userId),
    )


def releaseBodies(cursor, references):
    """
    Drop one reference per count in C{references} (C{(owner, body id)} to
    count) from each body, and the bodies nobody references any more.

    Three statements for each run of up to L{IN_BATCH} bodies of one owner
    dropping the same count (nearly always all of them: one reference
    each), not three a body: on PostgreSQL each statement is a round trip,
    and a QUIT that deleted 50 messages made 150 of them, an expunge of
    100,000 messages 300,000.  The runs go in the order of the bodies'
    key, and each run's UPDATE locks its rows in that order
    (L{mailgate.interfaces.IEngine.dropBodyReferences}): a plain one locked
    them in its plan's order, the table's for a sequential scan of a
    small table, so that two transactions releasing the same shared
    bodies in runs cut differently (runs of other sizes, or the same body
    dropping other counts) deadlocked, one of them failed after
    PostgreSQL's C{deadlock_timeout} (a second) and ran again.
    """
    run = []
    runKey = None
    for (owner, bodyId), count in sorted(references.items()):
        if (owner, count) != runKey or len(run) == IN_BATCH:
            _releaseRun(cursor, runKey, run)
            run, runKey = [], (owner, count)
        run.append(bodyId)
    _releaseRun(cursor, runKey, run)


def _releaseRun(cursor, key, bodyIds):
    """
    Drop C{count} references (C{key} is C{(owner, count)}) from each of the
    owner's C{bodyIds}, and delete those nobody references any more.
    """
    if not bodyIds:
        return
    owner, count = key
    left = cursor.engine.dropBodyReferences(cursor, owner, count, bodyIds)
    unreferenced = sorted(bodyId for bodyId, refcount in left if refcount <= 0)
    if not unreferenced:
        return
    marks = placeholders(len(unreferenced))
    cursor.execute(
        f"DELETE FROM body_chunks WHERE owner_id = ? AND body_id IN ({marks})",
        (owner, *unreferenced),
    )
    cursor.execute(
        f"DELETE FROM bodies WHERE owner_id = ? AND body_id IN ({marks})",
        (owner, *unreferenced),
    )


def bodyPieces(source, digest=None):
    """
    The stored chunks of a message: at most L{CHUNK_SIZE} octets each, and
    for a message longer than one chunk, the header section alone first, so
    that TOP n 0 reads exactly the header (a database reads a whole value
    to return part of it).

    @param digest: a C{hashlib} hash to update with each chunk, in order:
        the digest of what is stored, without reading the source again.
    """
    if digest is not None:
        for piece in bodyPieces(source):
            digest.update(piece)
            yield piece
        return
    chunks = source.chunks(CHUNK_SIZE)
    if source.size <= CHUNK_SIZE or not 0 < source.headerSize <= CHUNK_SIZE:
        yield from chunks
        return
    rest = b""
    header = b""
    for chunk in chunks:
        if len(header) < source.headerSize:
            need = source.headerSize - len(header)
            header += chunk[:need]
            chunk = chunk[need:]
            if len(header) == source.headerSize:
                yield header
        rest += chunk
        while len(rest) >= CHUNK_SIZE:
            yield rest[:CHUNK_SIZE]
            rest = rest[CHUNK_SIZE:]
    if rest:
        yield rest


# 100 rows of at most 8 values stay within the 999 parameters older SQLite
# builds allow per statement.
ROWS_PER_INSERT = 100


def deliveryKeyConditions(pairs, size=ROWS_PER_INSERT):
    """
    WHERE conditions on C{recent_deliveries} naming the C{(user id, delivery
    key)} C{pairs}, at most C{size} keys each: each user with her keys,
    OR-ed, which SQLite and PostgreSQL run as one probe of the primary key
    per pair.  (C{user_id IN (...) AND delivery_key IN (...)} made both
    probe every user with every key: n^2 for n messages to n users.)  A
    message to a few users, the common case, gives the same text each
    time: SQLite's statement cache and PostgreSQL's prepared statements
    keep its plan.

    @return: C{(condition, values)} per statement.
    """
    byUser = {}
    for userId, key in sorted(pairs):
        byUser.setdefault(userId, []).append(key)
    terms, values, count = [], [], 0
    for userId, keys in byUser.items():
        for start in range(0, len(keys), size):
            piece = keys[start : start + size]
            if count + len(piece) > size:
                yield " OR ".join(terms), values
                terms, values, count = [], [], 0
            if len(piece) == 1:
                terms.append("(user_id = ? AND delivery_key = ?)")
            else:
                terms.append(f"(user_id = ? AND delivery_key IN ({placeholders(len(piece))}))")
            values.append(userId)
            values.extend(piece)
            count += len(piece)
    if terms:
        yield " OR ".join(terms), values


def insertRows(cursor, table, columns, rows):
    """
    Insert C{rows} with as few statements as possible: each statement is one
    step of the database engine, where C{executemany} is one per row.
    """
    row = f"({placeholders(len(columns))})"
    # Within the 999 parameters of older SQLite builds however many
    # columns (deleted_mail's 11: 90 rows a statement).
    perStatement = max(1, min(ROWS_PER_INSERT, 999 // len(columns)))
    for start in range(0, len(rows), perStatement):
        part = rows[start : start + perStatement]
        cursor.execute(
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES {','.join([row] * len(part))}",
            [value for r in part for value in r],
        )

BODY_COLUMNS = ("owner_id", "body_id", "size", "header_size", "refcount", "created_at")
CHUNK_COLUMNS = ("owner_id", "body_id", "seq", "data")
MAILDROP_COLUMNS = ("user_id", "uid", "uidl", "body_owner", "body_id", "size", "header_size", "arrived_at")
IMPORTED_COLUMNS = ("user_id", "uidl", "size", "digest", "imported_at", "source")
# What a delivery or an import writes: the above, and whether the message
# has lines to dot-stuff.
DELIVERED_COLUMNS = MAILDROP_COLUMNS + ("dot_lines", "dot_at")
# A copy's own octets before the body it shares with the other recipients'
# copies (its Return-Path: and Delivered-To: fields): a row only for a
# copy that has them, keyed as its maildrop row, which counts them in its
# size and header_size.  Apart from maildrop, whose every row the login's
# listing reads (see schema migration 20).
PREFIX_COLUMNS = ("user_id", "uid", "prefix")


def copyPrefixesOf(source):
    """
    What each recipient's copy of C{source} has before the shared body: a
    dict from the recipient's address (as given to
    L{mailgate.interfaces.IMailStore.deliver}) to octets, from the
    source's C{copyPrefixes} (empty: none, every copy is the body alone).
    """
    return getattr(source, "copyPrefixes", None) or {}


def dotLineColumns(source):
    """
    The C{dot_lines} and C{dot_at} values of a message source: 0, 1, or
    C{None} if it does not say; the packed offsets of its lines that
    start with ".", or C{None}.
    """
    dotLines = getattr(source, "dotLines", None)
    if dotLines is None:
        return None, None
    if not dotLines:
        return 0, None
    return 1, packOffsets(getattr(source, "dotOffsets", None))


def packOffsets(offsets):
    """
    C{dot_at}'s form of a list of offsets (C{None} stays C{None}).
    """
    if offsets is None:
        return None
    return struct.pack(f"<{len(offsets)}I", *offsets)


def storeLargeBody(cursor, owner, source, refcount, now, digest=None):
    """
    A body of more than one chunk, streamed from the spool a chunk at a
    time.

    @param digest: see L{bodyPieces}.
    """
    bodyId = secrets.token_hex(16)
    insertRows(cursor, "bodies", BODY_COLUMNS, [(owner, bodyId, source.size, source.headerSize, refcount, now)])
    for seq, chunk in enumerate(bodyPieces(source, digest)):
        insertRows(cursor, "body_chunks", CHUNK_COLUMNS, [(owner, bodyId, seq, chunk)])
    return bodyId


def storeQuotaWarning(cursor, userId, address, crossing, now):
    """
    Put the message saying that a delivery or a restore (L{mailgate.store.recovery}) brought a user's use to
    a warning percentage of the quota (L{mailgate.store.limits.quotaWarningMessage}) into the maildrop, after
    the messages that did, in their transaction: one warning per crossing, never lost nor doubled.  It is
    stored over the quota if need be (a few hundred octets: a user at 100% is told).
    """
    source = spoolBytes(quotaWarningMessage(address, crossing, now))
    try:
        data = b"".join(source.chunks(CHUNK_SIZE))
        size, headerSize, dotColumns = source.size, source.headerSize, dotLineColumns(source)
    finally:
        source.close()
    cursor.execute(
        "UPDATE mailboxes SET next_uid = next_uid + 1, used_messages = used_messages + 1, "
        "used_octets = used_octets + ? WHERE user_id = ? RETURNING next_uid, uid_validity",
        (size, userId),
    )
    following, validity = cursor.fetchone()
    uid = following - 1
    bodyId = secrets.token_hex(16)
    insertRows(cursor, "bodies", BODY_COLUMNS, [(userId, bodyId, size, headerSize, 1, now)])
    insertRows(cursor, "body_chunks", CHUNK_COLUMNS, [(userId, bodyId, 0, data)])
    insertRows(cursor, "maildrop", DELIVERED_COLUMNS, [
        (userId, uid, formatUniqueId(uid, validity), userId, bodyId, size, headerSize, now, *dotColumns),
    ])
