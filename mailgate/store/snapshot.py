# -*- test-case-name: tests.test_store -*-
"""
The snapshot a POP3 session works on: the maildrop's message uids and
sizes at login, and the user's password hash and address to confirm the
login was verified against the current password of a user still known by
that name (a user renamed since, by C{mailgate user rename}, no longer
logs in under the old one, even with a password a server remembered).

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

from mailgate.errors import CredentialsChanged, NetworkRefused, UserDisabled
from mailgate.networks import peerAllowed

#: The most messages whose unique ids come with the snapshot: a client
#: that asks for UIDL (nearly every one that leaves mail on the server)
#: then has them without another trip to the database; a larger maildrop
#: reads them when asked, so that a login never reads megabytes of ids.
SNAPSHOT_UNIQUE_IDS = 1000

SNAPSHOT = (
    "SELECT password_hash, "
    "(SELECT {uid_size_pairs} FROM (SELECT uid, size FROM maildrop WHERE user_id = $1 ORDER BY uid) AS m) "
    ", address, "
    "(SELECT {uidl_list} FROM (SELECT uid, uidl FROM maildrop WHERE user_id = $1 ORDER BY uid "
    f"LIMIT {SNAPSHOT_UNIQUE_IDS}) AS u) "
    ", CASE WHEN disabled_at IS NULL THEN NULL ELSE coalesce(disabled_reason, '') END "
    ", allowed_nets "
    "FROM users WHERE user_id = $1"
)


def snapshotQuery(engine):
    """
    The snapshot statement in C{engine}'s dialect (an
    L{mailgate.interfaces.IEngine}).
    """
    return SNAPSHOT.format(**engine.types)


def unpackSnapshot(rows, userId, passwordHash, address=None, peer=None):
    """
    The uids and sizes from the snapshot statement's answer.

    @param rows: the rows it returned: none if the user is gone, else one
        with the stored password hash, the packed pairs (C{bytes}, or
        hexadecimal text), the user's address and the unique ids
        separated by spaces (the first L{SNAPSHOT_UNIQUE_IDS}),
        each as C{str} or as UTF-8 C{bytes}, and whether the user is
        disabled (C{None} if not, else the reason, C{""} for none), and
        the networks the user may log in from (C{None}: anywhere).
    @param passwordHash: the hash the login was verified against, or
        C{None} to skip the checks.
    @param address: the address the login was made under, or C{None} not
        to check it (checked only with C{passwordHash}).
    @param peer: the client's address (a Twisted C{IAddress}, PROXY-told
        if a trusted balancer told it), checked against the user's allowed
        networks; C{None} not to check them (no client: an
        administrator's command, an embedder).
    @return: C{(uids, sizes, uniqueIds)}: two C{array("q")}, and a list
        of the messages' unique ids in the same order, or C{None} if the
        maildrop has more than L{SNAPSHOT_UNIQUE_IDS} messages.
    @raise CredentialsChanged: the user is gone, their hash is no longer
        C{passwordHash}, or their address no longer C{address}.
    @raise UserDisabled: the user is disabled (C{mailgate user disable}),
        checked at every login in this same statement, so that it holds
        at once on every node, for a password a node remembered too.
    @raise NetworkRefused: C{peer} is on none of the user's allowed
        networks (C{mailgate user networks}), checked the same way.
    """
    if not rows:
        raise CredentialsChanged(userId)
    storedHash, packed, storedAddress, listed, disabled, allowed = rows[0]
    if passwordHash is not None:
        if _text(storedHash) != passwordHash:
            raise CredentialsChanged(userId)
        if address is not None and _text(storedAddress) != address:
            raise CredentialsChanged(userId)
    if allowed is not None and peer is not None and not peerAllowed(peer, _text(allowed)):
        # After the password's check too, and before the disabled state:
        # a client on no allowed network learns nothing (not even the
        # administrator's reason), as a wrong password.
        raise NetworkRefused(userId)
    if disabled is not None:
        # After the password's check: a password no longer the user's is
        # checked again (and fails as a wrong one), not told the reason.
        raise UserDisabled(userId, _text(disabled))
    pairs = array("q")
    if packed:
        if isinstance(packed, str):
            packed = bytes.fromhex(packed)
        pairs.frombytes(packed)
        if sys.byteorder == "little":
            pairs.byteswap()
    uids = pairs[0::2]
    # RFC 1939 unique ids are printable characters without spaces.
    uniqueIds = _text(listed).split(" ") if listed else []
    if len(uniqueIds) != len(uids):
        # Not all of them: a large maildrop's are read when asked.
        uniqueIds = None
    return uids, pairs[1::2], uniqueIds


def _text(value):
    return value.decode("utf-8") if isinstance(value, bytes) else value


def readSnapshot(cursor, query, userId, passwordHash, address=None, peer=None):
    """
    Run the snapshot statement on a DB-API cursor that takes C{$1} as a
    named parameter (SQLite's): an interaction for
    L{mailgate.interfaces.IDatabase.runInteraction}.  PostgreSQL runs it
    as a prepared statement on its lock connection instead.

    @param query: L{snapshotQuery} of the cursor's engine.
    """
    cursor.execute(query, {"1": userId})
    return unpackSnapshot(cursor.fetchall(), userId, passwordHash, address, peer)
