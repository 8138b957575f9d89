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

import os
import re
import secrets
import signal
import subprocess
import sys
import threading
from urllib.parse import parse_qs, urlsplit, urlunsplit

import pytest

import mailgate
from mailgate.errors import ConfigurationError, StorageFull, TemporaryFailure
from mailgate.store import engineFromURL, openSynchronousStore
from mailgate.store.database import runTransaction
from mailgate.store.limits import UNLIMITED
from mailgate.store.policy import SQLPolicyStore
from mailgate.store.schema import LATEST, MIGRATIONS, SCHEMA_TABLE, TABLE_PRIVILEGES, currentVersion, upgradeConnection
from mailgate.testing import POP3Session, addUser, deliver, resultOf

# The connection policy's tables (migration 2): they grow with failed
# logins, not with mail, and are expired to the ban window (see
# tests/test_policy_store.py), so they stay small whatever the mail volume.
POLICY = {"auth_failures", "failing_addresses", "bans", "ban_version"}

# Tables that grow with mail, and the column holding their owner's key.
GROWING = {
    "mailboxes": "user_id",
    "maildrop": "user_id",
    "maildrop_prefixes": "user_id",
    "bodies": "owner_id",
    "body_chunks": "owner_id",
    "deleted_mail": "user_id",
    "pop3_sessions": "user_id",
    "imported_ids": "user_id",
    "recent_deliveries": "user_id",
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
    small = {"users", "aliases", "master_users", "mailgate_schema", "shared_secrets"}
    assert set(keys) - set(GROWING) <= small | POLICY | NODES, sorted(keys)


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


# -- upgrading a database an earlier mailgate made ----------------------------
#
# The database is built from the SQL that mailgate's schema version 3 ran
# (commit ae60ed0: migrations 1 to 3, with that version's type names),
# recorded here as it was, and from rows as that version wrote them: not
# from today's MIGRATIONS, so that a migration edited after it shipped, or
# one that no longer reads what an earlier version left, fails here.

VERSION_3_TYPES = {
    "sqlite": {
        "serial_pk": "INTEGER PRIMARY KEY AUTOINCREMENT",
        "bigint": "INTEGER",
        "blob": "BLOB",
        "without_rowid": "WITHOUT ROWID",
    },
    "postgres": {
        "serial_pk": "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
        "bigint": "BIGINT",
        "blob": "BYTEA",
        "without_rowid": "",
    },
}

VERSION_3_SCHEMA = [
    "CREATE TABLE mailgate_schema (version INTEGER NOT NULL, applied_at TEXT NOT NULL)",
    """
    CREATE TABLE users (
        user_id {serial_pk},
        address TEXT NOT NULL UNIQUE,
        domain TEXT NOT NULL,
        password_hash TEXT NOT NULL,
        scram_sha256 TEXT,
        apop_secret TEXT,
        created_at {bigint} NOT NULL
    )
    """,
    'CREATE INDEX users_domain ON users (domain)',
    """
    CREATE TABLE mailboxes (
        user_id {bigint} NOT NULL,
        uid_validity {bigint} NOT NULL,
        next_uid {bigint} NOT NULL,
        last_login {bigint},
        PRIMARY KEY (user_id)
    )
    """,
    """
    CREATE TABLE bodies (
        owner_id {bigint} NOT NULL,
        body_id TEXT NOT NULL,
        size {bigint} NOT NULL,
        header_size {bigint} NOT NULL,
        refcount INTEGER NOT NULL,
        created_at {bigint} NOT NULL,
        PRIMARY KEY (owner_id, body_id)
    ) {without_rowid}
    """,
    """
    CREATE TABLE body_chunks (
        owner_id {bigint} NOT NULL,
        body_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        data {blob} NOT NULL,
        PRIMARY KEY (owner_id, body_id, seq)
    ) {without_rowid}
    """,
    """
    CREATE TABLE maildrop (
        user_id {bigint} NOT NULL,
        uid {bigint} NOT NULL,
        uidl TEXT NOT NULL,
        body_owner {bigint} NOT NULL,
        body_id TEXT NOT NULL,
        size {bigint} NOT NULL,
        header_size {bigint} NOT NULL,
        arrived_at {bigint} NOT NULL,
        PRIMARY KEY (user_id, uid),
        UNIQUE (user_id, uidl)
    ) {without_rowid}
    """,
    """
    CREATE TABLE auth_failures (
        failure_id TEXT NOT NULL PRIMARY KEY,
        address TEXT NOT NULL,
        login TEXT,
        failed_at {bigint} NOT NULL
    )
    """,
    'CREATE INDEX auth_failures_address ON auth_failures (address, failed_at)',
    'CREATE INDEX auth_failures_time ON auth_failures (failed_at)',
    """
    CREATE TABLE failing_addresses (
        address TEXT NOT NULL PRIMARY KEY,
        last_failure {bigint} NOT NULL
    )
    """,
    """
    CREATE TABLE bans (
        address TEXT NOT NULL PRIMARY KEY,
        reason TEXT NOT NULL,
        failures INTEGER NOT NULL,
        created_at {bigint} NOT NULL,
        expires_at {bigint} NOT NULL
    )
    """,
    """
    CREATE TABLE ban_version (
        singleton INTEGER NOT NULL PRIMARY KEY CHECK (singleton = 1),
        version {bigint} NOT NULL
    )
    """,
    'INSERT INTO ban_version (singleton, version) VALUES (1, 0)',
    'ALTER TABLE mailboxes ADD COLUMN used_octets {bigint} NOT NULL DEFAULT 0',
    'ALTER TABLE mailboxes ADD COLUMN used_messages {bigint} NOT NULL DEFAULT 0',
    'ALTER TABLE mailboxes ADD COLUMN quota_octets {bigint}',
    'ALTER TABLE mailboxes ADD COLUMN quota_messages {bigint}',
    'ALTER TABLE mailboxes ADD COLUMN expire_days {bigint}',
    'ALTER TABLE mailboxes ADD COLUMN oldest_arrival {bigint}',
    """
    UPDATE mailboxes SET
        used_octets = coalesce((SELECT sum(m.size) FROM maildrop m WHERE m.user_id = mailboxes.user_id), 0),
        used_messages = (SELECT count(*) FROM maildrop m WHERE m.user_id = mailboxes.user_id),
        oldest_arrival = (SELECT min(m.arrived_at) FROM maildrop m WHERE m.user_id = mailboxes.user_id)
    """,
    """
    CREATE TABLE deleted_mail (
        user_id {bigint} NOT NULL,
        uid {bigint} NOT NULL,
        uidl TEXT NOT NULL,
        body_owner {bigint} NOT NULL,
        body_id TEXT NOT NULL,
        size {bigint} NOT NULL,
        header_size {bigint} NOT NULL,
        arrived_at {bigint} NOT NULL,
        deleted_at {bigint} NOT NULL,
        deleted_by TEXT,
        PRIMARY KEY (user_id, uid)
    ) {without_rowid}
    """,
    'CREATE INDEX deleted_mail_deleted_at ON deleted_mail (deleted_at)',
    """
    CREATE TABLE mailgate_nodes (
        node_id TEXT NOT NULL PRIMARY KEY,
        name TEXT NOT NULL,
        started_at {bigint} NOT NULL,
        seen_at {bigint} NOT NULL
    )
    """,
    """
    CREATE TABLE pop3_sessions (
        user_id {bigint} NOT NULL,
        session_id TEXT NOT NULL,
        node_id TEXT NOT NULL,
        peer TEXT,
        since {bigint} NOT NULL,
        kick_at {bigint},
        PRIMARY KEY (user_id, session_id)
    )
    """,
    'CREATE INDEX pop3_sessions_node ON pop3_sessions (node_id)',
]

#: As version 3 stored a password ("secret"): scrypt, and SCRAM-SHA-256.
VERSION_3_PASSWORD_HASH = "$scrypt$ln=15,r=8,p=1$DIv0PfpPqYQcp4VOvPUETA==$8KgIXP9d6S7FKgr/qMYcdrU9TI3kGsCfiqXsC+Etg/g="
VERSION_3_SCRAM = (
    "SCRAM-SHA-256$4096:h/h1GmPXvyEGJi5/MI6OrA==$GpOAnQ+QVkKNla8rqntxTgpNVs6YxSVsith6AjiiaKc="
    ":Er8cwUDb1STlfReX3VoPmuMoGU1W+J33pjwtstjkn3w="
)
ARRIVED = 1796453419

#: body id -> its chunks, as version 3 stored them (owned by alice, user 1)
OLD_BODIES = {
    "dots": [b"Subject: dots\r\n\r\n", b".leading dot\r\n", b"..two dots\r\nend\r\n"],
    "big": [b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n"] + [b"y" * 70 + b"\r\n"] * 3,
    "shared": [b"Subject: to both\r\n\r\nhello\r\n"],
    "gone": [b"Subject: deleted\r\n\r\nkept for a while\r\n"],
}
OLD_HEADER_SIZES = {"dots": 17, "big": 16, "shared": 19, "gone": 19}


def _size(bodyId):
    return sum(map(len, OLD_BODIES[bodyId]))


#: (user id, uid, unique id, body id) of every message in a maildrop
OLD_MAILDROPS = [(1, 2, "U2", "dots"), (1, 4, "U4", "big"), (1, 5, "U5", "shared"), (2, 1, "B1", "shared")]


def _atVersion3(cursor, dialect):
    """
    The schema and rows version 3 left: alice with a quota, retention and a
    deleted message kept, bob with no quota, a body both received, bans.
    """
    for statement in VERSION_3_SCHEMA:
        cursor.execute(statement.format(**VERSION_3_TYPES[dialect]))
    for version in (1, 2, 3):
        cursor.execute(
            "INSERT INTO mailgate_schema (version, applied_at) VALUES (?, '2026-12-02 13:20:00')", (version,)
        )
    for userId, address in ((1, "alice@example.org"), (2, "bob@example.org")):
        cursor.execute(
            "INSERT INTO users (user_id, address, domain, password_hash, scram_sha256, apop_secret, created_at) "
            "VALUES (?, ?, 'example.org', ?, ?, NULL, ?)",
            (userId, address, VERSION_3_PASSWORD_HASH, VERSION_3_SCRAM, ARRIVED - 10),
        )
    used = {1: [0, 0], 2: [0, 0]}
    for userId, _, _, bodyId in OLD_MAILDROPS:
        used[userId][0] += _size(bodyId)
        used[userId][1] += 1
    cursor.execute(
        "INSERT INTO mailboxes (user_id, uid_validity, next_uid, last_login, used_octets, used_messages, "
        "quota_octets, quota_messages, expire_days, oldest_arrival) VALUES (1, 1396182655, 6, NULL, ?, ?, "
        "10485760, 100, 365, ?)",
        (*used[1], ARRIVED),
    )
    cursor.execute(
        "INSERT INTO mailboxes (user_id, uid_validity, next_uid, last_login, used_octets, used_messages, "
        "quota_octets, quota_messages, expire_days, oldest_arrival) VALUES (2, 752730328, 2, NULL, ?, ?, "
        "-1, NULL, NULL, ?)",
        (*used[2], ARRIVED),
    )
    for bodyId, chunks in OLD_BODIES.items():
        cursor.execute(
            "INSERT INTO bodies (owner_id, body_id, size, header_size, refcount, created_at) VALUES (1, ?, ?, ?, ?, ?)",
            (bodyId, _size(bodyId), OLD_HEADER_SIZES[bodyId], 2 if bodyId == "shared" else 1, ARRIVED),
        )
        for seq, chunk in enumerate(chunks):
            cursor.execute(
                "INSERT INTO body_chunks (owner_id, body_id, seq, data) VALUES (1, ?, ?, ?)", (bodyId, seq, chunk)
            )
    for userId, uid, uniqueId, bodyId in OLD_MAILDROPS:
        cursor.execute(
            "INSERT INTO maildrop (user_id, uid, uidl, body_owner, body_id, size, header_size, arrived_at) "
            "VALUES (?, ?, ?, 1, ?, ?, ?, ?)",
            (userId, uid, uniqueId, bodyId, _size(bodyId), OLD_HEADER_SIZES[bodyId], ARRIVED + uid),
        )
    cursor.execute(
        "INSERT INTO deleted_mail (user_id, uid, uidl, body_owner, body_id, size, header_size, arrived_at, "
        "deleted_at, deleted_by) VALUES (1, 1, 'U1', 1, 'gone', ?, ?, ?, ?, '127.0.0.1:40802')",
        (_size("gone"), OLD_HEADER_SIZES["gone"], ARRIVED, ARRIVED + 60),
    )
    for address, expires in (("192.0.2.7", 4102444800), ("2001:db8::1", 4102444800)):
        cursor.execute(
            "INSERT INTO bans (address, reason, failures, created_at, expires_at) VALUES (?, 'admin', 0, ?, ?)",
            (address, ARRIVED, expires),
        )
    cursor.execute("UPDATE ban_version SET version = 2")


@pytest.fixture
def version3(databaseURL):
    """
    The URL of a database as mailgate's schema version 3 left it.
    """
    engine = engineFromURL(databaseURL)
    conn = engine.connect()
    try:
        runTransaction(engine, conn, _atVersion3, (engine.name,), {}, True)
    finally:
        conn.close()
    return databaseURL


def _pop3(store, address, *commands):
    session = POP3Session(store, apop=False)
    assert session.login(address, "secret").startswith("+OK"), address
    replies = [session.command(command) for command in commands]
    assert session.command("QUIT").startswith("+OK")
    return replies


def _served(chunks):
    """
    A message as RETR sends it: dot-stuffed, ended by the '.' line.
    """
    message = b"".join(chunks)
    stuffed = b"\r\n".join(b"." + line if line.startswith(b".") else line for line in message.split(b"\r\n"))
    return stuffed.decode() + ".\r\n"


def test_aVersion3DatabaseIsServedAsBeforeOnceUpgraded(version3):
    """
    Today's mailgate on a database version 3 made: it is migrated, and
    POP3 serves every message under its number and unique id, octet for
    octet, with the password stored then; quotas, retention, kept deleted
    mail and bans are as they were; new mail takes the next uid.
    """
    store = openSynchronousStore(version3)
    try:
        assert store.database.run(currentVersion) == LATEST
        stat, uidl, listing, retr = _pop3(store, "alice@example.org", "STAT", "UIDL", "LIST", "RETR 1")
        sizes = [_size(b) for b in ("dots", "big", "shared")]
        assert stat == f"+OK 3 {sum(sizes)}\r\n"
        assert uidl.splitlines()[1:] == ["1 U2", "2 U4", "3 U5", "."]
        assert listing.splitlines()[1:] == [f"{n} {s}" for n, s in enumerate(sizes, 1)] + ["."]
        assert retr == f"+OK {sizes[0]} octets\r\n" + _served(OLD_BODIES["dots"])
        (uidl, retr) = _pop3(store, "bob@example.org", "UIDL", "RETR 1")
        assert uidl.splitlines()[1:] == ["1 B1", "."]
        assert retr.endswith("\r\n" + _served(OLD_BODIES["shared"]))

        alice = resultOf(store.quotaOf("alice@example.org"))
        assert (alice.usedMessages, alice.usedOctets, alice.quotaOctets, alice.quotaMessages) == (
            3, sum(sizes), 10485760, 100
        )
        users = {u.address: u for u in resultOf(store.listUsers())}
        assert (users["alice@example.org"].expireDays, users["bob@example.org"].quotaOctets) == (365, UNLIMITED)

        bans = {b.address for b in resultOf(SQLPolicyStore(store.database).listBans(ARRIVED))}
        assert bans == {"192.0.2.7", "2001:db8::1"}

        (kept,) = resultOf(store.listDeleted("alice@example.org"))
        assert (kept.uniqueId, kept.size, kept.deletedBy) == ("U1", _size("gone"), "127.0.0.1:40802")
        resultOf(store.restoreDeleted("alice@example.org", ["U1"]))
        deliver(store, ["alice@example.org"], b"Subject: new\r\n\r\nafter the upgrade\r\n")
        # The restored message after the others, then the new one.
        (uidl, retr) = _pop3(store, "alice@example.org", "UIDL", "RETR 4")
        ids = [line.split()[1] for line in uidl.splitlines()[1:-1]]
        assert ids[:4] == ["U2", "U4", "U5", "U1"] and len(ids) == 5 and ids[4] not in ids[:4]
        assert retr.endswith("\r\n" + _served(OLD_BODIES["gone"]))
    finally:
        store.close()


def test_nodesStartingAtOnceOnAnOldDatabaseMigrateItOnce(version3):
    """
    Several nodes of a new mailgate starting at the same moment on a
    database an earlier one made (PostgreSQL: the schema's advisory lock;
    SQLite: its write lock): each migration runs once, every node starts,
    and nothing is lost.
    """
    starting = threading.Barrier(4)
    stores, failures = [], []

    def start():
        try:
            starting.wait(timeout=30)
            stores.append(openSynchronousStore(version3))
        except Exception as e:
            failures.append(e)

    nodes = [threading.Thread(target=start) for _ in range(4)]
    for node in nodes:
        node.start()
    for node in nodes:
        node.join(timeout=60)
    try:
        assert failures == [] and len(stores) == 4
        versions = stores[0].database.run(
            lambda cursor: cursor.execute(f"SELECT version FROM {SCHEMA_TABLE} ORDER BY version").fetchall()
        )
        assert [v for (v,) in versions] == [m.version for m in MIGRATIONS]
        messages = resultOf(stores[-1].listMessages("alice@example.org"))
        assert [m.uniqueId for m in messages] == ["U2", "U4", "U5"]
    finally:
        for store in stores:
            store.close()


# A mailgate that starts migrating and is killed (kill -9, a power cut)
# after a migration's statements ran, before its transaction commits.
_KILLED_MIDWAY = """
import os, signal, sys
from mailgate.store import openSynchronousStore, schema

applyMigration = schema.applyMigration
# The first migration to die in whose statements run on this engine, from
# the one given, if any.
dieFrom = int(sys.argv[2]) if len(sys.argv) > 2 else 0

def applyAndDie(cursor, engine, migration):
    if migration.dialects is not None and engine.name not in migration.dialects:
        return applyMigration(cursor, engine, migration)
    if migration.version < dieFrom:
        return applyMigration(cursor, engine, migration)
    for statement in migration.statements:
        cursor.execute(statement.format(**engine.types))
    print(migration.version, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

schema.applyMigration = applyAndDie
openSynchronousStore(sys.argv[1])
"""


def test_aMigrationKilledMidwayLeavesTheDatabaseAsItWas(version3):
    """
    Each migration is one transaction: killed after its statements ran,
    the database is still at the version before, every message readable;
    the next start migrates it completely.
    """
    here = os.path.dirname(os.path.dirname(os.path.abspath(mailgate.__file__)))
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_MIDWAY, version3],
        env=dict(os.environ, PYTHONPATH=here), capture_output=True, timeout=60,
    )
    assert killed.returncode == -signal.SIGKILL, killed
    # Killed in migration 4 (SQLite: the chunks moved to a new table, the
    # old one dropped) or 5 (PostgreSQL, where 4 changes only the version).
    killedIn = {"sqlite": 4, "postgres": 5}[engineFromURL(version3).name]
    assert killed.stdout == b"%d\n" % killedIn, killed
    store = openSynchronousStore(version3, migrate=False)
    try:
        assert store.database.run(currentVersion) == killedIn - 1
        chunks = store.database.run(
            lambda cursor: cursor.execute("SELECT count(*) FROM body_chunks").fetchall()
        )
        assert chunks == [(sum(map(len, OLD_BODIES.values())),)]
    finally:
        store.close()
    store = openSynchronousStore(version3)
    try:
        assert store.database.run(currentVersion) == LATEST
        (retr,) = _pop3(store, "alice@example.org", "RETR 2")
        assert retr.endswith("\r\n" + _served(OLD_BODIES["big"]))
    finally:
        store.close()


