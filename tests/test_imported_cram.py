"""
Users moved from a Dovecot whose passdb holds C{{CRAM-MD5}} hashes (the
HMAC-MD5 states keyed with the password; postfixadmin's
C{dovecot:CRAM-MD5}) had mail clients set up for AUTH CRAM-MD5, which
Dovecot serves them from those states: mailgate serves it from them too,
before and after their first plaintext login.
"""

import hmac
import io
import json
import os
import poplib
import shutil

import pytest
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin

from dovecotserver import requireDovecot
from e2e import mailgate_cli, mailgate_server, runCommand  # noqa: F401 (fixtures)
from mailgate.auth import checkers as checkersModule
from mailgate.auth.credentials import CramMD5Credentials
from mailgate.auth.foreign import splitScheme
from mailgate.auth.md5state import hmacMD5Context, hmacMD5WithContext
from mailgate.auth.passwords import importedCredentials
from mailgate.auth.realm import makePortal
from mailgate.interfaces import IMaildrop
from mailgate.testing import TEST_HASH_COST, memoryStore, resultOf, runInline
from test_foreign_hashes import cramLogin, doveadmHash, passwordLogin

#: challenges of every length around MD5's block boundaries: up to 55
#: octets the padding fits the last block, 56 to 63 need one more, and
#: from 64 on the challenge fills whole blocks itself
LENGTHS = list(range(0, 140)) + [191, 192, 193, 1000, 4096]


def _dovecotsContext(password):
    scheme, _, value = splitScheme(doveadmHash("CRAM-MD5", password))
    assert scheme == "CRAM-MD5"
    return bytes.fromhex(value)


@pytest.mark.parametrize("length", LENGTHS)
def test_carryingMD5OnFromTheStatesGivesHMACMD5(length):
    """
    HMAC-MD5 made from the stored states equals HMAC-MD5 made from the
    password, for challenges of any length and keys short, of a whole
    block, and longer (hashed first).
    """
    challenge = os.urandom(length)
    for password in (b"", b"pw", os.urandom(63), os.urandom(64), os.urandom(65), os.urandom(200)):
        expected = hmac.new(password, challenge, "md5").digest()
        assert hmacMD5WithContext(hmacMD5Context(password), challenge) == expected


@requireDovecot
@pytest.mark.parametrize("password", ["sécret, horse", "x", "p" * 64, "a much longer passphrase " * 4])
def test_dovecotsStoredStatesAnswerACramMD5Challenge(password):
    """
    The states C{doveadm pw -s CRAM-MD5} writes give, for a challenge,
    the response a client keyed with the password sends.
    """
    context = _dovecotsContext(password)
    for challenge in (b"<1896.697170952@postoffice.example.net>", os.urandom(56), os.urandom(64), b"x" * 300):
        expected = hmac.new(password.encode("utf-8"), challenge, "md5").digest()
        assert hmacMD5WithContext(context, challenge) == expected


# -- the checkers, over a real SQLite file ----------------------------------------

ALICE = "alice@example.org"
CHALLENGE = b"<1896.697170952@postoffice.example.net>"


@pytest.fixture
def store(tmp_path):
    s = memoryStore(f"sqlite:///{tmp_path / 'mail.sqlite3'}")
    yield s
    s.close()


@pytest.fixture(autouse=True)
def cheapUpgrades(monkeypatch):
    monkeypatch.setattr(checkersModule.PasswordChecker, "hashCost", TEST_HASH_COST)


def cramLoginWith(store, address, password, challenge=CHALLENGE):
    """
    A CRAM-MD5 login through the portal the server makes: the user, or
    C{None} if refused.
    """
    digest = hmac.new(password.encode("utf-8"), challenge, "md5").hexdigest().encode("ascii")
    portal = makePortal(store, runInline)
    try:
        _, maildrop, logout = resultOf(
            portal.login(CramMD5Credentials(challenge, address.encode(), digest), None, IMaildrop)
        )
    except UnauthorizedLogin:
        return None
    logout()
    return maildrop


