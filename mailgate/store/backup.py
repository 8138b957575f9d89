# -*- test-case-name: tests.test_cli_database -*-
"""
Backups and restores of a mail database: C{mailgate db backup} copies an
SQLite database into a new file while servers use it; C{mailgate db
restored} readies a database just restored by other means (PostgreSQL's
C{pg_dump} or C{pg_basebackup}, a filesystem snapshot, a copied file).

A restore takes more back than the mail: the maildrops' unique id
counters, set back to the backup while clients keep the ids given since,
and the nodes and POP3 sessions of the servers that ran when the backup
was taken, processes rather than data.  Both commands undo these with
the same statements (L{_renewValidityStamps}, L{_forgetRunningServers}):
C{db backup} on its copy, C{db restored} on the database itself.
"""

import contextlib
import errno
import os
import sqlite3
import tempfile
import time

import attr

from mailgate.errors import ConfigurationError, DatabaseInUse
from mailgate.store.registry import STALE_AFTER, _nodes


def backupDatabase(engine, target):
    """
    Copy the database of C{engine} (an L{SQLiteEngine}) into the new file
    C{target}, while servers use it: SQLite's online backup, in one step,
    so the copy is the database as one read transaction saw it (in WAL
    mode a read holds no writer up, and no write restarts the copy).  The
    copy is one self-contained file (rollback journal mode), readable by
    its owner only, synced, and checked (C{quick_check}).  Its maildrops
    get new validity stamps (L{_renewValidityStamps}), so that mail
    delivered after a restore gets no unique id given out since the backup,
    and it holds no node or POP3 session of the servers running then.

    The copy is made under a name of its own beside C{target}
    (C{TARGET.XXXXXXXX.partial}) and given C{target}'s name only once it
    is whole, synced and checked: a backup killed on the way (kill -9, a
    power cut, a full disk) never leaves a file under the name a restore
    would take, which would look like a backup and hold part of one (or,
    opened with the journal left beside it, an empty database that checks
    "ok").  What such a run leaves says it is partial.

    @return: the copy's size in octets.
    @raise ConfigurationError: C{target} exists (or is a link), cannot be
        written, or the copy is not sound.
    @raise DatabaseInUse: a server still runs on the database that had
        C{target}'s name (L{_refuseUnderServer}).
    """
    if os.path.lexists(target):
        raise ConfigurationError(f"{target} exists: a backup goes into a new file")
    _refuseLeftovers(target)
    _refuseUnderServer(target)
    directory, name = os.path.split(os.path.abspath(target))
    try:
        # O_EXCL, mode 0600 whatever the umask.
        fd, staged = tempfile.mkstemp(prefix=name + ".", suffix=".partial", dir=directory)
    except OSError as e:
        raise ConfigurationError(f"cannot create {target}: {e.strerror}") from None
    os.close(fd)
    try:
        source = engine.connect()
        try:
            copy = sqlite3.connect(staged)
            try:
                source.backup(copy)
                copy.execute("PRAGMA journal_mode = DELETE")
                _readyForRestore(copy)
                verdict = copy.execute("PRAGMA quick_check").fetchone()[0]
            finally:
                copy.close()
        finally:
            source.close()
        if verdict != "ok":
            # quick_check's lines, the first few of possibly a hundred.
            problems = "; ".join(line for line in verdict.splitlines() if line and not line.startswith("***"))
            raise ConfigurationError(
                f"the copy does not check, the database {engine.path} is damaged: "
                f"{problems[:300]} (restore it from an earlier backup)"
            )
        _syncFile(staged)
        _publish(staged, target)
        _syncFile(directory)
        return os.stat(target).st_size
    except sqlite3.Error as e:
        raise ConfigurationError(f"cannot back up {engine.path} to {target}: {e}") from None
    except OSError as e:
        raise ConfigurationError(f"cannot back up {engine.path} to {target}: {e.strerror}") from None
    finally:
        for leftover in (staged, staged + "-journal"):
            with contextlib.suppress(OSError):
                os.unlink(leftover)