def test_aNewDatabaseKilledMidwayThroughItsCreationHoldsNothing(databaseURL):
    """
    A new database's migrations are one transaction: a first start killed
    in the middle of them (migration 18, after seventeen were applied)
    leaves no table of mailgate's, not a database at version 17, and the
    next start creates it whole and serves.
    """
    here = os.path.dirname(os.path.dirname(os.path.abspath(mailgate.__file__)))
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_MIDWAY, databaseURL, "18"],
        env=dict(os.environ, PYTHONPATH=here), capture_output=True, timeout=60,
    )
    assert killed.returncode == -signal.SIGKILL, killed
    assert killed.stdout == b"18\n", killed
    assert _tablesOf(databaseURL) == set()
    store = openSynchronousStore(databaseURL)
    try:
        assert store.database.run(currentVersion) == LATEST
        addUser(store, "alice@example.org", "secret")
        deliver(store, ["alice@example.org"], b"Subject: after\r\n\r\nhello\r\n")
        (stat,) = _pop3(store, "alice@example.org", "STAT")
        assert stat.startswith("+OK 1 ")
    finally:
        store.close()


# -- a PostgreSQL role that may read and write mail, not change the schema ---


@pytest.fixture
def mailOnlyRole(postgresURL):
    """
    C{grant(url)}: the URL of a new role on the schema of C{postgresURL}
    that may read and write the tables there (as a DBA gives the nodes),
    but not create or alter any: the schema is changed by its owner.
    """
    import psycopg

    from conftest import POSTGRES, withSchema

    schema = parse_qs(urlsplit(postgresURL).query)["options"][0].split("=", 1)[1]
    role = "mail_" + secrets.token_hex(4)

    def grant():
        with psycopg.connect(postgresURL, autocommit=True) as conn:
            conn.execute(f"GRANT USAGE ON SCHEMA {schema} TO {role}")
            conn.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO {role}")
            conn.execute(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA {schema} TO {role}")
        parts = urlsplit(POSTGRES)
        host = parts.netloc.rpartition("@")[2]
        return withSchema(urlunsplit(parts._replace(netloc=f"{role}:secret@{host}")), schema)

    with psycopg.connect(POSTGRES, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'secret'")
    try:
        yield grant
    finally:
        with psycopg.connect(postgresURL, autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")


@pytest.mark.parametrize("databaseURL", ["postgres"], indirect=True)
def test_nodesThatMayNotChangeTheSchemaServeAnUpToDateDatabase(databaseURL, mailOnlyRole):
    """
    Once the schema's owner has upgraded it (mailgate db upgrade), nodes
    and commands whose role may only read and write mail start and work:
    finding the schema up to date takes no privilege to change it.
    """
    openSynchronousStore(databaseURL).close()
    store = openSynchronousStore(mailOnlyRole())
    try:
        addUser(store, "alice@example.org", "pw")
        deliver(store, ["alice@example.org"], b"Subject: hi\r\n\r\nhello\r\n")
        assert len(resultOf(store.listMessages("alice@example.org"))) == 1
    finally:
        store.close()


@pytest.mark.parametrize("databaseURL", ["postgres"], indirect=True)
def test_aRoleThatMayNotChangeTheSchemaIsToldWhoMay(version3, mailOnlyRole):
    """
    A node of a newer mailgate whose role may not change the schema says so
    in one line, and what to do, rather than fail with the driver's
    traceback; the database stays as it was.
    """
    with pytest.raises(ConfigurationError) as e:
        openSynchronousStore(mailOnlyRole())
    assert str(e.value) == (
        f"cannot upgrade the database schema from version 3 to {LATEST}: permission denied for schema "
        f"{parse_qs(urlsplit(version3).query)['options'][0].split('=', 1)[1]} "
        "(changing the schema takes CREATE on it and owning its tables: "
        "run mailgate db upgrade as the schema's owner)"
    )
    store = openSynchronousStore(version3, migrate=False)
    try:
        assert store.database.run(currentVersion) == 3
    finally:
        store.close()


def test_aSearchPathNamingNoSchemaIsSaidToBeTheURLs(postgresURL):
    """
    A database URL whose search_path names a schema that does not exist
    (a typo, or the schema not created yet): PostgreSQL says only that no
    schema was selected to create in; the line says it is the URL's
    search_path, not a role to run the upgrade as, which no role would
    help, and nothing is created anywhere.
    """
    import psycopg

    from conftest import POSTGRES, withSchema

    missing = "no_such_" + secrets.token_hex(4)
    with pytest.raises(ConfigurationError) as e:
        openSynchronousStore(withSchema(POSTGRES, missing))
    assert str(e.value) == (
        f"cannot upgrade the database schema from version 0 to {LATEST}: no schema has been selected "
        "to create in (no schema of the database URL's search_path exists: create the schema, "
        "or correct the URL's options=-c search_path=...)"
    )
    with psycopg.connect(POSTGRES) as conn:
        assert conn.execute("SELECT to_regnamespace(%s)", (missing,)).fetchone() == (None,)


def _storeOpeningInAThread(url):
    """
    Open a store on C{url} (migrating it) in a thread of its own, started
    by the caller: the thread, and the list that gets the store or the
    exception the opening raised.
    """
    outcome = []

    def start():
        try:
            outcome.append(openSynchronousStore(url))
        except Exception as e:
            outcome.append(e)

    return threading.Thread(target=start, daemon=True), outcome


def _assertOpenedAtTheLatestVersion(node, outcome, timeout):
    """
    The thread C{node} of L{_storeOpeningInAThread} ends within C{timeout}
    seconds with a store whose schema is at the latest version.
    """
    node.join(timeout)
    assert not node.is_alive()
    (store,) = outcome
    try:
        assert store.database.run(currentVersion) == LATEST
    finally:
        store.close()


def _waitUntilBlockedBy(watcher, blocker, node, outcome):
    """
    Wait (bounded) until a backend waits for a lock the connection
    C{blocker} holds, asking through C{watcher}, while C{node}, the
    thread opening the store, is still alive.
    """
    import time

    deadline = time.monotonic() + 20
    waiting = "SELECT count(*) FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))"
    while watcher.execute(waiting, (blocker.info.backend_pid,)).fetchone()[0] == 0:
        assert node.is_alive() and time.monotonic() < deadline, outcome
        time.sleep(0.01)


@pytest.mark.parametrize("databaseURL", ["postgres"], indirect=True)
def test_aNodeWaitsForAnotherNodesMigrationHoweverLongItTakes(version3, monkeypatch):
    """
    A migration of a large database may outlast the statement timeout
    every other statement has: nodes starting meanwhile wait for the
    schema's lock until it is done, then find the schema up to date,
    rather than each fail its start (a temporary failure, again at every
    restart while the migration runs).  Here the other node's migration
    is a connection holding the schema's lock, and the timeout 0.2 s.
    """
    import psycopg

    from mailgate.store import postgres

    monkeypatch.setattr(postgres, "STATEMENT_TIMEOUT_MS", 200)
    node, outcome = _storeOpeningInAThread(version3)
    with psycopg.connect(version3) as migrating, psycopg.connect(version3, autocommit=True) as watcher:
        migrating.execute("SELECT pg_advisory_xact_lock(%s)", (postgres._key("mailgate-schema"),))
        node.start()
        _waitUntilBlockedBy(watcher, migrating, node, outcome)
        # Several times the timeout: the node is still waiting.
        node.join(1)
        assert node.is_alive(), outcome
        migrating.commit()
    _assertOpenedAtTheLatestVersion(node, outcome, 20)


@pytest.mark.parametrize("databaseURL", ["postgres"], indirect=True)
def test_aRoleWithoutPrivilegesOnATableALaterUpgradeAddedIsToldTheGrant(databaseURL, mailOnlyRole):
    """
    The nodes' role was granted the tables there were (a database as
    version 11 left it); the schema's owner then ran upgrades that created
    others (version 12's recent_deliveries and 17's aliases among them), on
    which that role has no privilege.  Its node and its commands are
    refused at start, in one line naming the role, the tables, what it
    lacks and the grant to make, rather than start and then fail every
    delivery and retention pass on those tables.  Granted again, they work.
    """
    import psycopg

    from databasefiles import olderSchema

    # Built as version 11 from the start: no later migration to undo here.
    olderSchema(databaseURL, version=11)
    older = _postgresTables(databaseURL)
    nodeURL = mailOnlyRole()
    openSynchronousStore(databaseURL).close()
    added = sorted(set(_postgresTables(databaseURL)) - set(older))
    assert {"recent_deliveries", "aliases"} <= set(added)

    schema = parse_qs(urlsplit(databaseURL).query)["options"][0].split("=", 1)[1]
    role = urlsplit(nodeURL).username
    with pytest.raises(ConfigurationError) as e:
        openSynchronousStore(nodeURL)
    lacking = "; ".join(f"{', '.join(TABLE_PRIVILEGES[table])} on table {table}" for table in added)
    assert str(e.value) == (
        f"the database role {role} may not {lacking}, "
        f"which mailgate needs: as the schema's owner, GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES "
        f"IN SCHEMA {schema} TO {role}, and for the tables of later upgrades ALTER DEFAULT PRIVILEGES IN "
        f"SCHEMA {schema} GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {role}"
    )
    # Only some of them: those are named.
    with psycopg.connect(databaseURL, autocommit=True) as conn:
        conn.execute(f"GRANT SELECT, DELETE ON recent_deliveries TO {role}")
        for table in added:
            if table != "recent_deliveries":
                conn.execute(f"GRANT {', '.join(TABLE_PRIVILEGES[table])} ON {table} TO {role}")
    with pytest.raises(ConfigurationError) as e:
        openSynchronousStore(nodeURL)
    assert str(e.value).startswith(f"the database role {role} may not INSERT, UPDATE on table recent_deliveries, ")
    mailOnlyRole()
    store = openSynchronousStore(nodeURL)
    try:
        addUser(store, "alice@example.org", "pw")
        deliver(store, ["alice@example.org"], b"Subject: hi\r\n\r\nhello\r\n")
    finally:
        store.close()


def _postgresTables(url):
    """
    The tables in the schema of the PostgreSQL C{url}, in name order.
    """
    import psycopg

    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()").fetchall()
    return sorted(name for (name,) in rows)


def test_thePrivilegesCheckedNameEveryTable(migrated):
    """
    L{TABLE_PRIVILEGES} names every table of a migrated database: a
    migration adding one adds it there too, so that a role lacking it is
    told at start.
    """
    engine = migrated.database.engine
    if engine.name == "sqlite":
        query = "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
    else:
        query = "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
    tables = catalog(migrated, lambda cursor: {row[0] for row in cursor.execute(query).fetchall()})
    assert tables == set(TABLE_PRIVILEGES)


@pytest.mark.parametrize("table, migration", [("users", 1), ("master_users", 18)])
def test_aDatabaseWhoseTablesAreNotMailgatesIsSaidToBeSo(databaseURL, table, migration):
    """
    A database URL naming another application's database (a table of the
    same name as one of mailgate's there, created by the first migration
    or by a later one): the migration that finds it is named, and the line
    says to check the URL, not to run the upgrade as another database user
    (SQLite has none, and no role would help); nothing of mailgate's is
    created (a new database's migrations are one transaction: those before
    the one that failed are undone with it), the database left as found.
    """
    engine = engineFromURL(databaseURL)
    conn = engine.connect()
    try:
        runTransaction(
            engine, conn, lambda cursor: cursor.execute(f"CREATE TABLE {table} (id INTEGER, name TEXT)"), (), {}, True
        )
    finally:
        conn.close()
    with pytest.raises(ConfigurationError) as e:
        openSynchronousStore(databaseURL)
    already = {"sqlite": f"table {table} already exists", "postgres": f'relation "{table}" already exists'}
    assert str(e.value) == (
        f"cannot upgrade the database schema from version 0 to {LATEST}: migration {migration} failed: "
        f"{already[engine.name]} (the database holds tables that are not mailgate's: check the database URL)"
    )
    assert _tablesOf(databaseURL) == {table}


def test_aDatabaseWhoseTablesAreNotThoseOfItsVersionIsSaidToBeSo(version3):
    """
    A database that records a schema version whose tables it does not
    have (a table dropped by hand, say): the upgrade stops at the
    migration that finds it, says which, and what the tables should have
    been; the migrations before it stay applied.
    """
    engine = engineFromURL(version3)
    conn = engine.connect()
    try:
        runTransaction(engine, conn, lambda cursor: cursor.execute("DROP TABLE users"), (), {}, True)
    finally:
        conn.close()
    with pytest.raises(ConfigurationError) as e:
        openSynchronousStore(version3)
    noTable = {"sqlite": "no such table: users", "postgres": 'relation "users" does not exist'}
    assert str(e.value) == (
        f"cannot upgrade the database schema from version 3 to {LATEST}: migration 10 failed: "
        f"{noTable[engine.name]} (the database's tables are not those of mailgate's schema version 9: "
        "check the database URL)"
    )
    store = openSynchronousStore(version3, migrate=False)
    try:
        assert store.database.run(currentVersion) == 9
    finally:
        store.close()


def _tablesOf(url):
    """
    The tables of the database at C{url}, read without migrating it.
    """
    store = openSynchronousStore(url, migrate=False)
    try:
        return store.database.run(lambda cursor: _tables(cursor, store.database.engine.name))
    finally:
        store.close()


def _tables(cursor, dialect):
    if dialect == "sqlite":
        cursor.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    else:
        cursor.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()")
    return {name for (name,) in cursor.fetchall()}


def test_aServerThatUpgradesTheSchemaSaysSo(version3, tmp_path):
    """
    A node (or an embedding application) whose start applies migrations
    logs one line at its start saying from which version to which: the
    record, in the log of the node that did it, of the moment nodes of the
    older mailgate stopped being able to start on the database.  A start
    that finds the schema up to date says nothing; one that made it, that
    it did.
    """
    from iterated import IteratedReactor
    from twisted.logger import formatEvent

    from mailgate.service import MailgateConfig, makeService

    def start(url=version3):
        reactor = IteratedReactor()
        try:
            service = makeService(MailgateConfig(database=url, pop3=[]), reactor=reactor)
            reactor.resultOf(service.store.close())
        finally:
            reactor.close()
        return [
            (fields, formatEvent({"log_format": format, **fields}))
            for event, format, fields in service.startupNotices
            if event == "database.schema_upgraded"
        ]

    ((fields, text),) = start()
    assert (fields["from_version"], fields["to_version"]) == (3, LATEST)
    assert text == (
        f"database schema upgraded from version 3 to {LATEST} (migrations 4 to {LATEST} applied): "
        f"nodes of a mailgate older than this one no longer start on this database"
    )
    assert start() == []
    ((_, created),) = start(f"sqlite:///{tmp_path / 'new.sqlite3'}")
    assert created == f"database schema created (version {LATEST})"


def test_aNodeThatAppliedSomeOfTheMigrationsSaysWhichItApplied():
    """
    Nodes starting together on an older database take the migrations in
    turns, each waiting for the schema's lock while another applies one:
    a node that applied 5, 7, 9 and 11 of them logged "upgraded from
    version 4 to 11 (migrations 5 to 11 applied)", and the others ranges
    that overlapped it (probe: three nodes of today starting at once on a
    database a 4a21534 mailgate made).  It names the migrations it
    applied, and that other nodes applied the rest.
    """
    from twisted.logger import formatEvent

    from mailgate.store import schemaUpgradeNotice

    def notice(versions):
        event, format, fields = schemaUpgradeNotice([MIGRATIONS[v - 1] for v in versions])
        assert event == "database.schema_upgraded"
        return (fields["from_version"], fields["to_version"]), formatEvent({"log_format": format, **fields})

    assert notice([5, 7, 9, 11]) == ((4, 11), (
        "database schema upgraded by this node and others starting at the same time (migrations "
        "5, 7, 9 and 11 applied by this one, the others by them): nodes of a mailgate older than "
        "this one no longer start on this database"
    ))
    assert notice([1, 4]) == ((0, 4), (
        "database schema upgraded by this node and others starting at the same time (migrations "
        "1 and 4 applied by this one, the others by them): nodes of a mailgate older than this "
        "one no longer start on this database"
    ))
    assert notice([6, 7]) == ((5, 7), (
        "database schema upgraded from version 5 to 7 (migrations 6 to 7 applied): nodes of a "
        "mailgate older than this one no longer start on this database"
    ))


@pytest.mark.parametrize("databaseURL", ["postgres"], indirect=True)
def test_aMigrationWaitingForALongTransactionHoldsNoOneUp(version3):
    """
    A node upgrading the schema while a long transaction has read the
    tables a migration alters (pg_dump's, a db copy's, a report's): its
    ALTER TABLE waits for that transaction, and PostgreSQL queues every
    later statement on the table behind the waiting ALTER, so the older
    nodes still serving could not log anyone in or deliver until the dump
    ended (probe: a login on a version-9 node hung past 40 s while a new
    node waited to add users.cram_md5).  The migration waits a second at a
    time, letting the queue through between, and is applied once the long
    transaction is over.
    """
    import psycopg

    node, outcome = _storeOpeningInAThread(version3)
    with psycopg.connect(version3) as dump, psycopg.connect(version3, autocommit=True) as other:
        dump.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        dump.execute("SELECT count(*) FROM maildrop").fetchall()
        node.start()
        # The node's migration waiting for the dump's lock on maildrop.
        _waitUntilBlockedBy(other, dump, node, outcome)
        # Another node's read of the table is answered meanwhile (without
        # the fix it waits behind the migration until the dump ends: here,
        # its statement timeout).
        other.execute("SET statement_timeout = '20s'")
        assert other.execute("SELECT count(*) FROM maildrop WHERE user_id = 2").fetchone() == (1,)
        assert node.is_alive(), outcome
        dump.rollback()
    _assertOpenedAtTheLatestVersion(node, outcome, 30)


@pytest.mark.parametrize("databaseURL", ["postgres"], indirect=True)
def test_aRoleThatMayNotReadTheSchemasVersionIsToldTheGrant(databaseURL, mailOnlyRole):
    """
    A role granted every table but mailgate_schema (a DBA granting them
    one by one) could not read the schema's version: it was taken for a
    database without mailgate's schema (db version said "schema version
    0"), and a node or command was told to run db upgrade as the schema's
    owner, which found nothing to do.  The refusal now names the table
    and the GRANT, as for any other table.
    """
    import psycopg

    openSynchronousStore(databaseURL).close()
    nodeURL = mailOnlyRole()
    role = urlsplit(nodeURL).username
    with psycopg.connect(databaseURL, autocommit=True) as conn:
        conn.execute(f"REVOKE SELECT ON {SCHEMA_TABLE} FROM {role}")
    expected = f"the database role {role} may not SELECT on table {SCHEMA_TABLE}, which mailgate needs: "
    with pytest.raises(ConfigurationError) as e:
        openSynchronousStore(nodeURL)
    assert str(e.value).startswith(expected)
    import io

    from mailgate.cli import run

    for command in (["user", "list"], ["db", "version"]):
        out, err = io.StringIO(), io.StringIO()
        assert run(["--database", nodeURL, *command], io.StringIO(), out, err, {}) == 78
        assert out.getvalue() == "" and err.getvalue().startswith("mailgate: " + expected), err.getvalue()


@pytest.mark.parametrize("databaseURL", ["postgres"], indirect=True)
def test_aMigrationWhoseConnectionIsLostStopsAsATemporaryFailure(version3):
    """
    The connection of a node migrating the schema is lost in the middle
    of a migration (PostgreSQL restarted, a failover, a DBA's
    pg_terminate_backend): the start failed with a traceback and exit 1,
    which systemd's unit does not restart, and mailgate db upgrade said
    "internal error: _LostBeforeCommit", exit 70.  It is a temporary
    failure (exit 75) saying which migration stopped and the version the
    database stays at; the next start carries on.
    """
    import time

    import psycopg

    node, outcome = _storeOpeningInAThread(version3)
    with psycopg.connect(version3) as dump, psycopg.connect(version3, autocommit=True) as dba:
        dump.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        dump.execute("SELECT count(*) FROM maildrop").fetchall()
        node.start()
        # Migration 5's ALTER TABLE maildrop waits for the dump: its
        # backend is terminated (between two of its waits, the node's
        # next statement finds the connection gone: the same failure).
        deadline = time.monotonic() + 20
        terminate = (
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))"
        )
        while not dba.execute(terminate, (dump.info.backend_pid,)).fetchall():
            assert node.is_alive() and time.monotonic() < deadline, outcome
            time.sleep(0.01)
        node.join(20)
        assert not node.is_alive()
        dump.rollback()
    (failure,) = outcome
    assert type(failure) is TemporaryFailure, repr(failure)
    assert str(failure).startswith(
        f"the database schema upgrade from version 3 to {LATEST} stopped in migration 5 "
        f"({MIGRATIONS[4].description}): database unavailable: "
    ), failure
    assert str(failure).endswith(
        "(the migration was rolled back: the database is at version 4; the next start, "
        "or mailgate db upgrade, carries on)"
    ), failure
    store = openSynchronousStore(version3)
    try:
        assert store.database.run(currentVersion) == LATEST
        assert [m.uniqueId for m in resultOf(store.listMessages("alice@example.org"))] == ["U2", "U4", "U5"]
    finally:
        store.close()


@pytest.mark.parametrize("databaseURL", ["sqlite"], indirect=True)
def test_aMigrationThatRunsOutOfRoomSaysSoAndThatItWasRolledBack(version3):
    """
    Migration 4 copies an SQLite database's message chunks into a new
    table: on a disk without room for the copy it fails, and rolls back,
    which frees the room again.  It said only "database storage full:
    database or disk is full", which the free room the administrator then
    sees contradicts; it is still a temporary failure of its kind (exit
    75), saying that the schema upgrade stopped in migration 4, that the
    database stays at version 3, and what the migration needs room for.
    """
    engine = engineFromURL(version3)
    conn = engine.connect()
    try:
        # No page more than the database has: SQLite answers SQLITE_FULL,
        # as on a full disk.
        (pages,) = conn.execute("PRAGMA page_count").fetchone()
        conn.execute(f"PRAGMA max_page_count = {pages}")
        with pytest.raises(StorageFull) as e:
            upgradeConnection(engine, conn)
    finally:
        conn.close()
    assert str(e.value) == (
        f"the database schema upgrade from version 3 to {LATEST} stopped in migration 4 "
        f"({MIGRATIONS[3].description}): database storage full: database or disk is full "
        "(the migration was rolled back: the database is at version 3, and its room free again: a "
        "migration that rewrites a table needs room for a second copy of it while it runs; the next "
        "start, or mailgate db upgrade, carries on)"
    )
    store = openSynchronousStore(version3)
    try:
        assert store.database.run(currentVersion) == LATEST
        (retr,) = _pop3(store, "alice@example.org", "RETR 2")
        assert retr.endswith("\r\n" + _served(OLD_BODIES["big"]))
    finally:
        store.close()


@pytest.mark.parametrize("databaseURL", ["sqlite"], indirect=True)
def test_aNewDatabaseThatRunsOutOfRoomSaysAllItsMigrationsWereRolledBack(databaseURL):
    """
    A new database's migrations are one transaction: one of them finding
    the disk full (SQLite's page limit, as a full disk) stops the upgrade
    as a temporary failure naming it, and says that every migration before
    it went too, the database at version 0 (not at the version before the
    one that failed), with no table left; with room, the next start makes
    it whole.
    """
    engine = engineFromURL(databaseURL)
    conn = engine.connect()
    try:
        conn.execute("PRAGMA max_page_count = 12")
        with pytest.raises(StorageFull) as e:
            upgradeConnection(engine, conn)
    finally:
        conn.close()
    text = str(e.value)
    stopped = re.match(
        rf"the database schema upgrade from version 0 to {LATEST} stopped in migration (\d+) \(", text
    )
    assert stopped, text
    failed = int(stopped.group(1))
    # Past the first: the ones before it are undone with it.
    assert 1 < failed <= LATEST, text
    assert text.endswith(
        f": database storage full: database or disk is full (migrations 1 to {failed}, a new database's one "
        "transaction, were rolled back: the database is at version 0, and its room free again; the next "
        "start, or mailgate db upgrade, carries on)"
    ), text
    assert _tablesOf(databaseURL) == set()
    store = openSynchronousStore(databaseURL)
    try:
        assert store.database.run(currentVersion) == LATEST
    finally:
        store.close()


@pytest.mark.parametrize("databaseURL", ["postgres"], indirect=True)
def test_aNodeThatMayNotChangeTheSchemaStartsOnceTheOwnersUpgradeIsDone(version3, mailOnlyRole):
    """
    A node whose role may only read and write mail, started while the
    schema's owner runs mailgate db upgrade (README's order, with a node
    restarted meanwhile): it waits for the owner's lock, then found the
    schema up to date only after a CREATE TABLE IF NOT EXISTS of the
    version table, which PostgreSQL refuses a role without CREATE on the
    schema even when the table is there: it stopped with "permission
    denied for schema ... run mailgate db upgrade as the schema's owner"
    (exit 78, which the unit does not restart), the upgrade it was told to
    run just done.  It starts.
    """
    import time

    import psycopg

    from mailgate.store.schema import applyMigration, pendingMigrations, recordedVersion

    nodeURL = mailOnlyRole()
    role = urlsplit(nodeURL).username
    schema = parse_qs(urlsplit(version3).query)["options"][0].split("=", 1)[1]
    engine = engineFromURL(version3)
    owner = engine.connect()
    try:
        # The owner's upgrade, under the schema's lock.
        cursor = engine.begin(owner, True)
        engine.lockSchema(cursor)
        node, outcome = _storeOpeningInAThread(nodeURL)
        node.start()
        with psycopg.connect(version3, autocommit=True) as watcher:
            deadline = time.monotonic() + 20
            waiting = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND pid = ANY(%s)"
            pids = [row[0] for row in watcher.execute(
                "SELECT pid FROM pg_stat_activity WHERE usename = %s", (role,)
            ).fetchall()]
            while not pids or watcher.execute(waiting, (pids,)).fetchone()[0] == 0:
                assert node.is_alive() and time.monotonic() < deadline, outcome
                time.sleep(0.01)
                pids = [row[0] for row in watcher.execute(
                    "SELECT pid FROM pg_stat_activity WHERE usename = %s", (role,)
                ).fetchall()]
        cursor.execute("SELECT max(version) FROM mailgate_schema")
        for migration in pendingMigrations(cursor.fetchone()[0]):
            applyMigration(cursor, engine, migration)
        # As README says to after an upgrade that adds tables.
        cursor.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO {role}")
        owner.commit()
    finally:
        owner.close()
    node.join(20)
    assert not node.is_alive()
    (store,) = outcome
    try:
        assert not isinstance(store, Exception), store
        assert store.database.run(recordedVersion) == LATEST
        assert [m.uniqueId for m in resultOf(store.listMessages("alice@example.org"))] == ["U2", "U4", "U5"]
    finally:
        if not isinstance(store, Exception):
            store.close()
