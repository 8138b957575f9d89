"""
An SQLite database its server's user may read but not write (an
operator's C{chmod 400}, a file left root's, a directory the user may not
create files in), met by the real C{twistd mailgate} and C{mailgate}
command run as that user (nobody): one line naming the file and its
owner and mode, or the directory, exit 78 (C{deliver} 75), never a
server that starts and refuses every message with 451.

Running as another user needs root: without it these tests skip (CI
runs as root).  The files are in a directory of their own under /tmp,
as nobody cannot reach pytest's temporary directories.
"""

import os
import shutil
import subprocess
import tempfile

import pytest

from e2e import DEADLINE, MAILGATE, TWISTD, childEnvironment
from mailgate.store import openSynchronousStore
from mailgate.testing import addUser

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs mailgate as another user (nobody): needs root")

NOBODY = 65534
ALICE = "alice@example.org"


@pytest.fixture
def nobodys():
    """
    A directory of nobody's holding a database of nobody's, mode 0600,
    with a user: what a server running as nobody uses.
    """
    where = tempfile.mkdtemp(prefix="mailgate-readonly-")
    try:
        os.chmod(where, 0o700)
        path = os.path.join(where, "mail.sqlite3")
        store = openSynchronousStore(f"sqlite:///{path}")
        try:
            addUser(store, ALICE, "pw")
        finally:
            store.close()
        for name in (where, path):
            os.chown(name, NOBODY, NOBODY)
        yield where, path
    finally:
        shutil.rmtree(where)


def _asNobody(argv, where, stdin=""):
    done = subprocess.run(
        argv, input=stdin, capture_output=True, text=True, timeout=DEADLINE, env=childEnvironment(),
        user=NOBODY, cwd=where,
    )
    return done.returncode, done.stdout, done.stderr


def _command(path, *argv, stdin=""):
    return _asNobody([MAILGATE, "--database", f"sqlite:///{path}", *argv], os.path.dirname(path), stdin)


def _start(path):
    """
    Start C{twistd mailgate} as nobody on C{path}; it is expected to stop
    at once: its exit status and everything it wrote.
    """
    code, out, err = _asNobody(
        [TWISTD, "-n", "--pidfile=", "mailgate", "--database", f"sqlite:///{path}",
         "--pop3", "tcp:0:interface=127.0.0.1", "--hostname", "mailgate.test"],
        os.path.dirname(path),
    )
    return code, out + err


def test_aDatabaseItsUserMayOnlyReadIsRefusedNamingIt(nobodys):
    """
    The database mode 0400: SQLite opens it read-only without a word.
    The server started and answered every message 451 ("attempt to
    write a readonly database"), and deliver exited 75 saying "try
    again" without naming the file; now the start stops, exit 78, and
    every command that writes says which file, whose and its mode.  One
    that only reads (user list) reads it, as it is.
    """
    where, path = nobodys
    os.chmod(path, 0o400)
    said = f"cannot open SQLite database {path} to write to it (nobody may not read and write {path}: it is nobody's, mode 0400)"
    assert _command(path, "deliver", ALICE, stdin="Subject: hi\n\nhello\n") == (75, "", f"mailgate: {said}\n")
    assert _command(path, "user", "quota", ALICE, "1M") == (78, "", f"mailgate: {said}\n")
    code, out, err = _command(path, "user", "list")
    assert (code, err) == (0, "") and ALICE in out, out
    code, output = _start(path)
    assert code == 78, output
    assert f"mailgate: {said}\n" in output and "Traceback" not in output, output


def test_aDirectoryItsUserMayNotWriteIsNamedAtStart(nobodys):
    """
    The database's directory mode 0500: the server cannot make its lock
    file there (nor SQLite its -wal and -shm).  The start said only
    "cannot open SQLite database ...: Permission denied"; it names the
    lock file and the directory.  A lock file of root's is named with
    its owner and mode.
    """
    where, path = nobodys
    os.chmod(where, 0o500)
    code, output = _start(path)
    assert code == 78, output
    assert (
        f"mailgate: cannot open SQLite database {path}: cannot open its lock file {path}.lock: Permission denied "
        f"(nobody may not create files in {where}, where the server makes its lock file and SQLite the "
        f"database's -wal and -shm files)\n"
    ) in output, output
    os.chmod(where, 0o700)
    with open(path + ".lock", "w"):
        pass
    os.chmod(path + ".lock", 0o600)
    code, output = _start(path)
    assert code == 78, output
    assert (
        f"cannot open its lock file {path}.lock: Permission denied "
        f"(nobody may not read and write {path}.lock: it is root's, mode 0600)\n"
    ) in output, output
