# -*- test-case-name: tests.test_foreign_hashes -*-
"""
Password hashes other servers made: Dovecot's schemes, so that users move
to mailgate with the passwords they have.

Dovecot writes a hash as C{{SCHEME}value} (C{doveadm pw -s SCHEME}); a
passwd-file may also hold a bare crypt(3) string (C{$6$...}), its default
scheme being C{CRYPT}.  mailgate keeps such a hash as it is (a "foreign"
hash), checks logins against it, and replaces it with its own (scrypt and
SCRAM-SHA-256 keys) at the user's first successful login, when the
password is at hand (L{mailgate.auth.checkers.PasswordChecker}).

The crypt(3) family is checked by passlib (MD5-, SHA256-, SHA512- and
DES-CRYPT), bcrypt (BLF-CRYPT) and the system's crypt(3) (yescrypt,
L{mailgate.auth.systemcrypt}), Argon2 by argon2-cffi; the salted and
plain digests and PBKDF2 and SCRAM keys by C{hashlib}, CRAM-MD5's HMAC-MD5
context by L{mailgate.auth.md5state}.  Schemes mailgate does not check
(DIGEST-MD5, made with the user name and realm; PLAIN-MD4, NTLM and
LANMAN; OTP, RPA) are refused when the hash is imported, with the reason.
"""

import base64
import binascii
import hashlib
import hmac
import re

from mailgate.auth.md5state import hmacMD5Context

# The libraries of the crypt(3), bcrypt and Argon2 schemes (passlib, bcrypt,
# argon2-cffi, the system's libcrypt through ctypes) are imported in the
# functions that check those hashes: only users imported with one need
# them, and every start of the server and of the admin command imports
# this module (some 25 ms of imports otherwise).

_BCRYPT = re.compile(r"\$2[aby]\$[0-3][0-9]\$[./A-Za-z0-9]{53}\Z")

#: schemes whose value is the password itself (turned into mailgate's own
#: hash as they are imported)
CLEARTEXT = frozenset({"PLAIN", "CLEAR", "CLEARTEXT"})


class UnusableHash(ValueError):
    """
    A hash mailgate cannot check passwords against; its message says why.

    @ivar reason: why, without the advice the message may add (C{db check}
        names a user's or a master user's hash by it, with its own advice).
    """

    def __init__(self, reason, advice=None):
        super().__init__(reason if advice is None else f"{reason}; {advice}")
        self.reason = reason


def isForeign(encoded):
    """
    Whether a stored hash is one imported from another server.
    """
    return isinstance(encoded, str) and encoded.startswith("{")


def splitScheme(text):
    """
    C{(scheme, encoding, value)} of a hash as Dovecot writes it: the
    scheme's name in capitals, its encoding suffix (C{"HEX"}, C{"B64"}, or
    C{None}), and the rest.  A bare crypt(3) string is C{CRYPT}.

    @raise UnusableHash: no scheme, and no crypt(3) string either.
    """
    if text.startswith("{"):
        end = text.find("}")
        if end < 0:
            raise UnusableHash("the {SCHEME} prefix is not closed")
        name, value = text[1:end].upper(), text[end + 1:]
        scheme, _, encoding = name.partition(".")
        if encoding == "BASE64":
            encoding = "B64"
        if encoding not in ("", "HEX", "B64"):
            raise UnusableHash(f"unknown encoding .{encoding} of {scheme}")
        return scheme, encoding or None, value
    if text.startswith("$") or len(text) == 13:
        return "CRYPT", None, text
    raise UnusableHash("not a hash: no {SCHEME} prefix, and no crypt(3) string either")


def cleartext(encoding, value):
    """
    The password (octets) of a C{{PLAIN}} hash: C{value} itself, or
    decoded from the C{.B64} or C{.HEX} encoding C{{PLAIN.B64}} names, as
    Dovecot reads it (not the encoded text, which no user types).

    @raise UnusableHash: not valid in its encoding.
    """
    if encoding is None:
        return value.encode("utf-8")
    return _decode(value, encoding)


