"""
Authentication without sockets: password hashing, SCRAM verifiers, the
verified-credential cache, APOP digests, the credential checkers behind a
real cred L{Portal} over a real SQLite store, and address normalisation.
"""

import base64
import hashlib
import hmac
import re

import pytest
from twisted.internet import defer
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from zope.interface.verify import verifyObject

from mailgate.address import normalizeAddress, normalizeDomain
from mailgate.auth import checkers as checkersModule
from mailgate.auth.cache import VerifiedCredentialCache
from mailgate.auth.credentials import APOPCredentials, IAPOPCredentials
from mailgate.auth.passwords import (
    SCRAM_ITERATIONS,
    SCRYPT_LOG_N,
    StoredCredentials,
    hashPassword,
    makeCredentials,
    parseScramSecret,
    scramSha256Secret,
    verifyPassword,
)
from mailgate.auth.realm import makePortal
from mailgate.auth import sasl as saslModule
from mailgate.auth.sasl import ScramCredentials
from mailgate.errors import InvalidAddress
from mailgate.interfaces import IMaildrop
from mailgate.testing import TEST_HASH_COST, FaultInjectingStore, addUser, memoryStore, resultOf, runInline

ALICE = "alice@example.org"
BOB = "bob@example.org"

_B64 = r"[A-Za-z0-9+/]+={0,2}"


# -- password hashes -------------------------------------------------------


def test_hashFormatWithDefaultCost():
    encoded = hashPassword("correct horse")
    match = re.fullmatch(r"\$scrypt\$ln=15,r=8,p=1\$(" + _B64 + r")\$(" + _B64 + r")", encoded)
    assert match, encoded
    assert len(base64.b64decode(match.group(1))) == 16
    assert len(base64.b64decode(match.group(2))) == 32
    assert "correct horse" not in encoded
    assert verifyPassword("correct horse", encoded)


def test_hashesAreSalted():
    first = hashPassword("same", logN=TEST_HASH_COST)
    second = hashPassword("same", logN=TEST_HASH_COST)
    assert first != second
    assert first.startswith(f"$scrypt$ln={TEST_HASH_COST},r=8,p=1$")
    assert verifyPassword("same", first) and verifyPassword("same", second)


def test_verifyTrueAndFalse():
    encoded = hashPassword("s3cret", logN=TEST_HASH_COST)
    assert verifyPassword("s3cret", encoded) is True
    assert verifyPassword(b"s3cret", encoded) is True
    assert verifyPassword("s3cret ", encoded) is False
    assert verifyPassword("S3cret", encoded) is False
    assert verifyPassword("", encoded) is False


def test_verifyNonASCIIPassword():
    encoded = hashPassword("pässwörd", logN=TEST_HASH_COST)
    assert verifyPassword("pässwörd", encoded)
    assert verifyPassword("pässwörd".encode("utf-8"), encoded)
    assert not verifyPassword("passwort", encoded)


def _corruptHashes():
    """
    Each a C{pytest.param} with an id of its own: the hash they are made
    from has a random salt, and ids from the values would differ from one
    collection to the next (pytest-xdist's workers must collect the same
    tests).
    """
    good = hashPassword("pw", logN=TEST_HASH_COST)
    prefix, params, salt, digest = good.rsplit("$", 3)
    cases = {
        "empty": "",
        "plain text": "plain text",
        "scrypt with nothing": "$scrypt$",
        "scrypt parameters only": "$scrypt$ln=10,r=8,p=1$",
        "argon2id": "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2g",
        "digest not valid base64": good[:-1],  # truncated digest: not valid base64 any more
        "truncated digest": good[:-4],
        "empty digest": f"{prefix}${params}${salt}$",
        "salt not base64": f"{prefix}${params}$!!!!${digest}",
        "ln not a number": f"{prefix}$ln=x,r=8,p=1${salt}${digest}",
        "p missing": f"{prefix}$ln=10,r=8${salt}${digest}",
        "unknown parameter": f"{prefix}$ln=10,r=8,p=1,junk${salt}${digest}",
        "ln 0": f"{prefix}$ln=0,r=8,p=1${salt}${digest}",
        "ln 99": f"{prefix}$ln=99,r=8,p=1${salt}${digest}",
        "r 0": f"{prefix}$ln=10,r=0,p=1${salt}${digest}",
        "p 0": f"{prefix}$ln=10,r=8,p=0${salt}${digest}",
        "extra field": f"{prefix}$ln=10,r=8,p=1${salt}${digest}$extra",
        "digest missing": f"{prefix}$ln=10,r=8,p=1${salt}",
        "salt not ASCII": f"{prefix}$ln=10,r=8,p=1$sält${digest}",
    }
    return [pytest.param(encoded, id=name) for name, encoded in cases.items()]


