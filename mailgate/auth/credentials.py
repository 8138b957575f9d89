# -*- test-case-name: tests.test_auth -*-
"""
Credentials presented by clients that Twisted does not provide correctly.

Twisted's C{twisted.mail.pop3.APOPCredentials} compares a text digest with
a bytes digest and so never succeeds on Python 3; this one compares bytes, in
constant time, and has its own interface so no other hashed-password checker
is ever asked to handle it.  Twisted's C{CramMD5Credentials} compares with
C{==}; this one in constant time, under an interface of its own too.

Both are checked against the user's recoverable APOP secret (see
L{mailgate.auth.checkers.APOPChecker}); a CRAM-MD5 response also against
the HMAC-MD5 states of a C{{CRAM-MD5}} hash imported from Dovecot.
"""

import hashlib
import hmac

from twisted.cred.credentials import ICredentials, IUsernameHashedPassword, UsernamePassword
from zope.interface import Attribute, implementer, implementer_only

from mailgate.address import masterName
from mailgate.auth.md5state import hmacMD5WithContext
from mailgate.errors import InvalidAddress


class IAPOPCredentials(IUsernameHashedPassword):
    """
    An APOP login (RFC 1939 section 7): a user name and
    MD5(timestamp + shared secret) in lower-case hex.
    """


class SecretDigest:
    """
    A user name and the client's digest of a challenge made with the
    shared secret: checked by making the same digest, compared in constant
    time.

    @ivar username: the name given, as L{bytes}.
    @ivar challenge: the challenge the client answered, as L{bytes}.
    @ivar digest: the client's 32 hex digits, as L{bytes}.
    """

    def __init__(self, challenge, username, digest):
        self.challenge = challenge
        self.username = username
        self.digest = digest.lower()

    def checkPassword(self, secret):
        if isinstance(secret, str):
            secret = secret.encode("utf-8")
        expected = self.digestOf(secret).encode("ascii")
        return hmac.compare_digest(expected, self.digest)

    def digestOf(self, secret):
        """
        The digest, in lower-case hex, that C{secret} gives for the
        challenge.
        """
        raise NotImplementedError()


@implementer(IAPOPCredentials)
class APOPCredentials(SecretDigest):
    """
    The challenge is the timestamp of this connection's greeting, brackets
    included.
    """

    def digestOf(self, secret):
        return hashlib.md5(self.challenge + secret).hexdigest()


class ICramMD5Credentials(IUsernameHashedPassword):
    """
    A CRAM-MD5 login (RFC 2195): a user name and HMAC-MD5(shared secret,
    challenge) in lower-case hex.
    """


@implementer(ICramMD5Credentials)
class CramMD5Credentials(SecretDigest):
    """
    The challenge is the one the server sent.
    """

    def digestOf(self, secret):
        return hmac.new(secret, self.challenge, hashlib.md5).hexdigest()

    def checkContext(self, context):
        """
        Whether the response is the one the password whose HMAC-MD5
        C{context} (32 octets, as Dovecot's C{{CRAM-MD5}} hash holds it)
        gives: made without the password, in constant time.
        """
        expected = hmacMD5WithContext(context, self.challenge).hex().encode("ascii")
        return hmac.compare_digest(expected, self.digest)


class IMasterCredentials(ICredentials):
    """
    A master user's login to another user's maildrop (Dovecot's master
    users): the user's name, the master user's name and the master user's
    password.  C{username} is the user's name, so that what is said and
    counted of the login (its penalty, its log line) is about the maildrop
    it asks for.  Not an C{IUsernamePassword}: a portal picks a checker by
    the interfaces credentials provide, and the users' password checker
    must never be given the master's password for the user's.
    """

    username = Attribute("the user's name, as the client gave it (bytes)")
    password = Attribute("the master user's password (bytes)")
    master = Attribute("the master user's name, normalised, or None if it is no master user's name")
    peer = Attribute("the client's address (the master user's allowed networks), or None")


@implementer_only(IMasterCredentials)
class MasterCredentials(UsernamePassword):
    """
    A master user's name and password, and the user whose maildrop they
    open.  A L{UsernamePassword} still (the password is what a policy
    counts a repeated guess by, and what the verification turns queue),
    but only under L{IMasterCredentials}: no checker of a user's own
    password ever takes the master's password for the user's.

    @ivar masterAsGiven: the master user's name as the client gave it
        (what a failed one is remembered under, when it is no name).
    @ivar peer: the client's address, which the master user's allowed
        networks are checked against (the protocol sets it, as a portal's
        mind goes to the realm alone), or C{None}: not checked.
    """

    peer = None

    def __init__(self, username, master, password):
        super().__init__(username, password)
        if isinstance(master, bytes):
            master = master.decode("utf-8", "replace")
        self.masterAsGiven = master
        try:
            self.master = masterName(master)
        except InvalidAddress:
            self.master = None


def splitMasterLogin(name, separator):
    """
    C{(user, master)} of a login name C{USER*MASTER} (L{bytes} or L{str},
    C{separator} one character), or C{None} where it names no master user
    (see L{passwordCredentials}, which says where it is cut).
    """
    if isinstance(name, bytes):
        separator, at = separator.encode("ascii"), b"@"
    else:
        at = "@"
    user, cut, master = name.rpartition(separator)
    if cut and user and master and not (at in master and at not in user):
        return user, master
    return None


def passwordCredentials(name, password, separator=None):
    """
    The credentials of a login by name and password (USER/PASS, SASL
    PLAIN without an authorisation identity, LOGIN): the user's own, or,
    where master logins by name are allowed (C{separator}, Dovecot's
    C{auth_master_user_separator}), C{USER*MASTER}'s master user's.  The
    name is cut at the last separator: a master user's name never holds
    one (L{mailgate.address.MASTER_SEPARATORS}), a user's local part may.
    Not where the separator is inside an address's local part, the part
    after it holding the C{@} and the part before none (C{a*b@example.org}
    is that user's own login, where a master user C{b@example.org} was
    asked for, and the user's right password refused): a master user
    whose name holds an C{@} is named after a user's full address
    (C{alice@example.org*ops@example.net}), not a bare name.

    @param name: the name as the client sent it, as L{bytes}.
    @param separator: one character, or C{None}.
    """
    parts = splitMasterLogin(name, separator) if separator else None
    if parts is not None:
        return MasterCredentials(*parts, password)
    return UsernamePassword(name, password)
