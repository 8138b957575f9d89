"""
C{mailgate alias import VIRTUAL-FILE}: the aliases of Postfix's
C{virtual_alias_maps} source file (virtual(5)), for a site moving from
Postfix + Dovecot to a mailgate that receives mail directly.

The file is read as Postfix 3.7's C{postmap} reads it, checked against
the real C{postmap -q} of the same file (continuation lines across blank
and comment lines, a C{#} that is no comment, keys given twice, case).
The command runs through L{mailgate.cli.run} against a real SQLite file
and the real PostgreSQL, and once as the installed console script.
"""

import json
import re
import shutil
import subprocess

import pytest

from e2e import AdminCommand
from mailgate.importers.passwdfile import RefusedLine
from mailgate.importers.virtualaliases import DomainLine, VirtualAlias, readVirtualFile
from mailgate.plural import counted
from tests.test_cli import ALICE, BOB, BOB_PASSWORD, CLI, PASSWORD, oneLineError

pytestmark = pytest.mark.usefixtures("cheapCommandHashes")

CAROL = "carol@example.org"
DORA = "dora@xn--bcher-kva.example"

#: Lines whose reading is not what one would guess, each a question asked
#: of postmap below.
TRICKY = """\
# aliases of example.org
abuse@example.org   bob@example.org
info@example.org
\t# a comment between a line and its continuation
\talice@example.org
list@example.org  alice@example.org,bob@example.org
  carol@example.org
dup@example.org  alice@example.org
DUP@Example.ORG  bob@example.org
Sales@Example.org  BOB@example.org
noted@example.org alice@example.org # a note
lonely@example.org
@example.net  alice@example.org
example.com  anything
user+ext@example.org  alice@example.org\r
"""


def _postmap(tmp_path, text):
    """
    What the real postmap makes of C{text}: a function asking it one key
    (C{None}: not found; else the addresses of the result), and the line
    numbers it warned about.
    """
    postmap = shutil.which("postmap") or shutil.which("postmap", path="/usr/sbin")
    if postmap is None:
        pytest.skip("Postfix's postmap is not installed")
    config = tmp_path / "postfix"
    config.mkdir()
    (config / "main.cf").write_text("compatibility_level = 3.6\n")
    virtual = tmp_path / "virtual"
    virtual.write_text(text)

    warned = set()

    def query(key):
        done = subprocess.run(
            [postmap, "-c", str(config), "-q", key, f"texthash:{virtual}"], capture_output=True, timeout=30
        )
        assert done.returncode in (0, 1), done
        warned.update(int(n) for n in re.findall(r", line (\d+): ", done.stderr.decode()))
        return tuple(re.split(r"[\s,]+", done.stdout.decode().strip())) if done.returncode == 0 else None

    return query, warned


def test_theFileIsReadAsPostmapReadsIt(tmp_path):
    query, warned = _postmap(tmp_path, TRICKY)
    entries = list(readVirtualFile(TRICKY.splitlines()))
    read = {e.pattern: e.targets for e in entries if isinstance(e, VirtualAlias)}
    for key, expected in [
        ("abuse@example.org", ("bob@example.org",)),
        # The continuation joins, the indented comment between skipped.
        ("info@example.org", ("alice@example.org",)),
        ("list@example.org", ("alice@example.org", "bob@example.org", "carol@example.org")),
        # The first of a key given twice, whatever the case.
        ("dup@example.org", ("alice@example.org",)),
        ("sales@example.org", ("BOB@example.org",)),
        ("user+ext@example.org", ("alice@example.org",)),
        ("@example.net", ("alice@example.org",)),
    ]:
        assert query(key) == expected, key
        assert read[key] == tuple(t.lower() for t in expected), key
    # A '#' after the result is part of it: not one address.
    assert query("noted@example.org") == ("alice@example.org", "#", "a", "note")
    # No result: postmap ignores the line, with a warning; as the second
    # DUP line.  mailgate says so of the same lines.
    assert query("lonely@example.org") is None
    refused = {e.number: e.reason for e in entries if isinstance(e, RefusedLine)}
    assert warned == {9, 12}
    assert set(refused) == {9, 11, 12}
    assert refused[9] == "dup@example.org is on line 8 already (that line is kept, as Postfix keeps the first)"
    assert refused[12].startswith("no result after 'lonely@example.org'")
    assert "a '#' starts a comment only at the start of a line" in refused[11]
    assert [e for e in entries if isinstance(e, DomainLine)] == [DomainLine(14, "example.com")]
    # A logical line by its first line's number, as postmap's warnings.
    assert [e.number for e in entries if isinstance(e, VirtualAlias)] == [2, 3, 6, 8, 10, 13, 15]


def test_aLineStartingWithWhiteSpaceContinuesNothingFirst(tmp_path):
    text = "  lead@example.org bob@example.org\nz@example.org bob@example.org\n"
    query, _ = _postmap(tmp_path, text)
    assert query("lead@example.org") is None
    assert query("z@example.org") == ("bob@example.org",)
    [lead, z] = readVirtualFile(text.splitlines())
    assert lead == RefusedLine(
        1, "starts with white space but continues no line before it (Postfix ignores the line)"
    )
    assert z == VirtualAlias(2, "z@example.org", ("bob@example.org",))


