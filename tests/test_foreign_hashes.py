"""
Users moved from Dovecot keep their passwords: the hashes Dovecot's
C{doveadm pw} makes (the real one, installed by make test) are imported as
they are, logins are checked against them, and the first successful login
replaces each by mailgate's own scrypt hash and SCRAM-SHA-256 keys.
"""

import base64
import json
import os
import subprocess

import pytest
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin

from dovecotserver import requireDovecot
from e2e import mailgate_cli, mailgate_server  # noqa: F401 (fixtures)
from mailgate.auth import checkers as checkersModule
from mailgate.auth.foreign import UnusableHash
from mailgate.auth.passwords import importedCredentials, makeCredentials, verifyPassword
from mailgate.auth.realm import makePortal
from mailgate.interfaces import IMaildrop
from mailgate.testing import TEST_HASH_COST, memoryStore, resultOf, runInline

ALICE = "alice@example.org"
PASSWORD = "sécret, horse"

#: every scheme of Dovecot's a password can be checked against
SCHEMES = [
    "CRYPT", "MD5-CRYPT", "MD5", "SHA256-CRYPT", "SHA512-CRYPT", "BLF-CRYPT", "DES-CRYPT",
    "ARGON2I", "ARGON2ID", "PBKDF2", "SSHA", "SSHA256", "SSHA512", "SMD5", "SHA", "SHA1", "SHA256",
    "SHA512", "LDAP-MD5", "PLAIN-MD5", "SHA256.HEX", "SSHA512.HEX", "SHA512.B64", "SCRAM-SHA-1",
    "SCRAM-SHA-256", "PLAIN", "CLEAR", "CLEARTEXT", "CRAM-MD5", "HMAC-MD5", "PLAIN.B64", "PLAIN.HEX",
    "CLEAR.B64",
]


#: "secret pw" hashed with yescrypt, as mkpasswd (and /etc/shadow) makes
#: it on Debian 12; Dovecot's CRYPT checks it through crypt(3)
YESCRYPT = "$y$j9T$F5Jx5fExrKuPp53xLKQ..1$WjrDtkbzLac28EL8XpZiOr9KhK9vtHND612NbERaBw0"


def doveadmHash(scheme, password=PASSWORD):
    """
    The hash Dovecot itself makes of C{password} with C{scheme}.
    """
    done = subprocess.run(
        ["doveadm", "-c", "/dev/null", "pw", "-s", scheme, "-p", password],
        capture_output=True, text=True, timeout=30, check=True,
    )
    return done.stdout.strip()


@pytest.fixture
def store(tmp_path):
    s = memoryStore(f"sqlite:///{tmp_path / 'mail.sqlite3'}")
    yield s
    s.close()


def login(store, password, cache=None):
    portal = makePortal(store, runInline, cache=cache)
    _, maildrop, logout = resultOf(
        portal.login(UsernamePassword(ALICE.encode(), password.encode("utf-8")), None, IMaildrop)
    )
    logout()
    return maildrop


@pytest.fixture(autouse=True)
def cheapUpgrades(monkeypatch):
    # The hash that replaces an imported one, at the suite's cheap cost.
    monkeypatch.setattr(checkersModule.PasswordChecker, "hashCost", TEST_HASH_COST)


@requireDovecot
@pytest.mark.parametrize("scheme", SCHEMES)
def test_dovecotsHashesCheckTheRightPasswordOnly(scheme):
    stored = importedCredentials(doveadmHash(scheme), logN=TEST_HASH_COST)
    assert verifyPassword(PASSWORD.encode("utf-8"), stored.passwordHash)
    assert not verifyPassword(b"wrong", stored.passwordHash)
    assert not verifyPassword(PASSWORD.upper().encode("utf-8"), stored.passwordHash)


@requireDovecot
@pytest.mark.parametrize("password", ["", "x", "é" * 32, "a" * 64, "a" * 65, "日本語" * 30])
def test_cramMD5HashesCheckPasswordsOfAnyLength(password):
    """
    Dovecot's {CRAM-MD5} (postfixadmin's dovecot:CRAM-MD5) keeps HMAC-MD5's
    keyed states, not a digest; a key longer than MD5's 64-octet block is
    hashed first.  Users moved with one log in with their password.
    """
    stored = importedCredentials(doveadmHash("CRAM-MD5", password), logN=TEST_HASH_COST)
    assert verifyPassword(password.encode("utf-8"), stored.passwordHash)
    assert not verifyPassword(password.encode("utf-8") + b"a", stored.passwordHash)
    assert not password or not verifyPassword(password.encode("utf-8")[:-1], stored.passwordHash)


@requireDovecot
@pytest.mark.parametrize("scheme", ["PLAIN", "CLEAR", "CLEARTEXT"])
def test_aPasswordInClearIsHashedAsItIsImported(scheme):
    stored = importedCredentials(doveadmHash(scheme), logN=TEST_HASH_COST)
    assert stored.passwordHash.startswith("$scrypt$")
    assert PASSWORD not in repr(stored) and stored.scramSha256 and stored.apopSecret is None


@requireDovecot
def test_dovecotsScramKeysServeScramAtOnce():
    """
    Dovecot's {SCRAM-SHA-256} keys are mailgate's SCRAM keys: the user
    logs in with SCRAM before any plaintext login.
    """
    from mailgate.auth.passwords import parseScramSecret, scramSha256Secret

    stored = importedCredentials(doveadmHash("SCRAM-SHA-256"))
    iterations, salt, storedKey, serverKey = parseScramSecret(stored.scramSha256)
    assert stored.scramSha256 == scramSha256Secret(PASSWORD, iterations, salt)