def passwordLoginWith(store, address, password):
    portal = makePortal(store, runInline)
    _, maildrop, logout = resultOf(
        portal.login(UsernamePassword(address.encode(), password.encode("utf-8")), None, IMaildrop)
    )
    logout()
    return maildrop


@requireDovecot
def test_aCramMD5LoginIsCheckedAgainstTheImportedStates(store, logEvents):
    """
    A user imported with Dovecot's {CRAM-MD5} hash logs in with CRAM-MD5;
    a wrong response, a user without such states and an unknown user are
    refused alike.  The login learns no password: the imported hash stays
    for the first plaintext login to replace, and nothing is logged about
    it.
    """
    imported = importedCredentials(doveadmHash("CRAM-MD5", "fay's"))
    resultOf(store.addUser(ALICE, imported))
    resultOf(store.addUser("gus@example.org", importedCredentials(doveadmHash("SHA512-CRYPT", "gus's"))))
    for length in (0, 40, 53, 54, 62, 63, 200):
        challenge = b"<" + b"1" * length + b">"
        assert cramLoginWith(store, ALICE, "fay's", challenge) is not None
    assert cramLoginWith(store, ALICE, "fays") is None
    assert cramLoginWith(store, "gus@example.org", "gus's") is None
    assert cramLoginWith(store, "nobody@example.org", "fay's") is None
    assert resultOf(store.findUser(ALICE)).passwordHash == imported.passwordHash
    assert not [e for e in logEvents if str(e.get("event", "")).startswith("auth.")]


@requireDovecot
def test_everyCramMD5CheckCostsTheSameMD5Work(store, monkeypatch):
    """
    A CRAM-MD5 response is checked with the same MD5 work (the blocks
    carried on from states, in pure Python) whoever the user is: one with
    states, one with APOP (whose secret's HMAC alone costs fifty times
    less), one with neither, or nobody; right or wrong.  Timing, which the
    failure delay hides only when it is not 0, then does not tell who has
    APOP.
    """
    from mailgate.auth import md5state
    from mailgate.auth.passwords import makeCredentials

    resultOf(store.addUser(ALICE, importedCredentials(doveadmHash("CRAM-MD5", "fay's"))))
    resultOf(store.addUser("ann@example.org", makeCredentials("ann's", apop=True, logN=TEST_HASH_COST)))
    resultOf(store.addUser("gus@example.org", makeCredentials("gus's", logN=TEST_HASH_COST)))
    blocks = []
    compress = md5state._compress
    monkeypatch.setattr(md5state, "_compress", lambda state, block: blocks.append(1) or compress(state, block))
    cost = {}
    for address, password in (
        (ALICE, "fay's"), (ALICE, "wrong"), ("ann@example.org", "ann's"), ("ann@example.org", "wrong"),
        ("gus@example.org", "gus's"), ("nobody@example.org", "x"),
    ):
        del blocks[:]
        cramLoginWith(store, address, password)
        cost[address, password] = len(blocks)
    assert len(set(cost.values())) == 1 and cost[ALICE, "wrong"] > 0, cost


@requireDovecot
def test_thePlaintextLoginThatReplacesTheHashKeepsCramMD5(store):
    """
    The first plaintext login replaces the imported hash by mailgate's
    own, and the user's CRAM-MD5 goes on working with the states kept;
    no password is kept in clear for it (no APOP).
    """
    resultOf(store.addUser(ALICE, importedCredentials(doveadmHash("CRAM-MD5", "fay's"))))
    passwordLoginWith(store, ALICE, "fay's")
    user = resultOf(store.findUser(ALICE))
    assert user.passwordHash.startswith("$scrypt$") and user.apopSecret is None
    assert user.cramMD5 == hmacMD5Context(b"fay's").hex()
    assert cramLoginWith(store, ALICE, "fay's") is not None
    assert cramLoginWith(store, ALICE, "fays") is None
    assert resultOf(store.digestLoginUsers()) == (False, True) and not resultOf(store.hasAPOPUsers())


