"""
Master users on real servers: C{twistd mailgate --master-users
--master-user-separator '*'} on 127.0.0.1, Python's poplib, the installed
C{mailgate} command, on SQLite and on the real PostgreSQL.

What an administrator sees: a master user added with C{mailgate master
add} while the server runs logs in to any user's maildrop with its own
password (C{USER alice@example.org*admin}, or AUTH PLAIN naming alice as
the authorisation identity), and the server's log names it on the
session's lines; removed, it is refused at once.  A whole move off a
mailgate server needs no user's password: C{mailgate import pop3
--master-user} logs in to the source through its master user, over
STLS with a verified certificate.  What the login path does is tested
without sockets in test_master_logins.py.

Every wait is bounded.
"""

import base64
import poplib

import pytest

from e2e import AdminCommand, mailgate_cli, mailgate_server, pop, popLogin, retrieve, sqliteOnly, waitFor  # noqa: F401
from mailgate.testing import addUser, deliver, memoryStore
from test_importers import served as _served

ALICE = "alice@example.org"
BOB = "bob@example.org"
ALICE_PASSWORD = "wonder land"
BOB_PASSWORD = "builder"
MASTER_PASSWORD = "keys to everything"
MASTERS = ("--master-users", "--master-user-separator", "*")


def _fill(url):
    """
    Alice with two messages and Bob with one, in the database at C{url}.
    """
    s = memoryStore(url)
    try:
        addUser(s, ALICE, ALICE_PASSWORD)
        addUser(s, BOB, BOB_PASSWORD)
        deliver(s, [ALICE], b"Subject: one\n\n.a dot line\n")
        deliver(s, [ALICE], b"Subject: two\n\n" + b"x" * 5000 + b"\n")
        deliver(s, [BOB], b"Subject: for bob\n\nhi\n")
    finally:
        s.close()


def _addMaster(cli, name=" Admin", password=MASTER_PASSWORD):
    return cli.check("master", "add", name.strip(), "--password-stdin", input=password + "\n")


def _plain(client, authzid, authcid, password):
    """
    AUTH PLAIN with an initial response, by hand (poplib has no AUTH).
    """
    response = base64.b64encode(f"{authzid}\0{authcid}\0{password}".encode()).decode()
    return client._shortcmd("AUTH PLAIN " + response).decode()


def test_aMasterUserAddedWhileTheServerRunsReadsAnyMaildrop(mailgate_server, mailgate_cli):
    _fill(mailgate_server.database)
    server = mailgate_server(*MASTERS)
    _addMaster(mailgate_cli)

    client = popLogin(server, f"{ALICE}*admin", MASTER_PASSWORD)
    try:
        assert client.stat()[0] == 2
        assert retrieve(client, 1).endswith(b"\r\n.a dot line\r\n")
    finally:
        client.quit()

    client = pop(server)
    try:
        assert _plain(client, BOB, "ADMIN", MASTER_PASSWORD).startswith(f"+OK {BOB} has 1 message")
    finally:
        client.quit()

    # The server's log names the master user on the session's lines.
    waitFor(lambda: f"pop3 logout user={BOB} master=admin peer=" in server.stdout, "the logout line")
    assert f"pop3 login user={ALICE} master=admin peer=" in server.stdout
    assert MASTER_PASSWORD not in server.stdout + server.stderr

    # Removed, refused at once, as a wrong password is.
    mailgate_cli.check("master", "del", "admin")
    client = pop(server)
    try:
        client.user(f"{ALICE}*admin")
        with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\] invalid user name or password"):
            client.pass_(MASTER_PASSWORD)
    finally:
        client.quit()


def test_withoutMasterUsersTheServerRefusesThem(mailgate_server, mailgate_cli):
    _fill(mailgate_server.database)
    server = mailgate_server()
    _addMaster(mailgate_cli)
    client = pop(server)
    try:
        with pytest.raises(poplib.error_proto, match="authorising as another user is not supported"):
            _plain(client, ALICE, "admin", MASTER_PASSWORD)
        client.user(f"{ALICE}*admin")
        with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\] invalid user name or password"):
            client.pass_(MASTER_PASSWORD)
    finally:
        client.quit()


@sqliteOnly
def test_importFromAMailgateThroughItsMasterUser(mailgate_server, mailgate_cli, tmp_path, monkeypatch):
    """
    A move off one mailgate onto another (a new machine, another
    database) with none of the users' passwords: the users' list and
    the password hashes move with C{user list}/C{user import} or a
    backup, the mail by POP3 through the source's master user.
    """
    from certs import makeCertificate

    certificate, key = makeCertificate(tmp_path, "localhost", name="server")
    _fill(mailgate_server.database)
    source = mailgate_server(
        *MASTERS, "--tls-cert", str(certificate), "--tls-key", str(key), "--trusted-network", "192.0.2.0/24",
    )
    _addMaster(mailgate_cli, "migrator")
    target = f"sqlite:///{tmp_path / 'target.sqlite3'}"
    s = memoryStore(target)
    try:
        addUser(s, ALICE, ALICE_PASSWORD)
        addUser(s, BOB, BOB_PASSWORD)
    finally:
        s.close()
    users = tmp_path / "addresses"
    users.write_text(f"{ALICE}\n{BOB}\n")
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate))
    code, out, err = AdminCommand(target)(
        "import", "pop3", f"pop3://localhost:{source.port}", "--users", str(users),
        "--master-user", "migrator", "--password-stdin", input=MASTER_PASSWORD + "\n",
    )
    assert (code, err) == (0, ""), (out, err)
    for address, password in ((ALICE, ALICE_PASSWORD), (BOB, BOB_PASSWORD)):
        assert _served(target, address, password) == _served(source.database, address, password)
    assert len(_served(target, ALICE, ALICE_PASSWORD)[0]) == 2
    assert f"pop3 login user={BOB} master=migrator peer=" in source.stdout


