"""
The Hypothesis settings of the fuzz tests (test_*_fuzz.py): the same
examples on every run, so that the suite passes or fails on the code
alone, as the model tests' (test_pop3_model.MODEL);
C{MAILGATE_FUZZ_EXAMPLES=N} runs N of them at random instead, for a
longer search than the suite's.
"""

import os

from hypothesis import HealthCheck, settings


def fuzzSettings(examples):
    """
    Settings for a fuzz test of C{examples} examples in the suite.
    """
    chosen = os.environ.get("MAILGATE_FUZZ_EXAMPLES")
    return settings(
        max_examples=int(chosen) if chosen else examples,
        deadline=None,
        derandomize=not chosen,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
