# -*- test-case-name: tests.test_store -*-
"""
The database schema, as an ordered list of migrations.

Every start (and C{mailgate db upgrade}) applies the migrations a database
has not seen yet, each in its own transaction (a new database's all in one),
and records the version.  The SQL is written once; the few dialect
differences are named placeholders filled from the engine's C{types}.

Layout, with scaling out in mind:
  - C{users} holds accounts and credentials: small, rarely written, keyed
    by C{user_id} and looked up by address (a reference table on Citus).
  - Every table that grows or changes with mail carries the owning user's
    id first in its primary key (C{mailboxes.user_id}, C{maildrop.user_id},
    C{bodies.owner_id}, C{body_chunks.owner_id}), so one user's hot paths
    stay within that key and these tables can be distributed by it.
  - No global counter is taken per message: message uids come from the
    user's own counter in C{mailboxes}, body ids are random.
  - A message delivered to several local users is stored once, owned by
    its first recipient, and reference counted.
"""

import contextlib
import contextvars
import re
import sqlite3
import time

import attr

from mailgate.errors import CommitUncertain, ConfigurationError, MailgateError, StorageFull, TemporaryFailure
from mailgate.store.database import _LostBeforeCommit, _translate, runTransaction

SCHEMA_TABLE = "mailgate_schema"

#: Seconds an upgrade whose migration timed out waiting for a table's lock
#: waits before trying again, doubled at each try up to the maximum.
_LOCKED_OUT_PAUSE = 0.5
_LOCKED_OUT_PAUSE_MAX = 8


@attr.s(frozen=True)
class Migration:
    """
    @ivar dialects: the engine names (C{"sqlite"}, C{"postgres"}) whose
        databases the statements are for, or C{None} for every engine; on
        the others the migration changes nothing but the version.
    """

    version = attr.ib()
    description = attr.ib()
    statements = attr.ib()
    dialects = attr.ib(default=None)


