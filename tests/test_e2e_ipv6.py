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
is asserted.
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
