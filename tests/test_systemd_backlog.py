"""
mailgate.systemd.Notifier while systemd's socket is full for long (PID 1
stalled): what it keeps to send again never loses a state change (READY=1,
RELOADING=1, STOPPING=1), keeps only the latest of what replaces the one
before (STATUS=, WATCHDOG=1, EXTEND_TIMEOUT_USEC=), and stays small however
many notifications wait.  A real datagram socket the test does not read
until it says so, as systemd's while it is busy.
"""

import pytest
from twisted.internet.task import Clock

from mailgate import systemd
from test_systemd import NotifySocket, fillQueue


@pytest.fixture
def notifySocket(tmp_path):
    sock = NotifySocket(str(tmp_path / "notify"))
    yield sock
    sock.close()


def stalled(notifySocket):
    """
    A notifier retrying on a L{Clock}, and the senders that filled the
    socket's queue (closed by L{drain}).
    """
    clock = Clock()
    notifier = systemd.Notifier(notifySocket.sock.getsockname())
    notifier.retryOn(clock)
    return notifier, clock, fillQueue(notifySocket.sock.getsockname())


def drain(notifySocket, notifier, clock, senders):
    """
    systemd reads again: receive everything, letting the notifier send what
    it kept as room appears, until nothing is left to send.

    @return: the notifier's datagrams, each a list of lines, in order.
    """
    received = []
    try:
        for _ in range(10_000):
            while True:
                lines = notifySocket.receive(timeout=0.05)
                if lines is None:
                    break
                if lines != ["X_OTHER=1"]:
                    received.append(lines)
            if not clock.getDelayedCalls():
                return received
            clock.advance(systemd.RETRY_EVERY)
        pytest.fail(f"the notifier never sent all it kept; received {received}")
    finally:
        notifier.close()
        for sender in senders:
            sender.close()


def stateLines(received):
    return [line for lines in received for line in lines if line.split("=", 1)[0] in ("READY", "RELOADING", "STOPPING")]


def lastOf(key, received):
    values = [line for lines in received for line in lines if line.startswith(key + "=")]
    return values[-1] if values else None


def test_aReadyAfterManyStatusUpdatesArrives(notifySocket):
    """
    While systemd's socket stays full, the session count changes every
    second and each change is a STATUS=: after 64 of them the READY=1 (or
    STOPPING=1) that followed was dropped, and the unit stayed "activating"
    until TimeoutStartSec killed a server that served.  Now READY=1 arrives,
    and the status systemd is left with is the latest.
    """
    notifier, clock, senders = stalled(notifySocket)
    assert notifier.notify("STATUS=starting") is False
    for n in range(200):
        notifier.notify(f"STATUS=waiting for the database ({n})")
        notifier.notify("WATCHDOG=1")
    notifier.notify("READY=1", "STATUS=serving: 0 sessions")
    for n in range(1, 200):
        notifier.notify(f"STATUS=serving: {n} sessions")
    received = drain(notifySocket, notifier, clock, senders)
    assert stateLines(received) == ["READY=1"]
    assert lastOf("STATUS", received) == "STATUS=serving: 199 sessions"
    # Superseded statuses and pings are not resent: a handful of datagrams.
    assert len(received) <= 4, received


def test_stoppingAndItsExtensionArriveAfterTheReady(notifySocket):
    """
    READY=1, many statuses, then shutdown: STOPPING=1 arrives after READY=1,
    with the EXTEND_TIMEOUT_USEC= sent with it (after STOPPING=1, so that it
    extends the stop's time-out and not the start's), and the last status.
    """
    notifier, clock, senders = stalled(notifySocket)
    notifier.notify("EXTEND_TIMEOUT_USEC=30000000", "STATUS=upgrading the database schema")
    notifier.notify("READY=1", "STATUS=serving: 0 sessions")
    for n in range(1, 200):
        notifier.notify(f"STATUS=serving: {n} sessions")
    notifier.notify("STOPPING=1", "STATUS=stopping: 3 sessions", "EXTEND_TIMEOUT_USEC=65000000")
    notifier.notify("STATUS=stopping: 2 sessions")
    received = drain(notifySocket, notifier, clock, senders)
    assert stateLines(received) == ["READY=1", "STOPPING=1"]
    assert lastOf("STATUS", received) == "STATUS=stopping: 2 sessions"
    assert lastOf("EXTEND_TIMEOUT_USEC", received) == "EXTEND_TIMEOUT_USEC=65000000"
    lines = [line for datagram in received for line in datagram]
    assert lines.index("STOPPING=1") < lines.index("EXTEND_TIMEOUT_USEC=65000000")


def test_manyReloadsWhileStalledEndReady(notifySocket):
    """
    SIGHUPs while systemd is stalled: each reload is RELOADING=1 then
    READY=1.  What waits stays small however many there are: the READY=1
    that started the service, the last reload whole, and the STOPPING=1
    after the reloads, in their places.
    """
    notifier, clock, senders = stalled(notifySocket)
    notifier.notify("READY=1", "STATUS=serving: 0 sessions")
    for n in range(500):
        notifier.notify("RELOADING=1", f"MONOTONIC_USEC={1000 + n}", "STATUS=reloading")
        notifier.notify("READY=1", f"STATUS=serving: {n} sessions")
    assert len(notifier._backlog) <= 3
    notifier.notify("STOPPING=1", "STATUS=stopping: 0 sessions")
    received = drain(notifySocket, notifier, clock, senders)
    # The last reload is told whole, with its own stamp: systemd ends a
    # reload it asked for (SIGHUP, Type=notify-reload) only at a READY=1
    # after a RELOADING=1 stamped no earlier than its signal.
    assert stateLines(received) == ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"], received
    assert "MONOTONIC_USEC=1499" in [line for datagram in received for line in datagram], received
    assert len(received) <= 4, received
    assert lastOf("STATUS", received) == "STATUS=stopping: 0 sessions"


def test_aReloadThatBeganWhileStalledIsToldWithItsStamp(notifySocket):
    """
    A reload still under way when systemd reads again: RELOADING=1 arrives
    with its MONOTONIC_USEC= (the Type=notify-reload protocol), after the
    READY=1 before it.
    """
    notifier, clock, senders = stalled(notifySocket)
    notifier.notify("READY=1", "STATUS=serving: 0 sessions")
    notifier.notify("RELOADING=1", "MONOTONIC_USEC=1234", "STATUS=reloading")
    received = drain(notifySocket, notifier, clock, senders)
    assert stateLines(received) == ["READY=1", "RELOADING=1"]
    assert ["RELOADING=1", "MONOTONIC_USEC=1234", "STATUS=reloading"] in received


def test_otherStateChangesAreKeptInOrder(notifySocket):
    """
    Lines that are not a status, a ping or an extension (MAINPID=, ERRNO=,
    ...) are state changes: each kept, in order, however many statuses
    follow.
    """
    notifier, clock, senders = stalled(notifySocket)
    notifier.notify("MAINPID=42")
    for n in range(100):
        notifier.notify(f"STATUS={n}")
    notifier.notify("ERRNO=5")
    notifier.notify("WATCHDOG=trigger")
    notifier.notify("STATUS=last")
    received = drain(notifySocket, notifier, clock, senders)
    lines = [line for datagram in received for line in datagram if not line.startswith("STATUS=")]
    assert lines == ["MAINPID=42", "ERRNO=5", "WATCHDOG=trigger"]
    assert lastOf("STATUS", received) == "STATUS=last"