MIGRATIONS = [
    Migration(
        1,
        "users, message bodies and maildrops",
        [
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
            "CREATE INDEX users_domain ON users (domain)",
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
        ],
    ),
    Migration(
        2,
        "failed authentications and bans, shared by every node",
        [
            # One row per failed login, kept for the ban window and then
            # expired (mailgate.store.policy): bounded under attack, since
            # an address stops adding rows once it is banned.  The id is
            # made by the node (random), so no node waits on a sequence
            # and a node reading failures back knows which it has.
            """
            CREATE TABLE auth_failures (
                failure_id TEXT NOT NULL PRIMARY KEY,
                address TEXT NOT NULL,
                login TEXT,
                failed_at {bigint} NOT NULL
            )
            """,
            "CREATE INDEX auth_failures_address ON auth_failures (address, failed_at)",
            "CREATE INDEX auth_failures_time ON auth_failures (failed_at)",
            # An address's row is written first by every failure from it:
            # its lock makes concurrent failures from one address, on any
            # node, count one after the other, so the Nth failure is seen
            # as the Nth.
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
            # Raised by every change to the bans: what a node's refresh
            # reads first (one row), fetching the bans only when it moved.
            """
            CREATE TABLE ban_version (
                singleton INTEGER NOT NULL PRIMARY KEY CHECK (singleton = 1),
                version {bigint} NOT NULL
            )
            """,
            "INSERT INTO ban_version (singleton, version) VALUES (1, 0)",
        ],
    ),
    Migration(
        3,
        "quotas, retention, kept deleted mail and the POP3 session registry",
        [
            # Usage is kept with every delivery and removal, in the row the
            # delivery already locks for its uid counter: a quota check
            # costs no statement of its own and no scan.  The limits are
            # NULL for the server's default and -1 for none (or NEVER).
            "ALTER TABLE mailboxes ADD COLUMN used_octets {bigint} NOT NULL DEFAULT 0",
            "ALTER TABLE mailboxes ADD COLUMN used_messages {bigint} NOT NULL DEFAULT 0",
            "ALTER TABLE mailboxes ADD COLUMN quota_octets {bigint}",
            "ALTER TABLE mailboxes ADD COLUMN quota_messages {bigint}",
            "ALTER TABLE mailboxes ADD COLUMN expire_days {bigint}",
            # A lower bound of the arrival time of the maildrop's oldest
            # message (set by deliveries, made exact by the retention
            # task): the task finds the maildrops it has work in without
            # reading every maildrop.
            "ALTER TABLE mailboxes ADD COLUMN oldest_arrival {bigint}",
            """
            UPDATE mailboxes SET
                used_octets = coalesce((SELECT sum(m.size) FROM maildrop m WHERE m.user_id = mailboxes.user_id), 0),
                used_messages = (SELECT count(*) FROM maildrop m WHERE m.user_id = mailboxes.user_id),
                oldest_arrival = (SELECT min(m.arrived_at) FROM maildrop m WHERE m.user_id = mailboxes.user_id)
            """,
            # Messages a POP3 QUIT deleted, kept for --keep-deleted-days:
            # the maildrop row as it was (its uid and unique id stay the
            # message's, and its body reference stays counted), when and
            # from where it was deleted.
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
            "CREATE INDEX deleted_mail_deleted_at ON deleted_mail (deleted_at)",
            # The nodes serving POP3, each with a heartbeat, and the POP3
            # sessions in progress on them (mailgate who, mailgate kick).
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
            "CREATE INDEX pop3_sessions_node ON pop3_sessions (node_id)",
        ],
    ),
    Migration(
        4,
        "SQLite: message chunks in a rowid table",
        [
            # SQLite keeps a WITHOUT ROWID table's rows whole in its key's
            # b-tree, and advises against it for rows this large: a few rows
            # to a page, and each lookup of a chunk cost as much as copying
            # it.  In a rowid table the key's index stays small, and reading
            # a maildrop's first chunks (TOP, RETR) is several times faster.
            """
            CREATE TABLE body_chunks_rowid (
                owner_id {bigint} NOT NULL,
                body_id TEXT NOT NULL,
                seq INTEGER NOT NULL,
                data {blob} NOT NULL,
                PRIMARY KEY (owner_id, body_id, seq)
            )
            """,
            "INSERT INTO body_chunks_rowid (owner_id, body_id, seq, data) "
            "SELECT owner_id, body_id, seq, data FROM body_chunks",
            "DROP TABLE body_chunks",
            "ALTER TABLE body_chunks_rowid RENAME TO body_chunks",
        ],
        dialects=("sqlite",),
    ),
    Migration(
        5,
        "whether a message has lines that POP3 must dot-stuff",
        [
            # Learnt once at delivery: 0 for none (sent as stored), 1 for
            # some; NULL (mail stored before, restored or copied without
            # it) for unknown, stuffed as before.
            "ALTER TABLE maildrop ADD COLUMN dot_lines INTEGER",
        ],
    ),
    Migration(
        6,
        "where a message's lines that POP3 must dot-stuff begin",
        [
            # With dot_lines = 1: the offsets of those lines, 4-octet
            # little-endian integers, so that RETR and TOP stuff by
            # copying the slices between them.  NULL (mail stored before,
            # or more than mailgate.message.MAX_DOT_OFFSETS such lines):
            # POP3 searches the message for them as before.
            "ALTER TABLE maildrop ADD COLUMN dot_at {blob}",
        ],
    ),
    Migration(
        7,
        "PostgreSQL: message chunks stored without compression",
        [
            # PostgreSQL compresses a value of more than about 2 KB before
            # storing it (pglz by default): CPU at every delivery, and
            # again to undo it at every RETR, for mail that is read once
            # or twice.  Stored as it is, like the SQLite engine's chunks
            # and Dovecot's default maildir (measured on 4 KB intake, 3
            # interleaved rounds: PostgreSQL's CPU 0.32 -> 0.24 ms per
            # message, 1131/1171 -> 1398/1304 LMTP/SMTP msgs/s; lz4 came
            # between the two).  Chunks stored before stay compressed and
            # read as before.
            "ALTER TABLE body_chunks ALTER COLUMN data SET STORAGE EXTERNAL",
        ],
        dialects=("postgres",),
    ),
    Migration(
        8,
        "the unique ids imported from another server, remembered after their messages are gone",
        [
            # A later run of an import (the last one after the switch)
            # skips what an earlier one brought in, also once the user has
            # deleted it here: it must not come back.  The size and the
            # SHA-256 of the octets tell the same message from another one
            # the old server gave the same id.
            """
            CREATE TABLE imported_ids (
                user_id {bigint} NOT NULL,
                uidl TEXT NOT NULL,
                size {bigint} NOT NULL,
                digest {blob} NOT NULL,
                imported_at {bigint} NOT NULL,
                PRIMARY KEY (user_id, uidl)
            ) {without_rowid}
            """,
        ],
    ),
    Migration(
        9,
        "secrets the nodes sharing the database share",
        [
            # Made by the first node that asks (see SQLStore.sharedSecret):
            # what must be the same on every node, such as the key of the
            # SCRAM salt made up for unknown users, which would otherwise
            # tell them from real users to a client that asks two nodes.
            """
            CREATE TABLE shared_secrets (
                name TEXT PRIMARY KEY,
                value {blob} NOT NULL
            ) {without_rowid}
            """,
        ],
    ),
    Migration(
        10,
        "the CRAM-MD5 states of users imported from Dovecot",
        [
            # HMAC-MD5's states keyed with the password, in hex, from a
            # {CRAM-MD5} hash imported from Dovecot: what CRAM-MD5 logins
            # are checked against, kept after the user's first login
            # replaces the hash (mailgate.auth.checkers).
            "ALTER TABLE users ADD COLUMN cram_md5 TEXT",
        ],
    ),
    Migration(
        11,
        "the settings each node works with",
        [
            # What each node's heartbeat announces of the settings that
            # change what it does to shared data (mailgate.store.registry:
            # default quota, retention), as JSON: nodes warn when theirs
            # differ, and the retention task keeps mail as long as the
            # live node that keeps it longest.
            "ALTER TABLE mailgate_nodes ADD COLUMN settings TEXT",
        ],
    ),
    Migration(
        12,
        "the messages recently delivered, to recognise a sender's retry",
        [
            # One row per recipient of each message delivered by SMTP, LMTP
            # or mailgate deliver: its key (a digest of the envelope sender
            # and the octets received) and the unique id it got.  A client
            # that lost the 250 after the commit (a timeout, a connection
            # cut, a node killed) sends the same octets again; found here
            # within --duplicate-window, it is answered as delivered and
            # not stored twice.  The retention task removes older rows.
            """
            CREATE TABLE recent_deliveries (
                user_id {bigint} NOT NULL,
                delivery_key {blob} NOT NULL,
                uidl TEXT NOT NULL,
                delivered_at {bigint} NOT NULL,
                PRIMARY KEY (user_id, delivery_key)
            ) {without_rowid}
            """,
            "CREATE INDEX recent_deliveries_by_time ON recent_deliveries (delivered_at)",
        ],
    ),
    Migration(
        13,
        "PostgreSQL: the users' addresses indexed in code point order, for listings a page at a time",
        [
            # mailgate user list reads a page of users at a time in code
            # point order (COLLATE "C"), which the unique index on address
            # (in the database's collation) cannot serve: each page was a
            # scan and a sort of every user after it, 18 ms a page of 1,000
            # at 50,000 users, growing with the square of their number.
            # SQLite's own order of text is the code point order already,
            # which its unique index serves.
            'CREATE INDEX users_by_address_code_points ON users (address COLLATE "C")',
        ],
        dialects=("postgres",),
    ),
    Migration(
        14,
        "the source each imported unique id came from",
        [
            # Which source an import brought each id in from
            # (mailgate.importers.maildirSource, pop3.pop3Source: a maildir's resolved
            # path, a POP3 server's host, port and user), so that a
            # --mirror run from one source takes out only what it brought
            # in, not the mail of another source merged into the same
            # address.  NULL for ids imported before: no source known
            # (see mailgate.store.imported._removeImportedGone).
            "ALTER TABLE imported_ids ADD COLUMN source TEXT",
        ],
    ),
    Migration(
        15,
        "users disabled by an administrator (Dovecot's nologin)",
        [
            # mailgate user disable: when (NULL for a user who may log
            # in) and why, the reason a login with the right password is
            # told.  Read with the snapshot every login reads already
            # (mailgate.store.snapshot): no statement of its own, and
            # every node sees it at the next login.  Mail is still
            # delivered, as Dovecot's nologin has it.
            "ALTER TABLE users ADD COLUMN disabled_at {bigint}",
            "ALTER TABLE users ADD COLUMN disabled_reason TEXT",
        ],
    ),
    Migration(
        16,
        "the networks a user may log in from (Dovecot's allow_nets)",
        [
            # mailgate user networks: comma-separated CIDR networks and
            # "local" (mailgate.networks.parseAllowedNetworks), NULL for
            # anywhere.  Read with the snapshot every login reads, as
            # disabled_at is: every node sees it at the next login.
            "ALTER TABLE users ADD COLUMN allowed_nets TEXT",
        ],
    ),
    Migration(
        17,
        "aliases: other addresses of a user, for mail received directly",
        [
            # mailgate alias add: an address whose mail is one user's
            # (mailgate.store.aliases).  Keyed by the alias, the one look-up
            # a RCPT for no user makes; the domain indexed as users' is, a
            # domain with aliases only being one mail is taken for; the
            # user id indexed, for a user's aliases and their removal with
            # the user.
            """
            CREATE TABLE aliases (
                address TEXT NOT NULL PRIMARY KEY,
                domain TEXT NOT NULL,
                user_id {bigint} NOT NULL,
                created_at {bigint} NOT NULL
            )
            """,
            "CREATE INDEX aliases_domain ON aliases (domain)",
            "CREATE INDEX aliases_user ON aliases (user_id)",
        ],
    ),
    Migration(
        18,
        "master users: names and passwords that log in to any user's maildrop (Dovecot's master users)",
        [
            # mailgate master add (mailgate.store.masterusers): a name apart
            # from the users' addresses and a password hash, nothing more
            # (master logins are USER/PASS and SASL PLAIN).  Keyed by the
            # name, the one look-up a master login makes.
            """
            CREATE TABLE master_users (
                name TEXT NOT NULL PRIMARY KEY,
                password_hash TEXT NOT NULL,
                created_at {bigint} NOT NULL,
                allowed_nets TEXT
            )
            """,
        ],
    ),
    Migration(
        19,
        "the master user of a POP3 session, shown by mailgate who and kept with what it deleted",
        [
            # The name of the master user (mailgate.store.masterusers) who
            # logged in to the user's maildrop, NULL for the user's own
            # login: mailgate who and mailgate kick say whose session it
            # is, and mailgate mailbox deleted who deleted the mail (a
            # helpdesk's login, not only a client's address).  NULL too in
            # the rows written before, and in those a node of the version
            # before writes while the nodes are being upgraded one by one.
            "ALTER TABLE pop3_sessions ADD COLUMN master TEXT",
            "ALTER TABLE deleted_mail ADD COLUMN deleted_by_master TEXT",
        ],
    ),
    Migration(
        20,
        "each recipient's own header fields (Delivered-To:), before a body stored once for all of them",
        [
            # The octets a copy of a message has before its shared body
            # (mailgate.store.prefixes): "Return-Path: <...>\r\n
            # Delivered-To: ...\r\n", as Dovecot's LMTP writes them into
            # each recipient's copy.  A table of its own, keyed like
            # maildrop, not a column of maildrop: the login's listing
            # (mailgate.store.snapshot) reads every maildrop row of the
            # user, and 70 more octets in each made the listing of
            # 100,000 messages take 65 ms instead of 42 on SQLite (the
            # table 1.75 times as large).  maildrop.size and header_size
            # count these octets.  No row: the copy has none (every
            # message stored before, imported or restored without one).
            """
            CREATE TABLE maildrop_prefixes (
                user_id {bigint} NOT NULL,
                uid {bigint} NOT NULL,
                prefix {blob} NOT NULL,
                PRIMARY KEY (user_id, uid)
            ) {without_rowid}
            """,
            # A deleted message kept for recovery keeps its copy's octets
            # with it, and a restore puts them back; NULL: none.
            "ALTER TABLE deleted_mail ADD COLUMN prefix {blob}",
        ],
    ),
]