#: A site's file, each line what the command makes of it.
SITE = f"""\
# Postfix's virtual_alias_maps
example.org  virtual
abuse@example.org   {BOB}
postmaster@example.org  Alice@EXAMPLE.org
info@example.org
  bob@Example.ORG
@example.net  {ALICE}
kiosk@example.org  webmaster@example.org
webmaster@example.org  {CAROL}
team@example.org  {ALICE}, {BOB}
twice@example.org  {BOB},{BOB}
{ALICE}  {ALICE}
{BOB}  {BOB}, {CAROL}
archive@example.org  archive@example.org, {CAROL}
friend@example.org  someone@elsewhere.example
dave@example.org  dave.smith@example.org
{CAROL}  {BOB}
taken@example.org  {ALICE}
helpdesk  {BOB}
abuse@example.org  {ALICE}
sales@example.org  dora@Bücher.example
kontakt@bücher.example  {DORA}
"""

ADDED = [
    f"added abuse@example.org, an alias of {BOB}",
    f"added postmaster@example.org, an alias of {ALICE}",
    f"added info@example.org, an alias of {BOB}",
    f"added @example.net, a catch-all alias of {ALICE}",
    f"added kiosk@example.org, an alias of {CAROL} (through webmaster@example.org)",
    f"added webmaster@example.org, an alias of {CAROL}",
]

#: the lines after the last failure's: in Unicode, in the ASCII form
LATE = [
    f"added sales@example.org, an alias of {DORA}",
    f"added kontakt@xn--bcher-kva.example, an alias of {DORA}",
]

FAILED = [
    f"line 10: team@example.org is a list of 2 addresses ({ALICE}, {BOB}): an alias names one user, a list "
    "is the MTA's to expand",
    f"line 13: {BOB} is a user's address and keeps its mail; the copy Postfix sent on to {CAROL} is not made: "
    "mailgate keeps one copy of a message (forward it in the MTA in front)",
    f"line 14: archive@example.org keeps a copy and sends one on to {CAROL}: mailgate keeps one copy of a "
    f"message, and archive@example.org is no mailgate user: add it (mailgate user import), or make it an alias "
    f"of {CAROL} alone (mailgate alias add archive@example.org {CAROL})",
    "line 15: friend@example.org: someone@elsewhere.example is an address elsewhere (no user or alias here is "
    "of elsewhere.example): mail to friend@example.org was forwarded to it, which mailgate does not do",
    "line 16: dave@example.org: dave.smith@example.org is no mailgate user (not imported yet? mailgate user "
    "import)",
    f"line 17: {CAROL} is a user's address: an address is a user's or an alias",
    f"line 18: taken@example.org is an alias of {BOB}: remove it first (mailgate alias del taken@example.org)",
    "line 19: 'helpdesk' has no domain: Postfix matches it in the domains of $myorigin, $mydestination and its "
    "interfaces, which mailgate does not know; write it helpdesk@DOMAIN",
    "line 20: abuse@example.org is on line 3 already (that line is kept, as Postfix keeps the first)",
]


@pytest.fixture
def cli(tmp_path, databaseURL):
    cli = CLI(tmp_path / "unused.sqlite3")
    cli.url = databaseURL
    cli.add(ALICE, PASSWORD)
    cli.add(BOB, BOB_PASSWORD)
    cli.add(CAROL, "carols-own-password")
    cli.add("dora@bücher.example", "doras-own-password")
    assert cli("alias", "add", "taken@example.org", BOB).code == 0
    return cli


def _failures(result, path):
    """
    The lines C{result} said it failed, without the path, checking that
    the last says how many.
    """
    prefix = f"mailgate: {path} "
    *lines, last = result.err.splitlines()
    assert last == f"mailgate: {counted(len(lines), 'line')} of {path} not imported", result
    assert all(line.startswith(prefix) for line in lines), result
    return [line[len(prefix) :] for line in lines]


