"""
Defects found reviewing the administration side (the mailgate command,
its importers and its SQLite openings), each through the real thing: the
real mailgate command, real SQLite files.
"""

import json
import os
import pwd
import shutil
import sqlite3
import subprocess
import tempfile
from pathlib import Path

import pytest

from e2e import DEADLINE, MAILGATE, childEnvironment
from e2e import mailgateHere as mailgate
from test_dovecot_migration import ALICE


rootOnly = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the command as another user")


@pytest.fixture
def serversDirectory(request):
    """
    A directory all may enter (pytest's own are root's alone), holding a
    database of the user daemon (the server's, here) where Alice has a
    message: its -wal and -shm there too, as a running server keeps them
    (the connection the test holds open, closed at the end).
    """
    directory = Path(tempfile.mkdtemp(prefix="mailgate-review-"))
    request.addfinalizer(lambda: shutil.rmtree(directory, ignore_errors=True))
    directory.chmod(0o755)
    path = directory / "mail.sqlite3"
    url = f"sqlite:///{path}"
    assert mailgate(url, "user", "add", ALICE, "--password-stdin", stdin="pw\n")[0] == 0
    assert mailgate(url, "deliver", ALICE, stdin="Subject: hi\n\nhello\n")[0] == 0
    held = sqlite3.connect(path)
    request.addfinalizer(held.close)
    held.execute("SELECT count(*) FROM users").fetchone()
    daemon = pwd.getpwnam("daemon")
    for name in ("", "-wal", "-shm"):
        os.chown(f"{path}{name}", daemon.pw_uid, daemon.pw_gid)
    return path


def _asNobody(path, *argv):
    nobody = pwd.getpwnam("nobody")
    done = subprocess.run(
        [MAILGATE, "--database", f"sqlite:///{path}", *argv], capture_output=True, text=True, timeout=DEADLINE,
        env=childEnvironment(), user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[],
    )
    return done.returncode, done.stdout, done.stderr


@rootOnly
@pytest.mark.usefixtures("cheapCommandHashes")
@pytest.mark.parametrize("command", [("db", "check"), ("db", "version")])
def test_aDatabaseItsUserMayNotReadIsSaidToBeOne(serversDirectory, command):
    """
    db check and db version run as a user who may not read the database
    (the server's, mode 0600: the commonest mistake, running them as
    another user) say so, and whose it is.  Since they open it read-only
    (71ebdaf) they said it was in WAL mode and the user might not create
    its -shm, of any file, a rollback-journal backup too.
    """
    path = serversDirectory
    path.chmod(0o600)
    code, out, err = _asNobody(path, *command)
    assert (code, out) == (78, "")
    assert err == (
        f"mailgate: cannot open SQLite database {path} to read it: unable to open database file (nobody may not "
        f"read {path}: it is daemon's, mode 0600: run this as daemon)\n"
    )


@rootOnly
@pytest.mark.usefixtures("cheapCommandHashes")
def test_aShmItsUserMayNotReadIsNamed(serversDirectory):
    """
    A database its user may read, whose -shm (the server's) he may not:
    named as such, not as a -shm he may not create.
    """
    path = serversDirectory
    path.chmod(0o644)
    Path(f"{path}-wal").chmod(0o644)
    Path(f"{path}-shm").chmod(0o600)
    code, out, err = _asNobody(path, "db", "check")
    assert (code, out) == (78, "")
    assert err == (
        f"mailgate: cannot open SQLite database {path} to read it: unable to open database file (nobody may not "
        f"read {path}-shm: it is daemon's, mode 0600: run this as daemon)\n"
    )