LATEST = MIGRATIONS[-1].version

#: What a role using the database must be allowed on each of mailgate's
#: tables, as README's Administration section tells a DBA to grant the
#: nodes' role: read and write the tables, read the schema's version.
#: (tests/test_schema.py checks that this names every table.)
READ_WRITE = ("SELECT", "INSERT", "UPDATE", "DELETE")
TABLE_PRIVILEGES = {
    SCHEMA_TABLE: ("SELECT",),
    **dict.fromkeys(
        (
            "users", "mailboxes", "bodies", "body_chunks", "maildrop", "auth_failures",
            "failing_addresses", "bans", "ban_version", "deleted_mail", "mailgate_nodes",
            "pop3_sessions", "imported_ids", "shared_secrets", "recent_deliveries", "aliases",
            "master_users", "maildrop_prefixes",
        ),
        READ_WRITE,
    ),
}


#: What a role needs for the commands that only read (user list, who,
#: nodes, ban list: a monitoring host's): to read every table.
READ_ONLY_PRIVILEGES = dict.fromkeys(TABLE_PRIVILEGES, ("SELECT",))


def _ensureVersionTable(cursor):
    cursor.execute(
        f"CREATE TABLE IF NOT EXISTS {SCHEMA_TABLE} "
        f"(version INTEGER NOT NULL, applied_at TEXT NOT NULL)"
    )


