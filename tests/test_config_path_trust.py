"""
Who may change the configuration file, beyond its own mode and its
directory's: it names the database (with its password), the TLS keys and
the listeners, so whoever may replace it runs the server as they like.

Two ways were not warned of (`config --check` and `twistd mailgate` said
nothing):

- a directory higher up the path (a parent of the file's directory) that
  every user may write, without the sticky bit: any user renames the
  subdirectory away and puts their own, with their own file, in its place;
- a file, or a directory on the path, owned by another unprivileged user
  (neither root nor the user the server runs as), who may rewrite or
  replace it whatever its mode says.

The walk is OpenSSH's StrictModes one (safe_path in misc.c): every
directory from the file up to /.  The tests run as root; `nobody` and
`daemon` are the other users.
"""

import os
import pwd
import subprocess

from e2e import DEADLINE, MAILGATE, childEnvironment, sqliteOnly, waitFor
from e2e import mailgate_server  # noqa: F401 (fixture)
from mailgate import config

REPLACED = "and so the database, listeners and certificates the server uses at its next start or reload chosen"


def check(path):
    done = subprocess.run(
        [MAILGATE, "--config", str(path), "config", "--check"], capture_output=True, text=True,
        timeout=DEADLINE, env=childEnvironment(),
    )
    assert (done.returncode, done.stdout) == (0, f"mailgate: {path}: configuration OK\n"), done.stderr
    return done.stderr


def configIn(directory, mode=0o644):
    path = directory / "mailgate.toml"
    path.write_text('hostname = "mail.example.org"\n')
    path.chmod(mode)
    return path


def tree(tmp_path, *modes):
    """
    Nested directories a/b/... below C{tmp_path}, of the modes given, outermost first.
    """
    directory = tmp_path
    made = []
    for name, mode in zip("abcdef", modes):
        directory = directory / name
        directory.mkdir()
        directory.chmod(mode)
        made.append(directory)
    return made


def uid(name):
    return pwd.getpwnam(name).pw_uid


def test_aParentEveryUserMayWriteIsWarnedOf(tmp_path):
    top, etc = tree(tmp_path, 0o777, 0o755)
    path = configIn(etc)
    assert check(path) == (
        f"mailgate: warning: the directory {top} above the configuration file {path} may be written by every user "
        f"of this machine (mode 0777), who may replace the file, {REPLACED}: chmod o-w {top}\n"
    )


def test_aParentWithTheStickyBitIsNotWarnedOf(tmp_path):
    """
    As /tmp: other users may not rename what they do not own there.
    """
    top, etc = tree(tmp_path, 0o1777, 0o755)
    assert check(configIn(etc)) == ""


def test_aParentAboveALinksDirectoryIsWarnedOf(tmp_path):
    top, shared, safe = tree(tmp_path, 0o777, 0o755, 0o755)
    target = configIn(safe)
    etc = tmp_path / "etc"
    etc.mkdir()
    etc.chmod(0o755)
    link = etc / "mailgate.toml"
    link.symlink_to(target)
    assert check(link) == (
        f"mailgate: warning: the directory {top} above the configuration file {link} may be written by every user "
        f"of this machine (mode 0777), who may replace the file, {REPLACED}: chmod o-w {top}\n"
    )


def test_aFileOwnedByAnotherUserIsWarnedOf(tmp_path):
    etc, = tree(tmp_path, 0o755)
    path = configIn(etc)
    os.chown(path, uid("nobody"), -1)
    assert check(path) == (
        f"mailgate: warning: the configuration file {path} is owned by nobody, not root, who may rewrite it, "
        f"{REPLACED}: chown root it\n"
    )


def test_aDirectoryOwnedByAnotherUserIsWarnedOf(tmp_path):
    top, etc = tree(tmp_path, 0o755, 0o755)
    os.chown(top, uid("daemon"), -1)
    path = configIn(etc)
    assert check(path) == (
        f"mailgate: warning: the directory {top} above the configuration file {path} is owned by daemon, not root, "
        f"who may replace the file, {REPLACED}: chown root {top}\n"
    )


def test_aLinkOwnedByAnotherUserInAStickyDirectoryIsWarnedOf(tmp_path):
    """
    In a sticky directory the owner of an entry may still replace it.
    """
    safe, sticky = tree(tmp_path, 0o755, 0o1777)
    target = configIn(safe)
    link = sticky / "mailgate.toml"
    link.symlink_to(target)
    os.chown(link, uid("nobody"), -1, follow_symlinks=False)
    assert check(link) == (
        f"mailgate: warning: the configuration file {link}, a symbolic link in a directory with the sticky bit, is "
        f"owned by nobody, not root, who may replace it, {REPLACED}: chown -h root {link}\n"
    )