def _scramWithSalt(salt):
    """
    A Dovecot C{{SCRAM-SHA-256}} value with C{salt}, its keys of the
    right length.
    """
    keys = (base64.b64encode(x).decode("ascii") for x in (salt, b"k" * 32, b"s" * 32))
    return "{SCRAM-SHA-256}4096," + ",".join(keys)


@requireDovecot
@pytest.mark.parametrize(
    "given, reason",
    [
        (lambda: "{DIGEST-MD5}0123456789abcdef0123456789abcdef", "DIGEST-MD5 is not one mailgate checks"),
        (lambda: doveadmHash("PLAIN-MD4"), "PLAIN-MD4 is not one mailgate checks"),
        (lambda: doveadmHash("CRAM-MD5")[:-2], "CRAM-MD5 context of the wrong length"),
        (lambda: "{FOO}bar", "unknown scheme FOO"),
        (lambda: "{SHA256.ROT13}abc", "unknown encoding"),
        (lambda: "{SHA512-CRYPT", "not closed"),
        (lambda: "secret", "no {SCHEME} prefix"),
        (lambda: YESCRYPT[:-3], "yescrypt .* or cut off"),
        (lambda: "$y$j9T$", "yescrypt .* or cut off"),
        (lambda: doveadmHash("SHA512-CRYPT")[:40], "malformed"),
        (lambda: doveadmHash("BLF-CRYPT")[:40], "malformed"),
        (lambda: "{ARGON2ID}$argon2id$v=19$m=65536", "malformed"),
        (lambda: "{SHA256}" + doveadmHash("SHA")[5:], "wrong length"),
        (lambda: "{SSHA}c2hvcnQ=", "without its salt"),
        (lambda: "{SHA}not base64!", "not valid hex or base64"),
        (lambda: "{PBKDF2}$1$salt$many$00", "not a PBKDF2 value"),
        (lambda: "{SCRAM-SHA-256}4096,abc", "not a SCRAM-SHA-256 value"),
        (lambda: _scramWithSalt(b"s" * 1025), "not a SCRAM-SHA-256 value"),
        (lambda: "{PLAIN}", "empty password"),
    ],
)
def test_hashesNoPasswordCanBeCheckedAgainstAreRefusedWithAReason(given, reason):
    with pytest.raises(UnusableHash, match=reason.replace("{", r"\{")):
        importedCredentials(given())


@requireDovecot
def test_theFirstLoginReplacesAnImportedHashByMailgatesOwn(store):
    """
    The user logs in with the password Dovecot knew; the stored hash is
    then mailgate's own scrypt hash, with SCRAM keys, and the password
    goes on working, remembered or not, while others fail.
    """
    imported = importedCredentials(doveadmHash("SHA512-CRYPT"))
    resultOf(store.addUser(ALICE, imported))
    assert resultOf(store.findUser(ALICE)).scramSha256 is None
    with pytest.raises(UnauthorizedLogin):
        login(store, "wrong")
    assert resultOf(store.findUser(ALICE)).passwordHash == imported.passwordHash
    login(store, PASSWORD)
    user = resultOf(store.findUser(ALICE))
    assert user.passwordHash.startswith("$scrypt$") and user.scramSha256.startswith("SCRAM-SHA-256$")
    assert verifyPassword(PASSWORD.encode("utf-8"), user.passwordHash)
    login(store, PASSWORD)
    with pytest.raises(UnauthorizedLogin):
        login(store, "wrong")


@requireDovecot
def test_aWrongPasswordForAnImportedHashCostsAnUnknownUsersVerification(store, monkeypatch):
    """
    SHA512-CRYPT is faster than scrypt: a wrong password also pays for a
    scrypt verification, as an unknown user does, so timing does not tell
    migrated users from unknown ones.
    """
    resultOf(store.addUser(ALICE, importedCredentials(doveadmHash("SHA512-CRYPT"))))
    checked = []
    real = checkersModule.verifyPassword
    monkeypatch.setattr(checkersModule, "verifyPassword", lambda p, h: checked.append(h[:8]) or real(p, h))
    with pytest.raises(UnauthorizedLogin):
        login(store, "wrong")
    assert checked == ["{SHA512-", "$scrypt$"]


@pytest.mark.parametrize("databaseURL", ["sqlite", "postgres"], indirect=True)
def test_anUpgradeDoesNotPutBackAPasswordChangedMeanwhile(databaseURL):
    """
    The replacement is made only over the hash the password was checked
    against: a password the administrator changed meanwhile stays.
    """
    store = memoryStore(databaseURL)
    try:
        imported = importedCredentials("{SHA256}" + "A" * 43 + "=")
        resultOf(store.addUser(ALICE, imported))
        changed = makeCredentials("new one", logN=TEST_HASH_COST)
        resultOf(store.setCredentials(ALICE, changed))
        upgrade = makeCredentials("old one", logN=TEST_HASH_COST)
        assert resultOf(store.upgradeCredentials(ALICE, imported.passwordHash, upgrade)) is False
        assert resultOf(store.findUser(ALICE)).passwordHash == changed.passwordHash
        assert resultOf(store.upgradeCredentials(ALICE, changed.passwordHash, upgrade)) is True
        assert resultOf(store.findUser(ALICE)).passwordHash == upgrade.passwordHash
        assert resultOf(store.upgradeCredentials("nobody@example.org", "x", upgrade)) is False
    finally:
        store.close()


