# -*- test-case-name: tests.test_cli -*-
"""
C{mailgate db ...}: the schema's version and upgrade, copying a database
to another, backing an SQLite database up while servers use it, and
readying a database restored by other means.
"""

import contextlib
import os

from mailgate.cli.common import CommandError, EX_CANTCREAT, EX_CONFIG, EX_TEMPFAIL, EX_USAGE
from mailgate.errors import ConfigurationError, DatabaseInUse, DatabaseRefused, TemporaryFailure
from mailgate.store import engineFromURL, openSynchronousStore
from mailgate.store.schema import LATEST, databaseVersion, upgrade
from mailgate.plural import counted


def _dbUpgrade(store, args, out, stdin):
    database = store.database
    applied = upgrade(database)
    for migration in applied:
        out.write(f"applied migration {migration.version}: {migration.description}\n")
    out.write(f"schema is at version {LATEST}\n")


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
        except BaseException:
            _remove(created)
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
    except TemporaryFailure as e:
        raise CommandError(f"{option}: temporary failure, try again: {e}", EX_TEMPFAIL) from None
    except ConfigurationError as e:
        raise CommandError(f"{option}: {e}", EX_CONFIG) from None


def _dbVersion(store, args, out, stdin):
    # Read without writing: on a database that is not mailgate's (a
    # mistaken --database), the table of versions is not created.
    version = databaseVersion(store.database) or 0
    newer = "; newer than this mailgate: upgrade mailgate" if version > LATEST else ""
    out.write(f"schema version {version} (this mailgate: {LATEST}){newer}\n")


def _dbBackup(store, args, out, stdin):
    from mailgate.store.backup import backupDatabase
    from mailgate.store.sqlite import SQLiteEngine

    engine = store.engine
    if not isinstance(engine, SQLiteEngine) or engine.path == ":memory:":
        raise CommandError(
            "db backup copies an SQLite database; back PostgreSQL up with its own tools "
            "(pg_dump, or pg_basebackup and WAL archiving)",
            EX_USAGE,
        )
    try:
        size = backupDatabase(engine, args.file)
    except ConfigurationError as e:
        raise CommandError(str(e), EX_CANTCREAT) from None
    out.write(f"backed up {engine.path} to {args.file} ({counted(size, 'octet')})\n")


def _dbRestored(store, args, out, stdin):
    from mailgate.store.backup import readyRestoredDatabase

    try:
        report = readyRestoredDatabase(store.database)
    except DatabaseInUse as e:
        raise CommandError(str(e), EX_TEMPFAIL) from None
    stamps = "a new validity stamp" if report.maildrops == 1 else "new validity stamps"
    out.write(
        f"gave {counted(report.maildrops, 'maildrop')} {stamps}; forgot {counted(report.nodes, 'node')} "
        f"and {counted(report.sessions, 'POP3 session')} of the servers that ran when the backup was taken\n"
    )
