# -*- test-case-name: tests.test_cli -*-
"""
C{mailgate db ...}: the schema's version and upgrade, copying a database
to another, backing an SQLite database up while servers use it, and
readying a database restored by other means.
"""

import contextlib
import os

from mailgate.cli import audit
from mailgate.cli.common import (
    CommandError,
    EX_CANTCREAT,
    EX_CONFIG,
    EX_DATAERR,
    EX_TEMPFAIL,
    EX_USAGE,
    _number,
    _seconds,
)
from mailgate.errors import ConfigurationError, DatabaseInUse, DatabaseRefused, TemporaryFailure
from mailgate.store import engineFromURL, openSynchronousStore, refuseUpgradeUnderServer
from mailgate.store.check import TIMEOUT as CHECK_TIMEOUT
from mailgate.store.schema import LATEST, databaseVersion, upgrade
from mailgate.plural import counted, noun


#: The engines as the administrator knows them.
_ENGINE_NAMES = {"sqlite": "SQLite", "postgres": "PostgreSQL"}


def _dbUpgrade(store, args, out, stdin):
    database = store.database
    try:
        # Not under a running (older) server either: stopped first.
        refuseUpgradeUnderServer(database)
    except DatabaseInUse as e:
        raise CommandError(str(e), EX_TEMPFAIL) from None
    applied = upgrade(database)
    engine = database.engine.name
    for migration in applied:
        # A migration for the other engine only records the version: said,
        # or upgrading PostgreSQL printed "SQLite: message chunks in a
        # rowid table" as if that had been done to it.
        untouched = migration.dialects is not None and engine not in migration.dialects
        nothing = f" (nothing to change on {_ENGINE_NAMES[engine]})" if untouched else ""
        out.write(f"applied migration {migration.version}: {migration.description}{nothing}\n")
    out.write(f"schema is at version {LATEST}\n")
    versions = ", ".join(str(migration.version) for migration in applied)
    audit.outcome(
        args, f"applied {noun(len(applied), 'migration')} {versions}; schema is at version {LATEST}" if applied
        else f"nothing to apply; schema is at version {LATEST}"
    )


def _dbCopyOptions(args):
    """
    Both of C{db copy}'s URLs, read before either side is opened: a
    mistyped C{--to} was said only once C{--from} was open (on PostgreSQL,
    connected to).
    """
    for url, option in ((args.source, "--from"), (args.target, "--to")):
        try:
            engineFromURL(url)
        except ConfigurationError as e:
            raise CommandError(f"{option}: {e}", EX_CONFIG) from None


def _dbCopy(store, args, out, stdin):
    from mailgate.store.copy import CopyError, copyDatabase

    source = _copySide(args.source, "--from", create=False)
    try:
        created = _newSQLiteFile(args.target)
        target = _copySide(args.target, "--to", create=True)
        try:
            try:
                report = copyDatabase(source, target)
            except CopyError as e:
                raise CommandError(str(e), EX_CANTCREAT)
            finally:
                target.close()
        except BaseException as e:
            _remove(created)
            if isinstance(e, KeyboardInterrupt):
                # Before "interrupted": whether the target holds half a
                # copy, which the next copy into it would refuse.
                args.stderr.write("mailgate: nothing was copied (the copy is one transaction, undone)\n")
            raise
    finally:
        source.close()
    # The bodies and octets count those of the deleted messages kept for
    # recovery too: said, or the figures would not add up.
    kept = f" and {counted(report.kept, 'deleted message')} kept for recovery" if report.kept else ""
    out.write(
        f"copied {counted(report.users, 'user')} and {counted(report.messages, 'message')}{kept} "
        f"({counted(report.bodies, 'body', 'bodies')}, {counted(report.octets, 'octet')}); unique ids preserved\n"
    )
    if report.bans:
        out.write(f"copied {counted(report.bans, 'ban')} in force\n")
    if report.masterUsers:
        out.write(f"copied {counted(report.masterUsers, 'master user')}\n")
    bans = f" and {counted(report.bans, 'ban')}" if report.bans else ""
    audit.outcome(args, f"copied {counted(report.users, 'user')}, {counted(report.messages, 'message')}{kept}{bans}")