# -- the mailgate command and a running server ---------------------------------------


#: A refused login is answered after this delay (the server's default is
#: 1 s): short, as these tests are refused several logins each and assert
#: what the refusal says, not when.
FAST_FAILURES = ("--auth-failure-delay", "0.1")


def scramLogin(port, address, password):
    """
    AUTH SCRAM-SHA-256 over a real connection: the final +OK or -ERR line.
    """
    import base64
    import poplib

    from saslclients import ScramClient

    def b64(data):
        return base64.b64encode(data).decode("ascii")

    pop = poplib.POP3("127.0.0.1", port, timeout=20)
    try:
        client = ScramClient(address, password)
        serverFirst = base64.b64decode(pop._shortcmd(f"AUTH SCRAM-SHA-256 {b64(client.first())}")[2:])
        try:
            reply = pop._shortcmd(b64(client.final(serverFirst)))
        except poplib.error_proto as e:
            return e.args[0].decode("utf-8")
        assert client.verify(base64.b64decode(reply[2:]))
        return pop._shortcmd("").decode("utf-8")
    finally:
        pop.close()


def passwordLogin(port, address, password):
    import poplib

    pop = poplib.POP3("127.0.0.1", port, timeout=20)
    try:
        pop.user(address)
        try:
            return pop.pass_(password).decode("utf-8")
        except poplib.error_proto as e:
            return e.args[0].decode("utf-8")
    finally:
        pop.close()


@requireDovecot
def test_movingUsersFromADovecotPasswdFile(mailgate_server, mailgate_cli, tmp_path):
    """
    An administrator moves the users of a Dovecot passwd-file with
    C{mailgate user import}: each logs in to a running server with the
    password they had; SCRAM works once they have (at once for Dovecot's
    own SCRAM keys); lines that cannot be imported are named with the
    reason, and no hash is ever printed.
    """
    server = mailgate_server("--no-apop", *FAST_FAILURES)
    mailgate_cli.addUser("erin@example.org", "erin's own")
    hashes = {
        "alice": doveadmHash("SHA512-CRYPT", "alice's"),
        "bob@example.org": doveadmHash("BLF-CRYPT", "bob's"),
        "carol": doveadmHash("SCRAM-SHA-256", "carol's"),
        "dave": "{DIGEST-MD5}0123456789abcdef0123456789abcdef",
        "erin": doveadmHash("SSHA512", "not erin's"),
        "fay": doveadmHash("CRAM-MD5", "fay's"),
    }
    lines = ["# moved from mail1", ""]
    lines += [f"{name}:{value}:1000:1000::/home/{name}::userdb_quota_rule=*:storage=1G" for name, value in hashes.items()]
    passwd = tmp_path / "users.passwd"
    passwd.write_text("\n".join(lines) + "\n")
    code, out, err = mailgate_cli("user", "import", str(passwd), "--domain", "Example.ORG")
    assert code == 65, (code, out, err)
    assert out.splitlines() == [
        "added alice@example.org",
        "added bob@example.org",
        "added carol@example.org",
        "exists erin@example.org",
        "added fay@example.org (CRAM-MD5 enabled)",
        "4 added, 1 already there, 1 failed",
    ]
    assert f"{passwd} line 6: dave@example.org: unusable password hash: scheme DIGEST-MD5" in err
    for value in hashes.values():
        assert value.partition("}")[2][:12] not in out + err

    assert scramLogin(server.port, "alice@example.org", "alice's").startswith("-ERR")
    assert passwordLogin(server.port, "alice@example.org", "wrong").startswith("-ERR [AUTH]")
    assert passwordLogin(server.port, "alice@example.org", "alice's").startswith("+OK")
    assert scramLogin(server.port, "alice@example.org", "alice's").startswith("+OK")
    assert passwordLogin(server.port, "bob@example.org", "bob's").startswith("+OK")
    assert scramLogin(server.port, "carol@example.org", "carol's").startswith("+OK")
    assert passwordLogin(server.port, "erin@example.org", "erin's own").startswith("+OK")
    assert passwordLogin(server.port, "fay@example.org", "fays").startswith("-ERR [AUTH]")
    assert passwordLogin(server.port, "fay@example.org", "fay's").startswith("+OK")

    # Who still has the hash brought from Dovecot: those who have not
    # logged in with their password (carol used SCRAM only).
    listed = [json.loads(line) for line in mailgate_cli.check("user", "list", "--json").splitlines()]
    assert {r["address"]: r["password"] for r in listed} == {
        "alice@example.org": "mailgate",
        "bob@example.org": "mailgate",
        "carol@example.org": "imported",
        "erin@example.org": "mailgate",
        "fay@example.org": "mailgate",
    }

    # Run again: nothing is added twice, and nobody's password goes back.
    code, out, _ = mailgate_cli("user", "import", str(passwd), "--domain", "example.org")
    assert code == 65 and out.splitlines()[-1] == "0 added, 5 already there, 1 failed"
    assert passwordLogin(server.port, "alice@example.org", "alice's").startswith("+OK")


