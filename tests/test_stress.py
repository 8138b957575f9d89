"""
Near the connection limit (the policy's stress, as Postfix's): idle
sessions of clients that have not logged in are closed after
C{stressIdleTimeout} seconds, but only until the sessions left are under
the stress's end (L{mailgate.policy.limits.STRESS_UNTIL}), those already
asked to close counted as gone.  In memory: real POP3 sessions of one
factory, a real L{ConnectionPolicy} with a small limit, a L{Clock}.

A closed session's connection is counted closed only when its transport
reports the loss, a reactor turn after the close (a TLS handshake aborted,
a reply still being written): every idle timer due at the same moment ran
before any did, and all of them saw the stress and closed their sessions.
Here the transports never report the loss by themselves, as then.
"""

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.python.failure import Failure

from mailgate.policy.connection import ConnectionPolicy
from mailgate.policy.memory import MemoryPolicyStore
from mailgate.policy.settings import PolicySettings
from mailgate.testing import POP3Session, addUser, pop3Factory

ALICE = "alice@example.org"
PASSWORD = "wonderland"
IDLE_TIMEOUT = 60
AUTOLOGOUT = b"-ERR autologout: idle for too long\r\n"


def peer(n):
    return IPv4Address("TCP", f"192.0.2.{n}", 40000 + n)


def events(logs, name):
    return [e for e in logs if e.get("event") == name]


@pytest.mark.parametrize("handshaking", [False, True], ids=["plain", "tls-handshake"])
def test_idleSessionsAreClosedOnlyUntilTheStressIsOver(store, handshaking):
    """
    With 8 of at most 10 connections open (a logged-in user and 7 idle
    clients), the idle timers of the 7 come due together: 2 are closed,
    which leaves 6, under 7 (70 %), and the stress is over; the other 5
    keep the usual idle timeout and are closed only when it ends.  The
    logged-in user is never closed for the stress.  Clients still in a TLS
    handshake (aborted, not closed) are counted alike.  The stress's end is
    logged once, when the second session is closed, with the 6 left.
    """
    addUser(store, ALICE, PASSWORD)
    clock = Clock()
    clock.advance(1_000_000)
    policy = ConnectionPolicy(
        MemoryPolicyStore(), clock, PolicySettings(exemptNetworks=["none"], maxConnections=10)
    )
    factory = pop3Factory(store, clock=clock, policy=policy, idleTimeout=IDLE_TIMEOUT, loginTimeout=0)
    # Loopback: a plain-text login is allowed there.
    user = POP3Session(store, factory=factory, clock=clock, peer=IPv4Address("TCP", "127.0.0.1", 40001))
    assert user.login(ALICE, PASSWORD).startswith("+OK")
    idle = []
    with capturedLogs() as logs:
        for n in range(2, 9):
            idle.append(POP3Session(store, factory=factory, clock=clock, peer=peer(n)))
            idle[-1].transport.handshaking = handshaking
        assert policy.underStress()
        assert len(events(logs, "limits.stress")) == 1

        # Every idle timer is due in this one step.
        clock.advance(factory.protocol.stressIdleTimeout)
    closed = [s for s in idle if s.disconnected]
    assert len(closed) == 2
    assert not policy.underStress()
    (over,) = events(logs, "limits.stress_over")
    assert over["total"] == 6
    aborted = [s.transport.disconnecting for s in closed]
    assert all(aborted)
    if not handshaking:
        assert [s._take() for s in closed] == [AUTOLOGOUT, AUTOLOGOUT]
    assert not user.disconnected

    # Their connections are counted closed a turn later: nothing changes.
    with capturedLogs() as logs:
        for s in closed:
            s.protocol.connectionLost(Failure(ConnectionDone()))
    assert policy.limits.total == 6
    assert not policy.underStress()
    assert not events(logs, "limits.stress_over")

    kept = [s for s in idle if s not in closed]
    clock.advance(IDLE_TIMEOUT - factory.protocol.stressIdleTimeout - 1)
    assert not any(s.disconnected for s in kept)
    clock.advance(1)
    assert all(s.disconnected for s in kept)


