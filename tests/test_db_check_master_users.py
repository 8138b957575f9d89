"""
C{mailgate db check} and master users (C{mailgate master}), through the
command (L{e2e.AdminCommand}), on a SQLite file and on PostgreSQL.

The command writes only what it read (a name in L{mailgate.address.
masterName}'s form, networks L{mailgate.networks.parseAllowedNetworks}
read), but a row written by hand or by a tool may hold a name no login
gives (C{Helpdesk}: logins look up C{helpdesk}; C{bad name}, which is no
name) or networks that let no client in (C{office-lan}, C{any}, nothing),
and db check called such a database sound.  Now it names them, where there
are master users at all, as it names users' networks; the users' check
also reads stored networks as a login does, so C{any} and C{LOCAL}
written by hand (which C{user networks} takes but never stores, and a
login matches with no client) are named too.

Password hashes, a user's or a master user's: tests/test_db_check_hashes.py.
"""

import pytest

from databasefiles import byHand as _byHand
from e2e import AdminCommand

pytestmark = pytest.mark.usefixtures("cheapCommandHashes")

PASSWORD = "Master-key-4-helpdesk"
NAMES = "master users' names"
NETWORKS = "master users' allowed networks"
USERS_NETWORKS = "users' allowed networks"
NAMES_ADVICE = (
    "stored in a form no login names them by (written by hand): no login reaches them, nor do mailgate master "
    "passwd, networks and test; remove each, mailgate master del --as-stored 'NAME' (quoted as shown), and add it "
    "again, mailgate master add NAME"
)
NETWORKS_ADVICE = (
    "stored networks that are no network (written by hand): no client is on them, so these master users cannot "
    "log in; give them again, mailgate master networks NAME NETWORKS (or any)"
)
USERS_ADVICE = (
    "stored networks that are no network (written by hand): no client is on them, so these users cannot "
    "log in; give them again, mailgate user networks ADDRESS NETWORKS (or any)"
)


def _masterByHand(url, name, networks=None):
    """
    A master user C{name} written with SQL, with admin's password hash.
    """
    _byHand(
        url,
        "INSERT INTO master_users (name, password_hash, created_at, allowed_nets) "
        "SELECT ?, password_hash, created_at, ? FROM master_users WHERE name = 'admin'",
        name, networks,
    )


def _addMaster(cli, name, *options):
    cli.check("master", "add", name, "--password-stdin", *options, input=f"{PASSWORD}\n")


def _checked(cli):
    """
    db check's lines that are about master users' names and networks (their
    password hashes: tests/test_db_check_hashes.py).
    """
    lines = cli.check("db", "check").splitlines()
    return [line for line in lines if line.startswith("master users'") and "password hashes" not in line]


def test_aCleanDatabaseWithMasterUsersReportsNothing(databaseURL, tmp_path):
    cli = AdminCommand(databaseURL, cwd=tmp_path)
    cli.addUser("alice@example.org", "pw")
    # No master user: no line about them, as where there is no alias.
    assert _checked(cli) == []
    _addMaster(cli, "Admin")
    assert _checked(cli) == [f"{NAMES}: ok"]
    _addMaster(cli, "help-desk@example.org", "--networks", "192.0.2.0/24, local,2001:DB8::/32")
    cli.check("master", "networks", "admin", "::ffff:10.0.0.0/104")
    assert _checked(cli) == [f"{NAMES}: ok", f"{NETWORKS}: ok"]
    code, out, err = cli("db", "check")
    assert (code, err) == (0, ""), out


