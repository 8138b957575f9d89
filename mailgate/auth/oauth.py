# -*- test-case-name: tests.test_oauth -*-
"""
OAuth 2.0 bearer tokens for POP3 AUTH: the SASL mechanisms OAUTHBEARER
(RFC 7628) and XOAUTH2 (Google's and Microsoft's, which most clients
speak), with access tokens that are JWTs validated here, against signing
keys the configuration names (Dovecot's oauth2 passdb with
C{local_validation_key_dict}): no call to the identity provider per login.

A token is accepted when its signature is one of the configured keys'
with an allowed algorithm (never C{none}, never an HMAC: a public key is
no shared secret), its issuer and audience are configured ones, it has
not expired and is valid already (C{exp}, C{nbf}, C{iat}, within the
clock-skew allowance), and its user claim (C{email} by default) names a
user of mailgate's, read as a USER name is (case, the default realm).
Every refusal is the same L{UnauthorizedLogin} as a wrong password's.

A token is a password: the mechanisms are offered where PLAIN is (over
TLS, or from a trusted network), and no token, nor any part of one, is
ever logged.
"""

import json
import math
import time

import attr
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ICredentials
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from zope.interface import Attribute, implementer

from mailgate.address import loginAddress
from mailgate.auth.saslsteps import Authenticate, Challenge, SASLError
from mailgate.errors import ConfigurationError, InvalidAddress
from mailgate.owners import permissionsOf

#: The longest access token taken, in octets: Microsoft's and Keycloak's
#: JWTs are one to three kilobytes (more with many groups); one this long
#: is no token of theirs.  A longer one is refused before it is parsed.
MAX_TOKEN = 8192

#: The longest SASL response line of these mechanisms, in octets (the
#: base64 of a token of L{MAX_TOKEN} and its framing, CRLF included):
#: longer than POP3's other SASL responses (L{mailgate.pop3.POP3Server.maxResponseLength}).
MAX_RESPONSE_LINE = 4 * ((MAX_TOKEN + 512 + 2) // 3) + 2

#: The algorithms a key may be configured for; HS* (a shared secret) and
#: C{none} are not among them.
ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
DEFAULT_ALGORITHMS = ("RS256", "ES256", "EdDSA")

_CURVES = {"ES256": ec.SECP256R1, "ES384": ec.SECP384R1, "ES512": ec.SECP521R1}


class InvalidToken(Exception):
    """
    The token is not accepted (the reason is for tests and debugging:
    never shown to the client, never logged with the token).
    """


def _fits(key, algorithm):
    """
    Whether C{key} (a public key) verifies signatures of C{algorithm}: an
    RSA key RS* and PS*, an EC key the ES* of its curve, an Edwards key
    EdDSA.  A key never verifies another family's signature.
    """
    if algorithm[:2] in ("RS", "PS"):
        return isinstance(key, rsa.RSAPublicKey)
    if algorithm in _CURVES:
        return isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, _CURVES[algorithm])
    if algorithm == "EdDSA":
        return isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey))
    return False


def _signatureLength(token):
    """
    The octets of C{token}'s signature (its third segment is unpadded
    base64url), without decoding it; C{None} when it cannot be one.
    """
    segment = token.rpartition(b".")[2]
    if len(segment) % 4 == 1:
        return None
    return len(segment) * 3 // 4


