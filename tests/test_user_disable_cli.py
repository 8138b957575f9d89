"""
C{mailgate user disable} and C{user enable}: the commands (output, exit
statuses, C{user list}, the audit trail), C{user import} of a Dovecot
passwd-file's C{nologin} and C{fail} lines (with a real Dovecot), the
schema migration of a database an older mailgate left with users in it
(SQLite and PostgreSQL), C{db copy} carrying the state, and a real
C{twistd mailgate} with poplib: the session in progress ended by the
command, the next login refused, a remembered password too, and the user
let in again by C{user enable}.
"""

import json
import os
import poplib

import pytest

from databasefiles import olderSchema, olderUser
from dovecotserver import PrivateDovecot, requireDovecot
from e2e import mailgate_cli, mailgate_server, waitFor  # noqa: F401 (fixtures)
from mailgate.auth.passwords import makeCredentials
from mailgate.store import openSynchronousStore
from mailgate.store.schema import LATEST, currentVersion
from mailgate.testing import TEST_HASH_COST, POP3Session, deliver, resultOf
from test_cli import CLI, oneLineError
from test_lifecycle_e2e import pop
from test_cli_audit import AUTHPRIV_NOTICE, assertLine, setUp, syslog, who  # noqa: F401 (fixture)

ALICE = "alice@example.org"
BOB = "bob@example.org"
PASSWORD = "wonderland-disabled"
REASON = "Account suspended: call 555-0100"


@pytest.fixture
def cli(tmp_path, cheapCommandHashes):
    return CLI(tmp_path / "admin.sqlite3")


def login(url, address, password, peer=None):
    """
    A USER/PASS login without sockets (from C{peer}, a Twisted address,
    if given): what the client is told.
    """
    store = openSynchronousStore(url)
    try:
        s = POP3Session(store) if peer is None else POP3Session(store, peer=peer)
        reply = s.login(address, password)
        s.command("QUIT")
        return reply
    finally:
        store.close()


def test_disableAndEnable(cli):
    cli.add(ALICE, PASSWORD)
    cli.add(BOB, PASSWORD)
    result = cli("user", "disable", ALICE, "--reason", REASON)
    assert (result.code, result.err) == (0, ""), result
    assert result.out == (
        f"disabled {ALICE} ({REASON}): POP3 logins refused on every server; mail is still delivered\n"
    )
    assert login(cli.url, ALICE, PASSWORD) == f"-ERR [AUTH] {REASON}\r\n"
    assert login(cli.url, BOB, PASSWORD).startswith("+OK")
    again = cli("user", "disable", ALICE)
    assert again.out == f"{ALICE} was disabled already; the reason is now none\n"
    assert login(cli.url, ALICE, PASSWORD) == "-ERR [AUTH] Login disabled for this user\r\n"

    table = cli("user", "list").out.splitlines()
    assert table[0].split()[-3:] == ["LAST-LOGIN", "NETWORKS", "DISABLED"]
    rows = {line.split()[0]: line for line in table[1:]}
    assert rows[BOB].split()[-1] == "no"
    assert rows[ALICE].split()[-2] == "since" and rows[ALICE].split()[-1].endswith("Z")
    records = {r["address"]: r for r in map(json.loads, cli("user", "list", "--json").out.splitlines())}
    assert (records[ALICE]["disabled"], records[ALICE]["disabled_reason"]) == (True, None)
    assert records[ALICE]["disabled_since"].endswith("Z")
    assert (records[BOB]["disabled"], records[BOB]["disabled_since"], records[BOB]["disabled_reason"]) == (
        False, None, None,
    )

    result = cli("user", "enable", ALICE)
    assert (result.code, result.out) == (0, f"enabled {ALICE}: POP3 logins with their password work again\n")
    assert login(cli.url, ALICE, PASSWORD).startswith("+OK")
    result = cli("user", "enable", ALICE)
    assert (result.code, result.out) == (0, f"{ALICE} was not disabled; nothing changed\n")


def test_aReasonIsShownInTheListing(cli):
    cli.add(ALICE, PASSWORD)
    assert cli("user", "disable", ALICE, "--reason", "  left\tthe company  ").code == 0
    line = cli("user", "list").out.splitlines()[1]
    assert line.endswith(" (left the company)"), line


