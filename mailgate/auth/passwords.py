# -*- test-case-name: tests.test_auth -*-
"""
Password material as the database keeps it.

A user's password is stored as an scrypt hash (for USER/PASS and SASL PLAIN)
and as SCRAM-SHA-256 keys (RFC 5803 format, for SASL SCRAM-SHA-256), neither
of which reveals the password.  APOP is the exception: its digest is
MD5(timestamp + secret), so the server must know the secret itself.  Users
who opt in to APOP have their password kept recoverably in C{apop_secret};
README says what that costs.  CRAM-MD5 needs only HMAC-MD5's two states
keyed with the password, which Dovecot's C{{CRAM-MD5}} hash is: users
imported with one keep those states (C{cram_md5}) for CRAM-MD5, as
Dovecot served it to them, even once their first login has replaced the
hash itself.
"""

import base64
import hashlib
import hmac
import os

import attr

from mailgate.auth import foreign
from mailgate.auth.md5state import hmacMD5Context
from mailgate.auth.saslprep import SASLprepError, saslprep

SCRYPT_LOG_N = 15  # 32 MiB and about 0.1 s per hash on a 2020s core
SCRYPT_R = 8
SCRYPT_P = 1
SCRAM_ITERATIONS = 4096  # RFC 7677's minimum recommendation

_PREFIX = "$scrypt$"


@attr.s(frozen=True, slots=True, repr=False)
class StoredCredentials:
    """
    What the store keeps for one password.
    """

    passwordHash = attr.ib()
    scramSha256 = attr.ib(default=None)
    apopSecret = attr.ib(default=None)
    #: HMAC-MD5's states keyed with the password (Dovecot's C{{CRAM-MD5}}
    #: value, 64 hex digits), for CRAM-MD5 without the password in clear
    cramMD5 = attr.ib(default=None)

    def __repr__(self):
        return "<StoredCredentials>"


def _b64(data):
    return base64.b64encode(data).decode("ascii")


def _unb64(text):
    return base64.b64decode(text.encode("ascii"), validate=True)


def _bytes(password):
    return password.encode("utf-8") if isinstance(password, str) else password


def _scrypt(password, salt, logN, r, p):
    return hashlib.scrypt(
        password, salt=salt, n=1 << logN, r=r, p=p, maxmem=256 * r * (1 << logN) + (1 << 20), dklen=32
    )


def hashPassword(password, logN=SCRYPT_LOG_N):
    """
    Hash a password with scrypt, in a PHC-like string:
    C{$scrypt$ln=15,r=8,p=1$<salt>$<hash>}.
    """
    salt = os.urandom(16)
    digest = _scrypt(_bytes(password), salt, logN, SCRYPT_R, SCRYPT_P)
    return f"{_PREFIX}ln={logN},r={SCRYPT_R},p={SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verifyPassword(password, encoded):
    """
    Check a password against a stored hash, in constant time.  Slow by
    design: call it off the reactor thread.

    @return: L{True} if it matches; L{False} if not or if C{encoded} is not
        a hash this version understands.
    """
    if foreign.isForeign(encoded):
        return foreign.verifyForeign(_bytes(password), encoded)
    try:
        logN, r, p, salt, expected = _scryptParameters(encoded)
        actual = _scrypt(_bytes(password), salt, logN, r, p)
    except ValueError:
        return False
    return hmac.compare_digest(actual, expected)


def _scryptParameters(encoded):
    """
    C{(logN, r, p, salt, digest)} of mailgate's own hash.

    @raise ValueError: no password matches C{encoded}, saying why.
    """
    if not encoded.startswith(_PREFIX):
        raise ValueError("no $scrypt$ prefix")
    try:
        params, salt, digest = encoded[len(_PREFIX):].split("$")
        values = dict(item.split("=") for item in params.split(","))
        logN, r, p = int(values["ln"]), int(values["r"]), int(values["p"])
        salt, digest = _unb64(salt), _unb64(digest)
    except (ValueError, KeyError, UnicodeEncodeError):
        raise ValueError("a malformed $scrypt$ string (cut off?)") from None
    # hashlib.scrypt refuses a maxmem of 2**31 or more (ln=20 with r=8).
    if not (1 <= logN <= 22 and 1 <= r <= 32 and 1 <= p <= 16) or 256 * r * (1 << logN) + (1 << 20) >= 2**31 - 1:
        raise ValueError("$scrypt$ parameters out of range")
    if len(digest) != 32:
        raise ValueError("a malformed $scrypt$ string (cut off?)")
    return logN, r, p, salt, digest


