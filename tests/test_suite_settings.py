"""
The suite's own settings (tests/conftest.py) that keep it from failing by
chance on a slow or loaded machine.
"""

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st


def test_aSlowHypothesisExampleIsNotAFailure():
    """
    An example that takes 0.3 s once (its process descheduled, as on a
    loaded 2-core CI machine) does not fail the property: Hypothesis's
    default 200 ms deadline is off for the suite.
    """
    stalled = []

    @given(st.integers())
    def property(n):
        if not stalled:
            stalled.append(n)
            time.sleep(0.3)

    property()
    assert stalled


def test_aStepATestOnlyWaitsForCannotFailUnnoticed():
    """
    The test reactors' C{wait} hands a failure back (for the tests that
    expect one); C{resultOf}, which the steps a test only waits for use,
    raises it.
    """
    from twisted.internet import defer

    from iterated import IteratedReactor
    from pumped import PumpedReactor

    iterated = IteratedReactor()
    try:
        for reactor in (PumpedReactor(), iterated):
            assert reactor.wait(defer.fail(ValueError("lost"))).check(ValueError)
            with pytest.raises(ValueError, match="lost"):
                reactor.resultOf(defer.fail(ValueError("lost")))
            assert reactor.resultOf(defer.succeed(7)) == 7
    finally:
        iterated.close()
