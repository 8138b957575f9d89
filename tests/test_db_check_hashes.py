"""
C{mailgate db check} and password hashes, a user's and a master user's,
through the command (L{e2e.AdminCommand}), on a SQLite file and on PostgreSQL.

The commands store only hashes a login can check (C{user add --hashed},
C{user import}, C{master add --hashed} refuse the others), but one written
by hand or by a tool (an unknown C{{SCHEME}}, one mailgate does not check
such as C{{NTLM}}, a C{$scrypt$} or C{$6$} string cut off, nothing) makes
every login of its user fail, with nothing saying why, and db check called
the database sound.  Now it names each such row with the reason, never the
hash, by the judgement a login uses (L{mailgate.auth.passwords.
hashProblem}): hashes a login verifies, of every scheme, are never named.
"""

import os
import subprocess

import pytest

from databasefiles import byHand as _byHand
from e2e import AdminCommand
from mailgate.auth.foreign import UnusableHash
from mailgate.auth.passwords import hashPassword, importedCredentials, verifyPassword

pytestmark = pytest.mark.usefixtures("cheapCommandHashes")

PASSWORD = "Correct-horse-7"
USERS = "users' password hashes"
MASTERS = "master users' password hashes"
USERS_ADVICE = (
    "password hashes no login can check (written by hand or by a tool): every login of these users by "
    "password (USER/PASS, AUTH PLAIN or LOGIN) fails; give each a new one, mailgate user passwd ADDRESS"
)
MASTERS_ADVICE = (
    "password hashes no login can check (written by hand or by a tool): every login of these master users "
    "fails; give each a new one, mailgate master passwd NAME"
)
DOVEADM = "/usr/bin/doveadm"


def _setHash(url, address, stored):
    _byHand(url, "UPDATE users SET password_hash = ? WHERE address = ?", stored, address)


def _sha512Crypt():
    """
    A {SHA512-CRYPT} hash of L{PASSWORD}: Dovecot's own where it is here.
    """
    if os.path.exists(DOVEADM):
        done = subprocess.run(
            [DOVEADM, "-c", "/dev/null", "pw", "-s", "SHA512-CRYPT", "-p", PASSWORD],
            capture_output=True, text=True, timeout=30, check=True,
        )
        return done.stdout.strip()
    from passlib.hash import sha512_crypt

    return "{SHA512-CRYPT}" + sha512_crypt.hash(PASSWORD)


def _loginChecks(cli, address):
    """
    What a user sees: whether the password is taken (user test checks it
    as a login does).
    """
    return cli("user", "test", address, "--password-stdin", input=f"{PASSWORD}\n")[0] == 0


def _hashLines(out, name):
    return [line for line in out.splitlines() if line.startswith(name)]


def test_aCleanDatabaseOfSeveralSchemesReportsNothing(databaseURL, tmp_path):
    cli = AdminCommand(databaseURL, cwd=tmp_path)
    cram = importedCredentials("{PLAIN}" + PASSWORD, logN=4, cramMD5=True).cramMD5
    stored = {
        "own@example.org": hashPassword(PASSWORD, 4),
        "dovecot@example.org": _sha512Crypt(),
        "plain@example.org": "{PLAIN}" + PASSWORD,
        "cram@example.org": "{CRAM-MD5}" + cram,
        "ssha@example.org": importedCredentials(_sshaOf(PASSWORD)).passwordHash,
        "bare@example.org": importedCredentials(_sha512Crypt().removeprefix("{SHA512-CRYPT}")).passwordHash,
    }
    for address, passwordHash in stored.items():
        assert verifyPassword(PASSWORD, passwordHash), address
        cli.addUser(address, "other")
        _setHash(databaseURL, address, passwordHash)
        assert _loginChecks(cli, address), address
    # No master user: no line about their hashes.
    code, out, err = cli("db", "check")
    assert (code, err) == (0, ""), out
    assert _hashLines(out, USERS) == [f"{USERS}: ok"] and _hashLines(out, MASTERS) == [], out
    cli.check("master", "add", "admin", "--password-stdin", input=f"{PASSWORD}\n")
    cli.check("master", "add", "helpdesk", "--hashed", "--password-stdin", input=f"{_sha512Crypt()}\n")
    code, out, err = cli("db", "check")
    assert (code, err) == (0, ""), out
    assert _hashLines(out, MASTERS) == [f"{MASTERS}: ok"], out