@rootOnly
@pytest.mark.usefixtures("cheapCommandHashes")
def test_aSnapshotWithAWalAndNoShmOnAReadOnlyMountIsSaidToBeSo(serversDirectory, tmp_path):
    """
    A copy of a live database and its -wal, without its -shm, on a
    filesystem mounted read-only (a snapshot that left the -shm out):
    SQLite reads the -wal through a -shm, which none can make there.  Said
    so, with what to do; it was told to run as the database's owner, who
    can no more make one than root.
    """
    path = serversDirectory
    Path(f"{path}-shm").unlink()
    script = f'mount --bind -o ro "{path.parent}" "{path.parent}" && exec "$@"'
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, "sh", MAILGATE, "--database", f"sqlite:///{path}", "db", "check"],
        capture_output=True, text=True, timeout=DEADLINE, env=childEnvironment(),
    )
    if done.returncode != 78 and "mount" in done.stderr:
        pytest.skip(f"no read-only bind mount here: {done.stderr.strip()}")
    assert (done.returncode, done.stdout) == (78, "")
    assert done.stderr == (
        f"mailgate: cannot open SQLite database {path} to read it: unable to open database file (the filesystem "
        f"of {path.parent} is mounted read-only, and its -wal is read through a -shm, which there is none of and "
        f"none can be made: copy the file and its -wal where root may write)\n"
    )


@pytest.mark.usefixtures("cheapCommandHashes")
def test_anExportOfEveryUserShowsADirectoryAsGivenOnOneLine(tmp_path):
    """
    mailbox export --all DIR, each user's failure line: DIR as given, with
    anything unprintable as ?, on one line, as the export of one user (and
    every failure of the command, d69fc70) shows it.  It was written raw:
    a DIR holding a line break split the line in two, the second free to
    look like mailgate's own.
    """
    url = f"sqlite:///{tmp_path / 'mail.sqlite3'}"
    assert mailgate(url, "user", "add", ALICE, "--password-stdin", stdin="pw\n")[0] == 0
    (tmp_path / "file").write_text("")
    given = str(tmp_path / "file" / "x\ny")
    shown = given.replace("\n", "?")
    done = subprocess.run(
        [MAILGATE, "--database", url, "mailbox", "export", "--all", given], capture_output=True, text=True,
        timeout=DEADLINE, env=childEnvironment(),
    )
    assert (done.returncode, done.stdout) == (73, "")
    assert done.stderr.splitlines() == [
        f"mailgate: {ALICE}: not exported: cannot make {shown}: Not a directory",
        "mailgate: 1 user could not be exported (named above)",
    ]


@pytest.mark.usefixtures("cheapCommandHashes")
def test_theNullDeviceIsAnEmptyConfigurationFile(tmp_path):
    """
    --config /dev/null, the customary empty file (the defaults), is read
    as one again, with no warning: since devices were refused (bb6e1c2,
    for /dev/zero, read until memory ran out), the real mailgate said
    '/dev/null: cannot read the configuration file: it is a character
    device', exit 78, for config --check and every command.  /dev/zero
    is still refused.
    """
    url = f"sqlite:///{tmp_path / 'mail.sqlite3'}"
    assert mailgate(url, "user", "add", ALICE, "--password-stdin", stdin="pw\n")[0] == 0

    def run(*argv):
        done = subprocess.run(
            [MAILGATE, *argv], capture_output=True, text=True, timeout=DEADLINE, env=childEnvironment(),
        )
        return done.returncode, done.stdout, done.stderr

    assert run("--config", "/dev/null", "config", "--check") == (0, "mailgate: /dev/null: configuration OK\n", "")
    code, out, err = run("--config", "/dev/null", "--database", url, "user", "list")
    assert (code, err) == (0, "")
    assert ALICE in out
    code, out, err = run("--config", "/dev/zero", "config", "--check")
    assert (code, err) == (
        78, "mailgate: /dev/zero: cannot read the configuration file: it is a character device, not a regular file\n"
    )


_INTERRUPTED_WRITE = """
import os, sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("PRAGMA cache_size = 2")
conn.execute("BEGIN")
conn.execute("UPDATE users SET address = 'mallory@example.org'")
conn.execute("DELETE FROM maildrop")
conn.execute("CREATE TABLE filler (x)")
for _ in range(200):
    conn.execute("INSERT INTO filler VALUES (?)", (os.urandom(2000),))
os.kill(os.getpid(), 9)
"""


