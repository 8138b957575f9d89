# -*- test-case-name: tests.test_importers -*-
"""
Messages brought in from another server (C{mailgate import}), in the
store: added under the unique ids that server gave them, a resumed
import's messages recognised by their content, and the ids remembered
(C{imported_ids}) so that what the user deletes here is not brought back,
and what the source no longer lists can be taken out (C{--mirror}).

Each id is remembered with the source it came from (a text the importer
makes: L{mailgate.importers.maildir.maildirSource},
L{mailgate.importers.pop3.pop3Source}): an address can be filled from
several old accounts, and a source's C{--mirror} run must take out only
what that source brought in.  Ids imported before mailgate recorded
sources (schema version 14) have none until a run from a source that
lists them claims them (L{_claimImported}).
"""

import hashlib
import secrets
import time

from mailgate.errors import NoSuchUser
from mailgate.store.guarded import _userId, lockedOutOfSession
from mailgate.store.reads import CHUNK_SIZE, _readChunks
from mailgate.store.recovery import _keepDeleted
from mailgate.store.rows import (
    BODY_COLUMNS,
    CHUNK_COLUMNS,
    DELIVERED_COLUMNS,
    IMPORTED_COLUMNS,
    batches,
    bodyPieces,
    dotLineColumns,
    insertRows,
    placeholders,
    storeLargeBody,
)


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


def _presentBodies(cursor, userId, uidls):
    """
    What a user's maildrop holds (or keeps deleted) under each of
    C{uidls} it has: unique id to a list of C{(size, owner, body id,
    None, prefix)} (the copy's own octets before its body, C{b""} for
    none: see L{mailgate.store.rows.PREFIX_COLUMNS}); or, for an id an
    earlier import brought in whose message is gone since, C{[(size,
    None, None, SHA-256 of its octets, b"")]}.
    """
    present = {}
    for batch in batches(sorted(set(uidls))):
        marks = placeholders(len(batch))
        for table in ("maildrop", "deleted_mail"):
            cursor.execute(
                f"SELECT uidl, size, body_owner, body_id, {_PREFIX_OF[table]} FROM {table} "
                f"WHERE user_id = ? AND uidl IN ({marks})",
                (userId, *batch),
            )
            for uidl, size, owner, bodyId, prefix in cursor.fetchall():
                present.setdefault(uidl, []).append((size, owner, bodyId, None, bytes(prefix or b"")))
        cursor.execute(
            f"SELECT uidl, size, digest FROM imported_ids WHERE user_id = ? AND uidl IN ({marks})",
            (userId, *batch),
        )
        for uidl, size, digest in cursor.fetchall():
            if uidl not in present:
                present[uidl] = [(size, None, None, bytes(digest), b"")]
    return present


def _existingUidls(cursor, address, uidls):
    present = _presentBodies(cursor, _userId(cursor, address), uidls)
    return {uidl: {size for size, *_ in bodies} for uidl, bodies in present.items()}


#: A message's own octets before its body, as a column of each table
#: holding messages (L{mailgate.store.rows.PREFIX_COLUMNS}).
_PREFIX_OF = {
    "maildrop": (
        "(SELECT p.prefix FROM maildrop_prefixes p WHERE p.user_id = maildrop.user_id AND p.uid = maildrop.uid)"
    ),
    "deleted_mail": "prefix",
}


def _storedDigest(cursor, owner, bodyId, size, prefix=b""):
    """
    The SHA-256 of a stored message of C{size} octets, C{prefix} (its
    copy's own fields) then its body, read a few chunks at a time.
    """
    digest = hashlib.sha256(prefix)
    seq = 0
    read = len(prefix)
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
    sizes = [size for size, *_ in stored]
    if source.size not in sizes:
        return (
            f"the maildrop already has another message under this unique id "
            f"({' or '.join(map(str, sizes))} octets, this one {source.size})"
        )
    digest = _sourceDigest(source)
    for size, owner, bodyId, importedDigest, prefix in stored:
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
        if _storedDigest(cursor, owner, bodyId, size, prefix) == digest:
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


