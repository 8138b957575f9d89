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

from twisted.cred.credentials import IUsernameHashedPassword
from zope.interface import implementer

from mailgate.auth.md5state import hmacMD5WithContext


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