@requireDovecot
def test_addingAndChangingAUserWithAHash(mailgate_server, mailgate_cli):
    server = mailgate_server("--no-apop", *FAST_FAILURES)
    hashed = doveadmHash("ARGON2ID", "frank's")
    mailgate_cli.check("user", "add", "frank@example.org", "--password-stdin", "--hashed", input=hashed + "\n")
    assert passwordLogin(server.port, "frank@example.org", "frank's").startswith("+OK")
    mailgate_cli.check(
        "user", "passwd", "frank@example.org", "--password-stdin", "--hashed",
        input=doveadmHash("SHA256-CRYPT", "new") + "\n",
    )
    assert passwordLogin(server.port, "frank@example.org", "frank's").startswith("-ERR")
    assert passwordLogin(server.port, "frank@example.org", "new").startswith("+OK")
    code, out, err = mailgate_cli(
        "user", "add", "gina@example.org", "--password-stdin", "--hashed", input="{CRAM-MD5}00ff\n"
    )
    assert (code, out) == (65, "") and "unusable password hash: a CRAM-MD5 context of the wrong length" in err
    code, _, err = mailgate_cli(
        "user", "add", "gina@example.org", "--password-stdin", "--hashed", "--apop", input=hashed + "\n"
    )
    assert code == 64 and "APOP needs the password itself" in err


class _RacingNode:
    """
    A store on which another node's login replaces the imported hash
    just before this one's replacement is written.
    """

    def __init__(self, store, password):
        self._store = store
        self._password = password

    def __getattr__(self, name):
        return getattr(self._store, name)

    def upgradeCredentials(self, address, oldHash, credentials, hashOnly=False):
        theirs = makeCredentials(self._password, logN=TEST_HASH_COST)
        assert resultOf(self._store.upgradeCredentials(address, oldHash, theirs, hashOnly)) is True
        return self._store.upgradeCredentials(address, oldHash, credentials, hashOnly)


@requireDovecot
def test_twoNodesReplacingTheSameImportedHashBothLogIn(store):
    """
    Two nodes check the same first login at once (two clients of one
    user): the second finds the hash replaced by the first, and its login
    goes on, with the first node's hash, rather than failing.
    """
    resultOf(store.addUser(ALICE, importedCredentials(doveadmHash("SHA512-CRYPT"))))
    maildrop = login(_RacingNode(store, PASSWORD), PASSWORD)
    assert maildrop.address == ALICE
    assert resultOf(store.findUser(ALICE)).passwordHash.startswith("$scrypt$")


def test_quotasComeAlongFromThePasswdFilesExtraFields(tmp_path):
    """
    A passwd-file's per-user quota (userdb_quota_rule, Dovecot's own
    units: storage in kilobytes unless a unit is given, bytes, messages;
    0 and ignore for no limit) becomes the user's quota; a rule for one
    folder is not one a POP3 maildrop has, and a percentage cannot be
    kept: that line is refused with the reason.
    """
    import io
    import json

    from mailgate.cli import run

    passwd = tmp_path / "users"
    rest = ":1000:1000::/home/x::"
    passwd.write_text("\n".join([
        "alice:{PLAIN}a" + rest + "userdb_quota_rule=*:storage=1048576 userdb_mail=maildir:~/Maildir",
        "bob:{PLAIN}b" + rest + "quota_rule=*:bytes=5000:messages=100",
        "carol:{PLAIN}c" + rest + "userdb_quota_rule=*:storage=2G",
        "dave:{PLAIN}d" + rest + "userdb_quota_rule=*:storage=10%",
        "erin:{PLAIN}e" + rest + "userdb_quota_rule=*:ignore",
        "frank:{PLAIN}f" + rest + "userdb_quota_rule=Trash:storage=+100M",
        "gina:{PLAIN}g" + rest + "userdb_quota_rule=*:storage=0",
        "hank:{PLAIN}h" + rest + "userdb_quota_rule=*:storage=100MB:messages=10k",
        "ivy:{PLAIN}i" + rest + "userdb_quota_rule=*:bytes=2GiB",
    ]) + "\n")
    url = f"sqlite:///{tmp_path / 'mail.sqlite3'}"

    def cli(*argv):
        out, err = io.StringIO(), io.StringIO()
        code = run(["--database", url, *argv], stdin=io.StringIO(""), stdout=out, stderr=err, environ={})
        return code, out.getvalue(), err.getvalue()

    code, out, err = cli("user", "import", str(passwd), "--domain", "example.org")
    assert code == 65 and out.splitlines()[-1] == "8 added, 0 already there, 1 failed", (out, err)
    assert "line 4: dave@example.org: quota rule '*:storage=10%' is not one mailgate can keep" in err
    code, out, _ = cli("user", "list", "--json")
    quotas = {r["address"].split("@")[0]: (r["quota_octets"], r["quota_messages"]) for r in map(json.loads, out.splitlines())}
    assert quotas == {
        "alice": (1 << 30, "default"),
        "bob": (5000, 100),
        "carol": (2 << 30, "default"),
        "erin": ("none", "none"),
        "frank": ("default", "default"),
        "gina": ("none", "default"),
        # As Dovecot reads them: a unit by its first letter, for messages too.
        "hank": (100 << 20, 10240),
        "ivy": (2 << 30, "default"),
    }


