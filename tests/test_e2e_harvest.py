"""
Address harvesting over SMTP end to end: a real C{twistd mailgate},
smtplib clients bound to different loopback addresses (127.0.0.2,
127.0.0.3: all of 127.0.0.0/8 is loopback).

What a user sees: a client guessing recipients is answered at once until
the soft error limit, then its error replies wait (while every other
client is served), and a server stopping answers the one waiting at once.
An address that has had many recipients refused as unknown waits from
its next session's first error, and, when asked for, is banned (C{mailgate
ban list} says why; C{ban del} lifts it).
Every wait is bounded (L{DEADLINE}); no time is asserted, only that a
reply held for a minute has not come within a second.
"""

import smtplib
import socket

import pytest

from e2e import (  # noqa: F401 (mailgate_server, mailgate_cli are fixtures)
    DEADLINE,
    mailgate_cli,
    mailgate_server,
    sqliteOnly,
    waitFor,
)

ALICE = "alice@example.org"
PASSWORD = "wonder land"
GUESSER = "127.0.0.2"
SENDER = "127.0.0.3"


def smtpClient(server, source):
    client = smtplib.SMTP(timeout=DEADLINE, source_address=(source, 0))
    code, _ = client.connect("127.0.0.1", server.portOf("SMTP"))
    assert code == 220
    assert client.ehlo("client.test")[0] == 250
    return client


@sqliteOnly
def test_aGuessersErrorRepliesWaitWhileOthersAreServed(mailgate_server, mailgate_cli):
    server = mailgate_server(
        "--smtp", "tcp:0:interface=127.0.0.1",
        "--smtp-soft-error-limit", "2", "--smtp-error-sleep-time", "60",
    )
    mailgate_cli.addUser(ALICE, PASSWORD)
    guesser = smtpClient(server, GUESSER)
    assert guesser.mail("someone@remote.test")[0] == 250
    assert guesser.rcpt("nobody1@example.org")[0] == 550
    assert guesser.rcpt("nobody2@example.org")[0] == 550
    # Two errors allowed (Postfix's smtpd_soft_error_limit): the third
    # waits its minute, nothing has come a second later.
    guesser.send("RCPT TO:<nobody3@example.org>\r\n")
    guesser.sock.settimeout(1.0)
    with pytest.raises(socket.timeout):
        guesser.sock.recv(1, socket.MSG_PEEK)
    guesser.sock.settimeout(DEADLINE)
    # Meanwhile another client delivers, its recipient answered at once.
    sender = smtpClient(server, SENDER)
    assert sender.sendmail("someone@remote.test", [ALICE], b"Subject: hi\r\n\r\nhello\r\n") == {}
    sender.quit()
    # The server stops: the held reply is sent at once, then 421.
    server.terminate()
    assert guesser.getreply()[0] == 550
    code, text = guesser.getreply()
    assert (code, b"shutting down" in text) == (421, True)
    guesser.close()


def refused(server, source):
    """
    The code of an SMTP connection's refusal from C{source}; C{None} if it
    was greeted.
    """
    client = smtplib.SMTP(timeout=DEADLINE, source_address=(source, 0))
    code, _ = client.connect("127.0.0.1", server.portOf("SMTP"))
    client.close()
    return None if code == 220 else code


def nothingWithinASecond(client):
    client.sock.settimeout(1.0)
    try:
        with pytest.raises(socket.timeout):
            client.sock.recv(1, socket.MSG_PEEK)
    finally:
        client.sock.settimeout(DEADLINE)


@sqliteOnly
def test_aHarvesterIsSlowedAcrossSessionsThenBannedWhenAskedFor(mailgate_server, mailgate_cli):
    server = mailgate_server(
        "--smtp", "tcp:0:interface=127.0.0.1", "--exempt-network", "none",
        "--unknown-recipient-slow-after", "2", "--unknown-recipient-ban-after", "3",
    )
    mailgate_cli.addUser(ALICE, PASSWORD)
    first = smtpClient(server, GUESSER)
    assert first.mail("someone@remote.test")[0] == 250
    assert first.rcpt("nobody1@example.org")[0] == 550
    assert first.rcpt("nobody2@example.org")[0] == 550
    first.quit()
    # A new session's first error waits (2 s): nothing a second later.
    second = smtpClient(server, GUESSER)
    second.send("FOO\r\n")
    nothingWithinASecond(second)
    assert second.getreply()[0] == 500
    waitFor(lambda: "127.0.0.2 had 2 unknown recipients refused within 600 s" in server.stdout, "the slowing logged")
    # The third unknown recipient bans the address, on every node.
    assert second.mail("someone@remote.test")[0] == 250
    second.send("RCPT TO:<nobody3@example.org>\r\n")
    second.close()
    waitFor(lambda: refused(server, GUESSER) == 421, "the harvester refused")
    waitFor(lambda: "unknown-rcpt" in mailgate_cli.check("ban", "list"), "the ban in the database")
    waitFor(lambda: "(unknown-rcpt, 3 unknown recipients)" in server.stdout, "the ban logged")
    # Another address delivers as before.
    sender = smtpClient(server, SENDER)
    assert sender.sendmail("someone@remote.test", [ALICE], b"Subject: hi\r\n\r\nhello\r\n") == {}
    sender.quit()
    # Lifted: a fresh start, the next unknown recipient answered at once.
    mailgate_cli.check("ban", "del", GUESSER)
    waitFor(lambda: refused(server, GUESSER) is None, "the harvester admitted again")
    again = smtpClient(server, GUESSER)
    assert again.mail("someone@remote.test")[0] == 250
    assert again.rcpt("nobody4@example.org")[0] == 550
    again.quit()
