"""
Users moved from a Dovecot whose passdb holds C{{CRAM-MD5}} hashes (the
HMAC-MD5 states keyed with the password; postfixadmin's
C{dovecot:CRAM-MD5}) had mail clients set up for AUTH CRAM-MD5, which
Dovecot serves them from those states: mailgate serves it from them too,
before and after their first plaintext login.
"""

import hmac
import os

import pytest

from dovecotserver import requireDovecot
from mailgate.auth.foreign import splitScheme
from mailgate.auth.md5state import hmacMD5Context, hmacMD5WithContext
from test_foreign_hashes import doveadmHash

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