def _copyTarget(args):
    """
    C{db copy}'s target in its audit line: both databases, without their passwords.
    """
    from mailgate.urls import shownURL

    return f"--from {shownURL(args.source)} --to {shownURL(args.target)}"


def _newSQLiteFile(url):
    """
    The path of the SQLite file C{url} names if it does not exist yet (the
    copy creates it), else C{None}.
    """
    from mailgate.store.sqlite import SQLiteEngine

    try:
        engine = engineFromURL(url)
    except ConfigurationError:
        return None
    if isinstance(engine, SQLiteEngine) and not engine.ephemeral and not os.path.lexists(engine.path):
        return engine.path
    return None


def _remove(created):
    """
    Remove the SQLite file a copy that failed created (empty: the copy is
    one transaction), so that it is not taken for a copy.
    """
    from mailgate.store.sqlite import SIDE_FILES

    if created is None:
        return
    for name in (created, *(created + side for side in SIDE_FILES)):
        with contextlib.suppress(OSError):
            os.unlink(name)


def _copySide(url, option, create):
    """
    The store of one side of C{db copy}, or an error that says which side
    cannot be opened, as C{--database}'s would.
    """
    try:
        # Neither side may be another application's database (a mistyped
        # URL): the target's tables would be installed beside its own,
        # and every user's password hash and mail written there.
        return openSynchronousStore(url, create=create, adopt=False)
    except DatabaseRefused as e:
        raise CommandError(f"{option}: {e}", EX_CONFIG) from None
    except DatabaseInUse as e:
        raise CommandError(f"{option}: {e}", EX_TEMPFAIL) from None
    except TemporaryFailure as e:
        raise CommandError(f"{option}: temporary failure, try again: {e}", EX_TEMPFAIL) from None
    except ConfigurationError as e:
        raise CommandError(f"{option}: {e}", EX_CONFIG) from None


def _dbVersion(store, args, out, stdin):
    # Read without writing: on a database that is not mailgate's (a
    # mistaken --database), the table of versions is not created.
    version = databaseVersion(store.database) or 0
    if version > LATEST:
        said = "; newer than this mailgate: upgrade mailgate"
    elif 0 < version < LATEST:
        # Asked after installing a newer mailgate, before its first start:
        # whatever runs next upgrades it, the MTA's mailgate deliver too,
        # and the older mailgate no longer opens it (take the backup now).
        said = (
            "; older: this mailgate's next start or command (db backup and db version aside; on SQLite, "
            "none while a server runs on it) upgrades it, after which an older mailgate refuses it"
        )
    else:
        said = ""
    out.write(f"schema version {version} (this mailgate: {LATEST}){said}\n")


def _dbBackupOptions(args):
    """
    C{db backup}'s database and C{FILE}, checked before the database is
    opened: a PostgreSQL database (a usage error, said once connected
    before), a C{FILE} there already.
    """
    from mailgate.store.sqlite import SQLiteEngine

    try:
        engine = engineFromURL(args.databaseURL)
    except ConfigurationError:
        return  # said as the database is opened
    if not isinstance(engine, SQLiteEngine) or engine.path == ":memory:":
        raise CommandError(
            "db backup copies an SQLite database; back PostgreSQL up with its own tools "
            "(pg_dump, or pg_basebackup and WAL archiving)",
            EX_USAGE,
        )
    if os.path.lexists(args.file):
        # As backupDatabase refuses it.
        raise CommandError(f"{args.file} exists: a backup goes into a new file", EX_CANTCREAT)


def _dbBackup(store, args, out, stdin):
    from mailgate.store.backup import backupDatabase

    engine = store.engine
    try:
        size = backupDatabase(engine, args.file)
    except DatabaseInUse as e:
        # A restore into the name of a database whose server still runs.
        raise CommandError(str(e), EX_TEMPFAIL) from None
    except ConfigurationError as e:
        raise CommandError(str(e), EX_CANTCREAT) from None
    out.write(f"backed up {engine.path} to {args.file} ({counted(size, 'octet')})\n")
    audit.outcome(args, f"backed up to {args.file} ({counted(size, 'octet')})")


