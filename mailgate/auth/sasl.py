# -*- test-case-name: tests.test_sasl -*-
"""
SASL mechanisms (RFC 4422) for POP3 AUTH (RFC 5034): PLAIN (RFC 4616),
LOGIN, SCRAM-SHA-256 (RFC 5802, RFC 7677) and CRAM-MD5 (RFC 2195).

A mechanism runs the exchange and ends with cred credentials; the portal's
checkers decide.  PLAIN and LOGIN yield ordinary L{UsernamePassword}
credentials, so they are checked by the same scrypt checker as USER/PASS
(or, for a master user's login to another user's maildrop, where those
are allowed, L{mailgate.auth.credentials.MasterCredentials}), and like
USER/PASS they send the password itself: they are offered and accepted
only where plaintext passwords are.  SCRAM yields
L{ScramCredentials}, checked against the stored SCRAM-SHA-256 keys: the
server never needs the password, and the password never crosses the wire.
CRAM-MD5 yields L{mailgate.auth.credentials.CramMD5Credentials}, which,
like APOP, need a secret the server keeps: the user's recoverable APOP
secret, or the HMAC-MD5 states of a C{{CRAM-MD5}} hash imported from
Dovecot.  It works exactly for those users, and is offered when APOP is
(by default, while some user has either).

Each exchange step returns a L{Challenge} (send it, wait for the client's
response) or L{Authenticate} (log in with these credentials); it may return
them through a L{Deferred}, and raises L{SASLError} for malformed input
(these three, shared with the mechanisms of other modules, are in
L{mailgate.auth.saslsteps}).
"""

import base64
import hashlib
import hmac
import math
import os
import re
import secrets
import time

import attr
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ICredentials
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from zope.interface import Attribute, implementer

from mailgate.address import loginAddress
from mailgate.auth.credentials import CramMD5Credentials, MasterCredentials, passwordCredentials
from mailgate.auth.foreign import MAX_SCRAM_SALT
from mailgate.auth.oauth import OAuthBearerMechanism, XOAuth2Mechanism
from mailgate.auth.passwords import SCRAM_ITERATIONS, parseScramSecret
from mailgate.auth.saslprep import preparedName
from mailgate.auth.saslsteps import Authenticate, Challenge, SASLError
from mailgate.errors import InvalidAddress
from mailgate.hostname import machineName


def _sameLogin(authzid, authcid, defaultRealm):
    """
    Whether the authorisation identity C{authzid} names the user the
    authentication identity C{authcid} logs in as: the same text, or the
    same address once both are read as login names are (case, the default
    realm).  Compared as sent, C{Alice@Example.org} acting as
    C{alice@example.org} was refused as another user, though it is the
    one mailbox and Dovecot logs it in.
    """
    if authzid == authcid:
        return True
    try:
        return loginAddress(authzid, defaultRealm) == loginAddress(authcid, defaultRealm)
    except InvalidAddress:
        return False


class PlainMechanism:
    """
    PLAIN (RFC 4616): C{[authzid] NUL authcid NUL passwd} in one response.
    An authzid that names another user than C{authcid} does (see
    L{_sameLogin}) is a master user's login to that user's maildrop
    (C{authcid} the master user, as Dovecot takes it) where master logins
    are allowed, and refused at once where they are not.

    @param defaultRealm: the domain of a user name without one (see
        L{mailgate.address.loginAddress}), or C{None}.
    @param masterUsers: whether master users may log in (C{--master-users}).
    @param separator: the master user separator of login names (see
        L{mailgate.auth.credentials.passwordCredentials}), or C{None}.
    """

    name = "PLAIN"
    plaintext = True

    def __init__(self, defaultRealm=None, masterUsers=False, separator=None):
        self._defaultRealm = defaultRealm
        self._masterUsers = masterUsers
        self._separator = separator

    def start(self, initial):
        if initial is None:
            return Challenge(b"")
        return self.step(initial)

    def step(self, response):
        parts = response.split(b"\0")
        if len(parts) != 3:
            raise SASLError("PLAIN expects authzid NUL authcid NUL password")
        authzid, authcid, password = parts
        if not authcid:
            raise SASLError("PLAIN needs a user name")
        if authzid and not _sameLogin(authzid, authcid, self._defaultRealm):
            if not self._masterUsers:
                raise SASLError("authorising as another user is not supported")
            return Authenticate(MasterCredentials(authzid, authcid, password))
        return Authenticate(passwordCredentials(authcid, password, self._separator))

    def successData(self):
        return None