def currentVersion(cursor):
    """
    The schema version of the database behind C{cursor} (0 if empty).
    """
    _ensureVersionTable(cursor)
    cursor.execute(f"SELECT max(version) FROM {SCHEMA_TABLE}")
    row = cursor.fetchone()
    return row[0] or 0


def recordedVersion(cursor):
    """
    The schema version recorded in the database behind C{cursor}, read
    without writing anything: C{None} if it records none (an empty
    database, or one that is not mailgate's), rather than creating the
    table that records it, as L{currentVersion} does.
    """
    try:
        cursor.execute(f"SELECT max(version) FROM {SCHEMA_TABLE}")
    except Exception as e:
        if _isPermissionDenied(e):
            # The table is there, and this role may not read it: not a
            # database without mailgate's schema.
            raise
        # No such table (the only statement of its transaction, so on
        # PostgreSQL nothing is left aborted by it).
        return None
    row = cursor.fetchone()
    return row[0] or 0


def _isPermissionDenied(error):
    """
    Whether C{error}, or what it was raised from, is PostgreSQL's
    insufficient_privilege (SQLSTATE 42501).
    """
    while error is not None:
        if getattr(error, "sqlstate", None) == "42501":
            return True
        error = error.__cause__
    return False


def databaseVersion(database):
    """
    The schema version recorded in the database behind a
    L{SynchronousDatabase}, read without writing (see L{recordedVersion}).

    @raise mailgate.errors.ConfigurationError: the connection's role may
        not read it, naming the GRANT that lets it.
    """
    return _readVersion(database.engine, database.connection)