def _sshaOf(password):
    import base64
    import hashlib

    salt = b"8salt8!!"
    return "{SSHA256}" + base64.b64encode(hashlib.sha256(password.encode() + salt).digest() + salt).decode()


def test_usersHashesNoLoginCanCheckAreNamed(databaseURL, tmp_path):
    cli = AdminCommand(databaseURL, cwd=tmp_path)
    own = hashPassword(PASSWORD, 4)
    crypt = _sha512Crypt()
    bad = {
        "a@example.org": "{NTLM}8846f7eaee8fb117ad06bdd830b7586c",
        "b@example.org": "{FOO}" + PASSWORD,
        "c@example.org": crypt[:-20],
        "d@example.org": own[:-10],
        "e@example.org": "",
    }
    for address, passwordHash in bad.items():
        with pytest.raises(UnusableHash):
            importedCredentials(passwordHash or "x")
        cli.addUser(address, PASSWORD)
        _setHash(databaseURL, address, passwordHash)
    cli.addUser("ok@example.org", PASSWORD)
    # What a user sees: the right password refused.
    assert not _loginChecks(cli, "c@example.org")
    code, out, err = cli("db", "check")
    assert code == 65, (out, err)
    lines = out.splitlines()
    at = lines.index(f"{USERS}: {USERS_ADVICE}")
    assert lines[at + 1 : at + 6] == [
        "  a@example.org: scheme NTLM is not one mailgate checks",
        "  b@example.org: unknown scheme FOO",
        "  c@example.org: a malformed SHA512-CRYPT string (cut off?)",
        "  d@example.org: a malformed $scrypt$ string (cut off?)",
        "  e@example.org: no hash at all (an empty value)",
    ]
    assert not lines[at + 6 :] or not lines[at + 6].startswith("  "), lines
    assert err.endswith(f"1 check found problems: {USERS}\n"), err
    # Never the hash, nor the password.
    for text in (PASSWORD, crypt[14:-20], own[20:-10], "8846f7ea"):
        assert text not in out + err
    # Done as the advice says.
    for address in bad:
        cli.check("user", "passwd", address, "--password-stdin", input=f"{PASSWORD}\n")
    code, out, err = cli("db", "check")
    assert (code, err) == (0, "") and _hashLines(out, USERS) == [f"{USERS}: ok"], out


def test_masterUsersHashesNoLoginCanCheckAreNamed(databaseURL, tmp_path):
    cli = AdminCommand(databaseURL, cwd=tmp_path)
    for name in ("admin", "helpdesk", "ops"):
        cli.check("master", "add", name, "--password-stdin", input=f"{PASSWORD}\n")
    _byHand(databaseURL, "UPDATE master_users SET password_hash = ? WHERE name = 'helpdesk'", "{DIGEST-MD5}0a1b")
    _byHand(databaseURL, "UPDATE master_users SET password_hash = ? WHERE name = 'ops'", "$6$salt$cut")
    assert cli("master", "test", "ops", "--password-stdin", input=f"{PASSWORD}\n")[0] == 77
    code, out, err = cli("db", "check")
    assert code == 65, (out, err)
    lines = out.splitlines()
    at = lines.index(f"{MASTERS}: {MASTERS_ADVICE}")
    assert lines[at + 1 :] == [
        "  helpdesk: scheme DIGEST-MD5 is not one mailgate checks",
        "  ops: a crypt(3) string without the {CRYPT} prefix a login reads it by",
    ]
    assert err.endswith(f"1 check found problems: {MASTERS}\n"), err
    for name in ("helpdesk", "ops"):
        cli.check("master", "passwd", name, "--password-stdin", input=f"{PASSWORD}\n")
    code, out, err = cli("db", "check")
    assert (code, err) == (0, "") and _hashLines(out, MASTERS) == [f"{MASTERS}: ok"], out
