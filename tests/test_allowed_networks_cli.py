"""
C{mailgate user networks} (Dovecot's C{allow_nets}): the command (output,
exit statuses, C{user list}, the audit trail), C{user import} of a
passwd-file's C{allow_nets} (with a real Dovecot too), C{db copy}
carrying it, and a real C{twistd mailgate} with poplib from 127.0.0.2
(allowed) and 127.0.0.3 (refused).

A real Dovecot 2.3.19 answers the right password from an address not on
C{allow_nets} with C{-ERR [AUTH] Authentication failed.}, what a wrong
password gets (see tests/test_allowed_networks.py); mailgate answers
with its own invalid-login reply, the same for both.
"""

import json
import os
import poplib

import pytest
from twisted.internet.address import IPv4Address

from dovecotserver import PrivateDovecot, requireDovecot
from e2e import mailgate_cli, mailgate_server  # noqa: F401 (fixtures)
from test_cli import CLI, oneLineError
from test_cli_audit import AUTHPRIV_NOTICE, assertLine, setUp, syslog, who  # noqa: F401 (fixture)
from test_lifecycle_e2e import pop
from test_user_disable_cli import cli  # noqa: F401 (fixture)
from test_user_disable_cli import login as loginFrom

ALICE = "alice@example.org"
BOB = "bob@example.org"
PASSWORD = "wonderland-networks"
INVALID = "-ERR [AUTH] invalid user name or password\r\n"
ALLOWED = "127.0.0.2"
REFUSED = "127.0.0.3"


def login(url, address, password, source=ALLOWED):
    """
    A USER/PASS login without sockets from C{source}: what the client is
    told.
    """
    return loginFrom(url, address, password, IPv4Address("TCP", source, 40000))


def test_restrictListAndLift(cli):
    cli.add(ALICE, PASSWORD)
    cli.add(BOB, PASSWORD)
    result = cli("user", "networks", ALICE, f"{ALLOWED}, 2001:db8::/32,::ffff:10.0.0.0/104")
    assert (result.code, result.err) == (0, ""), result
    assert result.out == (
        f"{ALICE} may log in from 127.0.0.2/32,2001:db8::/32,10.0.0.0/8 only: POP3 logins from elsewhere "
        "are refused on every server as a wrong password is\n"
    )
    assert login(cli.url, ALICE, PASSWORD, ALLOWED).startswith("+OK")
    assert login(cli.url, ALICE, PASSWORD, REFUSED) == INVALID
    assert login(cli.url, BOB, PASSWORD, REFUSED).startswith("+OK")
    again = cli("user", "networks", ALICE, "127.0.0.2/32,2001:db8::/32,10.0.0.0/8")
    assert again.out == f"{ALICE} may log in from 127.0.0.2/32,2001:db8::/32,10.0.0.0/8 already; nothing changed\n"

    table = cli("user", "list").out.splitlines()
    assert table[0].split()[-3:] == ["LAST-LOGIN", "NETWORKS", "DISABLED"]
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert rows[ALICE][-2:] == ["127.0.0.2/32,2001:db8::/32,10.0.0.0/8", "no"]
    assert rows[BOB][-2:] == ["any", "no"]
    records = {r["address"]: r for r in map(json.loads, cli("user", "list", "--json").out.splitlines())}
    assert records[ALICE]["allowed_networks"] == ["127.0.0.2/32", "2001:db8::/32", "10.0.0.0/8"]
    assert records[BOB]["allowed_networks"] is None

    result = cli("user", "networks", ALICE, "any")
    assert (result.code, result.out) == (
        0, f"{ALICE} may log in from anywhere again (was 127.0.0.2/32,2001:db8::/32,10.0.0.0/8)\n"
    )
    assert login(cli.url, ALICE, PASSWORD, REFUSED).startswith("+OK")