def _readVersion(engine, conn):
    try:
        return runTransaction(engine, conn, recordedVersion, (), {}, False)
    except Exception as e:
        if _isPermissionDenied(e):
            # Says which table, and the grant to make (or, should the
            # role lack nothing after all, the driver's error below).
            _checkPrivileges(engine, conn)
        raise


#: What is told that this process is about to upgrade the schema, and
#: when it is done (see L{observingUpgrades}).
_upgradeObserver = contextvars.ContextVar("upgradeObserver", default=None)


@contextlib.contextmanager
def observingUpgrades(observer):
    """
    While in this context, a schema upgrade with migrations to apply (or
    another node's to wait for) runs within C{observer(fromVersion,
    toVersion)}, a context manager: a server under systemd extends its
    start timeout meanwhile (L{mailgate.systemd.StartExtension}), so that
    a migration longer than C{TimeoutStartSec} is not killed and begun
    again at every restart.
    """
    token = _upgradeObserver.set(observer)
    try:
        yield
    finally:
        _upgradeObserver.reset(token)


def pendingMigrations(version):
    return [m for m in MIGRATIONS if m.version > version]


def applyMigration(cursor, engine, migration):
    """
    Apply one migration and record it; the caller's transaction makes the
    two atomic.
    """
    if migration.dialects is None or engine.name in migration.dialects:
        for statement in migration.statements:
            cursor.execute(statement.format(**engine.types))
    cursor.execute(
        f"INSERT INTO {SCHEMA_TABLE} (version, applied_at) VALUES (?, CURRENT_TIMESTAMP)",
        (migration.version,),
    )