def test_importASitesAliases(cli, tmp_path):
    virtual = tmp_path / "virtual"
    virtual.write_text(SITE)
    done = cli("alias", "import", str(virtual))
    assert done.code == 65, done
    assert done.out.splitlines() == [
        "skipped example.org: a virtual alias domain's line (virtual_alias_domains), no address: mailgate takes "
        "mail for the domains of its users and aliases",
        *ADDED,
        f"added twice@example.org, an alias of {BOB}",
        f"skipped {ALICE}: it maps to itself, a user's address, whose mail is its own (no catch-all takes it)",
        *LATE,
        "9 added, 0 already there, 2 skipped, 9 failed",
    ]
    assert _failures(done, virtual) == FAILED
    listed = cli("alias", "list", "--json")
    assert listed.code == 0
    assert [json.loads(line) for line in listed.out.splitlines()] == [
        {"alias": alias, "user": user}
        for alias, user in [
            ("@example.net", ALICE),
            ("abuse@example.org", BOB),
            ("info@example.org", BOB),
            ("kiosk@example.org", CAROL),
            ("kontakt@xn--bcher-kva.example", DORA),
            ("postmaster@example.org", ALICE),
            ("sales@example.org", DORA),
            ("taken@example.org", BOB),
            ("twice@example.org", BOB),
            ("webmaster@example.org", CAROL),
        ]
    ]
    # Again: each alias there already, nothing changed, the same failures.
    again = cli("alias", "import", str(virtual))
    assert again.code == 65
    assert [line for line in again.out.splitlines() if line.startswith(("exists", "added"))] == [
        line.replace("added", "exists").replace(" (through webmaster@example.org)", "")
        for line in ADDED + [f"added twice@example.org, an alias of {BOB}"] + LATE
    ]
    assert again.out.splitlines()[-1] == "0 added, 9 already there, 2 skipped, 9 failed"
    assert _failures(again, virtual) == FAILED


def test_aDryRunChangesNothing(cli, tmp_path):
    virtual = tmp_path / "virtual"
    virtual.write_text(SITE)
    assert cli("alias", "add", "abuse@example.org", BOB).code == 0
    dry = cli("alias", "import", "--dry-run", str(virtual))
    assert dry.code == 65, dry
    assert [line for line in dry.out.splitlines() if line.startswith(("would add", "exists"))] == [
        f"exists abuse@example.org, an alias of {BOB}",
        *(line.replace("added", "would add") for line in ADDED[1:]),
        f"would add twice@example.org, an alias of {BOB}",
        *(line.replace("added", "would add") for line in LATE),
    ]
    assert dry.out.splitlines()[-1] == (
        "8 to add, 1 already there, 2 skipped, 9 failed (a dry run: nothing was changed)"
    )
    assert _failures(dry, virtual) == FAILED
    assert cli("alias", "list").out.splitlines() == [
        "ALIAS              USER", f"abuse@example.org  {BOB}", f"taken@example.org  {BOB}"
    ]


def test_badFilesAreSaidInOneLine(cli, tmp_path, monkeypatch):
    missing = cli("alias", "import", str(tmp_path / "nothere"))
    assert missing.code == 66
    assert oneLineError(missing) == f"mailgate: cannot read {tmp_path / 'nothere'}: No such file or directory\n"
    directory = cli("alias", "import", str(tmp_path))
    assert directory.code == 66 and "Is a directory" in oneLineError(directory)
    # Not UTF-8: that line only.
    latin = tmp_path / "latin"
    latin.write_bytes(
        b"j\xf6rg@example.org " + BOB.encode() + b"\nabuse@example.org " + BOB.encode()
        + b"\ninfo@example.org j\xf6rg@example.org\ninfo@example.org " + BOB.encode() + b"\n"
    )
    mixed = cli("alias", "import", str(latin))
    assert mixed.code == 65 and "Traceback" not in mixed.err
    assert mixed.out.splitlines() == [
        f"added abuse@example.org, an alias of {BOB}", "1 added, 0 already there, 0 skipped, 3 failed"
    ]
    assert _failures(mixed, latin) == [
        "line 1: its pattern is not UTF-8 text (a file in Latin-1?)",
        "line 3: info@example.org: its result is not UTF-8 text (a file in Latin-1?)",
        # Postfix keeps line 3 (its first): not this one.
        "line 4: info@example.org is on line 3 already (that line is kept, as Postfix keeps the first)",
    ]
    from mailgate.cli import aliases

    monkeypatch.setattr(aliases, "MAX_FILE", 100)
    big = tmp_path / "big"
    big.write_text(f"abuse@example.org {BOB}\n" * 10)
    over = cli("alias", "import", str(big))
    assert over.code == 65
    assert oneLineError(over) == (
        f"mailgate: {big} is larger than 100 octets: no virtual(5) file is (the wrong file?)\n"
    )
    assert cli("alias", "list").code == 0


def test_theInstalledCommandReadsStandardInput(databaseURL, tmp_path):
    admin = AdminCommand(databaseURL)
    admin.addUser(ALICE, PASSWORD)
    admin.addUser(BOB, BOB_PASSWORD)
    code, out, err = admin("alias", "import", "-", input=f"abuse@example.org {BOB}\n@example.net {ALICE}\n")
    assert (code, err) == (0, ""), out
    assert out.splitlines() == [
        f"added abuse@example.org, an alias of {BOB}",
        f"added @example.net, a catch-all alias of {ALICE}",
        "2 added, 0 already there, 0 skipped, 0 failed",
    ]
    # Mail to them is their users'.
    code, out, err = admin("deliver", "someone@example.net", input=b"Subject: hi\r\n\r\nhello\r\n")
    assert code == 0, err
    assert len(admin.check("mailbox", "list", ALICE, "--json").splitlines()) == 1
