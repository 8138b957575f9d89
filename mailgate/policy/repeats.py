# -*- test-case-name: tests.test_policy -*-
"""
L{RepeatedCredentials}: recognises a failed login that repeats one of the
last few failures from the same address, name and password alike, so the
policy does not count it again.

A client left with an old password after a change (a phone, a forgotten
fetchmail) tries the same wrong password at every poll, and several
connections at once; counted each time it bans its address, which may be
a whole office behind one NAT, for a mistake that guesses nothing.  A
password guesser never repeats itself, so forgiving repeats costs the
defence nothing.  Dovecot's authentication penalty does the same (the last
ten name and password pairs per address).

Only the mechanisms that carry the password itself (USER/PASS, SASL PLAIN
and LOGIN) can be recognised: a digest (APOP, CRAM-MD5, SCRAM) differs at
every attempt.  What is kept is a keyed digest of the pair under a key
made at start and never stored, so neither memory nor the database holds
anything that helps recover a password; a node that restarts, or another
node, counts a repeat once more.
"""

import hashlib
import hmac
import secrets
from collections import OrderedDict, deque

#: The failures remembered per address.
REMEMBERED = 10


class RepeatedCredentials:
    """
    @param capacity: addresses remembered at most, the least recently
        failing forgotten first.
    """

    capacity = 10_000

    def __init__(self, capacity=None):
        if capacity is not None:
            self.capacity = capacity
        self._key = secrets.token_bytes(32)
        # Address to the digests of its last REMEMBERED failures.
        self._byAddress = OrderedDict()

    def __len__(self):
        return len(self._byAddress)

    def _digest(self, login, password):
        if isinstance(password, str):
            password = password.encode("utf-8", "surrogateescape")
        return hmac.new(self._key, login.encode("utf-8") + b"\0" + password, hashlib.sha256).digest()[:16]

    def repeated(self, address, login, password):
        """
        Whether this failure from C{address} repeats one of its last
        L{REMEMBERED}; remembered if not.

        @param login: the login name, in the policy's counted form, or
            C{None} for none: an OAUTHBEARER token sent without an
            authorisation identity (C{n,,}, as most clients send it) names
            no one but itself, and the same expired token at every poll
            was counted each time, banning its address at the tenth.
        @param password: the password tried (C{bytes} or C{str}), or
            C{None} when the mechanism does not reveal it: never a repeat.
        """
        if password is None:
            return False
        digest = self._digest(login or "", password)
        recent = self._byAddress.get(address)
        if recent is None:
            recent = self._byAddress[address] = deque(maxlen=REMEMBERED)
            while len(self._byAddress) > self.capacity:
                self._byAddress.popitem(last=False)
        else:
            self._byAddress.move_to_end(address)
            if digest in recent:
                return True
        recent.append(digest)
        return False
