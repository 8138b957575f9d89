"""
The schema's promises for scaling out (mailgate/store/schema.py), read from
the real database catalog of a freshly migrated database, on both backends:

  - every table that grows with mail is keyed by the owning user first
    (the first column of its primary key is C{user_id} / C{owner_id}), so
    it can be distributed by that key (Citus) and one user's hot paths stay
    within one shard;
  - no table takes a database-wide counter per message: the only identity
    (auto-increment) column is C{users.user_id}.
"""

import pytest

from mailgate.store import openSynchronousStore
from mailgate.testing import addUser, deliver, resultOf

# The connection policy's tables (migration 2): they grow with failed
# logins, not with mail, and are expired to the ban window (see
# tests/test_policy_store.py), so they stay small whatever the mail volume.
POLICY = {"auth_failures", "failing_addresses", "bans", "ban_version"}

# Tables that grow with mail, and the column holding their owner's key.
GROWING = {
    "mailboxes": "user_id",
    "maildrop": "user_id",
    "bodies": "owner_id",
    "body_chunks": "owner_id",
    "deleted_mail": "user_id",
    "pop3_sessions": "user_id",
    "imported_ids": "user_id",
}

# The registry of live nodes (migration 3): one row per running server.
NODES = {"mailgate_nodes"}


@pytest.fixture
def migrated(databaseURL):
    """
    A store on a freshly migrated database, with some mail in it (so that
    anything auto-incremented has been used at least once).
    """
    store = openSynchronousStore(databaseURL)
    try:
        addUser(store, "alice@example.org", "pw")
        addUser(store, "bob@example.org", "pw")
        for n in range(3):
            deliver(store, ["alice@example.org", "bob@example.org"], b"Subject: %d\r\n\r\nx\r\n" % n)
        yield store
    finally:
        store.close()


def catalog(store, function):
    """
    Run C{function(cursor)} in a read transaction on the store's own
    connection.
    """
    return store.database.run(function)


def _sqlitePrimaryKeys(cursor):
    cursor.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")
    keys = {}
    for (table,) in cursor.fetchall():
        cursor.execute(f"PRAGMA table_info({table})")
        # (cid, name, type, notnull, default, pk): pk is the column's
        # position in the primary key, from 1; 0 if not part of it.
        columns = sorted((pk, name) for _, name, _, _, _, pk in cursor.fetchall() if pk)
        keys[table] = [name for _, name in columns]
    return keys


def _postgresPrimaryKeys(cursor):
    cursor.execute(
        "SELECT kcu.table_name, kcu.column_name "
        "FROM information_schema.table_constraints tc "
        "JOIN information_schema.key_column_usage kcu "
        "  ON kcu.constraint_schema = tc.constraint_schema "
        " AND kcu.constraint_name = tc.constraint_name "
        " AND kcu.table_name = tc.table_name "
        "WHERE tc.constraint_type = 'PRIMARY KEY' AND tc.table_schema = current_schema() "
        "ORDER BY kcu.table_name, kcu.ordinal_position"
    )
    keys = {}
    for table, column in cursor.fetchall():
        keys.setdefault(table, []).append(column)
    cursor.execute(
        "SELECT table_name FROM information_schema.tables "
        "WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'"
    )
    for (table,) in cursor.fetchall():
        keys.setdefault(table, [])
    return keys


def primaryKeys(store):
    """
    Every table's primary key columns, in key order, from the catalog.
    """
    if store.engine.name == "sqlite":
        return catalog(store, _sqlitePrimaryKeys)
    return catalog(store, _postgresPrimaryKeys)


def test_growingTablesAreKeyedByTheirOwnerFirst(migrated):
    keys = primaryKeys(migrated)
    for table, owner in GROWING.items():
        assert table in keys, f"no table {table}: {sorted(keys)}"
        assert keys[table], f"{table} has no primary key"
        assert keys[table][0] == owner, f"{table}: primary key {keys[table]} does not start with {owner}"
    # And nothing else in the database grows with mail unnoticed: every
    # table is either a known growing one or a small reference table.
    assert set(keys) - set(GROWING) <= {"users", "mailgate_schema", "shared_secrets"} | POLICY | NODES, sorted(keys)


def _sqliteAutoIncrement(cursor):
    """
    The identity columns of a SQLite database: C{AUTOINCREMENT} columns
    (they get a row in C{sqlite_sequence}), and the rowid aliases mailgate
    lets SQLite assign.
    """
    cursor.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
    )
    declared = []
    for table, sql in cursor.fetchall():
        if "AUTOINCREMENT" in sql.upper():
            cursor.execute(f"PRAGMA table_info({table})")
            declared += [(table, name) for _, name, _, _, _, pk in cursor.fetchall() if pk]
    cursor.execute("SELECT name FROM sqlite_sequence ORDER BY name")
    used = [name for (name,) in cursor.fetchall()]
    return sorted(declared), used


def _postgresIdentities(cursor):
    cursor.execute(
        "SELECT table_name, column_name FROM information_schema.columns "
        "WHERE table_schema = current_schema() "
        "AND (is_identity = 'YES' OR column_default LIKE 'nextval(%') "
        "ORDER BY table_name, column_name"
    )
    identities = [tuple(row) for row in cursor.fetchall()]
    # Every sequence in the schema, with the column owning it (if any).
    cursor.execute(
        "SELECT s.relname, t.relname, a.attname "
        "FROM pg_class s "
        "JOIN pg_namespace n ON n.oid = s.relnamespace AND n.nspname = current_schema() "
        "LEFT JOIN pg_depend d ON d.objid = s.oid AND d.classid = 'pg_class'::regclass "
        "  AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i') "
        "LEFT JOIN pg_class t ON t.oid = d.refobjid "
        "LEFT JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid "
        "WHERE s.relkind = 'S' ORDER BY s.relname"
    )
    sequences = [(table, column) for _, table, column in cursor.fetchall()]
    return identities, sequences


def test_onlyUsersHaveAnIdentityColumn(migrated):
    """
    Message uids come from the user's own counter in C{mailboxes} and body
    ids are random: no table takes a number from a database-wide sequence
    per message.
    """
    if migrated.engine.name == "sqlite":
        declared, used = catalog(migrated, _sqliteAutoIncrement)
        assert declared == [("users", "user_id")]
        # Six deliveries later, only users ever drew from a sequence.
        assert used == ["users"]
    else:
        identities, sequences = catalog(migrated, _postgresIdentities)
        assert identities == [("users", "user_id")]
        assert sequences == [("users", "user_id")]


def test_uidsComeFromTheUsersOwnCounter(migrated):
    """
    What the per-user counter means for a user: each maildrop's unique ids
    count 1, 2, 3... on their own, however mail for others interleaves.
    """
    for address in ("alice@example.org", "bob@example.org"):
        ids = [m.uniqueId for m in resultOf(migrated.listMessages(address))]
        assert [int(uid[:8], 16) for uid in ids] == [1, 2, 3], ids