@pytest.mark.parametrize(
    "argv, code, error",
    [
        (["user", "networks", "nobody@example.org", "10.0.0.0/8"], 67, "no such user: nobody@example.org"),
        (["user", "networks", "bad@@x", "10.0.0.0/8"], 65, None),
        (["user", "networks", ALICE, "10.0.0.0/33"], 64, "not a network or address: '10.0.0.0/33'"),
        (["user", "networks", ALICE, "192.0.2.1,example.org"], 64, "not a network or address: 'example.org'"),
        (["user", "networks", ALICE, "any,10.0.0.0/8"], 64, "not a network or address: 'any'"),
    ],
)
def test_refusalsAreOneLineWithTheUsualExitStatus(cli, argv, code, error):
    cli.add(ALICE, PASSWORD)
    result = cli(*argv)
    assert result.code == code, result
    line = oneLineError(result)
    if error is not None:
        assert error in line, line
    assert login(cli.url, ALICE, PASSWORD, REFUSED).startswith("+OK")


@pytest.mark.parametrize("given", ["", ",", " , "])
def test_noNetworksGivenIsRefusedAndTheRestrictionStays(cli, given):
    """
    NETWORKS given as nothing (a shell variable left unset, C{user
    networks alice "$OFFICE"}) is a usage error: it was read as C{any},
    which lifted Alice's restriction, exit 0.
    """
    cli.add(ALICE, PASSWORD)
    assert cli("user", "networks", ALICE, ALLOWED).code == 0
    result = cli("user", "networks", ALICE, given)
    assert result.code == 64, result
    assert oneLineError(result) == (
        f"mailgate: NETWORKS: none given in {given!r} (give CIDR networks or addresses, local, or any)\n"
    )
    assert login(cli.url, ALICE, PASSWORD, REFUSED) == INVALID
    assert json.loads(cli("user", "list", "--json").out)["allowed_networks"] == ["127.0.0.2/32"]


def test_helpTexts(cli):
    result = cli("user", "networks", "--help")
    assert result.code == 0 and " ADDRESS NETWORKS" in result.out.split("\n\n")[0]
    assert "networks" in cli("user", "--help").out
    assert "allow_nets" in cli("user", "import", "--help").out


def test_theAuditTrailNamesIt(syslog, cheapCommandHashes):
    setUp(syslog, "user", "add", ALICE, "--password-stdin", data=f"{PASSWORD}\n".encode())
    done, lines = syslog.logged("user", "networks", ALICE, "192.0.2.0/24")
    assert done.returncode == 0, done.stderr
    assertLine(
        lines, AUTHPRIV_NOTICE, rf"admin user networks {ALICE} 192\.0\.2\.0/24: 192\.0\.2\.0/24 \(was any\){who()}"
    )
    done, lines = syslog.logged("user", "networks", ALICE, "any")
    assert done.returncode == 0, done.stderr
    assertLine(lines, AUTHPRIV_NOTICE, rf"admin user networks {ALICE} any: any \(was 192\.0\.2\.0/24\){who()}")


# -- user import ------------------------------------------------------------------


def test_importKeepsAllowNets(cli, tmp_path):
    """
    A passwd-file's allow_nets is the user's networks; allow_real_nets
    (a proxy's address) is said not to be kept; an allow_nets that is no
    network refuses the line (Dovecot refuses every login of it).  Before,
    allow_nets was said not to be kept, and the user logged in from
    anywhere.
    """
    passwd = tmp_path / "passwd"
    passwd.write_text(
        f"{ALICE}:{{PLAIN}}{PASSWORD}::::::allow_nets={ALLOWED}/32,local\n"
        f"{BOB}:{{PLAIN}}{PASSWORD}::::::allow_real_nets=10.0.0.0/8\n"
        f"carol@example.org:{{PLAIN}}{PASSWORD}::::::allow_nets=bogus\n"
    )
    result = cli("user", "import", str(passwd))
    assert result.code == 65, result
    assert result.out.splitlines() == [
        f"added {ALICE} (from 127.0.0.2/32,local only, as Dovecot's allow_nets had it)",
        f"added {BOB}",
        "2 added, 0 already there, 1 failed",
    ]
    assert result.err.splitlines()[:2] == [
        f"mailgate: {passwd} line 2: {BOB}: allow_real_nets=10.0.0.0/8 not kept (mailgate checks the client's "
        "address, allow_nets, not a proxy's): it logs in from any address here",
        f"mailgate: {passwd} line 3: carol@example.org: allow_nets: not a network or address: 'bogus'",
    ]
    assert login(cli.url, ALICE, PASSWORD, ALLOWED).startswith("+OK")
    assert login(cli.url, ALICE, PASSWORD, REFUSED) == INVALID
    assert login(cli.url, BOB, PASSWORD, REFUSED).startswith("+OK")


