# -*- test-case-name: tests.test_auth -*-
"""
A cache of recently verified passwords, so the slow hash runs once per
password rather than once per login.

Entries are keyed by an HMAC, under a key that lives only in this process's
memory, of the user's address, the stored hash and the offered password:
the cache holds no password and nothing an attacker could test guesses
against offline.  Changing a password changes the stored hash, so every
entry for the old one stops matching at once.  Entries expire after a while
and the cache is bounded; the oldest go first.
"""

import hashlib
import hmac
import os
import time
from collections import OrderedDict


class VerifiedCredentialCache:
    """
    @ivar maxEntries: the bound on remembered logins.
    @ivar lifetime: seconds an entry stays valid.
    """

    def __init__(self, maxEntries=10000, lifetime=3600.0, clock=time.monotonic):
        self.maxEntries = maxEntries
        self.lifetime = lifetime
        self._clock = clock
        self._key = os.urandom(32)
        self._entries = OrderedDict()

    def _digest(self, address, storedHash, password):
        message = b"\0".join([address.encode("utf-8"), storedHash.encode("ascii", "replace"), password])
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def check(self, address, storedHash, password):
        """
        Was this password verified against this stored hash recently?
        """
        if self.maxEntries <= 0:
            return False
        digest = self._digest(address, storedHash, password)
        expires = self._entries.get(digest)
        if expires is None:
            return False
        if expires < self._clock():
            del self._entries[digest]
            return False
        self._entries.move_to_end(digest)
        return True

    def remember(self, address, storedHash, password):
        """
        Record a successful verification.
        """
        if self.maxEntries <= 0:
            return
        digest = self._digest(address, storedHash, password)
        self._entries[digest] = self._clock() + self.lifetime
        self._entries.move_to_end(digest)
        while len(self._entries) > self.maxEntries:
            self._entries.popitem(last=False)

    def __len__(self):
        return len(self._entries)
