# -*- test-case-name: tests.test_store -*-
"""
Storage: choose an engine from a database URL and open the mail store.

URLs:
  - C{sqlite:///mailgate.sqlite3}: a file relative to the working directory
  - C{sqlite:////var/lib/mailgate/mail.sqlite3}: an absolute path
  - C{sqlite:///:memory:}: a private in-memory database (tests, embedding)
  - C{postgresql://user:password@host:port/dbname}: PostgreSQL
"""

import os
from urllib.parse import urlsplit

from mailgate.errors import (
    ConfigurationError,
    DatabaseDamaged,
    DatabaseInUse,
    DatabaseRefused,
    TemporaryFailure,
    UnavailableAtStart,
)
from mailgate.store.database import Database, SynchronousDatabase
from mailgate.store.schema import LATEST, databaseVersion, upgrade
from mailgate.store.sql import SQLMailStore
from mailgate.urls import shownURL

DEFAULT_DATABASE = "sqlite:///mailgate.sqlite3"


def engineFromURL(url, readsOnly=False, writesNothing=False):
    """
    The engine a database URL names.

    @param readsOnly: whether what is done through it only reads: on
        PostgreSQL, a standby then serves it too.
    @param writesNothing: whether nothing at all is written through it,
        no migration either: an SQLite file is then opened read-only,
        changing nothing in it (not even its journal mode), and a file
        this process may only read is read.

    @raise ConfigurationError: for an unknown scheme or a malformed URL.
    """
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError as e:
        # Python's words for what it cannot split (an unclosed [ of an
        # IPv6 host): a mistyped URL, not an internal error.
        raise ConfigurationError(f"bad database URL {shownURL(url)!r}: {e}") from None
    if scheme == "sqlite":
        if not url.lower().startswith("sqlite:///"):
            raise ConfigurationError(
                f"bad SQLite URL {shownURL(url)!r}: use sqlite:///relative/path or sqlite:////absolute/path"
            )
        path = url[len("sqlite:///"):]
        if not path:
            raise ConfigurationError(f"bad SQLite URL {shownURL(url)!r}: no file name")
        from mailgate.store.sqlite import SQLiteEngine

        return SQLiteEngine(path, readOnly=writesNothing)
    if scheme in ("postgresql", "postgres"):
        try:
            from mailgate.store.postgres import PostgresEngine
        except ImportError as e:
            raise ConfigurationError(
                f"PostgreSQL support needs psycopg: pip install 'mailgate[postgres]' ({e})"
            ) from None
        return PostgresEngine(url, readsOnly=readsOnly)
    raise ConfigurationError(
        f"unsupported database URL {shownURL(url)!r}: use sqlite:///FILE or postgresql://..."
    )


def checkDatabaseURL(url):
    """
    Refuse, without connecting, a database URL a start would refuse
    before it could connect: an unknown scheme, a malformed URL, a value
    the database's client refuses only as it connects (L{IEngine.urlProblem}).

    @raise ConfigurationError: saying what is wrong, never the password.
    """
    engine = engineFromURL(url)
    problem = engine.urlProblem()
    if problem is not None:
        raise ConfigurationError(f"cannot connect to the database at {engine!r}: {problem}")


class NoSuchDatabase(ConfigurationError):
    """
    The SQLite file a database URL names does not exist, and was not to be
    created.
    """