@requireDovecot
def test_checkingAPasswordAsDoveadmAuthTestDoes(tmp_path):
    """
    mailgate user test: 0 and which hash it was checked against for the
    right password, 77 for a wrong one, 67 for no such user; nothing is
    changed, not even the imported hash.
    """
    import io

    from mailgate.cli import run

    url = f"sqlite:///{tmp_path / 'mail.sqlite3'}"

    def cli(*argv, stdin=""):
        out, err = io.StringIO(), io.StringIO()
        code = run(["--database", url, *argv], stdin=io.StringIO(stdin), stdout=out, stderr=err, environ={})
        return code, out.getvalue(), err.getvalue()

    hashed = doveadmHash("SHA512-CRYPT")
    assert cli("user", "add", ALICE, "--password-stdin", "--hashed", stdin=hashed + "\n")[0] == 0
    code, out, err = cli("user", "test", ALICE, "--password-stdin", stdin=PASSWORD + "\n")
    assert (code, err) == (0, "")
    assert out == f"the password of {ALICE} is correct (kept as the hash imported from another server)\n"
    code, out, err = cli("user", "test", ALICE, "--password-stdin", stdin="wrong\n")
    assert (code, out) == (77, "") and f"that is not the password of {ALICE}" in err
    assert cli("user", "test", "nobody@example.org", "--password-stdin", stdin="x\n")[0] == 67
    store = memoryStore(url)
    try:
        assert resultOf(store.findUser(ALICE)).passwordHash == hashed
    finally:
        store.close()
    assert cli("user", "passwd", ALICE, "--password-stdin", stdin="new one\n")[0] == 0
    code, out, _ = cli("user", "test", ALICE, "--password-stdin", stdin="new one\n")
    assert (code, out) == (0, f"the password of {ALICE} is correct (kept as mailgate's own hash)\n")


@requireDovecot
def test_aPasswdFileAsAdministratorsWriteIt(tmp_path):
    """
    A passwd-file edited by hand: CRLF line ends, comments and blank
    lines, names with and without their domain, a scheme in lower case,
    extra fields, a userdb-only line without a password, a user on two
    lines, and a disabled account.  Dovecot keeps a user's first line and
    logs the others as errors; so does the import, saying which line was
    kept, instead of counting the second as a user already there.  An
    account with nologin, whose logins Dovecot refused, is imported
    disabled, not to log in here either, with the reason Dovecot gave
    (its extra fields split at spaces: Account and the backslash).
    """
    import io

    from mailgate.cli import run
    from mailgate.store import openSynchronousStore

    rest = ":1000:1000::/home/x::"
    passwd = tmp_path / "users"
    passwd.write_bytes("\r\n".join([
        "# users of mail1",
        "",
        "alice:" + doveadmHash("SHA512-CRYPT", "alice's") + rest + "userdb_mail=maildir:~/Maildir nodelay",
        "bob@example.org:{ssha512}" + doveadmHash("SSHA512", "bob's").partition("}")[2] + ":::",
        "   # indented comment",
        "carol::1000:1000::/home/carol::",
        "alice@example.org:" + doveadmHash("SHA512-CRYPT", "another") + rest,
        "Bob@Example.org:{PLAIN}another" + rest,
        "dave:{PLAIN}dave's" + rest + "nologin reason=Account\\ disabled",
    ]).encode("utf-8") + b"\r\n")
    url = f"sqlite:///{tmp_path / 'mail.sqlite3'}"
    out, err = io.StringIO(), io.StringIO()
    code = run(
        ["--database", url, "user", "import", str(passwd), "--domain", "example.org"],
        stdin=io.StringIO(""), stdout=out, stderr=err, environ={},
    )
    assert code == 65, (out.getvalue(), err.getvalue())
    assert out.getvalue().splitlines() == [
        "added alice@example.org", "added bob@example.org",
        "added dave@example.org (disabled, as Dovecot's nologin had it: Account\\)",
        "3 added, 0 already there, 3 failed",
    ]
    assert err.getvalue().splitlines() == [
        f"mailgate: {passwd} line 6: carol@example.org has no password",
        f"mailgate: {passwd} line 7: alice@example.org is on line 3 already (that line is the one kept)",
        f"mailgate: {passwd} line 8: bob@example.org is on line 4 already (that line is the one kept)",
        f"mailgate: 3 lines of {passwd} not imported",
    ]
    store = openSynchronousStore(url)
    try:
        alice = resultOf(store.findUser(ALICE))
        bob = resultOf(store.findUser("bob@example.org"))
    finally:
        store.close()
    assert verifyPassword(b"alice's", alice.passwordHash) and not verifyPassword(b"another", alice.passwordHash)
    assert verifyPassword(b"bob's", bob.passwordHash) and not verifyPassword(b"another", bob.passwordHash)


@requireDovecot
def test_anAccountWhosePassdbLookupFailsOnPurposeIsImportedDisabled(tmp_path):
    """
    Dovecot refuses the logins of an account whose passdb line has the
    extra field fail (fail=y: disabled, as with nologin): the import
    adds it disabled (mailgate user disable), its mail to move with it,
    as it does nologin's.  Once, it was imported able to log in here;
    then reported and left out (exit 65), with its mail.
    An account Dovecot lets in from some networks only (allow_nets) is
    imported with those networks (mailgate user networks; before, saying
    that here it logs in from anywhere).
    """
    import io

    from dovecotserver import PrivateDovecot

    from mailgate.cli import run
    from mailgate.store import openSynchronousStore

    bob = "bob@example.org"
    carol = "carol@example.org"
    server = PrivateDovecot(passdbFields={bob: "fail=y", carol: "allow_nets=10.0.0.0/8,192.0.2.0/24"})
    try:
        server.addUsers([ALICE, bob, carol], PASSWORD)
        server.start()
        server.pop3(ALICE, PASSWORD).quit()
        for refused in (bob, carol):
            with pytest.raises(Exception, match="Authentication failed"):
                server.pop3(refused, PASSWORD)
        passwd = os.path.join(server.directory, "passwd")
        url = f"sqlite:///{tmp_path / 'mail.sqlite3'}"
        out, err = io.StringIO(), io.StringIO()
        code = run(
            ["--database", url, "user", "import", passwd],
            stdin=io.StringIO(""), stdout=out, stderr=err, environ={},
        )
    finally:
        server.cleanup()
    assert code == 0, (out.getvalue(), err.getvalue())
    assert out.getvalue().splitlines() == [
        f"added {ALICE}", f"added {bob} (disabled, as Dovecot's fail had it)",
        f"added {carol} (from 10.0.0.0/8,192.0.2.0/24 only, as Dovecot's allow_nets had it)",
        "3 added, 0 already there, 0 failed",
    ]
    assert err.getvalue() == ""
    store = openSynchronousStore(url)
    try:
        assert [u.address for u in resultOf(store.listUsers()) if u.disabledAt is not None] == [bob]
    finally:
        store.close()