@pytest.fixture
def interruptedBackup(tmp_path):
    """
    A backup (rollback journal, as db backup leaves it) whose writer was
    killed in a transaction that spilled pages into the file: its hot
    -journal beside it.
    """
    import sys

    url = f"sqlite:///{tmp_path / 'live.sqlite3'}"
    assert mailgate(url, "user", "add", ALICE, "--password-stdin", stdin="pw\n")[0] == 0
    assert mailgate(url, "deliver", ALICE, stdin="Subject: hi\n\nhello\n")[0] == 0
    directory = tmp_path / "backups"
    directory.mkdir()
    backup = directory / "backup.sqlite3"
    assert mailgate(url, "db", "backup", str(backup))[0] == 0
    done = subprocess.run([sys.executable, "-c", _INTERRUPTED_WRITE, str(backup)], timeout=DEADLINE)
    assert done.returncode == -9
    assert Path(f"{backup}-journal").read_bytes()[:8] == bytes.fromhex("d9d505f920a163d7")
    return backup


@pytest.mark.usefixtures("cheapCommandHashes")
@pytest.mark.parametrize("command", [("db", "check"), ("db", "version")])
def test_aBackupWithAWriteCutShortIsSaidToNeedItsRollback(interruptedBackup, command):
    """
    db check and db version of a file whose -journal holds a write cut
    short: SQLite's read-only opening refuses it until it is rolled back,
    a write they do not make.  Said so, with what to do, the file left as
    it is; it was said to be a WAL database whose -shm could not be made.
    """
    import hashlib

    backup = interruptedBackup
    before = hashlib.sha256(backup.read_bytes()).hexdigest()
    code, out, err = mailgate(f"sqlite:///{backup}", *command)
    assert (code, out) == (78, "")
    assert err == (
        f"mailgate: cannot open SQLite database {backup} to read it: attempt to write a readonly database (its "
        "-journal holds a write that was cut short, which must be rolled back before it is read, and this command "
        "writes nothing: run mailgate db upgrade on it first, which rolls it back)\n"
    )
    assert hashlib.sha256(backup.read_bytes()).hexdigest() == before
    assert mailgate(f"sqlite:///{backup}", "db", "upgrade")[0] == 0
    code, out, err = mailgate(f"sqlite:///{backup}", "user", "list", "--json")
    assert (code, err) == (0, "")
    assert ALICE in out and "mallory" not in out


@pytest.mark.usefixtures("cheapCommandHashes")
def test_aBackupWithAWriteCutShortIsRestoredRolledBack(interruptedBackup):
    """
    db backup reads its source read-only (a backup it restores keeps its
    checksum), but one with a write cut short is opened to write, as
    before, so that its -journal is rolled back: the copy holds Alice and
    her message, not the killed write (nor is it refused as db check
    refuses it).
    """
    backup = interruptedBackup
    restored = backup.parent.parent / "restored.sqlite3"
    code, out, err = mailgate(f"sqlite:///{backup}", "db", "backup", str(restored))
    assert (code, err) == (0, ""), out
    code, out, err = mailgate(f"sqlite:///{restored}", "user", "list", "--json")
    assert (code, err) == (0, "")
    assert [json.loads(line)["messages"] for line in out.splitlines()] == [1]
    assert ALICE in out and "mallory" not in out


@pytest.mark.usefixtures("cheapCommandHashes")
@rootOnly
def test_aBackupWithAWriteCutShortOnAReadOnlyMountIsNotReadHalfWritten(interruptedBackup):
    """
    The same on a filesystem mounted read-only: it was read as it is
    (immutable), the interrupted write's pages with it, and db check
    said 'malformed database schema (filler)' of a backup that is sound
    once rolled back (or, with fewer pages spilled, would have checked
    the half-written state).  Now said, with what to do.
    """
    backup = interruptedBackup
    directory = backup.parent
    script = f'mount --bind -o ro "{directory}" "{directory}" && exec "$@"'
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, "sh", MAILGATE, "--database", f"sqlite:///{backup}", "db", "check"],
        capture_output=True, text=True, timeout=DEADLINE, env=childEnvironment(),
    )
    if done.returncode != 78 and "mount" in done.stderr:
        pytest.skip(f"no read-only bind mount here: {done.stderr.strip()}")
    assert (done.returncode, done.stdout) == (78, "")
    assert done.stderr == (
        f"mailgate: cannot open SQLite database {backup} to read it: attempt to write a readonly database (its "
        f"-journal holds a write that was cut short, which must be rolled back before it is read, and the "
        f"filesystem of {directory} is mounted read-only: copy the file and its -journal where root may write, "
        f"and run mailgate db upgrade on the copy, which rolls it back)\n"
    )


