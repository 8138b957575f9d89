"""
Releasing an address slowed but not banned, end to end: a real C{twistd
mailgate} with C{--exempt-network none}, smtplib and raw POP3 clients
bound to 127.0.0.2, the real C{mailgate ban del}.

What a user sees: an address with failed logins and SMTP recipients
refused as unknown, below any ban, has its POP3 logins and SMTP error
replies held; C{ban del} says there is no ban and what it forgot, exit 0,
and the address is served at once again.  A held reply is one not come
within a second; a served one comes within a second (retried, within
L{DEADLINE}, while the server's next refresh is due).  Every wait is
bounded.
"""

import socket
import smtplib

from e2e import (  # noqa: F401 (mailgate_server, mailgate_cli are fixtures)
    DEADLINE,
    LineReader,
    mailgate_cli,
    mailgate_server,
    sqliteOnly,
    waitFor,
)
from test_e2e_policy import failLogin

ALICE = "alice@example.org"
PASSWORD = "wonder land"
SLOWED = "127.0.0.2"


def answeredWithinASecond(sock):
    """
    Whether a reply comes on C{sock} within a second (it is left unread).
    """
    sock.settimeout(1.0)
    try:
        return bool(sock.recv(1, socket.MSG_PEEK))
    except socket.timeout:
        return False
    finally:
        sock.settimeout(DEADLINE)


def smtpErrorAnswered(server):
    """
    Whether a new SMTP session's first error reply, from L{SLOWED}, comes
    within a second (it is read either way).
    """
    client = smtplib.SMTP(timeout=DEADLINE, source_address=(SLOWED, 0))
    try:
        assert client.connect("127.0.0.1", server.portOf("SMTP"))[0] == 220
        assert client.ehlo("client.test")[0] == 250
        client.send("FOO\r\n")
        served = answeredWithinASecond(client.sock)
        assert client.getreply()[0] == 500
        return served
    finally:
        client.close()


def popLoginAnswered(server, password):
    """
    Whether a POP3 PASS from L{SLOWED} is answered within a second; the
    answer is read either way, and returned with it.
    """
    sock = socket.create_connection(("127.0.0.1", server.port), DEADLINE, source_address=(SLOWED, 0))
    reader = LineReader(sock)
    try:
        assert reader.line().startswith(b"+OK")
        sock.sendall(f"USER {ALICE}\r\n".encode())
        assert reader.line().startswith(b"+OK")
        sock.sendall(f"PASS {password}\r\n".encode())
        served = answeredWithinASecond(sock)
        return served, reader.line()
    finally:
        sock.close()


@sqliteOnly
def test_anAddressSlowedButNotBannedIsReleasedByBanDel(mailgate_server, mailgate_cli):
    server = mailgate_server(
        "--smtp", "tcp:0:interface=127.0.0.1", "--exempt-network", "none",
        "--unknown-recipient-slow-after", "2", "--auth-failure-delay", "0", "--ban-after", "10",
    )
    mailgate_cli.addUser(ALICE, PASSWORD)
    for _ in range(2):
        failLogin(server, SLOWED)
    guesser = smtplib.SMTP(timeout=DEADLINE, source_address=(SLOWED, 0))
    assert guesser.connect("127.0.0.1", server.portOf("SMTP"))[0] == 220
    assert guesser.ehlo("client.test")[0] == 250
    assert guesser.mail("someone@remote.test")[0] == 250
    assert guesser.rcpt("nobody1@example.org")[0] == 550
    assert guesser.rcpt("nobody2@example.org")[0] == 550
    guesser.quit()
    # Slowed, not banned: a new session's first error waits (2 s), and a
    # login (a wrong password: a right one would clear the penalty) 4 s.
    waitFor(lambda: "127.0.0.2 had 2 unknown recipients refused" in server.stdout, "the slowing logged")
    assert not smtpErrorAnswered(server)
    served, answer = popLoginAnswered(server, "not the password")
    assert (served, answer.startswith(b"-ERR")) == (False, True)
    assert "127.0.0.2" not in mailgate_cli.check("ban", "list")
    # Released: ban del says what it forgot, and both are served at once.
    code, out, err = mailgate_cli("ban", "del", SLOWED)
    assert (code, out, err) == (
        0, "no ban for 127.0.0.2; its 3 failed logins and 2 unknown recipients are forgotten\n", "",
    )
    waitFor(lambda: smtpErrorAnswered(server), "an SMTP error answered at once")
    served, answer = popLoginAnswered(server, PASSWORD)
    assert (served, answer.startswith(b"+OK")) == (True, True)
    # Nothing left to forget: no ban, exit 1, as before.
    code, out, err = mailgate_cli("ban", "del", SLOWED)
    assert (code, out) == (1, "")
    assert "no ban for 127.0.0.2" in err