@pytest.mark.parametrize("encoded", _corruptHashes())
def test_corruptHashesDoNotVerify(encoded):
    assert verifyPassword("pw", encoded) is False


def test_makeCredentialsWithoutAPOP():
    credentials = makeCredentials("hunter2", logN=TEST_HASH_COST)
    assert verifyPassword("hunter2", credentials.passwordHash)
    assert credentials.apopSecret is None
    assert credentials.scramSha256.startswith(f"SCRAM-SHA-256${SCRAM_ITERATIONS}:")
    assert "hunter2" not in credentials.passwordHash
    assert "hunter2" not in credentials.scramSha256
    assert "hunter2" not in repr(credentials)


def test_makeCredentialsWithAPOPKeepsTheSecret():
    credentials = makeCredentials("hunter2", apop=True, logN=TEST_HASH_COST)
    assert credentials.apopSecret == "hunter2"
    assert "hunter2" not in repr(credentials)


# -- SCRAM-SHA-256 (RFC 5803 / RFC 7677) -------------------------------------


def test_scramSecretFormat():
    encoded = scramSha256Secret("pencil")
    assert re.fullmatch(
        r"SCRAM-SHA-256\$4096:(" + _B64 + r")\$(" + _B64 + r"):(" + _B64 + r")", encoded
    ), encoded
    iterations, salt, storedKey, serverKey = parseScramSecret(encoded)
    assert iterations == 4096
    assert len(salt) == 16
    assert len(storedKey) == len(serverKey) == 32
    assert scramSha256Secret("pencil") != encoded  # random salt


# RFC 7677 section 3: user "user", password "pencil".
RFC7677_SALT = "W22ZaJ0SNY7soEsUEjb6gQ=="
RFC7677_NONCE = "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC7677_AUTH_MESSAGE = (
    "n=user,r=rOprNGfwEbeRWgbNEkqO,"
    f"r={RFC7677_NONCE},s={RFC7677_SALT},i=4096,"
    f"c=biws,r={RFC7677_NONCE}"
).encode("ascii")
RFC7677_PROOF = "dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
RFC7677_SERVER_SIGNATURE = "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def test_scramKeysMatchRFC7677Example():
    salt = base64.b64decode(RFC7677_SALT)
    encoded = scramSha256Secret("pencil", iterations=4096, salt=salt)
    iterations, parsedSalt, storedKey, serverKey = parseScramSecret(encoded)
    assert (iterations, parsedSalt) == (4096, salt)
    assert encoded.startswith(f"SCRAM-SHA-256$4096:{RFC7677_SALT}$")

    # The server's signature in the RFC's exchange is HMAC(ServerKey, AuthMessage).
    signature = hmac.new(serverKey, RFC7677_AUTH_MESSAGE, hashlib.sha256).digest()
    assert base64.b64encode(signature).decode() == RFC7677_SERVER_SIGNATURE

    # The client's proof is ClientKey XOR HMAC(StoredKey, AuthMessage), and
    # StoredKey = H(ClientKey).
    clientSignature = hmac.new(storedKey, RFC7677_AUTH_MESSAGE, hashlib.sha256).digest()
    proof = base64.b64decode(RFC7677_PROOF)
    clientKey = bytes(a ^ b for a, b in zip(proof, clientSignature))
    assert hashlib.sha256(clientKey).digest() == storedKey


@pytest.mark.parametrize(
    "encoded",
    [
        "SCRAM-SHA-1$4096:c2FsdA==$a2V5:a2V5",
        "SCRAM-SHA-256$4096$a2V5:a2V5",
        "SCRAM-SHA-256$x:c2FsdA==$a2V5:a2V5",
        "SCRAM-SHA-256$4096:c2FsdA==$a2V5",
        "SCRAM-SHA-256$4096:!!$a2V5:a2V5",
    ],
)
def test_parseScramSecretRejectsMalformed(encoded):
    with pytest.raises(ValueError):
        parseScramSecret(encoded)


# -- the verified-credential cache -------------------------------------------


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_cacheHit():
    cache = VerifiedCredentialCache()
    assert not cache.check(ALICE, "$scrypt$h1", b"pw")
    cache.remember(ALICE, "$scrypt$h1", b"pw")
    assert cache.check(ALICE, "$scrypt$h1", b"pw")
    assert len(cache) == 1