@rootOnly
@pytest.mark.usefixtures("cheapCommandHashes")
def test_rootsDatabaseIsReadByAnotherUserWhereHeMayMakeItsSideFiles(request):
    """
    A WAL database of root's, mode 0444, in a directory every user may
    write (sticky, as /tmp), no -wal or -shm beside it: another user's
    read makes them, his, which root (its owner, its server's user) writes
    all the same.  It was refused, saying 'nobody would leave it a -wal and
    -shm its owner root may not write', which root may.
    """
    directory = Path(tempfile.mkdtemp(prefix="mailgate-review-"))
    request.addfinalizer(lambda: shutil.rmtree(directory, ignore_errors=True))
    directory.chmod(0o1777)
    path = directory / "mail.sqlite3"
    url = f"sqlite:///{path}"
    assert mailgate(url, "user", "add", ALICE, "--password-stdin", stdin="pw\n")[0] == 0
    assert sorted(p.name for p in directory.iterdir()) == ["mail.sqlite3"]
    assert path.read_bytes()[18:20] == b"\x02\x02"
    path.chmod(0o444)
    for argv in (("db", "check"), ("user", "list")):
        code, out, err = _asNobody(path, *argv)
        assert (code, err) == (0, ""), out
        assert ALICE in out or "sound" in out
    path.chmod(0o600)
    code, out, err = mailgate(url, "user", "add", "bob@example.org", "--password-stdin", stdin="pw\n")
    assert (code, err) == (0, "")


_SLOW_LOGGER = '''
import os, sys, time
from twisted.logger import textFileLogObserver


def observer():
    # Made by twistd once mailgate's service is, before the service starts.
    open(os.environ["REVIEW_LOGGER_REACHED"], "w").close()
    deadline = time.monotonic() + 20
    while not os.path.exists(os.environ["REVIEW_LOGGER_GO"]) and time.monotonic() < deadline:
        time.sleep(0.01)
    return textFileLogObserver(sys.stdout)
'''


def test_aReloadSignalBetweenTheServicesMakingAndItsStartIsTakenOnceStarted(tmp_path):
    """
    SIGHUP and SIGUSR1 that come after twistd mailgate's service is made
    and before it starts (twistd starts its logger, writes its pid file,
    daemonizes, in between) are taken once it has started, as those during
    its making are (6ceab6b).  They were held during the making only: the
    real twistd mailgate sent SIGHUP at its 'starting up' line was ended by
    it (exit -1) in 3 starts of 4.  The test's logger factory (twistd's
    --logger, called in that interval) holds twistd there until both are
    sent.
    """
    from e2e import ServerProcess, databaseURL, waitFor
    import signal

    (tmp_path / "reviewlogger.py").write_text(_SLOW_LOGGER)
    reached, go = tmp_path / "reached", tmp_path / "go"
    env = {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])),
        "REVIEW_LOGGER_REACHED": str(reached), "REVIEW_LOGGER_GO": str(go),
    }
    url = databaseURL(tmp_path / "mail.sqlite3")
    assert mailgate(url, "user", "add", ALICE, "--password-stdin", stdin="pw\n")[0] == 0

    class SlowLogged(ServerProcess):
        command = (ServerProcess.command[0], "-n", "--pidfile=", "--logger=reviewlogger.observer", "mailgate")

    server = SlowLogged(url, ["--no-apop"], cwd=tmp_path, env=env)
    server.spawn()
    try:
        waitFor(reached.exists, "twistd at its logger, the service made")
        server.process.send_signal(signal.SIGUSR1)
        server.process.send_signal(signal.SIGHUP)
        go.touch()
        server.waitUntilListening()
        waitFor(lambda: "SIGHUP: nothing to reload" in server.stdout, "the SIGHUP taken")
        assert "SIGUSR1: no log file of mailgate's to reopen" in server.stdout
        assert server.process.poll() is None
    finally:
        server.stop()
    assert "Traceback" not in server.stdout + server.stderr, server.log()
