# -*- test-case-name: tests.test_store -*-
"""
The embedded SQLite engine: zero set-up, one file, one writer.

Durability: WAL journal with C{synchronous=FULL}, so a transaction that has
committed (a delivery acknowledged with 250, a POP3 deletion acknowledged
with +OK) survives a power cut, not only a process crash.

Privacy: the database holds every message and the password hashes, so its
file is created readable and writable by its owner only (0600), whatever
the umask; SQLite gives the -wal and -shm files it makes beside it the
database file's mode, and the server's lock file is made the same way.
"""

import contextlib
import errno
import fcntl
import os
import pwd
import sqlite3
import stat
import struct
import time
from urllib.parse import quote

from twisted.internet import defer
from zope.interface import implementer

from mailgate.errors import ConfigurationError, DatabaseInUse, MaildropInUse, StorageFull, TemporaryFailure
from mailgate.interfaces import IEngine, IMaildropLocks
from mailgate.owners import permissionsOf
from mailgate.store.reads import ThreadedMessageReads
from mailgate.store.schema import upgradeConnection
from mailgate.store.snapshot import readSnapshot, snapshotQuery

BUSY_TIMEOUT_MS = 10000
FILE_MODE = 0o600

# SQLite's primary result codes (an extended code's low eight bits).
SQLITE_IOERR = 10
SQLITE_FULL = 13
SQLITE_CANTOPEN = 14
SQLITE_BUSY = 5
SQLITE_READONLY = 8


#: Free octets below which a filesystem counts as full: less than SQLite
#: needs to make the shared-memory file (C{-shm}) of a WAL database.
NO_ROOM = 64 * 1024


def noRoomIn(directory):
    """
    Whether the filesystem of C{directory} has (next to) no room left for
    this process (root's reserved blocks not counted).
    """
    try:
        found = os.statvfs(directory)
    except OSError:
        return False
    return found.f_bavail * found.f_frsize < NO_ROOM


def outOfDescriptors():
    """
    Whether this process can open no more files: its open file limit
    reached (C{EMFILE}: C{ulimit -n}, systemd's C{LimitNOFILE}) or the
    system's (C{ENFILE}).  SQLite says only "unable to open database file"
    then, as for a file it may not open.
    """
    try:
        fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        return e.errno in (errno.EMFILE, errno.ENFILE)
    os.close(fd)
    return False


def _primaryCode(exc):
    """
    The primary result code of the C{sqlite3.Error} C{exc}, or C{None}
    (an error raised by the module itself, not by SQLite).
    """
    code = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF


def _switchToWAL(conn):
    """
    Put C{conn}'s file in WAL mode (a no-op once it is) and return the mode
    SQLite reports.  The first connections to a new file race to switch it,
    and SQLite answers the losers C{SQLITE_BUSY} at once, without waiting
    in its busy handler: a worker thread's first connection then failed
    with "database is locked", which was reported as a configuration
    error.  The switch is tried again, for the busy timeout at most.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    pause = 0.001
    while True:
        try:
            return conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        except sqlite3.OperationalError as e:
            if _primaryCode(e) != SQLITE_BUSY or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(2 * pause, 0.05)


def createPrivately(path):
    """
    Create C{path} (empty) readable and writable by its owner only, unless
    it exists.  The mode is set explicitly, so neither a permissive umask
    nor SQLite's default (0644) applies.  Where it cannot be created,
    SQLite's own attempt reports why.

    An empty file that exists already (made with C{touch}, or by a
    package's post-install script, under the umask) holds no mail yet: it
    is narrowed the same way before mailgate writes any.
    """
    if path == ":memory:" or path.startswith("file:"):
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        try:
            if os.stat(path).st_size == 0:
                os.chmod(path, FILE_MODE)
        except OSError:
            pass
        return
    except OSError:
        return
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)


def _readOnlyURI(path):
    """
    The URI that opens the SQLite file C{path} read-only (C{mode=ro}):
    nothing in it is written, its journal mode included, and a file this
    process may only read (a snapshot, chmod 0400, another user's) is
    read.  Not C{immutable=1}: a server may be writing the file meanwhile
    (WAL), whose latest commits are in its C{-wal}, which a read-only
    connection reads through the C{-shm} as any other (SQLite 3.22 and
    later read a WAL database whose C{-shm} they may not write, and make
    the C{-shm} where there is none and they may).
    """
    return "file:" + quote(os.path.abspath(path), safe="/") + "?mode=ro"


#: the first octets of a rollback journal that holds a write to undo
_JOURNAL_MAGIC = bytes.fromhex("d9d505f920a163d7")


def _hotJournal(path):
    """
    Whether the C{-journal} beside the database at C{path} holds a write
    that was cut short (a process killed in a transaction of a database
    in rollback-journal mode, as a backup is): its header's magic number,
    which a committed transaction's journal loses (deleted, truncated or
    zeroed).  The database file then holds pages of the interrupted
    write, which SQLite rolls back at the next opening that may write.
    """
    try:
        with open(path + "-journal", "rb") as f:
            return f.read(len(_JOURNAL_MAGIC)) == _JOURNAL_MAGIC
    except OSError:
        return False


#: the files SQLite keeps beside the database, holding its latest writes
SIDE_FILES = ("-wal", "-shm", "-journal")


def narrowSideFiles(path):
    """
    Give the files SQLite keeps beside the database (L{SIDE_FILES}) no
    permission the database file lacks.  SQLite gives those it creates
    the database's mode, but leaves one that exists as it is: made while
    the database was wider (before a C{chmod 600} of it, as the start-up
    warning asks), and left by a crash or by a process still using the
    database, it would keep the latest mail readable by others for as
    long as it lives.

    The files are looked at without opening them for reading or writing
    (C{O_PATH}): closing any descriptor of a file drops every POSIX lock
    the process holds on it, SQLite's own included.  A server opening a
    connection (a worker thread's first) dropped its other connections'
    lock on C{-shm}; the next process to open the database (the admin
    command) then took itself for the only one, emptied C{-shm}, and the
    server died of SIGBUS at its next commit.
    """
    if path == ":memory:" or path.startswith("file:"):
        return
    try:
        # Only what others may do is taken: a database its owner may not
        # write (chmod 400, refused) left its -shm 0400 after the chmod
        # 600 that set it right, and every command was refused for it.
        allowed = stat.S_IMODE(os.stat(path).st_mode) | stat.S_IRWXU
    except OSError:
        return
    for suffix in SIDE_FILES:
        _narrow(path + suffix, allowed)


#: open a file as a name only: its descriptor's close drops no lock
_PATH_ONLY = getattr(os, "O_PATH", None)


def ownerWrites(path):
    """
    Give the C{-wal} and C{-shm} of the database at C{path} its owner's
    read and write where they are the owner's.  SQLite gives those it
    makes the file's mode: a read-only opening of a WAL database chmod
    0400 (its owner's, or root's for him) made them 0400, and once the
    file was made 0600 again every command was refused for its -wal.
    Looked at by name only (C{O_PATH}, as L{_narrow}): closing a
    descriptor of C{-shm} dropped this process's own SQLite locks on it.
    """
    if _PATH_ONLY is None:
        return
    try:
        owner = os.stat(path).st_uid
    except OSError:
        return
    for suffix in ("-wal", "-shm"):
        try:
            fd = os.open(path + suffix, _PATH_ONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            found = os.fstat(fd)
            lacking = stat.S_IRUSR | stat.S_IWUSR
            if stat.S_ISREG(found.st_mode) and found.st_uid == owner and found.st_mode & lacking != lacking:
                os.chmod(f"/proc/self/fd/{fd}", stat.S_IMODE(found.st_mode) | lacking)
        except OSError:
            pass
        finally:
            os.close(fd)


def _narrow(side, allowed):
    """
    Take from C{side}, a regular file, the permissions not in C{allowed}.
    """
    if _PATH_ONLY is None:
        # No O_PATH: by name, never through a descriptor.
        try:
            found = os.lstat(side)
            if stat.S_ISREG(found.st_mode) and stat.S_IMODE(found.st_mode) & ~allowed:
                os.chmod(side, stat.S_IMODE(found.st_mode) & allowed)
        except OSError:
            pass
        return
    try:
        fd = os.open(side, _PATH_ONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    try:
        found = os.fstat(fd)
        if stat.S_ISREG(found.st_mode) and stat.S_IMODE(found.st_mode) & ~allowed:
            # fchmod refuses an O_PATH descriptor; its /proc name does not.
            os.chmod(f"/proc/self/fd/{fd}", stat.S_IMODE(found.st_mode) & allowed)
    except OSError:
        pass
    finally:
        os.close(fd)


#: os.access as the file system checks it: by the effective user
_EFFECTIVE = {"effective_ids": True} if os.access in os.supports_effective_ids else {}


def _deniedToUs(name):
    """
    Whether the file C{name} is there and this process may not read and
    write it.  SQLite removes a database's C{-wal} and C{-shm} when the
    last connection to it closes, in whichever process that is, and another
    makes them again as it opens one: a file seen there and gone when its
    access is checked (another C{mailgate deliver} of an MTA's just ended)
    is no refusal.  Before, it refused the delivery ("cannot open SQLite
    database ... to write to it (...-shm)", exit 75): once in the 1,000
    deliveries of the benchmark's load, two at a time.
    """
    wanted = os.R_OK | os.W_OK
    # Refused, or not there: not there is no refusal.  A file that comes
    # and goes may be gone at the one look and there again at the other,
    # the more so on a busy machine, where this process may wait between
    # them: refused only if every look finds it there and refused.
    for _ in range(_DENIAL_LOOKS):
        if os.access(name, wanted, **_EFFECTIVE) or not os.path.exists(name):
            return False
    return True


#: how many times L{_deniedToUs} looks before it says a file is refused
_DENIAL_LOOKS = 5


class ReadingRefused(ConfigurationError):
    """
    The read-only opening of an SQLite file is refused, said with why and
    what to do ("cannot open SQLite database FILE to read it: ..."): what
    a command that only reads says, rather than the opening to write's
    line, when it cannot read the file at all.
    """


def _userName(uid):
    """
    The name of the user C{uid}, or the number where it has none.
    """
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def databaseFileWarning(path):
    """
    What to warn of, if anything, in the permissions of a database file
    that holds mail: others than its owner may read it (every message and
    the password hashes) or change it.  Left as it is (an administrator
    may mean it, for a backup group), but said at every start.
    """
    permissions = permissionsOf(path)
    if permissions is not None and permissions & 0o077:
        return (
            f"the database {path} holds mail and password hashes, and others than its owner "
            f"may read or change it (mode {permissions:04o}): chmod 600 it"
        )
    return None


def databaseDirectoryWarning(path):
    """
    What to warn of, if anything, in the directory of a database file:
    others than its owner may create files in it.  SQLite writes the mail
    of uncheckpointed transactions beside the database (C{-wal}, C{-shm}),
    and mailgate its lock: a file someone else put there first, or a
    symbolic link, would be written to in their stead.
    """
    if path == ":memory:" or path.startswith("file:"):
        return None
    directory = os.path.dirname(os.path.abspath(path))
    try:
        permissions = stat.S_IMODE(os.stat(directory).st_mode)
    except OSError:
        return None
    if permissions & 0o022:
        return (
            f"the directory {directory} of the database may be written by others than its owner "
            f"(mode {permissions:04o}): they could put their own files, or links to others, where "
            f"mailgate writes mail and its lock beside the database; chmod go-w it, or move the "
            f"database into a directory of mailgate's own"
        )
    return None


#: SQLite's result codes of a damaged file
SQLITE_CORRUPT = 11
SQLITE_NOTADB = 26

#: what to do about a damaged SQLite database (README: Backups)
RESTORE_HINT = (
    "restore it from its last backup (mailgate db backup; README: Backups); mailgate db check "
    "says what is damaged"
)


def damageOf(exc):
    """
    What C{exc} says of a damaged SQLite database, if it (or what caused
    it) is SQLite finding one (C{SQLITE_CORRUPT}, C{SQLITE_NOTADB}):
    a damage mailgate did not make and no retry repairs, not an internal
    error.  C{None} for any other error.
    """
    while exc is not None:
        if isinstance(exc, sqlite3.DatabaseError) and _primaryCode(exc) in (SQLITE_CORRUPT, SQLITE_NOTADB):
            return f"an SQLite database is damaged ({exc}): {RESTORE_HINT}"
        exc = exc.__cause__
    return None


# Reads through a memory map rather than a read() per page: a message's
# chunks span many overflow pages, each otherwise a system call and a copy.
MMAP_SIZE = 256 * 1024 * 1024

# The size the write-ahead log is truncated to once checkpointed (SQLite's
# journal_size_limit): room for a busy moment's small messages, not for the
# largest message ever received.
WAL_SIZE_LIMIT = 16 * 1024 * 1024


class _Cursor(sqlite3.Cursor):
    """
    An SQLite cursor that names its engine (see L{IEngine.begin}).
    """

    engine = None


@implementer(IEngine)
class SQLiteEngine:
    """
    How mailgate talks to SQLite.

    @ivar path: the database file, or C{":memory:"}.
    """

    name = "sqlite"
    # A damaged file is restored with the server stopped.
    damageRepairedWhileServing = False
    types = {
        "serial_pk": "INTEGER PRIMARY KEY AUTOINCREMENT",
        "bigint": "INTEGER",
        "blob": "BLOB",
        "without_rowid": "WITHOUT ROWID",
        # SQLite formats no binary: the pairs travel as hexadecimal text.
        "uid_size_pairs": "group_concat(printf('%016x%016x', uid, size), '')",
        "uidl_list": "group_concat(uidl, ' ')",
    }

    def __init__(self, path, readers=2, readOnly=False):
        self.path = path
        self.ephemeral = path == ":memory:"
        #: opened read-only (L{_readOnlyURI}): a command that only reads
        #: changes nothing in the file, and reads one it may not write
        self.readOnly = readOnly and not self.ephemeral and not path.startswith("file:")
        self._guard = None
        # WAL lets readers work while the single writer commits; an
        # in-memory database lives in one connection, so it has none.
        self.readers = 0 if path == ":memory:" else readers

    def __repr__(self):
        return f"sqlite:///{self.path}"

    def _connectArguments(self):
        kwargs = {
            "check_same_thread": False,
            "isolation_level": None,  # we issue BEGIN ourselves
            "timeout": BUSY_TIMEOUT_MS / 1000,
        }
        if self.readOnly:
            return (_readOnlyURI(self.path),), dict(kwargs, uri=True)
        return (self.path,), kwargs

    def _refuseDirectory(self):
        """
        Refuse the database's directory given for its file: SQLite says
        "disk I/O error" (a temporary failure, exit 75, retried for ever)
        or "unable to open database file".
        """
        if not self.ephemeral and os.path.isdir(self.path):
            raise ConfigurationError(
                f"cannot open SQLite database {self.path}: it is a directory; the URL names the database's "
                f"file (sqlite:///{os.path.join(os.path.abspath(self.path), 'mailgate.sqlite3')}, say)"
            )

    def connect(self):
        self._refuseDirectory()
        args, kwargs = self._connectArguments()
        try:
            if not self.readOnly:
                createPrivately(self.path)
            else:
                self._refuseForeignSideFiles()
            narrowSideFiles(self.path)
            conn = sqlite3.connect(*args, **kwargs)
            self.onConnect(conn)
            if self.readOnly:
                ownerWrites(self.path)
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE):
                raise self._noDescriptors(e.strerror) from e
            raise
        except sqlite3.Error as e:
            if self.readOnly and _primaryCode(e) in (SQLITE_READONLY, SQLITE_CANTOPEN):
                return self._connectUnchangeable(e, args, kwargs)
            if _primaryCode(e) in (SQLITE_FULL, SQLITE_IOERR):
                raise self._unusableForNow(e) from e
            if _primaryCode(e) == SQLITE_CANTOPEN and outOfDescriptors():
                raise self._noDescriptors(str(e)) from e
            if _primaryCode(e) == SQLITE_BUSY:
                # Another program held the file locked past the busy
                # timeout (a long write, a backup): nothing is wrong with
                # the configuration; the next try may well succeed.
                raise TemporaryFailure(f"cannot open SQLite database {self.path}: {e}") from e
            if _primaryCode(e) in (SQLITE_CORRUPT, SQLITE_NOTADB):
                # Its header or first pages: damaged (a truncated copy, a
                # disk error), or no SQLite file at all (a mistyped path).
                # A configuration error all the same: no retry helps, and
                # a server's start stops with 78, which systemd does not
                # restart for ever.
                raise ConfigurationError(
                    f"cannot open SQLite database {self.path}: {e} (it is damaged, or not an SQLite "
                    f"database: {RESTORE_HINT})"
                ) from e
            raise ConfigurationError(f"cannot open SQLite database {self.path}: {e}{self._openHint()}") from e
        return conn

    def _refuseForeignSideFiles(self):
        """
        Refuse to read a WAL database that has no C{-wal} or C{-shm} (no
        server has it open) as a user who is neither its owner nor root:
        SQLite would make them, his, with the file's mode, and leave them;
        the owner's server could not write them, and failed every write
        (attempt to write a readonly database) until they were removed.
        (Root's are given the owner by SQLite.)  A backup (rollback
        journal) has none made, and a file of root's is read: root writes
        whatever another user leaves.

        The header is read only then, by another user, before this
        process has a connection of its own to the file: closing a
        descriptor of the file drops every POSIX lock the process holds
        on it, SQLite's included (see L{narrowSideFiles}).
        """
        euid = os.geteuid()
        try:
            owner = os.stat(self.path).st_uid
        except OSError:
            return  # SQLite's opening says why
        if 0 in (euid, owner) or euid == owner or all(os.path.exists(self.path + s) for s in ("-wal", "-shm")):
            return
        try:
            with open(self.path, "rb") as f:
                header = f.read(20)
        except OSError:
            return
        if header[:16] != b"SQLite format 3\x00" or header[18:20] != b"\x02\x02":
            return
        raise ReadingRefused(
            f"cannot open SQLite database {self.path} to read it: it is in WAL mode, and {_userName(euid)} "
            f"would leave it a -wal and -shm its owner {_userName(owner)} may not write: run this as "
            f"{_userName(owner)}"
        )

    def _connectUnchangeable(self, error, args, kwargs):
        """
        Open read-only a WAL database whose C{-shm} SQLite cannot make: it
        may not create files in the directory.  On a filesystem mounted
        read-only (a snapshot) with no C{-wal} beside the file, nothing
        writes it meanwhile: it is read as it is (C{immutable=1}).  Else
        said, with what to do.
        """
        directory = self._directory()
        wal = os.path.exists(self.path + "-wal")
        journal = _hotJournal(self.path)
        try:
            frozen = bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
        except OSError:
            frozen = False
        # Not beside a hot -journal: read as it is, the file holds the
        # pages an interrupted write left, which only its rollback undoes.
        if frozen and not wal and not journal:
            try:
                conn = sqlite3.connect(args[0] + "&immutable=1", **kwargs)
                self.onConnect(conn)
                return conn
            except sqlite3.Error as e:
                raise ReadingRefused(f"cannot open SQLite database {self.path} to read it: {e}") from e
        raise ReadingRefused(
            f"cannot open SQLite database {self.path} to read it: {error} "
            f"({self._unreadable(directory, frozen, wal, journal)})"
        ) from error

    def _unreadable(self, directory, frozen, wal, journal=False):
        """
        Why SQLite could not open the database read-only, and what to do:
        the file (or its C{-wal} or C{-shm}) is one this user may not read
        (a database of the server's user, mode 0600: the commonest), the
        filesystem is mounted read-only with a C{-wal} and no C{-shm}, or
        a WAL database's C{-shm} cannot be made in its directory.  All were
        said as the last, "it is in WAL mode", of any file, the one this
        user may not read included.
        """
        user = _userName(os.geteuid())
        for name in (self.path, self.path + "-wal", self.path + "-shm"):
            try:
                found = os.stat(name)
            except OSError:
                continue
            if not os.access(name, os.R_OK, **_EFFECTIVE):
                owner = _userName(found.st_uid)
                return (
                    f"{user} may not read {name}: it is {owner}'s, mode {stat.S_IMODE(found.st_mode):04o}: "
                    f"run this as {owner}"
                )
        if journal:
            # SQLite refuses a read-only opening for it (SQLITE_READONLY_
            # ROLLBACK), and the rollback is a write this command does not
            # make: said as a -shm it could not create, and, on a
            # filesystem mounted read-only, read as it was (immutable=1):
            # a half-written file, "malformed database schema".
            if frozen:
                return (
                    f"its -journal holds a write that was cut short, which must be rolled back before it is read, "
                    f"and the filesystem of {directory} is mounted read-only: copy the file and its -journal where "
                    f"{user} may write, and run mailgate db upgrade on the copy, which rolls it back"
                )
            return (
                "its -journal holds a write that was cut short, which must be rolled back before it is read, and "
                "this command writes nothing: run mailgate db upgrade on it first, which rolls it back"
            )
        if frozen:
            return (
                f"the filesystem of {directory} is mounted read-only, and its -wal is read through a -shm, which "
                f"there is none of and none can be made: copy the file and its -wal where {user} may write"
            )
        copy = f"copy the file{' and its -wal' if wal else ''} where {user} may write"
        try:
            owner = _userName(os.stat(self.path).st_uid)
        except OSError:
            owner = None
        # Not "run this as the database's owner" to its owner: nobody
        # reading his own file in a directory of root's was told so.
        if owner == user:
            return f"it is in WAL mode, and {user} may not create its -shm in {directory}: {copy}, or run this as root"
        return (
            f"it is in WAL mode, and {user} may not create its -shm in {directory}: run this as "
            f"{owner + ', its owner' if owner else 'its owner'}, or {copy}"
        )

    def _noDescriptors(self, error):
        """
        The temporary failure to open a connection (a worker thread's first,
        opened when it is first given work) while the process is out of
        file descriptors: nothing in the configuration is wrong, and the
        file is fine.  It was a L{ConfigurationError} saying SQLite's
        "unable to open database file", a critical error with a traceback
        from the session registry, and an internal error for the client;
        now the operation fails as any temporary one (C{-ERR [SYS/TEMP]},
        C{451}), the next tries again, and a start stops with
        C{EX_TEMPFAIL}.
        """
        return TemporaryFailure(
            f"cannot open SQLite database {self.path}: this process is out of file descriptors ({error}); "
            "raise its open file limit (ulimit -n, systemd's LimitNOFILE) or lower max-connections"
        )

    def _openHint(self):
        """
        What to add to SQLite's words for a failure to open the database,
        which name no file and no reason ("unable to open database file",
        "attempt to write a readonly database"): the filesystem is mounted
        read-only (the kernel's answer to a failing disk), or the user
        this runs as may not use the file, or may not create the C{-wal}
        and C{-shm} files beside it (the command run as another user than
        the server's, a database copied in by root).
        """
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(directory):
            return f" (there is no directory {directory})"
        try:
            if os.statvfs(directory).f_flag & os.ST_RDONLY:
                return f" (the filesystem of {directory} is mounted read-only)"
        except OSError:
            return ""
        user = _userName(os.geteuid())
        for name in (self.path, self.path + "-wal", self.path + "-shm"):
            try:
                found = os.stat(name)
            except OSError:
                continue
            if not os.access(name, os.R_OK | os.W_OK, **_EFFECTIVE):
                return (
                    f" ({user} may not read and write {name}: it is {_userName(found.st_uid)}'s, "
                    f"mode {stat.S_IMODE(found.st_mode):04o})"
                )
        if not os.access(directory, os.W_OK | os.X_OK, **_EFFECTIVE) and not all(
            os.path.exists(self.path + side) for side in ("-wal", "-shm")
        ):
            return f" ({user} may not create files in {directory}, where SQLite makes the database's -wal and -shm files)"
        return ""

    def refuseReadOnly(self):
        """
        The database file, or the C{-wal} or C{-shm} beside it, exists
        but this process may not write it: SQLite opens such a database
        read-only without a word, so a server started (an operator's
        C{chmod 400}, a file copied in by root and left root's, mode
        0644) and refused every delivery with 451 "attempt to write a
        readonly database", naming neither the file nor its permissions,
        and C{mailgate deliver} exited 75, which an MTA retries until it
        bounces.  Said as a failure to open it would be: exit 78.
        """
        if self.ephemeral or self.path.startswith("file:") or self.readOnly:
            return
        for name in (self.path, self.path + "-wal", self.path + "-shm"):
            if _deniedToUs(name):
                raise ConfigurationError(
                    f"cannot open SQLite database {self.path} to write to it{self._openHint() or f' ({name})'}"
                )

    def _unusableForNow(self, error):
        """
        The temporary failure to open the database that C{error} (SQLite's
        C{SQLITE_FULL} or C{SQLITE_IOERR}) is: the file is there, but
        SQLite cannot make what it needs beside it (C{-shm}, C{-wal}), most
        often because the disk is full.  No configuration is wrong: start-up
        stops with C{EX_TEMPFAIL} rather than C{EX_CONFIG}, so a supervisor
        tries again, and the admin command says to try again.
        """
        directory = self._directory()
        if _primaryCode(error) == SQLITE_FULL or noRoomIn(directory):
            return StorageFull(f"cannot open SQLite database {self.path}: no space left in {directory} ({error})")
        return TemporaryFailure(f"cannot open SQLite database {self.path}: {error}")

    def onConnect(self, conn):
        """
        Per-connection settings: WAL, full fsync on commit, a busy timeout so
        the admin command and the server can write the same file.
        """
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if self.readOnly:
            # Its journal mode as it is: a backup (rollback journal) put in
            # WAL mode had its header, and so its checksum, changed by a
            # check that says it changes nothing.
            conn.execute(f"PRAGMA mmap_size = {MMAP_SIZE}")
            # Read now: a file SQLite cannot read as it is says so here,
            # not as a missing table later.
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return
        if self.path != ":memory:":
            mode = _switchToWAL(conn)
            if mode.lower() != "wal":
                raise ConfigurationError(f"{self.path}: cannot switch to WAL mode")
        conn.execute("PRAGMA synchronous = FULL")
        # A checkpointed WAL is reused from its start, not shrunk: without a
        # limit it stays as large as the largest burst ever written (a 50 MB
        # message: at least 50 MB on disk for good).  Past the limit it is
        # truncated to it when reused.
        conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute(f"PRAGMA mmap_size = {MMAP_SIZE}")
        if self.path == ":memory:":
            # Each connection to ":memory:" is a database of its own: it
            # needs its schema here, not from a separate upgrade step.
            upgradeConnection(self, conn)

    def lockSchema(self, cursor):
        """
        Serialise concurrent upgrades; BEGIN IMMEDIATE already does.
        """

    def tableNames(self, cursor):
        # Less SQLite's own (sqlite_sequence, sqlite_stat1).
        cursor.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite%'")
        return sorted(name for (name,) in cursor.fetchall())

    def isLockTimeout(self, exc):
        """
        Never: SQLite locks the whole database, for BEGIN IMMEDIATE to wait
        for (its busy timeout), not a table at a time.
        """
        return False

    def missingPrivileges(self, cursor, tables):
        """
        None: whoever may open the file may do anything to its tables.
        """
        return []

    def lockDeliveries(self, cursor, pairs):
        """
        Nothing: a write transaction holds the database's one write lock
        from its BEGIN IMMEDIATE, so a second delivery of the same message
        starts its look-up after the first has committed.
        """

    def lockMailboxes(self, cursor, userIds):
        """
        Nothing: a write transaction holds the database's one write lock
        from its BEGIN IMMEDIATE; no other waits for a row it holds.
        """

    def dropBodyReferences(self, cursor, owner, count, bodyIds):
        """
        One UPDATE: a write transaction holds the database's one write
        lock from its BEGIN IMMEDIATE; no other waits for a row it holds.
        """
        marks = ",".join("?" * len(bodyIds))
        cursor.execute(
            f"UPDATE bodies SET refcount = refcount - ? WHERE owner_id = ? AND body_id IN ({marks}) "
            "RETURNING body_id, refcount",
            (count, owner, *bodyIds),
        )
        return cursor.fetchall()

    def administrativeRead(self, cursor, timeout):
        """
        The connection refuses writes from now on (C{query_only}: the
        command's connection does nothing else after).  No time bound: a
        read of SQLite waits for no writer, and SQLite bounds no
        statement's time.
        """
        cursor.execute("PRAGMA query_only = 1")

    def isStatementTimeout(self, exc):
        """
        Never: SQLite bounds no statement's time (a locked file is its busy
        timeout, which no C{--timeout} changes).
        """
        return False

    def begin(self, conn, write):
        """
        Start a transaction and return a cursor for it.  Writers take the
        write lock at once (C{IMMEDIATE}) rather than upgrading half-way,
        which is what makes SQLite's busy timeout apply instead of failing.
        """
        cursor = conn.cursor(_Cursor)
        cursor.engine = self
        cursor.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        return cursor

    def commit(self, conn):
        conn.commit()

    def pipeline(self, conn):
        """
        SQLite runs in-process: there are no round trips to save.
        """
        return contextlib.nullcontext()

    def rollback(self, conn):
        conn.rollback()

    _transientMessages = (
        "locked",
        "busy",
        "disk",
        "full",
        "unable to open",
        "readonly",
        "read-only",
        "interrupted",
        "i/o",
        "cannot commit",
    )

    def isTransient(self, exc):
        """
        Locked, busy, full or unreadable files may heal; constraint
        violations and SQL errors do not (SQLite reports both kinds as
        OperationalError, so its message decides).
        """
        if not isinstance(exc, sqlite3.OperationalError):
            return False
        message = str(exc).lower()
        return any(part in message for part in self._transientMessages)

    def _directory(self):
        """
        The directory of the database file, where its C{-wal} and C{-shm}
        files are made too.
        """
        return os.path.dirname(os.path.abspath(self.path))

    def isStorageFull(self, exc):
        """
        SQLITE_FULL: a write found no room on the filesystem (SQLite's
        "database or disk is full"; also its max_page_count, which mailgate
        does not set).  Or SQLITE_IOERR ("disk I/O error") while the
        database's filesystem has no room left (L{noRoomIn}): that is how
        SQLite reports a full disk met by some of its writes, growing the
        C{-shm} file (C{SQLITE_IOERR_SHMSIZE}, on a full tmpfs) or where
        the filesystem reports no room only at C{fsync} or as C{EIO}
        (C{SQLITE_IOERR_WRITE}, C{_FSYNC}); an I/O error on a filesystem
        with room is a failing disk, a temporary failure as before.
        """
        if not isinstance(exc, sqlite3.Error):
            return False
        code = _primaryCode(exc)
        if code == SQLITE_FULL:
            return True
        return code == SQLITE_IOERR and not self.ephemeral and noRoomIn(self._directory())

    def damage(self, exc):
        """
        C{SQLITE_CORRUPT} or C{SQLITE_NOTADB}, met reading or writing a
        page (the opening's own check is L{connect}'s): the file is
        damaged where this statement went, which may leave other users'
        mail readable (see L{mailgate.errors.DatabaseDamaged}).
        """
        if not (isinstance(exc, sqlite3.DatabaseError) and _primaryCode(exc) in (SQLITE_CORRUPT, SQLITE_NOTADB)):
            return None
        return f"the SQLite database {self.path} is damaged ({exc}): {RESTORE_HINT}"

    def isRetryable(self, exc):
        return False

    def isDisconnect(self, exc):
        return False

    def isBroken(self, conn):
        return False

    def isUniqueViolation(self, exc):
        return isinstance(exc, sqlite3.IntegrityError) and "UNIQUE" in str(exc)

    def resetIdentity(self, cursor, table, column, past=0):
        """
        After rows were inserted with explicit ids: SQLite's AUTOINCREMENT
        continues after the largest it was given (C{sqlite_sequence}),
        and, set here, after C{past}.
        """
        cursor.execute("UPDATE sqlite_sequence SET seq = max(seq, ?) WHERE name = ?", (past, table))
        if not cursor.rowcount and past:
            cursor.execute("INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)", (table, past))

    def withoutRowValues(self, exc):
        """
        SQLite names the constraint and the column, never a value.
        """
        return exc

    def serverClock(self, cursor):
        """
        None apart from the server's own: one server uses the file
        (L{claimServer}), on the machine whose clock it reads.
        """
        return None

    def urlProblem(self):
        # A file name is all an SQLite URL holds: what is wrong with it
        # (a missing directory, no permission) shows as the file is opened.
        return None

    def claimServer(self):
        """
        Make sure only one mailgate server uses this database file.

        The embedded store's maildrop locks live in this process's memory; a
        second server on the same file would not see them, so it is refused
        at start-up.  The admin command does not claim the file: delivering
        or adding users while the server runs is safe.
        """
        if self.path == ":memory:" or self._guard is not None:
            return
        # Before its lock file is made beside it (DIR.lock, left behind).
        self._refuseDirectory()
        lockPath = self.path + ".lock"
        try:
            # Never through a symbolic link: the lock is truncated and
            # written, and a link put there (in a directory others may
            # write) would have a server running as root clobber its target.
            fd = os.open(lockPath, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise ConfigurationError(
                    f"{lockPath} is a symbolic link, not mailgate's lock file: remove it"
                ) from None
            raise ConfigurationError(
                f"cannot open SQLite database {self.path}: cannot open its lock file {lockPath}: "
                f"{e.strerror}{self._lockHint(lockPath)}"
            ) from None
        found = os.fstat(fd)
        if not stat.S_ISREG(found.st_mode):
            os.close(fd)
            raise ConfigurationError(f"{lockPath} is not a regular file, not mailgate's lock file: remove it")
        try:
            _lockWithin(fd, CLAIM_WAIT)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise DatabaseInUse(
                    f"{self.path} is in use by another mailgate server "
                    f"(an embedded SQLite database serves one process; use "
                    f"PostgreSQL for several nodes)"
                ) from None
            raise
        if found.st_nlink == 1:
            # Only a file of no other name: a hard link put here (by the
            # database's owner, in a directory of theirs) to a file of
            # root's would have root, running this, truncate it, and give
            # it to that user (_ownedAsTheDatabase).  It is locked all the
            # same, and left as it is.
            try:
                # Whatever the umask was when it was made.
                os.fchmod(fd, FILE_MODE)
            except OSError:
                pass
            _ownedAsTheDatabase(fd, self.path)
            try:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
            except OSError:
                # The process id is for people; the lock is what counts, and
                # it is held.  (A full disk: opening the database says so.)
                pass
        self._guard = fd

    def _lockHint(self, lockPath):
        """
        Why the server's lock file (L{claimServer}) cannot be opened: the
        user this runs as may not write it (made by root: a start before
        twistd's C{--uid} was given), or may not create it; as
        L{_openHint} says of the database.
        """
        user = _userName(os.geteuid())
        try:
            found = os.stat(lockPath)
        except OSError:
            directory = self._directory()
            if os.path.isdir(directory) and not os.access(directory, os.W_OK | os.X_OK, **_EFFECTIVE):
                return (
                    f" ({user} may not create files in {directory}, where the server makes its lock file "
                    f"and SQLite the database's -wal and -shm files)"
                )
            return self._openHint()
        if not os.access(lockPath, os.R_OK | os.W_OK, **_EFFECTIVE):
            return (
                f" ({user} may not read and write {lockPath}: it is {_userName(found.st_uid)}'s, "
                f"mode {stat.S_IMODE(found.st_mode):04o})"
            )
        return self._openHint()

    def serverRunning(self):
        """
        Whether a mailgate server runs on this file: holds the lock
        L{claimServer} takes (asked by taking it, and giving it back at
        once).  A command asks before migrating the schema, which it must
        not do under a running (older) server.

        @raise ConfigurationError: the lock file cannot be opened, as
            L{claimServer}.
        """
        if self.ephemeral or self._guard is not None:
            return False
        lockPath = self.path + ".lock"
        try:
            fd = os.open(lockPath, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise ConfigurationError(
                    f"{lockPath} is a symbolic link, not mailgate's lock file: remove it"
                ) from None
            raise ConfigurationError(f"cannot open SQLite database {self.path}: {e.strerror}") from None
        try:
            # A shared lock: two commands asking at once (two deliveries the
            # MTA runs side by side) do not take each other for a server,
            # as they did asking with the server's own exclusive lock.
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                return True
            raise
        finally:
            os.close(fd)
        return False

    def releaseServer(self):
        if self._guard is not None:
            os.close(self._guard)
            self._guard = None

    def makeLocks(self, database):
        lockFile = None if self.ephemeral else MaildropLockFile(self)
        return InProcessLocks(database, lockFile)

    def makeMessageReads(self, database):
        # SQLite answers from its page cache on the reader threads.
        return ThreadedMessageReads(database)


#: C{struct flock} as Linux lays it out (C{short l_type, l_whence}; C{off_t
#: l_start, l_len}; C{pid_t l_pid}), for open file description locks.
_FLOCK = struct.Struct("hhxxxxqqixxxx")


class MaildropLockFile:
    """
    The maildrop locks of the embedded store across processes: one octet
    of the server's lock file (C{DATABASE.lock}, L{SQLiteEngine.claimServer})
    per user, at the user id's offset, locked with an open file
    description lock (C{F_OFD_SETLK}, Linux) while a POP3 session, the
    retention task or an admin command works on that maildrop.

    The server's sessions hold their locks in its memory
    (L{InProcessLocks}); the admin command (C{mailgate mailbox expunge},
    C{user del}, C{user rename}) runs in another process, and the session
    registry it also reads is written about a second after a login: an
    expunge in that second removed the messages a session had just
    listed.  Here the command finds the session's octet locked, as a
    PostgreSQL node finds the session's advisory lock.

    An open file description lock belongs to the descriptor, not to the
    process: closing another descriptor of the file drops none of it
    (POSIX locks drop them all), and two stores of one process (the
    server's and a test's command) see each other's.  Where the system
    has none, or the lock file cannot be opened (no server ever ran
    here, or another user's), the maildrop lock is this process's only,
    as before.
    """

    def __init__(self, engine):
        self._engine = engine
        self._own = None

    def _descriptor(self):
        """
        The server's own descriptor of the lock file, or one of this
        process's, opened once (never created: without the file, no
        server has sessions to protect); C{None} if there is none.
        """
        guard = self._engine._guard
        if guard is not None:
            return guard
        if self._own is None:
            try:
                fd = os.open(self._engine.path + ".lock", os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                return None
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                return None
            self._own = fd
        return self._own

    def _lock(self, kind, userId):
        command = getattr(fcntl, "F_OFD_SETLK", None)
        fd = self._descriptor()
        if command is None or fd is None:
            return True
        try:
            fcntl.fcntl(fd, command, _FLOCK.pack(kind, os.SEEK_SET, userId, 1, 0))
        except OSError as e:
            # Held by another: refused.  Anything else (a kernel without
            # open file description locks, EINVAL; no lock left, ENOLCK)
            # leaves the lock this process's only, as it was before.
            return e.errno not in (errno.EAGAIN, errno.EACCES)
        return True

    def acquire(self, userId):
        """
        Lock C{userId}'s octet without waiting: C{False} if another
        process (or another store of this one) holds it.
        """
        return self._lock(fcntl.F_WRLCK, userId)

    def release(self, userId):
        self._lock(fcntl.F_UNLCK, userId)

    def close(self):
        if self._own is not None:
            os.close(self._own)
            self._own = None


#: seconds a server's start waits for the lock of its database file while
#: another process holds it: a command asking whether a server runs holds
#: it for a moment (see L{SQLiteEngine.serverRunning}); another server
#: holds it for as long as it runs.
CLAIM_WAIT = 1.0


def _lockWithin(fd, seconds, interval=0.02):
    """
    Take the exclusive lock of C{fd} (flock), trying again for up to
    C{seconds} while another process holds it.

    @raise OSError: C{EAGAIN} if it is still held then.
    """
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() >= deadline:
                raise
        time.sleep(interval)


def _ownedAsTheDatabase(fd, path):
    """
    Give the lock file open as C{fd}, where root made it, the owner of the
    database file C{path}: the server runs as that user, and a lock file
    of root's, mode 0600, kept it from starting ("cannot open SQLite
    database ...: Permission denied", exit 78).  Root makes it where
    C{mailgate db restored}, which holds the lock for its transaction,
    runs as root on a database restored to a new place (the lock file is
    no part of a backup), or a server started as root drops to its
    C{--uid}.
    """
    if os.geteuid() != 0:
        return
    try:
        lock, database = os.fstat(fd), os.stat(path)
        if lock.st_uid == 0 and database.st_uid != 0:
            os.fchown(fd, database.st_uid, database.st_gid)
    except OSError:
        # The lock is held all the same; the server says what it cannot open.
        pass


@implementer(IMaildropLocks)
class InProcessLocks:
    """
    Maildrop locks held in this process's memory: exact and free for a
    single-process deployment, which is what the embedded store is (see
    L{SQLiteEngine.claimServer}), and, through C{lockFile} (a
    L{MaildropLockFile}), seen by the admin command's process too.  The
    snapshot taken with a lock is read through the store's database, on a
    reader.

    @param database: the store's L{mailgate.interfaces.IDatabase}.
    """

    def __init__(self, database, lockFile=None):
        self._database = database
        self._snapshot = snapshotQuery(database.engine)
        self._held = set()
        self._lockFile = lockFile

    def acquire(self, userId):
        if not self._take(userId):
            return defer.fail(MaildropInUse(userId))
        return defer.succeed(userId)

    def _take(self, userId):
        """
        Lock C{userId}'s maildrop at once: whether it was free.
        """
        if userId in self._held:
            return False
        if self._lockFile is not None and not self._lockFile.acquire(userId):
            return False
        self._held.add(userId)
        return True

    def acquireAndSnapshot(self, userId, passwordHash, address=None, peer=None):
        # The lock is taken (or refused) at once: the snapshot's read
        # follows it directly, not through a callback on a Deferred that
        # has fired already (this runs at every login).
        if not self._take(userId):
            return defer.fail(MaildropInUse(userId))
        read = self._database.runInteraction(readSnapshot, self._snapshot, userId, passwordHash, address, peer)
        return read.addErrback(self._givenBack, userId)

    def _givenBack(self, failure, userId):
        # The snapshot could not be read: no session holds the lock.
        self._giveBack(userId)
        return failure

    def _giveBack(self, userId):
        if userId in self._held:
            self._held.discard(userId)
            if self._lockFile is not None:
                self._lockFile.release(userId)

    def release(self, userId):
        self._giveBack(userId)
        return defer.succeed(None)

    def whenLost(self, userId, lost):
        """
        Never called: a lock here cannot be lost while the process holds
        it.  It lives in this process's memory, and in an open file
        description lock on the lock file, whose descriptor the process
        keeps open until the store closes; no connection can end under it.
        """

    def writeGuard(self, userId):
        # One process, one writer: nothing else can take the lock while
        # this session's deletions are written.
        if userId not in self._held:
            return None
        return lambda cursor: userId in self._held

    def close(self):
        for userId in list(self._held):
            self._giveBack(userId)
        if self._lockFile is not None:
            self._lockFile.close()
        return defer.succeed(None)
