"""
C{mailgate master add|passwd|del|list}: master users, through the
C{mailgate} command (L{e2e.AdminCommand}), on a SQLite file and on PostgreSQL; the
hash kept checked with the store and L{verifyPassword} as a login checks
it; the audit lines (tests/test_cli_audit.py's private /dev/log) never
holding the password.
"""

import json
import re
import shutil
import subprocess

import pytest

from e2e import runHere
from mailgate.auth.passwords import needsUpgrade, verifyPassword
from mailgate.store import openSynchronousStore
from mailgate.testing import resultOf
from test_cli_audit import AUTHPRIV_NOTICE, AUTHPRIV_WARNING, assertLine, syslog, who  # noqa: F401 (a fixture)

PASSWORD = "Master-key-4-helpdesk"
NEW_PASSWORD = "Another-master-key-77"
TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


def mailgate(url, *argv, stdin=""):
    """
    The command (run in this process: L{e2e.AdminCommand}) on the database
    at C{url}: (exit status, stdout, stderr); whatever it said on failing
    is one line, never a traceback.
    """
    code, out, err = runHere(["--database", url, *argv], stdin)
    if code:
        assert err.startswith("mailgate: ") and err.count("\n") == 1, (argv, code, out, err)
    assert "Traceback" not in err, err
    return code, out, err


def stored(url, name):
    """
    The master user C{name} as the store has it (C{None}: none).
    """
    store = openSynchronousStore(url)
    try:
        return resultOf(store.findMasterUser(name))
    finally:
        store.close()