def _importMessages(cursor, address, items, source=None):
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

    @param items: C{(uidl, message, arrived)} per message, the message an
        L{mailgate.interfaces.IMessageSource}.
    @param source: the identity of the source (old server, maildir) they
        come from, remembered with their ids (C{None}: none known).
    @return: C{(imported, skipped, conflicts)}: the unique ids added,
        those skipped as already present, and C{(uidl, reason)} for those
        neither.
    """
    userId = _userId(cursor, address)
    fresh, skipped, conflicts = _sortImports(cursor, userId, items)
    if not fresh:
        return [], skipped, conflicts
    octets = sum(message.size for _, message, _ in fresh)
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
    for n, (uidl, message, arrived) in enumerate(fresh):
        # The digest kept below, of the octets as they are stored: a third
        # reading of each source (after its measuring and its storing) was
        # about a tenth of an import's time.
        digest = hashlib.sha256()
        if message.size <= CHUNK_SIZE:
            bodyId = secrets.token_hex(16)
            bodies.append((userId, bodyId, message.size, message.headerSize, 1, arrived))
            chunks.extend((userId, bodyId, seq, chunk) for seq, chunk in enumerate(bodyPieces(message, digest)))
        else:
            bodyId = storeLargeBody(cursor, userId, message, 1, arrived, digest)
        digests.append(digest.digest())
        entries.append(
            (
                userId, first + n, uidl, userId, bodyId, message.size, message.headerSize, arrived,
                *dotLineColumns(message),
            )
        )
    insertRows(cursor, "bodies", BODY_COLUMNS, bodies)
    insertRows(cursor, "body_chunks", CHUNK_COLUMNS, chunks)
    insertRows(cursor, "maildrop", DELIVERED_COLUMNS, entries)
    # Remembered after the message is gone: a later run must not bring
    # back what the user deletes here meanwhile.
    now = int(time.time())
    insertRows(
        cursor, "imported_ids", IMPORTED_COLUMNS,
        [(userId, uidl, message.size, digest, now, source) for (uidl, message, _), digest in zip(fresh, digests)],
    )
    return [uidl for uidl, _, _ in fresh], skipped, conflicts


def _claimImported(cursor, address, source, uidls, fromOthers=False, unremembered=True):
    """
    Record C{source} as where the unique ids of C{uidls} came from, for
    those remembered without a source (imported before mailgate recorded
    sources): C{uidls} are ids the source lists now whose message the
    maildrop holds, or held, with the same content (a run skipped them as
    already present), so they are the source's.  An id that already has
    a source keeps it: the first source that brought it in; unless
    C{fromOthers} (the administrator says this source alone filled the
    address, and the source recorded for these ids, which it lists,
    is this one by another name).

    With C{unremembered}, an id the maildrop holds (or keeps deleted) but
    that is not remembered at all (C{mailgate import forget} forgot it,
    and the run found the message still there) is remembered again, from
    C{source}, with the size and SHA-256 of the message held: else no
    C{--mirror} run could take it out once the source no longer lists
    it, and a leave-on-server client would download it again.

    @return: how many were claimed.
    """
    userId = _userId(cursor, address)
    which = "(source IS NULL OR source <> ?)" if fromOthers else "source IS NULL"
    mine = (source,) if fromOthers else ()
    claimed = 0
    for batch in batches(sorted(set(uidls))):
        cursor.execute(
            f"UPDATE imported_ids SET source = ? WHERE user_id = ? AND {which} "
            f"AND uidl IN ({placeholders(len(batch))})",
            (source, userId, *mine, *batch),
        )
        claimed += cursor.rowcount
        if unremembered:
            claimed += _rememberHeld(cursor, userId, source, batch)
    return claimed


def _rememberHeld(cursor, userId, source, uidls):
    """
    Remember, from C{source}, those of C{uidls} that the maildrop holds
    (or keeps deleted) and that are not remembered as imported: see
    L{_claimImported}.

    @return: how many.
    """
    cursor.execute(
        f"SELECT uidl FROM imported_ids WHERE user_id = ? AND uidl IN ({placeholders(len(uidls))})",
        (userId, *uidls),
    )
    remembered = {uidl for (uidl,) in cursor.fetchall()}
    missing = [uidl for uidl in uidls if uidl not in remembered]
    if not missing:
        return 0
    held = {}
    for table in ("deleted_mail", "maildrop"):
        # The message the maildrop holds wins over one kept deleted.
        cursor.execute(
            f"SELECT uidl, size, body_owner, body_id, {_PREFIX_OF[table]} FROM {table} "
            f"WHERE user_id = ? AND uidl IN ({placeholders(len(missing))})",
            (userId, *missing),
        )
        for uidl, size, owner, bodyId, prefix in cursor.fetchall():
            held[uidl] = (size, owner, bodyId, bytes(prefix or b""))
    now = int(time.time())
    insertRows(
        cursor, "imported_ids", IMPORTED_COLUMNS,
        [
            (userId, uidl, size, _storedDigest(cursor, owner, bodyId, size, prefix), now, source)
            for uidl, (size, owner, bodyId, prefix) in sorted(held.items())
        ],
    )
    return len(held)


def _removeImportedGone(cursor, address, source, listed, soleSource, now, aliveSince, lockedId=None):
    """
    Take out of a user's maildrop the messages an import from C{source}
    brought in (their unique id and size in C{imported_ids}, with that
    source) whose unique id the source no longer lists: deleted there
    since the import, by a client or by the source's retention.  A
    leave-on-server client forgets the id of a message its server no
    longer lists; served again here, the message would be downloaded
    again.  They are kept for recovery as a POP3 deletion is
    (C{deleted_by} C{import}, for L{mailgate.store.retention._keptLongest}'s days);
    their ids stay remembered, so that no later run brings them back.

    What other sources brought in is not taken out.  Ids imported before
    mailgate recorded sources (no source) that C{source} lists are claimed
    for it (L{_claimImported}); those it does not list may be another
    source's: left where they are, and counted.  Another source that
    brought in ids C{source} lists (with the same size: the run found
    them present with the same content) may be this one by another name
    (a maildir imported from a copy then from its live path, a server by
    name then by address): what it brought in and C{source} does not
    list is left too, and counted with its name, so that the run can say
    so.  With C{soleSource} (the administrator says this source alone
    filled the address) both count as this source's, and are claimed for
    it; what a source that brought in none of what this one lists
    imported still stays.

    @param listed: every unique id the source lists now.
    @param lockedId: the id of the user whose maildrop lock is held (see
        L{mailgate.store.guarded.lockedUserId}).
    @return: C{(taken out, left, others)}: the unique ids taken out,
        sorted; how many messages imported without a recorded source the
        source does not list were left in the maildrop; and C{(source,
        how many it brought in that this source does not list were left)}
        for each other source some of whose ids this source lists, sorted.
    @raise UserChanged: if C{address} is no longer C{lockedId}'s.
    @raise MaildropInUse: if the user is in a POP3 session.
    """
    userId = lockedOutOfSession(cursor, address, lockedId, aliveSince)
    cursor.execute(
        "SELECT m.uid, m.uidl, i.source FROM maildrop m JOIN imported_ids i "
        "ON i.user_id = m.user_id AND i.uidl = m.uidl AND i.size = m.size WHERE m.user_id = ?",
        (userId,),
    )
    rows = cursor.fetchall()
    # Other sources that brought in some of what this one lists.
    overlapping = {recorded for _, uidl, recorded in rows if recorded not in (None, source) and uidl in listed}

    def unsure(recorded):
        return recorded is None or recorded in overlapping

    claimed = [
        uidl for _, uidl, recorded in rows if uidl in listed and (recorded is None or soleSource and unsure(recorded))
    ]
    _claimImported(cursor, address, source, claimed, fromOthers=soleSource, unremembered=False)
    gone = [(uid, uidl, recorded) for uid, uidl, recorded in rows if uidl not in listed and recorded != source]
    taken = [(uid, uidl) for uid, uidl, recorded in rows if uidl not in listed and recorded == source]
    others = {}
    left = 0
    if soleSource:
        taken += [(uid, uidl) for uid, uidl, recorded in gone if unsure(recorded)]
    else:
        left = sum(1 for _, _, recorded in gone if recorded is None)
        for _, _, recorded in gone:
            if recorded in overlapping:
                others[recorded] = others.get(recorded, 0) + 1
    if taken:
        _keepDeleted(cursor, userId, [uid for uid, _ in taken], now, "import")
    return sorted(uidl for _, uidl in taken), left, sorted(others.items())
