"""
The C{mailgate} admin command, driven through L{mailgate.cli.run} against a
real SQLite file, and once through the installed console script.

Exit codes follow sysexits(3): 0 ok, 64 usage, 65 data error, 67 no such
user, 73 cannot create, 75 temporary failure (deliver), 78 configuration.
"""

import base64
import contextlib
import datetime
import io
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from mailgate import __version__
from mailgate.auth.passwords import verifyPassword
from mailgate.cli import run
from mailgate.printable import columns
from mailgate.store.schema import LATEST, MIGRATIONS, SCHEMA_TABLE
from mailgate.testing import POP3Session, memoryStore, readWhole, resultOf

# The command's new passwords are hashed cheaply here (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("cheapCommandHashes")

ALICE = "alice@example.org"
BOB = "bob@example.org"

PASSWORD = "Tr0ub4dor&3-alice"
NEW_PASSWORD = "correct-horse-battery-staple"
BOB_PASSWORD = "bob-the-builder-42"
WRONG_PASSWORD = "definitely-not-it-99"
SECRETS = (PASSWORD, NEW_PASSWORD, BOB_PASSWORD, WRONG_PASSWORD)

UNREACHABLE = "sqlite:////nonexistent/directory/x.sqlite3"


class Result:
    def __init__(self, code, out, err):
        self.code = code
        self.out = out
        self.err = err

    def __repr__(self):
        return f"<exit {self.code} out={self.out!r} err={self.err!r}>"


def _stdin(data):
    if isinstance(data, str):
        return io.StringIO(data)
    return io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", newline="")


class CLI:
    """
    Runs the command against one database and checks, on every run, that
    no password ever reaches standard output or standard error.
    """

    def __init__(self, path):
        self.path = path
        self.url = f"sqlite:///{path}"

    def __call__(self, *argv, stdin=b"", database=None, environ=None):
        out, err = io.StringIO(), io.StringIO()
        args = ["--database", database or self.url, *argv]
        code = run(args, stdin=_stdin(stdin), stdout=out, stderr=err, environ=environ or {})
        result = Result(code, out.getvalue(), err.getvalue())
        for secret in SECRETS:
            assert secret not in result.out and secret not in result.err, result
        assert "Traceback" not in result.err, result
        return result

    def create(self):
        """
        Create the database (as a server's start would), empty.
        """
        result = self("db", "upgrade")
        assert result.code == 0, result

    def add(self, address, password, *flags):
        result = self("user", "add", address, "--password-stdin", *flags, stdin=f"{password}\n")
        assert result.code == 0, result
        return result

    def rows(self, sql, args=()):
        conn = sqlite3.connect(self.path)
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()

    def user(self, address):
        store = memoryStore(self.url)
        try:
            return resultOf(store.findUser(address))
        finally:
            store.close()

    def messages(self, address):
        """
        The stored octets of each message of a maildrop, in POP3 order.
        """
        store = memoryStore(self.url)
        try:
            maildrop = resultOf(store.openMaildrop(resultOf(store.findUser(address))))
            found = []
            for index in range(len(maildrop.sizes)):
                found.append(readWhole(resultOf(maildrop.openMessage(index))))
            maildrop.release()
            return found
        finally:
            store.close()


@pytest.fixture
def cli(tmp_path):
    return CLI(tmp_path / "admin.sqlite3")


def oneLineError(result):
    assert result.err.startswith("mailgate: "), result
    assert result.err.endswith("\n") and result.err.count("\n") == 1, result
    return result.err


# -- user add ----------------------------------------------------------------


def test_userAdd(cli):
    result = cli("user", "add", ALICE, "--password-stdin", stdin=f"{PASSWORD}\n")
    assert result.code == 0
    assert result.out == f"added {ALICE}\n"
    assert result.err == ""
    user = cli.user(ALICE)
    assert verifyPassword(PASSWORD, user.passwordHash)
    assert user.apopSecret is None


def test_passwordsAreStoredHashed(cli):
    cli.add(ALICE, PASSWORD)
    cli.add(BOB, BOB_PASSWORD, "--apop")
    rows = dict(
        (address, (passwordHash, scram, apop))
        for address, passwordHash, scram, apop in cli.rows(
            "SELECT address, password_hash, scram_sha256, apop_secret FROM users"
        )
    )
    for address, password in ((ALICE, PASSWORD), (BOB, BOB_PASSWORD)):
        passwordHash, scram, _ = rows[address]
        assert passwordHash.startswith("$scrypt$")
        assert password not in passwordHash
        assert scram.startswith("SCRAM-SHA-256$") and password not in scram
    assert rows[ALICE][2] is None
    assert rows[BOB][2] == BOB_PASSWORD
    # Nothing else in the file holds Alice's password.
    assert PASSWORD.encode() not in cli.path.read_bytes()


def test_userAddNormalisesTheAddress(cli):
    result = cli("user", "add", "Alice@Example.ORG", "--password-stdin", stdin=f"{PASSWORD}\n")
    assert result.code == 0
    assert result.out == f"added {ALICE}\n"
    assert cli.rows("SELECT address FROM users") == [(ALICE,)]


def test_aDomainInUnicodeIsItsASCIIForm(cli):
    """
    An address whose domain is written in Unicode names the user of its
    ASCII form (IDNA 2008, UTS 46), in every command as in C{deliver},
    SMTP and LMTP: C{user add} refused it as an invalid domain, so the
    user mail to that address reaches could not be added under it.
    """
    result = cli("user", "add", "alice@B\u00fccher.example", "--password-stdin", stdin=f"{PASSWORD}\n")
    assert (result.code, result.out) == (0, "added alice@xn--bcher-kva.example\n"), result
    assert cli("deliver", "alice@xn--bcher-kva.example", stdin=b"Subject: x\n\nx\n").code == 0
    listed = cli("mailbox", "list", "alice@b\u00fccher.example", "--json")
    assert (listed.code, len(listed.out.splitlines())) == (0, 1), listed
    assert cli("user", "quota", "alice@b\u00fccher.example", "1M").code == 0
    imported = cli("user", "import", "-", "--domain", "B\u00fccher.example", stdin=b"bob:{PLAIN}b\n")
    assert imported.code == 0, imported
    assert cli.user("bob@xn--bcher-kva.example") is not None
    # What IDNA cannot convert stays an invalid domain.
    refused = cli("user", "add", "bob@\u2603.example", "--password-stdin", stdin=f"{PASSWORD}\n")
    assert (refused.code, oneLineError(refused)) == (65, "mailgate: invalid domain: '\u2603.example'\n")


def test_userAddWithAPOP(cli):
    result = cli("user", "add", ALICE, "--password-stdin", "--apop", stdin=f"{PASSWORD}\n")
    assert result.code == 0
    assert result.out == f"added {ALICE} (APOP enabled)\n"
    assert cli.user(ALICE).apopSecret == PASSWORD


def test_userAddDuplicate(cli):
    cli.add(ALICE, PASSWORD)
    result = cli("user", "add", "ALICE@example.org", "--password-stdin", stdin=f"{NEW_PASSWORD}\n")
    assert result.code == 73
    assert oneLineError(result) == f"mailgate: user {ALICE} already exists\n"
    assert result.out == ""
    assert verifyPassword(PASSWORD, cli.user(ALICE).passwordHash)


def test_userAddInvalidAddress(cli):
    result = cli("user", "add", "not-an-address", "--password-stdin", stdin=f"{PASSWORD}\n")
    assert result.code == 65
    oneLineError(result)
    # Refused before the database is opened: not even made.
    assert not cli.path.exists()
    cli.add(ALICE, PASSWORD)
    assert cli("user", "add", "not-an-address", "--password-stdin", stdin=f"{PASSWORD}\n").code == 65
    assert cli.rows("SELECT address FROM users") == [(ALICE,)]


def test_anAddressWithALineBreakInsideIsInvalid(cli):
    """
    A line break inside an address is refused (exit 65), however placed:
    the address check's regular expressions matched up to a line end
    before their end, so C{user add $'mallory\\n@example.org'} added a user
    whose address broke C{user list}'s table in two lines, as did a domain
    label ending in one.
    """
    cli.add(ALICE, PASSWORD)
    for address, line in (
        ("mallory\n@example.org", "mailgate: invalid local part in 'mallory\\n@example.org'\n"),
        ("eve@example.org\n.evil", "mailgate: invalid domain: 'example.org\\n.evil'\n"),
    ):
        result = cli("user", "add", address, "--password-stdin", stdin=f"{PASSWORD}\n")
        assert (result.code, result.err) == (65, line), address
        renamed = cli("user", "rename", ALICE, address)
        assert (renamed.code, renamed.err) == (65, line), address
    assert cli.rows("SELECT address FROM users") == [(ALICE,)]


def test_passwordLineEndIsNotPartOfThePassword(cli):
    cli("user", "add", ALICE, "--password-stdin", stdin=f"{PASSWORD}\r\n".encode())
    assert verifyPassword(PASSWORD, cli.user(ALICE).passwordHash)


def test_passwordWithSpacesIsKept(cli):
    cli("user", "add", ALICE, "--password-stdin", stdin=f"  {PASSWORD} two  \n")
    assert verifyPassword(f"  {PASSWORD} two  ", cli.user(ALICE).passwordHash)


def test_noTerminalAndNoPasswordStdin(cli):
    result = cli("user", "add", ALICE, stdin=f"{PASSWORD}\n")
    assert result.code == 64
    assert "--password-stdin" in oneLineError(result)
    # Refused before the database is opened: none is made for it.
    assert not cli.path.exists()


@pytest.mark.parametrize("stdin", ["\n", "", "\r\n"], ids=["newline", "eof", "crlf"])
def test_emptyPassword(cli, stdin):
    result = cli("user", "add", ALICE, "--password-stdin", stdin=stdin)
    assert result.code == 65
    oneLineError(result)
    # Refused before the database is opened: none is made for it (one was,
    # with no user).
    assert not cli.path.exists()


@pytest.mark.parametrize("argv, stdin, line", [
    ([], b"\xff\xfe\n", "the password is not UTF-8 text"),
    ([], b"x" * 1025 + b"\n", "the password is 1025 octets long, at most 1024"),
    (["--hashed"], b"garbage\n", "unusable password hash: not a hash"),
], ids=["not-utf-8", "too-long", "not-a-hash"])
def test_aBadPasswordMakesNoDatabase(cli, argv, stdin, line):
    """
    user add refuses a password it cannot take (exit 65) before the
    database is opened, as it refuses a bad address: it made the SQLite
    file first, an empty database under what may be a mistyped
    --database, which every command then took for one rather than say
    "no such database file".
    """
    result = cli("user", "add", ALICE, "--password-stdin", *argv, stdin=stdin)
    assert result.code == 65
    assert oneLineError(result).startswith(f"mailgate: {line}")
    assert not cli.path.exists()
    assert cli("user", "list").code == 78


def test_passwordWithNUL(cli):
    result = cli("user", "add", ALICE, "--password-stdin", stdin=f"{PASSWORD}\0x\n")
    assert result.code == 65
    oneLineError(result)


def test_aPasswordIsAtMost1024Octets(cli):
    """
    A password to set is at most 1024 octets of UTF-8 (what AUTH PLAIN and
    AUTH LOGIN carry with any address), counted in octets, not characters;
    a line longer than 4096 octets is refused as soon as that much is read,
    by every command reading one (standard input without a line end, as
    from /dev/zero, was read whole into memory and set as the password).
    """
    cli.add(BOB, BOB_PASSWORD)
    assert cli("user", "add", ALICE, "--password-stdin", stdin="x" * 1024 + "\n").code == 0
    for password, size in (("x" * 1025, 1025), ("\u00e9" * 513, 1026)):
        for argv in (["user", "add", "carol@example.org"], ["user", "passwd", ALICE]):
            result = cli(*argv, "--password-stdin", stdin=(password + "\n").encode())
            assert (result.code, oneLineError(result)) == (
                65, f"mailgate: the password is {size} octets long, at most 1024 (what POP3's AUTH PLAIN "
                "and AUTH LOGIN carry with any address)\n"), argv
    assert verifyPassword("x" * 1024, cli.user(ALICE).passwordHash)
    # AUTH PLAIN carries it with the longest address there can be.
    longest = "l" * 64 + "@" + ".".join(["d" * 61] * 3) + ".org"
    assert len(longest) == 254
    accented = "\u00e9" * 512  # 1024 octets
    assert cli("user", "add", longest, "--password-stdin", stdin=accented + "\n").code == 0
    store = memoryStore(cli.url)
    try:
        session = POP3Session(store)
        assert session.command("AUTH PLAIN") == "+ \r\n"
        plain = base64.b64encode(f"\0{longest}\0{accented}".encode()).decode()
        assert session.command(plain).startswith(f"+OK {longest} has 0 messages")
    finally:
        store.close()
    endless = b"y" * 100_000  # no line end
    for argv in (["user", "passwd", ALICE], ["user", "test", BOB], ["user", "add", "carol@example.org", "--hashed"],
                 ["user", "apop", BOB, "on"]):
        for stdin in (endless, endless.decode()):  # octets, and a text stream without them
            result = cli(*argv, "--password-stdin", stdin=stdin)
            assert (result.code, oneLineError(result)) == (
                65, "mailgate: the line read is longer than 4096 octets: no password (or hash) is that long\n"), argv
    assert cli.user("carol@example.org") is None


def test_aPasswordIsReadAsUTF8WhateverTheLocale(cli):
    """
    The password's octets on standard input are UTF-8, also where the
    locale's encoding is another (Latin-1): C{pé} set there was set as
    C{pÃ©}, which no client sending UTF-8 logs in with.
    """
    cli.add(ALICE, PASSWORD)
    latin1 = io.TextIOWrapper(io.BytesIO("p\u00e9-secret\n".encode()), encoding="latin-1", newline="")
    out, err = io.StringIO(), io.StringIO()
    code = run(["--database", cli.url, "user", "passwd", ALICE, "--password-stdin"], stdin=latin1, stdout=out,
               stderr=err, environ={})
    assert (code, err.getvalue()) == (0, "")
    assert verifyPassword("p\u00e9-secret", cli.user(ALICE).passwordHash)


def test_aByteOrderMarkIsNotPartOfThePassword(cli):
    """
    A password file an editor saved with a byte order mark first (UTF-8
    with BOM, Notepad's): the mark is not part of the password, as it is
    not of C{user import}'s first user name.  It was hashed in, so the
    password as typed failed USER/PASS (SCRAM, whose SASLprep drops it,
    took it).
    """
    for argv in (["user", "add", ALICE], ["user", "passwd", ALICE]):
        password = NEW_PASSWORD if argv[1] == "passwd" else PASSWORD
        result = cli(*argv, "--password-stdin", stdin=b"\xef\xbb\xbf" + password.encode() + b"\r\n")
        assert (result.code, result.err) == (0, ""), result
        assert verifyPassword(password, cli.user(ALICE).passwordHash)
    assert cli("user", "test", ALICE, "--password-stdin", stdin=b"\xef\xbb\xbf" + NEW_PASSWORD.encode()).code == 0
    store = memoryStore(cli.url)
    try:
        assert POP3Session(store).login(ALICE, NEW_PASSWORD).startswith("+OK")
    finally:
        store.close()