@requireDovecot
def test_whetherToOfferAPOPAndCramMD5IsOneQuery(databaseURL):
    """
    Every node asks, every 30 seconds, whether to put an APOP timestamp in
    the greeting and whether to offer CRAM-MD5: one query answers both
    (SQLite's trace shows what the database was asked), right on each
    backend, whoever has APOP or CRAM-MD5 states.  A user with APOP alone
    does not make CRAM-MD5 offered (curl would pick it and fail for every
    user without APOP); imported states do.
    """
    from mailgate.auth.passwords import makeCredentials
    from mailgate.pop3.factory import APOPAdvertiser

    store = memoryStore(databaseURL)
    try:
        asked = []
        if databaseURL.startswith("sqlite"):
            store.database.connection.set_trace_callback(asked.append)
        advertiser = APOPAdvertiser(store)
        for address, credentials, offered in (
            ("gus@example.org", makeCredentials("gus's", logN=TEST_HASH_COST), (False, False)),
            ("ann@example.org", makeCredentials("ann's", apop=True, logN=TEST_HASH_COST), (True, False)),
            (ALICE, importedCredentials(doveadmHash("CRAM-MD5", "fay's")), (True, True)),
        ):
            resultOf(store.addUser(address, credentials))
            del asked[:]
            resultOf(advertiser.refresh())
            assert (advertiser.enabled, advertiser.cramEnabled) == offered
            if databaseURL.startswith("sqlite"):
                assert len([sql for sql in asked if "FROM users" in sql]) == 1, asked
    finally:
        store.close()


# -- a running server, the mailgate command and real clients -----------------------

CURL = shutil.which("curl")
INVALID = "-ERR [AUTH] invalid user name or password"


def curlCramMD5(port, address, password):
    """
    curl fetching message 1 with AUTH CRAM-MD5: (exit status, message).
    """
    code, out, err = runCommand(
        [CURL, "-v", "-s", "-S", "--max-time", "15", "-u", f"{address}:{password}",
         "--login-options", "AUTH=CRAM-MD5", f"pop3://127.0.0.1:{port}/1"]
    )
    assert code != 0 or "> AUTH CRAM-MD5" in err, err
    return code, out


def listed(mailgate_cli):
    return {
        row["address"]: (row["password"], row["cram_md5"], row["apop"])
        for row in map(json.loads, mailgate_cli.check("user", "list", "--json").splitlines())
    }