def apopLogin(port, address, password):
    import poplib

    pop = poplib.POP3("127.0.0.1", port, timeout=20)
    try:
        try:
            return pop.apop(address, password).decode("utf-8")
        except poplib.error_proto as e:
            return e.args[0] if isinstance(e.args[0], str) else e.args[0].decode("utf-8")
    finally:
        pop.close()


def cramLogin(port, address, password):
    """
    AUTH CRAM-MD5 (RFC 2195) over a real connection: the final line.
    """
    import base64
    import hmac
    import poplib

    pop = poplib.POP3("127.0.0.1", port, timeout=20)
    try:
        challenge = pop._shortcmd("AUTH CRAM-MD5").decode("ascii")
        assert challenge.startswith("+ "), challenge
        digest = hmac.new(password.encode("utf-8"), base64.b64decode(challenge[2:]), "md5").hexdigest()
        try:
            return pop._shortcmd(base64.b64encode(f"{address} {digest}".encode()).decode()).decode("utf-8")
        except poplib.error_proto as e:
            return e.args[0].decode("utf-8")
    finally:
        pop.close()


@requireDovecot
def test_usersWithPasswordsInClearKeepAPOPWhenAskedTo(mailgate_server, mailgate_cli, tmp_path):
    """
    A Dovecot that keeps passwords in clear ({PLAIN}) serves APOP and
    CRAM-MD5, and its users' clients may be set up for them; user import
    --apop keeps those passwords recoverable, so they go on logging in
    that way.  A hash gives no password to keep: that user has no APOP,
    and the import says who has it.
    """
    server = mailgate_server("--apop", *FAST_FAILURES)
    passwd = tmp_path / "users"
    passwd.write_text(
        "alice:{PLAIN}alice's:::\n"
        f"bob:{doveadmHash('SHA512-CRYPT', 'bob s')}:::\n"
    )
    code, out, err = mailgate_cli("user", "import", str(passwd), "--domain", "example.org", "--apop")
    assert (code, err) == (0, ""), (out, err)
    assert out.splitlines() == [
        "added alice@example.org (APOP enabled)", "added bob@example.org", "2 added, 0 already there, 0 failed",
    ]
    assert apopLogin(server.port, "alice@example.org", "alice's").startswith("+OK")
    assert cramLogin(server.port, "alice@example.org", "alice's").startswith("+OK")
    assert apopLogin(server.port, "alice@example.org", "wrong").startswith("-ERR")
    assert apopLogin(server.port, "bob@example.org", "bob s").startswith("-ERR")
    assert passwordLogin(server.port, "bob@example.org", "bob s").startswith("+OK")
    # Bob's first login replaced his hash; he still has no APOP.
    assert apopLogin(server.port, "bob@example.org", "bob s").startswith("-ERR")


@pytest.mark.parametrize("given, password", [
    ("  {PLAIN}pass word \n", b"pass word "),
    (" {SSHA}" + "tpC6Kxm5mNYI0+ZgiMbnVGFBYD5zYWx0" + "  \n", None),
])
def test_aHashGivenToHashedKeepsTheSpacesOfAPasswordInClear(tmp_path, given, password):
    """
    user add --hashed takes a pasted hash without the spaces around it,
    except those ending a password in clear, which are the password's
    (Dovecot's {PLAIN}pass word  is 'pass word ').
    """
    import io

    from mailgate.cli import run
    from mailgate.store import openSynchronousStore

    url = f"sqlite:///{tmp_path / 'mail.sqlite3'}"
    code = run(
        ["--database", url, "user", "add", ALICE, "--hashed", "--password-stdin"],
        stdin=io.StringIO(given), stdout=io.StringIO(), stderr=io.StringIO(), environ={},
    )
    assert code == 0
    store = openSynchronousStore(url)
    try:
        stored = resultOf(store.findUser(ALICE)).passwordHash
    finally:
        store.close()
    if password is None:
        assert stored == given.strip()
    else:
        assert verifyPassword(password, stored) and not verifyPassword(password.strip(), stored)


def _md5(text):
    import hashlib

    return hashlib.md5(text.encode("utf-8")).digest()


def _b64(data):
    import base64

    return base64.b64encode(data).decode("ascii")