def _refuseLeftovers(target):
    """
    Refuse a C{target} beside which the files SQLite keeps next to a
    database (C{-wal}, C{-shm}, C{-journal}) are still there: those of
    the database that had the name before, moved aside without them (a
    restore, after a crash left its log unmerged).  SQLite takes them for
    the copy's own at its first opening, and applied that database's
    last writes over the restored copy (probe: 40 messages delivered after
    the backup, and the validity stamps it gave, back in the restored
    database; from a database of another history, pages of both mixed,
    a damaged file).
    """
    from mailgate.store.sqlite import SIDE_FILES

    for side in SIDE_FILES:
        if os.path.lexists(target + side):
            raise ConfigurationError(
                f"{target + side} exists: it is of the database that was {target}, and SQLite would "
                f"apply it to the copy: move it aside with that database (or remove it)"
            )


def _refuseUnderServer(target):
    """
    Refuse a restore into C{target} while a server still runs on the
    database that had the name, moved aside but not stopped: it holds
    C{TARGET.lock} and goes on serving, and taking mail into, the moved
    file, while the commands (and its next start) use the copy: what it
    accepted meanwhile was lost from view (a message delivered by LMTP
    after such a restore was in the moved file only).
    """
    from mailgate.store.sqlite import SQLiteEngine

    if SQLiteEngine(target).serverRunning():
        raise DatabaseInUse(
            f"a mailgate server is running on {target} (it holds {target}.lock), serving the database moved "
            "aside: stop it first, then restore"
        )


def _readyForRestore(copy):
    """
    Give the backup C{copy} (an open connection) what restoring it needs
    (L{_renewValidityStamps}, L{_forgetRunningServers}), in one
    transaction.  A database of a schema too old to have the tables keeps
    what it has: its upgrade, at the restore, makes them empty.
    """
    cursor = copy.cursor()
    cursor.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name IN ('mailboxes', 'mailgate_nodes')")
    tables = {name for (name,) in cursor.fetchall()}
    if "mailboxes" in tables:
        _renewValidityStamps(cursor, "sqlite")
    if "mailgate_nodes" in tables:
        _forgetRunningServers(cursor)
    copy.commit()


#: An SQL term of a random whole number from 0 to 2**31 - 2, by dialect
#: (L{mailgate.interfaces.IEngine.name}): SQLite's random() is a 64-bit
#: integer, PostgreSQL's a float below 1.
_RANDOM_STEP = {
    "sqlite": "(random() & 2147483647) % 2147483647",
    "postgres": "floor(random() * 2147483647)::bigint",
}


def _renewValidityStamps(cursor, dialect):
    """
    Give every maildrop a new validity stamp, the second half of the
    unique ids it gives from then on (L{mailgate.store.rows.formatUniqueId});
    its messages keep theirs, stored with them.

    Restoring a backup sets the unique id counters back to the backup,
    while clients that leave mail on the server keep the ids the live
    database gave since, to mail lost with it: were new mail given those
    ids again, such a client would take it for mail it has and never
    download it (RFC 1939 has a unique id never reused in a maildrop).
    Under a new stamp no id after a restore can be one given after the
    backup.  Each backup (and so each restore made with C{db backup} from
    a backup, as README says) draws new stamps, and so does each C{db
    restored}.

    @param cursor: a cursor in the transaction to do it in.
    @param dialect: the engine's L{name<mailgate.interfaces.IEngine.name>}.
    """
    # Stamps are 31 bits (as L{mailgate.store.sql} draws them): each is
    # moved by a random 1 to 2**31 - 1, so never to itself; in one
    # statement, whatever the number of users.
    cursor.execute(
        f"UPDATE mailboxes SET uid_validity = (uid_validity + 1 + {_RANDOM_STEP[dialect]}) % 2147483648"
    )


def _forgetRunningServers(cursor):
    """
    Remove the nodes that served the database when its backup was taken,
    and their POP3 sessions: processes, not data.  Restored soon after,
    the database would otherwise show them as running (C{mailgate who},
    C{nodes}, a C{kick} waiting for a session nobody has) for as long as
    a killed node counts, beside the server that serves it.

    @param cursor: a cursor in the transaction to do it in.
    @return: how many nodes and sessions were removed.
    """
    cursor.execute("SELECT (SELECT count(*) FROM mailgate_nodes), (SELECT count(*) FROM pop3_sessions)")
    nodes, sessions = cursor.fetchone()
    cursor.execute("DELETE FROM pop3_sessions")
    cursor.execute("DELETE FROM mailgate_nodes")
    return nodes, sessions