def upgrade(database):
    """
    Bring the schema behind a L{SynchronousDatabase} up to date.

    @return: the list of migrations applied.
    """
    return upgradeConnection(database.engine, database.connection)


def upgradeConnection(engine, conn):
    """
    Apply pending migrations on a DB-API connection, one transaction each
    (a new database's all in one).

    @return: the list of migrations applied.
    @raise mailgate.errors.ConfigurationError: if the database is newer than
        this mailgate.
    """
    # Nearly always the schema is up to date: learnt in a read, so that
    # every start and every mailgate command (mailgate user list) does not
    # wait for SQLite's write lock, which a server's long write (an
    # expunge, a large import) or another upgrade holds, and then fail.
    recorded = _readVersion(engine, conn)
    version = _checkedVersion(recorded)
    if version == LATEST:
        _checkPrivileges(engine, conn)
        return []
    applied = []
    # The migration under way, for the refusal to name.
    attempted = []

    def step(cursor):
        engine.lockSchema(cursor)
        if recorded is None:
            # A new database (or another node making it meanwhile).
            _ensureVersionTable(cursor)
        # Read first, without CREATE TABLE IF NOT EXISTS: PostgreSQL checks
        # the privilege to create before whether the table exists, so a
        # node whose role may only read and write mail, starting while the
        # schema's owner ran db upgrade, waited for the owner's lock and
        # was then refused for lack of CREATE (exit 78, told to run the
        # upgrade just run) instead of finding the schema up to date.
        cursor.execute(f"SELECT max(version) FROM {SCHEMA_TABLE}")
        found = _checkedVersion(cursor.fetchone()[0] or 0)
        pending = pendingMigrations(found)
        if not pending:
            return []
        # With migrations to apply, that check comes first: such a role is
        # refused before it records a migration that changes nothing on
        # its engine (4 on PostgreSQL), which would lock nodes of the
        # older mailgate out of the database without upgrading it.
        _ensureVersionTable(cursor)
        # A database holding mail is upgraded one migration a transaction
        # (one that moves much data commits before the next begins, and an
        # interrupted upgrade resumes where it stopped).  A new one has no
        # mail to move: it is made whole in one transaction, all or
        # nothing, with one commit (one sync) rather than one a migration.
        steps = pending if found == 0 else pending[:1]
        # (An earlier try of this transaction's, timed out, undid its own.)
        attempted.clear()
        for migration in steps:
            attempted.append(migration)
            applyMigration(cursor, engine, migration)
        return steps

    observer = _upgradeObserver.get()
    with contextlib.nullcontext() if observer is None else observer(version, LATEST):
        return _migrate(engine, conn, step, version, applied, attempted)


def _migrate(engine, conn, step, version, applied, attempted):
    """
    Run C{step} (one migration, or a new database's all, in a transaction
    of its own) until none is left, waiting out lock timeouts.
    """
    pause = _LOCKED_OUT_PAUSE
    while True:
        try:
            migrations = runTransaction(engine, conn, step, (), {}, True)
        except Exception as e:
            if engine.isLockTimeout(e):
                # A long transaction holds a table the migration changes
                # (see IEngine.lockSchema): let the statements queued
                # behind the migration through, and try again, however
                # long it takes, as the nodes waiting for this one do.
                time.sleep(pause)
                pause = min(pause * 2, _LOCKED_OUT_PAUSE_MAX)
                continue
            if isinstance(e, _LostBeforeCommit):
                # The connection was lost (PostgreSQL restarted, the
                # backend terminated): nothing of the migration under way
                # took effect, a temporary failure as any other.
                e = _translate(engine, e.error)
            if type(e) in _INTERRUPTIONS:
                current = applied[-1].version if applied else version
                raise _interrupted(e, version, current, list(attempted)) from e
            if isinstance(e, MailgateError) or engine.isTransient(getattr(e, "error", e)):
                raise
            refused = _schemaNotUsable(engine, conn, e)
            if refused is not None:
                raise refused from e
            raise _cannotUpgrade(version, e, attempted[-1] if attempted else None) from e
        if not migrations:
            _checkPrivileges(engine, conn)
            return applied
        applied.extend(migrations)
        # Committed: no longer under way.
        attempted.clear()