def sha512Crypt(password):
    """
    A Dovecot master passdb's C{{SHA512-CRYPT}} hash of C{password}: made by
    Dovecot's own doveadm where it is installed, else by passlib (which
    mailgate checks such hashes with), as doveadm makes it.
    """
    if shutil.which("doveadm"):
        done = subprocess.run(
            ["doveadm", "pw", "-s", "SHA512-CRYPT", "-p", password], capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()
    from mailgate.auth.cryptschemes import sha512_crypt

    return "{SHA512-CRYPT}" + sha512_crypt.using(rounds=5000).hash(password)


def test_addListChangeAndRemove(databaseURL):
    code, out, err = mailgate(databaseURL, "master", "add", "Admin", "--password-stdin", stdin=f"{PASSWORD}\n")
    assert (code, err) == (0, "")
    # The name as logins compare it: small letters.
    assert out == (
        "added the master user admin: it logs in to any user's maildrop where the server allows master "
        "logins (--master-users)\n"
    )
    admin = stored(databaseURL, "admin")
    # mailgate's own hash of the password, nothing else kept of it.
    assert admin.passwordHash.startswith("$scrypt$") and PASSWORD not in admin.passwordHash
    assert verifyPassword(PASSWORD, admin.passwordHash)
    assert not verifyPassword(NEW_PASSWORD, admin.passwordHash)
    assert mailgate(databaseURL, "master", "add", "help-desk@example.org", "--password-stdin", stdin="pw2\n")[0] == 0

    code, out, err = mailgate(databaseURL, "master", "list")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == f"{'NAME':<{len('help-desk@example.org')}}  ADDED                 NETWORKS"
    assert [re.fullmatch(rf"(\S+) +{TIME}  any", line).group(1) for line in lines[1:]] == [
        "admin", "help-desk@example.org",
    ]
    code, out, err = mailgate(databaseURL, "master", "list", "--json")
    listed = [json.loads(line) for line in out.splitlines()]
    assert [m["name"] for m in listed] == ["admin", "help-desk@example.org"]
    assert all(re.fullmatch(TIME, m.pop("added")) for m in listed), listed
    assert listed == [
        {"name": "admin", "allowed_networks": None}, {"name": "help-desk@example.org", "allowed_networks": None},
    ]
    # Nothing of a password in a listing.
    assert "scrypt" not in out and "$" not in out

    code, out, err = mailgate(databaseURL, "master", "passwd", "ADMIN", "--password-stdin", stdin=f"{NEW_PASSWORD}\n")
    assert (code, out, err) == (
        0, "password changed for the master user admin: the old one fails from the next login on\n", ""
    )
    changed = stored(databaseURL, "admin")
    assert verifyPassword(NEW_PASSWORD, changed.passwordHash)
    assert not verifyPassword(PASSWORD, changed.passwordHash)
    assert changed.createdAt == admin.createdAt

    code, out, err = mailgate(databaseURL, "master", "del", "admin")
    assert (code, out, err) == (
        0, "removed the master user admin: its logins are refused from the next one on (sessions it opened go on)\n", ""
    )
    assert stored(databaseURL, "admin") is None
    code, out, err = mailgate(databaseURL, "master", "list", "--json")
    assert [json.loads(line)["name"] for line in out.splitlines()] == ["help-desk@example.org"]


def test_refusals(databaseURL):
    assert mailgate(databaseURL, "master", "add", "admin", "--password-stdin", stdin=f"{PASSWORD}\n")[0] == 0
    # There already: exit 73, the first one's password stands.
    assert mailgate(databaseURL, "master", "add", "admin", "--password-stdin", stdin="other\n") == (
        73, "", "mailgate: master user admin already exists\n"
    )
    assert verifyPassword(PASSWORD, stored(databaseURL, "admin").passwordHash)
    # None of that name: exit 67, as user del and user passwd of an
    # unknown user exit.
    assert mailgate(databaseURL, "user", "del", "nobody@example.org")[0] == 67
    assert mailgate(databaseURL, "master", "del", "nobody") == (67, "", "mailgate: no such master user: nobody\n")
    assert mailgate(databaseURL, "master", "passwd", "nobody", "--password-stdin", stdin="pw\n") == (
        67, "", "mailgate: no such master user: nobody\n"
    )
    # Names that are none: 65, with address.masterName's words.
    for bad in ("alice*admin", "admin user", "_admin", "a" * 129, "ädmin", ""):
        code, out, err = mailgate(databaseURL, "master", "add", bad, "--password-stdin", stdin="pw\n")
        assert (code, out) == (65, ""), bad
        assert err == (
            "mailgate: a master user's name is 1 to 128 letters, digits and . _ - @, starting with a letter or digit\n"
        ), bad
        assert mailgate(databaseURL, "master", "del", bad)[0] == 65
    # Passwords refused as user add refuses them.
    assert mailgate(databaseURL, "master", "add", "x", "--password-stdin", stdin="\n") == (
        65, "", "mailgate: empty password\n"
    )
    code, out, err = mailgate(databaseURL, "master", "add", "x", "--password-stdin", stdin="p" * 1025 + "\n")
    assert code == 65 and "at most 1024" in err
    code, out, err = mailgate(databaseURL, "master", "add", "x")
    assert (code, err) == (64, "mailgate: no terminal to ask for a password on; use --password-stdin\n")
    hashedStdin = ("--hashed", "--password-stdin")
    code, out, err = mailgate(databaseURL, "master", "add", "x", *hashedStdin, stdin="{SHA512-CRYPT}$6$x\n")
    assert code == 65 and err.startswith("mailgate: unusable password hash: "), err
    code, out, err = mailgate(databaseURL, "master", "passwd", "admin", *hashedStdin, stdin="nohash\n")
    assert code == 65 and err.startswith("mailgate: unusable password hash: "), err
    assert verifyPassword(PASSWORD, stored(databaseURL, "admin").passwordHash)
    assert [json.loads(line)["name"] for line in mailgate(databaseURL, "master", "list", "--json")[1].splitlines()] == [
        "admin"
    ]


def test_aNameRefusedMakesNoDatabaseFile(tmp_path):
    """
    As user add: what is refused before the database is opened leaves no
    empty SQLite file made under what may be a mistyped --database.
    """
    path = tmp_path / "typo.sqlite3"
    assert mailgate(f"sqlite:///{path}", "master", "add", "a*b", "--password-stdin", stdin="pw\n")[0] == 65
    assert mailgate(f"sqlite:///{path}", "master", "add", "ab", "--password-stdin", stdin="\n")[0] == 65
    assert not path.exists()


def test_aDovecotMasterPassdbsHashIsKeptAndChecked(databaseURL):
    """
    C{--hashed} takes the hash a Dovecot master passdb has (doveadm pw -s
    SHA512-CRYPT), as user add --hashed takes a user's: kept as it is,
    and the right password checks against it, a wrong one does not.
    """
    hashed = sha512Crypt(PASSWORD)
    assert hashed.startswith("{SHA512-CRYPT}$6$")
    # Pasted with spaces around it.
    hashedStdin = ("--hashed", "--password-stdin")
    code, out, err = mailgate(databaseURL, "master", "add", "backup", *hashedStdin, stdin=f"  {hashed} \n")
    assert (code, err) == (0, ""), err
    kept = stored(databaseURL, "backup").passwordHash
    assert kept == hashed and needsUpgrade(kept)
    assert verifyPassword(PASSWORD, kept)
    assert not verifyPassword(NEW_PASSWORD, kept)
    assert hashed not in out

    again = sha512Crypt(NEW_PASSWORD)
    assert mailgate(databaseURL, "master", "passwd", "backup", *hashedStdin, stdin=f"{again}\n")[0] == 0
    kept = stored(databaseURL, "backup").passwordHash
    assert kept == again and verifyPassword(NEW_PASSWORD, kept) and not verifyPassword(PASSWORD, kept)


def test_aMasterUserHeldToNetworks(databaseURL):
    """
    The networks a master user may log in from (Dovecot's allow_nets of
    a master passdb), at add or with master networks, said and listed as
    user networks says and user list lists a user's.
    """
    code, out, err = mailgate(
        databaseURL, "master", "add", "admin", "--password-stdin", "--networks", "192.0.2.7, local,192.0.2.7",
        stdin=f"{PASSWORD}\n",
    )
    assert (code, err) == (0, "")
    assert out == (
        "added the master user admin: it logs in to any user's maildrop where the server allows master "
        "logins (--master-users), from 192.0.2.7/32,local only\n"
    )
    assert stored(databaseURL, "admin").allowedNetworks == "192.0.2.7/32,local"
    assert mailgate(databaseURL, "master", "add", "backup", "--password-stdin", stdin="pw\n")[0] == 0
    assert mailgate(databaseURL, "master", "networks", "backup", "10.1.0.0/16") == (
        0, "the master user backup may log in from 10.1.0.0/16 only: its logins from elsewhere are refused on "
        "every server as a wrong password is\n", "",
    )
    assert mailgate(databaseURL, "master", "networks", "backup", "10.1.0.0/16")[1] == (
        "the master user backup may log in from 10.1.0.0/16 already; nothing changed\n"
    )
    listed = [json.loads(line) for line in mailgate(databaseURL, "master", "list", "--json")[1].splitlines()]
    assert [(m["name"], m["allowed_networks"]) for m in listed] == [
        ("admin", ["192.0.2.7/32", "local"]), ("backup", ["10.1.0.0/16"]),
    ]
    lines = mailgate(databaseURL, "master", "list")[1].splitlines()
    assert re.fullmatch(rf"admin   {TIME}  192\.0\.2\.7/32,local", lines[1]), lines
    assert mailgate(databaseURL, "master", "networks", "admin", "any") == (
        0, "the master user admin may log in from anywhere again (was 192.0.2.7/32,local)\n", "",
    )
    assert stored(databaseURL, "admin").allowedNetworks is None
    # Refused: not a network (64, as user networks), no such master user (67).
    assert mailgate(databaseURL, "master", "networks", "admin", "192.0.2.300") == (
        64, "", "mailgate: NETWORKS: not a network or address: '192.0.2.300' (give CIDR networks or addresses, "
        "local, or any)\n",
    )
    code, out, err = mailgate(
        databaseURL, "master", "add", "x", "--password-stdin", "--networks", "nowhere", stdin="p\n"
    )
    assert (code, out) == (64, "") and stored(databaseURL, "x") is None
    # Nothing given (an unset shell variable) is refused, not read as any.
    assert mailgate(databaseURL, "master", "networks", "backup", "")[0] == 64
    assert stored(databaseURL, "backup").allowedNetworks == "10.1.0.0/16"
    code, out, err = mailgate(databaseURL, "master", "add", "y", "--password-stdin", "--networks", ",", stdin="p\n")
    assert (code, out) == (64, "") and stored(databaseURL, "y") is None, err
    assert mailgate(databaseURL, "master", "networks", "nobody", "any") == (
        67, "", "mailgate: no such master user: nobody\n"
    )


def _storedByHand(url, name):
    """
    A master user stored as C{name} by an administrator's SQL (no command
    stores a name in no normal form), with mailgate's hash of PASSWORD.
    """
    from databasefiles import byHand
    from mailgate.auth.passwords import makeCredentials
    from mailgate.testing import TEST_HASH_COST

    byHand(
        url, "INSERT INTO master_users (name, password_hash, created_at) VALUES (?, ?, 1700000000)",
        name, makeCredentials(PASSWORD, logN=TEST_HASH_COST).passwordHash,
    )


def _names(url):
    return [json.loads(line)["name"] for line in mailgate(url, "master", "list", "--json")[1].splitlines()]


STORED_REMOVED = (
    "removed the master user stored as {!r} (written by hand, in a form no login names it by: no login reached it)\n"
)


def test_aMasterUserStoredByHandInNoNormalFormIsRemovedByTheCommand(databaseURL):
    """
    Rows db check names, written with SQL under a name no login gives
    (C{Helpdesk}, C{bad name}): C{master del} with the name as stored
    removes them where no master user has the name's normal form, and
    says that it removed such a row.  The master users the command added
    stay.
    """
    assert mailgate(databaseURL, "master", "add", "admin", "--password-stdin", stdin=f"{PASSWORD}\n")[0] == 0
    for name in ("Helpdesk", "bad name", " spaced "):
        _storedByHand(databaseURL, name)
    assert _names(databaseURL) == [" spaced ", "Helpdesk", "admin", "bad name"]
    # As logins read it, "Helpdesk" is helpdesk, which is no master user:
    # the row stored so is what NAME reaches.
    for name in ("Helpdesk", "bad name", " spaced "):
        assert mailgate(databaseURL, "master", "del", name) == (0, STORED_REMOVED.format(name), "")
        assert stored(databaseURL, name) is None
    assert _names(databaseURL) == ["admin"]
    # Gone, a name that is none is refused as before (65), one that is a
    # name is no master user (67).
    assert mailgate(databaseURL, "master", "del", "bad name")[0] == 65
    assert mailgate(databaseURL, "master", "del", "Helpdesk") == (67, "", "mailgate: no such master user: helpdesk\n")
    # A name given in capitals still removes the master user it names.
    assert mailgate(databaseURL, "master", "del", "ADMIN")[1].startswith("removed the master user admin: ")
    assert _names(databaseURL) == []
    code, out, err = mailgate(databaseURL, "db", "check")
    assert (code, err) == (0, ""), out


def test_aNameThatNamesTwoMasterUsersIsRefused(databaseURL):
    """
    C{Admin} written by hand beside the master user admin: C{master del
    Admin} could mean either, and is refused (64) saying the two commands;
    C{master del admin} removes the master user, C{--as-stored Admin} the
    row, and nothing else.
    """
    assert mailgate(databaseURL, "master", "add", "admin", "--password-stdin", stdin=f"{PASSWORD}\n")[0] == 0
    _storedByHand(databaseURL, "Admin")
    assert mailgate(databaseURL, "master", "del", "Admin") == (
        64, "", "mailgate: 'Admin' names both the master user admin and a master user stored as 'Admin' (written "
        "by hand): mailgate master del admin removes the first, mailgate master del --as-stored 'Admin' the second\n",
    )
    assert _names(databaseURL) == ["Admin", "admin"]
    # Exactly as stored: not the master user admin, nor a row of another case.
    assert mailgate(databaseURL, "master", "del", "--as-stored", "ADMIN") == (
        67, "", "mailgate: no master user is stored as 'ADMIN'\n"
    )
    assert mailgate(databaseURL, "master", "del", "--as-stored", "Admin") == (0, STORED_REMOVED.format("Admin"), "")
    assert _names(databaseURL) == ["admin"]
    assert verifyPassword(PASSWORD, stored(databaseURL, "admin").passwordHash)
    # --as-stored of a name in its normal form is the master user of it.
    assert mailgate(databaseURL, "master", "del", "--as-stored", "admin") == (
        0, "removed the master user admin: its logins are refused from the next one on (sessions it opened go on)\n",
        "",
    )
    assert _names(databaseURL) == []


def test_theHelpSaysWhatAMasterUserIs():
    code, out, err = runHere(["master", "add", "--help"])
    assert code == 0, err
    text = " ".join(out.split())
    for said in (
        "log in to any user's maildrop", "Dovecot's master users", "--master-users", "--master-user-separator",
        "not a mailbox", "--password-stdin", "--hashed", "exit 73",
    ):
        assert said in text, said
    for action in ("passwd", "networks", "del"):
        code, out, err = runHere(["master", action, "--help"])
        assert code == 0 and "exit 67" in " ".join(out.split()).lower(), out


def test_theAuditLinesNameTheMasterUserAndNeverThePassword(syslog):  # noqa: F811 (the fixture)
    """
    Master users are accounts: their changes go to authpriv, as user
    add's, passwd's and del's do, naming the master user, what was done
    and who did it; never the password nor a hash given.
    """
    hashed = sha512Crypt(PASSWORD)

    def logged(*argv, data=b""):
        done, lines = syslog.logged(*argv, data=data)
        for secret in (PASSWORD, NEW_PASSWORD, hashed, hashed.split("$")[-1]):
            assert secret.encode() not in done.stdout + done.stderr
            assert all(secret not in text for _, text in lines), lines
        return done, lines

    done, lines = logged("master", "add", "Admin", "--password-stdin", data=f"{PASSWORD}\n".encode())
    assert done.returncode == 0, done.stderr
    assertLine(lines, AUTHPRIV_NOTICE, rf"admin master add admin: added{who()}")
    done, lines = logged("master", "passwd", "admin", "--password-stdin", data=f"{NEW_PASSWORD}\n".encode())
    assert done.returncode == 0, done.stderr
    assertLine(lines, AUTHPRIV_NOTICE, rf"admin master passwd admin: password changed{who()}")
    done, lines = logged("master", "add", "backup", "--hashed", "--password-stdin", data=f"{hashed}\n".encode())
    assert done.returncode == 0, done.stderr
    assertLine(lines, AUTHPRIV_NOTICE, rf"admin master add backup: added \(a password hash given\){who()}")
    done, lines = logged("master", "add", "admin", "--password-stdin", data=f"{PASSWORD}\n".encode())
    assert done.returncode == 73
    assertLine(
        lines, AUTHPRIV_WARNING, rf"admin master add admin: failed \(exit 73\): master user admin already exists{who()}"
    )
    done, lines = logged("master", "networks", "backup", "192.0.2.0/24")
    assert done.returncode == 0, done.stderr
    assertLine(
        lines, AUTHPRIV_NOTICE, rf"admin master networks backup 192\.0\.2\.0/24: 192\.0\.2\.0/24 \(was any\){who()}"
    )
    done, lines = logged("master", "del", "admin")
    assert done.returncode == 0, done.stderr
    assertLine(lines, AUTHPRIV_NOTICE, rf"admin master del admin: removed{who()}")
    # Listing changes nothing: no line.
    done, lines = logged("master", "list")
    assert (done.returncode, lines) == (0, [])
