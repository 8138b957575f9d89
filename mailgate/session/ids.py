# -*- test-case-name: tests.test_session_core -*-
"""
Naming a connection in the logs: its session id and the client's address.

A session id is unique across every node sharing a database and across
restarts: a random prefix drawn once per process, then a counter.  An
administrator follows one connection through the logs of many nodes by it,
the way Dovecot's C{session=<...>} is used.
"""

import itertools
import os
import secrets

from twisted.internet.address import UNIXAddress

_state = {"prefix": None, "counter": None}


def _forget():
    """
    In a forked child (twistd daemonizing): draw a prefix of its own at its
    first connection, so that no two processes ever hand out the same id.
    """
    _state["prefix"] = None


os.register_at_fork(after_in_child=_forget)


def newSessionId():
    """
    A new session id, such as C{"3f9a2c71b04e.17"}: 48 random bits for
    this process, a dot, and the number of the connection in it.
    """
    state = _state
    if state["prefix"] is None:
        state["prefix"] = secrets.token_hex(6)
        state["counter"] = itertools.count(1)
    return f"{state['prefix']}.{next(state['counter'])}"


def describeAddress(address):
    """
    An address as logs show it: C{host:port}, C{[v6 host]:port}, or
    C{unix:PATH} (C{unix} for an unnamed socket).
    """
    host = getattr(address, "host", None)
    if host is not None:
        port = getattr(address, "port", None)
        if ":" in host:
            host = f"[{host}]"
        return f"{host}:{port}"
    if isinstance(address, UNIXAddress):
        name = address.name
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        return f"unix:{name}" if name else "unix"
    return str(address)
