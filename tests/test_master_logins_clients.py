"""
Master users with real mail clients: mpop (GnuTLS, GNU SASL) and
fetchmail (OpenSSL) logging in as C{alice@example.org*admin} with the
master user's password, and curl with C{--sasl-authzid} (AUTH PLAIN
naming Alice as the authorisation identity, admin as the authentication
identity), over STLS with the certificate verified, against C{twistd
mailgate --master-users --master-user-separator '*'}.  Each fetches
Alice's message octet for octet, and the server's log names the master
user on each login.  The clients and their fixtures are test_clients'.
"""

import re

from test_clients import (  # noqa: F401 (fixtures)
    ALICE,
    Curl,
    Fetchmail,
    Mpop,
    assertStoredExactly,
    certificate,
    mailgate_cli,
    makeClient,
    requiresCurl,
    requiresFetchmail,
    requiresMpop,
    serve,
)
from e2e import mailgate_server, sqliteOnly, waitFor  # noqa: F401 (fixture)

MASTER_PASSWORD = "the helpdesk's key"
MASTERS = ("--master-users", "--master-user-separator", "*")
MESSAGE = b"From: <sender@example.net>\r\nSubject: for alice\r\n\r\n.a line with a dot\r\nend\r\n"


def _served(serve, mailgate_cli):
    server = serve(*MASTERS)
    mailgate_cli.check("master", "add", "admin", "--password-stdin", input=MASTER_PASSWORD + "\n")
    mailgate_cli.deliver(ALICE, MESSAGE)
    return server


def _masterLogins(server, count):
    """
    The mechanism of each of admin's logins to Alice's maildrop the server
    logged, once C{count} are there.
    """
    pattern = rf"pop3 login user={re.escape(ALICE)} master=admin peer=\S+ mechanism=(\S+)"
    return waitFor(
        lambda: (lambda found: found if len(found) >= count else None)(re.findall(pattern, server.stdout)),
        f"{count} master logins in the log",
    )


@sqliteOnly
@requiresMpop
def test_mpopLogsInThroughTheMasterUserWithEachMechanism(serve, mailgate_cli, makeClient):
    server = _served(serve, mailgate_cli)
    mpop = makeClient(Mpop, server)
    for auth in ("user", "plain", "login"):
        # keep, with the unique ids forgotten: each run fetches the message.
        (mpop.directory / "uidls").unlink(missing_ok=True)
        stored = mpop.fetch(transport="stls", auth=auth, user=f"{ALICE}*admin", password=MASTER_PASSWORD)
        assertStoredExactly(stored, [MESSAGE], Mpop.added)
    assert _masterLogins(server, 3) == ["user", "plain", "login"]
    # Alice's own password is not the master user's.
    code, output = mpop.run(transport="stls", auth="user", user=f"{ALICE}*admin")
    assert code == 77, output  # EX_NOPERM: authentication failed


@sqliteOnly
@requiresCurl
def test_curlNamesTheUserAsAuthorisationIdentity(serve, mailgate_cli, makeClient):
    server = _served(serve, mailgate_cli)
    curl = makeClient(Curl, server)
    got = curl.get(user="admin", password=MASTER_PASSWORD, auth="PLAIN", path="/1", options=("--sasl-authzid", ALICE))
    assert got == MESSAGE
    assert _masterLogins(server, 1) == ["plain"]


@sqliteOnly
@requiresFetchmail
def test_fetchmailLogsInThroughTheMasterUser(serve, mailgate_cli, makeClient):
    server = _served(serve, mailgate_cli)
    fetchmail = makeClient(Fetchmail, server)
    stored = fetchmail.fetch(transport="stls", auth="password", user=f"{ALICE}*admin", password=MASTER_PASSWORD)
    assertStoredExactly(stored, [MESSAGE], Fetchmail.added)
    assert _masterLogins(server, 1) == ["user"]