@requireDovecot
@pytest.mark.skipif(CURL is None, reason="curl is not installed (no curl on PATH)")
def test_usersMovedWithDovecotsCramMD5HashKeepLoggingInWithCramMD5(mailgate_server, mailgate_cli, tmp_path):
    """
    Fay's Dovecot passdb entry is postfixadmin's dovecot:CRAM-MD5, and
    her client logs in with CRAM-MD5.  Moved with user import, she logs in
    to mailgate the same way, before her first plaintext login (which
    replaces the hash) and after it; a changed password keeps it; turning
    APOP off takes it away.  The greeting offers no APOP (nobody's
    password is known); CAPA offers CRAM-MD5; refusals all look alike.
    """
    mailgate_cli.check("db", "upgrade")
    passwd = tmp_path / "users"
    passwd.write_text(
        f"fay:{doveadmHash('CRAM-MD5', 'fay s')}:::\n"
        f"gus:{doveadmHash('SHA512-CRYPT', 'gus s')}:::\n"
    )
    out = mailgate_cli.check("user", "import", str(passwd), "--domain", "example.org")
    assert out.splitlines()[:2] == ["added fay@example.org (CRAM-MD5 enabled)", "added gus@example.org"]
    for address in ("fay@example.org", "gus@example.org"):
        mailgate_cli.deliver(address, b"Subject: hi\n\nfor " + address.encode() + b"\n")
    server = mailgate_server("--auth-failure-delay", "0.1")

    client = poplib.POP3("127.0.0.1", server.port, timeout=20)
    try:
        assert "<" not in client.getwelcome().decode()
        assert client.capa()["SASL"] == ["SCRAM-SHA-256", "CRAM-MD5", "PLAIN", "LOGIN"]
    finally:
        client.quit()

    assert curlCramMD5(server.port, "fay@example.org", "fay s") == (0, "Subject: hi\r\n\r\nfor fay@example.org\r\n")
    assert cramLogin(server.port, "fay@example.org", "fay s").startswith("+OK")
    assert cramLogin(server.port, "fay@example.org", "fays") == INVALID
    assert passwordLogin(server.port, "gus@example.org", "gus s").startswith("+OK")
    assert cramLogin(server.port, "gus@example.org", "gus s") == INVALID
    assert passwordLogin(server.port, "gus@example.org", "gus s").startswith("+OK")
    assert cramLogin(server.port, "nobody@example.org", "fay s") == INVALID
    # CRAM-MD5 learnt no password: the hash is still the one imported.
    assert listed(mailgate_cli)["fay@example.org"] == ("imported", True, False)

    assert passwordLogin(server.port, "fay@example.org", "fay s").startswith("+OK")
    assert listed(mailgate_cli)["fay@example.org"] == ("mailgate", True, False)
    assert curlCramMD5(server.port, "fay@example.org", "fay s")[0] == 0
    assert cramLogin(server.port, "fay@example.org", "fay s").startswith("+OK")

    mailgate_cli.check("user", "passwd", "fay@example.org", "--password-stdin", input="new fay\n")
    assert cramLogin(server.port, "fay@example.org", "new fay").startswith("+OK")
    assert cramLogin(server.port, "fay@example.org", "fay s") == INVALID
    assert cramLogin(server.port, "fay@example.org", "new fay").startswith("+OK")

    mailgate_cli.check("user", "apop", "fay@example.org", "off")
    assert listed(mailgate_cli)["fay@example.org"] == ("mailgate", False, False)
    assert cramLogin(server.port, "fay@example.org", "new fay") == INVALID
    assert passwordLogin(server.port, "fay@example.org", "new fay").startswith("+OK")
    assert "upgrade_failed" not in server.stdout + server.stderr


@requireDovecot
def test_aCopiedDatabaseKeepsTheCramMD5States(tmp_path, postgresURL):
    """
    C{db copy} takes the states along, from SQLite to PostgreSQL and back:
    a user moved to another database goes on logging in with CRAM-MD5
    there.
    """
    from mailgate.cli import run
    from mailgate.store import openSynchronousStore

    source, target = (f"sqlite:///{tmp_path / name}" for name in ("from.sqlite3", "to.sqlite3"))
    for argv, given in (
        (["--database", source, "user", "add", ALICE, "--password-stdin", "--hashed"],
         doveadmHash("CRAM-MD5", "fay's") + "\n"),
        (["db", "copy", "--from", source, "--to", postgresURL], ""),
        (["db", "copy", "--from", postgresURL, "--to", target], ""),
    ):
        err = io.StringIO()
        assert run(argv, stdin=io.StringIO(given), stdout=io.StringIO(), stderr=err, environ={}) == 0, err.getvalue()
    for url in (postgresURL, target):
        store = openSynchronousStore(url)
        try:
            assert resultOf(store.findUser(ALICE)).cramMD5 == hmacMD5Context(b"fay's").hex()
            assert cramLoginWith(store, ALICE, "fay's") is not None
            assert cramLoginWith(store, ALICE, "fays") is None
        finally:
            store.close()


def mailgate(*argv, given=""):
    from mailgate.cli import run

    out, err = io.StringIO(), io.StringIO()
    code = run(list(argv), stdin=io.StringIO(given), stdout=out, stderr=err, environ={})
    return code, out.getvalue(), err.getvalue()