@requireDovecot
@pytest.mark.parametrize("written", [
    lambda: "{MD5}" + _b64(_md5(PASSWORD)),
    lambda: "{MD5}" + _md5(PASSWORD).hex(),
    lambda: "{md5}" + _b64(_md5(PASSWORD)),
    lambda: "{PLAIN-MD5}" + _b64(_md5(PASSWORD)),
    lambda: "{LDAP-MD5}" + _md5(PASSWORD).hex(),
])
def test_md5DigestsAsLDAPAndSQLPassdbsWriteThem(written):
    """
    LDAP's {MD5} (slappasswd, and SQL passdbs that copied it) is an MD5
    digest in base64 or hex, which Dovecot's MD5 scheme takes when the
    value is not an MD5-CRYPT string; and PLAIN-MD5 and LDAP-MD5 each
    take the other's encoding.  Dovecot itself (doveadm pw -t) checks
    each hash here against the password, and so does mailgate.
    """
    hashed = written()
    checked = subprocess.run(
        ["doveadm", "-c", "/dev/null", "pw", "-t", hashed, "-p", PASSWORD],
        capture_output=True, text=True, timeout=30,
    )
    assert checked.returncode == 0, checked.stderr
    stored = importedCredentials(hashed, logN=TEST_HASH_COST)
    assert verifyPassword(PASSWORD.encode("utf-8"), stored.passwordHash)
    assert not verifyPassword(b"wrong", stored.passwordHash)


class _UnconfirmedCommit:
    """
    A store whose replacement of the imported hash is committed, but whose
    connection is lost before the commit is confirmed (a database restart
    or failover at that moment): the login is told CommitUncertain.
    """

    def __init__(self, store):
        self._store = store

    def __getattr__(self, name):
        return getattr(self._store, name)

    def upgradeCredentials(self, address, oldHash, credentials, hashOnly=False):
        from twisted.internet import defer

        from mailgate.errors import CommitUncertain

        assert resultOf(self._store.upgradeCredentials(address, oldHash, credentials, hashOnly)) is True
        return defer.fail(CommitUncertain("database connection lost while committing"))


@requireDovecot
def test_aReplacementWhoseCommitWentUnconfirmedStillLogsIn(store):
    """
    The first login's replacement of the imported hash took effect, but
    the store could not confirm it: the login goes on with the hash now
    stored, rather than failing as a wrong password (the maildrop's check
    of the hash it was verified against would have refused the old one).
    """
    resultOf(store.addUser(ALICE, importedCredentials(doveadmHash("SHA512-CRYPT"))))
    maildrop = login(_UnconfirmedCommit(store), PASSWORD)
    assert maildrop.address == ALICE
    assert resultOf(store.findUser(ALICE)).passwordHash.startswith("$scrypt$")
    assert login(store, PASSWORD).address == ALICE


def test_aPasswdFileWithLatin1InItsGecosFields(tmp_path):
    """
    An old passwd-file whose gecos fields were copied in Latin-1 from
    /etc/passwd: mailgate reads nothing from them, so its users are
    imported; only a line whose user name or hash is not UTF-8 is refused,
    with its number, instead of the whole file.  A byte order mark before
    the first user is not part of their name.
    """
    import io

    from mailgate.cli import run

    passwd = tmp_path / "users"
    passwd.write_bytes(
        # Saved by an editor that starts the file with a byte order mark.
        b"\xef\xbb\xbfalice:{PLAIN}alice's:1000:1000:J\xfcrgen M\xfcller:/home/alice::\n"
        b"b\xf6b:{PLAIN}bob's:1001:1001::/home/bob::\n"
    )
    out, err = io.StringIO(), io.StringIO()
    url = f"sqlite:///{tmp_path / 'mail.sqlite3'}"
    code = run(
        ["--database", url, "user", "import", str(passwd), "--domain", "example.org"],
        stdin=io.StringIO(""), stdout=out, stderr=err, environ={},
    )
    assert code == 65
    assert out.getvalue().splitlines() == ["added alice@example.org", "1 added, 0 already there, 1 failed"]
    assert f"{passwd} line 2: the user name or password hash is not UTF-8 text" in err.getvalue()


@requireDovecot
def test_aRefreshTakesPasswordsChangedOnTheOldServerMeanwhile(tmp_path):
    """
    A move takes days; users change their passwords on Dovecot meanwhile.
    user import --refresh, run again on the new passwd-file, replaces the
    hashes of the users who have not logged in to mailgate yet (their
    password is still the one imported); one who has keeps the password
    mailgate has.
    """
    import io

    from mailgate.cli import run
    from mailgate.store import openSynchronousStore

    url = f"sqlite:///{tmp_path / 'mail.sqlite3'}"
    passwd = tmp_path / "users"

    def userImport(*options):
        out, err = io.StringIO(), io.StringIO()
        code = run(
            ["--database", url, "user", "import", str(passwd), "--domain", "example.org", *options],
            stdin=io.StringIO(""), stdout=out, stderr=err, environ={},
        )
        assert (code, err.getvalue()) == (0, "")
        return out.getvalue().splitlines()

    passwd.write_text(
        f"alice:{doveadmHash('SHA512-CRYPT', 'old')}:::\nbob:{doveadmHash('SHA512-CRYPT', 'bob old')}:::\n"
    )
    userImport()
    store = openSynchronousStore(url)
    try:
        portal = makePortal(store, runInline)
        _, _, logout = resultOf(portal.login(UsernamePassword(b"bob@example.org", b"bob old"), None, IMaildrop))
        logout()
    finally:
        store.close()
    passwd.write_text(
        f"alice:{doveadmHash('SHA512-CRYPT', 'new')}:::\nbob:{doveadmHash('SHA512-CRYPT', 'bob new')}:::\n"
        f"carol:{doveadmHash('SHA512-CRYPT', 'carol')}:::\n"
    )
    assert userImport() == [
        "exists alice@example.org (its imported password is not the file's: --refresh)",
        "exists bob@example.org", "added carol@example.org", "1 added, 2 already there, 0 failed",
    ]
    assert userImport("--refresh") == [
        "updated alice@example.org", "exists bob@example.org", "exists carol@example.org",
        "0 added, 1 updated, 2 already there, 0 failed",
    ]
    store = openSynchronousStore(url)
    try:
        alice = resultOf(store.findUser(ALICE)).passwordHash
        bob = resultOf(store.findUser("bob@example.org")).passwordHash
    finally:
        store.close()
    assert verifyPassword(b"new", alice) and not verifyPassword(b"old", alice)
    assert verifyPassword(b"bob old", bob) and not verifyPassword(b"bob new", bob)


