"""
C{mailgate alias add|del|list}, and what the other commands do with an
alias's address, through L{mailgate.cli.run} against a real SQLite file
(the CLI fixture of tests/test_cli.py).
"""

import json

import pytest

from tests.test_cli import ALICE, BOB, BOB_PASSWORD, CLI, PASSWORD, oneLineError

pytestmark = pytest.mark.usefixtures("cheapCommandHashes")

ABUSE = "abuse@example.org"


@pytest.fixture
def cli(tmp_path):
    cli = CLI(tmp_path / "admin.sqlite3")
    cli.add(ALICE, PASSWORD)
    cli.add(BOB, BOB_PASSWORD)
    return cli


def test_addListAndDelete(cli):
    added = cli("alias", "add", ABUSE, BOB)
    assert (added.code, added.out) == (0, f"added {ABUSE}, an alias of {BOB}: mail to it is {BOB}'s\n")
    again = cli("alias", "add", ABUSE, BOB)
    assert (again.code, again.out) == (0, f"{ABUSE} is an alias of {BOB} already\n")
    # A domain in Unicode is kept in its ASCII form, as a user's is.
    assert cli("alias", "add", "info@Bücher.example", ALICE).code == 0
    listed = cli("alias", "list")
    assert listed.code == 0
    assert listed.out.splitlines() == [
        "ALIAS                       USER",
        f"abuse@example.org           {BOB}",
        f"info@xn--bcher-kva.example  {ALICE}",
    ]
    mine = cli("alias", "list", BOB, "--json")
    assert [json.loads(line) for line in mine.out.splitlines()] == [{"alias": ABUSE, "user": BOB}]
    removed = cli("alias", "del", ABUSE)
    assert (removed.code, removed.out) == (
        0, f"removed the alias {ABUSE} (of {BOB}): mail to it is refused from now on\n"
    )
    gone = cli("alias", "del", ABUSE)
    assert gone.code == 67 and oneLineError(gone) == f"mailgate: no such alias: {ABUSE}\n"


def test_refusals(cli):
    assert cli("alias", "add", ABUSE, BOB).code == 0
    taken = cli("alias", "add", ABUSE, ALICE)
    assert taken.code == 73
    assert oneLineError(taken) == (
        f"mailgate: {ABUSE} is an alias of {BOB}: remove it first (mailgate alias del {ABUSE})\n"
    )
    user = cli("alias", "add", ALICE, BOB)
    assert user.code == 73 and "is a user's address" in oneLineError(user)
    own = cli("alias", "add", BOB, BOB)
    assert own.code == 73 and "own address" in oneLineError(own)
    nobody = cli("alias", "add", "x@example.org", "nobody@example.org")
    assert nobody.code == 67 and oneLineError(nobody) == "mailgate: no such user: nobody@example.org\n"
    listing = cli("alias", "list", "nobody@example.org")
    assert listing.code == 67
    bad = cli("alias", "add", "not an address", BOB)
    assert bad.code == 65 and oneLineError(bad)


def test_anAliasIsNoUsersAddress(cli):
    """
    user add and user rename refuse an alias's address and name the
    alias to remove; rename to one of the user's own aliases takes it.
    """
    assert cli("alias", "add", ABUSE, BOB).code == 0
    added = cli("user", "add", ABUSE, "--password-stdin", stdin="pw-of-abuse\n")
    assert added.code == 73
    assert oneLineError(added) == (
        f"mailgate: {ABUSE} is an alias of {BOB}: an address is a user's or an alias "
        f"(mailgate alias del {ABUSE} first)\n"
    )
    renamed = cli("user", "rename", ALICE, ABUSE)
    assert renamed.code == 73 and f"is an alias of {BOB}" in oneLineError(renamed)
    assert cli("user", "rename", BOB, ABUSE).code == 0
    assert cli("alias", "list").out.splitlines() == ["ALIAS  USER"]
    assert cli.user(ABUSE) is not None


def test_deliverToAnAliasStoresTheUsersCopy(cli):
    assert cli("alias", "add", ABUSE, BOB).code == 0
    delivered = cli("deliver", "-f", "sender@remote.test", ABUSE, stdin=b"Subject: to abuse\r\n\r\nspam report\r\n")
    assert delivered.code == 0, delivered
    [message] = cli.messages(BOB)
    assert b"for <abuse@example.org>" in message
    assert message.endswith(b"Subject: to abuse\r\n\r\nspam report\r\n")
    assert cli("alias", "del", ABUSE).code == 0
    refused = cli("deliver", ABUSE, stdin=b"Subject: again\r\n\r\nx\r\n")
    assert refused.code == 67 and oneLineError(refused) == f"mailgate: no such user: {ABUSE}\n"


def test_userDelRemovesTheAliases(cli):
    assert cli("alias", "add", ABUSE, BOB).code == 0
    assert cli("alias", "add", "@example.org", BOB).code == 0
    deleted = cli("user", "del", BOB)
    assert deleted.code == 0
    assert deleted.out.splitlines() == [
        f"deleted {BOB} and their maildrop",
        f"their aliases @example.org, {ABUSE} went with them: mail to them is refused from now on",
    ]
    assert cli("alias", "list").out.splitlines() == ["ALIAS  USER"]
    assert cli("alias", "add", ABUSE, ALICE).code == 0


