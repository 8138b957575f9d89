"""
L{mailgate.timers.cancelled}: stopping a timer whatever state it is in.
"""

from twisted.internet.task import Clock

from mailgate.timers import cancelled


def test_aPendingCallIsCancelledAndNeverRuns():
    clock = Clock()
    ran = []
    call = clock.callLater(5, ran.append, "ran")
    assert cancelled(call) is None
    assert not call.active() and call.cancelled
    clock.advance(10)
    assert ran == []


def test_aCallThatRanOrWasCancelledOrIsNoneIsLeftAlone():
    clock = Clock()
    ran = clock.callLater(1, lambda: None)
    clock.advance(1)
    assert cancelled(ran) is None and ran.called
    gone = clock.callLater(1, lambda: None)
    gone.cancel()
    assert cancelled(gone) is None
    assert cancelled(None) is None