#: The temporary failures an upgrade stopped by says it stopped, keeping
#: their kind (the exit status, 75; StorageFull's 452 and metrics).
_INTERRUPTIONS = (TemporaryFailure, StorageFull, CommitUncertain)


def _interrupted(error, version, current, migrations):
    """
    What an upgrade that a temporary failure stopped is: the same kind of
    failure, saying that the schema upgrade stopped, in which migration,
    and the version the database stays at, so that the administrator of a
    start or a C{mailgate db upgrade} that failed knows nothing was lost
    and that the next one carries on.  A full disk found by a migration
    that rewrites a table (4, on SQLite) is gone once it rolls back: said
    so, or the free room seen afterwards would make no sense.

    @param version: the version the upgrade started from.
    @param current: the version its last committed migration reached.
    @param migrations: the L{Migration}s of the transaction under way, in
        order, the one that stopped last (several: a new database's).
    """
    what = f"the database schema upgrade from version {version} to {LATEST}"
    if not migrations:
        done = "nothing was changed" if current == version else f"the database is at version {current}"
        return type(error)(f"{what} stopped: {error} ({done}; the next start, or mailgate db upgrade, carries on)")
    migration = migrations[-1]
    if isinstance(error, CommitUncertain):
        # Its COMMIT's answer was lost: all of the transaction, or none.
        stays = f"the database is at version {migrations[0].version - 1} or {migration.version}"
    elif len(migrations) == 1:
        stays = f"the migration was rolled back: the database is at version {current}"
    else:
        stays = (
            f"migrations {migrations[0].version} to {migration.version}, a new database's one transaction, "
            f"were rolled back: the database is at version {current}"
        )
    if isinstance(error, StorageFull):
        stays += ", and its room free again"
        if len(migrations) == 1:
            stays += ": a migration that rewrites a table needs room for a second copy of it while it runs"
    return type(error)(
        f"{what} stopped in migration {migration.version} ({migration.description}): {error} "
        f"({stays}; the next start, or mailgate db upgrade, carries on)"
    )


def _checkPrivileges(engine, conn):
    """
    Refuse a database whose schema is up to date but whose tables the
    connection's role may not all read and write (PostgreSQL).  A DBA
    grants the nodes' role the tables there are; a migration applied
    later by the schema's owner creates a table that role has no privilege
    on (no default privileges were set): without this, such a node starts,
    and then its deliveries and its retention task fail on that table, as
    database writes failing, until the grant is made.

    @raise mailgate.errors.ConfigurationError: naming the role, what it
        lacks on which table, and the grant that gives it.
    """
    # A command that only reads (user list, nodes) needs to read alone: a
    # monitoring host's role that may only SELECT was told to be granted
    # INSERT, UPDATE and DELETE too.
    readsOnly = getattr(engine, "readsOnly", False)
    needed, granted = (READ_ONLY_PRIVILEGES, ("SELECT",)) if readsOnly else (TABLE_PRIVILEGES, READ_WRITE)
    missing = runTransaction(engine, conn, engine.missingPrivileges, (needed,), {}, False)
    if not missing:
        return
    lacking = "; ".join(f"{', '.join(privileges)} on table {table}" for table, privileges, _, _ in missing)
    _, _, schema, role = missing[0]
    raise ConfigurationError(
        f"the database role {role} may not {lacking}, which mailgate needs: as the schema's owner, "
        f"GRANT {', '.join(granted)} ON ALL TABLES IN SCHEMA {schema} TO {role}, and for the "
        f"tables of later upgrades ALTER DEFAULT PRIVILEGES IN SCHEMA {schema} "
        f"GRANT {', '.join(granted)} ON TABLES TO {role}"
    )