def test_theUsualLayoutsAreNotWarnedOf(tmp_path):
    """
    Root's 0644 or 0640 file in root's 0755 directories; a file of the
    user the server runs as, in its own directory (a home); a root file
    in a sticky directory every user may write (/tmp).
    """
    etc, = tree(tmp_path, 0o755)
    for mode in (0o644, 0o640, 0o600):
        assert check(configIn(etc, mode)) == "", oct(mode)
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(0o700)
    assert check(configIn(home, 0o600)) == ""
    sticky = tmp_path / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    assert check(configIn(sticky, 0o644)) == ""


def test_aStickyDirectoryDoesNotCoverAFileOfAnotherUser(tmp_path):
    """
    /tmp's sticky bit keeps other users from each other's files, not a
    user from their own: a file there owned by another user is theirs.
    """
    sticky, = tree(tmp_path, 0o1777)
    path = configIn(sticky)
    os.chown(path, uid("nobody"), -1)
    assert "is owned by nobody" in check(path)


@sqliteOnly
def test_twistdWarnsOfAParentEveryUserMayWriteAtStart(tmp_path, mailgate_server):
    top, etc = tree(tmp_path, 0o777, 0o755)
    path = configIn(etc)
    server = mailgate_server("--config", str(path))
    expected = (
        f"the directory {top} above the configuration file {path} may be written by every user of this machine "
        f"(mode 0777), who may replace the file, {REPLACED}: chmod o-w {top}"
    )
    # Logged once the listeners are up.
    waitFor(lambda: expected in server.stdout, "the warning")
    assert server.process.poll() is None


def test_aFileInTheHomeOfTheUserTheServerRunsAsIsNotWarnedOf(tmp_path, monkeypatch):
    """
    Run as another user than root (monkeypatched: the tests run as root),
    that user's own file in their own directory is theirs to change; a
    third user's is warned of, naming both.
    """
    home, = tree(tmp_path, 0o755)
    os.chown(home, uid("nobody"), -1)
    path = configIn(home, 0o600)
    os.chown(path, uid("nobody"), -1)
    monkeypatch.setattr(os, "geteuid", lambda: uid("nobody"))
    assert (config.ownedByOthers(str(path)), config.writableByOthers(str(path))) == (None, None)
    os.chown(path, uid("daemon"), -1)
    assert config.ownedByOthers(str(path)) == (
        f"the configuration file {path} is owned by daemon, neither root nor nobody, who may rewrite it, "
        f"{REPLACED}: chown root it"
    )


def warnedOpen(directory, path):
    """
    The warning of a directory every user may write that holds the
    configuration file C{path} or a link on its way.
    """
    return (
        f"mailgate: warning: the directory {directory} of the configuration file {path} may be written by every "
        f"user of this machine (mode 0777), who may replace the file, {REPLACED}: chmod o-w {directory}\n"
    )


def test_aFileThroughALinkIntoADirectoryEveryoneMayWriteIsWarnedOf(tmp_path):
    """
    A configuration file given by a symbolic link (/etc/mailgate.toml to a
    file kept elsewhere) whose file lies in a directory every user may
    write, without the sticky bit: whoever may replace that file chooses
    the server's database, as for a file given by its own name there
    (18c7a8b).  Through the link it was not warned of: the link's
    directory alone was looked at (6363a63).
    """
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    etc = tmp_path / "etc"
    etc.mkdir()
    etc.chmod(0o755)
    link = etc / "mailgate.toml"
    link.symlink_to(configIn(shared))
    assert check(link) == warnedOpen(shared, link)


def test_aLinkInBetweenInADirectoryEveryoneMayWriteIsWarnedOf(tmp_path):
    """
    A chain of symbolic links (/etc/mailgate.toml -> SHARED/current -> a
    file kept elsewhere) is as open to replacement as its weakest
    directory: a user who may write SHARED (no sticky bit) may replace the
    link there and so choose the file read.  A link in between was not
    looked at (69568cf).
    """
    [safe] = tree(tmp_path, 0o755)
    configIn(safe)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    between = shared / "current"
    # Relative, as such links often are.
    between.symlink_to(f"../{safe.name}/mailgate.toml")
    etc = tmp_path / "etc"
    etc.mkdir()
    etc.chmod(0o755)
    link = etc / "mailgate.toml"
    link.symlink_to(between)
    assert check(link) == warnedOpen(shared, link)


def test_aChainThroughSafeDirectoriesIsNotWarnedOf(tmp_path):
    [safe] = tree(tmp_path, 0o755)
    target = configIn(safe)
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    (sticky / "current").symlink_to(target)
    etc = tmp_path / "etc"
    etc.mkdir()
    etc.chmod(0o755)
    link = etc / "mailgate.toml"
    link.symlink_to(sticky / "current")
    assert check(link) == ""