def _crypt(value, validate=True):
    """
    The checker of a crypt(3) string, found by its prefix.

    @param validate: whether to make sure the system's crypt(3) can check
        one only it computes (which costs a hash).
    """
    from mailgate.auth import systemcrypt
    from mailgate.auth.cryptschemes import HANDLERS

    if value.startswith(("$2a$", "$2b$", "$2y$")):
        if not _BCRYPT.match(value):
            raise UnusableHash("a malformed bcrypt string")
        return _bcrypt
    for handler in HANDLERS:
        if handler.identify(value):
            return handler.verify
    if value.startswith(systemcrypt.PREFIXES):
        if validate and not systemcrypt.usable(value):
            raise UnusableHash("a yescrypt (or $7$, $gy$) string this system's crypt(3) cannot check, or cut off")
        return lambda password, value: systemcrypt.verify(password, value)
    raise UnusableHash("not a crypt(3) string mailgate knows ($1$, $5$, $6$, $2y$, $y$ or DES)")


def _bcrypt(password, value):
    import bcrypt

    # crypt(3) uses the first 72 octets of a password, as bcrypt always
    # did; the bcrypt package refuses longer ones rather than cut them.
    return bcrypt.checkpw(password[:72], value.replace("$2y$", "$2b$", 1).encode("ascii"))


def _argon2(password, value):
    import argon2

    try:
        return argon2.PasswordHasher().verify(value, password)
    except argon2.exceptions.VerificationError:
        return False


#: digests of the password (and salt): the hash function (the encoding,
#: hex or base64, is read from the value, as Dovecot reads it: PLAIN-MD5
#: is written in hex and LDAP-MD5 in base64, but each takes the other)
_DIGESTS = {
    "SHA": hashlib.sha1,
    "SHA1": hashlib.sha1,
    "SHA256": hashlib.sha256,
    "SHA512": hashlib.sha512,
    "LDAP-MD5": hashlib.md5,
    "PLAIN-MD5": hashlib.md5,
}
_SALTED = {
    "SSHA": hashlib.sha1,
    "SSHA256": hashlib.sha256,
    "SSHA512": hashlib.sha512,
    "SMD5": hashlib.md5,
}
_SCRAM = {"SCRAM-SHA-1": hashlib.sha1, "SCRAM-SHA-256": hashlib.sha256}

#: schemes whose value is a crypt(3) string (MD5: when it is one)
_CRYPTS = ("CRYPT", "MD5-CRYPT", "MD5", "SHA256-CRYPT", "SHA512-CRYPT", "BLF-CRYPT", "DES-CRYPT")


def _decode(value, encoding, size=None):
    """
    The octets of a digest written in C{encoding}; one of exactly
    C{2 * size} hexadecimal digits is read as hex whatever the scheme says,
    as Dovecot reads it.
    """
    try:
        if encoding == "HEX" or (size is not None and len(value) == 2 * size and _isHex(value)):
            return bytes.fromhex(value)
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (ValueError, binascii.Error, UnicodeEncodeError):
        raise UnusableHash("the digest is not valid hex or base64") from None


def _isHex(text):
    return all(c in "0123456789abcdefABCDEF" for c in text)


#: the longest SCRAM salt an imported hash may have, in octets
MAX_SCRAM_SALT = 1024


def _scramKeys(scheme, value):
    """
    C{(iterations, salt, storedKey, serverKey)} of Dovecot's SCRAM value,
    C{iterations,salt,storedKey,serverKey} in base64.
    """
    try:
        iterations, salt, stored, server = value.split(",")
        iterations = int(iterations)
        keys = tuple(base64.b64decode(x.encode("ascii"), validate=True) for x in (salt, stored, server))
    except (ValueError, binascii.Error, UnicodeEncodeError):
        raise UnusableHash(f"not a {scheme} value (iterations,salt,storedKey,serverKey)") from None
    size = _SCRAM[scheme]().digest_size
    # A salt of at most 1 KiB (Dovecot's are 16 octets): the salt names
    # that are no user are told is made as long as the users' are, at
    # every exchange (mailgate.auth.sasl.madeUpParameters).
    salt, stored, server = keys
    if not 1 <= iterations <= 10_000_000 or len(salt) > MAX_SCRAM_SALT or {len(stored), len(server)} != {size}:
        raise UnusableHash(f"not a {scheme} value (iterations,salt,storedKey,serverKey)")
    return (iterations, *keys)