def test_cacheMissForAnotherPasswordOrUser():
    cache = VerifiedCredentialCache()
    cache.remember(ALICE, "$scrypt$h1", b"pw")
    assert not cache.check(ALICE, "$scrypt$h1", b"pw2")
    assert not cache.check(ALICE, "$scrypt$h1", b"")
    assert not cache.check(BOB, "$scrypt$h1", b"pw")


def test_cacheInvalidatedWhenStoredHashChanges():
    cache = VerifiedCredentialCache()
    cache.remember(ALICE, "$scrypt$old", b"pw")
    assert not cache.check(ALICE, "$scrypt$new", b"pw")


def test_cacheHoldsNoPassword():
    cache = VerifiedCredentialCache()
    cache.remember(ALICE, "$scrypt$h1", b"a-rather-distinctive-password")
    for name, value in vars(cache).items():
        assert b"a-rather-distinctive-password" not in repr(value).encode(), name


def test_cacheEntriesExpire():
    clock = FakeClock()
    cache = VerifiedCredentialCache(lifetime=60.0, clock=clock)
    cache.remember(ALICE, "$scrypt$h1", b"pw")
    clock.now += 59
    assert cache.check(ALICE, "$scrypt$h1", b"pw")
    clock.now += 2
    assert not cache.check(ALICE, "$scrypt$h1", b"pw")
    assert len(cache) == 0
    # A new verification starts a new lifetime.
    cache.remember(ALICE, "$scrypt$h1", b"pw")
    clock.now += 30
    assert cache.check(ALICE, "$scrypt$h1", b"pw")


def test_cacheIsBoundedOldestFirst():
    cache = VerifiedCredentialCache(maxEntries=3)
    for n in range(3):
        cache.remember(f"u{n}@example.org", "$scrypt$h", b"pw")
    # Using an entry makes it recent.
    assert cache.check("u0@example.org", "$scrypt$h", b"pw")
    cache.remember("u3@example.org", "$scrypt$h", b"pw")
    assert len(cache) == 3
    assert not cache.check("u1@example.org", "$scrypt$h", b"pw")
    for n in (0, 2, 3):
        assert cache.check(f"u{n}@example.org", "$scrypt$h", b"pw"), n
    for n in range(4, 100):
        cache.remember(f"u{n}@example.org", "$scrypt$h", b"pw")
        assert len(cache) <= 3
    assert len(cache) == 3


def test_cacheDisabledWithZeroEntries():
    cache = VerifiedCredentialCache(maxEntries=0)
    cache.remember(ALICE, "$scrypt$h1", b"pw")
    assert not cache.check(ALICE, "$scrypt$h1", b"pw")
    assert len(cache) == 0


def test_cacheKeysAreProcessPrivate():
    first = VerifiedCredentialCache()
    second = VerifiedCredentialCache()
    first.remember(ALICE, "$scrypt$h1", b"pw")
    assert not second.check(ALICE, "$scrypt$h1", b"pw")


# -- APOP ------------------------------------------------------------------


RFC1939_TIMESTAMP = b"<1896.697170952@dbc.mtview.ca.us>"
RFC1939_DIGEST = b"c4c9334bac560ecc979e58001b3e22fb"


def test_apopRFC1939Example():
    credentials = APOPCredentials(RFC1939_TIMESTAMP, b"mrose", RFC1939_DIGEST)
    assert verifyObject(IAPOPCredentials, credentials)
    assert credentials.checkPassword("tanstaaf") is True
    assert credentials.checkPassword(b"tanstaaf") is True
    assert credentials.checkPassword("tanstaafl") is False
    assert credentials.checkPassword("") is False


def test_apopDigestIsCaseInsensitive():
    credentials = APOPCredentials(RFC1939_TIMESTAMP, b"mrose", RFC1939_DIGEST.upper())
    assert credentials.checkPassword("tanstaaf")


def test_apopDigestBoundToTimestamp():
    credentials = APOPCredentials(b"<1897.697170952@dbc.mtview.ca.us>", b"mrose", RFC1939_DIGEST)
    assert not credentials.checkPassword("tanstaaf")


# -- checkers through a Portal -----------------------------------------------


class RecordingRunner:
    """
    A runInThread that runs inline and records what it was asked to run.
    """

    def __init__(self):
        self.calls = []

    def __call__(self, function, *args):
        self.calls.append((function, args))
        return runInline(function, *args)