def _signatureLengthOf(key):
    """
    The octets of a signature made by C{key}'s private key (RFC 7518: an
    RSA signature is as long as the modulus, an ECDSA one is the two
    coordinates' size each, RFC 8037's Ed25519 and Ed448 64 and 114).
    """
    if isinstance(key, rsa.RSAPublicKey):
        return (key.key_size + 7) // 8
    if isinstance(key, ec.EllipticCurvePublicKey):
        return 2 * ((key.curve.key_size + 7) // 8)
    if isinstance(key, ed25519.Ed25519PublicKey):
        return 64
    return 114


@attr.s(frozen=True)
class SigningKey:
    """
    A public key tokens may be signed with, and its C{kid} (a JWKS's), or
    C{None}.
    """

    key = attr.ib()
    kid = attr.ib(default=None)


_SUPPORTED_KEYS = (rsa.RSAPublicKey, ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)


def _publicKey(key, where):
    if hasattr(key, "public_key") and not isinstance(key, _SUPPORTED_KEYS):
        key = key.public_key()
    if not isinstance(key, _SUPPORTED_KEYS):
        raise ConfigurationError(f"{where}: not an RSA, EC or Ed25519/Ed448 public key")
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < 2048:
        raise ConfigurationError(f"{where}: an RSA key of {key.key_size} bits (at least 2048 are needed)")
    return key


def _jwksKeys(document, path):
    # PyJWT is imported where used: only a server with --oauth2-keys needs it; every start imports this module.
    import jwt

    entries = document.get("keys") if isinstance(document, dict) and "keys" in document else [document]
    if not isinstance(entries, list):
        raise ConfigurationError(f"oauth2-keys: {path}: \"keys\" is not a list")
    keys = []
    for number, entry in enumerate(entries, 1):
        where = f"oauth2-keys: {path}: key {number}"
        if not isinstance(entry, dict):
            raise ConfigurationError(f"{where}: not a JSON object")
        if entry.get("use", "sig") != "sig" or entry.get("kty") == "oct":
            # An encryption key, or a shared secret: never a signature's.
            continue
        if "d" in entry:
            # The provider's signing key itself (an RSA, EC or OKP JWK's
            # private part): refused as a PEM private key is, not taken
            # for its public half and kept in the server's memory.
            raise ConfigurationError(f"{where}: a private key (its \"d\"): a private key is never needed, "
                                     "only the provider's public keys (its jwks_uri)")
        try:
            key = jwt.PyJWK(entry).key
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError) as e:
            raise ConfigurationError(f"{where}: not a usable JWK ({e})") from None
        kid = entry.get("kid")
        keys.append(SigningKey(_publicKey(key, where), kid if isinstance(kid, str) else None))
    return keys


_PEM_BEGIN = b"-----BEGIN "


def _pemKeys(data, path):
    keys = []
    for number, block in enumerate(data.split(_PEM_BEGIN)[1:], 1):
        block = _PEM_BEGIN + block
        where = f"oauth2-keys: {path}: PEM block {number}"
        try:
            if block.startswith(b"-----BEGIN CERTIFICATE-----"):
                key = x509.load_pem_x509_certificate(block).public_key()
            elif block.startswith(b"-----BEGIN PUBLIC KEY-----") or block.startswith(b"-----BEGIN RSA PUBLIC KEY-----"):
                key = load_pem_public_key(block)
            else:
                raise ConfigurationError(f"{where}: not a public key or a certificate (a private key is never needed)")
        except ValueError as e:
            raise ConfigurationError(f"{where}: cannot be read ({e})") from None
        keys.append(SigningKey(_publicKey(key, where)))
    return keys


def loadSigningKeys(paths):
    """
    The public keys of the files C{paths}: each a JWKS (C{{"keys": [...]}}
    as an identity provider publishes it at its C{jwks_uri}), one JWK, or
    PEM public keys and certificates.

    @raise ConfigurationError: a file cannot be read or holds no usable key.
    """
    keys = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                data = f.read(1 << 20)
        except OSError as e:
            raise ConfigurationError(f"oauth2-keys: cannot read {path}: {e.strerror or e}") from None
        if data.lstrip().startswith(b"{"):
            try:
                document = json.loads(data)
            except ValueError as e:
                raise ConfigurationError(f"oauth2-keys: {path}: not JSON ({e})") from None
            found = _jwksKeys(document, path)
        else:
            found = _pemKeys(data, path)
        if not found:
            raise ConfigurationError(f"oauth2-keys: {path}: no signing key in it (a JWKS, a JWK or PEM public keys)")
        keys.extend(found)
    return keys


def keyFileWarning(path):
    """
    What to warn of, if anything, in who may change the oauth2-keys file
    C{path}: others than its owner may write it.  Its keys are public
    (every user may read them), but whoever may write the file may put a
    key of their own in it, and from the next reload (a SIGHUP, such as
    logrotate's) sign tokens that log in as any user.  Warned of, not
    refused, as a TLS private key others may replace is
    (L{mailgate.tls.keyFileWarning}).
    """
    permissions = permissionsOf(path)
    if permissions is not None and permissions & 0o022:
        return (
            f"the OAuth 2.0 key file {path} may be replaced by others than its owner (mode {permissions:04o}), "
            f"who could put a key of their own in it and log in as any user: chmod go-w it"
        )
    return None