class LoginMechanism:
    """
    LOGIN (draft-murchison-sasl-login, as Outlook and older clients speak
    it): the server asks for the user name, then the password, each
    answered in a response of its own.  A client may send the user name as
    its initial response.
    """

    name = "LOGIN"
    plaintext = True

    USERNAME = b"Username:"
    PASSWORD = b"Password:"

    def __init__(self, separator=None):
        self._username = None
        self._separator = separator

    def start(self, initial):
        if not initial:
            return Challenge(self.USERNAME)
        return self.step(initial)

    def step(self, response):
        if self._username is None:
            if not response:
                raise SASLError("LOGIN needs a user name")
            self._username = response
            return Challenge(self.PASSWORD)
        return Authenticate(passwordCredentials(self._username, response, self._separator))

    def successData(self):
        return None


_CRAM_RESPONSE = re.compile(rb"^(.+) ([0-9a-fA-F]{32})$")


class CramMD5Mechanism:
    """
    CRAM-MD5 (RFC 2195): the server sends a challenge in the form of an
    RFC 5322 message id, the client answers with its user name and the
    HMAC-MD5 of the challenge keyed with the shared secret.

    @param hostname: the name in the challenge.
    """

    name = "CRAM-MD5"
    plaintext = False

    def __init__(self, hostname):
        self._challenge = (
            f"<{secrets.randbelow(10**10)}.{time.time_ns()}@{hostname}>".encode("ascii", "replace")
        )
        self._sent = False

    def start(self, initial):
        # An empty one ("AUTH CRAM-MD5 =") is an initial response too: RFC
        # 5034 section 4 has the server reject any with a mechanism the
        # server begins.
        if initial is not None:
            raise SASLError("CRAM-MD5 takes no initial response")
        self._sent = True
        return Challenge(self._challenge)

    def step(self, response):
        if not self._sent:
            raise SASLError("unexpected CRAM-MD5 response")
        match = _CRAM_RESPONSE.match(response)
        if match is None:
            raise SASLError("expected: user name, a space and 32 hex digits")
        self._sent = False
        return Authenticate(CramMD5Credentials(self._challenge, match.group(1), match.group(2)))

    def successData(self):
        return None


class IScramCredentials(ICredentials):
    """
    The outcome of a SCRAM-SHA-256 exchange, to be checked against a
    user's stored key.
    """

    username = Attribute("The authentication identity, as L{bytes}.")

    def checkStoredKey(storedKey):
        """
        Whether the client's proof matches C{storedKey}.
        """


@implementer(IScramCredentials)
class ScramCredentials:
    def __init__(self, username, authMessage, clientProof):
        self.username = username
        self._authMessage = authMessage
        self._clientProof = clientProof

    def checkStoredKey(self, storedKey):
        signature = hmac.new(storedKey, self._authMessage, hashlib.sha256).digest()
        if len(self._clientProof) != len(signature):
            return False
        clientKey = bytes(a ^ b for a, b in zip(self._clientProof, signature))
        return hmac.compare_digest(hashlib.sha256(clientKey).digest(), storedKey)


# RFC 5802's printable: a nonce's characters.
_PRINTABLE = re.compile(r"[\x21-\x2b\x2d-\x7e]+")

# An "=" that does not begin "=2C" or "=3D".
_BARE_EQUALS = re.compile(r"=(?!2C|3D)")


