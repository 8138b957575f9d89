"""
The lifecycle features on real servers (C{twistd mailgate}, both
backends), driven by real clients and the C{mailgate} command (L{e2e.AdminCommand}):
quotas refused at RCPT over SMTP, EXPIRE in CAPA, kept deleted mail
brought back, C{who} and C{kick} (across two nodes on PostgreSQL), and a
rename a running server honours at once despite its password cache.
What the store does is tested on both backends in test_lifecycle.py; the
servers here run on both only where nodes differ (who and kick).

Every wait is bounded.
"""

import poplib
import smtplib
import socket

import pytest

from e2e import DEADLINE, mailgate_cli, mailgate_server, sqliteOnly, waitFor  # noqa: F401 (fixtures)
from mailgate.testing import addUser, deliver, memoryStore

ALICE = "alice@example.org"
PASSWORD = "wonder land"


def prepare(database, count=2):
    store = memoryStore(database)
    try:
        addUser(store, ALICE, PASSWORD)
        return [deliver(store, [ALICE], b"Subject: %d\r\n\r\nhello %d\r\n" % (n, n))[ALICE] for n in range(count)]
    finally:
        store.close()


def who(database):
    """
    C{mailgate who}'s rows, run in this process (it is polled).
    """
    import io

    from mailgate.cli import run

    out = io.StringIO()
    assert run(["--database", database, "who"], stdout=out, stderr=io.StringIO(), environ={}) == 0
    return [line.split() for line in out.getvalue().splitlines()[1:]]


def pop(port, address=ALICE, password=PASSWORD, source="127.0.0.1"):
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE, source_address=(source, 0))
    client = poplib.POP3.__new__(poplib.POP3)
    client.host, client.port, client._tls_established = "127.0.0.1", port, False
    client.sock = sock
    client.file = sock.makefile("rb")
    client._debugging = 0
    client.welcome = client._getresp()
    try:
        client.user(address)
        client.pass_(password)
    except Exception:
        # A refused login: hang up, or the session would hold the server's
        # shutdown for its grace period.
        client.close()
        raise
    return client


def uidl(client):
    return [line.split()[1].decode() for line in client.uidl()[1]]


def test_whoAndKick(mailgate_server, mailgate_cli):
    ids = prepare(mailgate_server.database)
    nodes = [mailgate_server("--hostname", "node-a.test")]
    if mailgate_server.backend == "postgres":
        nodes.append(mailgate_server("--hostname", "node-b.test"))
    serving = nodes[-1]
    client = pop(serving.port, source="127.0.0.2")
    assert client.dele(1).startswith(b"+OK")
    clientPort = client.sock.getsockname()[1]

    rows = waitFor(lambda: who(mailgate_cli.database), "the session in mailgate who")
    assert len(rows) == 1
    user, node, peer = rows[0][:3]
    assert user == ALICE
    assert node.startswith(("node-b.test[" if len(nodes) == 2 else "node-a.test[")) and node.endswith("]")
    assert peer == f"127.0.0.2:{clientPort}"

    out = mailgate_cli.check("kick", ALICE)
    assert out == (
        f"the POP3 session of {ALICE} has ended; nothing it marked deleted was removed, "
        "unless it sent QUIT before its node saw the kick\n"
    )
    with pytest.raises((poplib.error_proto, OSError, EOFError)):
        client.stat()
        client.stat()
    client.close()
    assert mailgate_cli.check("who").splitlines()[1:] == []
    # The lock is free (on every node) and nothing was deleted.
    for node in nodes:
        again = pop(node.port)
        assert uidl(again) == ids
        again.quit()


# The store's side of both is tested on both backends (test_lifecycle.py,
# the PostgreSQL login path included); the running server once is enough.
@sqliteOnly
def test_renameOnARunningServer(mailgate_server, mailgate_cli):
    ids = prepare(mailgate_server.database)
    # The refusal after the rename without the default second's delay.
    server = mailgate_server("--auth-failure-delay", "0.1")
    # The server now remembers Alice's password.
    client = pop(server.port)
    client.quit()
    # Refused while she is in a session.
    client = pop(server.port)
    waitFor(lambda: who(mailgate_cli.database), "the session in mailgate who")
    code, out, err = mailgate_cli("user", "rename", ALICE, "alice.smith@example.org")
    assert code == 75, (out, err)
    client.quit()
    waitFor(lambda: not who(mailgate_cli.database), "the session to leave mailgate who")
    mailgate_cli.check("user", "rename", ALICE, "alice.smith@example.org")

    with pytest.raises(poplib.error_proto) as refused:
        pop(server.port)
    assert refused.value.args[0].startswith(b"-ERR [AUTH]")
    client = pop(server.port, "alice.smith@example.org")
    assert uidl(client) == ids
    client.quit()


@sqliteOnly
def test_quotaAtRcptAndExpireInCapa(mailgate_server, mailgate_cli):
    prepare(mailgate_server.database, count=1)
    mailgate_cli.check("user", "quota", ALICE, "1K")
    mailgate_cli.check("user", "expire", ALICE, "7")
    server = mailgate_server(
        "--smtp", "tcp:0:interface=127.0.0.1", "--expire-days", "30", "--keep-deleted-days", "2",
    )
    smtp = smtplib.SMTP("127.0.0.1", server.portOf("SMTP"), timeout=DEADLINE)
    try:
        smtp.ehlo("client.test")
        smtp.mail("sender@example.net", ["SIZE=5000"])
        code, reply = smtp.rcpt(ALICE)
        # Larger than her whole quota: refused for good, not retried.
        assert (code, reply) == (
            552, f"5.2.3 <{ALICE}>: message larger than the mailbox's whole quota (1024 octets)".encode()
        )
        smtp.rset()
        assert smtp.sendmail("sender@example.net", [ALICE], b"Subject: fits\r\n\r\nsmall\r\n") == {}
    finally:
        smtp.quit()

    def capa(client):
        return [k + (" " + " ".join(v) if v else "") for k, v in client.capa().items() if k == "EXPIRE"]

    anonymous = poplib.POP3("127.0.0.1", server.port, timeout=DEADLINE)
    # The refresh of per-user values runs at start-up.  Before login, the
    # shortest retention any user has: what holds for whoever logs in.
    assert waitFor(lambda: capa(anonymous) == ["EXPIRE 7 USER"] or None, "EXPIRE 7 USER")
    anonymous.quit()
    client = pop(server.port)
    assert capa(client) == ["EXPIRE 7"]
    ids = uidl(client)
    assert len(ids) == 2
    client.dele(1)
    client.quit()

    out = mailgate_cli.check("mailbox", "deleted", ALICE)
    assert out.splitlines()[1].split()[2] == ids[0]
    assert mailgate_cli.check("mailbox", "restore", ALICE, ids[0]) == f"restored {ids[0]}\n1 message restored to {ALICE}\n"
    client = pop(server.port)
    # Back under its id, after the other message (as new mail comes).
    assert uidl(client) == ids[1:] + ids[:1]
    client.quit()