@requireDovecot
def test_aNewHashOfAnotherSchemeWouldLoseCramMD5AndIsRefused(tmp_path):
    """
    C{user passwd --hashed} with a hash that has no CRAM-MD5 states would
    silently break the client of a user who logs in with CRAM-MD5: it is
    refused with what to do; a {CRAM-MD5} hash is taken.
    """
    url = f"sqlite:///{tmp_path / 'mail.sqlite3'}"
    passwd = ["--database", url, "user", "passwd", ALICE, "--password-stdin", "--hashed"]
    code, _, err = mailgate("--database", url, "user", "add", ALICE, "--password-stdin", "--hashed",
                            given=doveadmHash("CRAM-MD5", "fay's") + "\n")
    assert code == 0, err
    code, out, err = mailgate(*passwd, given=doveadmHash("SHA512-CRYPT", "new") + "\n")
    assert (code, out) == (64, "") and f"{ALICE} has CRAM-MD5 (from Dovecot)" in err, err
    code, _, err = mailgate(*passwd, given=doveadmHash("CRAM-MD5", "new") + "\n")
    assert code == 0, err
    store = memoryStore(url)
    try:
        assert cramLoginWith(store, ALICE, "new") is not None
    finally:
        store.close()


@pytest.mark.parametrize("written", ["", "not hex", "00" * 31, "00" * 33])
def test_statesWrittenWrongByHandAreARefusalNotAnError(store, written):
    """
    States that are not 64 hex digits (set by hand in the database) make
    CRAM-MD5 refuse that user like a wrong response, not fail.
    """
    from mailgate.auth.passwords import makeCredentials

    resultOf(store.addUser(ALICE, makeCredentials("fay's", logN=TEST_HASH_COST)))
    store.database.run(lambda cursor: cursor.execute("UPDATE users SET cram_md5 = ?", (written,)))
    assert cramLoginWith(store, ALICE, "fay's") is None


@requireDovecot
def test_userTestSaysWhetherCramMD5WorksWithThePassword(tmp_path):
    """
    C{user test} checks a password as a login would, and for a user with
    CRAM-MD5 states also whether AUTH CRAM-MD5 takes it: the states are
    kept apart from the hash, so the two could disagree.
    """
    url = f"sqlite:///{tmp_path / 'mail.sqlite3'}"
    test = ["--database", url, "user", "test", ALICE, "--password-stdin"]
    code, _, err = mailgate("--database", url, "user", "add", ALICE, "--password-stdin", "--hashed",
                            given=doveadmHash("CRAM-MD5", "fay's") + "\n")
    assert code == 0, err
    assert mailgate(*test, given="fay's\n") == (0, (
        f"the password of {ALICE} is correct "
        "(kept as the hash imported from another server; CRAM-MD5 works with it too)\n"
    ), "")
    store = memoryStore(url)
    try:
        store.database.run(
            lambda cursor: cursor.execute("UPDATE users SET cram_md5 = ?", (hmacMD5Context(b"old").hex(),))
        )
    finally:
        store.close()
    code, out, _ = mailgate(*test, given="fay's\n")
    assert code == 0 and "; but not for CRAM-MD5, whose states were made from another password" in out, out