def scramSha256Keys(text):
    """
    The SCRAM-SHA-256 keys of a Dovecot C{{SCRAM-SHA-256}} hash, as
    C{(iterations, salt, storedKey, serverKey)}, or C{None} for a hash of
    another scheme: a user imported with them logs in with SCRAM at once.
    """
    scheme, _, value = splitScheme(text)
    return _scramKeys(scheme, value) if scheme == "SCRAM-SHA-256" else None


_CRAM = ("CRAM-MD5", "HMAC-MD5")


def _cramContext(scheme, encoding, value):
    context = _decode(value, encoding or "HEX", 32)
    if len(context) != 32:
        raise UnusableHash(f"a {scheme} context of the wrong length")
    return context


def cramMD5Context(text):
    """
    The HMAC-MD5 states (64 hex digits) of a Dovecot C{{CRAM-MD5}} (or
    C{{HMAC-MD5}}) hash, or C{None} for a hash of another scheme: a user
    imported with them logs in with CRAM-MD5 as Dovecot let them.
    """
    scheme, encoding, value = splitScheme(text)
    return _cramContext(scheme, encoding, value).hex() if scheme in _CRAM else None


def _pbkdf2(value):
    # Dovecot's PBKDF2: $1$<salt as text>$<rounds>$<hex of PBKDF2-HMAC-SHA1>
    parts = value.split("$")
    if len(parts) != 5 or parts[0] or parts[1] != "1":
        raise UnusableHash("not a PBKDF2 value ($1$salt$rounds$hex)")
    try:
        rounds, digest = int(parts[3]), bytes.fromhex(parts[4])
    except ValueError:
        raise UnusableHash("not a PBKDF2 value ($1$salt$rounds$hex)") from None
    if not 1 <= rounds <= 10_000_000 or not digest:
        raise UnusableHash("not a PBKDF2 value ($1$salt$rounds$hex)")
    return parts[2].encode("utf-8"), rounds, digest


def checksScheme(name):
    """
    Whether passwords hashed in the scheme C{name} (C{SHA512-CRYPT},
    C{PLAIN.HEX}, as inside a hash's C{{...}} prefix) are ones mailgate
    checks: what C{user import --scheme} may name, told before any line
    is read rather than as every line's failure.
    """
    try:
        scheme, _, _ = splitScheme("{" + name + "}")
    except UnusableHash:
        return False
    return scheme in CLEARTEXT or scheme in _CRYPTS or scheme in ("ARGON2I", "ARGON2ID", "PBKDF2") or any(
        scheme in table for table in (_DIGESTS, _SALTED, _SCRAM, _CRAM)
    )


def checker(text, validate=True):
    """
    A function C{check(password)} (the password in octets) telling whether
    the password is the one hashed in C{text}.

    @param validate: also try a crypt(3) string once, so that a malformed
        one (a hash cut off when copied) is refused as it is imported, not
        at every login.
    @raise UnusableHash: a scheme or value mailgate cannot check against.
    """
    scheme, encoding, value = splitScheme(text)
    if scheme == "MD5" and not value.startswith("$1$"):
        # Dovecot's MD5 is MD5-CRYPT, or else an MD5 digest in hex or
        # base64: LDAP's {MD5}, as slappasswd and SQL passdbs write it.
        scheme = "PLAIN-MD5"
    if scheme in CLEARTEXT:
        expected = cleartext(encoding, value)
        return lambda password: hmac.compare_digest(password, expected)
    if scheme in _CRYPTS:
        verify = _crypt(value, validate)
        if validate:
            try:
                verify(b"", value)
            except ValueError:
                raise UnusableHash(f"a malformed {scheme} string") from None
        return lambda password: verify(password, value)
    if scheme in ("ARGON2I", "ARGON2ID"):
        import argon2

        try:
            argon2.extract_parameters(value)
        except argon2.exceptions.InvalidHashError:
            raise UnusableHash(f"a malformed {scheme} string") from None
        return lambda password: _argon2(password, value)
    if scheme in _DIGESTS:
        function = _DIGESTS[scheme]
        expected = _decode(value, encoding, function().digest_size)
        if len(expected) != function().digest_size:
            raise UnusableHash(f"a {scheme} digest of the wrong length")
        return lambda password: hmac.compare_digest(function(password).digest(), expected)
    if scheme in _SALTED:
        function = _SALTED[scheme]
        size = function().digest_size
        data = _decode(value, encoding or "B64")
        if len(data) <= size:
            raise UnusableHash(f"a {scheme} value without its salt")
        expected, salt = data[:size], data[size:]
        return lambda password: hmac.compare_digest(function(password + salt).digest(), expected)
    if scheme == "PBKDF2":
        salt, rounds, expected = _pbkdf2(value)
        return lambda password: hmac.compare_digest(
            hashlib.pbkdf2_hmac("sha1", password, salt, rounds, len(expected)), expected
        )
    if scheme in _SCRAM:
        function = _SCRAM[scheme]
        iterations, salt, storedKey, _ = _scramKeys(scheme, value)

        def check(password):
            salted = hashlib.pbkdf2_hmac(function().name, password, salt, iterations)
            clientKey = hmac.new(salted, b"Client Key", function).digest()
            return hmac.compare_digest(function(clientKey).digest(), storedKey)

        return check
    if scheme in _CRAM:
        # Dovecot keeps HMAC-MD5's two MD5 states keyed with the password
        # (for CRAM-MD5 logins); the same states made from the password
        # given at a login prove it, as Dovecot checks a plaintext one.
        expected = _cramContext(scheme, encoding, value)
        return lambda password: hmac.compare_digest(hmacMD5Context(password), expected)
    if scheme in ("DIGEST-MD5", "PLAIN-MD4", "NTLM", "LANMAN", "OTP", "RPA", "SKEY"):
        raise UnusableHash(f"scheme {scheme} is not one mailgate checks", "set a new password (mailgate user passwd)")
    raise UnusableHash(f"unknown scheme {scheme}")