@pytest.mark.parametrize(
    "argv, code, error",
    [
        (["user", "disable", "nobody@example.org"], 67, "no such user: nobody@example.org"),
        (["user", "enable", "nobody@example.org"], 67, "no such user: nobody@example.org"),
        (["user", "disable", "bad@@x"], 65, None),
        (["user", "enable", "bad@@x"], 65, None),
        (["user", "disable", ALICE, "--reason", " "], 64, "--reason is empty"),
        (["user", "disable", ALICE, "--reason", "a\x1bb"], 64, "--reason holds characters that cannot be shown"),
        (["user", "disable", ALICE, "--reason", "x" * 201], 64, "--reason is longer than 200 characters"),
        (["user", "disable", ALICE, "--wait", "-1"], 64, "--wait"),
    ],
)
def test_refusalsAreOneLineWithTheUsualExitStatus(cli, argv, code, error):
    cli.add(ALICE, PASSWORD)
    result = cli(*argv)
    assert result.code == code, result
    line = oneLineError(result)
    if error is not None:
        assert error in line, line
    assert login(cli.url, ALICE, PASSWORD).startswith("+OK")


def test_helpTexts(cli):
    for action in ("disable", "enable"):
        result = cli("user", action, "--help")
        assert result.code == 0 and " ADDRESS" in result.out.split("\n\n")[0]
    assert "disable" in cli("user", "--help").out and "enable" in cli("user", "--help").out


def test_theAuditTrailNamesBoth(syslog, cheapCommandHashes):
    setUp(syslog, "user", "add", ALICE, "--password-stdin", data=f"{PASSWORD}\n".encode())
    done, lines = syslog.logged("user", "disable", ALICE, "--reason", "stolen")
    assert done.returncode == 0, done.stderr
    assertLine(lines, AUTHPRIV_NOTICE, rf"admin user disable {ALICE}: disabled \(stolen\){who()}")
    done, lines = syslog.logged("user", "enable", ALICE)
    assert done.returncode == 0, done.stderr
    assertLine(lines, AUTHPRIV_NOTICE, rf"admin user enable {ALICE}: enabled{who()}")


# -- user import ------------------------------------------------------------------


def test_importKeepsNologinAndFailAccountsDisabled(cli, tmp_path):
    """
    A passwd-file's nologin account (with its reason) and fail account
    are imported disabled, with their password hash: user enable gives
    them back the password they had.  Before, both were reported and
    left out (exit 65), their mail with nowhere to go.
    """
    passwd = tmp_path / "passwd"
    passwd.write_text(
        f"{ALICE}:{{PLAIN}}{PASSWORD}::::::nologin=y reason=Moved\n"
        f"{BOB}:{{PLAIN}}{PASSWORD}::::::fail=y\n"
        f"carol@example.org:{{PLAIN}}{PASSWORD}::::::nologin\n"
        f"dave@example.org:{{PLAIN}}{PASSWORD}::::::\n"
    )
    result = cli("user", "import", str(passwd))
    assert (result.code, result.err) == (0, ""), result
    assert result.out.splitlines() == [
        f"added {ALICE} (disabled, as Dovecot's nologin had it: Moved)",
        f"added {BOB} (disabled, as Dovecot's fail had it)",
        "added carol@example.org (disabled, as Dovecot's nologin had it)",
        "added dave@example.org",
        "4 added, 0 already there, 0 failed",
    ]
    assert login(cli.url, ALICE, PASSWORD) == "-ERR [AUTH] Moved\r\n"
    assert login(cli.url, BOB, PASSWORD) == "-ERR [AUTH] Login disabled for this user\r\n"
    assert login(cli.url, "dave@example.org", PASSWORD).startswith("+OK")
    for address in (ALICE, BOB):
        assert cli("user", "enable", address).code == 0
        assert login(cli.url, address, PASSWORD).startswith("+OK")
    # Run again: there already, left as they are.
    assert cli("user", "import", str(passwd)).out.splitlines()[-1] == "0 added, 4 already there, 0 failed"


# -- the schema ------------------------------------------------------------------


def test_usersOfTheSchemaBeforeAreEnabledAfterTheMigration(databaseURL):
    """
    A database as the mailgate before disabled users left it (schema 14),
    with a user and mail: migrated, the user logs in as before and can be
    disabled and enabled; on both engines.
    """
    olderSchema(databaseURL, version=14)
    olderUser(databaseURL, ALICE, makeCredentials(PASSWORD, logN=TEST_HASH_COST))
    store = openSynchronousStore(databaseURL)
    try:
        assert store.database.run(currentVersion) == LATEST
        deliver(store, [ALICE], b"Subject: hi\r\n\r\nhello\r\n")
        [summary] = resultOf(store.listUsers())
        assert (summary.disabledAt, summary.disabledReason) == (None, None)
        s = POP3Session(store)
        assert s.login(ALICE, PASSWORD).startswith(f"+OK {ALICE} has 1 messages")
        assert s.command("QUIT").startswith("+OK")
        resultOf(store.disableUser(ALICE, "after the upgrade"))
        assert POP3Session(store).login(ALICE, PASSWORD) == "-ERR [AUTH] after the upgrade\r\n"
    finally:
        store.close()