def test_connectionsClosingAreGoneForTheStressNotForTheLimit():
    """
    The policy on its own: connections told closing no longer count
    towards the stress (its end logged with those staying), but still
    count against the limit until they are closed, as their descriptors
    do; closing them then changes nothing more.
    """
    clock = Clock()
    policy = ConnectionPolicy(
        MemoryPolicyStore(), clock, PolicySettings(exemptNetworks=["none"], maxConnections=10)
    )
    with capturedLogs() as logs:
        for n in range(1, 9):
            assert policy.admit("smtp", peer(n)) is None
        assert policy.underStress()
        policy.connectionClosing("smtp", peer(1))
        assert policy.underStress()
        policy.connectionClosing("smtp", peer(2))
        assert not policy.underStress()
    assert [e["total"] for e in events(logs, "limits.stress_over")] == [6]

    with capturedLogs() as logs:
        for n in (9, 10):
            assert policy.admit("smtp", peer(n)) is None
        # 8 staying: the stress again.
        assert policy.underStress()
        assert policy.admit("smtp", peer(11)) == "too many connections"
        for n in (1, 2):
            policy.connectionClosed("smtp", peer(n))
        assert policy.underStress()
        assert policy.admit("smtp", peer(11)) is None
    assert [e["total"] for e in events(logs, "limits.stress")] == [8]
    assert not events(logs, "limits.stress_over")


def test_everyEndOfAConnectionLeavesTheCountsAsTheyWere(store):
    """
    Whichever way a connection ends, it is counted once as leaving and
    once as closed: a connection refused at the limit (never admitted),
    one whose TLS handshake fails (lost, never closed), one closed twice
    (an idle timeout, then an abort) and one lost with no reason.  A
    leaving count left behind would hold the stress off for good; one
    taken twice would count another connection still closing as staying.
    """
    import ssl

    clock = Clock()
    clock.advance(1_000_000)
    policy = ConnectionPolicy(
        MemoryPolicyStore(), clock, PolicySettings(exemptNetworks=["none"], maxConnections=3)
    )
    factory = pop3Factory(store, clock=clock, policy=policy, idleTimeout=IDLE_TIMEOUT, loginTimeout=0)
    sessions = [POP3Session(store, factory=factory, clock=clock, peer=peer(n)) for n in range(1, 6)]
    limits = policy.limits
    handshakeFailed = Failure(ssl.SSLError("wrong version number"))
    for refused in sessions[3:]:
        assert refused.greeting.startswith("-ERR"), refused.greeting
        refused.protocol.close()
        refused.protocol.connectionLost(handshakeFailed)
    assert (limits.total, limits.leaving) == (3, 0)
    sessions[0].protocol.connectionLost(handshakeFailed)
    sessions[1].protocol.close()
    sessions[1].protocol.close(abort=True)
    assert (limits.total, limits.leaving) == (2, 1)
    sessions[1].protocol.connectionLost(Failure(ConnectionDone()))
    sessions[2].protocol.connectionLost(None)
    assert (limits.total, limits.leaving) == (0, 0)


def test_theStressLineSaysWhereTheStressEnds():
    """
    With at most 16 connections the stress ends below 11.2 (70 %): at 11
    staying, so the line says "fewer than 12", not 11 (it rounded down).
    """
    policy = ConnectionPolicy(
        MemoryPolicyStore(), Clock(), PolicySettings(exemptNetworks=["none"], maxConnections=16)
    )
    with capturedLogs() as logs:
        for n in range(1, 14):
            assert policy.admit("smtp", peer(n)) is None
        (stress,) = events(logs, "limits.stress")
        assert stress["total"] == 13 and stress["until"] == 12
        policy.connectionClosing("smtp", peer(1))
        assert policy.underStress()
        policy.connectionClosing("smtp", peer(2))
    (over,) = events(logs, "limits.stress_over")
    assert over["total"] == 11