class TokenValidator:
    """
    Validates JWT access tokens against the configured keys and claims.

    @param keyFiles: the files of L{loadSigningKeys}; read now, and again
        by L{reload} (SIGHUP), as an identity provider rotates its keys.
    @param issuers: the accepted C{iss} values (compared exactly).
    @param audiences: the accepted C{aud} values (one is enough).
    @param algorithms: the accepted C{alg}s, among L{ALGORITHMS}.
    @param leeway: seconds of clock skew allowed on C{exp}, C{nbf}, C{iat}.
    @param usernameClaim: the claim naming the user.
    @param clock: seconds since the epoch (tests give their own).
    @ivar keyWarnings: the warnings of L{keyFileWarning} for the key
        files, as last read.
    """

    def __init__(self, keyFiles, issuers, audiences, algorithms=DEFAULT_ALGORITHMS, leeway=60,
                 usernameClaim="email", clock=time.time):
        bad = [name for name in algorithms if name not in ALGORITHMS]
        if bad:
            raise ConfigurationError(f"oauth2-algorithm: {bad[0]!r} is not one of {', '.join(ALGORITHMS)}")
        if not issuers or not audiences:
            raise ConfigurationError("oauth2-keys needs oauth2-issuer and oauth2-audience")
        self._keyFiles = tuple(keyFiles)
        self._issuers = frozenset(issuers)
        self._audiences = list(audiences)
        self._algorithms = tuple(algorithms)
        self._leeway = leeway
        self._claim = usernameClaim
        self._clock = clock
        self.keys = self._usableKeys()

    def reload(self):
        """
        Read the key files again (SIGHUP); on failure the keys in service
        stay, and the error is raised for the reload to report.
        """
        self.keys = self._usableKeys()

    def adopt(self, other):
        """
        Take C{other}'s key files, keys, issuers, audiences, algorithms,
        clock-skew allowance and user claim, all at once (a SIGHUP changed
        oauth2-* settings while OAuth stays on; C{other} was made from
        them, so they are ones a start takes).  A token is judged wholly by
        the settings in service when it is presented: L{validate} runs on
        the reactor thread from start to end, as this does, so never by
        some of the old settings and some of the new ones.
        """
        self._keyFiles, self._issuers, self._audiences = other._keyFiles, other._issuers, other._audiences
        self._algorithms, self._leeway, self._claim = other._algorithms, other._leeway, other._claim
        self.keys = other.keys
        self.keyWarnings = other.keyWarnings

    def _usableKeys(self):
        """
        The keys of the key files, refused as a whole when none of them
        verifies any accepted algorithm (RSA keys with only ES256 and
        EdDSA accepted, say): every login would fail, each for a reason
        only the log would give, where a start or a reload that says so
        at once is what an administrator can act on.
        """
        keys = loadSigningKeys(self._keyFiles)
        if not any(_fits(k.key, algorithm) for k in keys for algorithm in self._algorithms):
            raise ConfigurationError(
                f"oauth2-keys: no key in {', '.join(self._keyFiles)} verifies any oauth2-algorithm accepted "
                f"({', '.join(self._algorithms)})"
            )
        self.keyWarnings = [warning for warning in map(keyFileWarning, self._keyFiles) if warning]
        return keys

    def validate(self, token):
        """
        The user claim of C{token} (L{bytes}), once it is accepted.

        @raise InvalidToken: it is not.
        """
        import jwt  # where it is used, as in _jwksKeys

        if len(token) > MAX_TOKEN:
            raise InvalidToken("token too long")
        # A signature is exactly as long as its key makes them: one longer
        # than any key makes (a hostile token's kilobytes of it) is
        # refused before PyJWT decodes anything, 0.25 ms for a token of
        # MAX_TOKEN (PyJWT checks each character), more for each key it
        # is decoded again for.
        length = _signatureLength(token)
        if length is not None and length > max(_signatureLengthOf(k.key) for k in self.keys):
            raise InvalidToken("signature longer than any configured key makes")
        try:
            header = jwt.get_unverified_header(token)
        except (jwt.PyJWTError, ValueError, RecursionError):
            # RecursionError: a header of JSON nested deeper than the
            # parser goes ("[[[[..."), which PyJWT before 2.10 let out.
            raise InvalidToken("malformed token") from None
        if "crit" in header:
            # RFC 7515 section 4.1.11: a token naming extensions it needs
            # understood is refused by a verifier that knows none (PyJWT
            # before 2.10 ignored crit).
            raise InvalidToken("critical header extension")
        algorithm = header.get("alg")
        if algorithm not in self._algorithms:
            raise InvalidToken(f"algorithm {str(algorithm)[:32]!r} not accepted")
        kid = header.get("kid")
        candidates = [k for k in self.keys if _fits(k.key, algorithm)]
        named = [k for k in candidates if kid is not None and k.kid == kid]
        # A token naming a key is checked with that key; one naming a key
        # the configuration does not name (or none) with those without a
        # name (PEM keys), or every key when it names none.
        candidates = named or [k for k in candidates if kid is None or k.kid is None]
        # And only the keys that make signatures of its length.
        candidates = [k for k in candidates if _signatureLengthOf(k.key) == length]
        if not candidates:
            raise InvalidToken("no configured key verifies the signature")
        now = self._clock()
        for key in candidates:
            try:
                claims = jwt.decode(
                    token, key.key, algorithms=[algorithm], audience=self._audiences, leeway=self._leeway,
                    options={"require": ["exp", "iss", "aud"], "verify_iat": False, "verify_exp": False,
                             "verify_nbf": False},
                )
            except jwt.InvalidSignatureError:
                continue
            except jwt.PyJWTError as e:
                raise InvalidToken(f"{type(e).__name__}: {e}") from None
            return self._checkClaims(claims, now)
        raise InvalidToken("no configured key verifies the signature")

    def _checkClaims(self, claims, now):
        # The times are checked here, against this validator's clock, the
        # same way whatever PyJWT's version checks (2.10 began checking
        # that iat is not in the future).
        leeway = self._leeway
        for name in ("exp", "nbf", "iat"):
            value = claims.get(name)
            if name in claims and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise InvalidToken(f"{name} is not a number")
            if isinstance(value, float) and not math.isfinite(value):
                # JSON's 1e400 is infinity, and Python reads NaN: compared,
                # neither ever expires (nor is ever "not yet valid").
                raise InvalidToken(f"{name} is not a finite number")
        if claims["exp"] <= now - leeway:
            raise InvalidToken("expired")
        if "nbf" in claims and claims["nbf"] > now + leeway:
            raise InvalidToken("not yet valid")
        if "iat" in claims and claims["iat"] > now + leeway:
            raise InvalidToken("issued in the future")
        if not isinstance(claims["iss"], str) or claims["iss"] not in self._issuers:
            # (A list's or an object's iss is no string, and no set member.)
            raise InvalidToken("issuer not accepted")
        name = claims.get(self._claim)
        if not isinstance(name, str) or not name:
            raise InvalidToken(f"no {self._claim} claim")
        if self._claim == "email" and claims.get("email_verified") in (False, "false"):
            # The provider says it has not checked that this address is
            # the user's (a self-registered account, a profile's editable
            # e-mail): it names no mailbox.
            raise InvalidToken("email not verified")
        return name