def _whoRecords(cli):
    import json

    return [json.loads(line) for line in cli.check("who", "--json").splitlines()]


def test_anAdministratorSeesAMasterUsersSessionAndWhatItDeleted(mailgate_server, mailgate_cli):
    """
    What an administrator sees of a helpdesk's login to alice's maildrop:
    C{mailgate who}, run while the session is in, names the master user
    (its MASTER column, C{master} in C{--json}); the message it deletes,
    kept with C{--keep-deleted-days}, is listed by C{mailgate mailbox
    deleted} with the master user beside the client's address; C{mailgate
    kick} of such a session says whose it was, and so does C{mailgate user
    disable}.  Bob's own session and his own deletion name none.
    """
    import json

    _fill(mailgate_server.database)
    server = mailgate_server(*MASTERS, "--keep-deleted-days", "7")
    _addMaster(mailgate_cli)

    helpdesk = popLogin(server, f"{ALICE}*admin", MASTER_PASSWORD)
    own = popLogin(server, BOB, BOB_PASSWORD)
    try:
        records = waitFor(lambda: len(_whoRecords(mailgate_cli)) == 2 and _whoRecords(mailgate_cli), "two sessions")
        assert {r["user"]: r["master"] for r in records} == {ALICE: "admin", BOB: None}
        helpdeskPort, ownPort = helpdesk.sock.getsockname()[1], own.sock.getsockname()[1]
        assert {r["user"]: r["client"] for r in records} == {
            ALICE: f"127.0.0.1:{helpdeskPort}", BOB: f"127.0.0.1:{ownPort}",
        }
        lines = mailgate_cli.check("who").splitlines()
        assert lines[0].split() == ["USER", "NODE", "CLIENT", "MASTER", "SINCE"]
        rows = {line.split()[0]: line.split() for line in lines[1:]}
        assert rows[ALICE][2:4] == [f"127.0.0.1:{helpdeskPort}", "admin"]
        assert rows[BOB][2:4] == [f"127.0.0.1:{ownPort}", "-"]

        assert helpdesk.dele(1).startswith(b"+OK")
        assert own.dele(1).startswith(b"+OK")
    finally:
        helpdesk.quit()
        own.quit()

    out = mailgate_cli.check("mailbox", "deleted", ALICE)
    [line] = out.splitlines()[1:]
    assert line.endswith(f" 127.0.0.1:{helpdeskPort} (master user admin)"), out
    [record] = [json.loads(line) for line in mailgate_cli.check("mailbox", "deleted", ALICE, "--json").splitlines()]
    assert (record["from"], record["master"]) == (f"127.0.0.1:{helpdeskPort}", "admin")
    out = mailgate_cli.check("mailbox", "deleted", BOB)
    [line] = out.splitlines()[1:]
    assert line.endswith(f" 127.0.0.1:{ownPort}"), out
    [record] = [json.loads(line) for line in mailgate_cli.check("mailbox", "deleted", BOB, "--json").splitlines()]
    assert (record["from"], record["master"]) == (f"127.0.0.1:{ownPort}", None)
    # Restored, the message is alice's again, whoever deleted it.
    assert mailgate_cli.check("mailbox", "restore", ALICE, "--since", "1h").endswith(
        f"1 message restored to {ALICE}\n"
    )
    assert mailgate_cli.check("mailbox", "deleted", ALICE).splitlines()[1:] == []

    # A kick of the helpdesk's session says whose it was.
    helpdesk = popLogin(server, f"{ALICE}*admin", MASTER_PASSWORD)
    try:
        waitFor(lambda: any(r["master"] == "admin" for r in _whoRecords(mailgate_cli)), "the session in who")
        assert mailgate_cli.check("kick", ALICE) == (
            f"the POP3 session of {ALICE} (logged in by the master user admin) has ended; nothing it marked "
            "deleted was removed, unless it sent QUIT before its node saw the kick\n"
        )
    finally:
        helpdesk.close()

    # So does disabling the user while the helpdesk is in her maildrop.
    helpdesk = popLogin(server, f"{ALICE}*admin", MASTER_PASSWORD)
    try:
        waitFor(lambda: any(r["master"] == "admin" for r in _whoRecords(mailgate_cli)), "the session in who")
        assert mailgate_cli.check("user", "disable", ALICE).splitlines()[1:] == [
            "its POP3 session (logged in by the master user admin) has ended; nothing it marked deleted was removed"
        ]
    finally:
        helpdesk.close()
    mailgate_cli.check("user", "enable", ALICE)
