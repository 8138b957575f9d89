"""
C{mailgate db check} and users' allowed networks (C{mailgate user
networks}, Dovecot's C{allow_nets}).

The command stores only what it parsed, but a value written by hand (or
by a script into the table) may hold an item that is no network; such an
item lets no client in (a user restricted to it is refused, rather than
let in from anywhere), and before nothing said why the user's logins
failed: db check called the database sound.  Now it names the users and
the item, on either engine; where no user is restricted it lists no such
check, as for UTF-8 names.
"""

import pytest

from e2e import AdminCommand
from mailgate.store import engineFromURL
from mailgate.store.database import runTransaction

pytestmark = pytest.mark.usefixtures("cheapCommandHashes")

ALICE = "alice@example.org"
BOB = "bob@example.org"
CAROL = "carol@example.org"
CHECK = "users' allowed networks"
ADVICE = (
    "stored networks that are no network (written by hand): no client is on them, so these users cannot "
    "log in; give them again, mailgate user networks ADDRESS NETWORKS (or any)"
)


def _storeByHand(url, address, value):
    engine = engineFromURL(url)
    conn = engine.connect()

    def run(cursor):
        # The test's own values, without quotes in them.
        cursor.execute(f"UPDATE users SET allowed_nets = '{value}' WHERE address = '{address}'")

    try:
        runTransaction(engine, conn, run, (), {}, True)
    finally:
        conn.close()


def test_anItemThatIsNoNetworkIsNamed(databaseURL, tmp_path):
    cli = AdminCommand(databaseURL, cwd=tmp_path)
    for address in (ALICE, BOB, CAROL):
        cli.addUser(address, "pw")
    assert not [line for line in cli.check("db", "check").splitlines() if line.startswith(CHECK)]
    cli.check("user", "networks", BOB, "192.0.2.0/24")
    assert f"{CHECK}: ok" in cli.check("db", "check").splitlines()
    _storeByHand(databaseURL, ALICE, "192.0.2.0/24,office-lan")
    _storeByHand(databaseURL, CAROL, "10.0.0.0/33")
    code, out, err = cli("db", "check")
    assert code == 65, (out, err)
    lines = out.splitlines()
    at = lines.index(f"{CHECK}: {ADVICE}")
    assert lines[at + 1 : at + 3] == [
        f"  {ALICE}: not a network or address: 'office-lan'",
        f"  {CAROL}: not a network or address: '10.0.0.0/33'",
    ]
    cli.check("user", "networks", ALICE, "192.0.2.0/24")
    cli.check("user", "networks", CAROL, "any")
    assert f"{CHECK}: ok" in cli.check("db", "check").splitlines()
