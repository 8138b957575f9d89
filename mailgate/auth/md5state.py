# -*- test-case-name: tests.test_foreign_hashes -*-
"""
MD5's internal state, which C{hashlib} neither shows nor takes: Dovecot's
C{{CRAM-MD5}} (C{{HMAC-MD5}}) hash is not a digest but the two states
HMAC-MD5 starts from when keyed with the password (the inner and outer pads
each run through MD5's compression function once), so that a CRAM-MD5
login can be checked without the password in clear.  Making the same states
from the password a user gives checks it against that hash
(L{hmacMD5Context}); carrying MD5 on from them over a challenge makes the
HMAC-MD5 a CRAM-MD5 client sends (L{hmacMD5WithContext}).

Pure Python, a few dozen microseconds a block: a CRAM-MD5 response costs
four blocks for a challenge of up to 55 octets, one more per 64 beyond.
"""

import hashlib
import math
import struct

_K = [int(abs(math.sin(i + 1)) * 2**32) & 0xFFFFFFFF for i in range(64)]
_SHIFTS = [7, 12, 17, 22] * 4 + [5, 9, 14, 20] * 4 + [4, 11, 16, 23] * 4 + [6, 10, 15, 21] * 4
_INITIAL = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476)
_MASK = 0xFFFFFFFF


def _compress(state, block):
    """
    MD5's compression function (RFC 1321, 3.4): C{state} after one
    64-octet C{block}.
    """
    words = struct.unpack("<16I", block)
    a, b, c, d = state
    for i in range(64):
        if i < 16:
            f, g = (b & c) | (~b & d), i
        elif i < 32:
            f, g = (d & b) | (~d & c), (5 * i + 1) % 16
        elif i < 48:
            f, g = b ^ c ^ d, (3 * i + 5) % 16
        else:
            f, g = c ^ (b | ~d), (7 * i) % 16
        f = (f + a + _K[i] + words[g]) & _MASK
        a, d, c = d, c, b
        b = (b + ((f << _SHIFTS[i]) | (f >> (32 - _SHIFTS[i])))) & _MASK
    return tuple((x + y) & _MASK for x, y in zip(state, (a, b, c, d)))


def _continue(state, data, priorLength):
    """
    The MD5 digest of a message whose first C{priorLength} octets (a
    multiple of 64) left MD5 in C{state}, and whose rest is C{data}:
    C{data}'s whole blocks, then RFC 1321's padding (0x80, zeros, the
    message's length in bits as a little-endian 64-bit number) in one
    block, or two when fewer than 9 octets are left in the last.
    """
    length = priorLength + len(data)
    tail = data + b"\x80" + b"\0" * ((55 - length) % 64) + struct.pack("<Q", (length * 8) & (2**64 - 1))
    for start in range(0, len(tail), 64):
        state = _compress(state, tail[start:start + 64])
    return struct.pack("<4I", *state)


def hmacMD5WithContext(context, message):
    """
    HMAC-MD5 (RFC 2104) of C{message} keyed with the password whose
    C{context} (the 32 octets of L{hmacMD5Context}, as Dovecot stores
    them) is known, the password itself not: MD5 carried on from the inner
    pad's state over C{message}, then from the outer pad's over that
    inner digest (each pad being one 64-octet block already counted).
    """
    words = struct.unpack("<8I", context)
    outer, inner = words[:4], words[4:]
    return _continue(outer, _continue(inner, message, 64), 64)


def hmacMD5Context(password):
    """
    The 32 octets Dovecot's C{{CRAM-MD5}} scheme stores for C{password}
    (octets): the MD5 state after the outer pad, then after the inner pad,
    each as four little-endian words (RFC 2195's stored secret; a key
    longer than a block is its MD5 first, as RFC 2104 says).
    """
    if len(password) > 64:
        password = hashlib.md5(password).digest()
    key = password.ljust(64, b"\0")
    inner = _compress(_INITIAL, bytes(octet ^ 0x36 for octet in key))
    outer = _compress(_INITIAL, bytes(octet ^ 0x5C for octet in key))
    return struct.pack("<8I", *outer, *inner)