def _dbRestored(store, args, out, stdin):
    from mailgate.store.backup import readyRestoredDatabase

    try:
        report = readyRestoredDatabase(store.database)
    except DatabaseInUse as e:
        raise CommandError(str(e), EX_TEMPFAIL) from None
    stamps = "a new validity stamp" if report.maildrops == 1 else "new validity stamps"
    said = (
        f"gave {counted(report.maildrops, 'maildrop')} {stamps}; forgot {counted(report.nodes, 'node')} "
        f"and {counted(report.sessions, 'POP3 session')} of the servers that ran when the backup was taken"
    )
    out.write(f"{said}\n")
    audit.outcome(args, said)


#: the longest C{db check --timeout}: a week (PostgreSQL's statement_timeout
#: stops at 24 days)
CHECK_TIMEOUT_MAX = 7 * 24 * 3600


def _checkTimeout(text):
    """
    C{db check --timeout}: seconds, or C{None} for 0 (no limit).
    """
    seconds = _number(text, _seconds, "--timeout")
    if seconds > CHECK_TIMEOUT_MAX:
        raise CommandError(f"bad --timeout: at most {CHECK_TIMEOUT_MAX} seconds (0: no limit)", EX_USAGE)
    return seconds or None


def _dbCheckOptions(args):
    args.timeout = _checkTimeout(args.timeout)


def _dbCheck(store, args, out, stdin):
    from mailgate.address import normalizeAddress
    from mailgate.auth.passwords import hashProblem
    from mailgate.errors import DatabaseDamaged
    from mailgate.store.check import CheckTooLong, Finding, checkDatabase

    timeout = args.timeout
    database = store.database
    engine = database.engine
    try:
        # None: no table of versions (an empty file, or another
        # application's database).
        version = databaseVersion(database) or 0
    except DatabaseDamaged as e:
        version = e
    if version == 0:
        raise CommandError(f"no mailgate database in {engine!r}: it holds no mailgate tables", EX_CONFIG)
    if isinstance(version, int) and version > LATEST:
        raise CommandError(
            f"database schema version {version} is newer than this mailgate supports ({LATEST}); upgrade mailgate",
            EX_CONFIG,
        )
    try:
        findings = checkDatabase(
            database,
            full=args.full,
            invariants=version == LATEST,
            timeout=timeout,
            addressForm=normalizeAddress,
            hashProblem=hashProblem,
        )
    except CheckTooLong as e:
        raise CommandError(
            f"{engine!r}: the check of {e.name} did not end within {counted(e.timeout, 'second', spec='g')}: "
            f"give it longer with --timeout SECONDS (0: no limit)",
            EX_TEMPFAIL,
        ) from None
    if isinstance(version, DatabaseDamaged):
        findings.append(Finding("mailgate's schema version", damaged=str(version)))
    elif version != LATEST:
        # Older: checked against what this mailgate's tables are, columns
        # it has not been given yet would be taken for damage.
        out.write(
            f"mailgate's invariants: not checked (schema version {version}; this mailgate checks those "
            f"of version {LATEST}: its next command or start upgrades the database)\n"
        )
    if engine.name != "sqlite":
        out.write("PostgreSQL's own pages: not checked here (pg_amcheck checks its tables and indexes)\n")
    for finding in findings:
        for line in finding.lines():
            out.write(f"{line}\n")
    wrong = [finding.name for finding in findings if not finding.sound]
    if wrong:
        raise CommandError(f"{engine!r}: {counted(len(wrong), 'check')} found problems: {', '.join(wrong)}", EX_DATAERR)
    out.write(f"{engine!r}: sound ({counted(len(findings), 'check')})\n")


