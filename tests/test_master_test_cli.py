"""
C{mailgate master test NAME [--password-stdin] [--from ADDRESS] [--user
ADDRESS]}: a master user's password checked as a master login checks it
(as C{user test} checks a user's, and Dovecot's C{doveadm auth test}),
with what else refuses its login (its networks, and with C{--user} the
user's own state), through the command (L{e2e.AdminCommand}) on a SQLite file and on
PostgreSQL.  Nothing is changed.
"""

import pytest

from e2e import AdminCommand
from mailgate.store import openSynchronousStore
from mailgate.testing import resultOf
from test_master_users_cli import sha512Crypt

pytestmark = pytest.mark.usefixtures("cheapCommandHashes")

PASSWORD = "Master-key-4-helpdesk"
ALICE = "alice@example.org"
RIGHT = "the password of the master user admin is correct (kept as mailgate's own hash)\n"
HELD = (
    "the master user admin may log in from 192.0.2.0/24 only (mailgate master networks): a login from elsewhere "
    "is refused as a wrong password is\n"
)


def _masterHash(url, name):
    store = openSynchronousStore(url)
    try:
        return resultOf(store.findMasterUser(name)).passwordHash
    finally:
        store.close()


@pytest.fixture
def cli(databaseURL, tmp_path):
    cli = AdminCommand(databaseURL, cwd=tmp_path)
    cli.check("master", "add", "admin", "--password-stdin", input=f"{PASSWORD}\n")
    return cli


def _test(cli, *options, password=PASSWORD, name="admin"):
    code, out, err = cli("master", "test", name, "--password-stdin", *options, input=f"{password}\n")
    # Whatever refused it is one line, never a traceback.
    assert err == "" or (err.startswith("mailgate: ") and err.count("\n") == 1), err
    return code, out, err


def test_thePassword(cli, databaseURL):
    stored = _masterHash(databaseURL, "admin")
    assert _test(cli) == (0, RIGHT, "")
    assert _test(cli, name="ADMIN") == (0, RIGHT, "")
    assert _test(cli, password="Master-key-4-helpdesK") == (
        77, "", "mailgate: that is not the password of the master user admin\n"
    )
    # A user is no master user, even with the same password.
    cli.addUser(ALICE, PASSWORD)
    assert _test(cli, name=ALICE) == (67, "", f"mailgate: no such master user: {ALICE}\n")
    # Unknown: 67 as master del says it, before any password is read.
    assert cli("master", "test", "nobody", "--password-stdin") == (67, "", "mailgate: no such master user: nobody\n")
    assert _masterHash(databaseURL, "admin") == stored


def test_aHashFromAnotherServerIsCheckedAndKept(cli, databaseURL):
    imported = sha512Crypt("Dovecot-master-9")
    cli.check("master", "add", "helpdesk", "--hashed", "--password-stdin", input=f"{imported}\n")
    assert _test(cli, name="helpdesk", password="Dovecot-master-9") == (
        0, "the password of the master user helpdesk is correct (kept as the hash imported from another server)\n", ""
    )
    assert _test(cli, name="helpdesk", password="Dovecot-master-8")[0] == 77
    # Not replaced by mailgate's own, as a user's is at their login.
    assert _masterHash(databaseURL, "helpdesk") == imported


def test_itsNetworks(cli):
    assert _test(cli, "--from", "192.0.2.7") == (
        0, RIGHT + "the master user admin may log in from anywhere: from 192.0.2.7 too\n", ""
    )
    cli.check("master", "networks", "admin", "192.0.2.0/24")
    assert _test(cli) == (0, RIGHT + HELD, "")
    assert _test(cli, "--from", "192.0.2.7") == (
        0, RIGHT + HELD + "a login from 192.0.2.7 is let in: it is on one of those networks\n", ""
    )
    # As the server sees an IPv4 client on a dual-stack listener.
    assert _test(cli, "--from", "::ffff:192.0.2.7")[0] == 0
    assert _test(cli, "--from", "198.51.100.1") == (
        77,
        RIGHT + HELD + "a login from 198.51.100.1 is refused: it is on none of those networks\n",
        "mailgate: the password is right, but a login of the master user admin is refused: from 198.51.100.1, "
        "on none of its networks\n",
    )
    assert _test(cli, "--from", "local")[0] == 77
    # The wrong password is told as it is, wherever the client is.
    assert _test(cli, "--from", "198.51.100.1", password="wrong") == (
        77, "", "mailgate: that is not the password of the master user admin\n"
    )
    assert _test(cli, "--from", "office") == (
        64, "", "mailgate: --from 'office' is not an IP address (give the client's, e.g. 192.0.2.7, or local)\n"
    )


def test_theUsersOwnState(cli):
    code, out, err = _test(cli, "--user", ALICE)
    assert (code, out) == (
        77, RIGHT + f"there is no user {ALICE}: a master login to that maildrop is refused as a wrong password is\n"
    )
    assert err == (
        f"mailgate: the password is right, but a login of the master user admin to the maildrop of {ALICE} is "
        f"refused: no such user {ALICE}\n"
    )
    cli.addUser(ALICE, "her-own-password")
    assert _test(cli, "--user", "Alice@Example.org") == (0, RIGHT + f"{ALICE} is a user, and not disabled\n", "")
    cli.check("user", "networks", ALICE, "10.0.0.0/8")
    code, out, err = _test(cli, "--user", ALICE, "--from", "192.0.2.7")
    assert (code, out) == (
        77,
        RIGHT
        + "the master user admin may log in from anywhere: from 192.0.2.7 too\n"
        + f"{ALICE} is a user, and not disabled\n"
        + f"{ALICE} may log in from 10.0.0.0/8 only (mailgate user networks): a login from elsewhere is refused "
        "as a wrong password is\n"
        + "a login from 192.0.2.7 is refused: it is on none of those networks\n",
    )
    assert err.endswith(f"refused: from 192.0.2.7, on none of {ALICE}'s networks\n"), err
    assert _test(cli, "--user", ALICE, "--from", "10.1.2.3")[0] == 0
    cli.check("user", "disable", ALICE, "--reason", "left the company")
    code, out, err = _test(cli, "--user", ALICE)
    assert code == 77
    assert f"{ALICE} is disabled since " in out and " (left the company): a master login to their maildrop" in out
    assert err.endswith(f"refused: {ALICE} is disabled\n"), err
    cli.check("master", "networks", "admin", "192.0.2.0/24")
    code, out, err = _test(cli, "--user", ALICE, "--from", "10.1.2.3")
    assert err.endswith(f"refused: from 10.1.2.3, on none of its networks and {ALICE} is disabled\n"), err
    assert _test(cli, "--user", "not an address")[0] == 65