class IBearerTokenCredentials(ICredentials):
    """
    An OAuth 2.0 bearer token, and the user the client said it logs in as.
    """

    username = Attribute("The user name the client gave (L{bytes}), or C{b''}: OAUTHBEARER's authzid may be absent.")
    token = Attribute("The access token (L{bytes}).")


@implementer(IBearerTokenCredentials)
class BearerTokenCredentials:
    def __init__(self, token, username=b""):
        self.token = token
        self.username = username

    def __repr__(self):
        # Never the token, in a traceback or a log.
        return f"<BearerTokenCredentials username={self.username!r}>"


@implementer(ICredentialsChecker)
class BearerTokenChecker:
    """
    Checks L{BearerTokenCredentials}: the token valid (L{TokenValidator}),
    its user a user of mailgate's, and the name the client gave (if any)
    that user.

    A bad token and a good one for an unknown user take the same way: the
    signature checked, then one lookup in the store (of the name the
    client gave, for a bad token), then the same L{UnauthorizedLogin}; the
    failure delay (C{--auth-failure-delay}), which counts from the login's
    question, evens out the rest.
    """

    credentialInterfaces = (IBearerTokenCredentials,)

    def __init__(self, store, validator, defaultRealm=None):
        self._store = store
        self._validator = validator
        self._defaultRealm = defaultRealm

    def _address(self, name):
        try:
            return loginAddress(name, self._defaultRealm)
        except (InvalidAddress, UnicodeDecodeError):
            return None

    @defer.inlineCallbacks
    def requestAvatarId(self, credentials):
        given = self._address(credentials.username) if credentials.username else None
        try:
            claimed = self._validator.validate(credentials.token)
        except InvalidToken as e:
            address, why = None, f"token refused: {e}"
        else:
            address = self._address(claimed)
            # A signed token's user is the provider's word: named.
            why = "the token's user is no address" if address is None else f"no such user {address!r}"
        lookup = address or given
        user = (yield self._store.findUser(lookup)) if lookup else None
        # Why, for the server's log alone (the client's answer is the same
        # for every cause): an expired token and a wrong audience are for
        # an administrator to tell apart.  Never any part of the token.
        if address is None or user is None:
            raise UnauthorizedLogin(why)
        if credentials.username and given != address:
            # Authorising as another user is not supported.
            raise UnauthorizedLogin(f"the name given is not the token's user {address!r}")
        return user