def test_aPasswordAskedForOnTheTerminal(tmp_path):
    """
    Without --password-stdin the password is asked for twice on the
    terminal (a real one: a pseudo-terminal), and set; Ctrl-D at the
    prompt is one line, exit 65, where it was C{internal error:
    EOFError}, exit 70, and so are octets that are not the locale's
    encoding (a terminal set to Latin-1 on a UTF-8 host), where it was
    C{internal error: UnicodeDecodeError}.
    """
    import pty
    import select
    import time

    script = Path(sys.executable).parent / "mailgate"
    assert script.exists(), f"{script} is missing: run `make install`"
    url = f"sqlite:///{tmp_path / 'tty.sqlite3'}"

    def onTerminal(argv, *answers):
        pid, fd = pty.fork()
        if pid == 0:  # pragma: no cover (the child)
            # A UTF-8 locale, as most hosts have, whatever the tests run in.
            environment = {**os.environ, "LC_ALL": "C.UTF-8"}
            os.execve(str(script), [str(script), "--database", url, *argv], environment)
        seen, deadline = b"", time.monotonic() + 60
        try:
            for answer in answers:
                while not seen.endswith(b": ") and time.monotonic() < deadline:
                    if select.select([fd], [], [], 1)[0]:
                        seen += os.read(fd, 1024)
                seen = b""
                os.write(fd, answer)
            while time.monotonic() < deadline:
                if select.select([fd], [], [], 1)[0]:
                    try:
                        chunk = os.read(fd, 1024)
                    except OSError:  # the child has gone: Linux's EIO
                        break
                    if not chunk:
                        break
                    seen += chunk
        finally:
            os.close(fd)
            _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status), seen.decode()

    code, said = onTerminal(["user", "add", ALICE], f"{PASSWORD}\n".encode(), f"{PASSWORD}\n".encode())
    assert (code, said.strip()) == (0, f"added {ALICE}"), said
    assert verifyPassword(PASSWORD, CLI(tmp_path / "tty.sqlite3").user(ALICE).passwordHash)
    code, said = onTerminal(["user", "passwd", ALICE], b"\x04")
    assert (code, said.strip()) == (65, "mailgate: no password given (end of input at the prompt)"), said
    assert verifyPassword(PASSWORD, CLI(tmp_path / "tty.sqlite3").user(ALICE).passwordHash)
    code, said = onTerminal(["user", "passwd", ALICE], "caf\u00e9\n".encode("latin-1"))
    assert (code, said.strip()) == (
        65, "mailgate: the password typed is not utf-8 text (the locale's encoding, which the terminal must send)"
    ), said
    assert verifyPassword(PASSWORD, CLI(tmp_path / "tty.sqlite3").user(ALICE).passwordHash)


def test_aClosedStandardInputIsSaidToBe(cli, monkeypatch):
    """
    Standard input closed when the command started (C{<&-}; Python gives
    it as C{None}): exit 66, an input that cannot be read, in one line;
    it was C{internal error: AttributeError}, exit 70.
    """
    cli.add(ALICE, PASSWORD)
    monkeypatch.setattr(sys, "stdin", None)
    for argv, line in (
        (["user", "passwd", ALICE, "--password-stdin"],
         "mailgate: standard input is closed: nothing to read the password from\n"),
        (["user", "import", "-"], "mailgate: cannot read -: standard input is closed\n"),
    ):
        out, err = io.StringIO(), io.StringIO()
        code = run(["--database", cli.url, *argv], stdin=None, stdout=out, stderr=err, environ={})
        assert (code, err.getvalue()) == (66, line), argv
    assert verifyPassword(PASSWORD, cli.user(ALICE).passwordHash)


CLOSED_STDIN = "standard input is closed: nothing to read the password from"


@pytest.mark.parametrize("argv, line", [
    (["user", "add", ALICE, "--password-stdin"], f"mailgate: {CLOSED_STDIN}\n"),
    (["user", "import", "-"], "mailgate: cannot read -: standard input is closed\n"),
    (["import", "pop3", "pop3://mail.example.org", ALICE, "--password-stdin"], f"mailgate: {CLOSED_STDIN}\n"),
])
def test_aClosedStandardInputIsSaidBeforeTheDatabaseIsOpened(cli, monkeypatch, argv, line):
    """
    As a bad option value: standard input closed where the command reads
    it is said before the database is opened, whatever its state.  user
    add and user import made the SQLite file first; import pop3 said "no
    such database file" (78).
    """
    monkeypatch.setattr(sys, "stdin", None)
    out, err = io.StringIO(), io.StringIO()
    code = run(["--database", cli.url, *argv], stdin=None, stdout=out, stderr=err, environ={})
    assert (code, out.getvalue(), err.getvalue()) == (66, "", line)
    assert not cli.path.exists()


def test_deliverWithStandardInputClosedSaysSo(cli, monkeypatch):
    """
    C{mailgate deliver ADDRESS <&-}: one line saying standard input is
    closed and nothing was delivered, exit 75 as deliver's other failures
    that are not the message's (an MTA keeps it); it was C{internal
    error: AttributeError: 'NoneType' object has no attribute 'read'}.
    """
    cli.add(ALICE, PASSWORD)
    monkeypatch.setattr(sys, "stdin", None)
    out, err = io.StringIO(), io.StringIO()
    code = run(["--database", cli.url, "deliver", ALICE], stdin=None, stdout=out, stderr=err, environ={})
    assert (code, out.getvalue(), err.getvalue()) == (
        75, "", "mailgate: standard input is closed: no message to read; nothing was delivered\n"
    )
    assert cli.messages(ALICE) == []


# -- user passwd ---------------------------------------------------------------


def test_userPasswd(cli):
    cli.add(ALICE, PASSWORD)
    result = cli("user", "passwd", ALICE, "--password-stdin", stdin=f"{NEW_PASSWORD}\n")
    assert result.code == 0
    assert result.out == f"password changed for {ALICE}\n"
    user = cli.user(ALICE)
    assert verifyPassword(NEW_PASSWORD, user.passwordHash)
    assert not verifyPassword(PASSWORD, user.passwordHash)
    assert user.apopSecret is None


def test_userPasswdKeepsAPOPInStep(cli):
    cli.add(ALICE, PASSWORD, "--apop")
    assert cli("user", "passwd", ALICE, "--password-stdin", stdin=f"{NEW_PASSWORD}\n").code == 0
    user = cli.user(ALICE)
    assert verifyPassword(NEW_PASSWORD, user.passwordHash)
    assert user.apopSecret == NEW_PASSWORD


def test_userPasswdUnknownUser(cli):
    cli.create()
    result = cli("user", "passwd", ALICE, "--password-stdin", stdin=f"{NEW_PASSWORD}\n")
    assert result.code == 67
    assert oneLineError(result) == f"mailgate: no such user: {ALICE}\n"


def test_userPasswdEmptyPasswordChangesNothing(cli):
    cli.add(ALICE, PASSWORD)
    result = cli("user", "passwd", ALICE, "--password-stdin", stdin="\n")
    assert result.code == 65
    assert verifyPassword(PASSWORD, cli.user(ALICE).passwordHash)


class _TypedWhile:
    """
    Standard input whose password line comes once C{meanwhile} has run:
    what another administrator (or a script) does while the password is
    typed at the terminal, between the command's look-up of the user and
    its write.
    """

    def __init__(self, line, meanwhile):
        self.buffer = self
        self._line = line
        self._meanwhile = meanwhile

    def readline(self, limit=-1):
        self._meanwhile()
        return self._line

    def isatty(self):
        return False


def _typedWhile(cli, argv, line, *statements):
    def meanwhile():
        conn = sqlite3.connect(cli.path)
        try:
            with conn:
                for statement in statements:
                    conn.execute(statement)
        finally:
            conn.close()

    out, err = io.StringIO(), io.StringIO()
    code = run(
        ["--database", cli.url, *argv, "--password-stdin"], stdin=_TypedWhile(line, meanwhile), stdout=out,
        stderr=err, environ={},
    )
    return code, err.getvalue()


@pytest.mark.parametrize("argv, typed", [
    (["user", "passwd", ALICE], NEW_PASSWORD),
    (["user", "apop", ALICE, "on"], PASSWORD),
], ids=["passwd", "apop-on"])
def test_aPasswordSetWhileTheAddressWentToAnotherUserChangesNobody(cli, argv, typed):
    """
    While the password is typed, Alice is renamed away and Bob renamed to
    her address: nothing is written (exit 75, run it again), where Bob
    got what was made of Alice's (user apop on: Alice's password hash,
    and her password opened Bob's mailbox, his own no longer did).  A
    user deleted meanwhile is no such user (67), not internal error (70).
    """
    cli.add(ALICE, PASSWORD)
    cli.add(BOB, BOB_PASSWORD)
    code, err = _typedWhile(
        cli, argv, f"{typed}\n".encode(),
        f"UPDATE users SET address = 'alice.old@example.org' WHERE address = '{ALICE}'",
        f"UPDATE users SET address = '{ALICE}' WHERE address = '{BOB}'",
    )
    assert code == 75, err
    assert err == (
        f"mailgate: the user {ALICE} changed meanwhile (its password changed, or the user was renamed or deleted "
        "and the address given to another); nothing was changed: run the command again\n"
    )
    bob = cli.user(ALICE)
    assert verifyPassword(BOB_PASSWORD, bob.passwordHash) and not verifyPassword(typed, bob.passwordHash)
    assert bob.apopSecret is None
    # Bob's password: the one apop on checks, of the user there now.
    code, err = _typedWhile(cli, argv, f"{BOB_PASSWORD}\n".encode(), f"DELETE FROM users WHERE address = '{ALICE}'")
    assert (code, err) == (67, f"mailgate: no such user: {ALICE} (deleted or renamed meanwhile)\n")


# -- user del -----------------------------------------------------------------


def test_userDel(cli):
    cli.add(ALICE, PASSWORD)
    cli.add(BOB, BOB_PASSWORD)
    assert cli("deliver", ALICE, stdin=b"Subject: one\n\nbody\n").code == 0
    assert cli("deliver", ALICE, BOB, stdin=b"Subject: two\n\nbody\n").code == 0
    result = cli("user", "del", ALICE)
    assert result.code == 0
    assert result.out == f"deleted {ALICE} and their maildrop\n"
    assert cli.user(ALICE) is None
    assert cli.rows("SELECT address FROM users") == [(BOB,)]
    # Alice's maildrop is gone; the body Bob still holds stays.
    assert cli.rows("SELECT count(*) FROM maildrop") == [(1,)]
    assert cli.rows("SELECT refcount FROM bodies") == [(1,)]
    assert cli.messages(BOB) == [b"Subject: two\r\n\r\nbody\r\n"]


def test_userDelUnknownUser(cli):
    cli.create()
    result = cli("user", "del", ALICE)
    assert result.code == 67
    assert oneLineError(result) == f"mailgate: no such user: {ALICE}\n"


# -- user list -----------------------------------------------------------------


def test_userList(cli):
    cli.add(BOB, BOB_PASSWORD)
    cli.add(ALICE, PASSWORD, "--apop")
    message = b"Subject: hi\n\nhello\n"
    assert cli("deliver", ALICE, stdin=message).code == 0
    assert cli("deliver", ALICE, stdin=message).code == 0
    result = cli("user", "list")
    assert result.code == 0
    lines = result.out.splitlines()
    assert lines[0].split() == [
        "ADDRESS", "MESSAGES", "OCTETS", "APOP", "QUOTA", "MAX-MSGS", "EXPIRE", "LAST-LOGIN", "NETWORKS", "DISABLED"
    ]
    size = len(message.replace(b"\n", b"\r\n"))
    assert [line.split() for line in lines[1:]] == [
        [ALICE, "2", str(2 * size), "on", "default", "default", "default", "never", "any", "no"],
        [BOB, "0", "0", "off", "default", "default", "default", "never", "any", "no"],
    ]


def test_userListColumnsStayInLineForWideNames(cli):
    """
    A user name in CJK letters (two columns each on a terminal) or with a
    combining mark (none) is padded to the same column as an ASCII one:
    padding by characters pushed the rest of its line out of line.
    """
    names = ["\u5f20\u4f1f@example.cn", "\u0915\u093f\u0901@example.in", BOB]
    for name in names:
        cli.add(name, BOB_PASSWORD)
    lines = cli("user", "list").out.splitlines()
    assert len(lines) == 4
    # The users differ by name alone: each line, its name padded, takes
    # the columns of the ASCII one, whose "0" is in the MESSAGES column.
    ascii = [line for line in lines if line.startswith(BOB)][0]
    assert [columns(line) for line in lines[1:]] == [columns(ascii)] * 3
    assert [columns(line[: line.index(" 0 ") + 2]) for line in lines[1:]] == [ascii.index(" 0 ") + 2] * 3


def test_userListEmpty(cli):
    cli.create()
    result = cli("user", "list")
    assert result.code == 0
    assert result.out.splitlines()[0].split()[:4] == ["ADDRESS", "MESSAGES", "OCTETS", "APOP"]
    assert len(result.out.splitlines()) == 1


# -- user apop ------------------------------------------------------------------


def test_userApopOnNeedsTheCurrentPassword(cli):
    cli.add(ALICE, PASSWORD)
    result = cli("user", "apop", ALICE, "on", "--password-stdin", stdin=f"{WRONG_PASSWORD}\n")
    assert result.code == 65
    oneLineError(result)
    assert cli.user(ALICE).apopSecret is None
    assert cli.rows("SELECT apop_secret FROM users") == [(None,)]

    result = cli("user", "apop", ALICE, "on", "--password-stdin", stdin=f"{PASSWORD}\n")
    assert result.code == 0
    assert result.out == f"APOP enabled for {ALICE}\n"
    user = cli.user(ALICE)
    assert user.apopSecret == PASSWORD
    # The password itself is unchanged.
    assert verifyPassword(PASSWORD, user.passwordHash)


def test_userApopOnKeepsCramMD5States(cli):
    """
    Turning APOP on for a user imported from Dovecot with a C{{CRAM-MD5}}
    hash keeps its CRAM-MD5 states: by default they are what has CRAM-MD5
    offered, and erased (they were), the user's CRAM-MD5 client failed
    once no other user had them.
    """
    from mailgate.auth.md5state import hmacMD5Context

    states = hmacMD5Context(PASSWORD.encode("utf-8")).hex()
    cli.add(ALICE, "{CRAM-MD5}" + states, "--hashed")
    result = cli("user", "apop", ALICE, "on", "--password-stdin", stdin=f"{PASSWORD}\n")
    assert result.code == 0, result
    user = cli.user(ALICE)
    assert (user.apopSecret, user.cramMD5) == (PASSWORD, states)
    store = memoryStore(cli.url)
    try:
        assert resultOf(store.digestLoginUsers()) == (True, True)
    finally:
        store.close()


def test_userApopOff(cli):
    cli.add(ALICE, PASSWORD, "--apop")
    before = cli.user(ALICE)
    result = cli("user", "apop", ALICE, "off")
    assert result.code == 0
    assert "erased" in result.out
    assert cli.rows("SELECT apop_secret FROM users") == [(None,)]
    after = cli.user(ALICE)
    assert after.passwordHash == before.passwordHash
    assert after.scramSha256 == before.scramSha256


def test_userApopOnWithoutPasswordSource(cli):
    cli.add(ALICE, PASSWORD)
    result = cli("user", "apop", ALICE, "on", stdin=f"{PASSWORD}\n")
    assert result.code == 64
    assert cli.user(ALICE).apopSecret is None


def test_userApopUnknownUser(cli):
    cli.create()
    for state in ("on", "off"):
        result = cli("user", "apop", ALICE, state, "--password-stdin", stdin=f"{PASSWORD}\n")
        assert result.code == 67
        oneLineError(result)


# -- mailbox list ---------------------------------------------------------------


def test_mailboxList(cli):
    cli.add(ALICE, PASSWORD)
    first = b"Subject: one\n\nfirst\n"
    second = b"Subject: two\n\nsecond message\n"
    assert cli("deliver", ALICE, stdin=first).code == 0
    assert cli("deliver", ALICE, stdin=second).code == 0
    result = cli("mailbox", "list", ALICE)
    assert result.code == 0
    lines = result.out.splitlines()
    assert lines[0].split() == ["NUMBER", "OCTETS", "UNIQUE-ID", "ARRIVED"]

    store = memoryStore(cli.url)
    try:
        infos = resultOf(store.listMessages(ALICE))
    finally:
        store.close()
    rows = [line.split() for line in lines[1:3]]
    sizes = [len(m.replace(b"\n", b"\r\n")) for m in (first, second)]
    # Then, after an empty line, the maildrop's use and quota.
    assert lines[3:] == ["", f"in use: 2 messages, {sum(sizes)} octets; quota: server default"]
    for row, info, raw in zip(rows, infos, (first, second)):
        number, octets, uniqueId, arrived = row
        assert int(number) == info.number
        assert int(octets) == info.size == len(raw.replace(b"\n", b"\r\n"))
        assert uniqueId == info.uniqueId
        parsed = datetime.datetime.strptime(arrived, "%Y-%m-%dT%H:%M:%SZ")
        assert parsed.replace(tzinfo=datetime.timezone.utc).timestamp() == info.arrived
    assert [r[0] for r in rows] == ["1", "2"]
    assert rows[0][2] != rows[1][2]


def test_mailboxListEmpty(cli):
    cli.add(ALICE, PASSWORD)
    result = cli("mailbox", "list", ALICE)
    assert result.code == 0
    assert result.out.splitlines()[1:] == ["", "in use: 0 messages, 0 octets; quota: server default"]


def test_mailboxListUnknownUser(cli):
    cli.create()
    result = cli("mailbox", "list", ALICE)
    assert result.code == 67
    oneLineError(result)