#: what a scheme's name (and encoding) inside C{{...}} is made of
_SCHEME_NAME = re.compile(r"[A-Za-z0-9.-]{1,40}\Z")

#: a crypt(3) string's hash, in its alphabet, as the system's methods
#: (L{mailgate.auth.systemcrypt.PREFIXES}) end every one
_SYSTEM_CRYPT_HASH = re.compile(r"\$[./0-9A-Za-z]{43}\Z")


def problem(text):
    """
    Why no login can check a password against the foreign hash C{text}
    (L{verifyForeign} would refuse every password), or C{None}: for
    C{db check}, cheaply (no password is hashed: some 100,000 users'
    hashes are judged in a second or two).

    The judgement is L{checker}'s as a login runs it, with what the check
    itself would refuse of a crypt(3) string parsed without hashing (one
    cut off, a bcrypt cost the library refuses); of the system's methods
    (yescrypt), only that it ends with a whole hash.  Never the hash in the
    words: a name between the braces that is no scheme's is not repeated.
    """
    end = text.find("}")
    if end > 0 and not _SCHEME_NAME.match(text[1:end]):
        return "its {SCHEME} prefix names no scheme"
    try:
        scheme, _, value = splitScheme(text)
        checker(text, validate=False)
        if scheme in _CRYPTS and not (scheme == "MD5" and not value.startswith("$1$")):
            _parsedCrypt(scheme, value)
    except UnusableHash as e:
        return e.reason
    return None


def _parsedCrypt(scheme, value):
    """
    Refuse a crypt(3) string that its check (L{_crypt}'s) would refuse
    whatever the password, as far as it can be told without hashing.
    """
    from mailgate.auth.cryptschemes import HANDLERS

    if value.startswith(("$2a$", "$2b$", "$2y$")):
        if not 4 <= int(value[4:6]) <= 31:
            raise UnusableHash(f"a {scheme} string of a cost bcrypt refuses")
        return
    for handler in HANDLERS:
        if handler.identify(value):
            try:
                whole = handler.from_string(value).checksum is not None
            except ValueError:
                whole = False
            if not whole:
                raise UnusableHash(f"a malformed {scheme} string (cut off?)")
            return
    if not _SYSTEM_CRYPT_HASH.search(value):
        raise UnusableHash(f"a malformed {scheme} string (cut off?)")


def verifyForeign(password, text):
    """
    Whether C{password} (octets) is the one hashed in C{text}, a foreign
    hash; C{False} for a hash mailgate cannot check.  Slow by design for
    most schemes: call it off the reactor thread.
    """
    try:
        return bool(checker(text, validate=False)(password))
    except ValueError:
        return False
