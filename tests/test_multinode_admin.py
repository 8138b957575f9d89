"""
The C{mailgate} command beside several nodes on one PostgreSQL database,
as an administrator scaling out runs it: real C{twistd mailgate}
processes, real clients, the real command.

What an administrator must be able to count on: a command that needs a
maildrop no session holds (C{user rename}, C{user del}, C{mailbox
expunge}) is refused while a session on any node holds it, and works as
soon as no session does, a node killed outright included (its locks go
with its process; its rows in the session registry stay until its
heartbeat is old).
"""

import poplib

import pytest

from e2e import (  # noqa: F401 (mailgate_server, mailgate_cli are fixtures)
    DEADLINE,
    mailgate_cli,
    mailgate_server,
    popLogin as login,
    postgresOnly,
    waitFor,
)
from mailgate.store.postgres import LOCK_RELEASE_BOUND

pytestmark = postgresOnly

ALICE = "alice@example.org"
ALICE_PW = "wonder land"
MESSAGE = b"From: sender@example.net\r\nSubject: kept\r\n\r\nhello\r\n"


def node(mailgate_server, name):
    return mailgate_server("--hostname", f"{name}.test")


def _loggedOut(server):
    """
    Whether alice logged in through C{server} (and out again); C{False}
    while her maildrop is locked.
    """
    try:
        client = login(server, ALICE, ALICE_PW)
    except poplib.error_proto as e:
        if e.args[0].startswith(b"-ERR [IN-USE]"):
            return False
        raise
    return client.quit().startswith(b"+OK")


@pytest.mark.parametrize(
    "argv, done",
    [
        (("user", "rename", ALICE, "alice2@example.org"), "renamed"),
        (("user", "del", ALICE), "deleted"),
        (("mailbox", "expunge", "--all", ALICE), "removed 1 message"),
    ],
)
def test_aKilledNodesSessionHoldsNoCommandBack(mailgate_server, mailgate_cli, argv, done):
    """
    Node A is killed (SIGKILL) in the middle of alice's session, which
    C{mailgate who} lists.  Its maildrop lock went with its process (node
    B lets alice in at once), and the command that needs the maildrop works
    at once too.  Before, it was refused (exit 75, "alice@example.org is
    in a POP3 session; try again once it ended") for as long as
    C{mailgate who} showed the dead node's session, about 30 seconds,
    while alice could log in on node B.
    """
    mailgate_cli.addUser(ALICE, ALICE_PW)
    mailgate_cli.deliver(ALICE, MESSAGE)
    a = node(mailgate_server, "node-a")
    b = node(mailgate_server, "node-b")

    client = login(a, ALICE, ALICE_PW)
    assert client.stat()[0] == 1
    waitFor(lambda: "node-a.test" in mailgate_cli.check("who"), "node A to register alice's session")
    code, _, err = mailgate_cli(*argv)
    assert code == 75 and "is in a POP3 session" in err, (code, err)

    a.process.kill()
    a.process.wait(DEADLINE)
    client.close()
    waitFor(lambda: _loggedOut(b), "node B to let alice in", timeout=LOCK_RELEASE_BOUND)
    assert "node-a.test" not in mailgate_cli.check("who")  # its row, gone with its lock

    code, out, err = mailgate_cli(*argv)
    assert (code, err) == (0, ""), (code, out, err)
    assert done in out
    assert b.running(), b.log()


def test_aKilledNodesSessionIsNeitherListedNorWaitedFor(mailgate_server, mailgate_cli):
    """
    Node A is killed (SIGKILL) in the middle of alice's session.  Its
    maildrop lock went with its process (node B lets alice in at once):
    C{mailgate who} no longer lists the session, and C{mailgate kick} says
    at once that there is none, its node gone.  Before, C{who} listed it
    and C{kick} waited for it to end for as long as the dead node's
    heartbeat was younger than 30 seconds (exit 75 after --wait 5).
    """
    mailgate_cli.addUser(ALICE, ALICE_PW)
    a = node(mailgate_server, "node-a")
    b = node(mailgate_server, "node-b")

    client = login(a, ALICE, ALICE_PW)
    waitFor(lambda: "node-a.test" in mailgate_cli.check("who"), "node A to register alice's session")

    a.process.kill()
    a.process.wait(DEADLINE)
    client.close()
    waitFor(lambda: _loggedOut(b), "node B to let alice in", timeout=LOCK_RELEASE_BOUND)

    code, out, err = mailgate_cli("kick", "--wait", "5", ALICE)
    assert (code, out) == (1, ""), (code, out, err)
    assert err == f"mailgate: {ALICE} has no POP3 session: its node has gone\n", err
    assert ALICE not in mailgate_cli.check("who")
    assert b.running(), b.log()
