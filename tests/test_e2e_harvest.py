"""
Address harvesting over SMTP end to end: a real C{twistd mailgate},
smtplib clients bound to different loopback addresses (127.0.0.2,
127.0.0.3: all of 127.0.0.0/8 is loopback).

What a user sees: a client guessing recipients is answered at once until
the soft error limit, then its error replies wait (while every other
client is served), and a server stopping answers the one waiting at once.
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
        "--smtp-soft-error-limit", "3", "--smtp-error-sleep-time", "60",
    )
    mailgate_cli.addUser(ALICE, PASSWORD)
    guesser = smtpClient(server, GUESSER)
    assert guesser.mail("someone@remote.test")[0] == 250
    assert guesser.rcpt("nobody1@example.org")[0] == 550
    assert guesser.rcpt("nobody2@example.org")[0] == 550
    # The third error waits its minute: nothing has come a second later.
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
