# -*- test-case-name: tests.test_store -*-
"""
How a POP3 session reads its messages: the statements that open messages
(with read-ahead) and read a large body's further chunks, what their rows
become, and the L{IMessageReads} that runs them as read transactions on
the database's worker threads (SQLite; PostgreSQL without a reactor).

The statements are written once here; the engines differ only in their
placeholders: SQLite takes C{?} and a list of them for the uids,
PostgreSQL's prepared statements C{$n} and an array
(L{mailgate.store.postgres.ReactorMessageReads}).
"""

import sys
from array import array

from zope.interface import implementer

from mailgate.errors import TemporaryFailure
from mailgate.interfaces import IMessageReads

#: octets per stored chunk of a message body
CHUNK_SIZE = 128 * 1024

# The message rows of a read-ahead, with the first chunk of each (the whole
# message, or a long message's header), while those chunks add up to the
# budget, summed in the order the messages are read ({order}, as below);
# the first one asked for comes whatever its size.  The sum takes the
# chunks' lengths, not their contents (neither engine reads a value to
# know its length), so the candidates past the budget cost next to nothing.
OPEN = (
    "SELECT r.uid, r.body_owner, r.body_id, r.size, r.header_size, r.dot_lines, r.dot_at, c.data, p.prefix "
    "FROM (SELECT m.user_id, m.uid, m.body_owner, m.body_id, m.size, m.header_size, m.dot_lines, m.dot_at, "
    "SUM(COALESCE(length(f.data), 0)) OVER (ORDER BY m.uid {order}) AS running "
    "FROM maildrop m LEFT JOIN body_chunks f "
    "ON f.owner_id = m.body_owner AND f.body_id = m.body_id AND f.seq = 0 "
    "WHERE m.user_id = {user} AND m.uid {inUids}) r "
    "LEFT JOIN body_chunks c "
    "ON c.owner_id = r.body_owner AND c.body_id = r.body_id AND c.seq = 0 "
    "LEFT JOIN maildrop_prefixes p ON p.user_id = r.user_id AND p.uid = r.uid "
    "WHERE r.running <= {budget} OR r.uid = {first}"
)

# Each statement also gives the copy's own octets before the shared body
# (its Return-Path: and Delivered-To: fields; NULL for none: see
# mailgate.store.rows.PREFIX_COLUMNS), one probe of that table's key per
# message.  maildrop.size and header_size count them, so the header taken
# below (header_size octets of the body) holds the body's header and a
# few octets more, cut by openedMessages once the prefix is put before it.

# For TOP n 0: the headers' octets, while they add up to the budget, summed
# in the order the messages are read ({order}: ASC for a client going
# forward, DESC for one going from the newest back).  A header longer than
# a chunk spans chunks; such a message's first chunk is returned whole, and
# cut by the protocol.
OPEN_HEADERS = (
    "SELECT r.uid, r.body_owner, r.body_id, r.size, r.header_size, r.dot_lines, r.dot_at, "
    f"CASE WHEN r.header_size <= {CHUNK_SIZE} "
    "THEN substr(c.data, 1, CAST(r.header_size AS INTEGER)) ELSE c.data END, p.prefix "
    "FROM (SELECT user_id, uid, body_owner, body_id, size, header_size, dot_lines, dot_at, "
    "SUM(header_size) OVER (ORDER BY uid {order}) AS running "
    "FROM maildrop WHERE user_id = {user} AND uid {inUids}) r "
    "LEFT JOIN body_chunks c "
    "ON c.owner_id = r.body_owner AND c.body_id = r.body_id AND c.seq = 0 "
    "LEFT JOIN maildrop_prefixes p ON p.user_id = r.user_id AND p.uid = r.uid "
    "WHERE r.running <= {budget} OR r.uid = {first}"
)

CHUNKS = (
    "SELECT seq, data FROM body_chunks WHERE owner_id = {owner} AND body_id = {body} "
    "AND seq >= {low} AND seq < {high} ORDER BY seq"
)


# The first chunks of several bodies, each named by its owner and id: an
# export reads many messages' first chunks in one trip (see
# L{firstChunks}).  Each pair is a probe of the primary key on both
# engines, as in L{mailgate.store.rows.deliveryKeyConditions}.
FIRST_CHUNKS = "SELECT owner_id, body_id, data FROM body_chunks WHERE seq = 0 AND ({pairs})"


#: an C{array} type code of four octets, as C{dot_at} packs each offset
_OFFSET = "I" if array("I").itemsize == 4 else "L"


def unpackOffsets(dotLines, packed):
    """
    What L{IMessageBody.dotOffsets} says, from C{dot_lines} and C{dot_at}:
    C{()} for none, the offsets (an C{array}, four octets each), or
    C{None} if unknown.

    Not a tuple of C{int}s: that cost some 36 octets an offset, nine times
    the packed form, and a POP3 session holds the bodies it reads ahead:
    seven messages of 10,000 dot lines (30 KB each, within the 256 KB
    read-ahead) held 2.7 MB.
    """
    if dotLines == 0:
        return ()
    if packed is None or dotLines is None:
        return None
    if len(packed) % 4:
        return None
    offsets = array(_OFFSET)
    offsets.frombytes(packed)
    if sys.byteorder != "little":
        offsets.byteswap()
    return offsets


def descending(uids):
    """
    Whether C{uids}, a read-ahead, goes from the newest message back.
    """
    return len(uids) > 1 and uids[1] < uids[0]