@pytest.fixture
def users(store):
    addUser(store, ALICE, "wonderland", apop=True)
    addUser(store, BOB, "builder")
    return store


@pytest.fixture
def verifications(monkeypatch):
    """
    Count the scrypt verifications the checkers really perform.
    """
    calls = []
    real = checkersModule.verifyPassword

    def counting(password, encoded):
        calls.append(encoded)
        return real(password, encoded)

    monkeypatch.setattr(checkersModule, "verifyPassword", counting)
    return calls


def _login(portal, credentials):
    return resultOf(portal.login(credentials, None, IMaildrop))


def test_passwordLoginThroughPortal(users):
    runner = RecordingRunner()
    portal = makePortal(users, runner)
    interface, maildrop, logout = _login(portal, UsernamePassword(b"alice@example.org", b"wonderland"))
    assert interface is IMaildrop
    assert verifyObject(IMaildrop, maildrop)
    assert maildrop.address == ALICE
    assert len(runner.calls) == 1
    logout()


def test_passwordLoginNormalisesTheUserName(users):
    portal = makePortal(users, RecordingRunner())
    _, maildrop, logout = _login(portal, UsernamePassword(b" Alice@EXAMPLE.org ", b"wonderland"))
    assert maildrop.address == ALICE
    logout()


def test_wrongPasswordIsUnauthorized(users, verifications):
    runner = RecordingRunner()
    portal = makePortal(users, runner)
    with pytest.raises(UnauthorizedLogin):
        _login(portal, UsernamePassword(b"alice@example.org", b"Wonderland"))
    assert len(runner.calls) == 1
    assert len(verifications) == 1


def test_unknownUserIsUnauthorizedAfterADummyVerification(users, verifications):
    runner = RecordingRunner()
    portal = makePortal(users, runner)
    with pytest.raises(UnauthorizedLogin) as unknown:
        _login(portal, UsernamePassword(b"nobody@example.org", b"wonderland"))
    # The slow hash ran, off the reactor thread, against a real scrypt hash.
    assert len(runner.calls) == 1
    assert len(verifications) == 1
    assert verifications[0].startswith("$scrypt$")
    with pytest.raises(UnauthorizedLogin) as wrong:
        _login(portal, UsernamePassword(b"alice@example.org", b"nope"))
    assert type(unknown.value) is type(wrong.value)
    assert str(unknown.value) == str(wrong.value)


def test_theFirstUnknownUserPaysForOneHashAsAWrongPasswordDoes(monkeypatch):
    """
    An unknown user's login runs scrypt once, as a wrong password's does,
    the first one of a process too: making the dummy hash it is verified
    against costs no hash of its own (it cost a second one, and the first
    unknown name tried after a restart took twice as long to refuse).
    """
    from mailgate.auth import passwords

    stored = hashPassword(b"wonderland", TEST_HASH_COST)
    costs = []

    def countingScrypt(password, salt, logN, r, p):
        costs.append((logN, r, p, len(salt)))
        return bytes(32)

    monkeypatch.setattr(passwords, "_dummy", {})
    monkeypatch.setattr(passwords, "_scrypt", countingScrypt)
    assert checkersModule._verifyOrDummy(b"guess", None) is False
    assert costs == [(SCRYPT_LOG_N, 8, 1, 16)]
    del costs[:]
    assert checkersModule._verifyOrDummy(b"guess", None) is False
    assert checkersModule._verifyOrDummy(b"guess", stored) is False
    assert costs == [(SCRYPT_LOG_N, 8, 1, 16), (TEST_HASH_COST, 8, 1, 16)]


def test_malformedUserNameStillPaysForAVerification(users, verifications):
    runner = RecordingRunner()
    portal = makePortal(users, runner)
    with pytest.raises(UnauthorizedLogin):
        _login(portal, UsernamePassword(b"not an address", b"wonderland"))
    assert len(runner.calls) == 1
    assert len(verifications) == 1


class CountingAPOP(APOPCredentials):
    """
    APOP credentials that count the digests made to check them.
    """

    checked = 0

    def checkPassword(self, secret):
        self.checked += 1
        return APOPCredentials.checkPassword(self, secret)


class CountingScram(ScramCredentials):
    """
    A SCRAM proof that counts the stored keys it is checked against.
    """

    checked = 0

    def checkStoredKey(self, storedKey):
        self.checked += 1
        return ScramCredentials.checkStoredKey(self, storedKey)