def test_aConfigurationListingOtherDomainsIsNoted(cli, tmp_path):
    config = tmp_path / "mailgate.toml"
    config.write_text(f'database = "{cli.url}"\ndomain = ["example.org"]\n')
    noted = cli("--config", str(config), "alias", "add", "info@example.net", ALICE, database=None)
    assert noted.code == 0, noted
    assert noted.out.splitlines()[-1] == (
        "note: example.net is not among the configuration's domains: the server refuses mail to "
        "info@example.net (relay access denied) until it is"
    )
    quiet = cli("--config", str(config), "alias", "add", ABUSE, BOB)
    assert quiet.code == 0 and "note" not in quiet.out


def test_aCatchAll(cli):
    added = cli("alias", "add", "@Example.ORG", ALICE)
    assert added.code == 0, added
    assert added.out == (
        f"added @example.org, the catch-all of example.org: mail to an address there that no user or alias "
        f"has is {ALICE}'s\n"
    )
    delivered = cli(
        "deliver", "-f", "sender@remote.test", "nobody-in-particular@example.org",
        stdin=b"Subject: stray\r\n\r\nx\r\n",
    )
    assert delivered.code == 0, delivered
    [message] = cli.messages(ALICE)
    assert b"for <nobody-in-particular@example.org>" in message
    # Bob's own mail is still his.
    assert cli("deliver", BOB, stdin=b"Subject: his\r\n\r\nx\r\n").code == 0
    assert len(cli.messages(BOB)) == 1
    assert cli("alias", "list", "--json").out == f'{{"alias":"@example.org","user":"{ALICE}"}}\n'
    bad = cli("alias", "add", "@", ALICE)
    assert bad.code == 65 and oneLineError(bad)
    assert cli("alias", "del", "@example.org").code == 0
    refused = cli("deliver", "nobody-in-particular@example.org", stdin=b"Subject: stray\r\n\r\nx\r\n")
    assert refused.code == 67


def test_userImportFailsTheLineOfAnAlias(cli, tmp_path):
    """
    A passwd-file line whose address is an alias: not a user there (its
    mail was never imported), so a failed line naming the alias, exit 65;
    the other lines imported.
    """
    assert cli("alias", "add", ABUSE, BOB).code == 0
    passwd = tmp_path / "passwd"
    passwd.write_text(f"{ABUSE}:{{PLAIN}}one::::::\ncarol@example.org:{{PLAIN}}two::::::\n")
    imported = cli("user", "import", str(passwd))
    assert imported.code == 65, imported
    assert imported.out.splitlines() == ["added carol@example.org", "1 added, 0 already there, 1 failed"]
    assert imported.err.splitlines()[0] == (
        f"mailgate: {passwd} line 1: {ABUSE} is an alias of {BOB}: an address is a user's or an alias "
        f"(mailgate alias del {ABUSE} first)"
    )
    assert cli.user(ABUSE) is None


def test_aliasListVirtualIsWhatPostfixAndAliasImportRead(cli, tmp_path):
    """
    alias list --virtual writes the aliases as Postfix's virtual(5) file:
    the real postmap gives each alias its user, and each user of a domain
    with a catch-all themself (without that line Postfix's catch-all would
    take their mail, which mailgate's never does); alias import reads it
    back into another database as it was.
    """
    from tests.test_alias_import import _postmap

    cli.add("carol@other.example", PASSWORD)
    for alias, user in ((ABUSE, BOB), ("@example.org", ALICE), ("info@other.example", "carol@other.example")):
        assert cli("alias", "add", alias, user).code == 0
    listed = cli("alias", "list", "--virtual")
    assert listed.code == 0, listed
    query, warned = _postmap(tmp_path, listed.out)
    assert warned == set()
    assert query(ABUSE) == (BOB,)
    assert query("anyone@example.org") is None and query("@example.org") == (ALICE,)
    assert query(BOB) == (BOB,) and query(ALICE) == (ALICE,)
    assert query("info@other.example") == ("carol@other.example",)
    # No catch-all in other.example: carol needs no line of her own.
    assert query("carol@other.example") is None
    # One user's: their aliases, and their own line where a catch-all needs it.
    assert cli("alias", "list", BOB, "--virtual").out.splitlines()[1:] == [
        f"{ABUSE} {BOB}",
        "# each user of a domain with a catch-all, to itself: else the catch-all takes its mail",
        f"{BOB} {BOB}",
    ]
    both = cli("alias", "list", "--virtual", "--json")
    assert both.code == 64

    other = CLI(tmp_path / "other.sqlite3")
    other.add(ALICE, PASSWORD)
    other.add(BOB, BOB_PASSWORD)
    other.add("carol@other.example", PASSWORD)
    virtual = tmp_path / "exported"
    virtual.write_text(listed.out)
    imported = other("alias", "import", str(virtual))
    assert imported.code == 0, imported
    assert other("alias", "list", "--json").out == cli("alias", "list", "--json").out