def test_namesNoLoginGives(databaseURL, tmp_path):
    cli = AdminCommand(databaseURL, cwd=tmp_path)
    _addMaster(cli, "admin")
    _masterByHand(databaseURL, "Helpdesk")
    _masterByHand(databaseURL, "bad name")
    # What a user sees of them: the command (as a login) finds neither.
    assert cli("master", "test", "Helpdesk", "--password-stdin", input=f"{PASSWORD}\n")[0] == 67
    code, out, err = cli("db", "check")
    assert code == 65, (out, err)
    lines = out.splitlines()
    at = lines.index(f"{NAMES}: {NAMES_ADVICE}")
    assert lines[at + 1 : at + 3] == [
        "  'Helpdesk': logins name it helpdesk",
        "  'bad name': a master user's name is 1 to 128 letters, digits and . _ - @, starting with a letter or digit",
    ]
    assert not lines[at + 3 :] or not lines[at + 3].startswith("  "), lines
    assert err.endswith(f"1 check found problems: {NAMES}\n"), err
    # Done as the advice says, with the command.
    assert cli.check("master", "del", "--as-stored", "Helpdesk") == (
        "removed the master user stored as 'Helpdesk' (written by hand, in a form no login names it by: "
        "no login reached it)\n"
    )
    cli.check("master", "del", "--as-stored", "bad name")
    _addMaster(cli, "helpdesk")
    assert _checked(cli) == [f"{NAMES}: ok"]


def test_networksThatLetNoClientIn(databaseURL, tmp_path):
    cli = AdminCommand(databaseURL, cwd=tmp_path)
    _addMaster(cli, "admin", "--networks", "192.0.2.0/24")
    for name, networks in (("helpdesk", "any"), ("ops", ""), ("backup", "192.0.2.0/24,office-lan"), ("zz", None)):
        _masterByHand(databaseURL, name, networks)
    _byHand(databaseURL, "UPDATE master_users SET allowed_nets = ? WHERE name = 'admin'", "10.0.0.0/33")
    # What a user sees: a login from any client is refused.
    code, out, err = cli("master", "test", "helpdesk", "--password-stdin", "--from", "192.0.2.7", input=f"{PASSWORD}\n")
    assert code == 77 and "is refused" in err, (out, err)
    code, out, err = cli("db", "check")
    assert code == 65, (out, err)
    lines = out.splitlines()
    assert f"{NAMES}: ok" in lines
    at = lines.index(f"{NETWORKS}: {NETWORKS_ADVICE}")
    assert lines[at + 1 : at + 5] == [
        "  admin: not a network or address: '10.0.0.0/33'",
        "  backup: not a network or address: 'office-lan'",
        "  helpdesk: not a network or address: 'any'",
        "  ops: no network or address at all: ''",
    ]
    assert not lines[at + 5 :] or not lines[at + 5].startswith("  "), lines
    assert err.endswith(f"1 check found problems: {NETWORKS}\n"), err
    # Given again as the advice says.
    for name in ("admin", "helpdesk", "ops"):
        cli.check("master", "networks", name, "any")
    cli.check("master", "networks", "backup", "192.0.2.0/24")
    assert _checked(cli) == [f"{NAMES}: ok", f"{NETWORKS}: ok"]


def test_usersNetworksWrittenAsAnyOrLOCALAreNamed(databaseURL, tmp_path):
    cli = AdminCommand(databaseURL, cwd=tmp_path)
    for address in ("alice@example.org", "bob@example.org", "carol@example.org"):
        cli.addUser(address, "pw")
    cli.check("user", "networks", "carol@example.org", "local")
    _byHand(databaseURL, "UPDATE users SET allowed_nets = ? WHERE address = 'alice@example.org'", "any")
    _byHand(databaseURL, "UPDATE users SET allowed_nets = ? WHERE address = 'bob@example.org'", "LOCAL")
    # What a user sees: alice is let in from nowhere.
    code, out, err = cli("user", "test", "alice@example.org", "--password-stdin", "--from", "192.0.2.7", input="pw\n")
    assert code == 77, (out, err)
    code, out, err = cli("db", "check")
    assert code == 65, (out, err)
    lines = out.splitlines()
    at = lines.index(f"{USERS_NETWORKS}: {USERS_ADVICE}")
    assert lines[at + 1 : at + 3] == [
        "  alice@example.org: not a network or address: 'any'",
        "  bob@example.org: not a network or address: 'LOCAL'",
    ]
    assert not lines[at + 3 :] or not lines[at + 3].startswith("  "), lines