def _saslname(text):
    """
    Decode a SCRAM saslname (C{=2C} is ",", C{=3D} is "=").  RFC 5802
    section 5.1: an "=" followed by anything else MUST fail the exchange.
    Looked for where each "=" stands: removing the escapes first and then
    looking for an "=" let C{=3=2CD} through (its C{=2C} gone, the rest
    reads C{=3D}).  A NUL is none of RFC 5802's value-safe-char: such a
    name is refused too (it names no user; USER refuses a NUL as well).
    """
    if _BARE_EQUALS.search(text) or "\0" in text:
        raise SASLError("malformed user name")
    return text.replace("=2C", ",").replace("=3D", "=")


def _attributes(message):
    pairs = []
    for item in message.split(","):
        if len(item) < 2 or item[1] != "=" or not item[0].isalpha():
            raise SASLError("malformed SCRAM message")
        if item[0] == "m":
            # RFC 5802 section 5.1: reserved for mandatory extensions, which
            # this version of SCRAM does not have; its presence MUST fail.
            raise SASLError("mandatory SCRAM extensions (m=) are not supported")
        pairs.append((item[0], item[2:]))
    return pairs


def _consumed(pending, failure):
    """
    C{failure}, once C{pending} (a L{Deferred} no one waits for now) is
    made to drop its own failure, if it has one.
    """
    pending.addErrback(lambda _: None)
    return failure


#: the kinds of SCRAM keys made-up parameters are drawn from while no user
#: has any: mailgate's own (L{mailgate.auth.passwords.scramSha256Secret})
OWN_SCRAM_PARAMETERS = {(SCRAM_ITERATIONS, 16): 1}


def madeUpParameters(key, name, kinds):
    """
    The iteration count and salt SCRAM tells for C{name}, a name that is
    no user (or a user without SCRAM keys): drawn from C{kinds}, the
    users' C{{(iterations, salt length): users}}, each kind as likely as
    the share of users with it, so that what a name is told is as likely
    for a name that is no user as for one picked among the users.
    Told C{i=4096} and a 16-octet salt whatever the name, a user whose keys
    came from another server with other parameters (Dovecot's, C{user
    import}) was told apart from every name that is no user.

    The same name gets the same answer (the draw and the salt are keyed
    HMACs of it): asked again, a real user's never changes either.  The
    draw is weighted rendezvous hashing (the kind scoring lowest
    C{-ln(u) / users}, C{u} uniform from the name and the kind), so that
    when the users' kinds change, only the names a kind gains or loses
    change answers.

    @param key: the secret of the made-up parameters, 32 octets.
    @param name: the name as the lookup saw it (L{str}).
    @param kinds: a non-empty dict C{{(iterations, salt length): users}}.
    @return: C{(iterations, salt)}.
    """
    name = name.encode("utf-8")
    chosen, lowest = None, None
    for kind in sorted(kinds):
        draw = hmac.digest(key, b"kind:%d:%d:" % kind + name, "sha256")
        score = -math.log((int.from_bytes(draw[:8], "big") + 1) / 2**64) / kinds[kind]
        if lowest is None or score < lowest:
            chosen, lowest = kind, score
    iterations, length = chosen
    # As many octets as the salt needs; the first 16, what every made-up
    # salt was before it could be of another length.
    salt, block = b"", 0
    while len(salt) < length:
        label = b"salt:" if block == 0 else b"salt%d:" % block
        salt += hmac.digest(key, label + name, "sha256")
        block += 1
    return iterations, salt[:length]


#: seconds the kinds of the users' SCRAM keys are used for before they are
#: read again (by the next SCRAM exchange, which does not wait for them)
SCRAM_PARAMETERS_REFRESH = 60


