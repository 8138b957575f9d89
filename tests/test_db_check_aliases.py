"""
C{mailgate db check} and aliases (C{mailgate alias add}).

Two things the alias commands never make but the database can hold: the
alias of a user removed by hand (SQL, not C{mailgate user del}), which
reaches no one (C{alias list}: "- (no such user)"); and an address that
is both a user's and an alias (two nodes' commands at once on
PostgreSQL), whose mail is the user's.  db check called such a database
sound; now it names them, on either engine, with what to do.  Where there
is no alias it lists no such check, as for UTF-8 names.
"""

from e2e import AdminCommand
from test_db_check import _execute
from mailgate.store import engineFromURL
from mailgate.store.database import runTransaction

ALICE = "alice@example.org"
BOB = "bob@example.org"
CAROL = "carol@example.org"
ABUSE = "abuse@example.org"
INFO = "info@other.example"
ORPHANS = "aliases and their users"
ORPHANS_ADVICE = (
    "aliases of users removed by hand (not with mailgate user del): they reach no one, mail to them is "
    "refused as to no such user; remove each, mailgate alias del ALIAS, or give it to a user, "
    "mailgate alias add ALIAS USER"
)
BOTH = "aliases and users' addresses"
BOTH_ADVICE = (
    "addresses that are both a user's and an alias (commands of two nodes at once): mail to them is "
    "the user's, the alias reaches no one; remove the alias, mailgate alias del ADDRESS"
)


def _userId(url, address):
    engine = engineFromURL(url)
    conn = engine.connect()

    def run(cursor):
        cursor.execute(f"SELECT user_id FROM users WHERE address = '{address}'")
        return cursor.fetchone()[0]

    try:
        return runTransaction(engine, conn, run, (), {}, False)
    finally:
        conn.close()


def _named(out, check):
    """
    The lines db check wrote for C{check}: its own and its examples.
    """
    lines = out.splitlines()
    at = [n for n, line in enumerate(lines) if line.startswith(f"{check}: ")]
    assert len(at) == 1, out
    end = at[0] + 1
    while end < len(lines) and lines[end].startswith("  "):
        end += 1
    return lines[at[0] : end]


def test_aliasesOfAUserGoneAndAddressesBothAUsersAndAnAliasAreNamed(databaseURL, tmp_path):
    cli = AdminCommand(databaseURL, cwd=tmp_path)
    for address in (ALICE, BOB, CAROL):
        cli.addUser(address, "pw")
    out = cli.check("db", "check")
    assert not [line for line in out.splitlines() if line.startswith((ORPHANS, BOTH))], out
    cli.check("alias", "add", ABUSE, BOB)
    cli.check("alias", "add", INFO, BOB)
    out = cli.check("db", "check")
    assert _named(out, ORPHANS) == [f"{ORPHANS}: ok"]
    assert _named(out, BOTH) == [f"{BOTH}: ok"]

    bob = _userId(databaseURL, BOB)
    _execute(
        databaseURL,
        f"DELETE FROM mailboxes WHERE user_id = {bob}",
        f"DELETE FROM users WHERE user_id = {bob}",
        # What two nodes' commands racing can leave: carol's address an alias of alice's.
        f"INSERT INTO aliases (address, domain, user_id, created_at) "
        f"VALUES ('{CAROL}', 'example.org', {_userId(databaseURL, ALICE)}, 0)",
    )
    assert "- (no such user)" in cli.check("alias", "list")
    code, out, err = cli("db", "check")
    assert code == 65, (out, err)
    assert _named(out, ORPHANS) == [
        f"{ORPHANS}: {ORPHANS_ADVICE}",
        f"  {ABUSE}: its user (number {bob}) is no longer there",
        f"  {INFO}: its user (number {bob}) is no longer there",
    ]
    assert _named(out, BOTH) == [f"{BOTH}: {BOTH_ADVICE}", f"  {CAROL}: a user's address, and an alias of {ALICE}"]
    assert err.rstrip("\n").endswith(f"2 checks found problems: {ORPHANS}, {BOTH}"), err
    # As the check says: carol's mail is carol's.
    assert cli.check("deliver", CAROL, input=b"Subject: hello\r\n\r\nhello\r\n").startswith(f"delivered to {CAROL} ")

    # Done as it advises: each named is well again.
    cli.check("alias", "del", ABUSE)
    cli.check("alias", "add", INFO, ALICE)
    cli.check("alias", "del", CAROL)
    out = cli.check("db", "check")
    assert _named(out, ORPHANS) == [f"{ORPHANS}: ok"]
    assert _named(out, BOTH) == [f"{BOTH}: ok"]
    assert len(cli.mailbox(CAROL)) == 1
