# -*- test-case-name: tests.test_store -*-
"""
The snapshot a POP3 session works on: the maildrop's message uids and
sizes at login, and the user's password hash to confirm the login was
verified against the current one.

One statement for both engines, written once here.  The uids and sizes
come packed into one value, pairs of 64-bit integers in uid order, so that
a maildrop of any size is one value to decode, in C, whatever the number
of messages.  How to pack is the one dialect difference, the engine's
C{uid_size_pairs} fragment: PostgreSQL sends the pairs as binary
(C{int8send}), SQLite as hexadecimal text (it has no binary formatting).

The statement's only parameter, the user id, is written C{$1}: both
PostgreSQL's prepared statements and SQLite take that form.
"""

import sys
from array import array

from mailgate.errors import CredentialsChanged

SNAPSHOT = (
    "SELECT password_hash, "
    "(SELECT {uid_size_pairs} FROM (SELECT uid, size FROM maildrop WHERE user_id = $1 ORDER BY uid) AS m) "
    "FROM users WHERE user_id = $1"
)


def snapshotQuery(engine):
    """
    The snapshot statement in C{engine}'s dialect (an
    L{mailgate.interfaces.IEngine}).
    """
    return SNAPSHOT.format(**engine.types)


def unpackSnapshot(rows, userId, passwordHash):
    """
    The uids and sizes from the snapshot statement's answer.

    @param rows: the rows it returned: none if the user is gone, else one
        with the stored password hash and the packed pairs (C{bytes}, or
        hexadecimal text), each as C{str} or as UTF-8 C{bytes}.
    @param passwordHash: the hash the login was verified against, or
        C{None} to skip that check.
    @return: C{(uids, sizes)}, two C{array("q")}.
    @raise CredentialsChanged: the user is gone, or their hash is no
        longer C{passwordHash}.
    """
    if not rows:
        raise CredentialsChanged(userId)
    storedHash, packed = rows[0]
    if passwordHash is not None:
        if isinstance(storedHash, bytes):
            storedHash = storedHash.decode("utf-8")
        if storedHash != passwordHash:
            raise CredentialsChanged(userId)
    pairs = array("q")
    if packed:
        if isinstance(packed, str):
            packed = bytes.fromhex(packed)
        pairs.frombytes(packed)
        if sys.byteorder == "little":
            pairs.byteswap()
    return pairs[0::2], pairs[1::2]


def readSnapshot(cursor, query, userId, passwordHash):
    """
    Run the snapshot statement on a DB-API cursor that takes C{$1} as a
    named parameter (SQLite's): an interaction for
    L{mailgate.interfaces.IDatabase.runInteraction}.  PostgreSQL runs it
    as a prepared statement on its lock connection instead.

    @param query: L{snapshotQuery} of the cursor's engine.
    """
    cursor.execute(query, {"1": userId})
    return unpackSnapshot(cursor.fetchall(), userId, passwordHash)