def hashProblem(encoded):
    """
    Why no login can check a password against the stored hash C{encoded}
    (L{verifyPassword} refuses every password), or C{None}: for C{db
    check}, which names such users and master users (a hash written by
    hand or by a tool; every login of theirs fails, with nothing saying
    why).  Cheap: nothing is hashed.
    """
    if not encoded:
        return "no hash at all (an empty value)"
    if foreign.isForeign(encoded):
        return foreign.problem(encoded)
    if encoded.startswith(_PREFIX):
        try:
            _scryptParameters(encoded)
        except ValueError as e:
            return str(e)
        return None
    if encoded.startswith("$") or len(encoded) == 13:
        return "a crypt(3) string without the {CRYPT} prefix a login reads it by"
    return "neither mailgate's own $scrypt$ hash nor a {SCHEME} one"


def scramPassword(password):
    """
    The octets SCRAM derives a password's keys from: the password prepared
    with SASLprep, as RFC 5802 asks and as clients built on GNU SASL (mpop)
    prepare it before they prove they know it.  A password SASLprep
    refuses (one with control characters, say), or that is not UTF-8, is
    taken as it is, as PostgreSQL does: its SCRAM works for clients that
    do not prepare it, rather than for none.  So is one SASLprep empties
    (soft hyphens, zero-width spaces: RFC 7613 section 4.2.2 refuses the
    empty result): its keys were the empty password's, and SCRAM with no
    password logged its user in.
    """
    octets = _bytes(password)
    try:
        prepared = saslprep(octets.decode("utf-8")).encode("utf-8")
    except (UnicodeDecodeError, SASLprepError):
        return octets
    return prepared or octets


def scramSha256Secret(password, iterations=SCRAM_ITERATIONS, salt=None):
    """
    SCRAM-SHA-256 verifier keys in the RFC 5803 form
    C{SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>}, of the
    password as L{scramPassword} prepares it.
    """
    salt = os.urandom(16) if salt is None else salt
    salted = hashlib.pbkdf2_hmac("sha256", scramPassword(password), salt, iterations)
    clientKey = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    storedKey = hashlib.sha256(clientKey).digest()
    serverKey = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    return f"SCRAM-SHA-256${iterations}:{_b64(salt)}${_b64(storedKey)}:{_b64(serverKey)}"


def parseScramSecret(encoded):
    """
    Split an RFC 5803 verifier into C{(iterations, salt, storedKey, serverKey)}.

    @raise ValueError: if malformed.
    """
    scheme, params, keys = encoded.split("$")
    if scheme != "SCRAM-SHA-256":
        raise ValueError("not a SCRAM-SHA-256 verifier")
    iterations, salt = params.split(":")
    storedKey, serverKey = keys.split(":")
    return int(iterations), _unb64(salt), _unb64(storedKey), _unb64(serverKey)


def makeCredentials(password, apop=False, logN=SCRYPT_LOG_N, cramMD5=False):
    """
    Everything the store keeps for a new password.

    @param apop: also keep the password recoverably, so APOP can work.
    @param cramMD5: also keep HMAC-MD5's states keyed with it, so CRAM-MD5
        can work (for a user who came from Dovecot with them).
    """
    password = _bytes(password)
    return StoredCredentials(
        passwordHash=hashPassword(password, logN),
        scramSha256=scramSha256Secret(password),
        apopSecret=password.decode("utf-8") if apop else None,
        cramMD5=hmacMD5Context(password).hex() if cramMD5 else None,
    )


