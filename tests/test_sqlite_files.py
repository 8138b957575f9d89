"""
The SQLite database holds every message, the password hashes and the APOP
secrets: its file, the -wal and -shm files beside it and the server's lock
file are created readable by their owner only (0600), whatever the umask.
Checked under a permissive umask (0), through the admin command's store
and the server's (threaded) store.
"""

import os
import stat

import pytest

from iterated import IteratedReactor
from mailgate.store import engineFromURL, openStore, openSynchronousStore
from mailgate.testing import addUser, deliver


@pytest.fixture
def permissiveUmask():
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def modes(dbpath):
    """
    The permission bits of the database's files that exist, by suffix.
    """
    found = {}
    for suffix in ("", "-wal", "-shm", ".lock"):
        path = f"{dbpath}{suffix}"
        if os.path.exists(path):
            found[suffix] = stat.S_IMODE(os.stat(path).st_mode)
    return found


def modesAfterMail(dbpath):
    """
    The modes of the database's files once the admin command's store has
    added a user and delivered a message to them.
    """
    store = openSynchronousStore(f"sqlite:///{dbpath}")
    try:
        addUser(store, "alice@example.org", "pw")
        deliver(store, ["alice@example.org"], b"Subject: secret\r\n\r\nbody\r\n")
        return modes(dbpath)
    finally:
        store.close()


def test_adminCommandCreatesPrivateFiles(tmp_path, permissiveUmask):
    dbpath = tmp_path / "mail.sqlite3"
    found = modesAfterMail(dbpath)
    assert set(found) >= {"", "-wal", "-shm"}, found
    assert all(mode == 0o600 for mode in found.values()), {k: oct(v) for k, v in found.items()}


def test_serverCreatesPrivateFiles(tmp_path, permissiveUmask):
    dbpath = tmp_path / "mail.sqlite3"
    reactor = IteratedReactor()
    store = openStore(f"sqlite:///{dbpath}", reactor)
    try:
        reactor.resultOf(store.hasDomain("example.org"))
        found = modes(dbpath)
    finally:
        reactor.resultOf(store.close())
        store.engine.releaseServer()
        reactor.close()
    assert set(found) == {"", "-wal", "-shm", ".lock"}, found
    assert all(mode == 0o600 for mode in found.values()), {k: oct(v) for k, v in found.items()}


def test_aLockFileLeftWithAWiderModeIsNarrowed(tmp_path, permissiveUmask):
    dbpath = tmp_path / "mail.sqlite3"
    lock = f"{dbpath}.lock"
    with open(lock, "w"):
        pass
    os.chmod(lock, 0o644)
    engine = engineFromURL(f"sqlite:///{dbpath}")
    engine.claimServer()
    try:
        assert stat.S_IMODE(os.stat(lock).st_mode) == 0o600
    finally:
        engine.releaseServer()


def test_aServerGivenADirectoryLeavesNoLockFileBeside(tmp_path):
    """
    A server started on a URL naming a directory (the database's, not its
    file) is refused, saying so, before it makes its lock file: it left
    DIR.lock beside the directory.
    """
    from mailgate.errors import ConfigurationError

    directory = tmp_path / "mailgate"
    directory.mkdir()
    engine = engineFromURL(f"sqlite:///{directory}")
    with pytest.raises(ConfigurationError, match="it is a directory"):
        engine.claimServer()
    assert sorted(os.listdir(tmp_path)) == ["mailgate"]