def test_dbCopyCarriesTheState(cli, tmp_path, postgresURL):
    """
    SQLite to PostgreSQL and back: the disabled user stays disabled, with
    the reason and the time.
    """
    cli.add(ALICE, PASSWORD)
    cli.add(BOB, PASSWORD)
    assert cli("user", "disable", ALICE, "--reason", REASON).code == 0
    before = cli("user", "list", "--json").out
    assert cli("db", "copy", "--from", cli.url, "--to", postgresURL).code == 0
    assert cli("user", "list", "--json", database=postgresURL).out == before
    assert login(postgresURL, ALICE, PASSWORD) == f"-ERR [AUTH] {REASON}\r\n"
    back = f"sqlite:///{tmp_path / 'back.sqlite3'}"
    assert cli("db", "copy", "--from", postgresURL, "--to", back).code == 0
    assert cli("user", "list", "--json", database=back).out == before
    assert login(back, BOB, PASSWORD).startswith("+OK")


# -- end to end: a real server, poplib -------------------------------------------


def test_disableEndsTheSessionAndRefusesTheNextLoginsOnARunningServer(mailgate_server, mailgate_cli):
    """
    On a running server (on both engines): user disable ends the session
    in progress (its deletions not applied) and says so; the next login
    is refused with the reason, also with the password the server
    remembered from the first login; user enable lets the user in again.
    """
    mailgate_cli.addUser(ALICE, PASSWORD)
    mailgate_cli.deliver(ALICE, b"Subject: one\r\n\r\nhello\r\n")
    server = mailgate_server("--auth-failure-delay", "0")
    client = pop(server.port, ALICE, PASSWORD)
    assert client.dele(1).startswith(b"+OK")
    waitFor(lambda: ALICE in mailgate_cli.check("who"), "the session in mailgate who")

    out = mailgate_cli.check("user", "disable", ALICE, "--reason", REASON)
    assert out == (
        f"disabled {ALICE} ({REASON}): POP3 logins refused on every server; mail is still delivered\n"
        "its POP3 session has ended; nothing it marked deleted was removed\n"
    )
    with pytest.raises((poplib.error_proto, OSError, EOFError)):
        client.stat()
        client.stat()
    client.close()
    # The password the server remembered from that login: refused all the same.
    with pytest.raises(poplib.error_proto, match=rf"-ERR \[AUTH\] {REASON}"):
        pop(server.port, ALICE, PASSWORD)
    with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\] invalid user name or password"):
        pop(server.port, ALICE, "wrong")
    # Mail still comes in.
    mailgate_cli.deliver(ALICE, b"Subject: two\r\n\r\nhello again\r\n")

    assert mailgate_cli.check("user", "enable", ALICE) == (
        f"enabled {ALICE}: POP3 logins with their password work again\n"
    )
    client = pop(server.port, ALICE, PASSWORD)
    assert client.stat()[0] == 2
    client.quit()


# -- a real Dovecot's passwd-file ---------------------------------------------------


@requireDovecot
def test_aDovecotNologinAccountMovesDisabledWithItsReason(tmp_path, cheapCommandHashes):
    """
    A real Dovecot refuses the right password of a nologin account with
    its reason; imported, mailgate refuses it with the same words, and
    user enable lets it in with the password Dovecot had.
    """
    server = PrivateDovecot(passdbFields={BOB: "nologin=y reason=Moved"})
    try:
        server.addUsers([ALICE, BOB], PASSWORD)
        server.start()
        server.pop3(ALICE, PASSWORD).quit()
        with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\] Moved"):
            server.pop3(BOB, PASSWORD)
        passwd = os.path.join(server.directory, "passwd")
        cli = CLI(tmp_path / "mail.sqlite3")
        result = cli("user", "import", passwd)
    finally:
        server.cleanup()
    assert result.code == 0, result
    assert f"added {BOB} (disabled, as Dovecot's nologin had it: Moved)" in result.out.splitlines()
    assert login(cli.url, BOB, PASSWORD) == "-ERR [AUTH] Moved\r\n"
    assert login(cli.url, ALICE, PASSWORD).startswith("+OK")
    assert cli("user", "enable", BOB).code == 0
    assert login(cli.url, BOB, PASSWORD).startswith("+OK")