def openSynchronousStore(url, migrate=True, create=True, adopt=None, readsOnly=False, readFirst=False):
    """
    A store whose operations run inline and return fired Deferreds: for the
    admin command and for tests.

    @param migrate: apply pending schema migrations first.
    @param create: create an SQLite file that does not exist yet.  Without,
        a missing file is an error: a mistyped path must not become an
        empty database that reads as one without users.
    @param adopt: install mailgate's tables in a database that holds
        another application's and none of mailgate's; by default as
        C{create}.  (C{db copy} creates its target, but must not fill
        another application's database a mistyped URL named.)
    @raise NoSuchDatabase: the file is missing and C{create} is false, or
        the database holds another application's tables and C{adopt} is.
    @param readsOnly: the store is only read from (see L{engineFromURL});
        a schema upgrade C{migrate} finds needed fails on a standby.  An
        SQLite file is opened read-only where nothing is to be migrated
        (L{_currentReadOnly}), to write only for a migration.
    @param readFirst: with C{migrate} false, open an SQLite file read-only
        whatever its schema (C{db backup}'s source: a backup it restores
        keeps its checksum), and to write, unmigrated, only where that is
        refused (a hot C{-journal} to roll back first).
    """
    if readFirst and not migrate and url.lower().startswith("sqlite:"):
        from mailgate.store.sqlite import ReadingRefused

        try:
            return openSynchronousStore(url, migrate=False, create=create, adopt=adopt, readsOnly=True)
        except ReadingRefused as refused:
            try:
                return openSynchronousStore(url, migrate=False, create=create, adopt=adopt)
            except ConfigurationError:
                # It only meant to read: why it may not (L{_currentReadOnly}).
                raise refused from None
    if adopt is None:
        adopt = create
    refused = None
    if readsOnly and migrate:
        current, refused = _currentReadOnly(url)
        if current is not None:
            return _synchronousStore(current, [])
    # A command that only reads and migrates nothing (db check, db
    # version) writes nothing: a backup it checks keeps its checksum.
    engine = engineFromURL(url, readsOnly=readsOnly, writesNothing=readsOnly and not migrate)
    if not create and _missingFile(engine):
        raise NoSuchDatabase(f"no such database file: {engine.path}{_absoluteMeant(engine.path)}")
    # Before a connection: SQLite opens a database its user may not write
    # read-only, making its -wal and -shm as the file is (0400), which
    # outlived the chmod 600 that set the file right.
    try:
        engine.refuseReadOnly()
        database = SynchronousDatabase(engine)
    except ConfigurationError:
        if refused is None:
            raise
        # A command that only reads, refused both openings: why it may
        # not read the file (whose it is, what to do), not why it may not
        # write it ("... to write to it"), which it did not mean to.
        raise refused from None
    applied = []
    try:
        if migrate:
            if not adopt:
                _refuseAnotherApplications(database, url)
            refuseUpgradeUnderServer(database)
            applied = upgrade(database)
    except BaseException:
        database.close()
        raise
    return _synchronousStore(database, applied)


def _synchronousStore(database, applied):
    engine = database.engine
    store = SQLMailStore(database, engine.makeLocks(database), reads=engine.makeMessageReads(database))
    # The migrations this opening applied (mailgate's commands log an
    # upgrade they made: mailgate.cli.audit.upgraded).
    store.migrationsApplied = applied
    return store


def _currentReadOnly(url):
    """
    The SQLite database at C{url} opened read-only, if its schema is this
    mailgate's (nothing to migrate): what a command that only reads (user
    list, mailbox show, who) works on.  Opened to write, it put a backup
    (rollback journal, as db backup leaves it) in WAL mode, changing its
    header and so its checksum, and it refused a file its user may only
    read (a snapshot, chmod 0400).  C{None} where the database needs a
    migration (or holds no mailgate schema), cannot be opened read-only,
    or is not an SQLite file: it is then opened as before, to write, and
    migrated (the command's upgrade is logged, and refused under a running
    server), or refused.  PostgreSQL is opened as before (its upgrade
    check writes nothing when there is nothing to migrate).

    @return: C{(database, refused)}: the database opened read-only, or
        C{None}; and, where SQLite's read-only opening was refused (the
        file, or its C{-shm}, one this user may not read; a C{-shm} that
        cannot be made), the L{mailgate.store.sqlite.ReadingRefused} that
        says why, which is what the command says if the opening to write
        is refused too: it only meant to read.
    @raise mailgate.errors.ConfigurationError: the schema is newer than
        this mailgate's, said as the opening to write says it.
    """
    if not url.lower().startswith("sqlite:"):
        return None, None
    from mailgate.store.sqlite import ReadingRefused

    engine = engineFromURL(url, readsOnly=True, writesNothing=True)
    if not engine.readOnly or _missingFile(engine):
        return None, None
    try:
        database = SynchronousDatabase(engine)
    except ReadingRefused as e:
        return None, e
    except (ConfigurationError, DatabaseDamaged):
        return None, None
    try:
        version = databaseVersion(database)
    except (ConfigurationError, DatabaseDamaged):
        version = None
    if version is None or version < LATEST:
        database.close()
        return None, None
    try:
        # Up to date (nothing applied), or newer: upgrade refuses it.
        upgrade(database)
    except BaseException:
        database.close()
        raise
    return database, None


