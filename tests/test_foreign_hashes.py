"""
Users moved from Dovecot keep their passwords: the hashes Dovecot's
C{doveadm pw} makes (the real one, installed by make test) are imported as
they are, logins are checked against them, and the first successful login
replaces each by mailgate's own scrypt hash and SCRAM-SHA-256 keys.
"""

import subprocess

import pytest
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin

from dovecotserver import requireDovecot
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
    "SCRAM-SHA-256", "PLAIN", "CLEAR", "CLEARTEXT",
]


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


@requireDovecot
@pytest.mark.parametrize(
    "given, reason",
    [
        (lambda: doveadmHash("CRAM-MD5"), "cannot be checked"),
        (lambda: "{DIGEST-MD5}0123456789abcdef0123456789abcdef", "cannot be checked"),
        (lambda: "{FOO}bar", "unknown scheme FOO"),
        (lambda: "{SHA256.ROT13}abc", "unknown encoding"),
        (lambda: "{SHA512-CRYPT", "not closed"),
        (lambda: "secret", "no {SCHEME} prefix"),
        (lambda: "$y$j9T$abcdefgh$0123456789012345678901234567890123456789012", "yescrypt"),
        (lambda: doveadmHash("SHA512-CRYPT")[:40], "malformed"),
        (lambda: doveadmHash("BLF-CRYPT")[:40], "malformed"),
        (lambda: "{ARGON2ID}$argon2id$v=19$m=65536", "malformed"),
        (lambda: "{SHA256}" + doveadmHash("SHA")[5:], "wrong length"),
        (lambda: "{SSHA}c2hvcnQ=", "without its salt"),
        (lambda: "{SHA}not base64!", "not valid hex or base64"),
        (lambda: "{PBKDF2}$1$salt$many$00", "not a PBKDF2 value"),
        (lambda: "{SCRAM-SHA-256}4096,abc", "not a SCRAM-SHA-256 value"),
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
