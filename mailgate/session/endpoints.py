# -*- test-case-name: tests.test_endpoints -*-
"""
Listening endpoints for sessions: Twisted's strports descriptions, with two
changes.

  - A listen backlog of at least L{DEFAULT_BACKLOG}, unless the description
    sets one: Twisted's default of 50 leaves some of 200 clients connecting
    at once connected but never greeted (the kernel drops their final ACK).
  - C{haproxy:} listeners read the PROXY header before the session is
    connected (L{mailgate.session.proxy}), not after as Twisted's own
    wrapper does, so the session sees the client's real address from the
    start.
"""

from twisted.internet.endpoints import serverFromString

from mailgate.session.proxy import ProxyHeaderEndpoint

DEFAULT_BACKLOG = 1024

# Endpoint types whose listeners take a backlog.
_BACKLOG_TYPES = frozenset(["tcp", "tcp6", "ssl", "unix"])
_PROXY_PREFIX = "haproxy:"


def _splitDescription(description):
    """
    Cut a strports description at its unescaped colons; escapes are kept.
    """
    parts = []
    current = []
    escaped = False
    for ch in description:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            current.append(ch)
            escaped = True
        elif ch == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def withBacklog(description, backlog=DEFAULT_BACKLOG):
    """
    C{description} with C{backlog=} added, for the endpoint types that
    take one, unless it sets one already.  C{haproxy:} descriptions are
    looked into.
    """
    if description[: len(_PROXY_PREFIX)].lower() == _PROXY_PREFIX:
        return description[: len(_PROXY_PREFIX)] + withBacklog(
            description[len(_PROXY_PREFIX):], backlog
        )
    parts = _splitDescription(description)
    if parts[0].lower() not in _BACKLOG_TYPES:
        return description
    if any(part.startswith("backlog=") for part in parts[1:]):
        return description
    return f"{description}:backlog={backlog}"


def serverEndpoint(reactor, description, backlog=DEFAULT_BACKLOG, balancers=()):
    """
    The listening endpoint for C{description}.

    @param balancers: for a C{haproxy:} description, the networks its
        connections may come from; empty for any.
    @raise ValueError: (or another exception of Twisted's parser) for a
        description Twisted does not understand.
    """
    description = withBacklog(description, backlog)
    if description[: len(_PROXY_PREFIX)].lower() == _PROXY_PREFIX:
        inner = description[len(_PROXY_PREFIX):]
        return ProxyHeaderEndpoint(reactor, serverEndpoint(reactor, inner, backlog), balancers)
    return serverFromString(reactor, description)