@pytest.mark.parametrize("name", [b"nobody@example.org", BOB.encode(), b"not an address"])
def test_anAPOPDigestOfAUserWithoutASecretIsCheckedAllTheSame(users, name):
    """
    An unknown user's APOP digest, and that of a user without APOP, is
    made and compared as a user with APOP's is (against a dummy secret):
    refused without that work, their answer came sooner than a wrong
    digest's, which timing tells with --auth-failure-delay 0.
    """
    portal = makePortal(users, RecordingRunner())
    credentials = CountingAPOP(b"<1.2@x>", name, hashlib.md5(b"<1.2@x>builder").hexdigest().encode())
    with pytest.raises(UnauthorizedLogin):
        _login(portal, credentials)
    assert credentials.checked == 1


def test_aWrongAPOPDigestIsCheckedOnce(users):
    portal = makePortal(users, RecordingRunner())
    credentials = CountingAPOP(b"<1.2@x>", ALICE.encode(), hashlib.md5(b"<1.2@x>nope").hexdigest().encode())
    with pytest.raises(UnauthorizedLogin):
        _login(portal, credentials)
    assert credentials.checked == 1


@pytest.mark.parametrize("name", [b"nobody@example.org", b"imported@example.org", b"not an address", ALICE.encode()])
def test_everySCRAMProofIsCheckedAgainstAKey(users, name, monkeypatch):
    """
    A SCRAM proof is checked against stored keys, read from their text,
    once, whoever it names: an unknown user's (or one of a user without
    SCRAM keys, imported with another scheme's hash) against dummy keys,
    and refused.  Refused at once, such an answer came some 5
    microseconds sooner than a real user's wrong proof's (twice as fast,
    in the process): with --auth-failure-delay 0, timing told who exists.
    """
    parsed = []
    real = saslModule.parseScramSecret
    monkeypatch.setattr(saslModule, "parseScramSecret", lambda text: parsed.append(text) or real(text))
    resultOf(users.addUser("imported@example.org", StoredCredentials(hashPassword("x", TEST_HASH_COST))))
    portal = makePortal(users, RecordingRunner())
    credentials = CountingScram(name, b"n=x,r=a,r=ab,s=AAAA,i=4096,c=biws,r=ab", bytes(32))
    with pytest.raises(UnauthorizedLogin):
        _login(portal, credentials)
    assert credentials.checked == 1
    assert len(parsed) == 1


def test_successfulLoginIsCached(users, verifications):
    runner = RecordingRunner()
    portal = makePortal(users, runner)
    for _ in range(3):
        _, _, logout = _login(portal, UsernamePassword(b"bob@example.org", b"builder"))
        logout()
    assert len(runner.calls) == 1
    assert len(verifications) == 1
    # A wrong password is never answered from the cache.
    with pytest.raises(UnauthorizedLogin):
        _login(portal, UsernamePassword(b"bob@example.org", b"builder2"))
    assert len(runner.calls) == 2


def test_aWrongPasswordTriedAgainCostsNoSecondHash(users, verifications):
    """
    A password that failed against a user's stored hash, or for an unknown
    user, is refused again without the slow hash while that hash (or that
    absence) is what the store still has, as Dovecot's negative cache does:
    a client repeating an old password over its connections (repeats count
    towards no penalty or ban) cost a full scrypt each time, and one
    address kept every CPU hashing.  A password set since, or a user added
    since, is verified as usual and logs in.
    """
    runner = RecordingRunner()
    portal = makePortal(users, runner)
    for _ in range(3):
        with pytest.raises(UnauthorizedLogin):
            _login(portal, UsernamePassword(b"bob@example.org", b"old password"))
        with pytest.raises(UnauthorizedLogin):
            _login(portal, UsernamePassword(b"carol@example.org", b"old password"))
        with pytest.raises(UnauthorizedLogin):
            _login(portal, UsernamePassword(b"not an address", b"old password"))
    assert len(verifications) == 3
    # Another password, or the same one for another name, is verified.
    with pytest.raises(UnauthorizedLogin):
        _login(portal, UsernamePassword(b"bob@example.org", b"older password"))
    with pytest.raises(UnauthorizedLogin):
        _login(portal, UsernamePassword(b"alice@example.org", b"old password"))
    assert len(verifications) == 5
    resultOf(users.setCredentials(BOB, makeCredentials("old password", logN=TEST_HASH_COST)))
    addUser(users, "carol@example.org", "old password")
    for name in (b"bob@example.org", b"carol@example.org"):
        _, maildrop, logout = _login(portal, UsernamePassword(name, b"old password"))
        assert maildrop.address == name.decode()
        logout()
    assert len(verifications) == 7


