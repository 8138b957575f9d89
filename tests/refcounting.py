"""
Checking that objects are freed by reference counting alone.

Python frees an object the moment nothing refers to it, unless it is part
of a reference cycle: then it waits for the cyclic garbage collector, whose
full passes come rarely on a long-running server.  A server whose sessions
form cycles keeps every ended session (and what it holds: OpenSSL buffers,
replies) until such a pass.  The tests that say "freed at once" run with
the cycle collector off, so that only reference counting can free.
"""

import contextlib
import gc


@contextlib.contextmanager
def withoutCycleCollector():
    """
    Python's cyclic garbage collector off for the block (and back on after
    it, if it was on).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
