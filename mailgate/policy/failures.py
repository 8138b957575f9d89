# -*- test-case-name: tests.test_policy -*-
"""
L{FailureLog}: the recent failed authentications this node knows of, its
own and (read back from the store) every other node's, kept in memory so
that the penalty is worked out without a database trip.

Failures are known by their ids, so one read back again (refreshes
overlap a little) or one this node recorded itself counts once.  The log
forgets failures older than the window and never holds more than
L{FailureLog.capacity} of them, whatever an attack sends.
"""

from collections import deque


class FailureLog:
    """
    @param window: seconds a failure is remembered.
    @param capacity: failures kept at most; the oldest go first.
    """

    capacity = 100_000

    def __init__(self, window, capacity=None):
        self.window = window
        if capacity is not None:
            self.capacity = capacity
        # Every failure known, in the order learnt (about the order of
        # time: pruned from the front).
        self._order = deque()
        self._ids = set()
        # Address to the times of its failures, in the order learnt.
        self._byAddress = {}
        # Login name to {address: time of its latest failure on it}.
        self._byLogin = {}

    def __len__(self):
        return len(self._order)

    def add(self, failure):
        """
        Remember an L{mailgate.records.AuthFailure}.

        @return: whether it was new.
        """
        if failure.failureId in self._ids:
            return False
        self._ids.add(failure.failureId)
        self._order.append(failure)
        self._byAddress.setdefault(failure.address, deque()).append(failure.at)
        if failure.login is not None:
            addresses = self._byLogin.setdefault(failure.login, {})
            if addresses.get(failure.address, failure.at) <= failure.at:
                addresses[failure.address] = failure.at
        while len(self._order) > self.capacity:
            self._drop()
        return True

    def _drop(self):
        failure = self._order.popleft()
        self._ids.discard(failure.failureId)
        times = self._byAddress.get(failure.address)
        if times is not None:
            try:
                times.remove(failure.at)
            except ValueError:
                pass
            if not times:
                del self._byAddress[failure.address]
        addresses = self._byLogin.get(failure.login)
        if addresses is not None and addresses.get(failure.address) == failure.at:
            del addresses[failure.address]
            if not addresses:
                del self._byLogin[failure.login]

    def prune(self, now):
        """
        Forget the failures that fell out of the window.
        """
        cutoff = now - self.window
        while self._order and self._order[0].at <= cutoff:
            self._drop()

    def forget(self, address, upTo=None):
        """
        Forget the failures from C{address} (its ban was lifted), or those
        at C{upTo} or before (C{ban del} forgot them then: the marker,
        read late, must not take the failures after it).
        """
        if address not in self._byAddress:
            return
        gone = [f for f in self._order if f.address == address and (upTo is None or f.at <= upTo)]
        if not gone:
            return
        ids = {f.failureId for f in gone}
        self._order = deque(f for f in self._order if f.failureId not in ids)
        self._ids -= ids
        kept = [f for f in self._order if f.address == address]
        if kept:
            self._byAddress[address] = deque(f.at for f in kept)
        else:
            del self._byAddress[address]
        # Each login name's latest failure from the address, from those kept.
        for login in {f.login for f in gone if f.login is not None}:
            addresses = self._byLogin.get(login)
            if addresses is None:
                continue
            latest = max((f.at for f in kept if f.login == login), default=None)
            if latest is None:
                addresses.pop(address, None)
                if not addresses:
                    del self._byLogin[login]
            else:
                addresses[address] = latest

    def fromAddress(self, address, after):
        """
        How many failures from C{address} happened after C{after} (and
        within the window of which the caller's C{after} is the start).
        """
        times = self._byAddress.get(address)
        if not times:
            return 0
        return sum(1 for at in times if at > after)

    def addressesAgainst(self, login, after, enough=None):
        """
        How many different addresses failed to log in as C{login} after
        C{after}; counting stops at C{enough}.
        """
        addresses = self._byLogin.get(login)
        if not addresses:
            return 0
        count = 0
        for at in addresses.values():
            if at > after:
                count += 1
                if enough is not None and count >= enough:
                    break
        return count