def test_withoutACacheEveryFailureIsHashed(users, verifications):
    """
    C{--auth-cache-size 0} remembers failures no more than logins.
    """
    portal = makePortal(users, RecordingRunner(), cache=VerifiedCredentialCache(maxEntries=0))
    for _ in range(2):
        with pytest.raises(UnauthorizedLogin):
            _login(portal, UsernamePassword(b"bob@example.org", b"old password"))
    assert len(verifications) == 2


def test_rememberedFailuresExpireAndAreBounded():
    clock = FakeClock()
    cache = VerifiedCredentialCache(maxEntries=2, lifetime=60.0, clock=clock)
    cache.rememberFailure(ALICE, "$scrypt$a", b"one")
    cache.rememberFailure(BOB, None, b"two")
    assert cache.failedBefore(ALICE, "$scrypt$a", b"one")
    assert not cache.failedBefore(ALICE, "$scrypt$b", b"one")
    assert not cache.failedBefore(ALICE, None, b"one")
    assert cache.failedBefore(BOB, None, b"two")
    assert not cache.failedBefore(BOB, "$scrypt$a", b"two")
    cache.rememberFailure(ALICE, "$scrypt$a", b"three")
    assert not cache.failedBefore(ALICE, "$scrypt$a", b"one")
    clock.now += 61
    assert not cache.failedBefore(BOB, None, b"two")
    assert not cache.failedBefore(ALICE, "$scrypt$a", b"three")


def test_aFailureAgainstAStoredHashBeyondASCIIIsRememberedToo():
    """
    An imported C{{PLAIN}} hash holds the password as it is, non-ASCII
    letters and all: a failure against it is recognised when repeated
    (C{hmac.compare_digest} refuses such a C{str}: the repeat raised
    TypeError, and its login failed as a server error).
    """
    cache = VerifiedCredentialCache()
    cache.rememberFailure(ALICE, "{PLAIN}pässwort", b"guess")
    assert cache.failedBefore(ALICE, "{PLAIN}pässwort", b"guess")
    assert not cache.failedBefore(ALICE, "{PLAIN}passwort", b"guess")


def test_passwordChangeInvalidatesTheCache(users):
    runner = RecordingRunner()
    portal = makePortal(users, runner)
    _, _, logout = _login(portal, UsernamePassword(b"bob@example.org", b"builder"))
    logout()
    resultOf(users.setCredentials(BOB, makeCredentials("newpass", logN=TEST_HASH_COST)))
    with pytest.raises(UnauthorizedLogin):
        _login(portal, UsernamePassword(b"bob@example.org", b"builder"))
    _, _, logout = _login(portal, UsernamePassword(b"bob@example.org", b"newpass"))
    logout()


@pytest.mark.parametrize("databaseURL", ["sqlite", "postgres"], indirect=True)
def test_whatAnotherNodeChangesEndsARememberedLoginAtOnce(databaseURL):
    """
    Two nodes on one database (two stores: connections and caches of their
    own): a password this node remembers stops working at the other's
    change, rename or deletion, at the next login: no --auth-cache-ttl to
    wait out, and nothing to flush (Dovecot's doveadm auth cache flush).
    """
    here, there = memoryStore(databaseURL), memoryStore(databaseURL)
    try:
        addUser(there, ALICE, "wonderland")
        runner = RecordingRunner()
        portal = makePortal(here, runner)

        def login(password, address=ALICE):
            _, maildrop, logout = _login(portal, UsernamePassword(address.encode(), password.encode()))
            logout()
            return maildrop.address

        assert login("wonderland") == login("wonderland") == ALICE
        assert len(runner.calls) == 1, "the second login was not remembered"
        resultOf(there.setCredentials(ALICE, makeCredentials("changed", logN=TEST_HASH_COST)))
        with pytest.raises(UnauthorizedLogin):
            login("wonderland")
        assert login("changed") == login("changed") == ALICE
        resultOf(there.renameUser(ALICE, BOB))
        with pytest.raises(UnauthorizedLogin):
            login("changed")
        assert login("changed", BOB) == BOB
        resultOf(there.deleteUser(BOB))
        with pytest.raises(UnauthorizedLogin):
            login("changed", BOB)
    finally:
        here.close()
        there.close()