def _addDatabaseCommands(commands):
    """
    C{mailgate db ...}: database maintenance.
    """
    db = commands.add_parser("db", help="database maintenance").add_subparsers(
        dest="action", metavar="ACTION"
    )
    db.required = True
    dbUpgrade = db.add_parser(
        "upgrade",
        help="apply pending schema migrations",
        description="Bring the database's schema up to this mailgate's version, creating an "
        "SQLite file that is not there yet (servers and the other commands migrate too; run it "
        "as the schema's owner where the nodes' role may only read and write the tables).  "
        "Each migration is one transaction: one interrupted leaves the version before.  "
        "On SQLite, refused (exit 75), as every command's migration is, while a server runs "
        "on the database: stop it first, or restart it (its start upgrades the database).",
    )
    dbUpgrade.set_defaults(
        run=_dbUpgrade, migrate=False, create=True, audit=audit.Audited("db upgrade", audit.database)
    )
    dbVersion = db.add_parser(
        "version",
        help="show the schema version",
        description="Show the database's schema version and the newest this mailgate knows, "
        "without changing either: a mailgate older than its database refuses it.",
    )
    dbVersion.set_defaults(run=_dbVersion, migrate=False, readsOnly=True)
    dbCopy = db.add_parser(
        "copy",
        help="copy users and maildrops to another (empty) database, keeping unique ids",
        description="Copy every user and maildrop from one database to another, "
        "e.g. from SQLite to PostgreSQL, preserving message numbers and unique ids. "
        "Stop the servers using either database first.",
    )
    dbCopy.add_argument("--from", dest="source", required=True, metavar="URL", help="the database to copy")
    dbCopy.add_argument("--to", dest="target", required=True, metavar="URL", help="an empty database to copy into")
    dbCopy.set_defaults(
        run=_dbCopy, migrate=False, store=False, readOptions=_dbCopyOptions, audit=audit.Audited("db copy", _copyTarget)
    )
    dbBackup = db.add_parser(
        "backup",
        help="copy the SQLite database into a new file while servers use it",
        description="Copy the SQLite database into FILE (a new file, readable by its owner "
        "only) as one consistent snapshot, while servers go on serving and taking mail in: "
        "the backup to restore (servers stopped) after a lost disk or before an upgrade.  "
        "PostgreSQL has its own tools (pg_dump).",
    )
    dbBackup.add_argument("file", metavar="FILE")
    # The database is only read, as db check reads it: a backup restored
    # with db backup (README, Backups) keeps its checksum and rollback
    # journal, where the opening to write put it in WAL mode.  Opened to
    # write only where it must be (a hot -journal rolled back first).
    dbBackup.set_defaults(
        run=_dbBackup,
        migrate=False,
        readFirst=True,
        readOptions=_dbBackupOptions,
        audit=audit.Audited("db backup", audit.database),
    )
    dbRestored = db.add_parser(
        "restored",
        help="ready a database just restored from a backup taken by other means (pg_dump, a snapshot)",
        description="Run once a database has been restored from a backup that db backup did not make "
        "(pg_dump or pg_basebackup, a filesystem snapshot, a copied SQLite file), before any server "
        "starts on it: in one transaction, every maildrop gets a new validity stamp, so that new "
        "mail gets no unique id the lost database gave after the backup, and the nodes and POP3 "
        "sessions of the servers that ran when the backup was taken are forgotten.  Refused "
        "(exit 75) while a server runs on the database.",
    )
    dbRestored.set_defaults(run=_dbRestored, migrate=True, audit=audit.Audited("db restored", audit.database))
    dbCheck = db.add_parser(
        "check",
        help="check that the database is sound, changing nothing",
        description="Check the database without changing it (nothing repaired, nothing migrated), "
        "beside running servers: on SQLite, every page of the file (SQLite's quick_check; "
        "integrity_check with --full); then, on SQLite and PostgreSQL, mailgate's own invariants "
        "(every message has its user and its body, every body its chunks and as many references "
        "as messages hold it, each maildrop's recorded use and next unique id).  Each check is a "
        "read-only transaction: a database role granted SELECT alone runs it.  Exit 0 when sound; "
        "65 when a check found problems, each named on standard output with what to do; 75 when "
        "a check did not end within --timeout.",
    )
    dbCheck.add_argument(
        "--full", action="store_true",
        help="SQLite's integrity_check, which also compares every index with its table (slower)",
    )
    dbCheck.add_argument(
        "--timeout", default=str(CHECK_TIMEOUT), metavar="SECONDS",
        help=f"how long each check may take on PostgreSQL, in place of the 60 seconds a server's "
        f"statements have (default {CHECK_TIMEOUT}; 0: no limit)",
    )
    dbCheck.set_defaults(run=_dbCheck, migrate=False, readOptions=_dbCheckOptions, readsOnly=True)
