"""
What SMTP and LMTP remember of recipients (L{LocalDelivery}: a user
without a quota, a domain found, for 30 s) and a reload that changes what
it was remembered under (a default quota, the domains).

A reload forgets what was remembered.  A look-up under way at that moment
was asked under the old settings: before, its answer was remembered when
it came, after the forgetting, and the next RCPT within 30 s was answered
from it (a recipient taken without the default quota the reload had just
set).  Protocol logic on the in-memory store, no sockets: the look-up is
held in flight by the store until the test lets it answer.
"""

from twisted.internet import defer

from mailgate.smtp import LocalDelivery
from mailgate.store.limits import StoreLimits
from mailgate.testing import FaultInjectingStore, addUser, memoryStore, resultOf

ALICE = "alice@example.org"
BOB = "bob@example.org"


class HeldLookups(FaultInjectingStore):
    """
    A store whose look-ups C{held} (C{quotaOf}, C{hasDomain}) answer only
    when L{answer} is called: look-ups in flight, as on a busy database.
    """

    def __init__(self, store, held):
        super().__init__(store)
        self.holding = set(held)
        self._held = []

    def _hold(self, operation, result):
        if operation not in self.holding:
            return result
        waiting = defer.Deferred()
        self._held.append((result, waiting))
        return waiting

    def quotaOf(self, address):
        return self._hold("quotaOf", super().quotaOf(address))

    def hasDomain(self, domain):
        return self._hold("hasDomain", super().hasDomain(domain))

    def answer(self):
        """
        Let every held look-up answer, and the next ones answer at once.
        """
        self.holding = set()
        held, self._held = self._held, []
        for result, waiting in held:
            result.chainDeferred(waiting)


def _refusal(d):
    failure = []
    d.addErrback(failure.append)
    assert failure, "accepted"
    return failure[0].value


def test_aLookUpUnderWayAtAReloadIsNotRemembered():
    """
    alice has no quota; her RCPT's look-up is in flight when a reload sets
    a 4 KB default quota.  Its answer (no quota, asked before) takes that
    RCPT; the next RCPT of a 5000-octet message is looked up again and
    refused for the quota, not taken from memory.
    """
    store = memoryStore()
    addUser(store, ALICE, "secret")
    held = HeldLookups(store, ["quotaOf"])
    delivery = LocalDelivery(held)
    inFlight = delivery.checkRecipient(ALICE, size=5000)
    answered = []
    inFlight.addBoth(lambda result: answered.append(result) or result)
    assert answered == []
    store.limits = StoreLimits(quotaOctets=4096)
    delivery.forgetRecipients()
    held.answer()
    assert resultOf(inFlight) == ALICE
    refusal = _refusal(delivery.checkRecipient(ALICE, size=5000))
    assert (refusal.code, refusal.enhanced) == (552, "5.2.3"), refusal


def test_aLookUpAfterTheReloadIsRemembered():
    """
    What is looked up after the forgetting is remembered as before: the
    next RCPT is answered without asking the store.
    """
    store = memoryStore()
    addUser(store, ALICE, "secret")
    held = HeldLookups(store, ["quotaOf"])
    delivery = LocalDelivery(held)
    delivery.forgetRecipients()
    held.answer()
    assert resultOf(delivery.checkRecipient(ALICE)) == ALICE
    asked = len(held.calls)
    assert resultOf(delivery.checkRecipient(ALICE)) == ALICE
    assert len(held.calls) == asked


def test_aDomainFoundDuringAReloadIsNotRemembered():
    """
    The same for a domain (the server takes the domains its users have):
    a domain look-up answered after the reload's forgetting is asked again
    at the next RCPT of the domain (bob's; alice herself is remembered, as
    her own look-up began after the forgetting).
    """
    store = memoryStore()
    addUser(store, ALICE, "secret")
    addUser(store, BOB, "secret")
    held = HeldLookups(store, ["hasDomain"])
    delivery = LocalDelivery(held)
    inFlight = delivery.checkRecipient(ALICE)
    delivery.forgetRecipients()
    held.answer()
    assert resultOf(inFlight) == ALICE
    before = [name for name, _ in held.calls].count("hasDomain")
    assert resultOf(delivery.checkRecipient(BOB)) == BOB
    assert [name for name, _ in held.calls].count("hasDomain") == before + 1