# -- deliver ------------------------------------------------------------------


def test_deliver(cli):
    cli.add(ALICE, PASSWORD)
    result = cli("deliver", ALICE, stdin=b"Subject: hi\r\n\r\nhello\r\n")
    assert result.code == 0
    assert result.err == ""
    store = memoryStore(cli.url)
    try:
        [uniqueId] = [m.uniqueId for m in resultOf(store.listMessages(ALICE))]
    finally:
        store.close()
    assert result.out == f"delivered to {ALICE} as {uniqueId}\n"
    assert cli.messages(ALICE) == [b"Subject: hi\r\n\r\nhello\r\n"]


def test_deliverNormalisesLineEnds(cli):
    cli.add(ALICE, PASSWORD)
    assert cli("deliver", ALICE, stdin=b"Subject: lf\n\nline one\nline two\n").code == 0
    assert cli("deliver", ALICE, stdin=b"Subject: mixed\r\n\nline one\r\nno end").code == 0
    assert cli("deliver", ALICE, stdin=b"Subject: noend\n\nlast line").code == 0
    assert cli.messages(ALICE) == [
        b"Subject: lf\r\n\r\nline one\r\nline two\r\n",
        b"Subject: mixed\r\n\r\nline one\r\nno end\r\n",
        b"Subject: noend\r\n\r\nlast line\r\n",
    ]


def test_deliverEightBitIsByteExact(cli):
    cli.add(ALICE, PASSWORD)
    message = b"Subject: =?utf-8?q?x?=\n\n\xff\xfe latin-1 \xe9t\xe9\n"
    assert cli("deliver", ALICE, stdin=message).code == 0
    assert cli.messages(ALICE) == [message.replace(b"\n", b"\r\n")]


def test_deliverToSeveralRecipientsStoresTheMessageOnce(cli):
    cli.add(ALICE, PASSWORD)
    cli.add(BOB, BOB_PASSWORD)
    result = cli("deliver", ALICE, "Bob@Example.org", stdin=b"Subject: both\n\nhi\n")
    assert result.code == 0
    assert sorted(line.split()[2] for line in result.out.splitlines()) == [ALICE, BOB]
    assert cli.rows("SELECT count(*), max(refcount) FROM bodies") == [(1, 2)]
    assert cli.messages(ALICE) == cli.messages(BOB) == [b"Subject: both\r\n\r\nhi\r\n"]
    for address in (ALICE, BOB):
        listing = cli("mailbox", "list", address)
        assert listing.out.split("\n\n")[0].count("\n") == 1
        assert "in use: 1 message, 21 octets" in listing.out


def test_deliverToUnknownRecipientDeliversNothing(cli):
    cli.add(ALICE, PASSWORD)
    result = cli("deliver", ALICE, "nobody@example.org", stdin=b"Subject: x\n\nbody\n")
    assert result.code == 67
    assert oneLineError(result) == "mailgate: no such user: nobody@example.org\n"
    assert result.out == ""
    assert cli.messages(ALICE) == []
    assert cli.rows("SELECT count(*) FROM bodies") == [(0,)]
    assert cli.rows("SELECT count(*) FROM maildrop") == [(0,)]


def test_deliverToADomainInUnicode(cli):
    """
    An MTA's ${recipient} of SMTPUTF8 mail may name the domain in Unicode:
    the user of its ASCII form gets it, as over SMTP and LMTP (it was no
    such user, 67, and bounced).
    """
    user = "alice@xn--bcher-kva.example"
    cli.add(user, PASSWORD)
    result = cli("deliver", "alice@BÜCHER.example", stdin=b"Subject: idn\n\nbody\n")
    assert result.code == 0, result
    assert cli.messages(user) == [b"Subject: idn\r\n\r\nbody\r\n"]


def test_deliverToInvalidAddress(cli):
    cli.add(ALICE, PASSWORD)
    result = cli("deliver", ALICE, "not an address", stdin=b"Subject: x\n\nbody\n")
    assert result.code == 67
    oneLineError(result)
    assert cli.rows("SELECT count(*) FROM maildrop") == [(0,)]


def test_deliverEmptyMessage(cli):
    cli.add(ALICE, PASSWORD)
    assert cli("deliver", ALICE, stdin=b"").code == 0
    assert cli.messages(ALICE) == [b""]


# -- an unreachable database ----------------------------------------------------


@pytest.mark.parametrize(
    "argv, code",
    [
        (["deliver", ALICE], 75),
        (["user", "add", ALICE, "--password-stdin"], 78),
        (["user", "passwd", ALICE, "--password-stdin"], 78),
        (["user", "del", ALICE], 78),
        (["user", "list"], 78),
        (["user", "apop", ALICE, "off"], 78),
        (["mailbox", "list", ALICE], 78),
        (["db", "upgrade"], 78),
        (["db", "version"], 78),
    ],
)
def test_unreachableDatabase(cli, argv, code):
    result = cli(*argv, stdin=f"{PASSWORD}\n", database=UNREACHABLE)
    assert result.code == code, result
    oneLineError(result)
    assert result.out == ""


@pytest.mark.parametrize("argv, code", [(["deliver", ALICE], 75), (["user", "list"], 78), (["db", "upgrade"], 78)])
def test_newerSchemaIsRefused(cli, argv, code):
    cli.add(ALICE, PASSWORD)
    conn = sqlite3.connect(cli.path)
    conn.execute(f"INSERT INTO {SCHEMA_TABLE} VALUES (?, CURRENT_TIMESTAMP)", (LATEST + 1,))
    conn.commit()
    conn.close()
    result = cli(*argv, stdin=b"Subject: x\n\nbody\n")
    assert result.code == code, result
    oneLineError(result)
    assert cli.rows("SELECT count(*) FROM maildrop") == [(0,)]


# -- db ---------------------------------------------------------------------


def test_dbUpgradeAndVersion(cli):
    # An empty file: a database no migration has touched.
    cli.path.touch()
    result = cli("db", "version")
    assert result.code == 0
    assert result.out == f"schema version 0 (this mailgate: {LATEST})\n"

    result = cli("db", "upgrade")
    assert result.code == 0
    # Migration 7 is PostgreSQL's: on SQLite it only records the version.
    assert result.out == "".join(
        f"applied migration {m.version}: {m.description}"
        f"{' (nothing to change on SQLite)' if m.dialects == ('postgres',) else ''}\n"
        for m in MIGRATIONS
    ) + f"schema is at version {LATEST}\n"
    assert (
        "applied migration 7: PostgreSQL: message chunks stored without compression (nothing to change on SQLite)\n"
    ) in result.out

    result = cli("db", "upgrade")
    assert result.code == 0
    assert result.out == f"schema is at version {LATEST}\n"

    result = cli("db", "version")
    assert result.code == 0
    assert result.out == f"schema version {LATEST} (this mailgate: {LATEST})\n"


def test_otherCommandsMigrateFirst(cli):
    cli.path.touch()
    assert cli("user", "list").code == 0
    assert cli("db", "version").out == f"schema version {LATEST} (this mailgate: {LATEST})\n"
    assert cli("db", "upgrade").out == f"schema is at version {LATEST}\n"


# -- usage -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["user"],
        ["user", "add"],
        ["user", "passwd"],
        ["user", "del"],
        ["user", "apop"],
        ["user", "apop", ALICE],
        ["mailbox"],
        ["mailbox", "list"],
        ["deliver"],
        ["db"],
        ["db", "upgrade"],
        ["db", "version"],
        ["user", "list"],
        ["deliver", ALICE],
    ],
)
def test_helpForEverySubcommand(cli, argv):
    result = cli(*argv, "--help")
    assert result.code == 0, result
    assert result.out.startswith("usage: mailgate")
    assert result.err == ""
    # Asking for help touches no database.
    assert not cli.path.exists()


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["bogus"],
        ["user"],
        ["user", "add"],
        ["user", "frobnicate", ALICE],
        ["user", "apop", ALICE],
        ["user", "apop", ALICE, "maybe"],
        ["user", "add", ALICE, "--no-such-option"],
        ["user", "list", "extra"],
        ["mailbox", "list"],
        ["deliver"],
        ["db"],
        ["db", "downgrade"],
    ],
)
def test_badUsage(cli, argv):
    result = cli(*argv)
    assert result.code == 64, result
    assert result.out == ""
    assert "usage: mailgate" in result.err
    assert "error:" in result.err
    assert not cli.path.exists()


def test_version(cli):
    result = cli("--version")
    assert result.code == 0
    assert result.out == f"mailgate {__version__}\n"


def test_databaseFromEnvironment(tmp_path):
    path = tmp_path / "env.sqlite3"
    out, err = io.StringIO(), io.StringIO()
    code = run(
        ["user", "add", ALICE, "--password-stdin"],
        stdin=io.StringIO(f"{PASSWORD}\n"),
        stdout=out,
        stderr=err,
        environ={"MAILGATE_DATABASE": f"sqlite:///{path}"},
    )
    assert code == 0, err.getvalue()
    assert CLI(path).user(ALICE) is not None


# -- the installed console script -----------------------------------------------


def test_consoleScript(tmp_path):
    script = Path(sys.executable).parent / "mailgate"
    assert script.exists(), f"{script} is missing: run `make install`"
    env = {k: v for k, v in os.environ.items() if k != "MAILGATE_DATABASE"}
    url = f"sqlite:///{tmp_path / 'script.sqlite3'}"

    def mailgate(*argv, data=b"", database=url):
        return subprocess.run(
            [str(script), "--database", database, *argv],
            input=data,
            capture_output=True,
            cwd=tmp_path,
            env=env,
            timeout=120,
        )

    helped = mailgate("--help")
    assert helped.returncode == 0
    assert helped.stdout.startswith(b"usage: mailgate")

    assert mailgate("user", "frobnicate").returncode == 64

    added = mailgate("user", "add", ALICE, "--password-stdin", data=f"{PASSWORD}\n".encode())
    assert added.returncode == 0, added.stderr
    assert PASSWORD.encode() not in added.stdout + added.stderr

    delivered = mailgate("deliver", ALICE, data=b"Subject: pipe\n\nthrough a real pipe\n")
    assert delivered.returncode == 0, delivered.stderr
    assert delivered.stdout.startswith(f"delivered to {ALICE} as ".encode())

    unknown = mailgate("deliver", "nobody@example.org", data=b"Subject: x\n\nbody\n")
    assert unknown.returncode == 67
    assert unknown.stderr == b"mailgate: no such user: nobody@example.org\n"

    unreachable = mailgate("deliver", ALICE, data=b"Subject: x\n\nbody\n", database=UNREACHABLE)
    assert unreachable.returncode == 75
    assert unreachable.stderr.startswith(b"mailgate: ")
    assert unreachable.stderr.count(b"\n") == 1

    assert CLI(tmp_path / "script.sqlite3").messages(ALICE) == [
        b"Subject: pipe\r\n\r\nthrough a real pipe\r\n"
    ]


def test_aReaderThatGoesAwayIsNotAnError(tmp_path):
    """
    C{mailgate user list | head -1}: a reader that stops reading (here one
    gone before anything was written) ends the command quietly with the
    status a shell reports for C{ls | head} (128 + SIGPIPE), not with
    C{internal error: BrokenPipeError} and 70 as if mailgate had failed;
    C{deliver}, whose message is stored by then, exits 0 (not 75: retried,
    it would be stored twice).
    """
    script = Path(sys.executable).parent / "mailgate"
    assert script.exists(), f"{script} is missing: run `make install`"
    url = f"sqlite:///{tmp_path / 'pipe.sqlite3'}"
    assert run(["--database", url, "user", "add", ALICE, "--password-stdin"], stdin=io.StringIO(PASSWORD + "\n"),
               stdout=io.StringIO(), stderr=io.StringIO()) == 0
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}

    def intoAClosedPipe(command, env, data=None):
        readEnd, writeEnd = os.pipe()
        os.close(readEnd)
        try:
            return subprocess.run(
                [str(script), "--database", url, *command],
                input=data,
                stdout=writeEnd,
                stderr=subprocess.PIPE,
                cwd=tmp_path,
                env=env,
                timeout=120,
            )
        finally:
            os.close(writeEnd)

    # Buffered (the error comes at exit) and unbuffered (at the first write).
    for env in (environ, {**environ, "PYTHONUNBUFFERED": "1"}):
        for command in (["user", "list"], ["who"], ["mailbox", "list", ALICE]):
            listed = intoAClosedPipe(command, env)
            assert (listed.returncode, listed.stderr) == (141, b""), (command, env.get("PYTHONUNBUFFERED"))
        # deliver reports only once the message is stored: 0, or the MTA
        # would deliver it again.
        delivered = intoAClosedPipe(["deliver", ALICE], env, data=b"Subject: piped\n\nonce\n")
        assert (delivered.returncode, delivered.stderr) == (0, b""), env.get("PYTHONUNBUFFERED")
    assert len(CLI(tmp_path / "pipe.sqlite3").messages(ALICE)) == 2


def test_helpIntoAReaderGoneIsNotAnError():
    """
    C{mailgate serve --help | head}: help whose reader has gone ends as a
    listing's does, 141 and nothing on standard error; it was Python's
    traceback of the BrokenPipeError and exit 1 (serve's help is 24 KB, so
    C{head} leaves before most of it is written).
    """
    for argv in (["--help"], ["user", "--help"], ["serve", "--help"]):
        readEnd, writeEnd = os.pipe()
        os.close(readEnd)
        err = io.StringIO()
        # Unbuffered, as the error comes at the first write that fills the pipe.
        with io.TextIOWrapper(io.FileIO(writeEnd, "w"), write_through=True) as stdout:
            code = run(argv, stdin=io.StringIO(""), stdout=stdout, stderr=err, environ={})
            assert (code, err.getvalue()) == (141, ""), argv


def test_anOutputThatCannotBeWrittenIsSaidInOneLine(cli, monkeypatch):
    """
    Standard output on a full disk (/dev/full), or closed when the command
    started (C{>&-}, which Python gives as C{None}): one line saying so,
    exit 74 (EX_IOERR), for a table, for JSON lines and for a message's
    octets; it was C{internal error: OSError} or C{AttributeError}, exit
    70.  C{deliver}, which writes only once the message is stored, exits
    0 saying so: it exited 75, and the MTA stored the message again.
    """
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    cli.add(ALICE, PASSWORD)
    assert cli("deliver", ALICE, stdin=b"Subject: one\n\nbody\n").code == 0

    def into(stdout, *argv, stdin=b""):
        err = io.StringIO()
        try:
            code = run(["--database", cli.url, *argv], stdin=_stdin(stdin), stdout=stdout, stderr=err, environ={})
        finally:
            if stdout is not None:
                with contextlib.suppress(OSError):
                    stdout.close()  # what it holds still cannot be written
        return code, err.getvalue()

    full = "mailgate: cannot write to standard output: No space left on device\n"
    closed = "mailgate: cannot write to standard output: it is closed\n"
    for argv in (["user", "list"], ["user", "list", "--json"], ["mailbox", "show", ALICE, "1"]):
        assert into(open("/dev/full", "w"), *argv) == (74, full), argv
        monkeypatch.setattr(sys, "stdout", None)
        assert into(None, *argv) == (74, closed), argv
        monkeypatch.undo()
    assert into(open("/dev/full", "w"), "deliver", ALICE, stdin=b"Subject: two\n\nbody\n") == (
        0, "mailgate: the message is stored, but " + full[len("mailgate: "):])
    assert len(cli.messages(ALICE)) == 2


def test_aClosedStandardErrorKeepsTheExitStatus(cli, monkeypatch):
    """
    Standard error closed when the command started (C{2>&-}; Python gives
    it as C{None}): the messages go nowhere, and the exit status is still
    the failure's (67, 64...); writing the message failed, and every
    failure exited 1.
    """
    cli.add(ALICE, PASSWORD)
    monkeypatch.setattr(sys, "stderr", None)
    for argv, code in ((["user", "del", BOB], 67), (["user", "quota", ALICE, "0"], 64), (["user", "bogus"], 64),
                       (["user", "del", ALICE], 0)):
        out = io.StringIO()
        assert run(["--database", cli.url, *argv], stdin=_stdin(b""), stdout=out, stderr=None, environ={}) == code, argv
    monkeypatch.undo()
    assert cli.user(ALICE) is None


