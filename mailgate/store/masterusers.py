# -*- test-case-name: tests.test_master_users_store -*-
"""
Master users: a name and a password hash that log in to any user's
maildrop, as Dovecot's master users do (a helpdesk, a backup, a
migration tool), where the server allows master logins.

A master user is not a user: no maildrop, no address, no mail; its name
(L{mailgate.address.masterName}) lives in a table of its own, apart from
the users' addresses, so that no user can become one by taking a name,
and removing a user touches no master user.  Only the password hash is
kept: a master login is a USER/PASS or SASL PLAIN login, never APOP or
SCRAM, which would need more of the password.

The login looks the master user up by its name, the table's key: one
indexed statement a master login.  The statements run on a cursor inside
a transaction, as those of L{mailgate.store.sql}.
"""

from mailgate.errors import MasterUserExists, NoSuchMasterUser
from mailgate.records import MasterUserRecord

_COLUMNS = "name, password_hash, created_at, allowed_nets"


def _findMasterUser(cursor, name):
    """
    The master user C{name}, as a L{MasterUserRecord}, or C{None}.
    """
    cursor.execute(f"SELECT {_COLUMNS} FROM master_users WHERE name = ?", (name,))
    row = cursor.fetchone()
    return None if row is None else MasterUserRecord(*row)


def _addMasterUser(cursor, name, passwordHash, now, networks=None):
    """
    Add the master user C{name}, who may log in from C{networks} (see
    L{_setMasterUserNetworks}).

    @raise MasterUserExists: if there is one of that name, also one that
        another command added while this one ran: on PostgreSQL, C{ON
        CONFLICT} waits for that transaction and then inserts nothing,
        where a plain INSERT's unique violation would fail the command
        with a database error.
    """
    cursor.execute(
        "INSERT INTO master_users (name, password_hash, created_at, allowed_nets) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (name) DO NOTHING",
        (name, passwordHash, now, networks),
    )
    if cursor.rowcount != 1:
        raise MasterUserExists(name)


def _setMasterUserPassword(cursor, name, passwordHash):
    """
    Give the master user C{name} another password hash.

    @raise NoSuchMasterUser: if there is none of that name.
    """
    cursor.execute("UPDATE master_users SET password_hash = ? WHERE name = ?", (passwordHash, name))
    if cursor.rowcount != 1:
        raise NoSuchMasterUser(name)


def _setMasterUserNetworks(cursor, name, networks):
    """
    Set the networks the master user C{name} may log in from (C{None}:
    anywhere).

    @return: the networks it had.
    @raise NoSuchMasterUser: if there is none of that name.
    """
    cursor.execute("SELECT allowed_nets FROM master_users WHERE name = ?", (name,))
    row = cursor.fetchone()
    if row is None:
        raise NoSuchMasterUser(name)
    cursor.execute("UPDATE master_users SET allowed_nets = ? WHERE name = ?", (networks, name))
    return row[0]


def _removeMasterUser(cursor, name):
    """
    Remove the master user C{name}.

    @raise NoSuchMasterUser: if there is none of that name.
    """
    cursor.execute("DELETE FROM master_users WHERE name = ?", (name,))
    if cursor.rowcount != 1:
        raise NoSuchMasterUser(name)


def _listMasterUsers(cursor):
    """
    Every master user, as L{MasterUserRecord}s in the code point order of
    their names: sorted in Python, the databases' collations ordering
    C{.} and C{-} differently (a site has a handful of master users).
    """
    cursor.execute(f"SELECT {_COLUMNS} FROM master_users")
    return sorted((MasterUserRecord(*row) for row in cursor.fetchall()), key=lambda record: record.name)