class ScramParameters:
    """
    The kinds of the users' SCRAM-SHA-256 keys (iteration count and salt
    length) and how many users have each, kept in memory for the
    parameters of names that are no user (L{madeUpParameters}).

    Read (L{mailgate.interfaces.IMailStore.scramParameters}: one query, on
    the store's threads) when the first exchange asks; then, at an
    exchange that asks more than C{interval} seconds after the last read,
    read again in the background while that exchange and the next ones use
    what is kept.  A read that fails keeps what was read before; until one
    has succeeded, exchanges waiting for it fail as a lookup that fails.

    @param read: the store's C{scramParameters}.
    @param clock: the time now, in seconds.
    """

    def __init__(self, read, clock=time.monotonic, interval=SCRAM_PARAMETERS_REFRESH):
        self._read = read
        self._clock = clock
        self._interval = interval
        self._kinds = None
        self._readAt = None
        self._reading = False
        self._waiting = []

    def current(self):
        """
        The kinds kept, C{{(iterations, salt length): users}} (mailgate's
        own alone while no user has SCRAM keys): a L{Deferred}, fired at
        once once they have been read.
        """
        if self._kinds is None:
            waiting = defer.Deferred()
            self._waiting.append(waiting)
            self._start()
            return waiting
        if self._clock() - self._readAt >= self._interval:
            self._start()
        return defer.succeed(self._kinds)

    def _start(self):
        if self._reading:
            return
        self._reading = True
        self._readAt = self._clock()
        defer.maybeDeferred(self._read).addCallbacks(self._readDone, self._failed)

    def _readDone(self, kinds):
        self._reading = False
        self._readAt = self._clock()
        # Salts over MAX_SCRAM_SALT (stored before user import refused
        # them) are left out: the made-up salt is made at every exchange.
        self._kinds = {
            kind: users for kind, users in kinds.items() if users > 0 and kind[1] <= MAX_SCRAM_SALT
        } or OWN_SCRAM_PARAMETERS
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(self._kinds)

    def _failed(self, failure):
        self._reading = False
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.errback(failure)


