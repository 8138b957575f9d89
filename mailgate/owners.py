"""
The machine's users as messages name them: whose a file is, who runs
mailgate.  Its own module, below both the configuration's checks and the
store's refusals, which name them alike (the store may not import the
configuration: tests/test_contracts.py).
"""

import pwd


def ownerName(uid):
    """
    The name of the user C{uid}, for a line that says whose a file is, or
    C{uid N} where the system has no name for it.
    """
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"