def _schemaNotUsable(engine, conn, error):
    """
    What a role finding no schema to create in (PostgreSQL's 3F000) is
    told when the URL's schema does exist, but the role has no USAGE on
    it: PostgreSQL leaves such a schema out of the search path, so the
    role sees no tables, takes the database for an empty one (version 0)
    and fails to create them.  Told as the URL's missing schema, or as
    an upgrade to run, the administrator of an up-to-date database whose
    nodes' role lacks that one grant looked in the wrong place.

    @return: a L{ConfigurationError} naming the role, the schema and the
        GRANT, or C{None} for any other failure (or when the schema is
        indeed missing, or the question cannot be asked).
    """
    if getattr(error, "sqlstate", None) != "3F000":
        return None

    def unusable(cursor):
        cursor.execute(
            "SELECT current_user, nspname FROM pg_namespace WHERE nspname = ANY("
            "string_to_array(replace(current_setting('search_path'), ' ', ''), ',')) "
            "AND NOT has_schema_privilege(oid, 'USAGE') ORDER BY nspname"
        )
        return cursor.fetchall()

    try:
        rows = runTransaction(engine, conn, unusable, (), {}, False)
    except Exception:
        return None
    if not rows:
        return None
    role = rows[0][0]
    schemas = ", ".join(name for _, name in rows)
    return ConfigurationError(
        f"the database role {role} may not use schema {schemas} (the database URL's search_path): "
        f"as the schema's owner, GRANT USAGE ON SCHEMA {schemas} TO {role}, and SELECT, INSERT, "
        f"UPDATE, DELETE on its tables"
    )


def _cannotUpgrade(version, error, migration=None):
    """
    What a database refusing a migration is, said in one line: the role
    the nodes use may read and write mail but not change the schema
    (PostgreSQL: permission denied), or the schema is not what the
    migration expects (another application's database, a table dropped
    by hand), which the URL, not another database user, may put right.

    @param migration: the L{Migration} that failed, if known.
    """
    # PostgreSQL's own words, without the statement quoted after them.
    reason = getattr(getattr(error, "diag", None), "message_primary", None) or str(error)
    reason = " ".join(reason.split())
    state = getattr(error, "sqlstate", None)
    if state == "3F000":
        # invalid_schema_name: "no schema has been selected to create in".
        # No role could: the URL names a schema that is not there.
        hint = (
            "no schema of the database URL's search_path exists: create the schema, "
            "or correct the URL's options=-c search_path=..."
        )
    elif state == "42501":
        # insufficient_privilege: "permission denied for schema ...", or
        # "must be owner of table ...".
        hint = (
            "changing the schema takes CREATE on it and owning its tables: "
            "run mailgate db upgrade as the schema's owner"
        )
    elif migration is not None and _isSchemaMismatch(error, state):
        reason = f"migration {migration.version} failed: {reason}"
        if migration.version == 1 or version == 0:
            # (A new database's migrations run in one transaction: any of
            # them finding a table there found one that is not mailgate's.)
            hint = "the database holds tables that are not mailgate's: check the database URL"
        else:
            hint = (
                f"the database's tables are not those of mailgate's schema version "
                f"{migration.version - 1}: check the database URL"
            )
    elif isinstance(error, sqlite3.Error):
        # No database users to change for: SQLite's own words say it all.
        return ConfigurationError(f"cannot upgrade the database schema from version {version} to {LATEST}: {reason}")
    else:
        hint = "run mailgate db upgrade as a database user allowed to change the schema"
    return ConfigurationError(
        f"cannot upgrade the database schema from version {version} to {LATEST}: {reason} ({hint})"
    )


#: PostgreSQL's SQLSTATEs of a statement finding the tables not as it
#: expects: undefined_table, undefined_column, duplicate_table,
#: duplicate_column, duplicate_object (an index).
_MISMATCH_STATES = frozenset({"42P01", "42703", "42P07", "42701", "42710"})

#: SQLite's words for the same (it has no codes that tell them apart).
_SQLITE_MISMATCH = re.compile(
    r"no such (table|column|index)|(table|index) \S+ already exists|duplicate column name"
)


def _isSchemaMismatch(error, state):
    """
    Whether C{error} says the tables are not what the migration's
    statements expect (a table missing, or one of the name already there).
    """
    if state is not None:
        return state in _MISMATCH_STATES
    return isinstance(error, sqlite3.OperationalError) and _SQLITE_MISMATCH.match(str(error)) is not None


def _checkedVersion(version):
    """
    C{version}, a schema version read from a database, unless this
    mailgate cannot work on it.

    @raise mailgate.errors.ConfigurationError: it is newer than this
        mailgate (a newer node migrated the database).
    """
    if version is not None and version > LATEST:
        raise ConfigurationError(
            f"database schema version {version} is newer than this "
            f"mailgate supports ({LATEST}); upgrade mailgate"
        )
    return version or 0