def test_deliverWithSenderAddsTraceFields(tmp_path):
    """
    With -f, a local delivery gets the Return-Path:, Delivered-To: and
    Received: fields an SMTP or LMTP delivery would, and the message after
    them byte for byte.
    """
    import io

    from mailgate.cli import run

    url = f"sqlite:///{tmp_path / 'trace.sqlite3'}"

    def cli(*argv, stdin=b""):
        out, err = io.StringIO(), io.StringIO()
        stream = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
        return run(["--database", url, *argv], stdin=stream, stdout=out, stderr=err), out.getvalue(), err.getvalue()

    assert cli("user", "add", "alice@example.org", "--password-stdin", stdin=b"pw\n")[0] == 0
    code, out, err = cli("deliver", "-f", "bob@example.net", "alice@example.org", stdin=b"Subject: hi\n\nbody\n")
    assert code == 0, err
    from mailgate.testing import POP3Session, memoryStore

    store = memoryStore(url)
    try:
        s = POP3Session(store)
        assert s.login("alice@example.org", "pw").startswith("+OK")
        lines = s.command("RETR 1").split("\r\n")
    finally:
        store.close()
    assert lines[1] == "Return-Path: <bob@example.net>"
    # The copy's own Delivered-To: (delivered-to final, the default).
    assert lines[2] == "Delivered-To: alice@example.org"
    assert lines[3].startswith("Received: by ") and "(mailgate) with local id " in lines[3]
    assert lines[4].startswith("\tfor <alice@example.org>; ")
    assert lines[5:8] == ["Subject: hi", "", "body"]


# -- bad input: one line and the right exit code, never "internal error" ------------


@pytest.mark.parametrize(
    "sender",
    [
        "evil\r\nX-Injected: yes", "evil\nX-Injected: yes@example.net", "a\tb@example.net", "bob@example.net>", "bob",
        "@example.net", '"a"b"@example.net', "a b@exa mple.net", "a b@example.net\r\nX-Injected: yes",
        # Octets that are not UTF-8, as a POSIX argv gives them (an MTA's
        # ${sender} from a client of 8-bit addresses): SMTP refuses them
        # (500); here they failed at the Return-Path: field with an
        # internal error, exit 75, which the MTA retried for days.
        os.fsdecode(b"\xe9t\xe9@example.net"),
    ],
)
def test_deliverRefusesASenderMailFromWouldRefuse(cli, sender):
    """
    The sender goes into Return-Path:, so it is checked as SMTP's MAIL FROM
    checks it; nothing is delivered.
    """
    cli.add(ALICE, PASSWORD)
    result = cli("deliver", "-f", sender, ALICE, stdin=b"Subject: x\n\nbody\n")
    assert result.code == 65, result
    assert oneLineError(result).startswith("mailgate: bad sender ")
    assert cli.messages(ALICE) == []


@pytest.mark.parametrize(
    "sender, returnPath",
    [
        ("john doe@example.net", '"john doe"@example.net'),
        ('"john doe"@example.net', '"john doe"@example.net'),
        ('say "hi"@example.net', '"say \\"hi\\""@example.net'),
        ("a\\b c@example.net", '"a\\\\b c"@example.net'),
    ],
)
def test_deliverTakesASenderAsPostfixsPipeGivesIt(cli, sender, returnPath):
    """
    Postfix's pipe gives ${sender} in its internal form, the quotes of a
    local part that needs them taken off (unless its flag q is set), as the
    README's master.cf runs it: such a sender is taken with its quotes put
    back.  It was refused as a bad sender (65), and Postfix bounced the mail.
    """
    cli.add(ALICE, PASSWORD)
    result = cli("deliver", "-f", sender, ALICE, stdin=b"Subject: x\n\nbody\n")
    assert result.code == 0, result
    assert cli.messages(ALICE)[0].startswith(f"Return-Path: <{returnPath}>\r\n".encode("ascii"))


def test_deliverTakesASenderWithALongLocalPart(cli):
    """
    As MAIL FROM does: a forwarder's SRS sender is over 64 octets before
    its @.
    """
    cli.add(ALICE, PASSWORD)
    sender = "SRS0=Ab3d=XY=some-long-domain.example=a.rather.long.user.name+tag@forwarder.example"
    result = cli("deliver", "-f", sender, ALICE, stdin=b"Subject: x\n\nbody\n")
    assert result.code == 0, result
    assert cli.messages(ALICE)[0].startswith(f"Return-Path: <{sender}>\r\n".encode("ascii"))


def test_deliverTakesTheNullSenderAndAngleBrackets(cli):
    """
    The null sender as '' (as before) or <>, and a sender in its angle
    brackets: not Return-Path: <<>>.
    """
    cli.add(ALICE, PASSWORD)
    for sender in ("", "<>", "<bob@example.net>"):
        result = cli("deliver", "-f", sender, ALICE, stdin=b"Subject: x\n\nbody\n")
        assert result.code == 0, result
    assert [m.split(b"\r\n", 1)[0] for m in cli.messages(ALICE)] == [
        b"Return-Path: <>", b"Return-Path: <>", b"Return-Path: <bob@example.net>"
    ]


@pytest.mark.parametrize("errors", ["strict", "surrogateescape"])
def test_aPasswordThatIsNotUTF8(cli, errors):
    """
    Bytes that are not UTF-8 on standard input: a data error, whether the
    stream refuses them (strict) or passes them on as Python's own
    standard input does in a C locale (surrogateescape).
    """
    cli.add(BOB, BOB_PASSWORD)

    def stdin():
        return io.TextIOWrapper(io.BytesIO(b"p\xffw\n"), encoding="utf-8", errors=errors, newline="")

    for argv in (
        ["user", "add", ALICE, "--password-stdin"],
        ["user", "passwd", BOB, "--password-stdin"],
        ["user", "apop", BOB, "on", "--password-stdin"],
    ):
        out, err = io.StringIO(), io.StringIO()
        code = run(["--database", cli.url, *argv], stdin=stdin(), stdout=out, stderr=err, environ={})
        result = Result(code, out.getvalue(), err.getvalue())
        assert code == 65, (argv, result)
        assert oneLineError(result) == "mailgate: the password is not UTF-8 text\n"
    assert cli.user(ALICE) is None
    assert verifyPassword(BOB_PASSWORD, cli.user(BOB).passwordHash)


def test_importUsersFileThatIsNotUTF8(cli, tmp_path):
    cli.create()
    users = tmp_path / "users.txt"
    users.write_bytes(b"# users\nalice@example.org p\xffw\n")
    result = cli("import", "pop3", "pop3://127.0.0.1:9", "--users", str(users))
    assert result.code == 65, result
    assert oneLineError(result) == f"mailgate: {users} line 2: not UTF-8 text\n"


@pytest.mark.parametrize(
    "url, reason",
    [("pop3://[::1", "bad URL"), ("pop3://mail.example.org:0", "bad port"), ("pop3s://[::1]:0", "bad port")],
)
def test_importPOP3RefusesABadURL(cli, url, reason):
    cli.add(ALICE, PASSWORD)
    result = cli("import", "pop3", url, ALICE, "--password-stdin", stdin=f"{PASSWORD}\n")
    assert result.code == 64, result
    assert oneLineError(result).startswith(f"mailgate: {reason}")


def test_userImportFromStandardInputTakesOctetsThatAreNotUTF8(cli):
    """
    C{user import -}: a line with octets that are not UTF-8 (a Latin-1
    gecos field) is refused alone, as in a file, also where standard input
    decodes strictly (a UTF-8 locale other than C): the first such octet
    was an internal error, exit 70, and no user was imported.
    """
    cli.create()
    result = cli("user", "import", "-", stdin=b"h\xe9l\xe8ne@example.org:{PLAIN}x\n"
                 b"bob@example.org:{PLAIN}pw:1000:1000:Ren\xe9::\n")
    assert result.code == 65, result
    assert result.err == ("mailgate: - line 1: the user name or password hash is not UTF-8 text\n"
                          "mailgate: 1 line of - not imported\n")
    assert result.out.splitlines()[0] == "added bob@example.org"
    assert verifyPassword("pw", cli.user(BOB).passwordHash)


def test_userImportRunAgainHashesNoPasswordOfAUserThereAlready(cli, monkeypatch):
    """
    C{user import} run again over a passwd-file of passwords in clear
    (C{{PLAIN}}) makes no hash for the users there already: it made
    mailgate's own (scrypt and SCRAM's keys, a quarter of a second each)
    for every line before finding the user there and throwing it away (a
    file of 50,000 such users: some three and a half hours to change
    nothing); nor checks again a crypt(3) hash kept as imported (some
    3 ms each).  A line it cannot import is still refused, and an
    imported hash the file has changed is still refreshed.
    """
    from mailgate.auth import passwords
    from mailgate.testing import TEST_HASH_COST

    hashed = []
    hashPassword = passwords.hashPassword

    def counted(password, logN=None):
        hashed.append(password)
        return hashPassword(password, TEST_HASH_COST)

    monkeypatch.setattr(passwords, "hashPassword", counted)
    checked = []
    checker = passwords.foreign.checker

    def checking(text, *args, **kwargs):
        checked.append(text)
        return checker(text, *args, **kwargs)

    monkeypatch.setattr(passwords.foreign, "checker", checking)
    cli.create()
    crypt = "{SHA512-CRYPT}$6$abcdefgh$ltjgWl6579NluT/Vi1nwEvcil.G5Nbc4NiXZaNGStk8PSwGfQv72N2CKPPrVACtLtip/cZ/1GM/O6IND4WQhG."
    passwd = f"{ALICE}:{{PLAIN}}wonderland\n{BOB}:{crypt}\ncarol@example.org:{{PLAIN}}\n"
    result = cli("user", "import", "-", stdin=passwd.encode())
    assert result.code == 65, result
    assert hashed == [b"wonderland"]
    for options in ([], ["--refresh"]):
        result = cli("user", "import", "-", *options, stdin=passwd.encode())
        assert result.code == 65, result
        assert result.out.splitlines() == [
            f"exists {ALICE}",
            f"exists {BOB}",
            f"0 added, {'0 updated, ' if options else ''}2 already there, 1 failed",
        ]
        assert result.err.startswith("mailgate: - line 3: carol@example.org: unusable password hash: ")
    assert hashed == [b"wonderland"]
    # Bob's hash, checked (a crypt(3) run) as it was imported, is not
    # checked again while it is the one kept.
    assert checked == [crypt]
    changed = passwd.replace(crypt, "{PLAIN}secret2")
    result = cli("user", "import", "-", "--refresh", stdin=changed.encode())
    assert result.out.splitlines()[:2] == [f"exists {ALICE}", f"updated {BOB}"]
    assert hashed == [b"wonderland", b"secret2"]
    assert verifyPassword("secret2", cli.user(BOB).passwordHash)


@pytest.mark.parametrize(
    "url, shown",
    [
        ("pop3://alice:s3cret-pw@[::1", "bad URL 'pop3://alice:***@[::1'"),
        ("pop3://alice:s3cret-pw@mail.example.org:0", "bad port in 'pop3://alice:***@mail.example.org:0'"),
        ("pop3://alice:s3cret-pw@mail.example.org:99999", "bad port in 'pop3://alice:***@mail.example.org:99999'"),
        ("imap://alice:s3cret-pw@mail.example.org", "not a POP3 URL: 'imap://alice:***@mail.example.org'"),
        ("pop3://alice:s3cret-pw@:110", "no host in 'pop3://alice:***@:110'"),
    ],
)
def test_importPOP3RefusesABadURLWithoutShowingItsPassword(cli, url, shown):
    """
    A source URL may carry the source's password (pop3://user:password@host):
    a mistake in it is shown with the password as ***, as the database
    URL's is, not printed on standard error (a cron job's mail, the journal).
    """
    cli.add(ALICE, PASSWORD)
    result = cli("import", "pop3", url, ALICE, "--password-stdin", stdin=f"{PASSWORD}\n")
    assert result.code == 64, result
    assert oneLineError(result).startswith(f"mailgate: {shown}"), result
    assert "s3cret" not in result.err and "s3cret" not in result.out


def test_importPOP3RefusesAPasswordInTheURL(cli):
    """
    A well-formed URL with the source's password in it: refused, not used
    (a command line is in the process list for every user to read) and
    not silently ignored for a prompt that cannot come under cron.
    """
    cli.add(ALICE, PASSWORD)
    result = cli("import", "pop3", "pop3://alice:s3cret@127.0.0.1:1", ALICE, "--password-stdin",
                 stdin=f"{PASSWORD}\n")
    assert result.code == 64, result
    assert oneLineError(result) == (
        "mailgate: the source's password does not go in the URL, where every user of this machine can "
        "read it in the process list: give it on standard input (--password-stdin) or at the prompt\n"
    )


@pytest.mark.parametrize("uidlFormat", ["%q", "%{nope}", "%08Xu%{unterminated", "%099999999999u"])
def test_importMaildirRefusesABadUidlFormatUpFront(cli, tmp_path, uidlFormat):
    """
    The format's own mistake, not "the maildir has no dovecot-uidlist"
    (which a format with an unknown variable was taken to need); a width
    no unique id can have, not a MemoryError padding one to it.
    """
    cli.add(ALICE, PASSWORD)
    maildir = tmp_path / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True)
    result = cli("import", "maildir", str(maildir), ALICE, "--uidl-format", uidlFormat)
    assert result.code == 64, result
    message = oneLineError(result)
    assert message.startswith(f"mailgate: bad --uidl-format {uidlFormat!r}: ")
    assert "dovecot-uidlist" not in message


def test_importMaildirShowsNoEscapeSequenceOfAFileName(cli, tmp_path):
    """
    A maildir's file names go into the import's lines on the
    administrator's terminal (or a cron mail): whoever could write in the
    maildir (its user, with a shell) chose them, and their escape
    sequences (a window title, a cleared screen) are shown as C{?}, not
    obeyed.
    """
    cli.add(ALICE, PASSWORD)
    maildir = tmp_path / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True)
    (maildir / "cur" / "17000\x1b]2;owned\x07.M1.h:2,S").write_bytes(b"Subject: x\n\nbody\n")
    result = cli("import", "maildir", str(maildir), ALICE)
    assert result.code == 65, result
    assert "\x1b" not in result.err and "\x07" not in result.err, result.err
    assert f"mailgate: {maildir}/cur/17000?]2;owned?.M1.h:2,S: unique id " in result.err, result.err


def test_aMaildirPathWithALineBreakIsRefusedOnOneLine(cli, tmp_path):
    """
    DIR as given (a line break, an escape sequence in it) and a maildir
    found below it, whose name whoever could write there chose, are shown
    in the refusal as the import's report shows paths: anything
    unprintable as C{?}, one line; they were written raw, the line break
    starting a forged line and the terminal obeying the sequence.
    """
    cli.add(ALICE, PASSWORD)
    home = tmp_path / "home\nmailgate: 4 messages imported\x1b]2;owned\x07"
    below = home / "Mail\x1b[2J"
    for sub in ("cur", "new", "tmp"):
        (below / sub).mkdir(parents=True)
    result = cli("import", "maildir", str(home), ALICE)
    assert result.code == 66, result
    shown = str(tmp_path / "home?mailgate: 4 messages imported?]2;owned?")
    assert oneLineError(result) == (
        f"mailgate: {shown} is not a maildir (no cur/ or new/); {shown}/Mail?[2J is one\n"
    ), result.err
    # So is a --uidlist that is not there.
    result = cli("import", "maildir", str(below), ALICE, "--uidlist", str(tmp_path / "list\r\nx"))
    assert (result.code, oneLineError(result)) == (66, f"mailgate: no such file: {tmp_path}/list??x\n"), result


def test_importPOP3RefusalsShowWhatWasGivenOnOneLine(cli, tmp_path):
    """
    C{import pop3}'s refusals show the C{--users} path and the URL's host
    as given as C{import maildir}'s show DIR: anything unprintable as
    C{?}, one line.  They were written raw: a line break in the path
    started a forged line, an escape sequence in the host reached the
    terminal.
    """
    cli.add(ALICE, PASSWORD)
    result = cli("import", "pop3", "pop3://127.0.0.1:1", "--users", str(tmp_path / "absent\nmailgate: done"))
    assert (result.code, oneLineError(result)) == (
        66, f"mailgate: cannot read {tmp_path}/absent?mailgate: done: No such file or directory\n"
    ), result
    users = tmp_path / "users\x1b]2;owned\x07"
    users.write_text("not-an-address s3cret\n")
    result = cli("import", "pop3", "pop3://127.0.0.1:1", "--users", str(users))
    assert (result.code, oneLineError(result)) == (
        65, f"mailgate: {tmp_path}/users?]2;owned? line 1: its first word is not an address "
        f"(expected ADDRESS PASSWORD, separated by a space)\n"
    ), result
    # A host no resolver knows: refused at once, named as given.
    result = cli("import", "pop3", "pop3://bad\x1bchost.invalid:1", ALICE, "--password-stdin", stdin=f"{PASSWORD}\n")
    assert result.code in (69, 75), result
    assert oneLineError(result).startswith("mailgate: cannot connect to bad?chost.invalid:1: "), result


