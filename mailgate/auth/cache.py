# -*- test-case-name: tests.test_auth -*-
"""
A cache of recently verified passwords, so the slow hash runs once per
password rather than once per login.

Entries are keyed by a MAC (keyed BLAKE2b, a MAC by design at a fraction
of HMAC-SHA256's cost on every cached login), under a key that lives only
in this process's memory, of the user's address and the offered password:
the cache holds no password and nothing an attacker could test guesses
against offline.  Each
entry remembers the stored hash the password was verified against;
changing a password changes the stored hash, so an entry for the old one
stops being honoured at once (the check against the current hash is made
when the maildrop is opened, in the same trip to the database).  Entries
expire after a while and the cache is bounded; the oldest go first.

Failed verifications are remembered the same way, apart, as Dovecot's
negative cache (C{auth_cache_negative_ttl}) does: a password that did not
match a stored hash never will, so the same password tried again against
the same hash (or again for the same unknown user) is refused without
running the slow hash.  A client left with an old password retries it at
every poll, from many connections at once, and such repeats are not
counted towards a penalty or a ban (L{mailgate.policy.repeats}): without
this, each one cost a full scrypt, and one address repeating a wrong
password over its 50 connections kept every CPU hashing, holding up every
other user's login, with nothing to stop it.  A failure is only honoured
against the very hash (or absence of a user) it was checked against, so a
password set since is verified as usual.
"""

import hashlib
import hmac
import os
import time
from collections import OrderedDict


def _octets(storedHash):
    return storedHash.encode("utf-8", "surrogateescape") if isinstance(storedHash, str) else storedHash


class VerifiedCredentialCache:
    """
    @ivar maxEntries: the bound on remembered logins.
    @ivar lifetime: seconds an entry stays valid.
    @ivar metrics: a L{mailgate.metrics.Metrics} told of every lookup's
        hit or miss, or C{None}.
    """

    def __init__(self, maxEntries=10000, lifetime=3600.0, clock=time.monotonic, metrics=None):
        self.metrics = metrics
        self.maxEntries = maxEntries
        self.lifetime = lifetime
        self._clock = clock
        self._key = os.urandom(32)
        # MAC(address, password) -> (stored hash, user record, expiry)
        self._entries = OrderedDict()
        # MAC(address, password) -> (stored hash or None, expiry): failed
        # verifications, bounded and expiring like the others.
        self._failures = OrderedDict()

    def _digest(self, address, password):
        message = address.encode("utf-8") + b"\0" + password
        return hashlib.blake2b(message, key=self._key, digest_size=32).digest()

    def _entry(self, address, password):
        entry = self._find(address, password)
        if self.metrics is not None:
            self.metrics.authCache(entry is not None)
        return entry

    def _find(self, address, password):
        if self.maxEntries <= 0:
            return None
        digest = self._digest(address, password)
        entry = self._entries.get(digest)
        if entry is None:
            return None
        if entry[2] < self._clock():
            del self._entries[digest]
            return None
        self._entries.move_to_end(digest)
        return entry

    def check(self, address, storedHash, password):
        """
        Was this password verified against this stored hash recently?
        """
        entry = self._entry(address, password)
        # As octets: compare_digest refuses str beyond ASCII.
        return entry is not None and hmac.compare_digest(_octets(entry[0]), _octets(storedHash))

    def lookup(self, address, password):
        """
        The user this password was verified for recently, or C{None}.  The
        caller must still confirm that the user's stored hash is the one in
        the returned record (the password may have changed since): the
        store does so when it opens the maildrop.
        """
        entry = self._entry(address, password)
        return None if entry is None else entry[1]

    def remember(self, address, storedHash, password, user=None):
        """
        Record a successful verification (of C{user}, when given).
        """
        if self.maxEntries <= 0:
            return
        digest = self._digest(address, password)
        self._entries[digest] = (storedHash, user, self._clock() + self.lifetime)
        self._entries.move_to_end(digest)
        while len(self._entries) > self.maxEntries:
            self._entries.popitem(last=False)

    def rememberFailure(self, address, storedHash, password):
        """
        Record that C{password} did not match C{storedHash} (C{None}: no
        such user, or none with a password), so that L{failedBefore} can
        refuse it again without the hash.

        @param address: the login name as checked (an address, or the name
            as given when it is none).
        """
        if self.maxEntries <= 0:
            return
        digest = self._digest(address, password)
        self._failures[digest] = (storedHash, self._clock() + self.lifetime)
        self._failures.move_to_end(digest)
        while len(self._failures) > self.maxEntries:
            self._failures.popitem(last=False)

    def failedBefore(self, address, storedHash, password):
        """
        Did C{password} recently fail against this same C{storedHash}
        (C{None}: no such user)?  Then it would fail again.
        """
        if self.maxEntries <= 0:
            return False
        digest = self._digest(address, password)
        entry = self._failures.get(digest)
        if entry is None:
            return False
        if entry[1] < self._clock():
            del self._failures[digest]
            return False
        if storedHash is None or entry[0] is None:
            return storedHash is None and entry[0] is None
        # As octets: compare_digest refuses str beyond ASCII, which an
        # imported {PLAIN} hash may be.
        return hmac.compare_digest(_octets(entry[0]), _octets(storedHash))

    def reconfigure(self, maxEntries, lifetime):
        """
        Take another bound and lifetime (a reload): entries made from now
        on live C{lifetime} seconds; those made before keep their expiry,
        or expire C{lifetime} seconds from now if that comes sooner (an
        administrator who shortens the lifetime wants no login honoured
        from memory longer than that, as Dovecot's reload, which empties
        its cache, gives); a lower bound lets the oldest go at once.  A
        cache turned off (C{maxEntries} 0) forgets everything it holds, so
        that nothing remembered under the old settings outlives the change.
        """
        shorter = lifetime < self.lifetime
        self.maxEntries = maxEntries
        self.lifetime = lifetime
        for entries in (self._entries, self._failures):
            while len(entries) > max(maxEntries, 0):
                entries.popitem(last=False)
        if shorter:
            latest = self._clock() + lifetime
            for digest, entry in self._entries.items():
                if entry[2] > latest:
                    self._entries[digest] = entry[:2] + (latest,)
            for digest, entry in self._failures.items():
                if entry[1] > latest:
                    self._failures[digest] = (entry[0], latest)

    def forgetUser(self, address):
        """
        Drop everything remembered for a user (a remembered password turned
        out to be stale).
        """
        for digest in [d for d, (_, user, _) in self._entries.items() if user is not None and user.address == address]:
            del self._entries[digest]

    def __len__(self):
        return len(self._entries)
