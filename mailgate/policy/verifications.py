# -*- test-case-name: tests.test_verification_turns -*-
"""
Password verifications in progress per client address: at most
L{PER_ADDRESS} at once, the others waiting their turn in order.

A password hash (scrypt: about 32 MiB and 100 ms of CPU; an imported
Argon2 costs more) is the dearest thing a client can make the server do.
The penalty and the bans count failures, but only once a verification
has ended: a new address opening its 50 connections and sending 50
different wrong passwords at once had 50 hashes running before its first
failure was counted, and every other user's login waited behind them.
Held to a few at a time, its logins are checked a few after another (a
ban lands between them: the logins still waiting are refused unchecked;
the penalty, asked for before the wait, does not), and the other
addresses' logins are not held back.

Nothing is refused here and nothing is counted: a login waits for its
turn, and gives its place up when its session ends (the connection lost,
the server stopping, the login timeout) by cancelling the wait.  Keyed as
the penalty keys addresses (an IPv4 address, an IPv6 /64); the caller
passes no key for what the penalty exempts.
"""

import collections

from twisted.internet import defer

#: password verifications in progress at once per client address
PER_ADDRESS = 2


class _Address:
    """
    One address's verifications: how many are in progress, and the
    L{Deferred}s of the logins waiting their turn, oldest first.
    """

    __slots__ = ("running", "waiting", "handingOver")

    def __init__(self):
        self.running = 0
        self.waiting = collections.deque()
        self.handingOver = False


class VerificationSlots:
    """
    @ivar perAddress: verifications in progress at once per address; 0
        for no limit.
    """

    def __init__(self, perAddress=PER_ADDRESS):
        self.perAddress = perAddress
        # Only the addresses with a verification in progress or waiting:
        # the others cost nothing.
        self._addresses = {}

    def turn(self, key):
        """
        Wait for the turn of a password verification from C{key}.

        @param key: the client's address key, or C{None} for none (no
            limit applies).
        @return: a L{Deferred} that fires, once a verification from C{key}
            may start, with a callable to call when it has ended (once or
            more: only the first call counts).  Cancelling it before it
            fires gives the place up.
        """
        if key is None or self.perAddress <= 0:
            return defer.succeed(_nothing)
        address = self._addresses.get(key)
        if address is None:
            address = self._addresses[key] = _Address()
        if address.running < self.perAddress and not address.waiting:
            address.running += 1
            return defer.succeed(self._release(key, address))

        def giveUp(d):
            # Cancelled while waiting (the session ended): its place goes.
            # A Deferred that already had its turn is not cancellable.
            try:
                address.waiting.remove(d)
            except ValueError:
                return
            self._forgetIfIdle(key, address)

        waiting = defer.Deferred(giveUp)
        address.waiting.append(waiting)
        return waiting

    def inProgress(self, key):
        """
        The verifications in progress from C{key}.
        """
        address = self._addresses.get(key)
        return 0 if address is None else address.running

    def waiting(self, key):
        """
        The logins from C{key} waiting their turn.
        """
        address = self._addresses.get(key)
        return 0 if address is None else len(address.waiting)

    def __len__(self):
        """
        The addresses with a verification in progress or waiting.
        """
        return len(self._addresses)

    def _release(self, key, address):
        released = []

        def release():
            if released:
                return
            released.append(True)
            address.running -= 1
            self._handOver(key, address)

        return release

    def _handOver(self, key, address):
        # The next login's turn starts its check at once, and a check can
        # end at once too (a verification answered from a cache): done in
        # a loop, not by recursion, so that a long queue cannot overflow
        # the stack.
        if address.handingOver:
            return
        address.handingOver = True
        try:
            while address.waiting and address.running < self.perAddress:
                address.running += 1
                address.waiting.popleft().callback(self._release(key, address))
        finally:
            address.handingOver = False
        self._forgetIfIdle(key, address)

    def _forgetIfIdle(self, key, address):
        if not address.running and not address.waiting and not address.handingOver:
            if self._addresses.get(key) is address:
                del self._addresses[key]


def _nothing():
    pass