def refuseUpgradeUnderServer(database):
    """
    Refuse to migrate an SQLite database a server runs on: what a
    command (C{mailgate deliver}, which the MTA runs for every message,
    included) asks before it upgrades the schema.

    A server running on a database that still needs migrations is of an
    older mailgate (a newer one migrated it as it started): the usual
    moment is just after a package upgrade, before the service restarts.
    Migrated under it, it would serve a schema it does not know, and a
    long migration (4 rewrites every message chunk) would hold SQLite's
    one write lock for minutes, its deliveries failing meanwhile.  The
    server's restart upgrades the database; until then the command
    fails as temporary (exit 75, which an MTA retries).

    The server is told by the lock it holds
    (L{mailgate.store.sqlite.SQLiteEngine.serverRunning}, as C{db
    restored} tells it), which is given back before the migration: a
    (newer) server starting meanwhile waits for the migration rather than
    being refused as a second server.

    PostgreSQL is left alone: its nodes take the schema's lock to migrate,
    and older nodes keep serving the migrated schema through a rolling
    upgrade (README, Schema upgrades).

    @raise DatabaseInUse: a server runs on the database, whose schema
        needs migrations.
    """
    engine = database.engine
    if engine.name != "sqlite" or engine.ephemeral:
        return
    version = databaseVersion(database)
    if not version or version >= LATEST:
        # None: a new database (no server made it); newer: upgrade's own
        # refusal says so.
        return
    if engine.serverRunning():
        raise DatabaseInUse(
            f"a mailgate server is running on {engine.path} (it holds {engine.path}.lock) with an older "
            f"database schema (version {version}, this mailgate's is {LATEST}): nothing was migrated; "
            f"restart it (its start upgrades the database), or stop it and run mailgate db upgrade"
        )


def _refuseAnotherApplications(database, url):
    """
    Refuse a database that holds tables and no mailgate schema: another
    application's, which a mistyped URL named.  What does not create a
    database must not install mailgate's tables beside someone else's, as
    it must not make a missing file.  (An empty one is made mailgate's,
    as one made beforehand for it is.)

    @raise NoSuchDatabase: naming the tables found.
    """
    if databaseVersion(database) is not None:
        return
    names = database.run(database.engine.tableNames)
    if not names:
        return
    engine = database.engine
    where = engine.path if engine.name == "sqlite" else shownURL(url)
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    raise NoSuchDatabase(
        f"no mailgate database in {where}: it holds another application's tables ({shown}) and none of mailgate's"
    )


def _absoluteMeant(path):
    """
    What to say of a missing SQLite file C{path} that is relative while
    the absolute path of the same name exists: C{sqlite:///var/lib/...},
    a slash short of C{sqlite:////var/lib/...}, names a file under the
    working directory.
    """
    if os.path.isabs(path) or path.startswith("file:") or not os.path.exists("/" + path):
        return ""
    return f" under {os.getcwd()}; sqlite:////{path}, with four slashes, names /{path}, which exists"