def test_theWriteAheadLogShrinksBackAfterABigMessage(tmp_path):
    """
    The WAL grows to hold a big message's transaction; once checkpointed,
    the next write truncates it to the limit instead of keeping the space
    for good (a 50 MB message would otherwise leave a 50 MB WAL beside the
    database for the life of the server).
    """
    from mailgate.store.sqlite import WAL_SIZE_LIMIT

    dbpath = tmp_path / "mail.sqlite3"
    store = openSynchronousStore(f"sqlite:///{dbpath}")
    try:
        addUser(store, "alice@example.org", "pw")
        big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * (2 * WAL_SIZE_LIMIT // 1000)
        deliver(store, ["alice@example.org"], big)
        grown = os.path.getsize(f"{dbpath}-wal")
        assert grown > WAL_SIZE_LIMIT
        for n in range(3):
            deliver(store, ["alice@example.org"], b"Subject: small %d\r\n\r\nbody\r\n" % n)
        assert os.path.getsize(f"{dbpath}-wal") <= WAL_SIZE_LIMIT
    finally:
        store.close()


def test_anEmptyFileMadeBeforehandIsNarrowedBeforeMailGoesIn(tmp_path, permissiveUmask):
    """
    An administrator (or a package script) made the database file with
    touch, 0644 under the usual umask: it holds no mail yet, so mailgate
    narrows it to 0600 before writing any, and its -wal and -shm files
    follow.
    """
    dbpath = tmp_path / "mail.sqlite3"
    dbpath.touch()
    os.chmod(dbpath, 0o644)
    found = modesAfterMail(dbpath)
    assert all(mode == 0o600 for mode in found.values()), {k: oct(v) for k, v in found.items()}


def withAUser(dbpath):
    """
    Make an SQLite database at C{dbpath} holding one user.
    """
    store = openSynchronousStore(f"sqlite:///{dbpath}")
    try:
        addUser(store, "alice@example.org", "pw")
    finally:
        store.close()


def startupWarnings(dbpath, event):
    """
    The warnings named C{event} that a server on the SQLite file at
    C{dbpath} says at its start.
    """
    from mailgate.service import MailgateConfig, makeService

    reactor = IteratedReactor()
    try:
        service = makeService(MailgateConfig(database=f"sqlite:///{dbpath}", pop3=[]), reactor=reactor)
        service.store.engine.releaseServer()
    finally:
        reactor.close()
    return [text for name, text in service.startupWarnings if name == event]



def test_aDatabaseOthersMayReadIsWarnedOfAtEveryStart(tmp_path):
    """
    A database holding mail that others may read is left as it is (an
    administrator may mean it) but warned of whenever a server starts on
    it, with what to do.
    """
    dbpath = tmp_path / "mail.sqlite3"
    withAUser(dbpath)
    for mode, warned in ((0o600, False), (0o640, True), (0o644, True)):
        os.chmod(dbpath, mode)
        warnings = startupWarnings(dbpath, "database.file_permissions")
        assert bool(warnings) == warned, (oct(mode), warnings)
        if warned:
            assert warnings == [
                f"the database {dbpath} holds mail and password hashes, and others than its owner "
                f"may read or change it (mode {mode:04o}): chmod 600 it"
            ]
        assert stat.S_IMODE(os.stat(dbpath).st_mode) == mode


def test_aLinkInPlaceOfTheLockFileIsRefusedNotFollowed(tmp_path):
    """
    The server truncates and writes its lock file: a symbolic link put in
    its place (by anyone who may write to the database's directory) stops
    the start with one line saying so, and the file it points to (a
    server running as root could reach any) is left as it was.
    """
    from e2e import ServerStarter

    dbpath = tmp_path / "mail.sqlite3"
    store = openSynchronousStore(f"sqlite:///{dbpath}")
    try:
        addUser(store, "alice@example.org", "pw")
    finally:
        store.close()
    victim = tmp_path / "precious.conf"
    victim.write_text("precious = yes\n")
    os.chmod(victim, 0o644)
    os.symlink(victim, f"{dbpath}.lock")
    servers = ServerStarter(tmp_path)
    try:
        server = servers.spawn(database=f"sqlite:///{dbpath}")
        assert server.wait() == 78, server.log()
    finally:
        servers.stopAll()
    assert "Traceback" not in server.stderr, server.log()
    [line] = [line for line in server.stderr.splitlines() if line.strip()]
    assert line == f"mailgate: {dbpath}.lock is a symbolic link, not mailgate's lock file: remove it", server.log()
    assert victim.read_text() == "precious = yes\n"
    assert stat.S_IMODE(os.stat(victim).st_mode) == 0o644


def test_aLockFileThatIsNotAFileIsRefused(tmp_path):
    from mailgate.errors import ConfigurationError

    dbpath = tmp_path / "mail.sqlite3"
    os.mkfifo(f"{dbpath}.lock")
    engine = engineFromURL(f"sqlite:///{dbpath}")
    with pytest.raises(ConfigurationError) as e:
        engine.claimServer()
    assert str(e.value) == f"{dbpath}.lock is not a regular file, not mailgate's lock file: remove it"


def test_aDatabaseDirectoryOthersMayWriteIsWarnedOfAtEveryStart(tmp_path):
    """
    Whoever may create files in the database's directory can put their
    own -wal file there (SQLite then writes mail into a file they own) or
    a link in place of the lock: warned of at every start, with what to do.
    """
    directory = tmp_path / "db"
    directory.mkdir()
    dbpath = directory / "mail.sqlite3"
    withAUser(dbpath)
    for mode, warned in ((0o700, False), (0o755, False), (0o775, True), (0o1777, True), (0o757, True)):
        os.chmod(directory, mode)
        warnings = startupWarnings(dbpath, "database.directory_permissions")
        assert bool(warnings) == warned, (oct(mode), warnings)
        if warned:
            assert warnings == [
                f"the directory {directory} of the database may be written by others than its owner "
                f"(mode {mode:04o}): they could put their own files, or links to others, where "
                f"mailgate writes mail and its lock beside the database; chmod go-w it, or move the "
                f"database into a directory of mailgate's own"
            ]
    os.chmod(directory, 0o700)


def test_sideFilesLeftWiderThanTheDatabaseAreNarrowed(tmp_path):
    """
    A -wal and -shm made while the database was 0644 (an earlier version,
    or before the administrator's chmod 600 of it) outlive the chmod while
    anything uses the database, or after a crash: SQLite goes on writing
    mail into them as they are.  The next connection narrows them to the
    database's mode; what they hold is still read.
    """
    dbpath = tmp_path / "mail.sqlite3"
    holder = openSynchronousStore(f"sqlite:///{dbpath}")
    try:
        addUser(holder, "alice@example.org", "pw")
        deliver(holder, ["alice@example.org"], b"Subject: secret\r\n\r\nbody\r\n")
        for suffix in ("-wal", "-shm"):
            os.chmod(f"{dbpath}{suffix}", 0o644)
        os.chmod(dbpath, 0o600)
        reactor = IteratedReactor()
        store = openStore(f"sqlite:///{dbpath}", reactor)
        try:
            user = reactor.resultOf(store.findUser("alice@example.org"))
            found = modes(dbpath)
        finally:
            reactor.resultOf(store.close())
            store.engine.releaseServer()
            reactor.close()
    finally:
        holder.close()
    assert user is not None
    assert found["-wal"] == found["-shm"] == 0o600, {k: oct(v) for k, v in found.items()}


def test_sideFilesOfADatabaseOpenOnPurposeAreLeftAsTheyAre(tmp_path):
    """
    A database the administrator opened to a group (0640, for a backup
    job) keeps its side files' group read: only what the database itself
    does not allow is taken away.
    """
    dbpath = tmp_path / "mail.sqlite3"
    holder = openSynchronousStore(f"sqlite:///{dbpath}")
    try:
        addUser(holder, "alice@example.org", "pw")
        os.chmod(dbpath, 0o640)
        os.chmod(f"{dbpath}-wal", 0o644)
        os.chmod(f"{dbpath}-shm", 0o640)
        second = openSynchronousStore(f"sqlite:///{dbpath}")
        second.close()
        found = modes(dbpath)
    finally:
        holder.close()
    assert (found["-wal"], found["-shm"]) == (0o640, 0o640), {k: oct(v) for k, v in found.items()}


def test_aDatabaseMadeReadOnlyAndWritableAgainKeepsItsSideFilesWritable(tmp_path):
    """
    Only the permissions of others are taken from the side files: a
    database its owner made 0400 (refused then, as it cannot be written)
    and 0600 again is used again.  The refused command had narrowed its
    -shm to 0400, which outlived the chmod 600: every command was then
    refused for the -shm (real mailgate user list, run as its owner).
    """
    dbpath = tmp_path / "mail.sqlite3"
    holder = openSynchronousStore(f"sqlite:///{dbpath}")
    try:
        addUser(holder, "alice@example.org", "pw")
        os.chmod(dbpath, 0o400)
        try:
            openSynchronousStore(f"sqlite:///{dbpath}").close()
        except Exception:
            pass  # refused, for a user other than root
        os.chmod(dbpath, 0o600)
        found = modes(dbpath)
    finally:
        holder.close()
    assert (found["-wal"], found["-shm"]) == (0o600, 0o600), {k: oct(v) for k, v in found.items()}


@pytest.mark.skipif(os.geteuid() != 0, reason="runs the command as another user (nobody): needs root")
def test_aCommandRefusedAReadOnlyDatabaseWorksOnceItIsWritableAgain(tmp_path):
    """
    The command refused a database its user may not write (chmod 400)
    after opening it, SQLite making its -wal and -shm as the file was,
    0400: once the owner had made it 0600 again, every command was still
    refused, for the -shm (real mailgate user list as the file's owner).
    Nor once a command that only reads has read it (it opens it read-only,
    and SQLite made its -wal and -shm 0400 as the file was).
    """
    import shutil
    import subprocess
    import tempfile

    from e2e import MAILGATE, TWISTD, childEnvironment

    nobody = 65534
    path = tempfile.mkdtemp(prefix="mailgate-owner-")
    try:
        os.chown(path, nobody, -1)
        db = os.path.join(path, "mail.sqlite3")

        def asNobody(*argv):
            done = subprocess.run(
                [MAILGATE, "--database", f"sqlite:///{db}", *argv], input="pw\n",
                capture_output=True, text=True, timeout=60, env=childEnvironment(), user=nobody, cwd=path,
            )
            return done.returncode, done.stderr

        assert asNobody("user", "add", "alice@example.org", "--password-stdin") == (0, "")
        os.chmod(db, 0o400)
        code, err = asNobody("user", "quota", "alice@example.org", "1M")
        assert code == 78 and err.endswith(f"(nobody may not read and write {db}: it is nobody's, mode 0400)\n"), err
        assert asNobody("user", "list") == (0, ""), modes(db)
        os.chmod(db, 0o600)
        assert asNobody("user", "quota", "alice@example.org", "1M") == (0, ""), modes(db)
        assert asNobody("user", "list")[0] == 0, modes(db)
        # So with a server started by root as nobody (twistd --uid).
        os.chmod(db, 0o400)
        started = subprocess.run(
            [TWISTD, "-n", "--pidfile=", "-u", str(nobody), "-g", str(nobody), "mailgate", "--database",
             f"sqlite:///{db}", "--pop3", "tcp:0:interface=127.0.0.1"],
            capture_output=True, text=True, timeout=60, cwd=path, env=childEnvironment(),
        )
        assert started.returncode == 78 and "it is nobody's, mode 0400" in started.stderr, started.stderr
        os.chmod(db, 0o600)
        assert asNobody("user", "list")[0] == 0, modes(db)
    finally:
        shutil.rmtree(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="runs the command as another user (nobody): needs root")
def test_aDatabaseTheCommandsUserMayNotUseIsSaidToBeSo(tmp_path):
    """
    SQLite's words for a database the user running mailgate may not use
    name no file and no reason ("unable to open database file", "attempt
    to write a readonly database"): the command run as another user than
    the server's (or a database copied in by root) says whose the file
    is and its mode, or that the user may not create the -wal and -shm
    files in its directory, in one line, exit 78.
    """
    import shutil
    import subprocess
    import tempfile

    from e2e import MAILGATE, childEnvironment

    nobody = 65534
    path = tempfile.mkdtemp(prefix="mailgate-owner-")
    try:
        os.chmod(path, 0o755)
        db = os.path.join(path, "mail.sqlite3")
        openSynchronousStore(f"sqlite:///{db}").close()

        def asNobody():
            done = subprocess.run(
                [MAILGATE, "--database", f"sqlite:///{db}", "user", "list"],
                capture_output=True, text=True, timeout=60, env=childEnvironment(), user=nobody, cwd=path,
            )
            return done.returncode, done.stderr

        # user list only reads: why it may not read the file (it said why
        # it might not write it, "... to write to it").
        assert asNobody() == (
            78,
            f"mailgate: cannot open SQLite database {db} to read it: unable to open database file "
            f"(nobody may not read {db}: it is root's, mode 0600: run this as root)\n",
        )
        os.chown(db, nobody, -1)
        assert asNobody() == (
            78,
            f"mailgate: cannot open SQLite database {db} to read it: attempt to write a readonly database "
            f"(it is in WAL mode, and nobody may not create its -shm in {path}: copy the file where nobody may "
            f"write, or run this as root)\n",
        )
    finally:
        shutil.rmtree(path)


_OUT_OF_DESCRIPTORS = """
import os, resource, sys
from mailgate.errors import ConfigurationError, TemporaryFailure
from mailgate.store.sqlite import SQLiteEngine

engine = SQLiteEngine(sys.argv[1])
engine.connect().close()
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
held = []
try:
    for _ in range(64):
        held.append(os.open(os.devnull, os.O_RDONLY))
except OSError:
    pass
try:
    engine.connect()
except TemporaryFailure as e:
    print("temporary:", e)
except ConfigurationError as e:
    print("configuration:", e)
for fd in held[:8]:
    os.close(fd)
engine.connect().close()
print("connected")
"""


def test_aConnectionOpenedOutOfDescriptorsIsATemporaryFailure(tmp_path):
    """
    A worker thread's connection is opened when it is first given work; a
    process out of file descriptors then (EMFILE) got SQLite's "unable to
    open database file" as a ConfigurationError: a critical error with a
    traceback in the session registry, an internal error for the client,
    and EX_CONFIG at a start, pointing at the file's permissions.  It is a
    temporary failure that says what ran out; with descriptors free again
    the same engine connects.  (In a process of its own: the limit is
    lowered.)
    """
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _OUT_OF_DESCRIPTORS, str(tmp_path / "mail.sqlite3")],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("temporary: ") and "out of file descriptors" in lines[0], lines
    assert lines[1] == "connected", lines