class ScramSHA256Mechanism:
    """
    SCRAM-SHA-256 without channel binding.

    A name that is no user (or a user without SCRAM keys) gets a
    server-first-message all the same, its salt and iteration count made
    up (L{madeUpParameters}): so the exchange does not reveal whether a
    user exists.

    @param findUser: looks a user up by address; a L{Deferred}
        L{mailgate.records.UserRecord} or C{None}.
    @param fakeKey: a function giving (as a L{Deferred}) the secret of
        the made-up parameters.
    @param defaultRealm: the domain of a user name without one (see
        L{mailgate.address.loginAddress}), or C{None}.
    @param parameters: a function giving (as a L{Deferred}) the kinds of
        keys the made-up parameters are drawn from, C{{(iterations, salt
        length): users}} (L{ScramParameters.current}); mailgate's own
        alone by default.
    """

    name = "SCRAM-SHA-256"
    plaintext = False

    def __init__(self, findUser, fakeKey, defaultRealm=None, parameters=None):
        self._findUser = findUser
        self._fakeKey = fakeKey
        self._defaultRealm = defaultRealm
        self._parameters = parameters or (lambda: defer.succeed(OWN_SCRAM_PARAMETERS))
        self._state = "first"
        self._serverKey = None

    def start(self, initial):
        if initial is None:
            return Challenge(b"")
        return self.step(initial)

    def step(self, response):
        try:
            text = response.decode("utf-8")
        except UnicodeDecodeError:
            raise SASLError("SCRAM data must be UTF-8") from None
        if self._state == "first":
            return self._clientFirst(text)
        if self._state == "final":
            return self._clientFinal(text)
        raise SASLError("unexpected SCRAM message")

    def _clientFirst(self, text):
        flag, sep, rest = text.partition(",")
        if not sep or flag not in ("n", "y"):
            raise SASLError("channel binding is not supported" if flag.startswith("p=") else "malformed GS2 header")
        authzid, sep, bare = rest.partition(",")
        if not sep or (authzid and not authzid.startswith("a=")):
            raise SASLError("malformed GS2 header")
        attributes = _attributes(bare)
        if len(attributes) < 2 or attributes[0][0] != "n" or attributes[1][0] != "r":
            raise SASLError("client-first-message must start with n= and r=")
        username = _saslname(attributes[0][1])
        if not username:
            # RFC 5802 section 5.1: the server SHOULD abort on an empty
            # user name (no user has one, and the made-up salt of an
            # unknown user would only prolong the exchange).
            raise SASLError("empty user name")
        nonce = attributes[1][1]
        if not _PRINTABLE.fullmatch(nonce):
            # RFC 5802's "printable": ASCII 0x21 to 0x7E but ",".  The
            # server's nonce begins with the client's, and its
            # server-first-message must be well-formed too: a space or a
            # non-ASCII letter (which str.isprintable() took) is not.
            raise SASLError("malformed nonce")
        # Names prepared as SASLprep does (preparedName): a client that
        # prepares names and one that does not reach the same user.
        if authzid and not _sameLogin(preparedName(_saslname(authzid[2:])), preparedName(username), self._defaultRealm):
            raise SASLError("authorising as another user is not supported")
        self._gs2Header = f"{flag},{authzid},"
        self._clientFirstBare = bare
        self._username = username
        self._nonce = nonce + base64.b64encode(os.urandom(18)).decode("ascii")
        try:
            address = loginAddress(preparedName(username), self._defaultRealm)
        except InvalidAddress:
            address = None
        self._address = address
        # What a made-up answer needs is fetched for every name, known or
        # not, and alongside the lookup: the first exchange of a process
        # waits for it whoever it is for, and later ones find it at hand.
        madeUp = self._madeUpMaterial()
        d = self._findUser(address) if address else defer.succeed(None)
        return d.addCallbacks(
            lambda user: madeUp.addCallback(lambda material: self._serverFirst(user, *material)),
            lambda failure: _consumed(madeUp, failure),
        )

    def _madeUpMaterial(self):
        """
        The key and the kinds of keys of made-up parameters: a L{Deferred}
        pair, failed as the first of them to fail.
        """
        key, kinds = self._fakeKey(), self._parameters()
        return key.addCallbacks(
            lambda key: kinds.addCallback(lambda kinds: (key, kinds)), lambda failure: _consumed(kinds, failure)
        )

    @property
    def loginName(self):
        """
        The user name the client gave in its first message (as it wrote
        it), for the log of a login that failed before the exchange
        ended (the store could not look the user up); C{None} before.
        """
        return getattr(self, "_username", None)

    def _serverFirst(self, user, key, kinds):
        # Made from the name as the lookup saw it: "Bob@x" and "bob@x" get
        # one answer, as a real user's spellings do; with the key every
        # node shares, every node makes up the same one, as each serves a
        # real user's stored salt.  Made up, and a secret read, for every
        # name, so that a user's answer costs what a stranger's does.
        iterations, salt = madeUpParameters(key, self._address or self._username, kinds)
        serverKey = secrets.token_bytes(32)
        secret = user.scramSha256 if user is not None else None
        try:
            stored = parseScramSecret(secret or _DUMMY_SCRAM_SECRET)
        except ValueError:
            secret = None
        if secret:
            iterations, salt, _, serverKey = stored
        return self._first(iterations, salt, serverKey)

    def _first(self, iterations, salt, serverKey):
        self._serverKey = serverKey
        self._serverFirstMessage = (
            f"r={self._nonce},s={base64.b64encode(salt).decode('ascii')},i={iterations}"
        )
        self._state = "final"
        return Challenge(self._serverFirstMessage.encode("ascii"))

    def _clientFinal(self, text):
        withoutProof, sep, proofPart = text.rpartition(",")
        if not sep or not proofPart.startswith("p="):
            raise SASLError("client-final-message must end with p=")
        attributes = dict(_attributes(withoutProof))
        expectedBinding = base64.b64encode(self._gs2Header.encode("utf-8")).decode("ascii")
        if attributes.get("c") != expectedBinding:
            raise SASLError("channel binding data does not match")
        if attributes.get("r") != self._nonce:
            raise SASLError("nonce does not match")
        try:
            proof = base64.b64decode(proofPart[2:], validate=True)
        except ValueError:
            raise SASLError("malformed proof") from None
        self._authMessage = ",".join([self._clientFirstBare, self._serverFirstMessage, withoutProof]).encode("utf-8")
        self._state = "done"
        return Authenticate(ScramCredentials(self._username.encode("utf-8"), self._authMessage, proof))

    def successData(self):
        """
        The server-final-message, proving to the client that the server
        knows its key too.
        """
        signature = hmac.new(self._serverKey, self._authMessage, hashlib.sha256).digest()
        return b"v=" + base64.b64encode(signature)