def test_apopLoginThroughPortal(users):
    portal = makePortal(users, RecordingRunner())
    challenge = b"<4242.1@mailgate.test>"
    digest = hashlib.md5(challenge + b"wonderland").hexdigest().encode()
    _, maildrop, logout = _login(portal, APOPCredentials(challenge, b"alice@example.org", digest))
    assert maildrop.address == ALICE
    logout()


@pytest.mark.parametrize(
    "username, secret",
    [
        (b"alice@example.org", b"wrong"),  # wrong digest
        (b"bob@example.org", b"builder"),  # no APOP secret
        (b"nobody@example.org", b"whatever"),  # unknown
        (b"not an address", b"wonderland"),
    ],
)
def test_apopFailuresAreUnauthorized(users, username, secret):
    runner = RecordingRunner()
    portal = makePortal(users, runner)
    challenge = b"<4242.1@mailgate.test>"
    digest = hashlib.md5(challenge + secret).hexdigest().encode()
    with pytest.raises(UnauthorizedLogin):
        _login(portal, APOPCredentials(challenge, username, digest))


def test_apopRefusedWhenSwitchedOff(users):
    portal = makePortal(users, RecordingRunner(), apop=False)
    challenge = b"<4242.1@mailgate.test>"
    digest = hashlib.md5(challenge + b"wonderland").hexdigest().encode()
    with pytest.raises(UnhandledCredentials):
        _login(portal, APOPCredentials(challenge, b"alice@example.org", digest))


def test_userRecordReprHasNoPasswordMaterial(users):
    user = resultOf(users.findUser(ALICE))
    assert "wonderland" not in repr(user)
    assert user.passwordHash not in repr(user)
    assert "wonderland" not in repr(StoredCredentials("x", "y", "wonderland"))


# -- addresses ---------------------------------------------------------------


@pytest.mark.parametrize(
    "given, canonical",
    [
        ("alice@example.org", "alice@example.org"),
        ("Alice@Example.ORG", "alice@example.org"),
        ("  alice@example.org\r\n", "alice@example.org"),
        (b"Alice@Example.org", "alice@example.org"),
        ("alice@example.org.", "alice@example.org"),
        ("first.last+tag@sub.example.org", "first.last+tag@sub.example.org"),
        ("o'brien@example.org", "o'brien@example.org"),
        ("x@xn--bcher-kva.example", "x@xn--bcher-kva.example"),
        ("a@localhost", "a@localhost"),
        ("a" * 64 + "@example.org", "a" * 64 + "@example.org"),
        ("a@" + "b" * 63 + ".org", "a@" + "b" * 63 + ".org"),
    ],
)
def test_normalizeAddress(given, canonical):
    assert normalizeAddress(given) == canonical


@pytest.mark.parametrize(
    "given",
    [
        "",
        "alice",
        "alice@",
        "@example.org",
        "alice@@example.org",
        "alice@bob@example.org",
        "al ice@example.org",
        "alice.@example.org",
        ".alice@example.org",
        "al..ice@example.org",
        "alice@-example.org",
        "alice@example-.org",
        "alice@exa_mple.org",
        "alice@example..org",
        "alice@bücher.example",
        # (A UTF-8 local part, ålice@, is an address: test_utf8_users.)
        "ål ice@example.org",
        '"quoted"@example.org',
        "<alice@example.org>",
        "a" * 65 + "@example.org",
        "a@" + "b" * 64 + ".org",
        "a@" + ".".join(["b" * 60] * 5),
        b"\xffalice@example.org",
    ],
)
def test_invalidAddresses(given):
    with pytest.raises(InvalidAddress):
        normalizeAddress(given)


def test_invalidAddressIsAValueError():
    with pytest.raises(ValueError):
        normalizeAddress("nope")


def test_normalizeDomain():
    assert normalizeDomain("Example.ORG.") == "example.org"
    with pytest.raises(InvalidAddress):
        normalizeDomain("")
    with pytest.raises(InvalidAddress):
        normalizeDomain("exa mple.org")


def test_rememberedLoginNeedsNoUserLookup(users):
    """
    A password verified recently is accepted without looking the user up
    again: the only store work of the second login is opening the
    maildrop, which also confirms the stored hash is still the same.
    """
    runner = RecordingRunner()
    store = FaultInjectingStore(users)
    portal = makePortal(store, runner)
    _, _, logout = _login(portal, UsernamePassword(b"bob@example.org", b"builder"))
    logout()
    del store.calls[:]
    _, maildrop, logout = _login(portal, UsernamePassword(b"bob@example.org", b"builder"))
    logout()
    assert maildrop.address == BOB
    assert len(runner.calls) == 1  # one scrypt verification in all
    [(operation, (identity,)), release] = store.calls
    assert operation == "openMaildrop" and release == ("release", ())
    assert identity.passwordHash == resultOf(users.findUser(BOB)).passwordHash


