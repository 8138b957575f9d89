# -*- test-case-name: tests.test_timers -*-
"""
Stopping a timer that may already have run.
"""


def cancelled(call):
    """
    Cancel C{call} (an L{IDelayedCall}, or C{None}) unless it has run or
    been cancelled already.

    @return: C{None}, for C{self._timer = cancelled(self._timer)}.
    """
    if call is not None and call.active():
        call.cancel()
    return None