class _BearerMechanism:
    """
    What OAUTHBEARER and XOAUTH2 share: one message carrying the token, and
    on failure an error challenge the client answers before the C{-ERR}.
    """

    plaintext = True
    #: the longest response line (see L{mailgate.pop3.POP3Server.lineLimit})
    maxResponseLength = MAX_RESPONSE_LINE

    def __init__(self, defaultRealm=None):
        self._defaultRealm = defaultRealm
        self._done = False

    def start(self, initial):
        if initial is None:
            return Challenge(b"")
        return self.step(initial)

    def step(self, response):
        if self._done:
            raise SASLError(f"unexpected {self.name} response")
        self._done = True
        if len(response) > MAX_TOKEN + 512:
            raise SASLError("token too long")
        return Authenticate(self.parse(response))

    def successData(self):
        return None


def _bearer(value):
    scheme, sep, token = value.partition(b" ")
    if not sep or scheme.lower() != b"bearer" or not token.strip(b" "):
        raise SASLError("expected auth=Bearer <token>")
    token = token.strip(b" ")
    if len(token) > MAX_TOKEN:
        raise SASLError("token too long")
    return token


class OAuthBearerMechanism(_BearerMechanism):
    """
    OAUTHBEARER (RFC 7628): a GS2 header (C{n,a=authzid,}; no channel
    binding) then key=value pairs, each ended by ^A, among them
    C{auth=Bearer <token>}, and a final ^A.  The authzid, if any, must
    name the token's user.  A failure is answered by an error challenge
    (RFC 7628 section 3.2.2), which the client answers with a lone ^A.
    """

    name = "OAUTHBEARER"
    #: RFC 7628 section 3.2.2's error
    FAILURE = json.dumps({"status": "invalid_token", "schemes": "bearer"}, separators=(",", ":")).encode("ascii")

    def parse(self, message):
        header, sep, rest = message.partition(b",")
        if not sep or header not in (b"n", b"y"):
            raise SASLError("channel binding is not supported" if header.startswith(b"p=") else "malformed GS2 header")
        authzid, sep, rest = rest.partition(b",")
        if not sep or (authzid and not authzid.startswith(b"a=")):
            raise SASLError("malformed GS2 header")
        if not rest.startswith(b"\x01") or not rest.endswith(b"\x01\x01"):
            raise SASLError("malformed OAUTHBEARER message")
        pairs = {}
        for item in rest[1:-2].split(b"\x01"):
            key, sep, value = item.partition(b"=")
            if not sep or not key.isalpha():
                raise SASLError("malformed OAUTHBEARER key=value pair")
            pairs[key] = value
        if b"auth" not in pairs:
            raise SASLError("expected auth=Bearer <token>")
        user = authzid[2:].replace(b"=2C", b",").replace(b"=3D", b"=")
        return BearerTokenCredentials(_bearer(pairs[b"auth"]), user)


class XOAuth2Mechanism(_BearerMechanism):
    """
    XOAUTH2 (Google's, Microsoft's): C{user=NAME^Aauth=Bearer TOKEN^A^A}.
    The name must be the token's user.  A failure is answered, as Google
    does, by a JSON challenge that the client answers with an empty line.
    """

    name = "XOAUTH2"
    FAILURE = json.dumps({"status": "401", "schemes": "Bearer"}, separators=(",", ":")).encode("ascii")

    def parse(self, message):
        if not message.endswith(b"\x01\x01"):
            raise SASLError("malformed XOAUTH2 message")
        pairs = {}
        for item in message[:-2].split(b"\x01"):
            key, sep, value = item.partition(b"=")
            if not sep:
                raise SASLError("malformed XOAUTH2 message")
            pairs[key] = value
        if not pairs.get(b"user") or b"auth" not in pairs:
            raise SASLError("XOAUTH2 needs user= and auth=")
        return BearerTokenCredentials(_bearer(pairs[b"auth"]), pairs[b"user"])