def test_everyRefusalIsOneLineWhateverPathItQuotes(cli, tmp_path):
    """
    A command's failure is one line on standard error, as the README
    promises, whatever path or URL it quotes as given: a line break or an
    escape sequence in C{db backup}'s FILE or in C{--database} is shown
    as C{?}.  They were written raw, the path splitting the line in two.
    """
    cli.add(ALICE, PASSWORD)
    result = cli("db", "backup", str(tmp_path / "no\nsuch" / "x.sqlite3"))
    assert (result.code, oneLineError(result)) == (
        73, f"mailgate: cannot create {tmp_path}/no?such/x.sqlite3: No such file or directory\n"
    ), result
    result = cli("user", "list", database=f"sqlite:///{tmp_path}/gone\x1b]2;owned\x07\nmail.sqlite3")
    assert result.code == 78, result
    assert oneLineError(result).startswith(f"mailgate: no such database file: {tmp_path}/gone?]2;owned??mail"), result
    result = cli("user", "list", database="mysql://a\nb")
    assert (result.code, oneLineError(result)) == (
        78, "mailgate: unsupported database URL 'mysql://a\\nb': use sqlite:///FILE or postgresql://...\n"
    ), result


def test_userImportShowsItsFileAsGivenOnOneLine(cli, tmp_path):
    """
    C{user import} names its passwd-file as C{import pop3} names its
    C{--users} file: a line break or an escape sequence in the path as
    C{?}, each line of its one line.  They were written raw, the path
    splitting each of its refusals in two.
    """
    cli.create()
    result = cli("user", "import", str(tmp_path / "absent\nmailgate: done"), "--domain", "example.org")
    assert (result.code, oneLineError(result)) == (
        66, f"mailgate: cannot read {tmp_path}/absent?mailgate: done: No such file or directory\n"
    ), result
    passwd = tmp_path / "passwd\n\x1b]2;owned\x07"
    passwd.write_text("no colon here\n")
    result = cli("user", "import", str(passwd), "--domain", "example.org")
    shown = f"{tmp_path}/passwd??]2;owned?"
    assert result.code == 65, result
    assert result.err.splitlines() == [
        f"mailgate: {shown} line 1: no ':' after the user name (a line is user:password:...); the line is not shown",
        f"mailgate: 1 line of {shown} not imported",
    ], result.err


@pytest.mark.parametrize("line", ["s3cret-pw alice@example.org", "alice@example.org\ts3cret-pw more"])
def test_aUsersFileLineWithoutAnAddressFirstIsRefusedWithoutItsPassword(cli, tmp_path, line):
    """
    A --users line whose first word is no address (the columns swapped,
    a tab between them) is refused by its number, not by quoting the
    word: it is the password, on the terminal.
    """
    cli.add(ALICE, PASSWORD)
    users = tmp_path / "users"
    users.write_text(f"# address password\n{line}\n")
    result = cli("import", "pop3", "pop3://127.0.0.1:1", "--users", str(users))
    assert result.code == 65, result
    assert oneLineError(result).startswith(f"mailgate: {users} line 2: "), result.err
    assert "s3cret-pw" not in result.err + result.out, result.err


@pytest.mark.parametrize("wait", ["nan", "inf", "-inf", "-1", "soon"])
def test_kickWaitIsAFiniteNumberOfSeconds(cli, wait):
    cli.add(ALICE, PASSWORD)
    result = cli("kick", ALICE, f"--wait={wait}")
    assert result.code == 64, result
    assert oneLineError(result).startswith("mailgate: bad --wait: ")


def test_renameToTheSameAddress(cli):
    """
    Renaming a user to its own address is a mistake worth saying so, not
    "already exists"; in any case of letters, since addresses are compared
    without it.
    """
    cli.add(ALICE, PASSWORD)
    for new in (ALICE, ALICE.upper()):
        result = cli("user", "rename", ALICE, new)
        assert result.code == 64, result
        assert oneLineError(result) == f"mailgate: OLD and NEW are the same address, {ALICE}: nothing to rename\n"
    assert cli.user(ALICE) is not None
    result = cli("user", "rename", BOB, BOB)
    assert result.code == 67, result


# -- a missing database file ------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, code",
    [
        (["user", "list"], 78),
        (["db", "version"], 78),
        (["mailbox", "list", ALICE], 78),
        (["mailbox", "deleted", ALICE], 78),
        (["user", "passwd", ALICE, "--password-stdin"], 78),
        (["user", "del", ALICE], 78),
        (["who"], 78),
        (["ban", "list"], 78),
        (["ban", "add", "192.0.2.1"], 78),
        (["deliver", ALICE], 75),
    ],
)
def test_missingDatabaseFileIsNotCreated(cli, argv, code):
    """
    A mistyped --database is an error, not a new empty database that
    answers "no users" (or, to an MTA, "no such user": a bounce).
    """
    result = cli(*argv, stdin=f"{PASSWORD}\n")
    assert result.code == code, result
    assert oneLineError(result).startswith(f"mailgate: no such database file: {cli.path} ")
    assert not cli.path.exists()


def test_anAbsolutePathWithASlashShortIsSaidToBeOne(tmp_path):
    """
    C{sqlite:///var/lib/...}, a slash short of the absolute path: a file
    under the working directory, which is missing while the absolute one
    exists.  Said, with the URL meant; it was "no such database file:
    var/lib/..." alone, which reads as if the database were gone.
    """
    from e2e import runHere

    live = tmp_path / "live.sqlite3"
    assert runHere(["--database", f"sqlite:///{live}", "user", "add", ALICE, "--password-stdin"], "pw\n")[0] == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    relative = str(live).lstrip("/")
    code, out, err = runHere(["--database", f"sqlite:///{relative}", "user", "list"], cwd=elsewhere)
    assert (code, out) == (78, "")
    assert err == (
        f"mailgate: no such database file: {relative} under {elsewhere}; sqlite:///{live}, with four slashes, "
        f"names {live}, which exists (check --database; mailgate user add or db upgrade creates it)\n"
    )
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("argv, code", [(["user", "list"], 78), (["db", "check"], 78), (["deliver", ALICE], 75)])
def test_aDirectoryForTheDatabaseFileIsSaidToBeOne(tmp_path, argv, code):
    """
    --database naming the database's directory, not its file: said so,
    with the URL of a file there; a configuration error (deliver's 75
    aside, as for any database it cannot open).  It was "temporary
    failure, try again: ... disk I/O error", exit 75, which a script or
    an MTA retries for ever.
    """
    from e2e import mailgateHere

    code_, out, err = mailgateHere(f"sqlite:///{tmp_path}", *argv, stdin="Subject: x\n\nhi\n")
    assert (code_, out) == (code, "")
    assert err == (
        f"mailgate: cannot open SQLite database {tmp_path}: it is a directory; the URL names the database's "
        f"file (sqlite:///{tmp_path}/mailgate.sqlite3, say)\n"
    )


def test_aUserOfADomainTheConfigurationDoesNotListIsNoted(cli, tmp_path):
    """
    user add, user rename and user import into a domain that the server's
    configuration file, listing its domains, does not take mail for: a
    note, as alias add gives one, since the server refuses their mail as
    relaying (user add said "added" alone, and the first mail to the user
    was refused, 550 5.7.1).  Nothing noted of a listed domain.
    """
    config = tmp_path / "mailgate.toml"
    config.write_text(f'database = "{cli.url}"\ndomain = ["example.org"]\n')

    def note(domain, whom):
        return (
            f"note: {domain} is not among the configuration's domains: the server refuses mail to {whom} "
            "(relay access denied) until it is"
        )

    added = cli("--config", str(config), "user", "add", "carol@example.net", "--password-stdin", stdin=b"pw\n")
    assert added.code == 0, added
    assert added.out.splitlines() == ["added carol@example.net", note("example.net", "carol@example.net")]
    renamed = cli("--config", str(config), "user", "rename", "carol@example.net", "carol@example.com")
    assert renamed.code == 0, renamed
    assert renamed.out.splitlines()[-1] == note("example.com", "carol@example.com")
    passwd = tmp_path / "users"
    passwd.write_text("dave@example.info:{PLAIN}x\nerin@example.info:{PLAIN}x\nfrank@example.org:{PLAIN}x\n")
    imported = cli("--config", str(config), "user", "import", str(passwd))
    assert imported.code == 0, imported
    assert imported.out.splitlines()[-2:] == ["3 added, 0 already there, 0 failed", note("example.info", "its users")]
    quiet = cli("--config", str(config), "user", "rename", "carol@example.com", "carol@example.org")
    assert quiet.code == 0 and "note" not in quiet.out
    assert "note" not in cli("user", "add", "gina@example.net", "--password-stdin", stdin=b"pw\n").out


def test_dbCopyFromAMissingFile(cli, tmp_path):
    """
    Not "copied 0 users" from a database made from the mistyped path.
    The commands that start a database from nothing still create it.
    """
    source, target = tmp_path / "mistyped.sqlite3", tmp_path / "copy.sqlite3"
    result = cli("db", "copy", "--from", f"sqlite:///{source}", "--to", f"sqlite:///{target}")
    assert result.code == 78, result
    assert oneLineError(result) == f"mailgate: --from: no such database file: {source}\n"
    assert result.out == ""
    assert not source.exists() and not target.exists()

    assert cli("db", "upgrade").code == 0
    assert cli.path.exists()
    CLI(source).add(ALICE, PASSWORD)
    result = cli("db", "copy", "--from", f"sqlite:///{source}", "--to", f"sqlite:///{target}")
    assert result.code == 0, result
    assert result.out.startswith("copied 1 user ")


# -- mailgate serve ---------------------------------------------------------------


def test_serveSaysWhyTheConfigurationFileIsRefused(cli, tmp_path):
    """
    The one line twistd mailgate prints, not silence.
    """
    path = tmp_path / "mailgate.toml"
    path.write_text('pop3 = ["tcp:notaport"]\n')
    result = cli("serve", "--config", str(path))
    assert result.code == 78, result
    assert oneLineError(result).startswith(f"mailgate: {path}: key 'pop3': invalid endpoint 'tcp:notaport'")
    assert not cli.path.exists()


def test_serveRefusesAnInvalidDatabaseFromTheEnvironmentAsAConfigurationError(tmp_path, monkeypatch):
    """
    C{mailgate serve} with an invalid C{$MAILGATE_DATABASE} (as a unit's
    EnvironmentFile= gives it): one line and exit 78, which the unit does
    not retry, as twistd mailgate; it was a usage error, 64, retried.
    """
    monkeypatch.setenv("MAILGATE_DATABASE", "sqlite:relative.sqlite3")
    monkeypatch.chdir(tmp_path)
    out, err = io.StringIO(), io.StringIO()
    code = run(["serve"], stdout=out, stderr=err)
    assert code == 78, err.getvalue()
    assert err.getvalue().startswith("mailgate: $MAILGATE_DATABASE: ") and err.getvalue().count("\n") == 1
    assert list(tmp_path.iterdir()) == []


# -- --config: the server's configuration file -------------------------------------


def test_configFileGivesTheDatabase(tmp_path):
    """
    C{mailgate --config FILE} works on the database the server's file
    names, so an administrator need not repeat the URL (and its password)
    on every command line; C{--database} still wins, and the file wins
    over C{$MAILGATE_DATABASE}, as for the server.
    """
    fromFile, fromOption, fromEnvironment = (tmp_path / f"{n}.sqlite3" for n in ("file", "option", "env"))
    config = tmp_path / "mailgate.toml"
    config.write_text(f'database = "sqlite:///{fromFile}"\npop3 = ["tcp:110"]\n')
    environ = {"MAILGATE_DATABASE": f"sqlite:///{fromEnvironment}"}

    def mailgate(*argv):
        out, err = io.StringIO(), io.StringIO()
        code = run(list(argv), stdin=io.StringIO(f"{PASSWORD}\n"), stdout=out, stderr=err, environ=environ)
        return Result(code, out.getvalue(), err.getvalue())

    assert mailgate("--config", str(config), "user", "add", ALICE, "--password-stdin").code == 0
    assert CLI(fromFile).user(ALICE) is not None
    listed = mailgate("--config", str(config), "user", "list")
    assert listed.code == 0 and ALICE in listed.out, listed
    given = mailgate("--config", str(config), "--database", f"sqlite:///{fromOption}", "user", "add", BOB,
                     "--password-stdin")
    assert given.code == 0, given
    assert CLI(fromOption).user(BOB) is not None and CLI(fromFile).user(BOB) is None
    assert not fromEnvironment.exists()


def test_configGivenTwiceIsRefused(tmp_path):
    """
    C{mailgate --config A --config B}: refused with one line naming both,
    exit 64, as C{twistd mailgate} refuses it; argparse kept B unsaid, so
    files layered as other daemons layer them (a base and local
    overrides) had the command work on B's database alone.  The same
    path twice is taken.
    """
    base, local = tmp_path / "base.toml", tmp_path / "local.toml"
    base.write_text(f'database = "sqlite:///{tmp_path / "base.sqlite3"}"\n')
    local.write_text(f'database = "sqlite:///{tmp_path / "local.sqlite3"}"\n')

    def mailgate(*argv):
        out, err = io.StringIO(), io.StringIO()
        code = run(list(argv), stdin=io.StringIO(f"{PASSWORD}\n"), stdout=out, stderr=err, environ={})
        return Result(code, out.getvalue(), err.getvalue())

    for command in (["user", "add", ALICE, "--password-stdin"], ["serve"]):
        refused = mailgate("--config", str(base), "--config", str(local), *command)
        assert (refused.code, refused.out) == (64, ""), refused
        assert refused.err == (
            f"mailgate: --config given twice ({base}, then {local}): the command reads one configuration file "
            "(mailgate --help lists the options)\n"
        )
    assert not (tmp_path / "local.sqlite3").exists()
    assert mailgate("--config", str(base), "--config", str(base), "user", "add", ALICE, "--password-stdin").code == 0
    assert CLI(tmp_path / "base.sqlite3").user(ALICE) is not None


def test_configShowsWhatTheServerWouldServe(tmp_path):
    """
    C{mailgate --config FILE config}, as C{postconf -n}: the settings not
    at their defaults, as a configuration file, the database's password
    hidden; read back, the same configuration (but for the password).
    C{--all}: every setting.
    """
    from mailgate import config as configuration

    config = tmp_path / "mailgate.toml"
    config.write_text(
        'database = "postgresql://mailgate:s3cret@db.internal/mail"\n'
        'pop3 = ["tcp:110", "tcp:1110:interface=127.0.0.1"]\n'
        'default-quota = 1073741824\n'
        'max-recipients = 100\n'  # the default, written anyway
        'quota-warning = [95, 80]\n'
        'apop = "never"\n'
        'expire-days = "never"\n'
        'debug-peer = ["192.0.2.7/32"]\n'
    )

    def mailgate(*argv):
        out, err = io.StringIO(), io.StringIO()
        code = run(["--config", str(config), *argv], stdout=out, stderr=err, environ={})
        return Result(code, out.getvalue(), err.getvalue())

    shown = mailgate("config")
    assert shown.code == 0, shown
    assert "s3cret" not in shown.out
    assert shown.out.splitlines() == [
        f"# what twistd mailgate serves with --config {config} and no other option",
        'database = "postgresql://mailgate:***@db.internal/mail"',
        'pop3 = ["tcp:110", "tcp:1110:interface=127.0.0.1"]',
        'apop = "never"',
        'default-quota = "1G"',
        "quota-warning = [95, 80]",
        'debug-peer = ["192.0.2.7/32"]',
    ]
    again = tmp_path / "again.toml"
    again.write_text(shown.out.replace("***", "s3cret"))
    assert configuration.resolve({}, configuration.readFile(again), {}) == configuration.resolve(
        {}, configuration.readFile(config), {}
    )
    everything = mailgate("config", "--all").out
    assert "max-recipients = 100\n" in everything and "#tls-cert =   (none)\n" in everything
    assert len(everything.splitlines()) == len(configuration.SETTINGS) + 1
    # config [--all | --check]: one or the other (--all beside --check was
    # silently ignored, --check printing no settings).
    both = mailgate("config", "--all", "--check")
    assert (both.code, both.out) == (64, ""), both
    assert "not allowed with argument" in both.err, both