def _missingFile(engine):
    """
    Whether C{engine} is SQLite on a file that does not exist.
    """
    from mailgate.store.sqlite import SQLiteEngine

    return isinstance(engine, SQLiteEngine) and not engine.ephemeral and not os.path.exists(engine.path)


def openStore(url, reactor, server=True, metrics=None):
    """
    A store whose operations run on worker threads and reactor-driven
    connections, for the running gateway.

    The schema is brought up to date first, synchronously, so that a
    database that cannot be reached or upgraded stops start-up with a clear
    error instead of failing every session later: an
    L{UnavailableAtStart} when it may work later (the server down), a
    plain L{ConfigurationError} when it cannot (PostgreSQL refused the
    password, the role or the database name).

    @param reactor: the reactor everything below runs on: the database's
        worker threads hand their results to it, and PostgreSQL's maildrop
        lock connections are driven by it.
    @param server: claim the database for this server process where the
        engine requires one server per database (embedded SQLite).
    @param metrics: a L{mailgate.metrics.Metrics} the store reports its
        operations, errors, group commits and maildrop locks to.
    """
    engine = engineFromURL(url)
    if server:
        engine.claimServer()
    try:
        engine.refuseReadOnly()
        if not engine.ephemeral:
            upgrading = SynchronousDatabase(engine)
            try:
                applied = upgrade(upgrading)
            finally:
                upgrading.close()
        else:
            applied = []
        database = Database(engine, reactor, metrics=metrics)
    except (DatabaseRefused, DatabaseDamaged) as e:
        # Neither goes away by starting again: a start stopping with
        # EX_TEMPFAIL would have systemd start it again for ever.
        engine.releaseServer()
        raise ConfigurationError(str(e)) from e
    except TemporaryFailure as e:
        engine.releaseServer()
        raise UnavailableAtStart(str(e)) from e
    except BaseException:
        engine.releaseServer()
        raise
    store = SQLMailStore(database, engine.makeLocks(database), reads=engine.makeMessageReads(database))
    store.metrics = metrics
    #: the migrations this start applied (see L{schemaUpgradeNotice})
    store.migrationsApplied = applied
    return store


def schemaUpgradeNotice(applied):
    """
    What a start that applied migrations says in the log: the record, on
    the node that did it, of when nodes of an older mailgate stopped being
    able to start on the database (they refuse a newer schema), which a
    rolling upgrade of a cluster looks for.

    Nodes starting together on an older database take the migrations in
    turns (each is applied by the node that takes the schema's lock
    first, the others waiting), so a node may have applied some of them
    only: it names those, and says that others did the rest, rather than
    claim the whole range (probe: three nodes starting on a version-1
    database each logged "upgraded from version N to M" over ranges that
    overlapped).

    @param applied: the migrations applied, in order.
    @return: C{(event, format, fields)} for a log line, or C{None} if
        none was applied.
    """
    if not applied:
        return None
    versions = [migration.version for migration in applied]
    first, last = versions[0], versions[-1]
    fields = {"from_version": first - 1, "to_version": last}
    whole = versions == list(range(first, last + 1))
    if not whole:
        listed = ", ".join(map(str, versions[:-1])) + f" and {last}"
        return (
            "database.schema_upgraded",
            "database schema upgraded by this node and others starting at the same time ({which} "
            "applied by this one, the others by them): nodes of a mailgate older than this one no "
            "longer start on this database",
            dict(fields, which=f"migrations {listed}"),
        )
    if first == 1:
        return ("database.schema_upgraded", "database schema created (version {to_version})", fields)
    return (
        "database.schema_upgraded",
        "database schema upgraded from version {from_version} to {to_version} ({which} applied): "
        "nodes of a mailgate older than this one no longer start on this database",
        dict(fields, which=f"migration {last}" if first == last else f"migrations {first} to {last}"),
    )