#: the SCRAM keys a proof is checked against when its user is unknown or
#: has none (see L{ScramChecker}): read as a user's are, no proof matches
_DUMMY_SCRAM_SECRET = "SCRAM-SHA-256${}:{}${}:{}".format(
    SCRAM_ITERATIONS, *(base64.b64encode(os.urandom(size)).decode("ascii") for size in (16, 32, 32))
)


def _storedKeyOf(user):
    """
    The user's SCRAM-SHA-256 stored key, or C{None} for an unknown user,
    one without SCRAM keys, or keys that do not parse; the dummy keys are
    read meanwhile, as the user's would be.
    """
    secret = user.scramSha256 if user is not None and user.scramSha256 else None
    try:
        storedKey = parseScramSecret(secret or _DUMMY_SCRAM_SECRET)[2]
    except ValueError:
        return None
    return storedKey if secret else None


@implementer(ICredentialsChecker)
class ScramChecker:
    """
    Checks L{ScramCredentials} against the user's stored SCRAM-SHA-256
    keys.  Users without stored keys cannot use SCRAM.

    An unknown user's proof (and that of a user without keys) is checked
    all the same, against dummy keys read as a user's are, and refused
    whatever it says: the same work as a wrong proof of a real user.  Refused at once instead,
    an unknown user's answer came some 5 microseconds sooner (twice as
    fast as a wrong proof, measured in the process, and 20 to 30
    microseconds over loopback on a real twistd mailgate with
    C{--auth-failure-delay 0}): a name's existence told by timing.
    """

    credentialInterfaces = (IScramCredentials,)

    def __init__(self, store, defaultRealm=None):
        self._store = store
        self._defaultRealm = defaultRealm

    @defer.inlineCallbacks
    def requestAvatarId(self, credentials):
        name = credentials.username
        try:
            # Prepared as the exchange's lookup prepared it (preparedName).
            name = preparedName(name.decode("utf-8") if isinstance(name, bytes) else name)
            address = loginAddress(name, self._defaultRealm)
        except (InvalidAddress, UnicodeDecodeError):
            address = None
        user = None if address is None else (yield self._store.findUser(address))
        storedKey = _storedKeyOf(user)
        if storedKey is None:
            credentials.checkStoredKey(bytes(32))
            raise UnauthorizedLogin()
        if not credentials.checkStoredKey(storedKey):
            raise UnauthorizedLogin()
        return user