def test_theFirstConnectionsToANewFileAllGetIt(tmp_path):
    """
    The first connections to a new file race to put it in WAL mode, and
    SQLite answers the losers "database is locked" at once, without waiting
    in its busy handler: a worker thread's first connection then failed as
    a configuration error (a critical error, an internal error for the
    client).  Each of three threads connecting at once to each of many new
    files now gets its connection, in WAL mode.
    """
    import threading

    failures = []
    for n in range(150):
        engine = engineFromURL(f"sqlite:///{tmp_path}/new-{n}.sqlite3")
        gate = threading.Barrier(3, timeout=10)

        def connect():
            gate.wait()
            try:
                conn = engine.connect()
            except Exception as e:
                failures.append(e)
            else:
                (mode,) = conn.execute("PRAGMA journal_mode").fetchone()
                if mode != "wal":
                    failures.append(mode)
                conn.close()

        threads = [threading.Thread(target=connect) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert not any(thread.is_alive() for thread in threads)
    assert failures == []


def test_aFileLockedPastTheBusyTimeoutIsATemporaryFailure(tmp_path, monkeypatch):
    """
    A connection that cannot have the file for the whole busy timeout
    (another program holds it locked: a long write, a copy taken with an
    exclusive lock) fails as a temporary failure (a start exits 75, a
    client is told to try again), not as a configuration error saying to
    check the file's permissions; once the lock is gone it connects.
    """
    import sqlite3

    from mailgate.errors import ConfigurationError, TemporaryFailure
    from mailgate.store import sqlite as sqliteModule

    monkeypatch.setattr(sqliteModule, "BUSY_TIMEOUT_MS", 200)
    path = tmp_path / "held.sqlite3"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    engine = engineFromURL(f"sqlite:///{path}")
    with pytest.raises(TemporaryFailure) as refused:
        engine.connect()
    assert not isinstance(refused.value, ConfigurationError)
    assert str(refused.value) == f"cannot open SQLite database {path}: database is locked"
    holder.execute("COMMIT")
    holder.close()
    engine.connect().close()