def test_configCheckWarnsAsTheStartWarns(tmp_path, monkeypatch):
    """
    C{config --check} writes what a start warns of: an oauth2-keys file
    others may replace, master-users = false beside a separator, an LMTP
    socket every user may reach (its directories taken for ones anyone
    may enter: pytest's are its own user's), each on standard error,
    'configuration OK' all the same.
    """
    import functools

    from mailgate import config as configuration
    from oauthtokens import AUDIENCE, ISSUER, Keys

    jwks, _ = Keys().write(tmp_path)
    jwks.chmod(0o666)
    monkeypatch.setattr(
        configuration, "openSockets", functools.partial(configuration.openSockets, modeOf=lambda path: 0o40755)
    )
    path = tmp_path / "mailgate.toml"
    path.write_text(
        f'oauth2-keys = ["{jwks}"]\noauth2-issuer = ["{ISSUER}"]\noauth2-audience = ["{AUDIENCE}"]\n'
        f'master-users = false\nmaster-user-separator = "*"\nlmtp = ["unix:{tmp_path}/lmtp"]\n'
    )
    path.chmod(0o600)
    out, err = io.StringIO(), io.StringIO()
    assert run(["--config", str(path), "config", "--check"], stdout=out, stderr=err, environ={}) == 0, err.getvalue()
    assert out.getvalue() == f"mailgate: {path}: configuration OK\n"
    warnings = err.getvalue().splitlines()
    assert [line.split(":", 2)[1].strip() for line in warnings] == ["warning"] * 3, warnings
    assert f"master-users = false in {path}, but master-user-separator is set" in warnings[0]
    assert f"the OAuth 2.0 key file {jwks} may be replaced by others than its owner (mode 0666)" in warnings[1]
    assert f"the lmtp socket {tmp_path}/lmtp may be used by every user of this machine" in warnings[2]


def test_configCheckRefusesWhatTheServerWouldRefuse(tmp_path, pair):
    """
    C{mailgate --config FILE config --check} (as C{nginx -t}; the systemd
    unit's ExecReload runs it before the SIGHUP): a file, certificate or
    setting the server would refuse is refused in the server's words,
    exit 78; a usable one is 'configuration OK', with what the server
    would warn of at its start on standard error.
    """
    certificate, key = pair
    config = tmp_path / "mailgate.toml"

    def check(text):
        config.write_text(text)
        config.chmod(0o644)
        out, err = io.StringIO(), io.StringIO()
        code = run(["--config", str(config), "config", "--check"], stdout=out, stderr=err, environ={})
        return Result(code, out.getvalue(), err.getvalue())

    tls = f'tls-cert = "{certificate}"\ntls-key = "{key}"\n'
    ok = check(tls + 'pop3s = ["tcp:995"]\n')
    assert (ok.code, ok.out, ok.err) == (0, f"mailgate: {config}: configuration OK\n", ""), ok
    # Checked across settings, as at start: implicit TLS without a key.
    refused = check('pop3s = ["tcp:995"]\n')
    assert (refused.code, refused.out, refused.err) == (
        78, "", f"mailgate: {config}: implicit-TLS listeners need a certificate and a key\n"
    )
    refused = check(f'tls-cert = "{certificate}"\ntls-key = "{certificate}"\n')
    assert refused.code == 78 and str(certificate) in refused.err and refused.out == ""
    # A file the server refuses to start on: no listener left.
    refused = check("pop3 = []\n")
    assert (refused.code, refused.out, refused.err) == (
        78, "", f"mailgate: nothing to listen on: pop3, pop3s, smtp and lmtp are all empty (in {config})\n"
    )
    refused = check(tls + "cpu-affinity = \"4096\"\n")
    assert refused.code == 78 and refused.err.startswith("mailgate: cpu-affinity: ")
    refused = check(tls + f'spool-directory = "{tmp_path / "missing"}"\n')
    assert refused.code == 78 and refused.err.startswith("mailgate: spool-directory: cannot spool messages in ")
    # A database URL value the start refuses before connecting (it exits
    # 78): config --check said OK, connecting to nothing.
    refused = check(tls + 'database = "postgresql://mailgate:s3cret@db.internal/mail?sslmode=requir"\n')
    assert (refused.code, refused.out) == (78, ""), refused
    assert refused.err.startswith(
        "mailgate: cannot connect to the database at postgresql://db.internal/mail: invalid sslmode 'requir' (one of "
    ), refused
    assert "s3cret" not in refused.err
    # What the server warns of at start: a key and a file holding the
    # database's password that every user may read.
    key.chmod(0o644)
    warned = check(tls + 'database = "postgresql://mailgate:s3cret@db.internal/mail"\n')
    assert warned.code == 0 and warned.out == f"mailgate: {config}: configuration OK\n"
    assert "s3cret" not in warned.err
    warnings = warned.err.splitlines()
    assert len(warnings) == 2 and all(line.startswith("mailgate: warning: ") for line in warnings), warned
    assert str(key) in warnings[0] and f"the configuration file {config}" in warnings[1]
    # A Unix socket whose directory is not there: a start exits 78 on it,
    # but config --check may run while the server is stopped and the
    # unit's RuntimeDirectory= with it; warned of, not refused.
    warned = check(f'lmtp = ["unix:{tmp_path}/missing/lmtp"]\n')
    assert (warned.code, warned.out) == (0, f"mailgate: {config}: configuration OK\n"), warned
    assert warned.err.splitlines() == [
        f"mailgate: warning: lmtp unix:{tmp_path}/missing/lmtp: the directory {tmp_path}/missing does not exist: "
        "a start cannot listen there unless it is made first (for /run/mailgate, the unit's RuntimeDirectory= "
        "makes it at each start)",
    ]
    # A TCP listener on an address this machine does not have (or one
    # that is none, mistyped): the start exits 1, retried every two
    # seconds; config --check said "configuration OK" alone.  Warned of,
    # as the address may be on its way; not of a port in use (the
    # server checked may hold it).
    warned = check('pop3 = ["tcp:2110:interface=192.0.2.55", "tcp:2111:interface=999.1.1.1", "tcp:2112"]\n')
    assert (warned.code, warned.out) == (0, f"mailgate: {config}: configuration OK\n"), warned
    lines = warned.err.splitlines()
    assert lines[0] == (
        "mailgate: warning: pop3 tcp:2110:interface=192.0.2.55: 192.0.2.55 is not an address of this machine: "
        "a start could not listen there (exit 1, which systemd retries)"
    )
    assert lines[1].startswith(
        "mailgate: warning: pop3 tcp:2111:interface=999.1.1.1: 999.1.1.1 is not an address of this machine ("
    ) and len(lines) == 2, warned


def test_theSettingsTheCommandReadsFromTheServersFileAreKnownToTheServer():
    """
    The settings the mailgate command takes from the server's --config
    file (values.get("...") in mailgate.cli) are config.COMMAND_SETTINGS,
    which a reload changing them names as used by the command already
    (config.restart_needed): a new one read here and not listed there
    would be said to wait for the restart alone.
    """
    import re
    from pathlib import Path

    from mailgate import cli, config as configuration

    read = set()
    for source in Path(cli.__file__).parent.glob("*.py"):
        read |= set(re.findall(r'values\.get\("([a-z-]+)"', source.read_text()))
    assert read == configuration.COMMAND_SETTINGS
    assert read <= {s.name for s in configuration.SETTINGS}


def test_configCheckDoesNotBlameTheDatabaseForWhatIsWrong(tmp_path):
    """
    config --check opens no database: its reason is the server's alone,
    with nothing before it, where the database's URL comes from a file or
    $MAILGATE_DATABASE (as under the systemd unit) too.  It was given as
    "database in FILE: tls-ciphers ..." or "$MAILGATE_DATABASE: ...".
    """
    config = tmp_path / "mailgate.toml"

    def check(text, environ):
        config.write_text(text)
        out, err = io.StringIO(), io.StringIO()
        code = run(["--config", str(config), "config", "--check"], stdout=out, stderr=err, environ=environ)
        return code, err.getvalue()

    database = f'database = "sqlite:///{tmp_path / "m.sqlite3"}"\n'
    reason = f"mailgate: {config}: implicit-TLS listeners need a certificate and a key\n"
    assert check(database + 'pop3s = ["tcp:995"]\n', {}) == (78, reason)
    assert check('pop3s = ["tcp:995"]\n', {"MAILGATE_DATABASE": "sqlite:///m.sqlite3"}) == (78, reason)
    code, err = check(database + 'tls-cert = "missing.pem"\ntls-key = "missing.key"\n', {})
    assert code == 78 and err.startswith("mailgate: cannot read TLS certificate or key: "), err


def test_deliverWithTheServersFileAppliesItsDefaultQuota(tmp_path):
    """
    C{mailgate --config FILE deliver}, as an MTA's pipe transport runs it:
    the file's --default-quota and --quota-warning apply as they do to the
    server's SMTP and LMTP; before, the pipe stored mail past the quota
    every other path refused.
    """
    database = tmp_path / "mail.sqlite3"
    config = tmp_path / "mailgate.toml"
    config.write_text(f'database = "sqlite:///{database}"\ndefault-quota = "1K"\nquota-warning = [80]\n')

    def mailgate(*argv, stdin=""):
        out, err = io.StringIO(), io.StringIO()
        code = run(["--config", str(config), *argv], stdin=_stdin(stdin.encode()), stdout=out, stderr=err, environ={})
        return Result(code, out.getvalue(), err.getvalue())

    assert mailgate("user", "add", ALICE, "--password-stdin", stdin=f"{PASSWORD}\n").code == 0
    message = "Subject: most of a kilobyte\n\n" + "x" * 850 + "\n"
    first = mailgate("deliver", ALICE, stdin=message)
    assert first.code == 0, first
    listed = mailgate("mailbox", "list", ALICE, "--json")
    assert len(listed.out.splitlines()) == 2  # the message, and the warning after it
    again = mailgate("deliver", ALICE, stdin=message)
    assert again.code == 75, again
    assert "try again later" in again.err
    # Without the file, the server's defaults are unknown: no limit.
    plain = CLI(database)
    assert plain("deliver", ALICE, stdin=message.encode()).code == 0


def test_deliverWithTheServersFileRefusesAFullMailboxAsItSays(tmp_path):
    """
    The file's quota-exceeded = "permanent" makes deliver refuse a full
    mailbox for good (exit 77, EX_NOPERM: the MTA bounces), as the
    server's SMTP and LMTP refuse it with 552 5.2.2; it exited 75 and the
    MTA kept the message for days.  With a recipient who had room among
    the recipients, it stays 75 (SMTP's rule: they would lose it too).
    """
    database = tmp_path / "mail.sqlite3"
    config = tmp_path / "mailgate.toml"
    config.write_text(f'database = "sqlite:///{database}"\nquota-exceeded = "permanent"\n')

    def mailgate(*argv, stdin=""):
        out, err = io.StringIO(), io.StringIO()
        code = run(["--config", str(config), *argv], stdin=_stdin(stdin.encode()), stdout=out, stderr=err, environ={})
        return Result(code, out.getvalue(), err.getvalue())

    for user in (ALICE, BOB):
        assert mailgate("user", "add", user, "--password-stdin", stdin=f"{PASSWORD}\n").code == 0
    first = "Subject: first\n\n" + "x" * 200 + "\n"
    assert mailgate("deliver", ALICE, stdin=first).code == 0
    assert mailgate("user", "quota", ALICE, "300").code == 0
    message = "Subject: too big for alice now\n\n" + "x" * 100 + "\n"
    refused = mailgate("deliver", ALICE, stdin=message)
    assert (refused.code, refused.out) == (77, ""), refused
    assert refused.err == f"mailgate: mailbox full: {ALICE} (refused for good: quota-exceeded is permanent)\n"
    assert mailgate("deliver", ALICE, BOB, stdin=message).code == 75
    # Without the file's word, the default: temporary.
    assert CLI(database)("deliver", ALICE, stdin=message.encode()).code == 75


def test_deliverRefusesForGoodAMessageLargerThanTheWholeQuota(tmp_path):
    """
    A message larger than the recipient's whole quota can never be taken:
    exit 77 (the MTA bounces it at once, as SMTP and LMTP answer 552 5.2.3),
    not 75 (kept and retried for days), even with quota-exceeded at its
    default; with a recipient who had room among the recipients, 75.
    """
    database = tmp_path / "mail.sqlite3"
    cli = CLI(database)
    for user in (ALICE, BOB):
        assert cli("user", "add", user, "--password-stdin", stdin=f"{PASSWORD}\n".encode()).code == 0
    assert cli("user", "quota", ALICE, "100").code == 0
    message = b"Subject: too big for alice\n\n" + b"x" * 200 + b"\n"
    refused = cli("deliver", ALICE, stdin=message)
    assert (refused.code, refused.out) == (77, ""), refused
    assert refused.err == (
        f"mailgate: mailbox full: {ALICE} (the message is larger than the mailbox's whole quota)\n"
    )
    assert cli("deliver", ALICE, BOB, stdin=message).code == 75


def test_deliverWithTheServersFileNamesItsHostInReceived(tmp_path):
    """
    C{mailgate --config FILE deliver -f SENDER}: the C{Received:} field
    names the host the file's C{hostname} gives, as the server's SMTP and
    LMTP do, not the machine's own name.
    """
    database = tmp_path / "mail.sqlite3"
    config = tmp_path / "mailgate.toml"
    config.write_text(f'database = "sqlite:///{database}"\nhostname = "mx.example.org"\n')

    def mailgate(*argv, stdin=""):
        out, err = io.StringIO(), io.StringIO()
        code = run(["--config", str(config), *argv], stdin=_stdin(stdin.encode()), stdout=out, stderr=err, environ={})
        return Result(code, out.getvalue(), err.getvalue())

    assert mailgate("user", "add", ALICE, "--password-stdin", stdin=f"{PASSWORD}\n").code == 0
    assert mailgate("deliver", "-f", "bob@example.net", ALICE, stdin="Subject: hi\n\nhello\n").code == 0
    shown = CLI(database)("mailbox", "show", ALICE, "1")
    assert shown.code == 0, shown
    assert "\r\nReceived: by mx.example.org (mailgate) with local id " in shown.out, shown.out


def test_deliverWithTheServersFileFindsTheUserOfADetail(tmp_path):
    """
    With the file's recipient-delimiter, C{deliver} finds the user an
    address names with a detail (bob+lists@ is bob's) as SMTP and LMTP
    do; a detail of nobody is still no such user (67), and without the
    file the address is taken whole.
    """
    database = tmp_path / "mail.sqlite3"
    config = tmp_path / "mailgate.toml"
    config.write_text(f'database = "sqlite:///{database}"\nrecipient-delimiter = "+"\n')
    detail = ALICE.replace("@", "+lists@")

    def mailgate(*argv, stdin=""):
        out, err = io.StringIO(), io.StringIO()
        code = run(["--config", str(config), *argv], stdin=_stdin(stdin.encode()), stdout=out, stderr=err, environ={})
        return Result(code, out.getvalue(), err.getvalue())

    assert mailgate("user", "add", ALICE, "--password-stdin", stdin=f"{PASSWORD}\n").code == 0
    delivered = mailgate("deliver", detail, stdin="Subject: for a list\n\nhello\n")
    assert delivered.code == 0, delivered
    assert delivered.out.startswith(f"delivered to {ALICE} as ")
    # The Received field names the address as the MTA gave it, as SMTP's
    # and LMTP's do.
    assert mailgate("deliver", "-f", "bob@example.net", detail, stdin="Subject: traced\n\nhello\n").code == 0
    shown = CLI(database)("mailbox", "show", ALICE, "2")
    assert f"\r\n\tfor <{detail}>; " in shown.out, shown.out
    nobody = mailgate("deliver", "nobody+lists@example.org", stdin="Subject: x\n\nx\n")
    assert (nobody.code, nobody.err) == (67, "mailgate: no such user: nobody+lists@example.org\n")
    # A detail that is no address's own (an MTA's ${recipient} of SMTPUTF8
    # mail, or of a quoted local part) is the user's mail, as over LMTP.
    for recipient in ["alice+caf\u00e9@example.org", "alice+x y@example.org"]:
        delivered = mailgate("deliver", recipient, stdin="Subject: x\n\nx\n")
        assert (delivered.code, delivered.out[: len(f"delivered to {ALICE} ")]) == (0, f"delivered to {ALICE} "), delivered
    assert mailgate("deliver", "nobody+caf\u00e9@example.org", stdin="Subject: x\n\nx\n").code == 67
    assert CLI(database)("deliver", detail, stdin=b"Subject: x\n\nx\n").code == 67


