"""
A real Dovecot in front of mailgate while users move from one to the
other (README: Moving from Dovecot, behind Dovecot's proxy): Dovecot stays
the address clients and the MTA use, and its passdb sends each moved
user's POP3 logins to mailgate's POP3 through a mailgate master user
(C{proxy=y host=... port=... master=NAME pass=...}: Dovecot checks the
user's own password, then logs in to mailgate by AUTH PLAIN naming the
user as authorisation identity) and the user's mail to mailgate's LMTP
(C{lmtp_proxy = yes}); the passdb differs by service (a passwd-file per
service, C{%s} in its path), as POP3 and LMTP go to different ports.
mailgate needs none of the users' passwords for this.

What each party sees: mail sent to Dovecot's LMTP for the moved user is
in mailgate's maildrop, the other user's in Dovecot's maildir; a POP3
client logging in to Dovecot with the moved user's Dovecot password reads
and deletes mailgate's messages, octet for octet; a wrong password is
refused by Dovecot and never reaches mailgate; mailgate's log names the
master user on the proxied sessions.
"""

import poplib
import re

import pytest

from dovecotserver import PrivateDovecot, requireDovecot
from e2e import DEADLINE, BoundPOP3, sqliteOnly, waitFor
from e2e import mailgate_cli, mailgate_server  # noqa: F401 (fixtures)

pytestmark = requireDovecot

ALICE = "alice@example.org"
#: Dovecot's own user: not moved
CAROL = "carol@example.org"
DOVECOT_PASSWORD = "the password at dovecot"
#: what mailgate has for Alice: no one uses it here (she moved with her
#: password hash, or not yet), the proxy logs in through the master user
MAILGATE_PASSWORD = "never sent"
MASTER = "dovecot-proxy"
#: one word: a passwd-file's extra fields are separated by spaces
MASTER_PASSWORD = "proxys-key-to-mailgate"
MESSAGE = b"From: <sender@example.net>\r\nSubject: moved\r\n\r\n.a dot line\r\nfor alice at mailgate\r\n"


class PerServiceDovecot(PrivateDovecot):
    """
    A L{PrivateDovecot} whose passdb is a passwd-file per service
    (C{passwd.pop3}, C{passwd.lmtp}: C{%s} in the passdb's path), each
    the users' lines with that service's extra fields for some of them.
    """

    def __init__(self, fieldsByService):
        super().__init__(extra="lmtp_proxy = yes\n")
        self.fieldsByService = fieldsByService

    def _writePasswd(self):
        super()._writePasswd()
        base = f"{self.directory}/passwd"
        with open(base) as f:
            lines = f.read().splitlines()
        for service, fields in self.fieldsByService.items():
            with open(f"{base}.{service}", "w") as f:
                for line in lines:
                    user = line.split(":", 1)[0]
                    f.write(line + fields.get(user, "") + "\n")

    def _writeConfig(self):
        super()._writeConfig()
        with open(self.configPath) as f:
            text = f.read()
        passdb = re.compile(r"(passdb \{\s*driver = passwd-file\s*args = username_format=%Lu \S+/passwd)\n")
        assert passdb.search(text), "benchmarks/dovecot.py changed its passdb"
        with open(self.configPath, "w") as f:
            f.write(passdb.sub(r"\1.%s\n", text, count=1))


@pytest.fixture
def dovecotInFront(mailgate_server, mailgate_cli):
    # Dovecot connects from 127.0.0.1: its XCLIENT is taken from there.
    # Loopback exempts no one here, so that a client's ban is in force.
    server = mailgate_server(
        "--master-users", "--lmtp", "tcp:0:interface=127.0.0.1", "--domain", "example.org",
        "--xclient-network", "127.0.0.1/32", "--exempt-network", "none",
    )
    mailgate_cli.addUser(ALICE, MAILGATE_PASSWORD)
    mailgate_cli.check("master", "add", MASTER, "--password-stdin", input=MASTER_PASSWORD + "\n")
    dovecot = PerServiceDovecot({
        "pop3": {ALICE: f"proxy=y host=127.0.0.1 port={server.port} master={MASTER} pass={MASTER_PASSWORD}"},
        "lmtp": {ALICE: f"proxy=y host=127.0.0.1 port={server.portOf('LMTP')}"},
    })
    dovecot.addUsers([ALICE, CAROL], DOVECOT_PASSWORD)
    try:
        dovecot.start()
        yield server, dovecot
    finally:
        dovecot.cleanup()


def _messages(client):
    count = client.stat()[0]
    return [b"".join(line + b"\r\n" for line in client.retr(n)[1]) for n in range(1, count + 1)]