class SASLServer:
    """
    The mechanisms a server offers, and a fresh exchange for each AUTH.

    @param findUser: user lookup for SCRAM (the store's C{findUser}).
    @param hostname: the name in CRAM-MD5 challenges; this machine's fully
        qualified name by default.
    @param offerCramMD5: a callable saying whether CRAM-MD5 is offered now;
        give the POP3 factory's C{offersCramMD5} (CRAM-MD5 works for the
        users with APOP and those with Dovecot's CRAM-MD5 states; by
        default it is offered only while some user has the latter).  Not
        offered by default.
    @param sharedSecret: the store's C{sharedSecret}, for the key of the
        salt SCRAM makes up for unknown users: nodes sharing a database
        then make up the same salt for a name, so a client asking two of
        them (or one before and after a restart) sees a stable salt, as
        for a real user.  Without it, a key of this process's own.
    @param defaultRealm: the domain of a user name without one (see
        L{mailgate.address.loginAddress}), or C{None}.
    @param bearerTokens: offer OAUTHBEARER and XOAUTH2
        (L{mailgate.auth.oauth}), where plaintext logins are allowed: a
        bearer token is a password.  The portal needs their checker.
    @param scramParameters: the store's C{scramParameters}, the kinds of
        the users' SCRAM keys, which the parameters made up for unknown
        names are drawn from (L{ScramParameters}); without it, mailgate's
        own alone.
    @param clock: the time now, in seconds (when to read those again).
    @param masterUsers: let PLAIN's authorisation identity name another
        user, for a master user's login (C{--master-users}).
    @param masterUserSeparator: the character that separates a user's name
        from a master user's in PLAIN's and LOGIN's user names
        (C{--master-user-separator}), or C{None}.
    """

    #: the name of the made-up parameters' key among the store's shared
    #: secrets (its name from when only the salt was made up)
    UNKNOWN_USER_SALT_KEY = "scram-unknown-user-salt"

    def __init__(
        self, findUser, hostname=None, offerCramMD5=lambda: False, sharedSecret=None, defaultRealm=None,
        bearerTokens=False, scramParameters=None, clock=time.monotonic, masterUsers=False, masterUserSeparator=None,
    ):
        self._findUser = findUser
        self._masterUsers = masterUsers
        self._masterUserSeparator = masterUserSeparator
        self._scramParameters = None if scramParameters is None else ScramParameters(scramParameters, clock)
        self._bearerTokens = bearerTokens
        self._defaultRealm = defaultRealm
        self._sharedSecret = sharedSecret
        self._saltKey = None if sharedSecret is not None else os.urandom(32)
        #: the name in the CRAM-MD5 challenges made from now on (a reload
        #: may change it: a challenge is a nonce the client signs as it is)
        self.hostname = hostname or machineName()
        self._offerCramMD5 = offerCramMD5

    def _unknownUserSaltKey(self):
        """
        The key of made-up salts, read from the store once (a L{Deferred}).
        """
        if self._saltKey is not None:
            return defer.succeed(self._saltKey)

        def remember(key):
            self._saltKey = key
            return key

        return self._sharedSecret(self.UNKNOWN_USER_SALT_KEY).addCallback(remember)

    def mechanisms(self, plaintextAllowed):
        """
        The names to advertise, strongest first: PLAIN and LOGIN (and
        OAUTHBEARER and XOAUTH2, when on) only where plaintext logins are
        allowed, CRAM-MD5 only while it is offered.
        """
        names = ["SCRAM-SHA-256"]
        if self._offerCramMD5():
            names.append("CRAM-MD5")
        if plaintextAllowed:
            names += ["PLAIN", "LOGIN"]
            if self._bearerTokens:
                names += ["OAUTHBEARER", "XOAUTH2"]
        return names

    def create(self, name):
        """
        A new exchange for mechanism C{name}, or C{None} if it is unknown
        or not offered now.  (Whether a plaintext one may run here is the
        protocol's to decide, from its C{plaintext} flag.)
        """
        if name == "PLAIN":
            return PlainMechanism(self._defaultRealm, self._masterUsers, self._masterUserSeparator)
        if name == "LOGIN":
            return LoginMechanism(self._masterUserSeparator)
        if name == "SCRAM-SHA-256":
            return ScramSHA256Mechanism(
                self._findUser, self._unknownUserSaltKey, self._defaultRealm,
                None if self._scramParameters is None else self._scramParameters.current,
            )
        if name == "CRAM-MD5" and self._offerCramMD5():
            return CramMD5Mechanism(self.hostname)
        if self._bearerTokens and name in ("OAUTHBEARER", "XOAUTH2"):
            return (OAuthBearerMechanism if name == "OAUTHBEARER" else XOAuth2Mechanism)(self._defaultRealm)
        return None
