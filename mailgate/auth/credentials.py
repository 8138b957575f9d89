# -*- test-case-name: tests.test_auth -*-
"""
Credentials presented by clients that Twisted does not provide correctly.

Twisted's C{twisted.mail.pop3.APOPCredentials} compares a text digest with
a bytes digest and so never succeeds on Python 3; this one compares bytes, in
constant time, and has its own interface so no other hashed-password checker
is ever asked to handle it.  Twisted's C{CramMD5Credentials} compares with
C{==}; this one in constant time, under an interface of its own too.

Both are checked against the user's recoverable APOP secret (see
L{mailgate.auth.checkers.APOPChecker}).
"""

import hashlib
import hmac

from twisted.cred.credentials import IUsernameHashedPassword
from zope.interface import implementer


class IAPOPCredentials(IUsernameHashedPassword):
    """
    An APOP login (RFC 1939 section 7): a user name and
    MD5(timestamp + shared secret) in lower-case hex.
    """


@implementer(IAPOPCredentials)
class APOPCredentials:
    """
    @ivar username: the name given, as L{bytes}.
    @ivar challenge: the timestamp of this connection's greeting, brackets
        included, as L{bytes}.
    @ivar digest: the client's 32 hex digits, as L{bytes}.
    """

    def __init__(self, challenge, username, digest):
        self.challenge = challenge
        self.username = username
        self.digest = digest.lower()

    def checkPassword(self, secret):
        if isinstance(secret, str):
            secret = secret.encode("utf-8")
        expected = hashlib.md5(self.challenge + secret).hexdigest().encode("ascii")
        return hmac.compare_digest(expected, self.digest)


class ICramMD5Credentials(IUsernameHashedPassword):
    """
    A CRAM-MD5 login (RFC 2195): a user name and HMAC-MD5(shared secret,
    challenge) in lower-case hex.
    """


@implementer(ICramMD5Credentials)
class CramMD5Credentials:
    """
    @ivar username: the name given, as L{bytes}.
    @ivar challenge: the challenge the server sent, as L{bytes}.
    @ivar digest: the client's 32 hex digits, as L{bytes}.
    """

    def __init__(self, challenge, username, digest):
        self.challenge = challenge
        self.username = username
        self.digest = digest.lower()

    def checkPassword(self, secret):
        if isinstance(secret, str):
            secret = secret.encode("utf-8")
        expected = hmac.new(secret, self.challenge, hashlib.md5).hexdigest().encode("ascii")
        return hmac.compare_digest(expected, self.digest)
