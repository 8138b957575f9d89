"""
mailgate as an application that embeds it uses it (README, Embedding):
C{makeService} over a store of the embedder's (L{mailgate.testing}'s
L{FaultInjectingStore}), and the whole hierarchy on a reactor of the
embedder's, in a process of its own, the global reactor out of reach.
"""

import os
import subprocess
import sys
import textwrap

from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from mailgate.config import MailgateConfig
from mailgate.service import makeService
from mailgate.testing import FaultInjectingStore, SMTPSession, addUser, memoryStore, resultOf

from e2e import DEADLINE

ALICE = "alice@example.org"
MESSAGE = b"Subject: hi\r\n\r\nhello\r\n"


def test_aFaultInjectingStoreServesUnderMakeService():
    """
    C{makeService(config, store=...)} takes any store, as its docstring
    and the protocols (which see it through L{mailgate.interfaces}) do: a
    test of the embedder's whole service over a store that fails on
    demand.  It raised AttributeError ('FaultInjectingStore' object has no
    attribute 'engine'): the service read the SQL store's engine for its
    database file's permission warnings.
    """
    store = FaultInjectingStore(memoryStore())
    addUser(store, ALICE, "secret")
    reactor = MemoryReactorClock()
    root = makeService(
        MailgateConfig(pop3=["tcp:0"], smtp=["tcp:0"], domains=["example.org"], postmaster=ALICE),
        reactor=reactor,
        store=store,
    )
    root.startService()
    smtp = root.listeners["SMTP"][0].factory

    def send():
        session = SMTPSession(store, factory=smtp)
        last = session.sendMail("bob@example.net", [ALICE], MESSAGE).splitlines()[-1]
        assert session.command("QUIT").startswith("221 ")
        session.protocol.connectionLost(Failure(ConnectionDone()))
        return last

    assert send().startswith("250 ")
    store.fail("deliver")
    assert send().startswith("451 ")
    assert resultOf(root.stopService()) is None
    assert ("close", ()) in store.calls