def test_staleRememberedPasswordIsForgotten(users):
    """
    After a password change the old password fails (like any wrong
    password) even though it was remembered, and is no longer remembered.
    """
    portal = makePortal(users, RecordingRunner())
    _, _, logout = _login(portal, UsernamePassword(b"bob@example.org", b"builder"))
    logout()
    assert len(portal.passwordChecker.cache) == 1
    resultOf(users.setCredentials(BOB, makeCredentials("newpass", logN=TEST_HASH_COST)))
    with pytest.raises(UnauthorizedLogin):
        _login(portal, UsernamePassword(b"bob@example.org", b"builder"))
    assert len(portal.passwordChecker.cache) == 0
    # The maildrop was not left locked by the refused login.
    _, _, logout = _login(portal, UsernamePassword(b"bob@example.org", b"newpass"))
    logout()


def test_rememberedPasswordSetAgainStillLogsIn(users, verifications):
    """
    The same password set again (C{mailgate user passwd}, as the README
    asks for SASLprep'd SCRAM keys; or changed and changed back) gets a
    new salt, so the hash it was remembered with is no longer the
    user's: the password is verified again, not refused, and remembered
    with the new hash.
    """
    portal = makePortal(users, RecordingRunner())
    _, _, logout = _login(portal, UsernamePassword(b"bob@example.org", b"builder"))
    logout()
    resultOf(users.setCredentials(BOB, makeCredentials("builder", logN=TEST_HASH_COST)))
    newHash = resultOf(users.findUser(BOB)).passwordHash
    del verifications[:]
    _, maildrop, logout = _login(portal, UsernamePassword(b"bob@example.org", b"builder"))
    logout()
    assert maildrop.address == BOB
    assert verifications == [newHash]
    _, _, logout = _login(portal, UsernamePassword(b"bob@example.org", b"builder"))
    logout()
    assert verifications == [newHash]


def test_rememberedPasswordOfADeletedUserFails(users):
    portal = makePortal(users, RecordingRunner())
    _, _, logout = _login(portal, UsernamePassword(b"bob@example.org", b"builder"))
    logout()
    resultOf(users.deleteUser(BOB))
    with pytest.raises(UnauthorizedLogin):
        _login(portal, UsernamePassword(b"bob@example.org", b"builder"))


def test_staleRememberedPasswordFailsOnBothBackends(databaseURL):
    """
    The hash check that makes remembered logins safe runs where the
    maildrop is locked: on PostgreSQL in the same statement as the lock.
    """
    store = memoryStore(databaseURL)
    try:
        addUser(store, BOB, "builder")
        portal = makePortal(store, RecordingRunner())
        _, _, logout = _login(portal, UsernamePassword(b"bob@example.org", b"builder"))
        resultOf(defer.maybeDeferred(logout))
        resultOf(store.setCredentials(BOB, makeCredentials("newpass", logN=TEST_HASH_COST)))
        with pytest.raises(UnauthorizedLogin):
            _login(portal, UsernamePassword(b"bob@example.org", b"builder"))
        # Not left locked by the refused login.
        _, maildrop, logout = _login(portal, UsernamePassword(b"bob@example.org", b"newpass"))
        assert maildrop.address == BOB
        resultOf(defer.maybeDeferred(logout))
    finally:
        store.close()


@pytest.mark.parametrize(
    "given, realm, address",
    [
        ("alice", "example.org", "alice@example.org"),
        (" Alice ", "example.org", "alice@example.org"),
        (b"alice", "example.org", "alice@example.org"),
        ("alice@example.net", "example.org", "alice@example.net"),
        ("Alice@Example.NET", None, "alice@example.net"),
    ],
)
def test_loginAddressAppliesTheDefaultRealmToBareNamesOnly(given, realm, address):
    from mailgate.address import loginAddress

    assert loginAddress(given, realm) == address


@pytest.mark.parametrize("given, realm", [("alice", None), ("", "example.org"), ("a b", "example.org"), (b"\xff", "example.org")])
def test_loginAddressRefusesWhatNamesNoAddress(given, realm):
    from mailgate.address import loginAddress

    with pytest.raises(InvalidAddress):
        loginAddress(given, realm)