def _openMessages(cursor, userId, uids, headerOnly, budget=0):
    """
    Open the first of C{uids} and, with it, the ones after it in the list
    (read ahead): a client that fetches messages in order, or from the
    newest back, then finds the next ones already read.  One statement
    whatever the number of messages, their rows joined with their first
    chunks (the whole message, or a long one's header).

    The messages after the first are read ahead while what is returned of
    them adds up to at most C{budget} octets: their first chunks, or for
    C{headerOnly} (TOP n 0) their headers' octets only.  The database sums
    them, so the caller need not know the sizes.

    @return: see L{openedMessages}.
    """
    inUids = "IN (" + ",".join("?" * len(uids)) + ")"
    statement = OPEN_HEADERS if headerOnly else OPEN
    order = "DESC" if descending(uids) else "ASC"
    cursor.execute(
        statement.format(user="?", inUids=inUids, budget="?", first="?", order=order),
        (userId, *uids, budget, uids[0]),
    )
    return openedMessages(cursor.fetchall(), uids, headerOnly)


def openedMessages(rows, uids, headerOnly):
    """
    What opening C{uids} gives, from the rows of L{OPEN} or
    L{OPEN_HEADERS}, in any order.

    @return: a list of C{(uid, (owner, bodyId, size, headerSize, first,
        needsStuffing, dotOffsets, prefix))}, in the order of C{uids}, the
        requested message first (C{size}, C{headerSize}, C{first} and
        C{dotOffsets} are the copy's, its C{prefix} octets, C{b""} for
        none, before the shared body's) (C{needsStuffing} is false only for a message known
        to have no line starting with "."; see L{unpackOffsets}); it stops
        before the first message that has vanished or is damaged (empty if
        the requested one has).
    @raise TemporaryFailure: if the requested message's first chunk is
        missing.
    """
    rows = {row[0]: row[1:] for row in rows}
    opened = []
    for uid in uids:
        row = rows.get(uid)
        if row is None:
            break
        owner, bodyId, size, headerSize, dotLines, dotAt, data, prefix = row
        # TOP n 0 wants the header's octets and nothing more; a message
        # longer than a chunk stores its header as its first chunk.
        length = headerSize if headerOnly and headerSize <= CHUNK_SIZE else size
        if not length:
            first = b""
        elif data is None:
            if not opened:
                raise TemporaryFailure(f"message body {bodyId} chunk 0 is missing")
            break  # a damaged message further on must not fail this one
        else:
            first = bytes(data)
            if prefix is not None:
                first = bytes(prefix) + first
            if length < size:
                first = first[:length]
                size = length
        offsets = unpackOffsets(dotLines, dotAt)
        if prefix is None:
            prefix = b""
        else:
            prefix = bytes(prefix)
            offsets = shiftedOffsets(offsets, len(prefix))
        opened.append((uid, (owner, bodyId, size, headerSize, first, dotLines != 0, offsets, prefix)))
    return opened


def shiftedOffsets(offsets, by):
    """
    The dot-line offsets of a body (L{unpackOffsets}) in a copy that has
    C{by} octets before it: its own fields, which begin no line with ".".
    Work for the dot lines alone (none for most messages).
    """
    if not offsets:
        return offsets
    return array(_OFFSET, [offset + by for offset in offsets])


def _readChunks(cursor, owner, bodyId, seq, count):
    """
    Chunks C{seq} to C{seq + count - 1}: see L{chunksInOrder}.
    """
    cursor.execute(CHUNKS.format(owner="?", body="?", low="?", high="?"), (owner, bodyId, seq, seq + count))
    return chunksInOrder(cursor.fetchall(), bodyId, seq)


def chunksInOrder(rows, bodyId, seq):
    """
    The chunks from C{seq} on, from the rows C{(seq, data)} of L{CHUNKS},
    up to the first one missing: a list in order, fewer than asked for at
    the end of the body.  Not joined: each goes out as it is, and joining
    them would copy every octet of a large message once more.

    @raise TemporaryFailure: if chunk C{seq} itself is missing.
    """
    chunks = []
    for expected, (got, data) in enumerate(rows, seq):
        if got != expected:
            break
        chunks.append(bytes(data))
    if not chunks:
        raise TemporaryFailure(f"message body {bodyId} chunk {seq} is missing")
    return chunks


def firstChunks(cursor, bodies):
    """
    The first chunk of each of C{bodies}, C{(owner, body id)} pairs (at
    most 100: two parameters each, within the 999 older SQLite builds
    allow): a dict from pair to octets, without the bodies that have none
    (gone since they were listed).
    """
    pairs = " OR ".join(["(owner_id = ? AND body_id = ?)"] * len(bodies))
    cursor.execute(FIRST_CHUNKS.format(pairs=pairs), [value for pair in bodies for value in pair])
    return {(owner, bodyId): bytes(data) for owner, bodyId, data in cursor.fetchall()}


@implementer(IMessageReads)
class ThreadedMessageReads:
    """
    Message reads as read transactions of the L{mailgate.interfaces.
    IDatabase}: on its reader threads, or inline for a synchronous one.
    """

    def __init__(self, database):
        self._database = database

    def openMessages(self, userId, uids, headerOnly, budget):
        return self._database.runInteraction(_openMessages, userId, uids, headerOnly, budget)

    def readChunks(self, owner, bodyId, seq, count):
        return self._database.runInteraction(_readChunks, owner, bodyId, seq, count)

    def close(self):
        pass