@attr.s(frozen=True)
class RestoreReport:
    """
    What L{readyRestoredDatabase} did.

    @ivar maildrops: the maildrops given new validity stamps.
    @ivar nodes: the nodes forgotten (none running).
    @ivar sessions: their POP3 sessions forgotten.
    """

    maildrops = attr.ib()
    nodes = attr.ib()
    sessions = attr.ib()


def readyRestoredDatabase(database):
    """
    Ready a database just restored from a backup taken by other means than
    C{db backup} (C{pg_dump}, C{pg_basebackup}, a filesystem snapshot, a
    copied SQLite file) as C{db backup} readies its copies, before any
    server starts on it: in one transaction, every maildrop gets a new
    validity stamp (L{_renewValidityStamps}) and the nodes and sessions
    of the servers that ran when the backup was taken are forgotten
    (L{_forgetRunningServers}).

    Refused while a server runs on the database: its POP3 sessions have
    listed unique ids, and its deliveries give them, under the stamps
    there were.  On SQLite, one server serves the file and holds its lock
    file (L{mailgate.store.sqlite.SQLiteEngine.claimServer}), which is
    held here for the transaction, so that none starts meanwhile; node
    rows with a recent heartbeat are the restored file's, not a server's.
    On PostgreSQL, a node is running if its heartbeat is recent, as
    C{mailgate nodes} tells (L{STALE_AFTER}); the table of nodes is locked
    for the transaction, so that none writes its first heartbeat (nor a
    session) meanwhile: one starting waits for the commit, and finds the
    new stamps.

    @param database: the L{SynchronousDatabase
        <mailgate.store.database.SynchronousDatabase>} of a synchronous
        store (the admin command's).
    @return: a L{RestoreReport}.
    @raise DatabaseInUse: a server runs on the database.
    """
    engine = database.engine
    if engine.name == "sqlite":
        try:
            engine.claimServer()
        except DatabaseInUse:
            raise DatabaseInUse(
                f"a mailgate server is running on {engine.path} (it holds {engine.path}.lock): stop it first"
            ) from None
        try:
            return database.run(_readyRestored, engine.name, None, write=True)
        finally:
            engine.releaseServer()
    return database.run(_readyRestored, engine.name, time.time() - STALE_AFTER, write=True)


def _readyRestored(cursor, dialect, aliveSince):
    """
    L{readyRestoredDatabase}'s transaction; C{aliveSince}: the time after
    which a heartbeat shows a node running, or C{None} not to ask (SQLite:
    the lock file tells).
    """
    if aliveSince is not None:
        cursor.execute("LOCK TABLE mailgate_nodes IN SHARE ROW EXCLUSIVE MODE")
        running = _nodes(cursor, aliveSince)
        if running:
            names = ", ".join(node.name for node in running)
            raise DatabaseInUse(
                f"a mailgate server is running on this database (node {names}, its heartbeat less than "
                f"{STALE_AFTER} seconds old): stop every node first (a node copied with a backup taken "
                f"less than {STALE_AFTER} seconds ago counts as running until then)"
            )
    cursor.execute("SELECT count(*) FROM mailboxes")
    (maildrops,) = cursor.fetchone()
    _renewValidityStamps(cursor, dialect)
    nodes, sessions = _forgetRunningServers(cursor)
    return RestoreReport(maildrops, nodes, sessions)

def _syncFile(path):
    """
    fsync C{path}, a file or a directory (whose entries a rename or a link
    changed).
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(staged, target):
    """
    Give the finished copy C{staged} the name C{target}, never replacing a
    file that has it: a hard link fails where the name exists (another
    backup to the same name finished first).  On a filesystem without hard
    links, a rename after a last look.
    """
    _refuseLeftovers(target)
    try:
        os.link(staged, target)
    except FileExistsError:
        raise ConfigurationError(f"{target} exists: a backup goes into a new file") from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        if os.path.lexists(target):
            raise ConfigurationError(f"{target} exists: a backup goes into a new file") from None
        os.rename(staged, target)


