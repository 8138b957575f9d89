"""
The machine's users and files' permissions as messages name them: whose
a file is, who runs mailgate, who else may read or change a file.  Its
own module, below the configuration's checks, the store's refusals and
the warnings of TLS keys, OAuth keys and database files, which all name
them alike (the store may not import the configuration:
tests/test_contracts.py).
"""

import os
import pwd
import stat


def ownerName(uid):
    """
    The name of the user C{uid}, for a line that says whose a file is, or
    C{uid N} where the system has no name for it.
    """
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def permissionsOf(path):
    """
    The permission bits of the file at C{path} (C{0o640}), or C{None}
    where it cannot be looked at: a warning about them has nothing to say.
    """
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return None
