"""
What one step of a SASL exchange (RFC 4422) ends in, shared by every
mechanism: a L{Challenge} to send, L{Authenticate} with the credentials to
check, or L{SASLError} for input that is malformed or not acceptable.

Apart from L{mailgate.auth.sasl}, which offers the mechanisms, so that the
mechanisms kept in modules of their own (L{mailgate.auth.oauth}) depend on
these alone and the offering module may import them without a cycle.
"""

import attr


class SASLError(Exception):
    """
    The client's SASL data is malformed or not acceptable.
    """


@attr.s(frozen=True)
class Challenge:
    """
    Send C{data} to the client and wait for its response.
    """

    data = attr.ib()


@attr.s(frozen=True)
class Authenticate:
    """
    The exchange is over: log in with C{credentials}.
    """

    credentials = attr.ib()