@requireDovecot
def test_aDovecotAllowNetsAccountMovesWithItsNetworks(tmp_path, cheapCommandHashes):
    """
    A real Dovecot lets an allow_nets account in from 127.0.0.2 and not
    from 127.0.0.3; imported, mailgate does the same.
    """
    server = PrivateDovecot(passdbFields={BOB: f"allow_nets={ALLOWED}/32"})
    try:
        server.addUsers([ALICE, BOB], PASSWORD)
        server.start()
        pop(server.pop3Port, BOB, PASSWORD, source=ALLOWED).quit()
        with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\] Authentication failed"):
            pop(server.pop3Port, BOB, PASSWORD, source=REFUSED)
        passwd = os.path.join(server.directory, "passwd")
        cli = CLI(tmp_path / "mail.sqlite3")
        result = cli("user", "import", passwd)
    finally:
        server.cleanup()
    assert (result.code, result.err) == (0, ""), result
    assert f"added {BOB} (from 127.0.0.2/32 only, as Dovecot's allow_nets had it)" in result.out.splitlines()
    assert login(cli.url, BOB, PASSWORD, ALLOWED).startswith("+OK")
    assert login(cli.url, BOB, PASSWORD, REFUSED) == INVALID
    assert login(cli.url, ALICE, PASSWORD, REFUSED).startswith("+OK")


def test_dbCopyCarriesTheNetworks(cli, tmp_path, postgresURL):
    cli.add(ALICE, PASSWORD)
    cli.add(BOB, PASSWORD)
    assert cli("user", "networks", ALICE, f"{ALLOWED},2001:db8::/32").code == 0
    before = cli("user", "list", "--json").out
    assert cli("db", "copy", "--from", cli.url, "--to", postgresURL).code == 0
    assert cli("user", "list", "--json", database=postgresURL).out == before
    assert login(postgresURL, ALICE, PASSWORD, REFUSED) == INVALID
    back = f"sqlite:///{tmp_path / 'back.sqlite3'}"
    assert cli("db", "copy", "--from", postgresURL, "--to", back).code == 0
    assert cli("user", "list", "--json", database=back).out == before
    assert login(back, ALICE, PASSWORD, ALLOWED).startswith("+OK")


# -- end to end: a real server, poplib -------------------------------------------


def test_aRunningServerRefusesTheUserFromElsewhere(mailgate_server, mailgate_cli):
    """
    On a running server (on both engines), poplib from 127.0.0.2 and
    127.0.0.3: restricted while the server runs, the user is let in from
    the one and refused from the other as a wrong password is, also with
    the password the server remembered from an earlier login; lifted,
    let in from both.
    """
    mailgate_cli.addUser(ALICE, PASSWORD)
    mailgate_cli.deliver(ALICE, b"Subject: one\r\n\r\nhello\r\n")
    server = mailgate_server("--auth-failure-delay", "0")
    pop(server.port, ALICE, PASSWORD, source=REFUSED).quit()
    mailgate_cli.check("user", "networks", ALICE, ALLOWED)
    with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\] invalid user name or password"):
        pop(server.port, ALICE, PASSWORD, source=REFUSED)
    with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\] invalid user name or password"):
        pop(server.port, ALICE, "wrong", source=REFUSED)
    client = pop(server.port, ALICE, PASSWORD, source=ALLOWED)
    assert client.stat()[0] == 1
    client.quit()
    mailgate_cli.check("user", "networks", ALICE, "any")
    pop(server.port, ALICE, PASSWORD, source=REFUSED).quit()
