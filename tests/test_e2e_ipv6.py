"""
mailgate on IPv6, end to end, as an administrator deploys it on a
dual-stack host: a real C{twistd mailgate} listening on C{::1}
(C{tcp6:0:interface=\\:\\:1}), real clients (smtplib, poplib) over IPv6,
the real C{mailgate} command, and what the administrator reads of them:
the listening lines, the peers of the log lines, the Received field,
C{mailgate who}, a ban of the client's /64 and its lifting by the
client's address.

Every other end-to-end test runs over 127.0.0.1; the policy's IPv6 rules
(a client is its /64, exempt networks matched against the address) are
tested without sockets in test_policy.py.  Every wait is bounded; no time
is asserted.  C{mailgate who} with a long IPv6 client is tested on a
registry written here, without a server.
"""

import poplib
import re
import smtplib
import socket

import pytest

from e2e import mailgate_cli, mailgate_server, sqliteOnly, waitFor  # noqa: F401 (fixtures)

ALICE = "alice@example.org"
PASSWORD = "wonder land"
ON_IPV6_LOOPBACK = r"tcp6:0:interface=\:\:1"


def _hasIPv6Loopback():
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not _hasIPv6Loopback(), reason="no IPv6 loopback (::1) here")


def listeningPort(server, protocol):
    match = re.search(rf"\b{protocol} listening on \[::1\]:(\d+) \(", server.stdout)
    assert match, server.log()
    return int(match.group(1))


@sqliteOnly
def test_aServerOnIPv6Loopback(mailgate_server, mailgate_cli):
    mailgate_cli.addUser(ALICE, PASSWORD)
    server = mailgate_server(
        "--pop3", ON_IPV6_LOOPBACK, "--smtp", ON_IPV6_LOOPBACK, "--domain", "example.org",
        "--exempt-network", "none", "--ban-after", "2", "--auth-failure-delay", "0", "--auth-penalty-max", "0",
    )
    popPort, smtpPort = listeningPort(server, "POP3"), listeningPort(server, "SMTP")

    with smtplib.SMTP("::1", smtpPort, local_hostname="client.test", timeout=20) as smtp:
        smtp.sendmail("bob@example.net", [ALICE], b"Subject: over IPv6\r\n\r\nhello\r\n")
    client = poplib.POP3("::1", popPort, timeout=20)
    client.user(ALICE)
    client.pass_(PASSWORD)
    message = b"\r\n".join(client.retr(1)[1])
    assert b"Received: from client.test ([IPv6:::1])" in message
    # The session registry has it within a second or two of the login.
    who = waitFor(lambda: [l for l in mailgate_cli.check("who").splitlines() if l.startswith(ALICE)], "who")
    assert re.search(r" \[::1\]:\d+ ", who[0]), who
    client.quit()
    assert re.search(r"smtp delivered .* peer=\[::1\]:\d+", server.stdout), server.log()
    assert re.search(r"pop3 login user=alice@example.org peer=\[::1\]:\d+", server.stdout), server.log()

    # Two failed logins from ::1 ban its /64 (no exempt network here).
    for wrong in ("wrong one", "wrong two"):
        guesser = poplib.POP3("::1", popPort, timeout=20)
        guesser.user(ALICE)
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
            guesser.pass_(wrong)
        guesser.close()
    listed = waitFor(lambda: "::/64" in mailgate_cli.check("ban", "list"), "the ban of ::/64")
    assert listed

    def refused():
        try:
            poplib.POP3("::1", popPort, timeout=20).quit()
        except poplib.error_proto as e:
            return "banned" in str(e)
        return False

    waitFor(refused, "the ban enforced")
    # Lifted by the address, as written with its zone: the /64 is.
    assert mailgate_cli.check("ban", "del", "::1%lo").startswith("lifted the ban of ::/64")
    waitFor(lambda: not refused(), "the ban lifted")


def test_whoKeepsItsColumnsForALongIPv6Client(tmp_path):
    """
    C{mailgate who}'s CLIENT column is as wide as its longest client: an
    IPv6 one (up to 47 characters, C{[2001:db8:...]:65535}) pushed SINCE
    out of line, past the 24 an IPv4 one fits in.
    """
    import sqlite3
    import time

    from e2e import mailgateHere

    url = f"sqlite:///{tmp_path / 'mail.sqlite3'}"
    peers = {"bob@example.org": "192.0.2.1:1234", "carol@example.org": "[2001:db8:1234:5678:9abc:def0:1234:5678]:65535"}
    for address in peers:
        assert mailgateHere(url, "user", "add", address, "--password-stdin", stdin="pw\n")[0] == 0
    now = int(time.time())
    database = sqlite3.connect(tmp_path / "mail.sqlite3")
    with database:
        database.execute(
            "INSERT INTO mailgate_nodes (node_id, name, started_at, seen_at) "
            "VALUES ('n1', 'mail.example.org[1]', ?, ?)",
            (now - 60, now),
        )
        for address, peer in peers.items():
            database.execute(
                "INSERT INTO pop3_sessions (user_id, session_id, node_id, peer, since) "
                "SELECT user_id, ?, 'n1', ?, ? FROM users WHERE address = ?",
                (address, peer, now - 5, address),
            )
    database.close()
    code, out, err = mailgateHere(url, "who")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 3, out
    # SINCE begins where each row's time does.
    columns = [lines[0].index("SINCE")] + [len(line) - len("2026-12-06T16:53:41Z") for line in lines[1:]]
    assert len(set(columns)) == 1, out