class _UpgradeFailsOnce:
    """
    A store that cannot take the first replacement of an imported hash
    (the database briefly unavailable), and takes the next.
    """

    def __init__(self, store):
        self._store = store
        self.refused = 0

    def __getattr__(self, name):
        return getattr(self._store, name)

    def upgradeCredentials(self, address, oldHash, credentials, hashOnly=False):
        from twisted.internet import defer

        from mailgate.errors import TemporaryFailure

        if not self.refused:
            self.refused += 1
            return defer.fail(TemporaryFailure("database unavailable"))
        return self._store.upgradeCredentials(address, oldHash, credentials, hashOnly)


@requireDovecot
def test_anUpgradeThatFailedIsTriedAgainAtTheNextLogin(store, logEvents):
    """
    The first login's replacement of the imported hash fails: that login
    goes on, and the next one (through the same checker, whose cache
    remembers recent logins) replaces it.  Each is logged, by the events
    README names, with the user and never the password.
    """
    from mailgate.auth.cache import VerifiedCredentialCache
    from twisted.logger import formatEvent

    resultOf(store.addUser(ALICE, importedCredentials(doveadmHash("SHA512-CRYPT"))))
    flaky = _UpgradeFailsOnce(store)
    cache = VerifiedCredentialCache()
    assert login(flaky, PASSWORD, cache=cache).address == ALICE
    assert flaky.refused == 1
    assert resultOf(store.findUser(ALICE)).passwordHash.startswith("{SHA512-CRYPT}")
    assert login(flaky, PASSWORD, cache=cache).address == ALICE
    assert resultOf(store.findUser(ALICE)).passwordHash.startswith("$scrypt$")
    logged = [e for e in logEvents if str(e.get("event", "")).startswith("auth.")]
    assert [e["event"] for e in logged] == ["auth.upgrade_failed", "auth.hash_upgraded"]
    assert all(e["user"] == ALICE and PASSWORD not in formatEvent(e) for e in logged)


@requireDovecot
@pytest.mark.parametrize("written", [YESCRYPT, "{CRYPT}" + YESCRYPT, "{crypt}" + YESCRYPT])
def test_yescryptAsMkpasswdWritesItOnDebian(written):
    """
    yescrypt, mkpasswd's and /etc/shadow's default on Debian 11 and later
    (and Ubuntu and Fedora): Dovecot's CRYPT scheme checks it through the
    system's crypt(3) (doveadm pw -t, here), and so does mailgate.
    """
    checked = subprocess.run(
        ["doveadm", "-c", "/dev/null", "pw", "-t", "{CRYPT}" + YESCRYPT, "-p", "secret pw"],
        capture_output=True, text=True, timeout=30,
    )
    assert checked.returncode == 0, checked.stderr
    stored = importedCredentials(written, logN=TEST_HASH_COST)
    assert verifyPassword(b"secret pw", stored.passwordHash)
    assert not verifyPassword(b"secret pW", stored.passwordHash)
    assert not verifyPassword(b"", stored.passwordHash)


@requireDovecot
def test_passwordsWithoutASchemePrefixTakeTheSchemeGiven(tmp_path):
    """
    A passwd-file passdb with args = scheme=PLAIN holds passwords in clear
    without a {PLAIN} prefix (and scheme=SHA256 bare digests): --scheme
    reads them so, as Dovecot does (without it, as without the passdb's
    scheme=, they would be taken for crypt(3) strings, this 13-character
    one for DES); a prefixed hash keeps its own scheme.
    """
    import io

    from mailgate.cli import run
    from mailgate.store import openSynchronousStore

    passwd = tmp_path / "users"
    passwd.write_text(
        "alice:mypassword123:::\n"  # 13 characters, as a DES crypt string has
        f"bob:{doveadmHash('SHA512-CRYPT', 'bob s')}:::\n"
    )
    url = f"sqlite:///{tmp_path / 'mail.sqlite3'}"

    def userImport(*options):
        out, err = io.StringIO(), io.StringIO()
        code = run(
            ["--database", url, "user", "import", str(passwd), "--domain", "example.org", *options],
            stdin=io.StringIO(""), stdout=out, stderr=err, environ={},
        )
        return code, out.getvalue(), err.getvalue()

    code, _, err = userImport("--scheme", "{PLAIN}")
    assert code == 64 and "is not a scheme's name" in err
    code, _, err = userImport("--scheme", "PLAIN.B32")
    assert code == 64 and "is not a scheme mailgate checks" in err
    code, out, err = userImport("--scheme", "plain")
    assert (code, err) == (0, ""), (out, err)
    store = openSynchronousStore(url)
    try:
        alice = resultOf(store.findUser(ALICE)).passwordHash
        bob = resultOf(store.findUser("bob@example.org")).passwordHash
    finally:
        store.close()
    assert verifyPassword(b"mypassword123", alice)
    assert verifyPassword(b"bob s", bob)
