# -*- test-case-name: tests.test_auth -*-
"""
Credentials presented by clients that Twisted does not provide correctly.

Twisted's C{twisted.mail.pop3.APOPCredentials} compares a text digest with
a bytes digest and so never succeeds on Python 3; this one compares bytes, in
constant time, and has its own interface so no other hashed-password checker
is ever asked to handle it.
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