def test_deliverWithTheServersFileFindsRecipientsAsLMTPDoes(tmp_path):
    """
    C{mailgate --config FILE deliver} finds recipients as the server's
    LMTP finds them: mail to postmaster (postmaster@ an accepted domain
    without a user of that name, or RFC 5321's domainless one) is the
    file's C{postmaster} user's, and a domain the file's C{domain} list
    does not name is refused.  The file's postmaster was ignored:
    postmaster@example.org exited 67 (the MTA bounced it) while LMTP
    delivered it to the configured user.
    """
    database = tmp_path / "mail.sqlite3"
    config = tmp_path / "mailgate.toml"
    config.write_text(f'database = "sqlite:///{database}"\npostmaster = "{ALICE}"\ndomain = ["example.org"]\n')

    def mailgate(*argv, stdin=""):
        out, err = io.StringIO(), io.StringIO()
        code = run(["--config", str(config), *argv], stdin=_stdin(stdin.encode()), stdout=out, stderr=err, environ={})
        return Result(code, out.getvalue(), err.getvalue())

    assert mailgate("user", "add", ALICE, "--password-stdin", stdin=f"{PASSWORD}\n").code == 0
    for recipient in ("postmaster@example.org", "PostMaster@Example.org", "postmaster"):
        delivered = mailgate("deliver", "-f", "bob@example.net", recipient, stdin="Subject: abuse\n\nhello\n")
        assert (delivered.code, delivered.out[: len(f"delivered to {ALICE} ")]) == (0, f"delivered to {ALICE} "), delivered
    shown = CLI(database)("mailbox", "show", ALICE, "1")
    assert "\r\n\tfor <postmaster@example.org>; " in shown.out, shown.out
    # A user of ALICE's name in another domain is not this server's mail.
    CLI(database).add("alice@example.net", PASSWORD)
    refused = mailgate("deliver", "alice@example.net", stdin="Subject: x\n\nx\n")
    assert (refused.code, refused.out, refused.err) == (
        67, "", "mailgate: no such user: alice@example.net (relay access denied)\n"
    )
    # Without the file's postmaster, mail to postmaster is no one's, as
    # over LMTP (550 5.1.1).
    config.write_text(f'database = "sqlite:///{database}"\n')
    refused = mailgate("deliver", "postmaster@example.org", stdin="Subject: x\n\nx\n")
    assert (refused.code, refused.out) == (67, ""), refused
    assert refused.err.startswith("mailgate: no such user: postmaster@example.org (no postmaster mailbox here")


class _EndlessMessage(io.RawIOBase):
    """
    A message of C{size} octets on standard input, made as it is read,
    which counts the octets read.
    """

    def __init__(self, size):
        self.size = size
        self.given = 0

    def readable(self):
        return True

    def readinto(self, buffer):
        count = min(len(buffer), self.size - self.given)
        buffer[:count] = (b"Subject: big\n\n" + b"x" * count)[:count] if self.given == 0 else b"x" * count
        self.given += count
        return count


def test_deliverWithTheServersFileRefusesAMessageOverItsMaxMessageSize(tmp_path):
    """
    C{mailgate --config FILE deliver} refuses a message larger than the
    file's C{max-message-size}, counted as SMTP and LMTP count it (the
    content with CRLF line ends, not the trace fields), as LMTP refuses it
    with 552 5.3.4: exit 65 (the MTA bounces it), nothing stored, and
    standard input read no further than the limit.  It was ignored: a 3 KB
    message went in with 1K set.
    """
    database = tmp_path / "mail.sqlite3"
    config = tmp_path / "mailgate.toml"
    config.write_text(f'database = "sqlite:///{database}"\nmax-message-size = "1K"\n')

    def mailgate(*argv, stdin=""):
        stream = _stdin(stdin.encode()) if isinstance(stdin, str) else io.TextIOWrapper(io.BufferedReader(stdin))
        out, err = io.StringIO(), io.StringIO()
        code = run(["--config", str(config), *argv], stdin=stream, stdout=out, stderr=err, environ={})
        return Result(code, out.getvalue(), err.getvalue())

    assert mailgate("user", "add", ALICE, "--password-stdin", stdin=f"{PASSWORD}\n").code == 0
    header = "Subject: x\n\n"
    # 1024 octets as stored: 12 + 2 for the header's bare LFs, the body's
    # line and its CRLF; the trace fields of -f are not counted.
    exactly = header + "x" * (1024 - 14 - 2) + "\n"
    assert mailgate("deliver", "-f", "bob@example.net", ALICE, stdin=exactly).code == 0
    refusal = "mailgate: message size exceeds the limit of 1024 octets (max-message-size); nothing was delivered\n"
    for message in (exactly.replace("\n", "x\n", 1), header + "x" * 3000 + "\n", header + "x" * 1011):
        refused = mailgate("deliver", ALICE, stdin=message)
        assert (refused.code, refused.out, refused.err) == (65, "", refusal), (len(message), refused)
    assert len(CLI(database).messages(ALICE)) == 1
    # Read no further than the limit: not the 64 MB offered.
    endless = _EndlessMessage(64 << 20)
    refused = mailgate("deliver", ALICE, stdin=endless)
    assert (refused.code, refused.err) == (65, refusal), refused
    assert endless.given <= 64 * 1024, endless.given
    # Without the file, the server's limit is unknown: none applies.
    assert CLI(database)("deliver", ALICE, stdin=(header + "x" * 3000 + "\n").encode()).code == 0


@pytest.mark.parametrize(
    "content, reason",
    [
        ("pop4 = []\n", "unknown key 'pop4' (did you mean 'pop3'?)"),
        ('database = "mysql://db/mail"\n',
         "key 'database': unsupported database URL 'mysql://db/mail': use sqlite:///FILE or postgresql://..."),
    ],
)
def test_aConfigFileTheServerWouldRefuseIsRefusedInOneLine(tmp_path, content, reason):
    config = tmp_path / "mailgate.toml"
    config.write_text(content)
    for argv, code in ((["user", "list"], 78), (["deliver", ALICE], 75)):
        out, err = io.StringIO(), io.StringIO()
        status = run(["--config", str(config), *argv], stdin=io.StringIO(""), stdout=out, stderr=err, environ={})
        result = Result(status, out.getvalue(), err.getvalue())
        assert (result.code, result.out) == (code, ""), result
        assert oneLineError(result) == f"mailgate: {config}: {reason}\n"
    missing = tmp_path / "missing.toml"
    out, err = io.StringIO(), io.StringIO()
    status = run(["--config", str(missing), "user", "list"], stdout=out, stderr=err, environ={})
    assert status == 78
    assert err.getvalue() == f"mailgate: {missing}: cannot read the configuration file: No such file or directory\n"


def test_serveTakesMailgatesConfigFile(tmp_path):
    """
    C{mailgate --config FILE serve} serves with that file, as
    C{mailgate serve --config FILE} does: here one it refuses, in one line.
    """
    config = tmp_path / "mailgate.toml"
    config.write_text("pop4 = []\n")
    out, err = io.StringIO(), io.StringIO()
    code = run(["--config", str(config), "serve"], stdout=out, stderr=err, environ={})
    assert (code, err.getvalue()) == (78, f"mailgate: {config}: unknown key 'pop4' (did you mean 'pop3'?)\n")


# -- --json: listings for scripts ---------------------------------------------------


def test_listingsForScriptsAreJSONLines(cli):
    """
    C{--json}: one object per line with fixed keys, whatever the table's
    widths (an address longer than its column) or words.
    """
    import json

    long = "a-rather-long-local-part-for-a-column@example.org"
    cli.add(ALICE, PASSWORD, "--apop")
    cli.add(long, BOB_PASSWORD)
    assert cli("user", "quota", ALICE, "1M", "--messages", "none").code == 0
    assert cli("user", "expire", long, "never").code == 0
    assert cli("deliver", ALICE, stdin=b"Subject: one\r\n\r\nbody\r\n").code == 0
    assert cli("ban", "add", "192.0.2.7", "--for", "60").code == 0

    def records(*argv):
        result = cli(*argv, "--json")
        assert (result.code, result.err) == (0, ""), result
        return [json.loads(line) for line in result.out.splitlines()]

    [message] = records("mailbox", "list", ALICE)
    assert set(message) == {"number", "octets", "unique_id", "arrived"}
    table = cli("mailbox", "list", ALICE).out.splitlines()[1].split()
    assert [message["number"], message["octets"], message["unique_id"]] == [1, int(table[1]), table[2]]
    assert records("user", "list") == [
        {"address": long, "messages": 0, "octets": 0, "apop": False, "cram_md5": False, "password": "mailgate",
         "quota_octets": "default", "quota_messages": "default", "expire_days": "never", "last_login": None,
         "disabled": False, "disabled_since": None, "disabled_reason": None, "allowed_networks": None},
        {"address": ALICE, "messages": 1, "octets": message["octets"], "apop": True, "cram_md5": True,
         "password": "mailgate", "quota_octets": 1048576, "quota_messages": "none", "expire_days": "default",
         "last_login": None, "disabled": False, "disabled_since": None, "disabled_reason": None,
         "allowed_networks": None},
    ]
    assert datetime.datetime.fromisoformat(message["arrived"].replace("Z", "+00:00"))
    assert records("mailbox", "deleted", ALICE) == []
    assert records("who") == []
    [ban] = records("ban", "list")
    assert {k: ban[k] for k in ("address", "reason", "failures")} == {
        "address": "192.0.2.7", "reason": "admin", "failures": 0,
    }


def test_helpTextsSayWhatTheREADMESays(cli):
    """
    The argument names of the README's synopsis (ADDRESS), and a URL's
    @ written as the URL has it (%40, not the %%40 of a format string
    that is not formatted).
    """
    for argv in (["user", "add"], ["user", "quota"], ["mailbox", "list"], ["kick"], ["import", "maildir"]):
        usage = cli(*argv, "--help").out.split("\n\n")[0]
        assert " ADDRESS" in usage and "address" not in usage, usage
    text = " ".join(cli("import", "pop3", "--help").out.split())
    assert "URL [ADDRESS]" in text
    # The two forms of the synopsis, not argparse's ADDRESS DIR | DIR [ADDRESS DIR | DIR ...].
    usage = cli("mailbox", "export", "--help").out.split("\n\n")[0]
    assert usage == "usage: mailgate mailbox export [-h] (ADDRESS DIR | --all DIR)", usage
    assert "a user name containing @ written %40;" in text and "%%" not in text


def test_everyCommandsHelpSaysWhatItDoes(cli):
    """
    C{mailgate COMMAND [ACTION] --help} opens with a paragraph saying what
    the command does, as C{user del}'s does: C{user add}, C{user passwd},
    C{user list}, C{mailbox list} and C{mailbox deleted}, then C{who},
    C{kick} (which discards the session's deletions), C{db upgrade}, C{db
    version} and C{ban list|add|del} had their usage line and options
    alone.  (C{serve}'s help is twistd mailgate's.)
    """
    import argparse

    from mailgate.cli import buildParser

    def commands(parser, path):
        groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not groups:
            yield path
            return
        for name, subparser in groups[0].choices.items():
            yield from commands(subparser, [*path, name])

    every = [path for path in commands(buildParser(), []) if path != ["serve"]]
    assert ["kick"] in every and ["ban", "del"] in every and len(every) > 30
    for path in every:
        paragraphs = cli(*path, "--help").out.split("\n\n")
        assert not paragraphs[1].startswith(("positional arguments:", "options:")), path
        assert len(paragraphs[1].split()) >= 8, (path, paragraphs[1])


def test_aDatabaseThatCannotBeOpenedIsTracedToWhereItsURLCameFrom(tmp_path, monkeypatch):
    """
    "check --database" misled an administrator who gave none: the URL came
    from $MAILGATE_DATABASE, the --config file, or is the default, which is
    relative to the working directory they happen to be in.
    """
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "mailgate.toml"
    config.write_text('database = "sqlite:///from-file.sqlite3"\n')

    def error(*argv, environ):
        out, err = io.StringIO(), io.StringIO()
        code = run(list(argv), stdin=io.StringIO(""), stdout=out, stderr=err, environ=environ)
        assert (code, out.getvalue()) == (78, ""), err.getvalue()
        return err.getvalue()

    created = "mailgate user add or db upgrade creates it"
    assert error("user", "list", environ={}) == (
        "mailgate: no such database file: mailgate.sqlite3 (check --database: none was given, nor "
        "$MAILGATE_DATABASE, and the default, sqlite:///mailgate.sqlite3, is in the working directory; "
        f"{created})\n"
    )
    assert error("user", "list", environ={"MAILGATE_DATABASE": "sqlite:///from-env.sqlite3"}) == (
        f"mailgate: no such database file: from-env.sqlite3 (check $MAILGATE_DATABASE; {created})\n"
    )
    assert error("--config", str(config), "user", "list", environ={}) == (
        f"mailgate: no such database file: from-file.sqlite3 (check database in {config}; {created})\n"
    )
    noDatabase = tmp_path / "no-database.toml"
    noDatabase.write_text("max-recipients = 10\n")
    assert error("--config", str(noDatabase), "user", "list", environ={}) == (
        f"mailgate: no such database file: mailgate.sqlite3 (check --database: none was given, nor "
        f"database in {noDatabase}, nor $MAILGATE_DATABASE, and the default, sqlite:///mailgate.sqlite3, "
        f"is in the working directory; {created})\n"
    )
    assert error("user", "list", environ={"MAILGATE_DATABASE": "mysql://db/mail"}) == (
        "mailgate: $MAILGATE_DATABASE: unsupported database URL 'mysql://db/mail': "
        "use sqlite:///FILE or postgresql://...\n"
    )
    assert sorted(tmp_path.iterdir()) == sorted([config, noDatabase])


def test_deliverHelpGivesTheExitStatusesAPipeTransportActsOn(cli):
    text = " ".join(cli("deliver", "--help").out.split())
    for status in ("0 delivered", "67 no such user", "75 a temporary failure", "65 a sender",
                   "larger than the recipients' whole quota"):
        assert status in text, status