@sqliteOnly
def test_aMovedUserReadsMailgatesMaildropThroughDovecot(dovecotInFront, mailgate_cli):
    server, dovecot = dovecotInFront
    dovecot.deliver(ALICE, MESSAGE)
    dovecot.deliver(CAROL, b"Subject: stays\r\n\r\nfor carol at dovecot\r\n")
    # Alice's mail went on to mailgate, Carol's stayed.
    [(_, _, uid)] = mailgate_cli.mailbox(ALICE)

    client = dovecot.pop3(ALICE, DOVECOT_PASSWORD)
    try:
        [stored] = _messages(client)
        # Below the trace fields Dovecot's LMTP and mailgate added.
        assert stored.endswith(b"\r\n\r\n.a dot line\r\nfor alice at mailgate\r\n")
        assert b"Subject: moved\r\n" in stored
        assert client.uidl(1).split()[-1].decode() == uid
        client.dele(1)
    finally:
        client.quit()
    assert mailgate_cli.mailbox(ALICE) == []

    client = dovecot.pop3(CAROL, DOVECOT_PASSWORD)
    try:
        [stored] = _messages(client)
        assert stored.endswith(b"for carol at dovecot\r\n")
    finally:
        client.quit()

    waitFor(
        lambda: re.search(rf"pop3 logout user={re.escape(ALICE)} master={MASTER} peer=\S+ reason='quit'", server.stdout),
        "mailgate's logout line of the proxied session",
    )
    assert re.search(rf"pop3 login user={re.escape(ALICE)} master={MASTER} peer=\S+ mechanism=plain", server.stdout)
    assert MASTER_PASSWORD not in server.stdout + server.stderr


@sqliteOnly
def test_aWrongPasswordStopsAtDovecot(dovecotInFront):
    server, dovecot = dovecotInFront
    client = poplib.POP3("127.0.0.1", dovecot.pop3Port, timeout=DEADLINE)
    try:
        client.user(ALICE)
        with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\]"):
            client.pass_(MAILGATE_PASSWORD)
    finally:
        client.quit()
    # The right one goes through; the wrong one never reached mailgate.
    dovecot.pop3(ALICE, DOVECOT_PASSWORD).quit()
    waitFor(lambda: f"pop3 logout user={ALICE} master={MASTER}" in server.stdout, "the proxied session's end")
    assert "auth.failed" not in server.stdout and "authentication failed" not in server.stdout


def _fromThrough(dovecot, source, password=DOVECOT_PASSWORD):
    """
    A POP3 login to Dovecot as Alice from the loopback address C{source}:
    Dovecot's answer to PASS.
    """
    client = BoundPOP3(dovecot.pop3Port, source)
    try:
        client.user(ALICE)
        try:
            return client.pass_(password).decode()
        except poplib.error_proto as e:
            return e.args[0].decode()
    finally:
        client.close()


@sqliteOnly
def test_mailgateSeesTheClientDovecotRelays(dovecotInFront, mailgate_cli):
    """
    mailgate's greeting to Dovecot says [XCLIENT] (--xclient-network), so
    Dovecot names the client it relays: mailgate's log, its bans and
    Alice's allowed networks see the client's address, not Dovecot's.
    """
    server, dovecot = dovecotInFront
    assert _fromThrough(dovecot, "127.0.0.2").startswith("+OK")
    waitFor(lambda: re.search(r"pop3 xclient peer=127\.0\.0\.2:\d+ proxy=127\.0\.0\.1:\d+", server.stdout),
            "mailgate's xclient line")
    waitFor(lambda: re.search(rf"pop3 logout user={re.escape(ALICE)} master={MASTER} peer=127\.0\.0\.2:", server.stdout),
            "the logout line with the client's address")

    # Alice may log in from 127.0.0.2 only: from 127.0.0.4 her right
    # password (checked by Dovecot) is refused by mailgate.
    mailgate_cli.check("user", "networks", ALICE, "127.0.0.2/32")
    assert _fromThrough(dovecot, "127.0.0.2").startswith("+OK")
    assert _fromThrough(dovecot, "127.0.0.4").startswith("-ERR")
    waitFor(lambda: re.search(r"peer=127\.0\.0\.4:\d+: the client's address is not on the user's allowed networks",
                              server.stdout), "the refusal of 127.0.0.4 in mailgate's log")

    # A client banned at mailgate is refused through Dovecot; the others
    # (and Dovecot itself) are not.
    mailgate_cli.check("user", "networks", ALICE, "any")
    mailgate_cli.check("ban", "add", "127.0.0.3")
    waitFor(lambda: _fromThrough(dovecot, "127.0.0.3").startswith("-ERR"), "the ban to be in force")
    assert _fromThrough(dovecot, "127.0.0.2").startswith("+OK")
