"""
L{mailgate.interfaces.ILifecycleStore.setQuota} says what its
implementations do: a limit not given is left as it is.  The interface
declared both limits required, while its docstring, the SQL store, the
memory store and L{mailgate.testing.FaultInjectingStore} (and the
command's C{user quota ADDRESS --messages N}) leave one out.
"""

import inspect

import pytest
from zope.interface.verify import verifyObject

from mailgate.interfaces import KEEP, ILifecycleStore
from mailgate.testing import FaultInjectingStore, addUser, memoryStore, resultOf

ALICE = "alice@example.org"


def test_theInterfaceDeclaresALimitNotGivenAsKept():
    """
    The interface's C{setQuota} takes C{address} and, optionally, the two
    limits, whose default is L{KEEP}.
    """
    info = ILifecycleStore["setQuota"].getSignatureInfo()
    assert (info["required"], info["optional"]) == (("address",), {"octets": KEEP, "messages": KEEP})
    assert ILifecycleStore["setQuota"].getSignatureString() == "(address, octets=KEEP, messages=KEEP)"


@pytest.mark.parametrize("kind", ["memory", "faultInjecting"])
def test_eachStoreKeepsTheLimitNotGiven(kind):
    """
    The memory store (the SQL store) and the fault-injecting wrapper
    default to the interface's L{KEEP}, and keep what is not given, or
    given as L{KEEP}.
    """
    store = memoryStore()
    if kind == "faultInjecting":
        store = FaultInjectingStore(store)
    assert verifyObject(ILifecycleStore, store)
    parameters = inspect.signature(store.setQuota).parameters
    assert [parameters[name].default for name in ("octets", "messages")] == [KEEP, KEEP]
    addUser(store, ALICE, "pw")
    resultOf(store.setQuota(ALICE, 1000, 10))
    resultOf(store.setQuota(ALICE, messages=5))
    status = resultOf(store.quotaOf(ALICE))
    assert (status.ownOctets, status.ownMessages) == (1000, 5)
    resultOf(store.setQuota(ALICE, KEEP, 7))
    resultOf(store.setQuota(ALICE, octets=2000))
    status = resultOf(store.quotaOf(ALICE))
    assert (status.ownOctets, status.ownMessages) == (2000, 7)
    resultOf(store.close())