def _usersUnderICUCollation(tmp_path, postgresURL, addresses):
    """
    Add C{addresses} as users of the PostgreSQL database, then give the
    users table's address column ICU's root collation (as a database made
    with a locale such as en_US.UTF-8 orders), checked to order them
    otherwise than code points do; return the command runner.
    """
    import psycopg

    cli = CLI(tmp_path / "unused.sqlite3")
    for address in addresses:
        added = cli("user", "add", address, "--password-stdin", stdin=f"{PASSWORD}\n", database=postgresURL)
        assert added.code == 0, added
    with psycopg.connect(postgresURL, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_collation WHERE collname = 'und-x-icu'").fetchone() is None:
            pytest.skip("this PostgreSQL has no ICU collations")
        conn.execute('ALTER TABLE users ALTER COLUMN address TYPE text COLLATE "und-x-icu"')
        collated = [row[0] for row in conn.execute("SELECT address FROM users ORDER BY address")]
    assert collated != sorted(addresses)  # the collation orders them otherwise
    return cli


def test_userListIsInByteOrderWhateverTheDatabasesCollation(tmp_path, postgresURL):
    """
    C{user list} (and C{--json}) lists addresses in byte order, as
    C{LC_ALL=C sort} and SQLite order them, also on a PostgreSQL database
    whose collation orders punctuation otherwise (a database made with a
    locale such as en_US.UTF-8; here the users table's column is given
    ICU's root collation): it listed a_b before a-c before a+b there.
    """
    import json

    addresses = ["ab@example.org", "a_b@example.org", "a-c@example.org", "a+b@example.org", "a.b@example.org",
                 "a@example.org", "a9@example.org"]
    cli = _usersUnderICUCollation(tmp_path, postgresURL, addresses)
    listed = cli("user", "list", "--json", database=postgresURL)
    assert [json.loads(line)["address"] for line in listed.out.splitlines()] == sorted(addresses)
    table = cli("user", "list", database=postgresURL)
    assert [line.split()[0] for line in table.out.splitlines()[1:]] == sorted(addresses)


def test_commandsGoingThroughAllUsersTakeThemInUserListsOrder(tmp_path, postgresURL):
    """
    C{user recount --all} (and C{mailbox export --all}, which reads the
    same whole listing) goes through the users in code point order, the
    order of C{user list}, on a PostgreSQL database whose collation orders
    otherwise (as test_userListIsInByteOrderWhateverTheDatabasesCollation):
    the whole listing followed the collation, the paged one did not, and
    with UTF-8 local parts jörg fell between jones and jung.
    """
    addresses = ["jung@example.org", "j\u00f6rg@example.org", "jones@example.org", "a_b@example.org",
                 "a-c@example.org", "a+b@example.org"]
    cli = _usersUnderICUCollation(tmp_path, postgresURL, addresses)
    recounted = cli("user", "recount", "--all", database=postgresURL)
    assert recounted.code == 0, recounted
    assert [line.split(":")[0] for line in recounted.out.splitlines()[:-1]] == sorted(addresses)


@pytest.mark.parametrize(
    "argv",
    [
        ["user", "quota", ALICE, "1G"],
        ["user", "quota", ALICE, "0"],
        ["user", "expire", ALICE, "30"],
        ["user", "list"],
        ["mailbox", "list", ALICE],
    ],
)
def test_aCommandWithoutConfigDoesNotLoadTheServersConfiguration(cli, argv):
    """
    Scripts run the command once per user in loops (a quota for each of
    50,000 users): C{user quota} and C{user expire} imported
    L{mailgate.config} for two sentences of it, and with it the servers'
    protocols and Twisted's endpoints, some 0.2 s of each 0.3 s run (50,000
    runs: 4.4 hours, 1.7 of them importing).  Without C{--config}, a
    command loads neither.
    """
    cli.add(ALICE, PASSWORD)
    code = (
        "import sys\n"
        "from mailgate.cli import run\n"
        f"code = run({['--database', cli.url, *argv]!r})\n"
        "print(code, sorted(m for m in ('mailgate.config', 'mailgate.pop3.protocol', 'twisted.internet.endpoints') "
        "if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    expected = "64" if argv[-1] == "0" else "0"
    assert result.stdout.splitlines()[-1] == f"{expected} []", result


@pytest.mark.parametrize("argv, option", [
    (["ban", "add", "192.0.2.1", "--for", "abc"], "--for"),
    (["kick", "alice@example.org", "--wait", "-1"], "--wait"),
    (["mailbox", "expunge", "alice@example.org", "--older-than", "soon"], "--older-than"),
])
def test_aBadOptionValueIsAUsageErrorBeforeTheDatabaseIsOpened(tmp_path, argv, option):
    """
    A number option's bad value is a usage error (64) whatever the
    database's state: these were read once the database was opened, so
    that with a SQLite file not there they said "no such database file"
    (78) and sent the administrator after the database.
    """
    from e2e import mailgateHere

    code, out, err = mailgateHere(f"sqlite:///{tmp_path / 'none.db'}", *argv)
    assert (code, out) == (64, ""), err
    assert err.startswith(f"mailgate: bad {option}: ") and err.count("\n") == 1, err
    assert not (tmp_path / "none.db").exists()


def _refusedBeforeOpening(tmp_path, argv):
    """
    C{argv} run on a SQLite file not there: (exit status, stdout, the
    message after "mailgate: "), and that the file is still not there.
    """
    from e2e import mailgateHere

    code, out, err = mailgateHere(f"sqlite:///{tmp_path / 'none.db'}", *argv)
    assert not (tmp_path / "none.db").exists()
    assert err.startswith("mailgate: ") and err.count("\n") == 1, err
    return code, out, err[len("mailgate: "):-1]


BAD_ADDRESS = "not an address of the form local@domain: 'bad@@x'"


@pytest.mark.parametrize("argv, code, message", [
    (["user", "add", "bad@@x", "--password-stdin"], 65, BAD_ADDRESS),
    (["user", "add", "a@example.org", "--hashed", "--apop"], 64, "APOP needs the password itself, not a hash"),
    (["user", "passwd", "bad@@x"], 65, BAD_ADDRESS),
    (["user", "test", "bad@@x"], 65, BAD_ADDRESS),
    (["user", "del", "bad@@x"], 65, BAD_ADDRESS),
    (["user", "apop", "bad@@x", "on"], 65, BAD_ADDRESS),
    (["user", "rename", "a@example.org", "bad@@x"], 65, BAD_ADDRESS),
    (["user", "recount", "a@example.org", "bad@@x"], 65, BAD_ADDRESS),
    (["user", "recount"], 64, "give the ADDRESSes to recount, or --all"),
    (["user", "quota", "bad@@x", "1M"], 65, BAD_ADDRESS),
    (["user", "quota", "a@example.org", "10Q"], 64, "bad size: not a size: '10Q' (use e.g. 1G, 500M, 64K or octets)"),
    (["user", "quota", "a@example.org", "1M", "--messages", "abc"], 64, "bad message count: not a whole number: 'abc'"),
    (["user", "expire", "a@example.org", "abc"], 64, "bad number of days: not a whole number: 'abc'"),
    (["user", "import", "-", "--domain", "bad@@x"], 64, "invalid domain: 'bad@@x'"),
    (["user", "import", "-", "--scheme", "{PLAIN}"], 64,
     "--scheme '{PLAIN}' is not a scheme's name (PLAIN, SHA512-CRYPT...)"),
    (["user", "import", "-", "--scheme", "SHA512CRYPT"], 64,
     "--scheme 'SHA512CRYPT' is not a scheme mailgate checks (PLAIN, SHA512-CRYPT...)"),
    (["user", "import", "-", "--scheme", "DIGEST-MD5"], 64,
     "--scheme 'DIGEST-MD5' is not a scheme mailgate checks (PLAIN, SHA512-CRYPT...)"),
])
def test_aUserCommandsBadValueIsRefusedBeforeTheDatabaseIsOpened(tmp_path, argv, code, message):
    """
    The user commands read their addresses, limits and options before
    the database is opened: a bad one is refused as what it is (64 a
    usage error, 65 a bad address) whatever the database's state.  They
    said "no such database file" (78) on a SQLite file not there, and
    user add and user import, which create the database, made one before
    refusing the address or option.
    """
    assert _refusedBeforeOpening(tmp_path, argv) == (code, "", message)


@pytest.mark.parametrize("argv, code, message", [
    (["mailbox", "list", "bad@@x"], 65, BAD_ADDRESS),
    (["mailbox", "deleted", "bad@@x"], 65, BAD_ADDRESS),
    (["mailbox", "restore", "bad@@x"], 65, BAD_ADDRESS),
    (["mailbox", "restore", "a@example.org", "--since", "soonish"], 64,
     "bad time 'soonish': use e.g. 2024-05-01T10:00:00Z, 2024-05-01 or 2h (ago)"),
    (["mailbox", "expunge", "bad@@x", "--all"], 65, BAD_ADDRESS),
    (["mailbox", "show", "bad@@x", "1"], 65, BAD_ADDRESS),
    (["mailbox", "export", "bad@@x", "out"], 65, BAD_ADDRESS),
    (["mailbox", "export", "--all", "out", "more"], 64,
     "with --all, give the directory alone (each user goes into DIR/ADDRESS)"),
])
def test_aMailboxCommandsBadValueIsRefusedBeforeTheDatabaseIsOpened(tmp_path, argv, code, message):
    """
    As the user commands': the mailbox commands' addresses and options
    are read before the database is opened (78 on a SQLite file not
    there before).
    """
    assert _refusedBeforeOpening(tmp_path, argv) == (code, "", message)


@pytest.mark.parametrize("argv, code, message", [
    (["import", "forget", "bad@@x"], 65, BAD_ADDRESS),
    (["import", "maildir", "Maildir", "bad@@x"], 65, BAD_ADDRESS),
    (["import", "maildir", "Maildir", "a@example.org", "--uidl-format", "%Q"], 64,
     "bad --uidl-format '%Q': %Q is no variable of pop3_uidl_format (Dovecot's are %u, %v, %f, %g and %m)"),
    # A modifier Dovecot 2.3 has (a hash of its own) but no format needs:
    # before, "%H is not available here", as though the maildir lacked it.
    (["import", "maildir", "Maildir", "a@example.org", "--uidl-format", "%08Hf"], 64,
     "bad --uidl-format '%08Hf': Dovecot's modifier H (%H) is not one the import computes: it takes L, U, X, "
     "R, M, T and widths"),
    (["import", "maildir", "Maildir", "a@example.org", "--max-message-size", "abc"], 64,
     "bad --max-message-size: not a size: 'abc' (use e.g. 1G, 500M, 64K or octets)"),
    (["import", "pop3", "pop3://mail.example.org", "bad@@x"], 65, BAD_ADDRESS),
    (["import", "pop3", "pop3://mail.example.org", "a@example.org", "--max-message-size", "0"], 64,
     "bad --max-message-size: must be at least 1"),
    (["import", "pop3", "pop3://mail.example.org:99999", "a@example.org"], 64,
     "bad port in 'pop3://mail.example.org:99999'"),
    (["import", "pop3", "pop3://mail.example.org", "a@example.org", "--mirror", "--delete"], 64,
     "--mirror and --delete do not go together: --delete empties the source"),
    (["import", "pop3", "pop3://mail.example.org", "--users", "users", "--master-user", "a b"], 64,
     "--master-user and --master-separator must be words"),
    (["import", "pop3", "pop3://mail.example.org", "--users", "users", "--master-user", "m",
      "--master-separator", "**"], 64, "--master-separator is one character, as Dovecot's"),
    (["import", "pop3", "pop3://mail.example.org", "a@example.org", "--master-separator", "+"], 64,
     "--master-separator goes with --master-user"),
    (["import", "pop3", "pop3://mail.example.org"], 64, "give the ADDRESS to import into (or --users FILE)"),
])
def test_anImportsBadValueIsRefusedBeforeTheDatabaseIsOpened(tmp_path, argv, code, message):
    """
    As the user commands': import's addresses, URL and options are read
    before the database is opened (78 on a SQLite file not there
    before), and before the maildir or the --users file is read.
    """
    assert _refusedBeforeOpening(tmp_path, argv) == (code, "", message)


@pytest.mark.parametrize("argv, code, message", [
    (["kick", "bad@@x"], 65, BAD_ADDRESS),
    (["ban", "add", "192.0.2"], 65, "not an IP address (nor an IPv6 /64 network): '192.0.2'"),
    (["ban", "del", "192.0.2"], 65, "not an IP address (nor an IPv6 /64 network): '192.0.2'"),
])
def test_aSessionOrBanCommandsBadAddressIsRefusedBeforeTheDatabaseIsOpened(tmp_path, argv, code, message):
    """
    kick's and ban's addresses, as their options since a93d15e, are read
    before the database is opened (78 on a SQLite file not there before).
    """
    assert _refusedBeforeOpening(tmp_path, argv) == (code, "", message)


NO_TERMINAL = "no terminal to ask for a password on; use --password-stdin"


@pytest.mark.parametrize("argv, code, message", [
    (["import", "maildir", "{tmp}/absent", "a@example.org"], 66, "{tmp}/absent is not a maildir (no cur/ or new/)"),
    (["import", "maildir", "{tmp}/empty", "a@example.org"], 66, "{tmp}/empty is not a maildir (no cur/ or new/)"),
    (["import", "maildir", "{tmp}/mbox", "a@example.org"], 65,
     "{tmp}/mbox is an mbox file (Dovecot's mbox format), not a maildir: import it through Dovecot's POP3"),
    (["import", "maildir", "{tmp}/Maildir", "a@example.org", "--uidlist", "{tmp}/absent"], 66,
     "no such file: {tmp}/absent"),
    (["import", "maildir", "{tmp}/Maildir", "a@example.org", "--uidl-format", "%08Xu%08Xv"], 66,
     "{tmp}/Maildir has no dovecot-uidlist, so its messages have no uid or uidvalidity: use a --uidl-format "
     "without %u and %v (e.g. %f)"),
    (["import", "pop3", "pop3://mail.example.org", "--users", "{tmp}/absent"], 66,
     "cannot read {tmp}/absent: No such file or directory"),
    (["import", "pop3", "pop3://mail.example.org", "--users", "{tmp}/users"], 65,
     "{tmp}/users line 1: expected ADDRESS PASSWORD"),
    (["import", "pop3", "pop3://a%0Ab@mail.example.org", "a@example.org", "--password-stdin"], 64,
     "the user name holds a line break or a NUL, which POP3 cannot send"),
    (["import", "pop3", "pop3://mail.example.org", "a*b@example.org", "--master-user", "m", "--password-stdin"], 65,
     "the address has the master separator '*' in it, where the source would split the login; import it with "
     "its own password"),
    (["import", "pop3", "pop3://mail.example.org", "a@example.org"], 64, NO_TERMINAL),
    (["import", "pop3", "pop3://mail.example.org", "--users", "{tmp}/users", "--master-user", "m"], 64, NO_TERMINAL),
    (["user", "import", "{tmp}/absent"], 66, "cannot read {tmp}/absent: No such file or directory"),
    (["user", "add", "a@example.org"], 64, NO_TERMINAL),
    (["user", "passwd", "a@example.org"], 64, NO_TERMINAL),
    (["user", "test", "a@example.org"], 64, NO_TERMINAL),
    (["user", "apop", "a@example.org", "on"], 64, NO_TERMINAL),
    (["db", "backup", "{tmp}/Maildir"], 73, "{tmp}/Maildir exists: a backup goes into a new file"),
    (["db", "copy", "--from", "sqlite:///{tmp}/none.db", "--to", "sqlite:{tmp}/copy.db"], 78,
     "--to: bad SQLite URL 'sqlite:{tmp}/copy.db': use sqlite:///relative/path or sqlite:////absolute/path"),
])
def test_whatANeedsNoDatabaseIsRefusedBeforeItIsOpened(tmp_path, argv, code, message):
    """
    As addresses and option values since d5db930: what a command refuses
    without the database is refused before it is opened, in the words it
    had, whatever the database's state: import maildir's DIR that is no
    maildir, a --uidlist not there, a --uidl-format with uids and no uid
    list; import pop3's --users file (read whole first), a user name in
    its URL that POP3 cannot send, an ADDRESS with the master separator;
    user import's file; a password with neither --password-stdin nor a
    terminal to ask on; db backup into a file there already; db copy's
    --to.  With a SQLite file not there each said "no such database file"
    (78; db copy "--from: no such database file"), and user add and user
    import made the file first.
    """
    (tmp_path / "Maildir" / "cur").mkdir(parents=True)
    (tmp_path / "empty").mkdir()
    (tmp_path / "mbox").write_bytes(b"From alice@example.org Sat Dec  5 10:00:00 2026\nSubject: hi\n\nhi\n")
    (tmp_path / "users").write_text("a@example.org\n")
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in argv]
    refused, out, said = _refusedBeforeOpening(tmp_path, argv)
    assert (refused, out) == (code, ""), said
    assert said.startswith(message.replace("{tmp}", str(tmp_path))), said


@pytest.mark.parametrize("argv", [
    ["import", "maildir", "{tmp}/absent", "a@example.org"],
    ["import", "pop3", "pop3://mail.example.org", "--users", "{tmp}/absent"],
    ["import", "pop3", "pop3://mail.example.org", "a@example.org"],
    ["user", "import", "{tmp}/absent"],
    ["user", "add", "a@example.org"],
    ["db", "backup", "{tmp}/backup.db"],
    ["db", "copy", "--from", "{database}", "--to", "sqlite:{tmp}/copy.db"],
])
def test_whatANeedsNoDatabaseIsRefusedBeforeConnectingToPostgreSQL(tmp_path, argv):
    """
    On PostgreSQL, the same refusals come before any connection to the
    database: the URL names a port that listens and never answers, and
    nothing has connected to it when the command is done.  Before, each
    command connected first (db backup, to say that it copies SQLite
    alone), and waited there for the server's answer.
    """
    import socket

    from e2e import mailgateHere

    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setblocking(False)
        url = f"postgresql://mailgate@127.0.0.1:{listener.getsockname()[1]}/mailgate?connect_timeout=2"
        argv = [arg.replace("{tmp}", str(tmp_path)).replace("{database}", url) for arg in argv]
        code, out, err = mailgateHere(url, *argv)
        assert code in (64, 65, 66, 78) and err.count("\n") == 1, err
        with pytest.raises(BlockingIOError):
            listener.accept()