@requireDovecot
def test_userApopOffSaysThatItErasesTheCramMD5StatesToo(tmp_path):
    """
    C{user apop ADDRESS off} erases a user's CRAM-MD5 states with the APOP
    secret (README's way to be rid of them), and says so, as its help does:
    an administrator turning APOP off for a user who never had it learns
    that their CRAM-MD5 client will now fail.
    """
    url = f"sqlite:///{tmp_path / 'mail.sqlite3'}"
    code, _, err = mailgate("--database", url, "user", "add", ALICE, "--password-stdin", "--hashed",
                            given=doveadmHash("CRAM-MD5", "fay's") + "\n")
    assert code == 0, err
    assert mailgate("--database", url, "user", "apop", ALICE, "off") == (
        0, f"APOP and CRAM-MD5 disabled for {ALICE}; its stored secret and CRAM-MD5 states are erased\n", ""
    )
    code, out, _ = mailgate("user", "--help")
    assert code == 0
    assert "switch APOP (and CRAM-MD5) on or off for a user; off also erases CRAM-MD5 states from Dovecot" in " ".join(
        out.split()
    )
    code, out, _ = mailgate("user", "apop", "--help")
    assert code == 0 and "the CRAM-MD5 states of a {CRAM-MD5} hash imported from Dovecot" in " ".join(out.split())
    store = memoryStore(url)
    try:
        assert resultOf(store.findUser(ALICE)).cramMD5 is None
    finally:
        store.close()


@requireDovecot
@pytest.mark.parametrize("scheme, command, given", [
    ("CRAM-MD5", ("off",), ""),
    ("SHA512-CRYPT", ("on", "--password-stdin"), "fay's\n"),
])
def test_userApopDuringTheFirstLoginIsNotUndoneByIt(tmp_path, scheme, command, given):
    """
    C{mailgate user apop} lands while a user's first plaintext login makes
    mailgate's hash to replace the imported one (scrypt, some 0.1 s): the
    login replaces the hash and leaves what the command did.  (It wrote
    back the APOP secret and CRAM-MD5 states it had read before: the
    states the administrator had just erased worked again, or APOP just
    enabled was gone.)
    """
    from mailgate.auth.passwords import makeCredentials

    url = f"sqlite:///{tmp_path / 'mail.sqlite3'}"
    code, _, err = mailgate("--database", url, "user", "add", ALICE, "--password-stdin", "--hashed",
                            given=doveadmHash(scheme, "fay's") + "\n")
    assert code == 0, err
    ran = []

    def commandMeanwhile(function, *args):
        if function is makeCredentials and not ran:
            ran.append(mailgate("--database", url, "user", "apop", ALICE, *command, given=given))
        return runInline(function, *args)

    store = memoryStore(url)
    try:
        portal = makePortal(store, commandMeanwhile)
        _, maildrop, logout = resultOf(
            portal.login(UsernamePassword(ALICE.encode(), b"fay's"), None, IMaildrop)
        )
        logout()
        assert ran and ran[0][0] == 0, ran
        user = resultOf(store.findUser(ALICE))
        assert user.passwordHash.startswith("$scrypt$")
        if command[0] == "off":
            assert (user.apopSecret, user.cramMD5) == (None, None)
            assert cramLoginWith(store, ALICE, "fay's") is None
        else:
            assert user.apopSecret == "fay's"
            assert cramLoginWith(store, ALICE, "fay's") is not None
    finally:
        store.close()


@requireDovecot
def test_aNewPasswordInClearGivenAsAHashKeepsCramMD5(tmp_path):
    """
    C{user passwd --hashed '{PLAIN}...'} gives the password itself: for a
    user with CRAM-MD5 states it makes the new password's, as a password
    read without --hashed does.  (It was refused as "a hash of another
    scheme", the password in clear being there to make them from.)
    """
    url = f"sqlite:///{tmp_path / 'mail.sqlite3'}"
    code, _, err = mailgate("--database", url, "user", "add", ALICE, "--password-stdin", "--hashed",
                            given=doveadmHash("CRAM-MD5", "fay's") + "\n")
    assert code == 0, err
    assert mailgate("--database", url, "user", "passwd", ALICE, "--password-stdin", "--hashed",
                    given="{PLAIN}new fay\n") == (0, f"password changed for {ALICE}\n", "")
    store = memoryStore(url)
    try:
        assert cramLoginWith(store, ALICE, "new fay") is not None
        assert cramLoginWith(store, ALICE, "fay's") is None
        assert passwordLoginWith(store, ALICE, "new fay").address == ALICE
    finally:
        store.close()