def importedCredentials(text, logN=SCRYPT_LOG_N, apop=False, cramMD5=False):
    """
    What the store keeps for a password hash imported from another server
    (L{mailgate.auth.foreign}): the hash as it is, to be replaced by
    mailgate's own at the user's first login; SCRAM-SHA-256 keys where the
    hash is Dovecot's C{{SCRAM-SHA-256}} (so SCRAM works at once); and for
    a password kept in clear (C{{PLAIN}}), mailgate's own hash made now.
    Dovecot's C{{CRAM-MD5}} hash also gives its states for CRAM-MD5 logins,
    which Dovecot served from it.

    @param apop: keep a password in clear recoverable too, for APOP and
        CRAM-MD5, which Dovecot serves only to such users (a hash gets no
        APOP: there is no password to keep).
    @param cramMD5: make HMAC-MD5's states from a password in clear too
        (a user who came from Dovecot with them keeps CRAM-MD5 through
        C{user passwd --hashed {PLAIN}...}, as through a password).
    @raise foreign.UnusableHash: a hash no password can be checked
        against here; its message says why.
    """
    scheme, encoding, value = foreign.splitScheme(text)
    if scheme in foreign.CLEARTEXT:
        password = _importedCleartext(encoding, value)
        return makeCredentials(password, apop=apop, logN=logN, cramMD5=cramMD5)
    foreign.checker(text)
    keys = foreign.scramSha256Keys(text)
    scram = None
    if keys is not None:
        iterations, salt, storedKey, serverKey = keys
        scram = f"SCRAM-SHA-256${iterations}:{_b64(salt)}${_b64(storedKey)}:{_b64(serverKey)}"
    stored = importedHash(text)
    return StoredCredentials(passwordHash=stored, scramSha256=scram, cramMD5=foreign.cramMD5Context(text))


def importedHash(text):
    """
    The password hash L{importedCredentials} keeps for a hash imported
    from another server (a crypt(3) string without a scheme as
    C{{CRYPT}}); never what it keeps for a password in clear.
    """
    return text if text.startswith("{") else "{CRYPT}" + text


def _importedCleartext(encoding, value):
    """
    The password of a C{{PLAIN}}-like value, refused as L{importedCredentials} refuses it.
    """
    password = foreign.cleartext(encoding, value)
    if not password:
        raise foreign.UnusableHash("an empty password")
    try:
        password.decode("utf-8")
    except UnicodeDecodeError:
        # What POP3 clients send is UTF-8 text (and APOP keeps text).
        raise foreign.UnusableHash("the password in clear is not UTF-8 text") from None
    return password


def checkImportable(text):
    """
    Refuse what L{importedCredentials} would refuse, without making
    mailgate's own hash of a password in clear: that costs what a login's
    check costs (scrypt and SCRAM's keys, about a quarter of a second),
    and C{user import} need not pay it for a user who is there already
    (a passwd-file of 50,000 C{{PLAIN}} users, imported again, spent
    some three and a half hours on hashes it threw away).

    @raise foreign.UnusableHash: as L{importedCredentials}.
    """
    scheme, encoding, value = foreign.splitScheme(text)
    if scheme in foreign.CLEARTEXT:
        _importedCleartext(encoding, value)
    else:
        importedCredentials(text)


def needsUpgrade(encoded):
    """
    Whether a stored hash is to be replaced by mailgate's own at the next
    successful login (one imported from another server).
    """
    return foreign.isForeign(encoded)


_dummy = {}


def dummyHash(logN=SCRYPT_LOG_N):
    """
    A hash no password matches, with default parameters: verifying against
    it costs what verifying a real user's password costs, so an unknown user
    cannot be told from a wrong password by timing.

    Made of a random salt and a random digest, not by hashing a random
    password: that cost a second scrypt on the first unknown user's login
    of each process, which then took twice as long as a wrong password's
    (with a short C{--auth-failure-delay}, a name tried first after a
    restart could be told apart).
    """
    if logN not in _dummy:
        _dummy[logN] = (
            f"{_PREFIX}ln={logN},r={SCRYPT_R},p={SCRYPT_P}${_b64(os.urandom(16))}${_b64(os.urandom(32))}"
        )
    return _dummy[logN]
