"""
What the suite's own reactors (iterated.py, pumped.py) share: waiting for
a step that must succeed.
"""

from twisted.python.failure import Failure


class MustSucceed:
    """
    Mixed into a test reactor that has C{wait(d, timeout)}, handing back a
    L{Deferred}'s result or its L{Failure}.
    """

    def resultOf(self, d, timeout=30):
        """
        The result of C{d}, which must succeed: its failure is raised, so
        a step the test only waits for cannot fail unnoticed (L{wait}
        hands a failure back, for the tests that expect one).
        """
        result = self.wait(d, timeout)
        if isinstance(result, Failure):
            result.raiseException()
        return result
